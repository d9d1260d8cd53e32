//! Command-line flags and the TOML config file: merged (flags win), then
//! validated once into [`Settings`]. Nothing else reads raw options.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use isocloud_auth::{Secret, Subhoster};
use isocloud_ingress::{BodyBound, ListenerBounds, ListenerKind};
use serde::Deserialize;
use url::Url;

#[derive(Parser, Debug)]
#[command(name = "isocloud", version, about = "A self-hostable isolate cloud: the runner and its embedded origins.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the built-in control plane (API, dashboard) and the runner it
    /// feeds; with --apps, serve a folder of apps instead (dev mode).
    Serve {
        #[command(flatten)]
        common: CommonFlags,
        /// Dev mode: DIR/<name>/ is served at Host <name>.localhost, no control plane.
        #[arg(long, value_name = "DIR")]
        apps: Option<PathBuf>,
        #[command(flatten)]
        control: Box<ControlPlaneFlags>,
    },
    /// Run as a subhosting runner: relays sign requests, origins describe deployments.
    Runner {
        #[command(flatten)]
        common: CommonFlags,
        #[command(flatten)]
        subhost: SubhostFlags,
    },
    /// The client commands that talk to a control plane (login, deploy, …).
    #[command(flatten)]
    Client(crate::client::ClientCommand),
}

#[derive(Args, Debug, Default)]
pub struct CommonFlags {
    /// TOML file with any of these options (flags win).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Public listener, e.g. 127.0.0.1:8080 (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin listener for /healthz and /metrics; off unless given.
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// The deno binary isolates run on.
    #[arg(long, value_name = "PATH")]
    pub deno: Option<PathBuf>,
    /// The npm registry builds, and ESZIPs' npm snapshots, take packages from [default: https://registry.npmjs.org/].
    #[arg(long, value_name = "URL")]
    pub npm_registry: Option<String>,
    /// Caches and isolate files [default: $XDG_STATE_HOME/isocloud or ~/.local/state/isocloud].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Terminate an isolate after this many seconds without requests [default: 300].
    #[arg(long, value_name = "SECONDS")]
    pub idle_timeout_s: Option<u64>,
    /// Give up on an isolate that does not serve within this time [default: 30].
    #[arg(long, value_name = "SECONDS")]
    pub boot_timeout_s: Option<u64>,
    /// Cut off an origin RPC after this time [default: 10].
    #[arg(long, value_name = "SECONDS")]
    pub origin_timeout_s: Option<u64>,
    /// On SIGTERM/SIGINT, let in-flight requests finish for this long [default: 10].
    #[arg(long, value_name = "SECONDS")]
    pub drain_timeout_s: Option<u64>,
    /// CPU time each request may use, measured by the kernel [default: 50].
    #[arg(long, value_name = "MS")]
    pub cpu_limit_ms: Option<u64>,
    /// Wall-clock limit from forwarding a request to its response's headers [default: 60].
    #[arg(long, value_name = "SECONDS")]
    pub request_timeout_s: Option<u64>,
    /// Request bodies larger than this get 413 [default: 100].
    #[arg(long, value_name = "MB")]
    pub max_request_body_mb: Option<u64>,
    /// A client must send its request head within this time, on every
    /// listener: from the connection's accept (TLS handshake included) or
    /// its last response's end [default: 10].
    #[arg(long, value_name = "SECONDS")]
    pub header_timeout_s: Option<u64>,
    /// A request body on the control and admin listeners must arrive within
    /// this of its head, plus 1 s per --min-body-rate-kb-s received [default: 30].
    #[arg(long, value_name = "SECONDS")]
    pub body_timeout_s: Option<u64>,
    /// The slowest rate a request body on the control and admin listeners
    /// may keep up after --body-timeout-s; 0: the timeout is the whole
    /// body's [default: 16].
    #[arg(long, value_name = "KB")]
    pub min_body_rate_kb_s: Option<u64>,
    /// Connections one peer (an IPv4 address, an IPv6 /64) may hold on each
    /// public listener (HTTP, TLS); one more is closed at once; 0: no cap.
    /// Behind a relay or CDN, raise it [default: 256].
    #[arg(long, value_name = "N")]
    pub max_connections_per_peer: Option<usize>,
    /// Connections each public listener (HTTP, TLS) holds at once; one more
    /// is closed at once [default: 16384].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Connections one peer may hold on the admin listener; 0: no cap [default: 16].
    #[arg(long, value_name = "N")]
    pub admin_max_connections_per_peer: Option<usize>,
    /// Connections the admin listener holds at once [default: 64].
    #[arg(long, value_name = "N")]
    pub admin_max_connections: Option<usize>,
    /// An upgraded connection (WebSocket) or a response body with no bytes
    /// either way for this long is closed [default: 60].
    #[arg(long, value_name = "SECONDS")]
    pub stream_idle_timeout_s: Option<u64>,
    /// An upgraded connection or a response body is closed this long after
    /// its response's headers, however busy [default: 3600].
    #[arg(long, value_name = "SECONDS")]
    pub stream_max_lifetime_s: Option<u64>,
    /// Request line plus headers larger than this get 431 [default: 64].
    #[arg(long, value_name = "KB")]
    pub max_header_kb: Option<u64>,
    /// Isolates running at once; when full the least recently used idle one is evicted [default: 1000].
    #[arg(long, value_name = "N")]
    pub max_isolates: Option<usize>,
    /// V8 heap limit of each isolate [default: 512].
    #[arg(long, value_name = "MB")]
    pub memory_limit_mb: Option<u64>,
    /// Size bound of the on-disk layer and blob cache [default: 1024].
    #[arg(long, value_name = "MB")]
    pub cache_max_mb: Option<u64>,
    /// Bound on built deployments' package sets no isolate uses [default: 4096].
    #[arg(long, value_name = "MB")]
    pub package_store_max_mb: Option<u64>,
    /// Size bound of the activity spool, where reports wait for their origin
    /// (oldest logs are dropped first; usage never) [default: 64].
    #[arg(long, value_name = "MB")]
    pub spool_max_mb: Option<u64>,
    /// Log format: text or json [default: text].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Give each isolate its own mount namespace and root: auto (when the
    /// runner may), on (refuse to start without), off [default: auto].
    #[arg(long, value_name = "MODE")]
    pub mount_namespace: Option<String>,
    /// Confine each isolate's file system with Landlock: auto (when the
    /// kernel has it), on (refuse to start without), off [default: auto].
    #[arg(long, value_name = "MODE")]
    pub landlock: Option<String>,
    /// The seccomp denylist on every isolate: on or off [default: on].
    #[arg(long, value_name = "MODE")]
    pub seccomp: Option<String>,
    /// Resource limits (open files, file size, core dumps, …) on every
    /// isolate: on or off [default: on].
    #[arg(long, value_name = "MODE")]
    pub rlimits: Option<String>,
    /// One uid every isolate runs as (shared: isolates are kept apart by
    /// the other layers alone), or off (the runner's own); needs a root
    /// runner. Excludes --isolate-uid-range [default: a uid per isolate from
    /// --isolate-uid-range when the runner is root, else off].
    #[arg(long, value_name = "UID")]
    pub isolate_uid: Option<String>,
    /// The uids isolates run as, one per live isolate, never shared; the
    /// range must hold no real account, subordinate range (/etc/subuid) or
    /// other service's uid. Needs a root runner. Excludes --isolate-uid
    /// [default: 1900000000-1900099999].
    #[arg(long, value_name = "FIRST-LAST")]
    pub isolate_uid_range: Option<String>,
    /// The gid isolates run as, shared by all (nothing of an isolate's is
    /// group-accessible) [default: 65534].
    #[arg(long, value_name = "GID")]
    pub isolate_gid: Option<u32>,
    /// Route isolates' outbound HTTP(S) through the runner's egress proxy
    /// (allow-list enforced again, bytes counted, loops bounded): on or off
    /// [default: on].
    #[arg(long, value_name = "MODE")]
    pub egress_proxy: Option<String>,
    /// Give each isolate its own network namespace where only the egress
    /// proxy listens, so raw TCP (`Deno.connect`, `Deno.listen`) cannot
    /// leave: auto (when the runner is root and --egress-proxy is on), on
    /// (refuse to start without), off [default: auto].
    #[arg(long, value_name = "MODE")]
    pub network_namespace: Option<String>,
    /// An internal range (CIDR, e.g. 10.20.0.0/16) isolates may reach
    /// through the egress proxy, which otherwise refuses loopback, private,
    /// link-local, CGNAT and other internal addresses (repeatable).
    #[arg(long, value_name = "CIDR")]
    pub egress_allow_private: Vec<String>,
    /// A call that passed through more isolates of this cloud than this is a
    /// loop: 508 LOOP_DETECTED [default: 10].
    #[arg(long, value_name = "N")]
    pub max_hops: Option<u32>,
    /// How often usage of running isolates is reported to origins [default: 10].
    #[arg(long, value_name = "SECONDS")]
    pub usage_interval_s: Option<u64>,
    /// Isolates kept started ahead of demand, per sandbox profile, so a cold
    /// boot skips deno's start; 0: none. Needs --mount-namespace on [default: 2].
    #[arg(long, value_name = "N")]
    pub prestarted_isolates: Option<usize>,
    /// Deno processes starting at once; other boots wait their turn, first
    /// come first served [default: 2 per core, at least 2, at most what half
    /// the available memory holds at 64 MB a start].
    #[arg(long, value_name = "N")]
    pub max_concurrent_boots: Option<usize>,
    /// Boots waiting for their turn, at most; one more gets 503 CAPACITY
    /// with Retry-After [default: 64 per concurrent boot].
    #[arg(long, value_name = "N")]
    pub max_boot_queue: Option<usize>,
    /// Isolates one tenant (a subhoster; a project of the control plane)
    /// may hold at once; at its cap its least recently used idle isolate is
    /// evicted, or its new boot gets 503 CAPACITY [default: --max-isolates
    /// shared by the tenants configured, up to 4: all of it in apps mode or
    /// with one subhoster, a quarter with the control plane].
    #[arg(long, value_name = "N")]
    pub max_isolates_per_tenant: Option<usize>,
}

