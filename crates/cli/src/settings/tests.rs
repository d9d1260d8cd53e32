use clap::Parser as _;
use clap::error::{ContextKind, ContextValue};

use super::options::OPTIONS;
use super::*;

/// The settings of a command line; a value clap refuses (a toggle's, a
/// number's) is an error naming its option too, as clap's message does.
fn parse(args: &[&str]) -> Result<Settings, SettingsError> {
    let mut argv = vec!["isocloud"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).map_err(|e| {
        let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
            panic!("clap refused {args:?} without naming an option: {e}")
        };
        // "--landlock <MODE>"
        let flag = arg.trim_start_matches("--").split(' ').next().unwrap_or_default();
        let spec = OPTIONS.iter().find(|spec| spec.key.replace('_', "-") == flag).expect("a declared option");
        assert!(e.to_string().contains(&format!("--{flag}")), "clap's message names the flag: {e}");
        invalid(spec.key, e.to_string())
    })?;
    Settings::from_cli(cli.command)
}

/// `serve --data DIR <args>`'s control-plane settings.
fn control_plane(dir: &str, args: &[&str]) -> ControlPlaneSettings {
    let mut argv = vec!["serve", "--data", dir];
    argv.extend_from_slice(args);
    match parse(&argv).unwrap().mode {
        Mode::ControlPlane(control) => *control,
        _ => panic!("not the control plane"),
    }
}

fn field_of(args: &[&str]) -> &'static str {
    match parse(args) {
        Ok(_) => panic!("{args:?} was accepted"),
        Err(e) => e.field,
    }
}

#[test]
fn serve_defaults() {
    let apps = tempfile::tempdir().unwrap();
    let settings = parse(&["serve", "--apps", apps.path().to_str().unwrap(), "--state-dir", "/tmp/x"]).unwrap();
    assert_eq!(settings.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(settings.idle_timeout, Duration::from_secs(300));
    assert_eq!(settings.memory_limit_mb, 512);
    assert!(matches!(settings.mode, Mode::Apps(_)));
}

#[test]
fn serve_without_apps_runs_the_control_plane() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let cli = Cli::try_parse_from(["isocloud", "serve", "--data", dir, "--base-domain", "Apps.Example.COM."]).unwrap();
    let settings = Settings::from_cli(cli.command).unwrap();
    let Mode::ControlPlane(control) = settings.mode else { panic!("not the control plane") };
    assert_eq!(control.data_dir, data.path());
    assert_eq!(control.base_domain, "apps.example.com");
    assert_eq!(control.control_listen.to_string(), "127.0.0.1:8081");
    assert_eq!(control.database_url, None);
    assert!(settings.egress_proxy);
    assert_eq!(settings.max_hops, 10);
}

#[test]
fn bad_flags_name_their_field() {
    let apps = tempfile::tempdir().unwrap();
    let dir = apps.path().to_str().unwrap();
    assert_eq!(field_of(&["serve", "--apps", dir, "--listen", "nonsense"]), "listen");
    assert_eq!(field_of(&["serve", "--apps", dir, "--admin-listen", "1.2.3.4"]), "admin_listen");
    assert_eq!(field_of(&["serve", "--apps", dir, "--idle-timeout-s", "0"]), "idle_timeout_s");
    assert_eq!(field_of(&["serve", "--apps", dir, "--memory-limit-mb", "1"]), "memory_limit_mb");
    assert_eq!(field_of(&["serve", "--apps", dir, "--log-format", "xml"]), "log_format");
    assert_eq!(field_of(&["serve", "--apps", "/definitely/not/here"]), "apps");
    assert_eq!(field_of(&["serve", "--apps", dir, "--data", dir]), "apps");
    assert_eq!(field_of(&["serve", "--database-url", "mysql://x"]), "database_url");
    assert_eq!(field_of(&["serve", "--base-domain", "Not A Domain"]), "base_domain");
    assert_eq!(field_of(&["serve", "--control-listen", "nonsense"]), "control_listen");
    assert_eq!(field_of(&["serve", "--tls-listen", "nonsense"]), "tls_listen");
    assert_eq!(field_of(&["serve", "--log-retention-h", "0"]), "log_retention_h");
    assert_eq!(field_of(&["serve", "--max-blob-mb", "0"]), "max_blob_mb");
    assert_eq!(field_of(&["serve", "--max-hops", "0"]), "max_hops");
    assert_eq!(field_of(&["serve", "--egress-proxy", "maybe"]), "egress_proxy");
    assert_eq!(field_of(&["runner", "--subhost-secret", "a=b"]), "rpc_root");
    assert_eq!(field_of(&["runner", "--rpc-root", "http://o/v0", "--subhost-secret", "a=b"]), "rpc_root");
    assert_eq!(field_of(&["runner", "--rpc-root", "ftp://o/v0/", "--subhost-secret", "a=b"]), "rpc_root");
    assert_eq!(field_of(&["runner", "--rpc-root", "http://o/v0/"]), "subhost_secret");
    assert_eq!(field_of(&["runner", "--rpc-root", "http://o/v0/", "--subhost-secret", "nokid"]), "subhost_secret");
    assert_eq!(
        field_of(&["runner", "--rpc-root", "http://o/v0/", "--subhost-secret", "a=b", "--subhost-secret", "a=c"]),
        "subhost_secret"
    );
    assert_eq!(
        field_of(&["runner", "--rpc-root", "http://o/v0/", "--subhost-secret-file", "a=/no/such/file"]),
        "subhost_secret_file"
    );
    let runner = ["runner", "--rpc-root", "http://o/v0/", "--subhost-secret", "a=b", "--state-dir", "/tmp/x"];
    let with = |extra: &[&'static str]| [&runner[..], extra].concat();
    let settings = parse(&with(&["--rpc-root-fallback", "http://o2/v0/", "--rpc-root-fallback", "http://o3/v0/"]));
    let fallbacks: Vec<String> = settings.unwrap().rpc_root_fallbacks.iter().map(|u| u.to_string()).collect();
    assert_eq!(fallbacks, ["http://o2/v0/", "http://o3/v0/"]);
    assert_eq!(field_of(&with(&["--rpc-root-fallback", "http://o2/v0"])), "rpc_root_fallback");
    assert_eq!(
        field_of(&with(&["--rpc-root-fallback", "http://o2/v0/", "--rpc-root-fallback", "http://o2/v0/"])),
        "rpc_root_fallback"
    );
    let apps = tempfile::tempdir().unwrap();
    let apps = apps.path().to_str().unwrap();
    assert_eq!(field_of(&["serve", "--apps", apps, "--rpc-root-fallback", "http://o2/v0/"]), "rpc_root_fallback");
}

#[test]
fn config_file_is_read_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let config = dir.path().join("isocloud.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:9000\"\nidle_timeout_s = 7\nrpc_root = \"http://origin/v0/\"\n\
             subhost_secret_file = [\"acme={}\"]\nallow_rpc_root = [\"acme=http://origin/\"]\n",
            secret.display()
        ),
    )
    .unwrap();
    let path = config.to_str().unwrap();
    let settings = parse(&["runner", "--config", path, "--idle-timeout-s", "9", "--state-dir", "/tmp/x"]).unwrap();
    assert_eq!(settings.listen.to_string(), "127.0.0.1:9000");
    assert_eq!(settings.idle_timeout, Duration::from_secs(9));
    let Mode::Subhost(subhosters) = settings.mode else { panic!("runner mode") };
    assert_eq!(subhosters[0].kid, "acme");
    assert_eq!(subhosters[0].allowed_rpc_root_prefixes, vec!["http://origin/".to_owned()]);
}

