//! The rules of `subhosting-protocol.md` §3, one test per refusal, plus the
//! examples of the seed document and a never-panics property.

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use proptest::prelude::*;

use super::*;

fn parse(json: &str) -> Result<IsolateConfig, ConfigError> {
    IsolateConfig::from_json(json.as_bytes())
}

#[test]
fn minimal_bundle_config() {
    let c = parse(r#"{"entrypoint":"file:///src/main.js","layers":[{"kind":"bundle","id":"a","specifier":"file:///src/main.js"}]}"#).unwrap();
    assert_eq!(c.entrypoint.as_str(), "file:///src/main.js");
    assert_eq!(c.net, NetPermission::All);
    assert!(c.envs.is_empty());
}

/// The refused field of `json`, which must be refused.
fn refused(json: &str) -> String {
    match parse(json) {
        Ok(c) => panic!("accepted {json}: {c:?}"),
        Err(e) => {
            assert!(!e.message.is_empty(), "{e:?}");
            e.field
        }
    }
}

/// A valid config with `layers` and the rest of the top level spliced in.
fn config_with(layers: &str, rest: &str) -> String {
    let rest = if rest.is_empty() { String::new() } else { format!(",{rest}") };
    format!(r#"{{"entrypoint":"file:///src/main.js","layers":{layers}{rest}}}"#)
}

const ESZIP_LAYER: &str = r#"[{"kind":"eszip","id":"user:1"}]"#;

fn with_envs(envs: &str) -> String {
    config_with(ESZIP_LAYER, &format!(r#""envs":{envs}"#))
}

fn with_net(net: &str) -> String {
    config_with(ESZIP_LAYER, &format!(r#""permissions":{{"net":{net}}}"#))
}

// ---- the seed document's examples -----------------------------------------

#[test]
fn seed_example_individual_js_file() {
    let c = parse(
        r#"{
  "entrypoint": "file:///src/main.js",
  "layers": [
    {
      "kind": "bundle",
      "id": "5a40b5a2-5f66-4ab4-b516-899652f052ff",
      "specifier": "file:///src/main.js"
    }
  ]
}"#,
    )
    .unwrap();
    assert_eq!(
        c.layers,
        vec![LayerSpec::Bundle {
            id: "5a40b5a2-5f66-4ab4-b516-899652f052ff".into(),
            specifier: Url::parse("file:///src/main.js").unwrap(),
        }]
    );
    assert_eq!(c.inline_layer, None);
    assert_eq!(c.net, NetPermission::All);
}

#[test]
fn seed_example_eszip_file() {
    let c = parse(
        r#"{
  "entrypoint": "file:///src/main.js",
  "layers": [
    {
      "kind": "eszip",
      "id": "90ebcb76-71b2-4cc6-86aa-e4a3f597ae03"
    }
  ]
}"#,
    )
    .unwrap();
    assert_eq!(c.layers, vec![LayerSpec::Eszip { id: "90ebcb76-71b2-4cc6-86aa-e4a3f597ae03".into() }]);
}

#[test]
fn seed_example_inline_layer() {
    let c = parse(
        r#"{
  "entrypoint": "file:///src/main.js",
  "layers": [
    {
      "kind": "bundle",
      "id": "812a2873-7aa8-46a0-9b97-bbace05de91d",
      "specifier": "file:///src/main.js"
    }
  ],
  "inline_layer": "812a2873-7aa8-46a0-9b97-bbace05de91d"
}"#,
    )
    .unwrap();
    assert_eq!(c.inline_layer.as_deref(), Some("812a2873-7aa8-46a0-9b97-bbace05de91d"));
    assert_eq!(c.layers[0].id(), "812a2873-7aa8-46a0-9b97-bbace05de91d");
}

#[test]
fn seed_example_two_eszip_layers_keep_their_order() {
    let c = parse(
        r#"{
  "entrypoint": "file:///src/main.js",
  "layers": [
    {
      "kind": "eszip",
      "id": "platform:v1"
    },
    {
      "kind": "eszip",
      "id": "user:5a40b5a2-5f66-4ab4-b516-899652f052ff"
    }
  ]
}"#,
    )
    .unwrap();
    let ids: Vec<&str> = c.layers.iter().map(LayerSpec::id).collect();
    assert_eq!(ids, ["platform:v1", "user:5a40b5a2-5f66-4ab4-b516-899652f052ff"]);
}

#[test]
fn seed_example_environment_variables() {
    let c = parse(
        r#"{
  "entrypoint": "file:///src/main.js",
  "layers": [
    {
      "kind": "eszip",
      "id": "user:5a40b5a2-5f66-4ab4-b516-899652f052ff"
    }
  ],
  "envs": {
    "DATABASE_URL": "postgres://user:password@hostname/db"
  }
}"#,
    )
    .unwrap();
    assert_eq!(c.envs.len(), 1);
    assert_eq!(c.envs["DATABASE_URL"], "postgres://user:password@hostname/db");
}

#[test]
fn seed_example_denying_all_network_access() {
    let c = parse(
        r#"{
  "entrypoint": "file:///src/main.js",
  "layers": [
    {
      "kind": "eszip",
      "id": "user:5a40b5a2-5f66-4ab4-b516-899652f052ff"
    }
  ],
  "permissions": {
    "net": false
  }
}"#,
    )
    .unwrap();
    assert_eq!(c.net, NetPermission::None);
}

