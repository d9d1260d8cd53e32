use std::collections::HashSet;

use super::*;

#[test]
fn every_entry_has_a_reason_and_appears_once() {
    let mut seen = HashSet::new();
    for entry in DENIED_ENV {
        assert!(entry.reason.trim().len() >= 20, "{} needs a real reason", entry.name);
        assert!(seen.insert(entry.name.to_ascii_uppercase()), "{} is listed twice", entry.name);
        assert!(
            entry.name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
            "{} is spelled as the readers spell it",
            entry.name
        );
        if entry.matches == EnvMatch::Prefix {
            // No entry is shadowed by an earlier, wider prefix (it would never be named).
            let wider = DENIED_ENV.iter().find(|other| {
                other.matches == EnvMatch::Prefix && other.name != entry.name && entry.name.starts_with(other.name)
            });
            assert!(wider.is_none(), "{} is covered by {:?}", entry.name, wider.map(|w| w.name));
        }
    }
    for allowed in ALLOWED_ENV {
        assert!(allowed.reason.trim().len() >= 20, "{} needs a real reason", allowed.name);
    }
}

#[test]
fn every_entry_is_refused_and_named_in_the_message() {
    for entry in DENIED_ENV {
        let examples: Vec<String> = match entry.matches {
            EnvMatch::Exact => vec![entry.name.to_owned()],
            EnvMatch::Prefix => {
                vec![entry.name.to_owned(), format!("{}X", entry.name), format!("{}SOMETHING_ELSE", entry.name)]
            }
        };
        for name in examples {
            let found = denied_env(&name).unwrap_or_else(|| panic!("{name} is not refused"));
            assert_eq!(found.name, entry.name, "{name}");
            let message = check_env_name(&name).unwrap_err();
            assert!(message.starts_with(&name), "{message}");
            assert!(message.contains(&entry.pattern()) && message.contains(entry.reason), "{message}");
            // Any case: a lower-case twin is refused too.
            assert!(denied_env(&name.to_ascii_lowercase()).is_some(), "{name} in lower case");
        }
    }
}

#[test]
fn the_attacks_of_the_hostile_run_are_refused() {
    for name in [
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_AUDIT",
        "ld_preload",
        "DENO_V8_FLAGS",
        "DENO_DIR",
        "DENO_TLS_CA_STORE",
        "DENO_CERT",
        "NODE_OPTIONS",
        "NODE_EXTRA_CA_CERTS",
        "NODE_TLS_REJECT_UNAUTHORIZED",
        "GCONV_PATH",
        "GLIBC_TUNABLES",
        "MALLOC_CHECK_",
        "MALLOC_ARENA_MAX",
        "OPENSSL_CONF",
        "SSL_CERT_FILE",
        "OTEL_DENO",
        "OTEL_DENO_CONSOLE",
        "RUST_MIN_STACK",
        "ICU_DATA",
        "TMPDIR",
    ] {
        assert!(check_env_name(name).is_err(), "{name}");
    }
}

#[test]
fn the_exceptions_and_ordinary_names_are_allowed() {
    for allowed in ALLOWED_ENV {
        assert!(
            DENIED_ENV.iter().any(|entry| entry.matches == EnvMatch::Prefix && allowed.name.starts_with(entry.name)),
            "{} is no exception: nothing would refuse it",
            allowed.name
        );
        assert_eq!(check_env_name(allowed.name), Ok(()), "{}", allowed.name);
    }
    for name in [
        "NODE_ENV",
        "GREETING",
        "DATABASE_URL",
        "API_KEY",
        "PATH",
        "HOME",
        "TZ",
        "LANG",
        "LC_ALL",
        "TMP",
        "TEMP",
        "NO_COLOR",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "OTEL_SERVICE_NAME",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "LDFLAGS",
        "NODEJS_HOME",
        "MY_DENO_DIR",
        "SSL_MODE",
        "_",
    ] {
        assert_eq!(check_env_name(name), Ok(()), "{name}");
    }
    // An exception is the name itself, not every spelling of it.
    assert!(check_env_name("node_env").is_err());
    assert!(check_env_name("NODE_ENVIRONMENT").is_err());
}