#[test]
fn stream_bounds_default_and_are_validated() {
    let apps = tempfile::tempdir().unwrap();
    let dir = apps.path().to_str().unwrap();
    let settings = parse(&["serve", "--apps", dir, "--state-dir", "/tmp/x"]).unwrap();
    assert_eq!(settings.stream_idle_timeout, Duration::from_secs(60));
    assert_eq!(settings.stream_max_lifetime, Duration::from_secs(3600));
    let args = ["serve", "--apps", dir, "--stream-idle-timeout-s", "2", "--stream-max-lifetime-s", "5"];
    let settings = parse(&[&args[..], &["--state-dir", "/tmp/x"]].concat()).unwrap();
    assert_eq!(settings.stream_idle_timeout, Duration::from_secs(2));
    assert_eq!(settings.stream_max_lifetime, Duration::from_secs(5));
    assert_eq!(field_of(&["serve", "--apps", dir, "--stream-idle-timeout-s", "0"]), "stream_idle_timeout_s");
    assert_eq!(field_of(&["serve", "--apps", dir, "--stream-max-lifetime-s", "0"]), "stream_max_lifetime_s");
    assert_eq!(field_of(&["serve", "--apps", dir, "--stream-max-lifetime-s", "30"]), "stream_idle_timeout_s");

    let config = apps.path().join("isocloud.toml");
    std::fs::write(&config, "stream_idle_timeout_s = 3\nstream_max_lifetime_s = 4\n").unwrap();
    let settings =
        parse(&["serve", "--apps", dir, "--config", config.to_str().unwrap(), "--state-dir", "/tmp/x"]).unwrap();
    assert_eq!(settings.stream_idle_timeout, Duration::from_secs(3));
    assert_eq!(settings.stream_max_lifetime, Duration::from_secs(4));
}

#[test]
fn allowed_rpc_root_prefixes_are_per_subhoster() {
    let base = ["runner", "--rpc-root", "http://o/v0/", "--subhost-secret", "a=s1", "--subhost-secret", "b=s2"];
    let with = |extra: &[&'static str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        args.extend(["--state-dir", "/tmp/x"]);
        args
    };
    let settings =
        parse(&with(&["--allow-rpc-root", "a=http://a.test/", "--allow-rpc-root", "a=http://a2.test/t/"])).unwrap();
    let Mode::Subhost(subhosters) = settings.mode else { panic!("runner mode") };
    let prefixes = |kid: &str| subhosters.iter().find(|s| s.kid == kid).unwrap().allowed_rpc_root_prefixes.clone();
    assert_eq!(prefixes("a"), vec!["http://a.test/".to_owned(), "http://a2.test/t/".to_owned()]);
    assert_eq!(prefixes("b"), Vec::<String>::new(), "a's prefixes are not b's");

    for (bad, why) in [
        ("http://a.test/", "a bare prefix: the old shared form"),
        ("=http://a.test/", "no kid"),
        ("a=", "no prefix"),
        ("c=http://c.test/", "an unknown subhoster"),
        ("a=http://a.test", "not normalised: no '/' after the host"),
        ("a=ftp://a.test/", "not http(s)"),
    ] {
        let err = parse(&with(&["--allow-rpc-root", bad])).err().unwrap();
        assert_eq!(err.field, "allow_rpc_root", "{bad} ({why}): {err}");
    }
    let err = parse(&with(&["--allow-rpc-root", "http://a.test/"])).err().unwrap();
    assert!(err.message.contains("KID=PREFIX"), "the error names the new form: {err}");
}

#[test]
fn config_file_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("isocloud.toml");
    let apps = dir.path().to_str().unwrap();
    std::fs::write(&config, "listen = \"127.0.0.1:9000\"\nlisten_port = 3\n").unwrap();
    let err = parse(&["serve", "--apps", apps, "--config", config.to_str().unwrap()]).err().unwrap();
    assert_eq!(err.field, "config");
    assert!(err.message.contains("listen_port"), "{err}");
    std::fs::write(&config, "idle_timeout_s = \"soon\"\n").unwrap();
    let err = parse(&["serve", "--apps", apps, "--config", config.to_str().unwrap()]).err().unwrap();
    assert!(err.message.contains("idle_timeout_s") && err.message.contains("invalid type"), "{err}");
    std::fs::write(&config, "rpc_root = \"http://o/v0/\"\n").unwrap();
    assert_eq!(field_of(&["serve", "--apps", apps, "--config", config.to_str().unwrap()]), "subhost_secret");
}

#[test]
fn sandbox_layers_default_on_and_switch_only_by_name() {
    let apps = tempfile::tempdir().unwrap();
    let dir = apps.path().to_str().unwrap();
    let settings = parse(&["serve", "--apps", dir, "--state-dir", "/tmp/x"]).unwrap();
    assert_eq!(settings.landlock, Toggle::Auto);
    assert!(settings.seccomp && settings.rlimits);
    assert_eq!(settings.isolate_uid, IsolateUid::Auto);
    assert_eq!(settings.isolate_gid, 65534);

    let args = [
        "serve",
        "--apps",
        dir,
        "--state-dir",
        "/tmp/x",
        "--landlock",
        "on",
        "--seccomp",
        "off",
        "--rlimits",
        "off",
        "--isolate-uid",
        "1234",
        "--isolate-gid",
        "5678",
    ];
    let settings = parse(&args).unwrap();
    assert_eq!(settings.landlock, Toggle::On);
    assert!(!settings.seccomp && !settings.rlimits);
    assert_eq!(settings.isolate_uid, IsolateUid::Id(1234));
    assert_eq!(settings.isolate_gid, 5678);
    let settings = parse(&["serve", "--apps", dir, "--state-dir", "/tmp/x", "--isolate-uid", "off"]).unwrap();
    assert_eq!(settings.isolate_uid, IsolateUid::Off);

    assert_eq!(field_of(&["serve", "--apps", dir, "--landlock", "yes"]), "landlock");
    assert_eq!(field_of(&["serve", "--apps", dir, "--seccomp", "auto"]), "seccomp");
    assert_eq!(field_of(&["serve", "--apps", dir, "--rlimits", "1"]), "rlimits");
    assert_eq!(field_of(&["serve", "--apps", dir, "--isolate-uid", "0"]), "isolate_uid");
    assert_eq!(field_of(&["serve", "--apps", dir, "--isolate-uid", "nobody"]), "isolate_uid");
    assert_eq!(field_of(&["serve", "--apps", dir, "--isolate-gid", "0"]), "isolate_gid");
}

#[test]
fn sandbox_layers_come_from_the_config_file_too() {
    let dir = tempfile::tempdir().unwrap();
    let apps = tempfile::tempdir().unwrap();
    let config = dir.path().join("isocloud.toml");
    std::fs::write(&config, "landlock = \"off\"\nseccomp = \"off\"\nisolate_uid = 4321\nisolate_gid = 8765\n").unwrap();
    let args = ["serve", "--apps", apps.path().to_str().unwrap(), "--config", config.to_str().unwrap()];
    let settings = parse(&args).unwrap();
    assert_eq!(settings.landlock, Toggle::Off);
    assert!(!settings.seccomp && settings.rlimits);
    assert_eq!(settings.isolate_uid, IsolateUid::Id(4321));
    assert_eq!(settings.isolate_gid, 8765);
    std::fs::write(&config, "isolate_uid = \"off\"\n").unwrap();
    assert_eq!(parse(&args).unwrap().isolate_uid, IsolateUid::Off);
    std::fs::write(&config, "isolate_uid = 0\n").unwrap();
    assert_eq!(field_of(&args), "isolate_uid");
}

#[test]
fn otlp_export_is_off_by_default_and_its_endpoint_is_validated() {
    let dir = tempfile::tempdir().unwrap();
    let apps = dir.path().to_str().unwrap();
    let base = ["serve", "--apps", apps, "--state-dir", "/tmp/x"];
    assert!(parse(&base).unwrap().otlp.is_none(), "off unless an endpoint is named");
    let on = parse(&[&base[..], &["--otlp-endpoint", "http://collector:4318"]].concat()).unwrap().otlp.unwrap();
    assert_eq!(on.endpoint.as_str(), "http://collector:4318/");
    assert_eq!(on.service_name, "isocloud");
    for bad in ["collector:4318", "ftp://collector", "http://collector/?x=1", "http://user:pw@collector", "nonsense"] {
        assert_eq!(field_of(&[&base[..], &["--otlp-endpoint", bad]].concat()), "otlp_endpoint", "{bad}");
    }
    let named = [&base[..], &["--otlp-endpoint", "https://otel.example/", "--otlp-service-name", "edge-a"]].concat();
    assert_eq!(parse(&named).unwrap().otlp.unwrap().service_name, "edge-a");
    let blank = [&base[..], &["--otlp-endpoint", "http://c:4318", "--otlp-service-name", " "]].concat();
    assert_eq!(field_of(&blank), "otlp_service_name");

    let config = dir.path().join("isocloud.toml");
    std::fs::write(&config, "otlp_endpoint = \"http://from-file:4318\"\notlp_service_name = \"f\"\n").unwrap();
    let args = [&base[..], &["--config", config.to_str().unwrap()]].concat();
    let from_file = parse(&args).unwrap().otlp.unwrap();
    assert_eq!((from_file.endpoint.host_str(), from_file.service_name.as_str()), (Some("from-file"), "f"));
}