#[test]
fn mixed_layers_and_every_field() {
    let c = parse(
        r#"{"entrypoint":"https://example.com/main.ts",
            "layers":[{"kind":"bundle","id":"glue","specifier":"https://example.com/main.ts"},
                      {"kind":"eszip","id":"user"}],
            "inline_layer":"user",
            "envs":{"A":"1","lower_case":"", "WITH SPACE":"x"},
            "permissions":{"net":["api.example.com","db.example.com:5432"]}}"#,
    )
    .unwrap();
    assert_eq!(c.entrypoint.as_str(), "https://example.com/main.ts");
    assert_eq!(c.layers.len(), 2);
    assert_eq!(c.inline_layer.as_deref(), Some("user"));
    assert_eq!(c.envs.len(), 3);
    assert_eq!(c.net, NetPermission::Allow(vec!["api.example.com".into(), "db.example.com:5432".into()]));
}

#[test]
fn explicit_nulls_are_absent() {
    let c = parse(&config_with(ESZIP_LAYER, r#""inline_layer":null,"envs":null,"permissions":null"#)).unwrap();
    assert_eq!(c.inline_layer, None);
    assert!(c.envs.is_empty());
    assert_eq!(c.net, NetPermission::All);
}

// ---- the header forms -------------------------------------------------------

const SEED_INLINE: &str = r#"{"entrypoint":"file:///src/main.js","layers":[{"kind":"bundle","id":"812a2873-7aa8-46a0-9b97-bbace05de91d","specifier":"file:///src/main.js"}],"inline_layer":"812a2873-7aa8-46a0-9b97-bbace05de91d"}"#;

#[test]
fn header_plain_json() {
    let from_json = parse(SEED_INLINE).unwrap();
    assert_eq!(IsolateConfig::from_header(SEED_INLINE.as_bytes()).unwrap(), from_json);
    let spaced = format!(" \t{SEED_INLINE}\r\n");
    assert_eq!(IsolateConfig::from_header(spaced.as_bytes()).unwrap(), from_json);
}

#[test]
fn header_base64url_with_and_without_padding() {
    // Env values of 0..3 extra bytes shift the alignment, so every padding
    // length and both URL-safe characters ('-' from '~', '_' from '?') occur.
    let mut seen_pad = [false; 3];
    let mut seen_url_safe = (false, false);
    for extra in ["", "x", "xx"] {
        let json = with_envs(&format!(r#"{{"K":"{extra}~~~???~~~???>>>"}}"#));
        let expected = parse(&json).unwrap();
        let padded = URL_SAFE.encode(&json);
        let unpadded = URL_SAFE_NO_PAD.encode(&json);
        seen_pad[padded.len() - padded.trim_end_matches('=').len()] = true;
        seen_url_safe.0 |= unpadded.contains('-');
        seen_url_safe.1 |= unpadded.contains('_');
        assert_eq!(IsolateConfig::from_header(padded.as_bytes()).unwrap(), expected, "{padded}");
        assert_eq!(IsolateConfig::from_header(unpadded.as_bytes()).unwrap(), expected, "{unpadded}");
        let spaced = format!(" {unpadded} ");
        assert_eq!(IsolateConfig::from_header(spaced.as_bytes()).unwrap(), expected);
    }
    assert_eq!(seen_pad, [true; 3]);
    assert_eq!(seen_url_safe, (true, true));
}

#[test]
fn header_standard_base64_alphabet_is_refused() {
    let json = with_envs(r#"{"K":"~~~???"}"#);
    let standard = base64::engine::general_purpose::STANDARD.encode(&json);
    assert!(standard.contains('+') || standard.contains('/'));
    assert!(IsolateConfig::from_header(standard.as_bytes()).is_err());
}

#[test]
fn header_garbage_is_refused_with_the_empty_field() {
    for header in [
        &b""[..],
        b"   ",
        b"not base64!",
        b"{",
        b"{}",
        b"[]",
        b"\xff\xfe\x00",
        b"e30", // base64url of "{}"
        b"W10", // base64url of "[]"
        b"====",
    ] {
        let e = IsolateConfig::from_header(header).unwrap_err();
        assert!(!e.message.is_empty(), "{header:?}");
        if header.first() != Some(&b'{') && header != b"e30" {
            assert_eq!(e.field, "", "{header:?}: {e:?}");
        }
    }
}

#[test]
fn header_over_256_kib_is_refused() {
    let big = with_envs(&format!(r#"{{"K":"{}"}}"#, "x".repeat(256 * 1024)));
    let e = IsolateConfig::from_header(big.as_bytes()).unwrap_err();
    assert_eq!(e.field, "");
    let encoded = URL_SAFE_NO_PAD.encode(&big);
    assert_eq!(IsolateConfig::from_header(encoded.as_bytes()).unwrap_err().field, "");
}

// ---- refusals named by §3 ----------------------------------------------------

#[test]
fn empty_layers_are_refused() {
    assert_eq!(refused(&config_with("[]", "")), "layers");
}

#[test]
fn missing_required_fields_are_named() {
    assert_eq!(refused(r#"{"layers":[{"kind":"eszip","id":"a"}]}"#), "entrypoint");
    assert_eq!(refused(r#"{"entrypoint":"file:///src/main.js"}"#), "layers");
}

#[test]
fn unknown_layer_kind_is_refused() {
    assert_eq!(refused(&config_with(r#"[{"kind":"wasm","id":"a"}]"#, "")), "layers[0].kind");
    assert_eq!(refused(&config_with(r#"[{"kind":"Eszip","id":"a"}]"#, "")), "layers[0].kind");
    assert_eq!(refused(&config_with(r#"[{"kind":"eszip","id":"a"},{"kind":"","id":"b"}]"#, "")), "layers[1].kind");
}

#[test]
fn bundle_without_specifier_is_refused() {
    assert_eq!(refused(&config_with(r#"[{"kind":"bundle","id":"a"}]"#, "")), "layers[0].specifier");
    assert_eq!(refused(&config_with(r#"[{"kind":"bundle","id":"a","specifier":null}]"#, "")), "layers[0].specifier");
    assert_eq!(
        refused(&config_with(r#"[{"kind":"eszip","id":"a"},{"kind":"bundle","id":"b","specifier":"main.js"}]"#, "")),
        "layers[1].specifier"
    );
}

#[test]
fn eszip_with_specifier_is_refused() {
    assert_eq!(
        refused(&config_with(r#"[{"kind":"eszip","id":"a","specifier":"file:///src/main.js"}]"#, "")),
        "layers[0].specifier"
    );
}

#[test]
fn inline_layer_naming_no_layer_is_refused() {
    assert_eq!(refused(&config_with(ESZIP_LAYER, r#""inline_layer":"user:2""#)), "inline_layer");
    assert_eq!(refused(&config_with(ESZIP_LAYER, r#""inline_layer":"""#)), "inline_layer");
}

#[test]
fn bad_env_names_are_refused() {
    assert_eq!(refused(&with_envs(r#"{"":"x"}"#)), "envs.");
    assert_eq!(refused(&with_envs(r#"{"A=B":"x"}"#)), "envs.A=B");
    assert_eq!(refused(&with_envs(r#"{"=":"x"}"#)), "envs.=");
    assert_eq!(refused(&with_envs(r#"{"A\u0000B":"x"}"#)), "envs.A\0B");
    // The rule itself, as the apps folder uses it.
    assert!(validate_env_name("PATH").is_ok());
    assert!(validate_env_name("").is_err());
    assert!(validate_env_name("A=B").is_err());
    assert!(validate_env_name("A\0").is_err());
}

#[test]
fn env_names_that_change_deno_or_the_loader_are_refused_with_the_reason() {
    for name in ["LD_PRELOAD", "DENO_V8_FLAGS", "NODE_OPTIONS", "GCONV_PATH", "MALLOC_ARENA_MAX", "ld_audit"] {
        let err = parse(&with_envs(&format!(r#"{{"OK":"fine","{name}":"/src/x.wasm"}}"#))).unwrap_err();
        assert_eq!(err.field, format!("envs.{name}"));
        assert!(err.message.contains("may not be set by a tenant"), "{err}");
        let entry = crate::env_policy::denied_env(name).unwrap();
        assert!(err.message.contains(entry.reason), "{err}");
        assert!(err.to_string().contains(&format!("envs.{name}")), "{err}");
    }
    // The allowed exception and ordinary names pass.
    let c = parse(&with_envs(r#"{"NODE_ENV":"production","GREETING":"hi","HTTP_PROXY":"http://p:1"}"#)).unwrap();
    assert_eq!(c.envs.len(), 3);
}

#[test]
fn env_value_with_nul_is_refused() {
    assert_eq!(refused(&with_envs(r#"{"OK":"fine","BAD":"a\u0000b"}"#)), "envs.BAD");
}

#[test]
fn env_values_may_hold_anything_else() {
    let c = parse(&with_envs(r#"{"A":"=","B":"","C":"line\nbreak","D":"ünï"}"#)).unwrap();
    assert_eq!(c.envs["A"], "=");
    assert_eq!(c.envs["C"], "line\nbreak");
}

#[test]
fn entrypoint_not_a_url_is_refused() {
    for entrypoint in [
        "main.js",
        "./main.js",
        "/src/main.js",
        "",
        "file",
        "://x",
        "ftp://x/main.js",
        "javascript:alert(1)",
        "blob:x",
        "ext:core/mod.js",
    ] {
        let json = format!(r#"{{"entrypoint":"{entrypoint}","layers":{ESZIP_LAYER}}}"#);
        assert_eq!(refused(&json), "entrypoint", "{entrypoint:?}");
    }
}

#[test]
fn entrypoint_schemes_deno_loads_are_accepted() {
    for entrypoint in [
        "netlify:bootstrap-stage2",
        "file:///src/main.js",
        "https://example.com/mod.ts",
        "http://localhost:8000/mod.ts",
        "data:application/javascript,export%20default%201",
        "jsr:@std/http",
        "npm:hono@4",
        "node:http",
    ] {
        let json = format!(r#"{{"entrypoint":"{entrypoint}","layers":{ESZIP_LAYER}}}"#);
        assert!(parse(&json).is_ok(), "{entrypoint}");
    }
}

#[test]
fn duplicate_layer_ids_are_refused() {
    assert_eq!(refused(&config_with(r#"[{"kind":"eszip","id":"a"},{"kind":"eszip","id":"a"}]"#, "")), "layers[1].id");
    assert_eq!(
        refused(&config_with(
            r#"[{"kind":"eszip","id":"a"},{"kind":"eszip","id":"b"},{"kind":"bundle","id":"a","specifier":"file:///src/a.js"}]"#,
            ""
        )),
        "layers[2].id"
    );
}

#[test]
fn empty_layer_id_is_refused() {
    assert_eq!(refused(&config_with(r#"[{"kind":"eszip","id":""}]"#, "")), "layers[0].id");
}

#[test]
fn unknown_fields_are_refused_by_name() {
    assert_eq!(refused(&config_with(ESZIP_LAYER, r#""entry_point":"x""#)), "entry_point");
    assert_eq!(refused(&config_with(ESZIP_LAYER, r#""permissions":{"read":true}"#)), "read");
    let e = parse(&config_with(r#"[{"kind":"eszip","id":"a","path":"/x"}]"#, "")).unwrap_err();
    assert_eq!(e.field, "path", "{e:?}");
}

#[test]
fn wrong_types_are_refused() {
    for json in [
        r#"{"entrypoint":5,"layers":[{"kind":"eszip","id":"a"}]}"#.to_owned(),
        r#"{"entrypoint":"file:///src/main.js","layers":{"kind":"eszip","id":"a"}}"#.to_owned(),
        config_with(r#"[{"kind":"eszip","id":1}]"#, ""),
        config_with(r#"["eszip"]"#, ""),
        with_envs(r#"{"A":1}"#),
        with_envs(r#"["A"]"#),
        with_net(r#""api.example.com""#),
        with_net("1"),
        with_net(r#"[1]"#),
        config_with(ESZIP_LAYER, r#""permissions":true"#),
        config_with(ESZIP_LAYER, r#""inline_layer":1"#),
        "[]".to_owned(),
        "null".to_owned(),
        "{}".to_owned(),
        String::new(),
    ] {
        assert!(parse(&json).is_err(), "{json}");
    }
}

// ---- permissions.net ----------------------------------------------------------

#[test]
fn net_values_map_to_permissions() {
    assert_eq!(parse(&config_with(ESZIP_LAYER, "")).unwrap().net, NetPermission::All);
    assert_eq!(parse(&config_with(ESZIP_LAYER, r#""permissions":{}"#)).unwrap().net, NetPermission::All);
    assert_eq!(parse(&with_net("true")).unwrap().net, NetPermission::All);
    assert_eq!(parse(&with_net("null")).unwrap().net, NetPermission::All);
    assert_eq!(parse(&with_net("false")).unwrap().net, NetPermission::None);
    assert_eq!(parse(&with_net("[]")).unwrap().net, NetPermission::None);
    assert_eq!(
        parse(&with_net(
            r#"["api.example.com","db.example.com:5432","[::1]:443","[::1]","10.0.0.1:80","*.example.com"]"#
        ))
        .unwrap()
        .net,
        NetPermission::Allow(
            ["api.example.com", "db.example.com:5432", "[::1]:443", "[::1]", "10.0.0.1:80", "*.example.com"]
                .map(String::from)
                .to_vec()
        )
    );
}

#[test]
fn bad_net_entries_are_refused_by_index() {
    for (entry, index) in [
        ("a,b", 0),
        ("host:99999", 0),
        ("host:-1", 0),
        ("host:", 0),
        (":443", 0),
        ("", 0),
        ("--allow-all", 0),
        ("-x.example.com", 0),
        ("a b", 0),
        ("http://api.example.com", 0),
        ("api.example.com/path", 0),
        ("::1", 0),
        ("[::g]", 0),
        ("[::1]:99999", 0),
        ("ünïcode.example", 0),
        ("a\u{0}b", 0),
    ] {
        let list = serde_json::to_string(&[entry]).unwrap();
        assert_eq!(refused(&with_net(&list)), format!("permissions.net[{index}]"), "{entry:?}");
        // The index names the bad entry, not the first one.
        let list = serde_json::to_string(&["ok.example.com", entry]).unwrap();
        assert_eq!(refused(&with_net(&list)), "permissions.net[1]", "{entry:?}");
    }
}

#[test]
fn net_from_json_value() {
    use serde_json::json;
    assert_eq!(NetPermission::from_json_value(json!({})).unwrap(), NetPermission::All);
    assert_eq!(NetPermission::from_json_value(json!({"net": true})).unwrap(), NetPermission::All);
    assert_eq!(NetPermission::from_json_value(json!({"net": false})).unwrap(), NetPermission::None);
    assert_eq!(NetPermission::from_json_value(json!({"net": []})).unwrap(), NetPermission::None);
    assert_eq!(
        NetPermission::from_json_value(json!({"net": ["a.example.com:1"]})).unwrap(),
        NetPermission::Allow(vec!["a.example.com:1".into()])
    );
    assert_eq!(NetPermission::from_json_value(json!({"net": ["a,b"]})).unwrap_err().field, "permissions.net[0]");
    assert_eq!(NetPermission::from_json_value(json!({"env": true})).unwrap_err().field, "env");
    assert!(NetPermission::from_json_value(json!(true)).is_err());
    assert!(NetPermission::from_json_value(json!(null)).is_err());
    assert!(NetPermission::from_json_value(json!({"net": "a.example.com"})).is_err());
}

// ---- never panics ------------------------------------------------------------

/// Valid config text that the properties below mutate.
fn seeds() -> Vec<String> {
    vec![
        SEED_INLINE.to_owned(),
        with_envs(r#"{"DATABASE_URL":"postgres://user:password@hostname/db"}"#),
        with_net(r#"["api.example.com","db.example.com:5432"]"#),
        config_with(r#"[{"kind":"eszip","id":"platform:v1"},{"kind":"eszip","id":"user:1"}]"#, ""),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn from_header_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = IsolateConfig::from_header(&bytes);
    }

    #[test]
    fn from_header_never_panics_on_strings(text in any::<String>()) {
        let _ = IsolateConfig::from_header(text.as_bytes());
        let _ = IsolateConfig::from_header(URL_SAFE_NO_PAD.encode(&text).as_bytes());
        let _ = IsolateConfig::from_header(format!("{{{text}").as_bytes());
    }

    #[test]
    fn from_header_never_panics_on_json_shaped_text(text in r#"[{}\[\]":,a-z0-9 \\=.-]{0,200}"#) {
        let _ = IsolateConfig::from_header(text.as_bytes());
    }

    /// Mutated valid configs: accepted or refused, never a panic, and what is
    /// accepted still obeys the rules.
    #[test]
    fn mutated_configs_never_panic(
        seed in proptest::sample::select(seeds()),
        edits in proptest::collection::vec((any::<usize>(), any::<char>(), 0u8..3), 1..6),
        encode in any::<bool>(),
    ) {
        let mut chars: Vec<char> = seed.chars().collect();
        for (i, c, op) in edits {
            let len = chars.len().max(1);
            match op {
                0 if !chars.is_empty() => chars[i % len] = c,
                1 => chars.insert(i % (len + 1), c),
                _ if !chars.is_empty() => { chars.remove(i % len); }
                _ => {}
            }
        }
        let text: String = chars.into_iter().collect();
        let header = if encode { URL_SAFE_NO_PAD.encode(&text) } else { text };
        if let Ok(c) = IsolateConfig::from_header(header.as_bytes()) {
            prop_assert!(!c.layers.is_empty());
            let ids: HashSet<&str> = c.layers.iter().map(LayerSpec::id).collect();
            prop_assert_eq!(ids.len(), c.layers.len());
            prop_assert!(c.inline_layer.as_deref().is_none_or(|id| ids.contains(id)));
            prop_assert!(c.envs.keys().all(|k| validate_env_name(k).is_ok()));
            prop_assert!(c.envs.keys().all(|k| crate::env_policy::check_env_name(k).is_ok()));
        }
    }
}
