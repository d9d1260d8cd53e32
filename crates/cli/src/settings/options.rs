//! Every option of `serve` and `runner`, declared once: its name (the TOML
//! key; the flag is the same in kebab-case), value name, type, default,
//! range and help. [`options!`] makes of each declaration the clap argument
//! (its help ending in `[default: …]`), the config file's key, a row of
//! [`OPTIONS`] (the README's option tables are held to it by a test), and
//! the merge of flag over file with the default applied and the range
//! checked ([`Given`]). What one option means for another (a listener's
//! caps, the uid rules, the mode) is `settings.rs`'s.

use std::path::PathBuf;
use std::sync::LazyLock;

use isocloud_controlplane::defaults as control_plane;
use isocloud_ingress::{LISTENER_DEFAULTS, ListenerDefaults, ListenerKind};
use isocloud_sandbox::UidRange;

use super::{
    AcmeChallenge, BOOT_QUEUE_PER_CONCURRENT_BOOT, LogFormat, SettingsError, Switch, Toggle, UidChoice, within,
};

/// One option as the help and the README show it.
#[derive(Debug)]
pub struct OptionSpec {
    /// The TOML key; the flag is `--` and the key in kebab-case (clap's
    /// `long` of the field).
    pub key: &'static str,
    /// What it does, one paragraph.
    pub help: String,
    /// Its default, or what happens without it (`none`: nothing).
    pub default: String,
}

/// `--KEY`'s help: its text and its default, as clap shows defaults.
fn help_of(key: &str) -> String {
    let spec = OPTIONS.iter().find(|spec| spec.key == key).expect("every flag is declared");
    match spec.default.as_str() {
        "none" => spec.help.clone(),
        default => format!("{} [default: {default}]", spec.help.trim_end_matches('.')),
    }
}

fn paragraph(lines: &[&str]) -> String {
    lines.iter().map(|line| line.trim()).filter(|line| !line.is_empty()).collect::<Vec<_>>().join(" ")
}

/// A listener's default caps (the ingress crate's table).
fn listener_default(kind: ListenerKind) -> ListenerDefaults {
    *LISTENER_DEFAULTS.iter().find(|row| row.listener == kind).expect("a row per listener")
}

/// Seconds options' upper bound: a year.
const YEAR_S: u64 = 86_400 * 365;