#[test]
fn spool_bound_from_flag_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let apps = dir.path().to_str().unwrap();
    let settings = parse(&["serve", "--apps", apps, "--state-dir", "/tmp/x"]).unwrap();
    assert_eq!(settings.spool_max_bytes, 64 * 1024 * 1024);
    let settings = parse(&["serve", "--apps", apps, "--state-dir", "/tmp/x", "--spool-max-mb", "3"]).unwrap();
    assert_eq!(settings.spool_max_bytes, 3 * 1024 * 1024);
    assert_eq!(field_of(&["serve", "--apps", apps, "--spool-max-mb", "0"]), "spool_max_mb");

    let config = dir.path().join("isocloud.toml");
    std::fs::write(&config, "spool_max_mb = 5\n").unwrap();
    let args = ["serve", "--apps", apps, "--state-dir", "/tmp/x", "--config", config.to_str().unwrap()];
    assert_eq!(parse(&args).unwrap().spool_max_bytes, 5 * 1024 * 1024);
}

#[test]
fn the_network_namespace_is_auto_unless_asked_and_on_needs_the_egress_proxy() {
    let apps = tempfile::tempdir().unwrap();
    let dir = apps.path().to_str().unwrap();
    let settings = parse(&["serve", "--apps", dir, "--state-dir", "/tmp/x"]).unwrap();
    assert_eq!(settings.network_namespace, Toggle::Auto);
    let settings = parse(&["serve", "--apps", dir, "--state-dir", "/tmp/x", "--network-namespace", "on"]).unwrap();
    assert!(settings.network_namespace == Toggle::On && settings.egress_proxy);
    let settings = parse(&["serve", "--apps", dir, "--state-dir", "/tmp/x", "--network-namespace", "off"]).unwrap();
    assert_eq!(settings.network_namespace, Toggle::Off);
    // Auto without the proxy is simply off (sandbox.rs decides).
    let settings = parse(&["serve", "--apps", dir, "--state-dir", "/tmp/x", "--egress-proxy", "off"]).unwrap();
    assert_eq!(settings.network_namespace, Toggle::Auto);

    let config = apps.path().join("isocloud.toml");
    std::fs::write(&config, "network_namespace = \"off\"\n").unwrap();
    let settings =
        parse(&["serve", "--apps", dir, "--state-dir", "/tmp/x", "--config", config.to_str().unwrap()]).unwrap();
    assert_eq!(settings.network_namespace, Toggle::Off);

    assert_eq!(field_of(&["serve", "--apps", dir, "--network-namespace", "yes"]), "network_namespace");
    let without_proxy = ["serve", "--apps", dir, "--network-namespace", "on", "--egress-proxy", "off"];
    match parse(&without_proxy) {
        Ok(_) => panic!("accepted without the egress proxy"),
        Err(e) => {
            assert_eq!(e.field, "network_namespace");
            assert!(e.message.contains("--egress-proxy on"), "{}", e.message);
        }
    }
}

#[test]
fn egress_allow_private_takes_cidrs_from_flags_or_file_and_names_a_bad_one() {
    let apps = tempfile::tempdir().unwrap();
    let dir = apps.path().to_str().unwrap();
    let base = ["serve", "--apps", dir, "--state-dir", "/tmp/x"];
    assert!(parse(&base).unwrap().egress_allow_private.is_empty(), "nothing internal by default");
    let mut args = base.to_vec();
    args.extend(["--egress-allow-private", "10.20.0.0/16", "--egress-allow-private", "fd00:1::/32"]);
    let ranges: Vec<String> = parse(&args).unwrap().egress_allow_private.iter().map(|c| c.to_string()).collect();
    assert_eq!(ranges, ["10.20.0.0/16", "fd00:1::/32"]);

    let config = apps.path().join("isocloud.toml");
    std::fs::write(&config, "egress_allow_private = [\"192.168.7.0/24\"]\n").unwrap();
    let mut args = base.to_vec();
    args.extend(["--config", config.to_str().unwrap()]);
    let ranges: Vec<String> = parse(&args).unwrap().egress_allow_private.iter().map(|c| c.to_string()).collect();
    assert_eq!(ranges, ["192.168.7.0/24"]);

    for bad in ["10.20.0.1/16", "intranet", "10.0.0.0/40"] {
        let mut args = base.to_vec();
        args.extend(["--egress-allow-private", bad]);
        match parse(&args) {
            Ok(_) => panic!("{bad} accepted"),
            Err(e) => {
                assert_eq!(e.field, "egress_allow_private");
                assert!(e.message.contains(bad), "names itself: {}", e.message);
            }
        }
    }
    let mut args = base.to_vec();
    args.extend(["--egress-allow-private", "10.0.0.0/8", "--egress-proxy", "off"]);
    assert_eq!(field_of(&args), "egress_allow_private");
}

#[test]
fn boot_admission_and_the_per_tenant_cap_default_by_mode_and_come_from_flags_or_file() {
    let apps = tempfile::tempdir().unwrap();
    let dir = apps.path().to_str().unwrap();
    // Apps mode: one operator's apps, one tenant, every slot.
    let settings = parse(&["serve", "--apps", dir, "--state-dir", "/tmp/x", "--max-isolates", "40"]).unwrap();
    assert_eq!(settings.max_isolates_per_tenant, 40);
    assert_eq!(settings.max_concurrent_boots, None, "from the machine, in main");
    assert_eq!(settings.max_boot_queue, None);
    // One subhoster: all of it; two: half each; the control plane's projects: a quarter.
    let one = ["runner", "--rpc-root", "http://o/v0/", "--subhost-secret", "a=b", "--state-dir", "/tmp/x"];
    assert_eq!(parse(&one).unwrap().max_isolates_per_tenant, 1000);
    let two = [&one[..], &["--subhost-secret", "c=d", "--max-isolates", "10"]].concat();
    assert_eq!(parse(&two).unwrap().max_isolates_per_tenant, 5);
    let data = tempfile::tempdir().unwrap();
    let control = ["serve", "--data", data.path().to_str().unwrap(), "--state-dir", "/tmp/x"];
    assert_eq!(parse(&control).unwrap().max_isolates_per_tenant, 250);
    assert_eq!(default_max_isolates_per_tenant(2, None), 1, "never 0");
    assert_eq!(default_max_isolates_per_tenant(1000, Some(9)), 250);

    let flags = ["--max-concurrent-boots", "3", "--max-boot-queue", "0", "--max-isolates-per-tenant", "7"];
    let settings = parse(&[&["serve", "--apps", dir, "--state-dir", "/tmp/x"][..], &flags].concat()).unwrap();
    assert_eq!(
        (settings.max_concurrent_boots, settings.max_boot_queue, settings.max_isolates_per_tenant),
        (Some(3), Some(0), 7)
    );
    let config = apps.path().join("isocloud.toml");
    std::fs::write(&config, "max_concurrent_boots = 5\nmax_boot_queue = 9\nmax_isolates_per_tenant = 2\n").unwrap();
    let settings =
        parse(&["serve", "--apps", dir, "--state-dir", "/tmp/x", "--config", config.to_str().unwrap()]).unwrap();
    assert_eq!(
        (settings.max_concurrent_boots, settings.max_boot_queue, settings.max_isolates_per_tenant),
        (Some(5), Some(9), 2)
    );
    assert_eq!(field_of(&["serve", "--apps", dir, "--max-concurrent-boots", "0"]), "max_concurrent_boots");
    assert_eq!(field_of(&["serve", "--apps", dir, "--max-isolates-per-tenant", "0"]), "max_isolates_per_tenant");
    assert_eq!(field_of(&["serve", "--apps", dir, "--max-boot-queue", "2000000"]), "max_boot_queue");
}