#[derive(Args, Debug, Default)]
pub struct ControlPlaneFlags {
    /// The control plane's data: database, blobs, admin token [default: $XDG_DATA_HOME/isocloud or ~/.local/share/isocloud].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Keep the control plane's records in PostgreSQL (several control-plane nodes) instead of SQLite.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// Deployments are served at <project>-<id>.DOMAIN, production at <project>.DOMAIN [default: localhost].
    #[arg(long, value_name = "DOMAIN")]
    pub base_domain: Option<String>,
    /// The API (/api/v1) and dashboard listener [default: 127.0.0.1:8081].
    #[arg(long, value_name = "ADDR")]
    pub control_listen: Option<String>,
    /// A public HTTPS listener; certificates are picked by SNI from the domains' uploaded ones.
    #[arg(long, value_name = "ADDR")]
    pub tls_listen: Option<String>,
    /// Connections one peer may hold on the control listener; 0: no cap [default: 64].
    #[arg(long, value_name = "N")]
    pub control_max_connections_per_peer: Option<usize>,
    /// Connections the control listener holds at once [default: 1024].
    #[arg(long, value_name = "N")]
    pub control_max_connections: Option<usize>,
    /// Keep logs this many hours [default: 72].
    #[arg(long, value_name = "HOURS")]
    pub log_retention_h: Option<u64>,
    /// Keep usage this many days [default: 30].
    #[arg(long, value_name = "DAYS")]
    pub usage_retention_d: Option<u64>,
    /// The largest file a deployment may upload [default: 64].
    #[arg(long, value_name = "MB")]
    pub max_blob_mb: Option<u64>,
    /// The port domain verification fetches the HTTP token from [default: 80].
    #[arg(long, value_name = "PORT")]
    pub domain_verify_http_port: Option<u16>,
    /// The nameserver for domain verification (TXT records) [default: the system's].
    #[arg(long, value_name = "ADDR")]
    pub dns_resolver: Option<String>,
    /// Print the public URLs as this port instead of the listener's (behind a proxy or NAT).
    #[arg(long, value_name = "PORT")]
    pub public_http_port: Option<u16>,
    /// The JSR registry builds resolve jsr: imports from [default: https://jsr.io/].
    #[arg(long, value_name = "URL")]
    pub jsr_registry: Option<String>,
    /// A build (deno install at deploy time) may take this long [default: 300].
    #[arg(long, value_name = "SECONDS")]
    pub build_timeout_s: Option<u64>,
    /// A build's memory cgroup cap [default: 2048].
    #[arg(long, value_name = "MB")]
    pub build_memory_mb: Option<u64>,
    /// A host remote https: imports may also come from, beyond deno's default list (repeatable).
    #[arg(long, value_name = "HOST")]
    pub build_allow_import: Vec<String>,
}

