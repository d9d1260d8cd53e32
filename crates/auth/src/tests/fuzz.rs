//! A bounded fuzz target for `verify`, run as part of `cargo test`: arbitrary
//! input never panics, and no mutation of a valid token is accepted.

use proptest::prelude::*;

use super::*;

/// Enough to shake out panics on every `cargo test`, few enough to stay fast.
/// For a longer run: `PROPTEST_CASES=100000 cargo test -p isocloud-auth fuzz`.
const CASES: u32 = 512;

fn config() -> ProptestConfig {
    ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() }
}

fn valid() -> String {
    acme_token(&claims())
}

/// Characters a mutation may write: the base64url alphabet, the separator,
/// padding, the standard alphabet's extras, whitespace and non-ASCII.
fn mutation_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => proptest::char::ranges(vec!['A'..='Z', 'a'..='z', '0'..='9'].into()),
        1 => proptest::sample::select(vec!['-', '_', '.', '=', '+', '/', ' ', '\0', 'é', '\u{feff}']),
        1 => any::<char>(),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Replace(usize, char),
    Insert(usize, char),
    Delete(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), mutation_char()).prop_map(|(i, c)| Mutation::Replace(i, c)),
        2 => (any::<usize>(), mutation_char()).prop_map(|(i, c)| Mutation::Insert(i, c)),
        2 => any::<usize>().prop_map(Mutation::Delete),
        1 => any::<usize>().prop_map(Mutation::Truncate),
    ]
}

/// Applies `m` to the characters of `token`; positions wrap around.
fn apply(token: &str, m: &Mutation) -> String {
    let mut chars: Vec<char> = token.chars().collect();
    let len = chars.len().max(1);
    match *m {
        Mutation::Replace(i, c) => chars[i % len] = c,
        Mutation::Insert(i, c) => chars.insert(i % (len + 1), c),
        Mutation::Delete(i) => {
            chars.remove(i % len);
        }
        Mutation::Truncate(i) => chars.truncate(i % len),
    }
    chars.into_iter().collect()
}

/// JSON values of a few levels, for claims and headers a signer would never make.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        (NOW - 100..NOW + 100).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        proptest::sample::select(vec![
            "https://origin.acme.example/tenants/x/",
            "http://127.0.0.1:8080/",
            "https://origin.acme.example/tenants",
            "",
            "HS256",
            "acme",
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(".{0,6}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A claims object over the names the rules read, with arbitrary values:
/// either from scratch, or a valid one with some claims overwritten (so that
/// the accepting path is reached often too).
fn claims_object() -> impl Strategy<Value = Value> {
    let key = proptest::sample::select(vec!["exp", "nbf", "iat", "deployment_id", "rpc_root", "sub"]);
    proptest::collection::btree_map(key, json_value(), 0..6).prop_flat_map(|m| {
        let scratch = Value::Object(m.iter().map(|(k, v)| (k.to_string(), v.clone())).collect());
        let mut patched = claims();
        for (k, v) in m {
            patched[k] = v;
        }
        proptest::sample::select(vec![scratch, patched])
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_strings_never_panic(token in any::<String>()) {
        let _ = one().verify(&token, NOW);
        let _ = two().verify(&token, NOW);
    }

    #[test]
    fn token_shaped_strings_never_panic(token in "[A-Za-z0-9_=+/-]{0,80}(\\.[A-Za-z0-9_=+/-]{0,80}){0,3}") {
        let _ = one().verify(&token, NOW);
    }

    #[test]
    fn arbitrary_bytes_as_parts_never_panic(
        header in proptest::collection::vec(any::<u8>(), 0..64),
        claims in proptest::collection::vec(any::<u8>(), 0..128),
        signature in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let token = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims),
            URL_SAFE_NO_PAD.encode(signature),
        );
        prop_assert!(one().verify(&token, NOW).is_err());
    }

    /// Signed with the right secret, so every claim rule is reached; when
    /// one passes, what it yields obeys the rules.
    #[test]
    fn signed_arbitrary_claims_never_panic_and_obey_the_rules(claims in claims_object(), now in NOW - 50..NOW + 50) {
        let token = acme_token(&claims);
        if let Ok(verified) = one().verify(&token, now) {
            prop_assert!(!verified.deployment_id().is_empty());
            prop_assert_eq!(Some(verified.deployment_id()), claims["deployment_id"].as_str());
            let exp = claims["exp"].as_u64().unwrap();
            prop_assert!(now < exp + CLOCK_LEEWAY_S);
            prop_assert!(verified.rpc_root().as_str().ends_with('/'));
            prop_assert!(
                claims.get("rpc_root").is_none_or(Value::is_null)
                    || verified.rpc_root().as_str().starts_with("https://origin.acme.example/tenants/")
                    || verified.rpc_root().as_str().starts_with("http://127.0.0.1:8080/")
            );
        }
    }

    #[test]
    fn signed_arbitrary_headers_never_panic(header in json_value(), claims in json_value()) {
        let token = raw_token(&header.to_string(), &claims.to_string(), ACME_SECRET);
        let _ = one().verify(&token, NOW);
        let _ = two().verify(&token, NOW);
    }

    /// The heart of it: change anything in a valid token and it is refused.
    #[test]
    fn every_mutation_of_a_valid_token_is_refused(m in mutation()) {
        let token = valid();
        let mutated = apply(&token, &m);
        prop_assume!(mutated != token);
        prop_assert!(one().verify(&mutated, NOW).is_err(), "accepted {:?} from {:?}", mutated, m);
    }

    /// Mutations aimed at the claims or the signature part specifically,
    /// several at once.
    #[test]
    fn mutations_of_claims_or_signature_are_refused(
        part in 1usize..3,
        edits in proptest::collection::vec((any::<usize>(), mutation_char()), 1..4),
    ) {
        let token = valid();
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        for (i, c) in &edits {
            parts[part] = apply(&parts[part], &Mutation::Replace(*i, *c));
        }
        let mutated = parts.join(".");
        prop_assume!(mutated != token);
        prop_assert!(one().verify(&mutated, NOW).is_err());
    }

    /// Re-encoded claims under the original signature: always a bad signature.
    #[test]
    fn forged_claims_under_a_real_signature_are_a_bad_signature(
        deployment_id in ".{1,24}",
        exp in NOW..NOW + 1000,
    ) {
        let token = valid();
        let (head, signature) = token.rsplit_once('.').unwrap();
        let (header, _) = head.split_once('.').unwrap();
        let forged_claims = json!({ "deployment_id": deployment_id, "iat": NOW, "exp": exp });
        prop_assume!(forged_claims != claims());
        let forged = format!(
            "{header}.{}.{signature}",
            URL_SAFE_NO_PAD.encode(forged_claims.to_string())
        );
        prop_assert_eq!(one().verify(&forged, NOW).unwrap_err(), TokenError::BadSignature);
    }
}