#[test]
fn a_uid_per_isolate_from_a_range_or_one_shared_uid_never_both() {
    use isocloud_sandbox::UidRange;
    let apps = tempfile::tempdir().unwrap();
    let dir = apps.path().to_str().unwrap();
    fn with<'a>(dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        [&["serve", "--apps", dir, "--state-dir", "/tmp/x"][..], extra].concat()
    }
    assert_eq!(
        parse(&with(dir, &[])).unwrap().isolate_uid,
        IsolateUid::Auto,
        "a root runner's default: the default range"
    );
    let settings = parse(&with(dir, &["--isolate-uid-range", "3000000-3000099"])).unwrap();
    assert_eq!(settings.isolate_uid, IsolateUid::Range(UidRange { first: 3_000_000, last: 3_000_099 }));
    for bad in ["0-100", "60000-70000", "9-3", "100", "1-4294967295"] {
        assert_eq!(field_of(&with(dir, &["--isolate-uid-range", bad])), "isolate_uid_range", "{bad}");
    }
    // One uid for all, or one each: the operator says which.
    assert_eq!(
        field_of(&with(dir, &["--isolate-uid", "65534", "--isolate-uid-range", "3000000-3000099"])),
        "isolate_uid_range"
    );
    assert_eq!(
        field_of(&with(dir, &["--isolate-uid", "off", "--isolate-uid-range", "3000000-3000099"])),
        "isolate_uid_range"
    );

    // The file the same; flags, when given, replace the file's choice whole.
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("isocloud.toml");
    let from_file = with(dir, &["--config", config.to_str().unwrap()]);
    std::fs::write(&config, "isolate_uid_range = \"3000000-3000009\"\n").unwrap();
    assert_eq!(
        parse(&from_file).unwrap().isolate_uid,
        IsolateUid::Range(UidRange { first: 3_000_000, last: 3_000_009 })
    );
    let flag_wins = [&from_file[..], &["--isolate-uid", "4321"]].concat();
    assert_eq!(parse(&flag_wins).unwrap().isolate_uid, IsolateUid::Id(4321));
    std::fs::write(&config, "isolate_uid = 4321\nisolate_uid_range = \"3000000-3000009\"\n").unwrap();
    assert_eq!(field_of(&from_file), "isolate_uid_range");
    std::fs::write(&config, "isolate_uid_range = \"0-9\"\n").unwrap();
    assert_eq!(field_of(&from_file), "isolate_uid_range");
}

#[test]
fn build_settings_take_registries_a_timeout_and_hosts_in_both_serve_modes() {
    let apps = tempfile::tempdir().unwrap();
    let dir = apps.path().to_str().unwrap();
    let settings = parse(&["serve", "--apps", dir]).unwrap();
    assert_eq!(settings.build.npm_registry, None, "the public registry by default");
    assert_eq!(settings.build.timeout, Duration::from_secs(300));
    assert_eq!(settings.build.memory_limit_bytes, 2048 << 20);
    let settings = parse(&[
        "serve",
        "--apps",
        dir,
        "--npm-registry",
        "http://127.0.0.1:4873",
        "--jsr-registry",
        "https://jsr.example/base",
        "--build-timeout-s",
        "60",
        "--build-allow-import",
        "deno.example:8443",
    ])
    .unwrap();
    assert_eq!(settings.build.npm_registry.unwrap().as_str(), "http://127.0.0.1:4873/");
    assert_eq!(settings.build.jsr_registry.unwrap().as_str(), "https://jsr.example/base/", "a folder URL");
    assert_eq!(settings.build.timeout, Duration::from_secs(60));
    assert_eq!(settings.build.allow_import, ["deno.example:8443"]);
    assert_eq!(field_of(&["serve", "--apps", dir, "--npm-registry", "ftp://x/"]), "npm_registry");
    // A runner takes an ESZIP's npm snapshot packages from the same setting.
    let runner = parse(&[
        "runner",
        "--rpc-root",
        "http://127.0.0.1:1/",
        "--subhost-secret",
        "acme=0123456789abcdef0123456789abcdef",
        "--npm-registry",
        "http://127.0.0.1:4873",
    ]);
    assert_eq!(runner.unwrap().build.npm_registry.unwrap().as_str(), "http://127.0.0.1:4873/");
    assert_eq!(field_of(&["serve", "--apps", dir, "--jsr-registry", "not a url"]), "jsr_registry");
    assert_eq!(field_of(&["serve", "--apps", dir, "--build-timeout-s", "1"]), "build_timeout_s");
    assert_eq!(field_of(&["serve", "--apps", dir, "--build-memory-mb", "8"]), "build_memory_mb");
    let settings = parse(&["serve", "--apps", dir, "--build-memory-mb", "512"]).unwrap();
    assert_eq!(settings.build.memory_limit_bytes, 512 << 20);
    assert_eq!(field_of(&["serve", "--apps", dir, "--build-allow-import", "a/b"]), "build_allow_import");
}

#[test]
fn listener_bounds_default_per_listener_come_from_flags_or_file_and_are_validated() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    fn with<'a>(dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        [&["serve", "--data", dir, "--state-dir", "/tmp/x"][..], extra].concat()
    }
    let serve = |extra: &[&'static str]| with(dir, extra);
    let settings = parse(&serve(&[])).unwrap();
    let set = &settings.listeners;
    assert_eq!((set.public.max_connections_per_peer, set.public.max_connections), (256, 16_384));
    assert_eq!((set.tls.max_connections_per_peer, set.tls.max_connections), (256, 16_384));
    assert_eq!((set.control.max_connections_per_peer, set.control.max_connections), (64, 1024));
    assert_eq!((set.admin.max_connections_per_peer, set.admin.max_connections), (16, 64));
    // One head timeout for every listener: the public one's flag.
    for bounds in [&set.public, &set.tls, &set.control, &set.admin] {
        assert_eq!(bounds.header_timeout, Duration::from_secs(10));
    }
    assert_eq!(set.public.body, None, "public bodies stream to tenants untimed");
    let body = isocloud_ingress::BodyBound { timeout: Duration::from_secs(30), min_rate_bytes_per_s: 16 * 1024 };
    assert_eq!((set.control.body, set.admin.body), (Some(body), Some(body)));

    let settings = parse(&serve(&[
        "--header-timeout-s",
        "2",
        "--body-timeout-s",
        "5",
        "--min-body-rate-kb-s",
        "0",
        "--max-connections-per-peer",
        "0",
        "--max-connections",
        "100",
        "--control-max-connections-per-peer",
        "3",
        "--control-max-connections",
        "7",
        "--admin-max-connections-per-peer",
        "1",
        "--admin-max-connections",
        "2",
    ]))
    .unwrap();
    let set = &settings.listeners;
    assert_eq!(set.control.header_timeout, Duration::from_secs(2));
    assert_eq!(
        set.admin.body,
        Some(isocloud_ingress::BodyBound { timeout: Duration::from_secs(5), min_rate_bytes_per_s: 0 })
    );
    assert_eq!((set.public.max_connections_per_peer, set.public.max_connections), (0, 100));
    assert_eq!((set.tls.max_connections_per_peer, set.tls.max_connections), (0, 100));
    assert_eq!((set.control.max_connections_per_peer, set.control.max_connections), (3, 7));
    assert_eq!((set.admin.max_connections_per_peer, set.admin.max_connections), (1, 2));

    let config = data.path().join("isocloud.toml");
    std::fs::write(&config, "control_max_connections_per_peer = 9\nbody_timeout_s = 12\nmax_connections = 500\n")
        .unwrap();
    let settings = parse(&with(dir, &["--config", config.to_str().unwrap(), "--max-connections", "600"])).unwrap();
    assert_eq!(settings.listeners.control.max_connections_per_peer, 9);
    assert_eq!(settings.listeners.control.body.unwrap().timeout, Duration::from_secs(12));
    assert_eq!(settings.listeners.public.max_connections, 600, "the flag wins");

    assert_eq!(field_of(&serve(&["--max-connections", "0"])), "max_connections");
    assert_eq!(field_of(&serve(&["--body-timeout-s", "0"])), "body_timeout_s");
    assert_eq!(field_of(&serve(&["--control-max-connections", "10"])), "control_max_connections_per_peer");
    assert_eq!(field_of(&serve(&["--admin-max-connections-per-peer", "65"])), "admin_max_connections_per_peer");
}