#[derive(Args, Debug, Default)]
pub struct SubhostFlags {
    /// Default origin RPC root for subhosters (absolute http(s) URL ending in '/').
    #[arg(long, value_name = "URL")]
    pub rpc_root: Option<String>,
    /// A subhoster's shared secret, KID=SECRET (repeatable).
    #[arg(long, value_name = "KID=SECRET")]
    pub subhost_secret: Vec<String>,
    /// A subhoster's shared secret read from a file, KID=PATH (repeatable).
    #[arg(long, value_name = "KID=PATH")]
    pub subhost_secret_file: Vec<String>,
    /// A prefix subhoster KID's tokens may aim their `rpc_root` claim at,
    /// KID=PREFIX (repeatable; per subhoster, never shared).
    #[arg(long, value_name = "KID=PREFIX")]
    pub allow_rpc_root: Vec<String>,
}

/// The TOML file: the same options as the flags, snake_case.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    deno: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    idle_timeout_s: Option<u64>,
    boot_timeout_s: Option<u64>,
    origin_timeout_s: Option<u64>,
    drain_timeout_s: Option<u64>,
    memory_limit_mb: Option<u64>,
    cpu_limit_ms: Option<u64>,
    request_timeout_s: Option<u64>,
    max_isolates: Option<usize>,
    max_request_body_mb: Option<u64>,
    max_header_kb: Option<u64>,
    header_timeout_s: Option<u64>,
    body_timeout_s: Option<u64>,
    min_body_rate_kb_s: Option<u64>,
    max_connections_per_peer: Option<usize>,
    max_connections: Option<usize>,
    admin_max_connections_per_peer: Option<usize>,
    admin_max_connections: Option<usize>,
    control_max_connections_per_peer: Option<usize>,
    control_max_connections: Option<usize>,
    stream_idle_timeout_s: Option<u64>,
    stream_max_lifetime_s: Option<u64>,
    cache_max_mb: Option<u64>,
    package_store_max_mb: Option<u64>,
    spool_max_mb: Option<u64>,
    log_format: Option<String>,
    mount_namespace: Option<String>,
    landlock: Option<String>,
    seccomp: Option<String>,
    rlimits: Option<String>,
    isolate_uid: Option<UidValue>,
    isolate_uid_range: Option<String>,
    isolate_gid: Option<u32>,
    egress_proxy: Option<String>,
    network_namespace: Option<String>,
    #[serde(default)]
    egress_allow_private: Vec<String>,
    max_hops: Option<u32>,
    usage_interval_s: Option<u64>,
    prestarted_isolates: Option<usize>,
    max_concurrent_boots: Option<usize>,
    max_boot_queue: Option<usize>,
    max_isolates_per_tenant: Option<usize>,
    apps: Option<PathBuf>,
    data: Option<PathBuf>,
    database_url: Option<String>,
    base_domain: Option<String>,
    control_listen: Option<String>,
    tls_listen: Option<String>,
    log_retention_h: Option<u64>,
    usage_retention_d: Option<u64>,
    max_blob_mb: Option<u64>,
    domain_verify_http_port: Option<u16>,
    dns_resolver: Option<String>,
    public_http_port: Option<u16>,
    npm_registry: Option<String>,
    jsr_registry: Option<String>,
    build_timeout_s: Option<u64>,
    build_memory_mb: Option<u64>,
    #[serde(default)]
    build_allow_import: Vec<String>,
    rpc_root: Option<String>,
    #[serde(default)]
    subhost_secret: Vec<String>,
    #[serde(default)]
    subhost_secret_file: Vec<String>,
    #[serde(default)]
    allow_rpc_root: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid setting `{field}`: {message}")]
pub struct SettingsError {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> SettingsError {
    SettingsError { field, message: message.into() }
}

/// `isolate_uid` in the TOML file: a number or `"off"`.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum UidValue {
    Id(u32),
    Text(String),
}