/// Each option's line: `KEY: TYPE, "VALUE NAME"`, then `default(VALUE)`
/// (typed; shown with `Display`) and/or `shown(TEXT)` (what help and
/// README say the default is; required without a typed default), then
/// `range(LOW..=HIGH)` (checked on the given or default value).
macro_rules! options {
    ($(
        $(#[doc = $group_doc:literal])*
        $var:ident: $group:ident {
            $(
                $(#[doc = $doc:literal])*
                $key:ident: $ty:ty, $value_name:literal
                    $(, default($default:expr))? $(, shown($shown:expr))? $(, range($range:expr))?;
            )*
        }
    )*) => {
        $(
            $(#[doc = $group_doc])*
            #[derive(clap::Args, Debug, Default)]
            pub struct $group {
                $(
                    #[arg(long, value_name = $value_name, help = help_of(stringify!($key)))]
                    pub $key: Option<$ty>,
                )*
            }

            impl $group {
                /// The keys of the options given (on the command line).
                #[allow(dead_code, reason = "made for every group; the edge reads those of the groups it takes")]
                pub fn given_keys(&self) -> Vec<&'static str> {
                    let mut keys = Vec::new();
                    $( if self.$key.is_some() { keys.push(stringify!($key)); } )*
                    keys
                }
            }
        )*

        /// The TOML file: the flags' options, snake_case; unknown keys are refused.
        #[derive(serde::Deserialize, Debug, Default)]
        #[serde(deny_unknown_fields, default)]
        pub(super) struct FileConfig {
            $($( pub(super) $key: Option<$ty>, )*)*
        }

        /// Every option, the flag's value over the file's, its default
        /// applied (`Option` where it has none) and its range checked.
        #[expect(dead_code, reason = "`config` is read before the merge, to find the file")]
        pub(super) struct Given {
            $($( pub(super) $key: given_type!($ty $(, $default)?), )*)*
        }

        impl Given {
            pub(super) fn merge($($var: $group,)* file: FileConfig) -> Result<Self, SettingsError> {
                Ok(Self {
                    $($( $key: merge!(stringify!($key), $var.$key, file.$key $(, default($default))? $(, range($range))?), )*)*
                })
            }
        }

        /// Every option, in the help's order.
        pub static OPTIONS: LazyLock<Vec<OptionSpec>> = LazyLock::new(|| {
            vec![$($(
                OptionSpec {
                    key: stringify!($key),
                    help: paragraph(&[$($doc),*]),
                    default: default_text!($ty $(, default($default))? $(, shown($shown))?),
                },
            )*)*]
        });
    };
}

macro_rules! given_type {
    ($ty:ty, $default:expr) => { $ty };
    ($ty:ty) => { Option<$ty> };
}

macro_rules! merge {
    ($key:expr, $flag:expr, $file:expr, default($default:expr), range($range:expr)) => {
        within($key, $flag.or($file).unwrap_or_else(|| $default), $range)?
    };
    ($key:expr, $flag:expr, $file:expr, default($default:expr)) => {
        $flag.or($file).unwrap_or_else(|| $default)
    };
    ($key:expr, $flag:expr, $file:expr, range($range:expr)) => {
        $flag.or($file).map(|value| within($key, value, $range)).transpose()?
    };
    ($key:expr, $flag:expr, $file:expr) => {
        $flag.or($file)
    };
}

macro_rules! default_text {
    ($ty:ty, default($default:expr), shown($shown:expr)) => {
        ($shown).to_string()
    };
    ($ty:ty, shown($shown:expr)) => {
        ($shown).to_string()
    };
    ($ty:ty, default($default:expr)) => {{
        let value: $ty = $default;
        value.to_string()
    }};
}

options! {
    /// The options of every command (`edge` reads some: `EDGE_OPTIONS`).
    common: CommonFlags {
        /// TOML file with any of these options (flags win).
        config: PathBuf, "FILE", shown("none");
        /// Public listener (port 0 picks a free port).
        listen: String, "ADDR", default("127.0.0.1:8080".into());
        /// Admin listener for /healthz and /metrics.
        admin_listen: String, "ADDR", shown("off");
        /// The deno binary isolates run on.
        deno: PathBuf, "PATH", shown(format!("$ISOCLOUD_DENO, else {} found upwards, else PATH", crate::deno::PROJECT_DENO));
        /// The npm registry builds, and ESZIPs' npm snapshots, take packages from.
        npm_registry: String, "URL", shown("https://registry.npmjs.org/");
        /// Caches and isolate files.
        state_dir: PathBuf, "DIR", shown("$XDG_STATE_HOME/isocloud or ~/.local/state/isocloud");
        /// Terminate an isolate after this many seconds without requests.
        idle_timeout_s: u64, "SECONDS", default(300), range(1..=YEAR_S);
        /// Give up on an isolate that does not serve within this time.
        boot_timeout_s: u64, "SECONDS", default(30), range(1..=YEAR_S);
        /// Cut off an origin RPC after this time.
        origin_timeout_s: u64, "SECONDS", default(10), range(1..=YEAR_S);
        /// While a deployment's origin cannot be reached (down, timed out,
        /// 5xx, 429), boot it from its last boot answer, kept in the cache, if that
        /// is younger than this; never when the origin says it does not exist.
        /// 0: none kept or used.
        boot_stale_max_age_s: u64, "SECONDS", default(86_400), range(0..=YEAR_S);
        /// On SIGTERM/SIGINT, let in-flight requests finish for this long.
        drain_timeout_s: u64, "SECONDS", default(10), range(0..=YEAR_S);
        /// On SIGTERM/SIGINT, first keep serving this long while health
        /// checks answer 503 (edges take a runner out within a probe;
        /// load balancers by theirs), then close the listeners and drain.
        drain_delay_s: u64, "SECONDS", default(0), range(0..=3600);
        /// CPU time each request may use, measured by the kernel.
        cpu_limit_ms: u64, "MS", default(50), range(1..=600_000);
        /// Wall-clock limit from forwarding a request to its response's headers.
        request_timeout_s: u64, "SECONDS", default(60), range(1..=YEAR_S);
        /// Request bodies larger than this get 413.
        max_request_body_mb: u64, "MB", default(100), range(1..=65_536);
        /// A client must send its request head within this time, on every
        /// listener: from the connection's accept (TLS handshake included) or
        /// its last response's end.
        header_timeout_s: u64, "SECONDS", default(10), range(1..=YEAR_S);
        /// A request body on the control and admin listeners must arrive within
        /// this of its head, plus 1 s per --min-body-rate-kb-s received.
        body_timeout_s: u64, "SECONDS", default(isocloud_ingress::DEFAULT_BODY_TIMEOUT_S), range(1..=3600);
        /// The slowest rate a request body on the control and admin listeners
        /// may keep up after --body-timeout-s; 0: the timeout is the whole
        /// body's.
        min_body_rate_kb_s: u64, "KB", default(isocloud_ingress::DEFAULT_MIN_BODY_RATE_KB_S), range(0..=1024 * 1024);
        /// Connections one peer (an IPv4 address, an IPv6 /64) may hold on each
        /// public listener (HTTP, TLS); one more is closed at once; 0: no cap.
        /// Behind a relay or CDN, raise it.
        max_connections_per_peer: usize, "N",
            default(listener_default(ListenerKind::Public).max_connections_per_peer), range(0..=1_000_000);
        /// Connections each public listener (HTTP, TLS) holds at once; one more
        /// is closed at once.
        max_connections: usize, "N",
            default(listener_default(ListenerKind::Public).max_connections), range(1..=1_000_000);
        /// Connections one peer may hold on the admin listener; 0: no cap.
        admin_max_connections_per_peer: usize, "N",
            default(listener_default(ListenerKind::Admin).max_connections_per_peer), range(0..=1_000_000);
        /// Connections the admin listener holds at once.
        admin_max_connections: usize, "N",
            default(listener_default(ListenerKind::Admin).max_connections), range(1..=1_000_000);
        /// An upgraded connection (WebSocket) or a response body with no bytes
        /// either way for this long is closed.
        stream_idle_timeout_s: u64, "SECONDS", default(60), range(1..=YEAR_S);
        /// An upgraded connection or a response body is closed this long after
        /// its response's headers, however busy.
        stream_max_lifetime_s: u64, "SECONDS", default(3600), range(1..=YEAR_S);
        /// Request line plus headers larger than this get 431.
        max_header_kb: u64, "KB", default(64), range(8..=1024);
        /// Isolates running at once; when full the least recently used idle one is evicted.
        max_isolates: usize, "N", default(1000), range(1..=100_000);
        /// V8 heap limit of each isolate.
        memory_limit_mb: u64, "MB", default(512), range(16..=65_536);
        /// Size bound of the on-disk layer and blob cache.
        cache_max_mb: u64, "MB", default(1024), range(1..=u64::MAX >> 20);
        /// Bound on built deployments' package sets no isolate uses.
        package_store_max_mb: u64, "MB", default(4096), range(1..=1024 * 1024);
        /// Size bound of the activity spool, where reports wait for their origin
        /// (oldest logs are dropped first; usage never).
        spool_max_mb: u64, "MB", default(64), range(1..=1024 * 1024);
        /// Log format.
        log_format: LogFormat, "FORMAT", default(LogFormat::Text);
        /// Give each isolate its own mount namespace and root: auto (when the
        /// runner may), on (refuse to start without), off.
        mount_namespace: Toggle, "MODE", default(Toggle::Auto);
        /// Confine each isolate's file system with Landlock: auto (when the
        /// kernel has it), on (refuse to start without), off.
        landlock: Toggle, "MODE", default(Toggle::Auto);
        /// The seccomp denylist on every isolate.
        seccomp: Switch, "MODE", default(Switch::On);
        /// Resource limits (open files, file size, core dumps, …) on every
        /// isolate.
        rlimits: Switch, "MODE", default(Switch::On);
        /// One uid every isolate runs as (shared: isolates are kept apart by
        /// the other layers alone), or off (the runner's own); needs a root
        /// runner. Excludes --isolate-uid-range.
        isolate_uid: UidChoice, "UID",
            shown("a uid per isolate from --isolate-uid-range when the runner is root, else off");
        /// The uids isolates run as, one per live isolate, never shared; the
        /// range must hold no real account, subordinate range (/etc/subuid) or
        /// other service's uid. Needs a root runner. Excludes --isolate-uid.
        isolate_uid_range: String, "FIRST-LAST", shown(format!("{} if root, else off", UidRange::DEFAULT));
        /// The gid isolates run as, shared by all (nothing of an isolate's is
        /// group-accessible).
        isolate_gid: u32, "GID", default(65534);
        /// Route isolates' outbound HTTP(S) through the runner's egress proxy
        /// (allow-list enforced again, bytes counted, loops bounded).
        egress_proxy: Switch, "MODE", default(Switch::On);
        /// Give each isolate its own network namespace where only the egress
        /// proxy listens, so raw TCP (`Deno.connect`, `Deno.listen`) cannot
        /// leave: auto (when the runner is root and --egress-proxy is on), on
        /// (refuse to start without), off.
        network_namespace: Toggle, "MODE", default(Toggle::Auto);
        /// An internal range (CIDR, e.g. 10.20.0.0/16) isolates may reach
        /// through the egress proxy, which otherwise refuses loopback, private,
        /// link-local, CGNAT and other internal addresses (repeatable).
        egress_allow_private: Vec<String>, "CIDR", default(Vec::new()), shown("none");
        /// A call that passed through more isolates of this cloud than this is a
        /// loop: 508 LOOP_DETECTED.
        max_hops: u32, "N", default(10), range(1..=100);
        /// How often usage of running isolates is reported to origins.
        usage_interval_s: u64, "SECONDS", default(10), range(1..=YEAR_S);
        /// Export a span per request and the tenants' console lines over
        /// OTLP/HTTP (protobuf) to this collector (e.g. http://collector:4318;
        /// /v1/traces and /v1/logs are appended). Best effort: when the
        /// collector is slow or down, records are dropped and counted.
        otlp_endpoint: String, "URL", shown("off");
        /// The `service.name` of everything exported over OTLP.
        otlp_service_name: String, "NAME", default("isocloud".into());
        /// The runner's own threads (tokio workers: listeners, proxying, the
        /// monitor). The isolates run in their own processes beside them: on
        /// a machine they keep busy, fewer runner threads compete with them
        /// for the cores; see docs/benchmarks.md.
        runtime_threads: usize, "N", shown("one per core"), range(1..=1024);
        /// Isolates kept started ahead of demand, per sandbox profile, so a cold
        /// boot skips deno's start; 0: none. Needs --mount-namespace on.
        prestarted_isolates: usize, "N", default(2), range(0..=64);
        /// Deno processes starting at once; other boots wait their turn, first
        /// come first served.
        max_concurrent_boots: usize, "N", shown(format!(
            "2 per core, at least 2, at most what half the available memory holds at {} MB a start",
            isocloud_pool::BOOT_MEMORY_BYTES >> 20
        )), range(1..=10_000);
        /// Boots waiting for their turn, at most; one more gets 503 CAPACITY
        /// with Retry-After.
        max_boot_queue: usize, "N",
            shown(format!("{BOOT_QUEUE_PER_CONCURRENT_BOOT} per concurrent boot")), range(0..=1_000_000);
        /// Isolates one tenant (a subhoster; a project of the control plane)
        /// may hold at once; at its cap its least recently used idle isolate is
        /// evicted, or its new boot gets 503 CAPACITY. All of --max-isolates in
        /// apps mode or with one subhoster, a quarter with the control plane.
        max_isolates_per_tenant: usize, "N",
            shown("--max-isolates shared by the tenants configured, up to 4"), range(1..=100_000);
    }

    /// `serve`'s own: a folder of apps, or the control plane.
    serve: ServeFlags {
        /// Dev mode: DIR/<name>/ is served at Host <name>.localhost, no control plane.
        apps: PathBuf, "DIR", shown("none (the control plane runs)");
        /// The control plane's data: database, blobs, admin token.
        data: PathBuf, "DIR", shown("$XDG_DATA_HOME/isocloud or ~/.local/share/isocloud");
        /// Keep the control plane's records in PostgreSQL (several control-plane nodes) instead of SQLite.
        database_url: String, "URL", shown("SQLite");
        /// Deployments are served at <project>-<id>.DOMAIN, production at <project>.DOMAIN.
        base_domain: String, "DOMAIN", default(control_plane::BASE_DOMAIN.into());
        /// The API (/api/v1) and dashboard listener.
        control_listen: String, "ADDR", default("127.0.0.1:8081".into());
        /// A public HTTPS listener; certificates are picked by SNI from the
        /// verified domains' own (uploaded or ACME). For `edge` too (fetched
        /// from the control plane).
        tls_listen: String, "ADDR", shown("off");
        /// The origin RPCs (boot, layer, read_tree, read_blob, report_activity)
        /// for `isocloud runner`s on other machines (their --rpc-root), every
        /// call signed with an --origin-secret key.
        origin_listen: String, "ADDR", shown("off");
        /// The origin listener's certificate chain (PEM, leaf first): with
        /// --origin-tls-key, the origin RPCs are served over TLS only (the
        /// runners' --rpc-root https://…). Read again when the file changes.
        origin_tls_cert: String, "PATH", shown("off");
        /// The key of --origin-tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
        origin_tls_key: String, "PATH", shown("off");
        /// A key runners sign their origin RPCs with, KID=SECRET (repeatable;
        /// the runner's --subhost-secret KID=SECRET; 32 bytes at least).
        origin_secret: Vec<String>, "KID=SECRET", default(Vec::new()), shown("none");
        /// An --origin-secret read from a file, KID=PATH (repeatable).
        origin_secret_file: Vec<String>, "KID=PATH", default(Vec::new()), shown("none");
        /// Connections one peer may hold on the control listener; 0: no cap.
        control_max_connections_per_peer: usize, "N",
            default(listener_default(ListenerKind::Control).max_connections_per_peer), range(0..=1_000_000);
        /// Connections the control listener holds at once.
        control_max_connections: usize, "N",
            default(listener_default(ListenerKind::Control).max_connections), range(1..=1_000_000);
        /// Keep logs this many hours.
        log_retention_h: u64, "HOURS", default(control_plane::LOG_RETENTION_H), range(1..=24 * 3650);
        /// Keep usage this many days.
        usage_retention_d: u64, "DAYS", default(control_plane::USAGE_RETENTION_D), range(1..=3650);
        /// The largest file a deployment may upload.
        max_blob_mb: u64, "MB", default(control_plane::MAX_BLOB_MB), range(1..=4096);
        /// Keep the control plane's blobs in an S3-compatible bucket,
        /// s3://BUCKET/PREFIX (several control-plane nodes share it), not in
        /// the data dir. The endpoint, region and credentials not set by the
        /// options below come from AWS_ENDPOINT_URL, AWS_REGION,
        /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and the other AWS_*).
        blob_store: String, "URL", shown("files in --data");
        /// The S3 service of --blob-store (Garage, MinIO, …); plain http only
        /// on loopback, elsewhere with AWS_ALLOW_HTTP=true.
        blob_store_endpoint: String, "URL", shown("$AWS_ENDPOINT_URL, else AWS");
        /// The region --blob-store's requests are signed for.
        blob_store_region: String, "REGION", shown("$AWS_REGION, else us-east-1");
        /// The access key id of --blob-store.
        blob_store_access_key_id: String, "ID", shown("$AWS_ACCESS_KEY_ID");
        /// A file holding the secret access key of --blob-store (kept off the
        /// command line).
        blob_store_secret_access_key_file: PathBuf, "PATH", shown("$AWS_SECRET_ACCESS_KEY");
        /// Delete a blob no deployment references this long after it was
        /// stored or last confirmed in use (at least twice --build-timeout-s).
        blob_gc_grace_s: u64, "SECONDS", default(control_plane::BLOB_GC_GRACE_S), range(60..=YEAR_S);
        /// The port domain verification fetches the HTTP token from.
        domain_verify_http_port: u16, "PORT", default(control_plane::DOMAIN_VERIFY_HTTP_PORT), range(1..=65535);
        /// The nameserver for domain verification (TXT records).
        dns_resolver: String, "ADDR", shown("the system's");
        /// Order certificates automatically (ACME, HTTP-01 answered by the
        /// public listener, or TLS-ALPN-01 by the TLS listener: see
        /// --acme-challenge) for verified domains without an uploaded one, with
        /// this contact address; setting it turns ACME on (the ACME servers'
        /// terms are agreed to on the operator's behalf).
        acme_email: String, "EMAIL", shown("none (ACME off)");
        /// The ACME server's directory URL (https; needs --acme-email).
        acme_directory: String, "URL", shown(isocloud_controlplane::LETS_ENCRYPT_DIRECTORY);
        /// A PEM file of extra roots trusted for the ACME server's own HTTPS,
        /// beside the public ones (a test CA such as Pebble's).
        acme_ca_file: PathBuf, "PEM", shown("none");
        /// How the ACME server checks a domain: http-01 (a token from the
        /// public listener, port 80) or tls-alpn-01 (a handshake with the TLS
        /// listener, port 443; needs --tls-listen) when only 443 is reachable.
        acme_challenge: AcmeChallenge, "TYPE", shown("http-01");
        /// Renew an automatic certificate this long before it expires (or when
        /// a third of its lifetime is left, if sooner).
        acme_renew_before_days: u64, "DAYS",
            default(isocloud_controlplane::DEFAULT_RENEW_BEFORE_DAYS), range(1..=365);
        /// The first retry after a failed order; each further failure doubles
        /// the wait, up to 6 hours.
        acme_retry_min_s: u64, "SECONDS", default(isocloud_controlplane::DEFAULT_RETRY_MIN_S), range(1..=21_600);
        /// Print the public URLs as this port instead of the listener's (behind a proxy or NAT).
        public_http_port: u16, "PORT", shown("the listener's");
        /// The JSR registry builds resolve jsr: imports from.
        jsr_registry: String, "URL", shown("https://jsr.io/");
        /// A build (deno install at deploy time) may take this long.
        build_timeout_s: u64, "SECONDS", default(300), range(5..=3600);
        /// A build's memory cgroup cap.
        build_memory_mb: u64, "MB", default(2048), range(64..=65_536);
        /// A host remote https: imports may also come from, beyond deno's default list (repeatable).
        build_allow_import: Vec<String>, "HOST", default(Vec::new()), shown("none");
    }

    /// `runner`'s own: the subhosters (`edge` takes the origin and a key).
    subhost: SubhostFlags {
        /// Default origin RPC root for subhosters (absolute http(s) URL ending
        /// in '/'); required. For `edge`: the control plane's --origin-listen,
        /// whose routing feed it follows.
        rpc_root: String, "URL", shown("none");
        /// Another node answering for --rpc-root (the control plane's other
        /// --origin-listen), tried in order when --rpc-root's connection
        /// cannot be made (repeatable).
        rpc_root_fallback: Vec<String>, "URL", default(Vec::new()), shown("none");
        /// A CA certificate bundle (PEM) an https --rpc-root or fallback's
        /// certificate may chain to, beside the public roots: the private CA
        /// of the control plane's --origin-tls-cert (repeatable).
        rpc_root_ca: Vec<String>, "PATH", default(Vec::new()), shown("none");
        /// The public listener's certificate chain (PEM, leaf first): with
        /// --tls-key, --listen speaks TLS only (edges name the runner
        /// https://…, relays connect over TLS). Read again when it changes.
        tls_cert: String, "PATH", shown("off");
        /// The key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
        tls_key: String, "PATH", shown("off");
        /// A subhoster's shared secret, KID=SECRET (repeatable). For `edge`:
        /// the one key it signs with (the runners' --subhost-secret, the
        /// control plane's --origin-secret).
        subhost_secret: Vec<String>, "KID=SECRET", default(Vec::new()), shown("none");
        /// A subhoster's shared secret read from a file, KID=PATH (repeatable).
        subhost_secret_file: Vec<String>, "KID=PATH", default(Vec::new()), shown("none");
        /// A prefix subhoster KID's tokens may aim their `rpc_root` claim at,
        /// KID=PREFIX (repeatable; per subhoster, never shared).
        allow_rpc_root: Vec<String>, "KID=PREFIX", default(Vec::new()), shown("none");
    }

    /// `edge`'s own: the runners it forwards to.
    edge: EdgeFlags {
        /// A runner the edge forwards to: its public listener, http://HOST:PORT
        /// (repeatable; at least one). Deployments are spread over them by
        /// rendezvous hashing of the deployment id.
        runner: Vec<String>, "URL", default(Vec::new()), shown("none");
        /// A file listing the runners instead, one URL per line (`#` comments):
        /// read again within a second of a change, so runners are added or
        /// taken out without restarting the edge (a list that does not read
        /// keeps the one before).
        runners_file: String, "PATH", shown("none");
        /// A CA certificate bundle (PEM) an https:// runner's certificate may
        /// chain to, beside the public roots: the private CA of the runners'
        /// --tls-cert (repeatable).
        runner_ca: Vec<String>, "PATH", default(Vec::new()), shown("none");
        /// Speak h2c to runners (HTTP/2 without TLS: one connection per runner
        /// carries every request); off: HTTP/1.1 keep-alive.
        runner_http2: Switch, "MODE", default(Switch::On);
        /// Idle HTTP/1.1 keep-alive connections kept per runner (WebSocket
        /// handshakes, and every request with --runner-http2 off).
        runner_max_idle: usize, "N", default(64), range(0..=100_000);
        /// How often each runner is checked (GET /healthz on its public
        /// listener, answered within this); out after 2 failed checks in a
        /// row, back after 2 passes.
        health_interval_ms: u64, "MS", default(1000), range(100..=60_000);
    }
}