#[test]
fn a_bad_toggle_or_a_flag_only_key_in_the_file_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("isocloud.toml");
    let args = ["serve", "--apps", dir.path().to_str().unwrap(), "--config", config.to_str().unwrap()];
    std::fs::write(&config, "landlock = \"on\"\nlog_format = \"json\"\n").unwrap();
    let settings = parse(&args).unwrap();
    assert_eq!((settings.landlock, settings.log_format), (Toggle::On, LogFormat::Json));
    for (text, key) in [
        ("landlock = \"yes\"\n", "landlock"),
        ("seccomp = \"auto\"\n", "seccomp"),
        ("log_format = \"xml\"\n", "log_format"),
        ("isolate_uid = \"nobody\"\n", "isolate_uid"),
        ("config = \"other.toml\"\n", "config"),
    ] {
        std::fs::write(&config, text).unwrap();
        let err = parse(&args).err().unwrap();
        assert_eq!(err.field, "config", "{text}");
        assert!(err.message.contains(&format!("`{key}`")), "{text}: {err}");
    }
}

#[test]
fn every_flag_is_declared_and_its_help_shows_the_declared_default() {
    use clap::CommandFactory as _;
    let cli = Cli::command();
    let mut seen = Vec::new();
    for command in ["serve", "runner", "edge"] {
        let command = cli.find_subcommand(command).unwrap();
        for arg in command.get_arguments() {
            let Some(flag) = arg.get_long() else { continue };
            if flag == "help" {
                continue;
            }
            let spec = OPTIONS.iter().find(|spec| spec.key.replace('_', "-") == flag);
            let spec = spec.unwrap_or_else(|| panic!("--{flag} is not declared in settings/options.rs"));
            let help = arg.get_help().unwrap().to_string();
            if spec.default != "none" {
                assert!(help.ends_with(&format!("[default: {}]", spec.default)), "--{flag}: {help}");
            }
            seen.push(spec.key);
        }
    }
    for spec in OPTIONS.iter() {
        assert!(seen.contains(&spec.key), "`{}` is declared but no command takes it", spec.key);
    }
}

/// The README's flag tables (`| flag | default | meaning |`), as
/// flag name → default cell (`--a N` / `--b N` rows split in two).
fn readme_flag_rows(readme: &str) -> Result<Vec<(String, String)>, String> {
    // Cells split at `|` but not at an escaped `\|` (`--seccomp on\|off`).
    fn cells(line: &str) -> Vec<String> {
        let line = line.replace("\\|", "\u{0}");
        let cells = line.trim().trim_matches('|').split('|');
        cells.map(|cell| cell.replace('\u{0}', "|").trim().to_owned()).collect()
    }
    let mut rows = Vec::new();
    let mut in_flag_table = false;
    for line in readme.lines() {
        if !line.starts_with('|') {
            in_flag_table = false;
            continue;
        }
        let cells = cells(line);
        if cells.len() >= 2 && cells[0] == "flag" && cells[1] == "default" {
            in_flag_table = true;
            continue;
        }
        if !in_flag_table || cells[0].starts_with("---") {
            continue;
        }
        let flags: Vec<&str> = cells[0].split(" / ").collect();
        let defaults: Vec<&str> = if flags.len() > 1 { cells[1].split(" / ").collect() } else { vec![&cells[1]] };
        if flags.len() != defaults.len() {
            return Err(format!("{} flags but {} defaults: {line}", flags.len(), defaults.len()));
        }
        for (flag, default) in flags.iter().zip(defaults) {
            let Some(name) = flag.trim_matches('`').strip_prefix("--") else {
                return Err(format!("{flag:?} is not a `--flag`: {line}"));
            };
            let name = name.split(' ').next().unwrap_or_default().to_owned();
            rows.push((name, default.replace('`', "").trim().to_owned()));
        }
    }
    Ok(rows)
}

#[test]
fn the_readme_option_tables_list_every_option_with_its_default() {
    let readme = include_str!("../../../../README.md");
    let rows = readme_flag_rows(readme).unwrap();
    let mut wrong = Vec::new();
    for spec in OPTIONS.iter() {
        let flag = spec.key.replace('_', "-");
        match rows.iter().filter(|(name, _)| *name == flag).collect::<Vec<_>>()[..] {
            [] => wrong.push(format!("--{flag} has no row (default: {})", spec.default)),
            [(_, default)] if *default != spec.default => {
                wrong.push(format!("--{flag}: the README says {default:?}, the declaration {:?}", spec.default))
            }
            [_] => {}
            _ => wrong.push(format!("--{flag} has more than one row")),
        }
    }
    for (name, _) in &rows {
        if !OPTIONS.iter().any(|spec| spec.key.replace('_', "-") == *name) {
            wrong.push(format!("the README lists --{name}, which is no option"));
        }
    }
    assert!(wrong.is_empty(), "README.md's option tables disagree with settings/options.rs:\n{}", wrong.join("\n"));

    // The check itself sees a wrong default, a missing row and a row too many.
    let table = "| flag | default | meaning |\n| --- | --- | --- |\n\
                 | `--idle-timeout-s N` / `--no-such-flag N` | 30 / 1 | … |\n| `--log-format text\\|json` | `text` | … |\n";
    assert_eq!(
        readme_flag_rows(table).unwrap(),
        [("idle-timeout-s", "30"), ("no-such-flag", "1"), ("log-format", "text")]
            .map(|(flag, default)| (flag.to_owned(), default.to_owned()))
    );
}

#[test]
fn the_origin_listener_is_off_by_default_and_needs_its_keys() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let control = |args: &[&str]| control_plane(dir, args);
    assert!(control(&[]).origin.is_none(), "off by default");

    let secret = format!("cp={}", "s".repeat(32));
    let origin = control(&["--origin-listen", "127.0.0.1:0", "--origin-secret", &secret]).origin.expect("on");
    assert_eq!(origin.addr.to_string(), "127.0.0.1:0");
    assert_eq!(origin.keys[0].kid, "cp");
    assert!(!format!("{origin:?}").contains(&"s".repeat(32)), "the secret is never shown: {origin:?}");

    // From a file named in the TOML file (its newline is not the secret's).
    let key_file = data.path().join("origin.key");
    std::fs::write(&key_file, format!("{}\n", "k".repeat(40))).unwrap();
    let config = data.path().join("isocloud.toml");
    std::fs::write(
        &config,
        format!("origin_listen = \"127.0.0.1:9000\"\norigin_secret_file = [\"cp={}\"]\n", key_file.display()),
    )
    .unwrap();
    let origin = control(&["--config", config.to_str().unwrap()]).origin.expect("on from the file");
    assert_eq!((origin.addr.port(), origin.keys[0].secret.len()), (9000, 40));

    let field = |args: &[&str]| {
        let mut argv = vec!["serve", "--data", dir];
        argv.extend_from_slice(args);
        field_of(&argv)
    };
    assert_eq!(field(&["--origin-listen", "127.0.0.1:0"]), "origin_secret", "a listener without a key");
    assert_eq!(field(&["--origin-secret", &secret]), "origin_secret", "a key without the listener");
    assert_eq!(field(&["--origin-listen", "127.0.0.1:0", "--origin-secret", "cp=short"]), "origin_secret");
    let twice = ["--origin-listen", "127.0.0.1:0", "--origin-secret", &secret, "--origin-secret", &secret];
    assert_eq!(field(&twice), "origin_secret");
    assert_eq!(field(&["--origin-listen", "nonsense", "--origin-secret", &secret]), "origin_listen");
    let apps = tempfile::tempdir().unwrap();
    let with_apps = ["serve", "--apps", apps.path().to_str().unwrap(), "--origin-listen", "127.0.0.1:0"];
    assert_eq!(field_of(&with_apps), "apps", "the apps folder has no control plane to serve");
    let runner = ["runner", "--rpc-root", "http://o/", "--subhost-secret", "a=b", "--origin-listen", "127.0.0.1:0"];
    assert_eq!(field_of(&runner), "origin_listen", "a runner has no origin to serve");
}