/// Who isolates run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsolateUid {
    /// A uid per isolate from the default range when the runner is root,
    /// else the runner's own uid.
    Auto,
    Off,
    /// One uid, shared by every isolate.
    Id(u32),
    /// A uid per live isolate from this range.
    Range(isocloud_sandbox::UidRange),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toggle {
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

pub enum Mode {
    Apps(PathBuf),
    Subhost(Vec<Subhoster>),
    ControlPlane(Box<ControlPlaneSettings>),
}

/// The built-in control plane of `isocloud serve`.
#[derive(Debug, Clone)]
pub struct ControlPlaneSettings {
    pub data_dir: PathBuf,
    /// A credential (it may carry a password): never logged.
    pub database_url: Option<String>,
    pub base_domain: String,
    pub control_listen: SocketAddr,
    pub tls_listen: Option<SocketAddr>,
    pub log_retention: Duration,
    pub usage_retention: Duration,
    pub max_blob_bytes: u64,
    pub domain_verify_http_port: u16,
    pub dns_resolver: Option<SocketAddr>,
    /// `None`: the public listener's own port.
    pub public_http_port: Option<u16>,
}

/// The build step's settings (`serve`: the control plane's deployments, or
/// apps mode's folders).
#[derive(Debug, Clone)]
pub struct BuildSettings {
    /// `None`: the public registries.
    pub npm_registry: Option<url::Url>,
    pub jsr_registry: Option<url::Url>,
    pub timeout: Duration,
    pub memory_limit_bytes: u64,
    pub allow_import: Vec<String>,
}

/// Validated settings: the only form the rest of the binary sees.
pub struct Settings {
    pub mode: Mode,
    /// `serve`'s build step (the control plane's deployments, apps mode).
    pub build: BuildSettings,
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub deno: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub idle_timeout: Duration,
    pub boot_timeout: Duration,
    pub origin_timeout: Duration,
    pub drain_timeout: Duration,
    pub memory_limit_mb: u64,
    pub cpu_limit_ms: u64,
    pub request_timeout: Duration,
    pub max_isolates: usize,
    pub max_request_body_bytes: usize,
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    /// Every listener's head timeout, body bound and connection caps.
    pub listeners: ListenerBoundsSet,
    /// No byte either way through an upgraded connection or a response body
    /// for this long: closed.
    pub stream_idle_timeout: Duration,
    /// An upgraded connection or a response body lasts at most this long.
    pub stream_max_lifetime: Duration,
    pub cache_max_bytes: u64,
    pub package_store_max_bytes: u64,
    pub spool_max_bytes: u64,
    pub log_format: LogFormat,
    pub mount_namespace: Toggle,
    pub landlock: Toggle,
    pub seccomp: bool,
    pub rlimits: bool,
    pub isolate_uid: IsolateUid,
    pub isolate_gid: u32,
    pub egress_proxy: bool,
    /// Auto: on when the runner can make one (root) and the egress proxy is on.
    pub network_namespace: Toggle,
    /// Internal ranges the egress proxy may reach.
    pub egress_allow_private: Vec<isocloud_egress::Cidr>,
    pub max_hops: u32,
    pub usage_interval: Duration,
    pub prestarted_isolates: usize,
    /// `None`: from the machine ([`isocloud_pool::default_concurrency`]).
    pub max_concurrent_boots: Option<usize>,
    /// `None`: [`BOOT_QUEUE_PER_CONCURRENT_BOOT`] per concurrent boot.
    pub max_boot_queue: Option<usize>,
    pub max_isolates_per_tenant: usize,
}

/// The bounds of each listener the runner may open (the control plane's
/// only in `serve`'s control-plane mode, the admin one only with
/// `--admin-listen`): the one place they are configured.
#[derive(Debug, Clone)]
pub struct ListenerBoundsSet {
    pub public: ListenerBounds,
    pub tls: ListenerBounds,
    pub control: ListenerBounds,
    pub admin: ListenerBounds,
}

/// A listener's caps as given (flag over file): per peer, in all.
type GivenCaps = (Option<usize>, Option<usize>);

/// The listeners' bounds from what was given (flags over file) and
/// `isocloud_ingress::LISTENER_DEFAULTS`, validated.
fn listener_bounds(
    header_timeout: Duration,
    body_timeout_s: Option<u64>,
    min_body_rate_kb_s: Option<u64>,
    [public, control, admin]: [GivenCaps; 3],
) -> Result<ListenerBoundsSet, SettingsError> {
    let body_timeout_s =
        within("body_timeout_s", body_timeout_s.unwrap_or(isocloud_ingress::DEFAULT_BODY_TIMEOUT_S), 1..=3600)?;
    let min_body_rate_kb_s = within(
        "min_body_rate_kb_s",
        min_body_rate_kb_s.unwrap_or(isocloud_ingress::DEFAULT_MIN_BODY_RATE_KB_S),
        0..=1024 * 1024,
    )?;
    let body =
        BodyBound { timeout: Duration::from_secs(body_timeout_s), min_rate_bytes_per_s: min_body_rate_kb_s * 1024 };
    let caps = |kind: ListenerKind, (per_peer, total): GivenCaps| -> Result<ListenerBounds, SettingsError> {
        let (per_peer_field, total_field) = match kind {
            ListenerKind::Public | ListenerKind::Tls => ("max_connections_per_peer", "max_connections"),
            ListenerKind::Control => ("control_max_connections_per_peer", "control_max_connections"),
            ListenerKind::Admin => ("admin_max_connections_per_peer", "admin_max_connections"),
        };
        let mut bounds = ListenerBounds::defaults(kind, header_timeout, body);
        if let Some(n) = per_peer {
            bounds.max_connections_per_peer = within(per_peer_field, n, 0..=1_000_000)?;
        }
        if let Some(n) = total {
            bounds.max_connections = within(total_field, n, 1..=1_000_000)?;
        }
        if bounds.max_connections_per_peer > bounds.max_connections {
            return Err(invalid(
                per_peer_field,
                format!(
                    "{} is more than {total_field} ({}): it could never apply (0 turns it off)",
                    bounds.max_connections_per_peer, bounds.max_connections
                ),
            ));
        }
        Ok(bounds)
    };
    Ok(ListenerBoundsSet {
        public: caps(ListenerKind::Public, public)?,
        tls: caps(ListenerKind::Tls, public)?,
        control: caps(ListenerKind::Control, control)?,
        admin: caps(ListenerKind::Admin, admin)?,
    })
}

/// The default boot queue per concurrent boot: the last in line waits about
/// this many boot times (a few seconds), well inside the request timeout
/// that bounds a wait; past it a client is better told to retry.
pub const BOOT_QUEUE_PER_CONCURRENT_BOOT: usize = 64;

/// The default per-tenant cap: `max_isolates` shared by the tenants known
/// at start (`None`: open-ended, the control plane's projects), counted up
/// to four. One tenant (apps mode, one subhoster) may use every slot; with
/// two, each half; with four or more, each a quarter. Busy together, the
/// tenants' caps add up to the whole runner; alone, one cannot hold the rest.
pub fn default_max_isolates_per_tenant(max_isolates: usize, tenants: Option<usize>) -> usize {
    (max_isolates / tenants.unwrap_or(4).clamp(1, 4)).max(1)
}

impl Settings {
    pub fn from_cli(command: Command) -> Result<Self, SettingsError> {
        let (common, apps, subhost, control) = match command {
            Command::Serve { common, apps, control } => (common, Some(apps), None, Some(control)),
            Command::Runner { common, subhost } => (common, None, Some(subhost), None),
            // main.rs dispatches client commands before settings are built.
            Command::Client(_) => return Err(invalid("command", "a client command has no runner settings")),
        };
        let file = match &common.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        // `serve` without an apps folder runs the control plane.
        let apps_given = matches!(apps, Some(Some(_))) || (apps.is_some() && file.apps.is_some());
        let control_flags_given =
            control.as_ref().is_some_and(|c| c.data.is_some() || c.database_url.is_some() || c.tls_listen.is_some());
        let build = build_settings(common.npm_registry.clone(), control.as_deref(), &file)?;
        let control_caps =
            control.as_ref().map_or((None, None), |c| (c.control_max_connections_per_peer, c.control_max_connections));
        let mut control_plane = match control {
            Some(control) if !apps_given => Some(control_plane_settings(*control, &file)?),
            _ => None,
        };
        let listen = parse_addr("listen", common.listen.or(file.listen).as_deref().unwrap_or("127.0.0.1:8080"))?;
        let admin_listen =
            common.admin_listen.or(file.admin_listen).map(|a| parse_addr("admin_listen", &a)).transpose()?;
        let seconds = |field: &'static str, flag: Option<u64>, file: Option<u64>, default: u64, min: u64| {
            within(field, flag.or(file).unwrap_or(default), min..=86_400 * 365).map(Duration::from_secs)
        };
        let idle_timeout = seconds("idle_timeout_s", common.idle_timeout_s, file.idle_timeout_s, 300, 1)?;
        let boot_timeout = seconds("boot_timeout_s", common.boot_timeout_s, file.boot_timeout_s, 30, 1)?;
        let origin_timeout = seconds("origin_timeout_s", common.origin_timeout_s, file.origin_timeout_s, 10, 1)?;
        let drain_timeout = seconds("drain_timeout_s", common.drain_timeout_s, file.drain_timeout_s, 10, 0)?;
        let memory_limit_mb =
            within("memory_limit_mb", common.memory_limit_mb.or(file.memory_limit_mb).unwrap_or(512), 16..=65_536)?;
        let cpu_limit_ms =
            within("cpu_limit_ms", common.cpu_limit_ms.or(file.cpu_limit_ms).unwrap_or(50), 1..=600_000)?;
        let request_timeout = seconds("request_timeout_s", common.request_timeout_s, file.request_timeout_s, 60, 1)?;
        let max_isolates =
            within("max_isolates", common.max_isolates.or(file.max_isolates).unwrap_or(1000), 1..=100_000)?;
        let max_concurrent_boots = common
            .max_concurrent_boots
            .or(file.max_concurrent_boots)
            .map(|n| within("max_concurrent_boots", n, 1..=10_000))
            .transpose()?;
        let max_boot_queue = common
            .max_boot_queue
            .or(file.max_boot_queue)
            .map(|n| within("max_boot_queue", n, 0..=1_000_000))
            .transpose()?;
        let max_isolates_per_tenant = common
            .max_isolates_per_tenant
            .or(file.max_isolates_per_tenant)
            .map(|n| within("max_isolates_per_tenant", n, 1..=100_000))
            .transpose()?;
        let max_request_body_mb = within(
            "max_request_body_mb",
            common.max_request_body_mb.or(file.max_request_body_mb).unwrap_or(100),
            1..=65_536,
        )?;
        let header_timeout = seconds("header_timeout_s", common.header_timeout_s, file.header_timeout_s, 10, 1)?;
        let listeners = listener_bounds(
            header_timeout,
            common.body_timeout_s.or(file.body_timeout_s),
            common.min_body_rate_kb_s.or(file.min_body_rate_kb_s),
            [
                (
                    common.max_connections_per_peer.or(file.max_connections_per_peer),
                    common.max_connections.or(file.max_connections),
                ),
                (
                    control_caps.0.or(file.control_max_connections_per_peer),
                    control_caps.1.or(file.control_max_connections),
                ),
                (
                    common.admin_max_connections_per_peer.or(file.admin_max_connections_per_peer),
                    common.admin_max_connections.or(file.admin_max_connections),
                ),
            ],
        )?;
        // Idle 60 s: what nginx (proxy_read_timeout) and AWS load balancers
        // allow by default, so clients already ping inside it (WebSocket
        // libraries every 20–30 s, SSE keep-alive comments). Lifetime 1 h: a
        // busy stream keeps its isolate's slot, so it must end some time;
        // an hour outlasts any download or session a client would not
        // resume anyway (AWS API Gateway allows 2 h).
        let stream_idle_timeout =
            seconds("stream_idle_timeout_s", common.stream_idle_timeout_s, file.stream_idle_timeout_s, 60, 1)?;
        let stream_max_lifetime =
            seconds("stream_max_lifetime_s", common.stream_max_lifetime_s, file.stream_max_lifetime_s, 3600, 1)?;
        if stream_idle_timeout > stream_max_lifetime {
            return Err(invalid(
                "stream_idle_timeout_s",
                format!(
                    "{} s is longer than stream_max_lifetime_s ({} s): a stream could never idle out",
                    stream_idle_timeout.as_secs(),
                    stream_max_lifetime.as_secs()
                ),
            ));
        }
        let max_header_kb =
            within("max_header_kb", common.max_header_kb.or(file.max_header_kb).unwrap_or(64), 8..=1024)?;
        let package_store_max_mb = within(
            "package_store_max_mb",
            common.package_store_max_mb.or(file.package_store_max_mb).unwrap_or(4096),
            1..=1024 * 1024,
        )?;
        let cache_max_mb = common.cache_max_mb.or(file.cache_max_mb).unwrap_or(1024);
        if cache_max_mb == 0 {
            return Err(invalid("cache_max_mb", "must be at least 1"));
        }
        let spool_max_mb =
            within("spool_max_mb", common.spool_max_mb.or(file.spool_max_mb).unwrap_or(64), 1..=1_048_576)?;
        let log_format = match common.log_format.or(file.log_format).as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(invalid("log_format", format!("{other:?} is neither \"text\" nor \"json\""))),
        };
        let mount_namespace = match common.mount_namespace.or(file.mount_namespace).as_deref().unwrap_or("auto") {
            "auto" => Toggle::Auto,
            "on" => Toggle::On,
            "off" => Toggle::Off,
            other => return Err(invalid("mount_namespace", format!("{other:?} is not auto, on or off"))),
        };
        let landlock = match common.landlock.or(file.landlock).as_deref().unwrap_or("auto") {
            "auto" => Toggle::Auto,
            "on" => Toggle::On,
            "off" => Toggle::Off,
            other => return Err(invalid("landlock", format!("{other:?} is not auto, on or off"))),
        };
        let seccomp = on_off("seccomp", common.seccomp.or(file.seccomp), true)?;
        let rlimits = on_off("rlimits", common.rlimits.or(file.rlimits), true)?;
        let egress_proxy = on_off("egress_proxy", common.egress_proxy.or(file.egress_proxy), true)?;
        let network_namespace = match common.network_namespace.or(file.network_namespace).as_deref().unwrap_or("auto") {
            "auto" => Toggle::Auto,
            "on" => Toggle::On,
            "off" => Toggle::Off,
            other => return Err(invalid("network_namespace", format!("{other:?} is not auto, on or off"))),
        };
        if network_namespace == Toggle::On && !egress_proxy {
            return Err(invalid(
                "network_namespace",
                "--network-namespace on needs --egress-proxy on: the proxy is the isolates' only way out",
            ));
        }
        let egress_allow_private = pick(common.egress_allow_private, file.egress_allow_private)
            .iter()
            .map(|text| {
                text.trim()
                    .parse()
                    .map_err(|e: isocloud_egress::CidrError| invalid("egress_allow_private", e.to_string()))
            })
            .collect::<Result<Vec<isocloud_egress::Cidr>, _>>()?;
        if !egress_allow_private.is_empty() && !egress_proxy {
            return Err(invalid(
                "egress_allow_private",
                "the ranges are the egress proxy's rule: it needs --egress-proxy on",
            ));
        }
        let max_hops = within("max_hops", common.max_hops.or(file.max_hops).unwrap_or(10), 1..=100)?;
        let usage_interval = seconds("usage_interval_s", common.usage_interval_s, file.usage_interval_s, 10, 1)?;
        let prestarted_isolates = within(
            "prestarted_isolates",
            common.prestarted_isolates.or(file.prestarted_isolates).unwrap_or(2),
            0..=64,
        )?;
        // The flags, if either is given, else the file's: a uid from one
        // source never meets a range from the other.
        let (uid_text, uid_range) = if common.isolate_uid.is_some() || common.isolate_uid_range.is_some() {
            (common.isolate_uid, common.isolate_uid_range)
        } else {
            let uid = file.isolate_uid.map(|v| match v {
                UidValue::Id(id) => id.to_string(),
                UidValue::Text(text) => text,
            });
            (uid, file.isolate_uid_range.clone())
        };
        let isolate_uid = match (uid_text.as_deref(), uid_range.as_deref()) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "isolate_uid_range",
                    "--isolate-uid and --isolate-uid-range exclude each other: one uid shared by every isolate, \
                     or a uid per isolate from the range",
                ));
            }
            (None, Some(text)) => {
                IsolateUid::Range(isocloud_sandbox::UidRange::parse(text).map_err(|e| invalid("isolate_uid_range", e))?)
            }
            (None, None) => IsolateUid::Auto,
            (Some("off"), None) => IsolateUid::Off,
            (Some(text), None) => IsolateUid::Id(parse_id("isolate_uid", text)?),
        };
        let isolate_gid = match common.isolate_gid.or(file.isolate_gid) {
            Some(gid) => parse_id("isolate_gid", &gid.to_string())?,
            None => 65534,
        };
        let state_dir = match common.state_dir.or(file.state_dir) {
            Some(dir) => dir,
            None => default_state_dir()
                .ok_or_else(|| invalid("state_dir", "no $XDG_STATE_HOME or $HOME; pass --state-dir"))?,
        };

        let mode = match (apps, subhost) {
            (Some(_), _) if let Some(control) = control_plane.take() => {
                if !file.subhost_secret.is_empty() || !file.subhost_secret_file.is_empty() || file.rpc_root.is_some() {
                    return Err(invalid(
                        "subhost_secret",
                        "subhosting options belong to `isocloud runner`, not `serve`",
                    ));
                }
                Mode::ControlPlane(Box::new(control))
            }
            (Some(apps), _) => {
                let dir = apps.or(file.apps).expect("one of them, or the control plane's arm above");
                if control_flags_given {
                    return Err(invalid(
                        "apps",
                        "--apps serves a folder without the control plane: drop --data, --database-url and --tls-listen",
                    ));
                }
                if !dir.is_dir() {
                    return Err(invalid("apps", format!("{} is not a directory", dir.display())));
                }
                if !file.subhost_secret.is_empty() || !file.subhost_secret_file.is_empty() || file.rpc_root.is_some() {
                    return Err(invalid(
                        "subhost_secret",
                        "subhosting options belong to `isocloud runner`, not `serve`",
                    ));
                }
                Mode::Apps(dir.canonicalize().map_err(|e| invalid("apps", e.to_string()))?)
            }
            (None, Some(flags)) => {
                if file.apps.is_some() {
                    return Err(invalid("apps", "`apps` belongs to `isocloud serve`, not `runner`"));
                }
                let rpc_root = flags.rpc_root.or(file.rpc_root).ok_or_else(|| {
                    invalid("rpc_root", "runner needs --rpc-root URL (or `rpc_root` in the config file)")
                })?;
                let rpc_root = parse_rpc_root(&rpc_root)?;
                let secrets = pick(flags.subhost_secret, file.subhost_secret);
                let secret_files = pick(flags.subhost_secret_file, file.subhost_secret_file);
                let allowed = pick(flags.allow_rpc_root, file.allow_rpc_root);
                Mode::Subhost(subhosters(&rpc_root, &secrets, &secret_files, &allowed)?)
            }
            (None, None) => unreachable!("clap makes every command one of the two"),
        };
        let max_isolates_per_tenant = max_isolates_per_tenant.unwrap_or_else(|| {
            let tenants = match &mode {
                Mode::Apps(_) => Some(1),
                Mode::Subhost(subhosters) => Some(subhosters.len()),
                Mode::ControlPlane(_) => None,
            };
            default_max_isolates_per_tenant(max_isolates, tenants)
        });
        Ok(Settings {
            mode,
            build,
            listen,
            admin_listen,
            deno: common.deno.or(file.deno),
            state_dir,
            idle_timeout,
            boot_timeout,
            origin_timeout,
            drain_timeout,
            memory_limit_mb,
            cpu_limit_ms,
            request_timeout,
            max_isolates,
            max_request_body_bytes: (max_request_body_mb * 1024 * 1024) as usize,
            max_header_bytes: (max_header_kb * 1024) as usize,
            header_timeout,
            listeners,
            stream_idle_timeout,
            stream_max_lifetime,
            cache_max_bytes: cache_max_mb * 1024 * 1024,
            package_store_max_bytes: package_store_max_mb * 1024 * 1024,
            spool_max_bytes: spool_max_mb * 1024 * 1024,
            log_format,
            mount_namespace,
            landlock,
            seccomp,
            rlimits,
            isolate_uid,
            isolate_gid,
            egress_proxy,
            network_namespace,
            egress_allow_private,
            max_hops,
            usage_interval,
            prestarted_isolates,
            max_concurrent_boots,
            max_boot_queue,
            max_isolates_per_tenant,
        })
    }
}

