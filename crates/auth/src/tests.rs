//! One test per rule of `subhosting-protocol.md` §1: a valid token passes, and
//! each bad case fails with its own error.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use url::Url;

use super::*;

mod fuzz;

const NOW: u64 = 1_700_000_000;
const ACME_SECRET: &str = "acme-shared-secret-0123456789abcdef";
const GLOBEX_SECRET: &str = "globex-shared-secret-fedcba9876543210";

fn acme() -> Subhoster {
    Subhoster {
        kid: "acme".into(),
        secret: Secret::from(ACME_SECRET),
        rpc_root: Url::parse("https://origin.acme.example/rpc/").unwrap(),
        allowed_rpc_root_prefixes: vec!["https://origin.acme.example/tenants/".into(), "http://127.0.0.1:8080/".into()],
    }
}

fn globex() -> Subhoster {
    Subhoster {
        kid: "globex".into(),
        secret: Secret::from(GLOBEX_SECRET),
        rpc_root: Url::parse("https://globex.example/").unwrap(),
        allowed_rpc_root_prefixes: vec![],
    }
}

/// Only acme: a token without `kid` falls back to it.
fn one() -> SubhostVerifier {
    SubhostVerifier::new(vec![acme()]).unwrap()
}

fn two() -> SubhostVerifier {
    SubhostVerifier::new(vec![acme(), globex()]).unwrap()
}

fn claims() -> Value {
    json!({ "deployment_id": "dep-1", "iat": NOW, "exp": NOW + 60 })
}

/// `claims()` with `key` set to `value` (`Value::Null` stays in the JSON, to
/// test that null counts as absent; `without` removes the key).
fn with(key: &str, value: Value) -> Value {
    let mut c = claims();
    c[key] = value;
    c
}

fn without(key: &str) -> Value {
    let mut c = claims();
    c.as_object_mut().unwrap().remove(key);
    c
}

fn acme_token(claims: &Value) -> String {
    sign_subhost_token(Some("acme"), &Secret::from(ACME_SECRET), claims)
}

/// A token from raw header and claims text, HS256-signed with `secret`
/// whatever the header says: for alg confusion and garbage that the signer
/// would not produce.
fn raw_token(header: &str, claims: &str, secret: &str) -> String {
    let message = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
    let key = EncodingKey::from_secret(secret.as_bytes());
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
    format!("{message}.{signature}")
}