/// A self-signed pair for 127.0.0.1 in `dir`: the certificate's path, the
/// key's.
fn write_certificate(dir: &Path) -> (String, String) {
    let pair = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, pair.cert.pem()).unwrap();
    std::fs::write(&key, pair.key_pair.serialize_pem()).unwrap();
    (cert.to_str().unwrap().to_owned(), key.to_str().unwrap().to_owned())
}

#[test]
fn the_origin_listener_serves_tls_with_both_files_read_now() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let (cert, key) = write_certificate(data.path());
    let secret = format!("cp={}", "s".repeat(32));
    let listen = ["--origin-listen", "127.0.0.1:0", "--origin-secret", secret.as_str()];
    assert!(control_plane(dir, &listen).origin.unwrap().tls.is_none(), "plain HTTP unless asked");
    let tls = [&listen[..], &["--origin-tls-cert", &cert, "--origin-tls-key", &key]].concat();
    assert!(control_plane(dir, &tls).origin.unwrap().tls.is_some());

    let refused = |args: &[&str]| {
        let mut argv = vec!["serve", "--data", dir];
        argv.extend_from_slice(args);
        match parse(&argv) {
            Ok(_) => panic!("{args:?} was accepted"),
            Err(e) => (e.field, e.message),
        }
    };
    let (field, _) = refused(&["--origin-tls-cert", &cert, "--origin-tls-key", &key]);
    assert_eq!(field, "origin_tls_cert", "no listener to serve it");
    assert_eq!(refused(&[&listen[..], &["--origin-tls-cert", &cert]].concat()).0, "origin_tls_key");
    assert_eq!(refused(&[&listen[..], &["--origin-tls-key", &key]].concat()).0, "origin_tls_cert");
    let swapped = [&listen[..], &["--origin-tls-cert", &key, "--origin-tls-key", &cert]].concat();
    let (field, message) = refused(&swapped);
    assert_eq!(field, "origin_tls_cert");
    assert!(message.contains("key.pem") && message.contains("no CERTIFICATE"), "{message}");
}

#[test]
fn rpc_root_ca_is_a_runners_and_an_edges_and_is_read_now() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_certificate(dir.path());
    let runner = ["runner", "--rpc-root", "https://o/", "--subhost-secret", "a=b", "--state-dir", "/tmp/x"];
    let settings = parse(&[&runner[..], &["--rpc-root-ca", &cert]].concat()).unwrap();
    assert_eq!(settings.rpc_trust.files().len(), 1);
    assert!(parse(&runner).unwrap().rpc_trust.files().is_empty(), "the public roots only, unless asked");
    assert_eq!(field_of(&[&runner[..], &["--rpc-root-ca", &key]].concat()), "rpc_root_ca", "a key is no CA");
    assert_eq!(field_of(&[&runner[..], &["--rpc-root-ca", "/nonexistent.pem"]].concat()), "rpc_root_ca");
    let apps = tempfile::tempdir().unwrap();
    let serve = ["serve", "--apps", apps.path().to_str().unwrap(), "--rpc-root-ca", &cert];
    assert_eq!(field_of(&serve), "rpc_root_ca", "serve calls no remote origin");

    let edge_args = ["--rpc-root", "https://10.0.0.1:8082/", "--subhost-secret", EDGE_KEY, "--runner", "http://r:8080"];
    let settings = edge(&[&edge_args[..], &["--rpc-root-ca", &cert]].concat()).unwrap();
    assert_eq!(settings.rpc_trust.files().len(), 1);
    let Err(e) = edge(&[&edge_args[..], &["--rpc-root-ca", &key]].concat()) else { panic!("a key is no CA") };
    assert_eq!(e.field, "rpc_root_ca");
}

#[test]
fn blobs_stay_in_the_data_dir_unless_a_bucket_is_named() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let control = |args: &[&str]| control_plane(dir, args);
    let default = control(&[]);
    assert!(default.blob_store.is_none(), "files in the data dir by default");
    assert_eq!(default.blob_gc_grace, Duration::from_secs(86_400));

    let secret_file = data.path().join("s3.secret");
    std::fs::write(&secret_file, "s3-secret-value-0123456789\n").unwrap();
    let secret_path = secret_file.to_str().unwrap();
    let with_bucket = control(&[
        "--blob-store",
        "s3://blobs/isocloud",
        "--blob-store-endpoint",
        "http://127.0.0.1:3900",
        "--blob-store-region",
        "garage",
        "--blob-store-access-key-id",
        "GK0123",
        "--blob-store-secret-access-key-file",
        secret_path,
        "--blob-gc-grace-s",
        "7200",
    ]);
    let s3 = with_bucket.blob_store.as_ref().expect("a bucket");
    assert_eq!(s3.url, "s3://blobs/isocloud");
    assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
    assert_eq!(s3.region.as_deref(), Some("garage"));
    assert_eq!(s3.access_key_id.as_deref(), Some("GK0123"));
    assert_eq!(s3.secret_access_key.as_deref(), Some("s3-secret-value-0123456789"), "its newline is not the secret's");
    assert_eq!(with_bucket.blob_gc_grace, Duration::from_secs(7200));
    assert!(!format!("{with_bucket:?}").contains("s3-secret-value"), "the secret is never shown");

    // From the TOML file; the rest from the environment (not read here).
    let config = data.path().join("isocloud.toml");
    std::fs::write(&config, "blob_store = \"s3://blobs\"\nblob_gc_grace_s = 3600\n").unwrap();
    let from_file = control(&["--config", config.to_str().unwrap()]);
    let s3 = from_file.blob_store.expect("a bucket from the file");
    assert_eq!((s3.url.as_str(), s3.endpoint, s3.secret_access_key), ("s3://blobs", None, None));
    assert_eq!(from_file.blob_gc_grace, Duration::from_secs(3600));

    let field = |args: &[&str]| {
        let mut argv = vec!["serve", "--data", dir];
        argv.extend_from_slice(args);
        field_of(&argv)
    };
    assert_eq!(field(&["--blob-store", "http://blobs/x"]), "blob_store");
    assert_eq!(field(&["--blob-store", "s3://"]), "blob_store");
    assert_eq!(field(&["--blob-store-region", "garage"]), "blob_store_region", "an option without the bucket");
    assert_eq!(field(&["--blob-store-secret-access-key-file", secret_path]), "blob_store_secret_access_key_file");
    let bucket = ["--blob-store", "s3://blobs"];
    assert_eq!(field(&[&bucket[..], &["--blob-store-endpoint", "ftp://x"]].concat()), "blob_store_endpoint");
    let missing = ["--blob-store-secret-access-key-file", "/definitely/not/here"];
    assert_eq!(field(&[&bucket[..], &missing].concat()), "blob_store_secret_access_key_file");
    assert_eq!(field(&["--blob-gc-grace-s", "59"]), "blob_gc_grace_s", "out of range");
    assert_eq!(field(&["--blob-gc-grace-s", "599"]), "blob_gc_grace_s", "less than twice the build timeout");
    assert_eq!(control(&["--blob-gc-grace-s", "600"]).blob_gc_grace, Duration::from_secs(600));
    assert_eq!(control(&["--blob-gc-grace-s", "120", "--build-timeout-s", "60"]).blob_gc_grace.as_secs(), 120);
}