/// A switch, `default` unless the operator says otherwise.
fn on_off(field: &'static str, value: Option<String>, default: bool) -> Result<bool, SettingsError> {
    match value.as_deref() {
        None => Ok(default),
        Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(other) => Err(invalid(field, format!("{other:?} is neither \"on\" nor \"off\""))),
    }
}

/// An isolate uid or gid: never root's, never the "no id" value.
fn parse_id(field: &'static str, text: &str) -> Result<u32, SettingsError> {
    let id: u32 = text.parse().map_err(|_| invalid(field, format!("{text:?} is neither a number nor \"off\"")))?;
    match id {
        0 => Err(invalid(field, "0 is root: isolates never run as root (\"off\" keeps the runner's own uid)")),
        u32::MAX => Err(invalid(field, "4294967295 is not an id")),
        id => Ok(id),
    }
}

/// `value`, if it lies in `range`; else an error naming `field` and the range.
fn within<T>(field: &'static str, value: T, range: std::ops::RangeInclusive<T>) -> Result<T, SettingsError>
where
    T: PartialOrd + std::fmt::Display,
{
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(invalid(field, format!("{value} is out of range ({}..={})", range.start(), range.end())))
    }
}

fn pick(flags: Vec<String>, file: Vec<String>) -> Vec<String> {
    if flags.is_empty() { file } else { flags }
}