fn acme_raw(claims: &str) -> String {
    raw_token(r#"{"alg":"HS256","typ":"JWT","kid":"acme"}"#, claims, ACME_SECRET)
}

fn err(verifier: &SubhostVerifier, token: &str) -> TokenError {
    verifier.verify(token, NOW).unwrap_err()
}

// ---- the valid case --------------------------------------------------------

#[test]
fn valid_token_yields_its_claims() {
    let verified = one().verify(&acme_token(&claims()), NOW).unwrap();
    assert_eq!(verified.kid(), "acme");
    assert_eq!(verified.deployment_id(), "dep-1");
    assert_eq!(verified.rpc_root().as_str(), "https://origin.acme.example/rpc/");
}

#[test]
fn unknown_claims_and_header_fields_are_ignored() {
    let token = raw_token(
        r#"{"alg":"HS256","typ":"JWT","kid":"acme","cty":"x"}"#,
        &format!(r#"{{"deployment_id":"d","exp":{},"sub":"u","jti":"j","aud":["a"]}}"#, NOW + 5),
        ACME_SECRET,
    );
    assert_eq!(one().verify(&token, NOW).unwrap().deployment_id(), "d");
}

#[test]
fn iat_and_nbf_are_optional() {
    let token = acme_token(&json!({ "deployment_id": "d", "exp": NOW + 1 }));
    assert!(one().verify(&token, NOW).is_ok());
}

// ---- alg -------------------------------------------------------------------

#[test]
fn alg_none_is_refused() {
    let claims = claims().to_string();
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT","kid":"acme"}"#),
        URL_SAFE_NO_PAD.encode(&claims)
    );
    assert_eq!(err(&one(), &unsigned), TokenError::UnsupportedAlgorithm("none".into()));
    let signed = raw_token(r#"{"alg":"none","kid":"acme"}"#, &claims, ACME_SECRET);
    assert_eq!(err(&one(), &signed), TokenError::UnsupportedAlgorithm("none".into()));
}

#[test]
fn hs384_is_refused_even_when_correctly_signed() {
    let mut header = jsonwebtoken::Header::new(Algorithm::HS384);
    header.kid = Some("acme".into());
    let token = jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(ACME_SECRET.as_bytes())).unwrap();
    assert_eq!(err(&one(), &token), TokenError::UnsupportedAlgorithm("HS384".into()));
}

#[test]
fn rs256_header_over_an_hmac_signature_is_refused() {
    // The classic confusion: an HMAC made with a key the attacker thinks we
    // would also use for RS256.
    let token = raw_token(r#"{"alg":"RS256","kid":"acme"}"#, &claims().to_string(), ACME_SECRET);
    assert_eq!(err(&one(), &token), TokenError::UnsupportedAlgorithm("RS256".into()));
}

#[test]
fn alg_is_case_sensitive() {
    let token = raw_token(r#"{"alg":"hs256","kid":"acme"}"#, &claims().to_string(), ACME_SECRET);
    assert_eq!(err(&one(), &token), TokenError::UnsupportedAlgorithm("hs256".into()));
}

#[test]
fn missing_or_non_string_alg_is_malformed() {
    for header in [r#"{"kid":"acme"}"#, r#"{"alg":null}"#, r#"{"alg":256}"#, r#"{"alg":["HS256"]}"#] {
        let token = raw_token(header, &claims().to_string(), ACME_SECRET);
        assert!(matches!(err(&one(), &token), TokenError::Malformed(_)), "{header}");
    }
}

#[test]
fn crit_header_is_refused() {
    let token =
        raw_token(r#"{"alg":"HS256","kid":"acme","crit":["b64"],"b64":false}"#, &claims().to_string(), ACME_SECRET);
    assert!(matches!(err(&one(), &token), TokenError::Malformed(_)));
}

// ---- signature -------------------------------------------------------------

#[test]
fn wrong_secret_is_a_bad_signature() {
    let token = sign_subhost_token(Some("acme"), &Secret::from("not the secret"), &claims());
    assert_eq!(err(&one(), &token), TokenError::BadSignature);
}

#[test]
fn claims_swapped_under_a_valid_signature_are_a_bad_signature() {
    let good = acme_token(&claims());
    let other = acme_token(&with("deployment_id", json!("dep-2")));
    let (good_head, good_sig) = good.rsplit_once('.').unwrap();
    let (other_head, _) = other.rsplit_once('.').unwrap();
    assert_ne!(good_head, other_head);
    assert_eq!(err(&one(), &format!("{other_head}.{good_sig}")), TokenError::BadSignature);
}

#[test]
fn truncated_or_empty_signature_is_refused() {
    let token = acme_token(&claims());
    let (head, sig) = token.rsplit_once('.').unwrap();
    // 32 bytes are 43 base64url characters; 42 leave a non-canonical tail.
    assert_eq!(sig.len(), 43);
    assert_eq!(err(&one(), &format!("{head}.")), TokenError::BadSignature);
    assert_eq!(err(&one(), &format!("{head}.{}", &sig[..40])), TokenError::BadSignature);
    assert!(one().verify(&format!("{head}.{}", &sig[..42]), NOW).is_err());
}

#[test]
fn padded_signature_is_refused() {
    let token = acme_token(&claims());
    assert!(matches!(err(&one(), &format!("{token}=")), TokenError::Malformed(_)));
}

#[test]
fn non_canonical_signature_tail_is_refused() {
    // The last character of a 43-character signature carries 2 unused bits;
    // a decoder that ignored them would accept a second spelling.
    let token = acme_token(&claims());
    let (head, sig) = token.rsplit_once('.').unwrap();
    let last = sig.chars().last().unwrap();
    const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let index = ALPHABET.find(last).unwrap();
    for twin in (index & !3)..(index | 3) + 1 {
        if twin == index {
            continue;
        }
        let forged = format!("{head}.{}{}", &sig[..42], &ALPHABET[twin..twin + 1]);
        assert!(one().verify(&forged, NOW).is_err(), "{forged}");
    }
}

#[test]
fn standard_base64_alphabet_is_refused() {
    let token = acme_token(&json!({ "deployment_id": "???>>>", "exp": NOW + 60 }));
    let standard = token.replace('-', "+").replace('_', "/");
    if standard != token {
        assert!(one().verify(&standard, NOW).is_err());
    }
}

// ---- kid -------------------------------------------------------------------

#[test]
fn unknown_kid_is_refused() {
    let token = sign_subhost_token(Some("initech"), &Secret::from(ACME_SECRET), &claims());
    assert_eq!(err(&one(), &token), TokenError::UnknownKid("initech".into()));
    let token = sign_subhost_token(Some(""), &Secret::from(ACME_SECRET), &claims());
    assert_eq!(err(&one(), &token), TokenError::UnknownKid(String::new()));
}

#[test]
fn long_unknown_kid_is_clipped_in_the_error() {
    let kid = "k".repeat(4000);
    let token = sign_subhost_token(Some(&kid), &Secret::from(ACME_SECRET), &claims());
    let TokenError::UnknownKid(shown) = err(&one(), &token) else { panic!("expected UnknownKid") };
    assert_eq!(shown.len(), 128);
}

#[test]
fn non_string_kid_is_malformed() {
    let token = raw_token(r#"{"alg":"HS256","kid":7}"#, &claims().to_string(), ACME_SECRET);
    assert!(matches!(err(&one(), &token), TokenError::Malformed(_)));
}

#[test]
fn kid_picks_the_secret_among_several() {
    let verifier = two();
    let acme = acme_token(&claims());
    let globex = sign_subhost_token(Some("globex"), &Secret::from(GLOBEX_SECRET), &claims());
    assert_eq!(verifier.verify(&acme, NOW).unwrap().kid(), "acme");
    let g = verifier.verify(&globex, NOW).unwrap();
    assert_eq!(g.kid(), "globex");
    assert_eq!(g.rpc_root().as_str(), "https://globex.example/");
    // globex's kid with acme's secret: the kid chose globex's secret.
    let crossed = sign_subhost_token(Some("globex"), &Secret::from(ACME_SECRET), &claims());
    assert_eq!(err(&verifier, &crossed), TokenError::BadSignature);
}

#[test]
fn missing_kid_falls_back_to_the_only_subhoster() {
    let token = sign_subhost_token(None, &Secret::from(ACME_SECRET), &claims());
    assert_eq!(one().verify(&token, NOW).unwrap().kid(), "acme");
    let wrong = sign_subhost_token(None, &Secret::from(GLOBEX_SECRET), &claims());
    assert_eq!(err(&one(), &wrong), TokenError::BadSignature);
}

#[test]
fn missing_kid_with_several_subhosters_is_refused() {
    let token = sign_subhost_token(None, &Secret::from(ACME_SECRET), &claims());
    assert_eq!(err(&two(), &token), TokenError::MissingKid);
    let null_kid = raw_token(r#"{"alg":"HS256","kid":null}"#, &claims().to_string(), ACME_SECRET);
    assert_eq!(err(&two(), &null_kid), TokenError::MissingKid);
}

#[test]
fn no_subhosters_accepts_nothing() {
    let verifier = SubhostVerifier::new(vec![]).unwrap();
    let token = sign_subhost_token(None, &Secret::from(ACME_SECRET), &claims());
    assert_eq!(err(&verifier, &token), TokenError::MissingKid);
    assert_eq!(err(&verifier, &acme_token(&claims())), TokenError::UnknownKid("acme".into()));
}

#[test]
fn subhoster_lookup() {
    let verifier = two();
    assert_eq!(verifier.subhoster("globex").unwrap().kid, "globex");
    assert!(verifier.subhoster("initech").is_none());
}

// ---- exp, nbf, iat ---------------------------------------------------------

#[test]
fn missing_exp_is_refused() {
    assert_eq!(err(&one(), &acme_token(&without("exp"))), TokenError::MissingExp);
    assert_eq!(err(&one(), &acme_token(&with("exp", Value::Null))), TokenError::MissingExp);
}

#[test]
fn past_exp_is_refused_beyond_the_leeway_only() {
    let at = |exp: u64| one().verify(&acme_token(&with("exp", json!(exp))), NOW);
    assert_eq!(at(NOW - 3600).unwrap_err(), TokenError::Expired);
    assert_eq!(at(NOW - CLOCK_LEEWAY_S).unwrap_err(), TokenError::Expired);
    assert!(at(NOW - CLOCK_LEEWAY_S + 1).is_ok());
    assert!(at(NOW).is_ok());
    assert!(at(0).is_err());
}

#[test]
fn future_nbf_is_refused_beyond_the_leeway_only() {
    let at = |nbf: u64| one().verify(&acme_token(&with("nbf", json!(nbf))), NOW);
    assert_eq!(at(NOW + CLOCK_LEEWAY_S + 1).unwrap_err(), TokenError::NotYetValid);
    assert_eq!(at(NOW + 3600).unwrap_err(), TokenError::NotYetValid);
    assert!(at(NOW + CLOCK_LEEWAY_S).is_ok());
    assert!(at(NOW - 100).is_ok());
}

#[test]
fn future_iat_is_refused_beyond_the_leeway_only() {
    let at = |iat: u64| one().verify(&acme_token(&with("iat", json!(iat))), NOW);
    assert_eq!(at(NOW + CLOCK_LEEWAY_S + 1).unwrap_err(), TokenError::NotYetValid);
    assert!(at(NOW + CLOCK_LEEWAY_S).is_ok());
    assert!(at(NOW - 100).is_ok());
}

#[test]
fn extreme_times_do_not_overflow() {
    let forever = acme_token(&with("exp", json!(u64::MAX)));
    assert!(one().verify(&forever, NOW).is_ok());
    // At the end of time everything has expired, without an overflow panic.
    assert_eq!(one().verify(&forever, u64::MAX).unwrap_err(), TokenError::Expired);
    let far = acme_token(&json!({ "deployment_id": "d", "exp": u64::MAX, "iat": u64::MAX, "nbf": u64::MAX }));
    assert!(one().verify(&far, u64::MAX - CLOCK_LEEWAY_S).is_ok());
    assert_eq!(one().verify(&far, u64::MAX - CLOCK_LEEWAY_S - 1).unwrap_err(), TokenError::NotYetValid);
    // A clock at 0 sees a token issued "in the future".
    assert_eq!(one().verify(&acme_token(&claims()), 0).unwrap_err(), TokenError::NotYetValid);
}

#[test]
fn times_of_the_wrong_type_are_refused() {
    for claim in ["exp", "nbf", "iat"] {
        for bad in [
            json!((NOW + 60).to_string()),
            json!(-1),
            json!(-(NOW as i64)),
            json!((NOW + 60) as f64 + 0.5),
            json!(1.7e9),
            json!(true),
            json!([NOW + 60]),
            json!({ "at": NOW + 60 }),
        ] {
            let token = acme_token(&with(claim, bad.clone()));
            let expected = TokenError::InvalidClaim {
                claim,
                reason: "must be a non-negative whole number of seconds since the Unix epoch",
            };
            assert_eq!(err(&one(), &token), expected, "{claim} = {bad}");
        }
    }
}

#[test]
fn numbers_beyond_u64_are_refused() {
    let token = acme_raw(r#"{"deployment_id":"d","exp":18446744073709551616}"#);
    assert!(matches!(err(&one(), &token), TokenError::InvalidClaim { claim: "exp", .. }));
    let token = acme_raw(r#"{"deployment_id":"d","exp":1e400}"#);
    assert!(one().verify(&token, NOW).is_err());
}

// ---- deployment_id ---------------------------------------------------------

#[test]
fn missing_or_empty_deployment_id_is_refused() {
    for c in [without("deployment_id"), with("deployment_id", json!("")), with("deployment_id", Value::Null)] {
        assert_eq!(err(&one(), &acme_token(&c)), TokenError::MissingDeploymentId, "{c}");
    }
}

#[test]
fn non_string_deployment_id_is_refused() {
    for bad in [json!(42), json!(["dep-1"]), json!({ "id": "dep-1" }), json!(true)] {
        assert_eq!(
            err(&one(), &acme_token(&with("deployment_id", bad.clone()))),
            TokenError::InvalidClaim { claim: "deployment_id", reason: "must be a string" },
            "{bad}"
        );
    }
}

#[test]
fn repeated_claim_is_malformed() {
    // Two parsers could disagree on which one wins; refuse the question.
    let token = acme_raw(&format!(r#"{{"deployment_id":"a","deployment_id":"b","exp":{}}}"#, NOW + 60));
    assert!(matches!(err(&one(), &token), TokenError::Malformed(_)));
}

// ---- rpc_root --------------------------------------------------------------

fn rpc_root_claim(value: Value) -> Result<VerifiedClaims, TokenError> {
    one().verify(&acme_token(&with("rpc_root", value)), NOW)
}

#[test]
fn absent_rpc_root_is_the_subhosters_default() {
    let verified = one().verify(&acme_token(&claims()), NOW).unwrap();
    assert_eq!(verified.rpc_root(), &acme().rpc_root);
    let verified = one().verify(&acme_token(&with("rpc_root", Value::Null)), NOW).unwrap();
    assert_eq!(verified.rpc_root(), &acme().rpc_root);
}

#[test]
fn allowed_rpc_root_is_honoured() {
    let verified = rpc_root_claim(json!("https://origin.acme.example/tenants/t1/")).unwrap();
    assert_eq!(verified.rpc_root().as_str(), "https://origin.acme.example/tenants/t1/");
    let verified = rpc_root_claim(json!("http://127.0.0.1:8080/")).unwrap();
    assert_eq!(verified.rpc_root().as_str(), "http://127.0.0.1:8080/");
    // Normalisation before matching: case and the default port.
    let verified = rpc_root_claim(json!("HTTPS://Origin.ACME.example:443/tenants/t2/")).unwrap();
    assert_eq!(verified.rpc_root().as_str(), "https://origin.acme.example/tenants/t2/");
}

#[test]
fn rpc_root_outside_the_prefixes_is_refused() {
    for claim in [
        "https://evil.example/",
        "https://origin.acme.example/rpc/other/",
        "https://origin.acme.example.evil.example/tenants/",
        "http://origin.acme.example/tenants/t1/",
        "https://origin.acme.example/tenants/../admin/",
        "https://origin.acme.example/tenants/%2e%2e/admin/",
        "http://127.0.0.1:8081/",
        "http://127.0.0.1:80/",
    ] {
        assert!(matches!(rpc_root_claim(json!(claim)), Err(TokenError::RpcRootNotAllowed(_))), "{claim}");
    }
}

#[test]
fn rpc_root_not_allowed_names_the_normalised_url() {
    assert_eq!(
        rpc_root_claim(json!("https://Evil.example/x/../")).unwrap_err(),
        TokenError::RpcRootNotAllowed("https://evil.example/".into())
    );
}

#[test]
fn invalid_rpc_root_is_refused() {
    for claim in [
        json!("https://origin.acme.example/tenants/t1"),
        json!("/tenants/t1/"),
        json!(""),
        json!("ftp://origin.acme.example/tenants/"),
        json!("file:///tenants/"),
        json!("https://origin.acme.example/tenants/t1/?x=/"),
        json!("https://origin.acme.example/tenants/t1/#/"),
        json!("https://user:pw@origin.acme.example/tenants/t1/"),
        json!(42),
        json!(["https://origin.acme.example/tenants/t1/"]),
    ] {
        assert!(matches!(rpc_root_claim(claim.clone()), Err(TokenError::InvalidRpcRoot(_))), "{claim}");
    }
}

fn globex_token(claims: &Value) -> String {
    sign_subhost_token(Some("globex"), &Secret::from(GLOBEX_SECRET), claims)
}

#[test]
fn a_subhoster_without_prefixes_may_name_only_its_own_default() {
    // Naming the default is what an absent claim means anyway.
    let verified = two().verify(&globex_token(&with("rpc_root", json!("https://globex.example/"))), NOW).unwrap();
    assert_eq!(verified.rpc_root().as_str(), "https://globex.example/");
    // The default is not a prefix: nothing under it, nothing else.
    for claim in ["https://globex.example/other/", "https://globex.example:8443/", "https://evil.example/"] {
        let token = globex_token(&with("rpc_root", json!(claim)));
        assert!(matches!(err(&two(), &token), TokenError::RpcRootNotAllowed(_)), "{claim}");
    }
}

/// Prefixes are per subhoster (`subhosting-protocol.md` §1): one subhoster's
/// token can never aim the runner's RPCs, signed as that subhoster, at an
/// origin another subhoster was allowed.
#[test]
fn one_subhosters_prefixes_never_admit_anothers_claims() {
    for claim in
        ["https://origin.acme.example/tenants/t1/", "http://127.0.0.1:8080/", "https://origin.acme.example/rpc/"]
    {
        let token = globex_token(&with("rpc_root", json!(claim)));
        assert!(matches!(err(&two(), &token), TokenError::RpcRootNotAllowed(_)), "globex → acme's {claim}");
        // The probe: acme's own token may name it.
        assert!(two().verify(&acme_token(&with("rpc_root", json!(claim))), NOW).is_ok(), "acme → {claim}");
    }
    let token = acme_token(&with("rpc_root", json!("https://globex.example/")));
    assert!(matches!(err(&two(), &token), TokenError::RpcRootNotAllowed(_)), "acme → globex's default");
}

// ---- garbage ---------------------------------------------------------------

#[test]
fn garbage_is_malformed() {
    let valid = acme_token(&claims());
    let cases = [
        String::new(),
        ".".into(),
        "..".into(),
        "...".into(),
        "abc".into(),
        "a.b".into(),
        "a.b.c.d".into(),
        format!("{valid}.x"),
        format!(" {valid}"),
        format!("Bearer {valid}"),
        "!!!.!!!.!!!".into(),
        format!("{}.e30.sig", URL_SAFE_NO_PAD.encode("not json")),
        format!("{}.e30.sig", URL_SAFE_NO_PAD.encode(r#"["HS256"]"#)),
        format!("{}.e30.sig", URL_SAFE_NO_PAD.encode("\"HS256\"")),
        format!("{}.e30.sig", URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256""#)),
        format!("{}=.e30.sig", URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","kid":"acme"}"#)),
        "é.é.é".into(),
    ];
    for token in cases {
        assert!(matches!(err(&one(), &token), TokenError::Malformed(_)), "{token:?}");
    }
}

#[test]
fn signed_garbage_claims_are_malformed() {
    for claims in [
        "",
        "null",
        "42",
        "\"dep-1\"",
        r#"["dep-1", 1700000060, 1700000000, null, null]"#,
        "{",
        "{\"deployment_id\":\"d\",}",
        "not json at all",
        "\u{feff}{}",
    ] {
        assert!(matches!(err(&one(), &acme_raw(claims)), TokenError::Malformed(_)), "{claims:?}");
    }
}

#[test]
fn deeply_nested_claims_do_not_overflow_the_stack() {
    let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    // An ignored claim is skipped without recursion: deep is harmless there.
    let ignored = format!(r#"{{"deployment_id":"d","exp":{},"x":{}}}"#, NOW + 60, nest(2900));
    let token = acme_raw(&ignored);
    assert!(token.len() <= MAX_TOKEN_BYTES);
    assert!(one().verify(&token, NOW).is_ok());
    // A claim the rules read is parsed into a value; serde_json's recursion
    // limit turns the depth into an error, not a stack overflow.
    let read = format!(r#"{{"deployment_id":"d","exp":{},"rpc_root":{}}}"#, NOW + 60, nest(2900));
    assert!(matches!(err(&one(), &acme_raw(&read)), TokenError::Malformed(_)));
}

#[test]
fn tokens_over_8_kib_are_malformed_before_anything_else() {
    let big = acme_token(&with("padding", json!("x".repeat(MAX_TOKEN_BYTES))));
    assert!(big.len() > MAX_TOKEN_BYTES);
    assert_eq!(err(&one(), &big), TokenError::Malformed("the token is longer than 8 KiB"));
    // Just under the bound is fine.
    let mut pad = MAX_TOKEN_BYTES;
    let fits = loop {
        pad -= 16;
        let t = acme_token(&with("padding", json!("x".repeat(pad))));
        if t.len() <= MAX_TOKEN_BYTES {
            break t;
        }
    };
    assert!(one().verify(&fits, NOW).is_ok());
}

// ---- errors and Debug never carry the secret -------------------------------

#[test]
fn secrets_are_redacted_everywhere() {
    let secret = Secret::from(ACME_SECRET);
    assert_eq!(format!("{secret:?}"), "[redacted]");
    let shown = format!("{:?} {:?}", acme(), two());
    assert!(!shown.contains(ACME_SECRET) && !shown.contains(GLOBEX_SECRET), "{shown}");
    assert!(!shown.contains(&format!("{:?}", ACME_SECRET.as_bytes())));
}

#[test]
fn error_messages_do_not_mention_the_secret() {
    let errors = [
        TokenError::Malformed("x"),
        TokenError::UnsupportedAlgorithm("none".into()),
        TokenError::BadSignature,
        TokenError::UnknownKid("k".into()),
        TokenError::MissingKid,
        TokenError::Expired,
        TokenError::MissingExp,
        TokenError::NotYetValid,
        TokenError::MissingDeploymentId,
        TokenError::InvalidClaim { claim: "exp", reason: "r" },
        TokenError::RpcRootNotAllowed("https://x/".into()),
        TokenError::InvalidRpcRoot("r"),
    ];
    for e in errors {
        let text = e.to_string();
        assert!(!text.is_empty() && !text.contains(ACME_SECRET));
    }
    // The bad-signature path specifically must not echo the expected HMAC.
    let token = sign_subhost_token(Some("acme"), &Secret::from("other"), &claims());
    let expected_sig = acme_token(&claims()).rsplit_once('.').unwrap().1.to_owned();
    assert!(!err(&one(), &token).to_string().contains(&expected_sig));
}

// ---- configuration ---------------------------------------------------------

#[test]
fn duplicate_kids_are_refused() {
    assert_eq!(
        SubhostVerifier::new(vec![acme(), globex(), acme()]).unwrap_err(),
        AuthConfigError::DuplicateKid("acme".into())
    );
}

#[test]
fn empty_secret_and_kid_are_refused() {
    let mut s = acme();
    s.secret = Secret::new(Vec::new());
    assert_eq!(SubhostVerifier::new(vec![s]).unwrap_err(), AuthConfigError::EmptySecret { kid: "acme".into() });
    let mut s = acme();
    s.kid.clear();
    assert_eq!(SubhostVerifier::new(vec![s]).unwrap_err(), AuthConfigError::EmptyKid);
}

#[test]
fn bad_default_rpc_root_is_refused() {
    for root in [
        "https://origin.acme.example/rpc",
        "ftp://origin.acme.example/rpc/",
        "https://origin.acme.example/rpc/?a=/",
        "https://u:p@origin.acme.example/rpc/",
    ] {
        let mut s = acme();
        s.rpc_root = Url::parse(root).unwrap();
        assert!(matches!(SubhostVerifier::new(vec![s]), Err(AuthConfigError::InvalidRpcRoot { .. })), "{root}");
    }
    // Without a path, the URL crate's normal form already ends in '/'.
    let mut s = acme();
    s.rpc_root = Url::parse("https://origin.acme.example").unwrap();
    assert!(SubhostVerifier::new(vec![s]).is_ok());
}

#[test]
fn loose_rpc_root_prefixes_are_refused() {
    for prefix in [
        "https://origin.acme.example",
        "https://ORIGIN.acme.example/",
        "https://origin.acme.example:443/",
        "origin.acme.example/",
        "",
        "ftp://origin.acme.example/",
        "https://u@origin.acme.example/",
        "https://origin.acme.example/?",
    ] {
        let mut s = acme();
        s.allowed_rpc_root_prefixes = vec![prefix.into()];
        assert!(
            matches!(SubhostVerifier::new(vec![s]), Err(AuthConfigError::InvalidRpcRootPrefix { .. })),
            "{prefix:?}"
        );
    }
    let mut s = acme();
    s.allowed_rpc_root_prefixes = vec!["https://origin.acme.example/tenants/t-".into()];
    assert!(SubhostVerifier::new(vec![s]).is_ok());
}

#[test]
fn config_errors_do_not_mention_the_secret() {
    let mut s = acme();
    s.rpc_root = Url::parse("https://origin.acme.example/rpc").unwrap();
    let text = SubhostVerifier::new(vec![s]).unwrap_err().to_string();
    assert!(text.contains("acme") && !text.contains(ACME_SECRET), "{text}");
}

// ---- signing ---------------------------------------------------------------

#[test]
fn rpc_token_round_trips_through_an_independent_decoder() {
    #[derive(serde::Deserialize)]
    struct Claims {
        deployment_id: String,
        iat: u64,
        exp: u64,
    }
    // jsonwebtoken checks `exp` against the system clock, so sign at "now".
    let now = jsonwebtoken::get_current_timestamp();
    let secret = Secret::from(ACME_SECRET);
    let token = sign_rpc_token("acme", &secret, "dep-9", now, 30);

    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, Algorithm::HS256);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    assert_eq!(header.kid.as_deref(), Some("acme"));
    let header_json = URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap();
    assert_eq!(header_json, br#"{"alg":"HS256","typ":"JWT","kid":"acme"}"#);

    let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
    validation.leeway = 0;
    let decoded = jsonwebtoken::decode::<Claims>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(ACME_SECRET.as_bytes()),
        &validation,
    )
    .unwrap();
    assert_eq!(decoded.claims.deployment_id, "dep-9");
    assert_eq!(decoded.claims.iat, now);
    assert_eq!(decoded.claims.exp, now + 30);

    // And the wrong key fails the independent decoder too.
    assert!(
        jsonwebtoken::decode::<Claims>(&token, &jsonwebtoken::DecodingKey::from_secret(b"wrong"), &validation).is_err()
    );

    // Our own verifier takes it as well.
    let verified = one().verify(&token, now).unwrap();
    assert_eq!(verified.deployment_id(), "dep-9");
    assert_eq!(one().verify(&token, now + 30 + CLOCK_LEEWAY_S).unwrap_err(), TokenError::Expired);
}

#[test]
fn rpc_token_exp_saturates() {
    let token = sign_rpc_token("acme", &Secret::from(ACME_SECRET), "d", u64::MAX - 1, 60);
    assert!(one().verify(&token, u64::MAX - 1).is_ok());
}

#[test]
fn subhost_token_without_kid_has_no_kid_header() {
    let token = sign_subhost_token(None, &Secret::from(ACME_SECRET), &claims());
    let header_json = URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap();
    assert_eq!(header_json, br#"{"alg":"HS256","typ":"JWT"}"#);
}

// ---- isocloud's own tokens: relay tokens of an edge, audience tokens --------

#[test]
fn an_edges_relay_token_verifies_as_a_relay_token_and_names_its_audience() {
    let secret = Secret::from(ACME_SECRET);
    let verified = one().verify(&sign_relay_token("acme", &secret, "dep-1", NOW, 60), NOW).unwrap();
    assert_eq!((verified.kid(), verified.deployment_id()), ("acme", "dep-1"));
    assert_eq!(verified.audience(), Some(RUNNER_AUDIENCE));
    assert_eq!(one().verify(&acme_token(&claims()), NOW).unwrap().audience(), None, "the protocol's tokens have none");
    let expired = sign_relay_token("acme", &secret, "dep-1", NOW - 120, 60);
    assert_eq!(err(&one(), &expired), TokenError::Expired);
}

#[test]
fn an_audience_token_verifies_for_its_audience_only() {
    let secret = Secret::from(ACME_SECRET);
    let token = sign_audience_token("acme", &secret, ROUTING_AUDIENCE, NOW, 60);
    assert_eq!(one().verify_audience(&token, ROUTING_AUDIENCE, NOW).unwrap().kid(), "acme");
    let other = |token: &str, audience: &str| one().verify_audience(token, audience, NOW).unwrap_err();
    assert_eq!(
        other(&token, "isocloud-other"),
        TokenError::InvalidClaim { claim: "aud", reason: "is not this service's audience" }
    );
    // A deployment's token (no aud), a relay token (another aud): refused.
    assert_eq!(
        other(&acme_token(&claims()), ROUTING_AUDIENCE),
        TokenError::InvalidClaim { claim: "aud", reason: "is missing" }
    );
    let relay = sign_relay_token("acme", &secret, "dep-1", NOW, 60);
    assert!(matches!(other(&relay, ROUTING_AUDIENCE), TokenError::InvalidClaim { claim: "aud", .. }));
    // And the other way: an audience token names no deployment.
    assert_eq!(err(&one(), &token), TokenError::MissingDeploymentId);
    // Every other rule holds as for relay tokens.
    let wrong = sign_audience_token("acme", &Secret::from(GLOBEX_SECRET), ROUTING_AUDIENCE, NOW, 60);
    assert_eq!(other(&wrong, ROUTING_AUDIENCE), TokenError::BadSignature);
    let late = sign_audience_token("acme", &secret, ROUTING_AUDIENCE, NOW - 120, 60);
    assert_eq!(other(&late, ROUTING_AUDIENCE), TokenError::Expired);
    let unknown = sign_audience_token("initech", &secret, ROUTING_AUDIENCE, NOW, 60);
    assert_eq!(other(&unknown, ROUTING_AUDIENCE), TokenError::UnknownKid("initech".into()));
    let list = acme_raw(&format!(r#"{{"aud":["{ROUTING_AUDIENCE}"],"exp":{}}}"#, NOW + 5));
    assert!(matches!(other(&list, ROUTING_AUDIENCE), TokenError::InvalidClaim { claim: "aud", .. }));
}