#[test]
fn stale_boots_last_a_day_by_default_and_zero_turns_them_off() {
    let base = ["runner", "--rpc-root", "http://o/v0/", "--subhost-secret", "a=s1", "--state-dir", "/tmp/x"];
    assert_eq!(parse(&base).unwrap().boot_stale_max_age, Duration::from_secs(86_400));
    let off = parse(&[&base[..], &["--boot-stale-max-age-s", "0"]].concat()).unwrap();
    assert_eq!(off.boot_stale_max_age, Duration::ZERO);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("isocloud.toml");
    std::fs::write(&config, "boot_stale_max_age_s = 600\n").unwrap();
    let from_file = parse(&[&base[..], &["--config", config.to_str().unwrap()]].concat()).unwrap();
    assert_eq!(from_file.boot_stale_max_age, Duration::from_secs(600));
    let too_long = (86_400 * 365 + 1).to_string();
    assert_eq!(field_of(&[&base[..], &["--boot-stale-max-age-s", &too_long]].concat()), "boot_stale_max_age_s");
}

/// `isocloud edge`'s settings: `edge` followed by `args`.
fn edge(args: &[&str]) -> Result<EdgeSettings, SettingsError> {
    let mut argv = vec!["isocloud", "edge"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).map_err(|e| invalid("clap", e.to_string()))?;
    let Command::Edge { common, serve, subhost, edge } = cli.command else { panic!("not the edge") };
    EdgeSettings::from_flags(common, *serve, subhost, edge)
}

const EDGE_KEY: &str = "cp=edge-secret-0123456789abcdef0123456789";

#[test]
fn the_edge_takes_its_runners_origin_and_key() {
    let settings = edge(&[
        "--rpc-root",
        "http://10.0.0.1:8082/",
        "--subhost-secret",
        EDGE_KEY,
        "--runner",
        "http://10.0.0.5:8080",
        "--runner",
        "http://10.0.0.6:8080/",
    ])
    .unwrap();
    assert_eq!(settings.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(settings.rpc_root.as_str(), "http://10.0.0.1:8082/");
    assert_eq!(settings.key.kid, "cp");
    assert!(!format!("{:?}", settings.key).contains("edge-secret"), "the secret is never shown");
    assert_eq!(
        settings.runners.iter().map(Url::as_str).collect::<Vec<_>>(),
        ["http://10.0.0.5:8080/", "http://10.0.0.6:8080/"]
    );
    assert!(settings.runner_http2);
    assert_eq!(settings.runner_max_idle, 64);
    assert_eq!(settings.health_interval, Duration::from_secs(1));
    assert_eq!(settings.request_timeout, Duration::from_secs(60));
    assert_eq!(settings.public_bounds.listener, ListenerKind::Public);
    assert_eq!(settings.admin_bounds.listener, ListenerKind::Admin);
    assert!(settings.otlp.is_none());
    let traced = edge(&[
        "--rpc-root",
        "http://10.0.0.1:8082/",
        "--subhost-secret",
        EDGE_KEY,
        "--runner",
        "http://10.0.0.5:8080",
        "--otlp-endpoint",
        "http://collector:4318",
        "--otlp-service-name",
        "edge",
    ])
    .unwrap();
    assert_eq!(traced.otlp.map(|o| o.service_name).as_deref(), Some("edge"));

    // The same from a TOML file (a key file too); flags win.
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("edge.key");
    std::fs::write(&key_file, format!("{}\n", "k".repeat(40))).unwrap();
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "rpc_root = \"http://cp.internal:8082/\"\nsubhost_secret_file = [\"cp={}\"]\n\
             runner = [\"http://r1.internal:8080\", \"http://r2.internal:8080\"]\nrunner_http2 = \"off\"\n\
             health_interval_ms = 250\n\
             # A runner's option in a config file shared with the runners: ignored.\nidle_timeout_s = 30\n",
            key_file.display()
        ),
    )
    .unwrap();
    let settings = edge(&["--config", config.to_str().unwrap(), "--health-interval-ms", "500"]).unwrap();
    assert_eq!((settings.runners.len(), settings.runner_http2), (2, false));
    assert_eq!(settings.key.secret.len(), 40);
    assert_eq!(settings.health_interval, Duration::from_millis(500));
}

#[test]
fn the_edge_reads_its_runners_from_a_file_instead_of_flags() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("runners");
    std::fs::write(&list, "# two\nhttp://10.0.0.5:8080\nhttp://10.0.0.6:8080\n").unwrap();
    let path = list.to_str().unwrap();
    let base = ["--rpc-root", "http://cp:8082/", "--subhost-secret", EDGE_KEY];
    let settings = edge(&[&base[..], &["--runners-file", path]].concat()).unwrap();
    assert_eq!(settings.runners.len(), 2);
    assert_eq!(settings.runners_file.as_deref(), Some(list.as_path()));
    let both = [&base[..], &["--runners-file", path, "--runner", "http://r:8080"]].concat();
    assert_eq!(edge(&both).err().unwrap().field, "runners_file", "name the runners once");
    std::fs::write(&list, "http://10.0.0.5:8080\nftp://10.0.0.6:8080\n").unwrap();
    let bad = edge(&[&base[..], &["--runners-file", path]].concat()).err().unwrap();
    assert_eq!(bad.field, "runners_file");
    assert!(bad.message.contains("line 2"), "{}", bad.message);
    let missing = edge(&[&base[..], &["--runners-file", "/nonexistent/runners"]].concat()).err().unwrap();
    assert_eq!(missing.field, "runners_file");
}

#[test]
fn a_runner_serves_tls_with_both_files_and_an_edge_trusts_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_certificate(dir.path());
    let runner = ["runner", "--rpc-root", "http://o/", "--subhost-secret", "a=b", "--state-dir", "/tmp/x"];
    assert!(parse(&runner).unwrap().listen_tls.is_none(), "plain unless asked");
    assert!(parse(&[&runner[..], &["--tls-cert", &cert, "--tls-key", &key]].concat()).unwrap().listen_tls.is_some());
    assert_eq!(field_of(&[&runner[..], &["--tls-cert", &cert]].concat()), "tls_key");
    assert_eq!(field_of(&[&runner[..], &["--tls-cert", &key, "--tls-key", &cert]].concat()), "tls_cert");

    let base = ["--rpc-root", "http://cp:8082/", "--subhost-secret", EDGE_KEY, "--runner", "https://r:8443"];
    let public_only = edge(&base).unwrap().runner_roots.len();
    assert!(public_only > 50, "the public roots: {public_only}");
    assert_eq!(edge(&[&base[..], &["--runner-ca", &cert]].concat()).unwrap().runner_roots.len(), public_only + 1);
    assert_eq!(edge(&[&base[..], &["--runner-ca", &key]].concat()).err().unwrap().field, "runner_ca", "a key is no CA");
    assert_eq!(edge(&[&base[..], &["--tls-cert", &cert]].concat()).err().unwrap().field, "tls_cert", "a runner's");
}