fn read_file_config(path: &Path) -> Result<FileConfig, SettingsError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| invalid("config", format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        // Name the line and its key, never quote the line: it may hold a secret.
        let place = e.span().map(|span| {
            let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
            let line_number = text[..span.start].matches('\n').count() + 1;
            let key = text[line_start..].split(['=', '\n']).next().unwrap_or("").trim();
            format!("line {line_number}, key `{key}`: ")
        });
        invalid("config", format!("{}: {}{}", path.display(), place.unwrap_or_default(), e.message()))
    })
}

fn parse_addr(field: &'static str, text: &str) -> Result<SocketAddr, SettingsError> {
    text.parse().map_err(|_| invalid(field, format!("{text:?} is not an address like 127.0.0.1:8080")))
}

fn parse_rpc_root(text: &str) -> Result<Url, SettingsError> {
    let url = Url::parse(text).map_err(|e| invalid("rpc_root", format!("{text:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || !url.path().ends_with('/') {
        return Err(invalid("rpc_root", format!("{text:?} must be an http(s) URL ending in '/'")));
    }
    Ok(url)
}

fn split_pair<'a>(field: &'static str, text: &'a str) -> Result<(&'a str, &'a str), SettingsError> {
    match text.split_once('=') {
        Some((kid, value)) if !kid.is_empty() && !value.is_empty() => Ok((kid, value)),
        _ => Err(invalid(field, "expected KID=VALUE with both parts non-empty")),
    }
}

fn subhosters(
    rpc_root: &Url,
    secrets: &[String],
    secret_files: &[String],
    allowed: &[String],
) -> Result<Vec<Subhoster>, SettingsError> {
    let mut out: Vec<Subhoster> = Vec::new();
    let mut add = |field: &'static str, kid: &str, secret: Vec<u8>| {
        if out.iter().any(|s| s.kid == kid) {
            return Err(invalid(field, format!("subhoster {kid:?} is configured twice")));
        }
        out.push(Subhoster {
            kid: kid.to_owned(),
            secret: Secret::new(secret),
            rpc_root: rpc_root.clone(),
            allowed_rpc_root_prefixes: Vec::new(),
        });
        Ok(())
    };
    for spec in secrets {
        let (kid, secret) = split_pair("subhost_secret", spec)?;
        add("subhost_secret", kid, secret.as_bytes().to_vec())?;
    }
    for spec in secret_files {
        let (kid, path) = split_pair("subhost_secret_file", spec)?;
        let text = std::fs::read_to_string(path).map_err(|e| invalid("subhost_secret_file", format!("{path}: {e}")))?;
        let secret = text.trim_end_matches(['\n', '\r']);
        if secret.is_empty() {
            return Err(invalid("subhost_secret_file", format!("{path} is empty")));
        }
        add("subhost_secret_file", kid, secret.as_bytes().to_vec())?;
    }
    if out.is_empty() {
        return Err(invalid(
            "subhost_secret",
            "runner needs at least one --subhost-secret KID=SECRET or --subhost-secret-file KID=PATH",
        ));
    }
    for spec in allowed {
        let (kid, prefix) = allowed_prefix(spec)?;
        let subhoster = out.iter_mut().find(|s| s.kid == kid).ok_or_else(|| {
            invalid("allow_rpc_root", format!("{spec:?} names subhoster {kid:?}, which has no --subhost-secret(-file)"))
        })?;
        subhoster.allowed_rpc_root_prefixes.push(prefix.to_owned());
    }
    // The verifier's own checks (prefix form, …), here so they name the setting.
    isocloud_auth::SubhostVerifier::new(out.clone()).map_err(|e| match e {
        isocloud_auth::AuthConfigError::InvalidRpcRootPrefix { .. } => invalid("allow_rpc_root", e.to_string()),
        isocloud_auth::AuthConfigError::InvalidRpcRoot { .. } => invalid("rpc_root", e.to_string()),
        _ => invalid("subhost_secret", e.to_string()),
    })?;
    Ok(out)
}

/// `KID=PREFIX` of `--allow-rpc-root`. A bare prefix (the shared form of
/// earlier versions) is refused rather than granted to every subhoster: one
/// subhoster's token could then aim RPCs signed as that subhoster at another
/// subhoster's origin, and guessing which subhoster was meant would silently
/// widen or narrow a grant.
fn allowed_prefix(spec: &str) -> Result<(&str, &str), SettingsError> {
    match spec.split_once('=') {
        Some((kid, prefix)) if !kid.is_empty() && !prefix.is_empty() && !kid.contains(['/', ':']) => Ok((kid, prefix)),
        _ => Err(invalid(
            "allow_rpc_root",
            format!(
                "{spec:?}: expected KID=PREFIX, e.g. acme=https://origin.example/ (prefixes are per subhoster; \
                 a bare PREFIX is no longer accepted)"
            ),
        )),
    }
}

/// The control plane's options, flags over file, validated.
fn control_plane_settings(flags: ControlPlaneFlags, file: &FileConfig) -> Result<ControlPlaneSettings, SettingsError> {
    let data_dir = match flags.data.or_else(|| file.data.clone()) {
        Some(dir) => dir,
        None => default_data_dir().ok_or_else(|| invalid("data", "no $XDG_DATA_HOME or $HOME; pass --data DIR"))?,
    };
    let database_url = flags.database_url.or_else(|| file.database_url.clone());
    if let Some(url) = &database_url
        && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
    {
        // Never quote it: it may hold a password.
        return Err(invalid("database_url", "must be a postgres:// or postgresql:// URL"));
    }
    let base_domain = flags.base_domain.or_else(|| file.base_domain.clone()).unwrap_or_else(|| "localhost".into());
    let base_domain = base_domain.trim_end_matches('.').to_ascii_lowercase();
    if !isocloud_controlplane::is_base_domain(&base_domain) {
        return Err(invalid("base_domain", format!("{base_domain:?} is not a DNS name")));
    }
    let control_listen = parse_addr(
        "control_listen",
        flags.control_listen.or_else(|| file.control_listen.clone()).as_deref().unwrap_or("127.0.0.1:8081"),
    )?;
    let tls_listen =
        flags.tls_listen.or_else(|| file.tls_listen.clone()).map(|a| parse_addr("tls_listen", &a)).transpose()?;
    let log_retention_h =
        within("log_retention_h", flags.log_retention_h.or(file.log_retention_h).unwrap_or(72), 1..=24 * 3650)?;
    let usage_retention_d =
        within("usage_retention_d", flags.usage_retention_d.or(file.usage_retention_d).unwrap_or(30), 1..=3650)?;
    let max_blob_mb = within("max_blob_mb", flags.max_blob_mb.or(file.max_blob_mb).unwrap_or(64), 1..=4096)?;
    let domain_verify_http_port = within(
        "domain_verify_http_port",
        flags.domain_verify_http_port.or(file.domain_verify_http_port).unwrap_or(80),
        1..=65535,
    )?;
    let dns_resolver =
        flags.dns_resolver.or_else(|| file.dns_resolver.clone()).map(|a| parse_addr("dns_resolver", &a)).transpose()?;
    let public_http_port = flags.public_http_port.or(file.public_http_port);
    Ok(ControlPlaneSettings {
        data_dir,
        database_url,
        base_domain,
        control_listen,
        tls_listen,
        log_retention: Duration::from_secs(log_retention_h * 3600),
        usage_retention: Duration::from_secs(usage_retention_d * 86_400),
        max_blob_bytes: max_blob_mb * 1024 * 1024,
        domain_verify_http_port,
        dns_resolver,
        public_http_port,
    })
}