#[test]
fn the_edge_refuses_what_it_cannot_use_by_name() {
    let base = ["--rpc-root", "http://cp:8082/", "--subhost-secret", EDGE_KEY, "--runner", "http://r:8080"];
    let field = |extra: &[&str], drop: &[&str]| {
        let mut args: Vec<&str> = Vec::new();
        let mut i = 0;
        while i < base.len() {
            if drop.contains(&base[i]) {
                i += 2;
                continue;
            }
            args.extend_from_slice(&base[i..i + 2]);
            i += 2;
        }
        args.extend_from_slice(extra);
        match edge(&args) {
            Ok(_) => panic!("{args:?} was accepted"),
            Err(e) => (e.field, e.message),
        }
    };
    assert!(edge(&base).is_ok(), "the probe works");
    // A runner's option on the edge's command line: named, not ignored.
    let (name, message) = field(&["--cpu-limit-ms", "100"], &[]);
    assert_eq!(name, "cpu_limit_ms");
    assert!(message.contains("--cpu-limit-ms is not an edge option"), "{message}");
    assert_eq!(field(&["--allow-rpc-root", "cp=http://x/"], &[]).0, "allow_rpc_root");
    assert_eq!(field(&[], &["--rpc-root"]).0, "rpc_root");
    assert_eq!(field(&["--rpc-root", "http://cp:8082/v0"], &["--rpc-root"]).0, "rpc_root");
    assert_eq!(field(&[], &["--runner"]).0, "runner");
    for bad in ["ftp://r:8080", "http://r:8080/prefix/", "not a url"] {
        assert_eq!(field(&["--runner", bad], &["--runner"]).0, "runner", "{bad}");
    }
    assert_eq!(field(&["--runner", "http://R:8080/"], &[]).0, "runner", "named twice");
    assert_eq!(field(&[], &["--subhost-secret"]).0, "subhost_secret", "no key");
    assert_eq!(field(&["--subhost-secret", "other=x".repeat(8).as_str()], &[]).0, "subhost_secret", "two keys");
    let (name, message) = field(&["--subhost-secret", "cp=short"], &["--subhost-secret"]);
    assert_eq!(name, "subhost_secret");
    assert!(message.contains("fewer than 32"), "{message}");
    assert_eq!(field(&["--health-interval-ms", "10"], &[]).0, "health_interval_ms");
    // Of `serve`'s options only --tls-listen is the edge's.
    let (name, message) = field(&["--data", "/tmp/x"], &[]);
    assert_eq!(name, "data");
    assert!(message.contains("--data is not an edge option"), "{message}");
    assert_eq!(field(&["--origin-listen", "127.0.0.1:0"], &[]).0, "origin_listen");
    assert_eq!(field(&["--tls-listen", "not an address"], &[]).0, "tls_listen");
}

/// `--tls-listen` (or `tls_listen` in the file): HTTPS on the edge, with the
/// runner's TLS listener's bounds; off by default.
#[test]
fn the_edge_takes_a_tls_listener() {
    let base = ["--rpc-root", "http://cp:8082/", "--subhost-secret", EDGE_KEY, "--runner", "http://r:8080"];
    let plain = edge(&base).unwrap();
    assert!(plain.tls_listen.is_none(), "off by default");
    let tls =
        edge(&[&base[..], &["--tls-listen", "0.0.0.0:8443", "--max-connections-per-peer", "7"]].concat()).unwrap();
    assert_eq!(tls.tls_listen.map(|a| a.to_string()).as_deref(), Some("0.0.0.0:8443"));
    assert_eq!(tls.tls_bounds.listener, ListenerKind::Tls);
    assert_eq!(tls.tls_bounds.max_connections_per_peer, 7, "the public listeners' caps");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edge.toml");
    std::fs::write(&config, "tls_listen = \"127.0.0.1:9443\"\n").unwrap();
    let from_file = edge(&[&base[..], &["--config", config.to_str().unwrap()]].concat()).unwrap();
    assert_eq!(from_file.tls_listen.map(|a| a.port()), Some(9443));
}

#[test]
fn acme_is_off_without_an_email_and_its_options_are_validated() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let control = |args: &[&str]| control_plane(dir, args);
    assert!(control(&[]).acme.is_none(), "off by default");
    let on = control(&["--acme-email", "ops@example.com"]).acme.expect("on with an email");
    assert_eq!(on.directory_url, isocloud_controlplane::LETS_ENCRYPT_DIRECTORY);
    assert_eq!(on.email.as_deref(), Some("ops@example.com"));
    assert_eq!(on.renew_before, Duration::from_secs(30 * 86_400));
    assert_eq!(on.retry_min, Duration::from_secs(60));
    assert!(on.ca_pem.is_none());

    let ca = data.path().join("ca.pem");
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    std::fs::write(&ca, pem).unwrap();
    let config = data.path().join("isocloud.toml");
    std::fs::write(
        &config,
        format!(
            "acme_email = \"ops@example.com\"\nacme_directory = \"https://127.0.0.1:14000/dir\"\n\
             acme_ca_file = \"{}\"\nacme_renew_before_days = 10\nacme_retry_min_s = 5\n",
            ca.display()
        ),
    )
    .unwrap();
    let from_file = control(&["--config", config.to_str().unwrap()]).acme.expect("on from the file");
    assert_eq!(from_file.directory_url, "https://127.0.0.1:14000/dir");
    assert_eq!(from_file.ca_pem.as_deref(), Some(pem.as_bytes()));
    assert_eq!(from_file.renew_before, Duration::from_secs(10 * 86_400));
    assert_eq!(from_file.retry_min, Duration::from_secs(5));

    let field = |args: &[&str]| {
        let mut argv = vec!["serve", "--data", dir];
        argv.extend_from_slice(args);
        field_of(&argv)
    };
    let email = ["--acme-email", "ops@example.com"];
    assert_eq!(field(&["--acme-directory", "https://acme.test/dir"]), "acme_directory", "needs the email");
    assert_eq!(field(&["--acme-email", "not an email"]), "acme_email");
    assert_eq!(field(&[&email[..], &["--acme-directory", "http://acme.test/dir"]].concat()), "acme_directory");
    assert_eq!(field(&[&email[..], &["--acme-ca-file", "/definitely/not/here"]].concat()), "acme_ca_file");
    std::fs::write(&ca, "not pem").unwrap();
    assert_eq!(field(&[&email[..], &["--acme-ca-file", ca.to_str().unwrap()]].concat()), "acme_ca_file");
    assert_eq!(field(&[&email[..], &["--acme-renew-before-days", "0"]].concat()), "acme_renew_before_days");
    assert_eq!(field(&[&email[..], &["--acme-retry-min-s", "0"]].concat()), "acme_retry_min_s");
}

#[test]
fn acme_challenge_is_http_01_unless_tls_alpn_01_is_asked_with_a_tls_listener() {
    use isocloud_controlplane::ChallengeKind;
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let email = ["--acme-email", "ops@example.com"];
    let tls = ["--tls-listen", "127.0.0.1:0"];
    let challenge = |args: &[&str]| control_plane(dir, args).acme.expect("ACME on").challenge;
    assert_eq!(challenge(&email), ChallengeKind::Http01, "the default");
    assert_eq!(challenge(&[&email[..], &["--acme-challenge", "http-01"]].concat()), ChallengeKind::Http01);
    assert_eq!(
        challenge(&[&email[..], &tls[..], &["--acme-challenge", "tls-alpn-01"]].concat()),
        ChallengeKind::TlsAlpn01
    );
    let config = data.path().join("isocloud.toml");
    std::fs::write(
        &config,
        "acme_email = \"ops@example.com\"\ntls_listen = \"127.0.0.1:0\"\nacme_challenge = \"tls-alpn-01\"\n",
    )
    .unwrap();
    assert_eq!(challenge(&["--config", config.to_str().unwrap()]), ChallengeKind::TlsAlpn01, "from the file");

    let field = |args: &[&str]| {
        let mut argv = vec!["serve", "--data", dir];
        argv.extend_from_slice(args);
        field_of(&argv)
    };
    // Answered on the TLS listener: without one, refused.
    assert_eq!(field(&[&email[..], &["--acme-challenge", "tls-alpn-01"]].concat()), "acme_challenge");
    assert_eq!(field(&[&tls[..], &["--acme-challenge", "tls-alpn-01"]].concat()), "acme_challenge", "needs the email");
    assert_eq!(field(&[&email[..], &["--acme-challenge", "dns-01"]].concat()), "acme_challenge");
}

#[test]
fn runtime_threads_are_tokio_s_default_unless_given_and_never_zero() {
    let apps = tempfile::tempdir().unwrap();
    let dir = apps.path().to_str().unwrap();
    assert_eq!(parse(&["serve", "--apps", dir]).unwrap().runtime_threads, None);
    assert_eq!(parse(&["serve", "--apps", dir, "--runtime-threads", "1"]).unwrap().runtime_threads, Some(1));
    assert_eq!(field_of(&["serve", "--apps", dir, "--runtime-threads", "0"]), "runtime_threads");
    assert_eq!(field_of(&["serve", "--apps", dir, "--runtime-threads", "many"]), "runtime_threads");
}