/// The build step's settings, flags over file, validated.
fn build_settings(
    npm_registry_flag: Option<String>,
    flags: Option<&ControlPlaneFlags>,
    file: &FileConfig,
) -> Result<BuildSettings, SettingsError> {
    let registry = |field: &'static str, given: Option<String>| -> Result<Option<url::Url>, SettingsError> {
        let Some(given) = given else { return Ok(None) };
        let mut url = url::Url::parse(&given).map_err(|e| invalid(field, format!("{given:?} is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(invalid(field, format!("{given:?} is not an http(s) URL")));
        }
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        Ok(Some(url))
    };
    let npm_registry = registry("npm_registry", npm_registry_flag.or_else(|| file.npm_registry.clone()))?;
    let jsr_registry =
        registry("jsr_registry", flags.and_then(|f| f.jsr_registry.clone()).or_else(|| file.jsr_registry.clone()))?;
    let build_timeout_s = within(
        "build_timeout_s",
        flags.and_then(|f| f.build_timeout_s).or(file.build_timeout_s).unwrap_or(300),
        5..=3600,
    )?;
    let build_memory_mb = within(
        "build_memory_mb",
        flags.and_then(|f| f.build_memory_mb).or(file.build_memory_mb).unwrap_or(2048),
        64..=65_536,
    )?;
    let build_allow_import = match flags {
        Some(flags) if !flags.build_allow_import.is_empty() => flags.build_allow_import.clone(),
        _ => file.build_allow_import.clone(),
    };
    for host in &build_allow_import {
        if host.is_empty() || host.contains(['/', ',', ' ', '@']) {
            return Err(invalid("build_allow_import", format!("{host:?} is not a host or host:port")));
        }
    }
    Ok(BuildSettings {
        npm_registry,
        jsr_registry,
        timeout: Duration::from_secs(build_timeout_s),
        memory_limit_bytes: build_memory_mb * 1024 * 1024,
        allow_import: build_allow_import,
    })
}

fn default_data_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("isocloud"));
    }
    std::env::var_os("HOME").filter(|d| !d.is_empty()).map(|home| PathBuf::from(home).join(".local/share/isocloud"))
}

fn default_state_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("isocloud"));
    }
    std::env::var_os("HOME").filter(|d| !d.is_empty()).map(|home| PathBuf::from(home).join(".local/state/isocloud"))
}

#[cfg(test)]
mod tests;
