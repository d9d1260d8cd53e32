//! Command-line flags and the TOML config file: merged (flags win), then
//! validated once into [`Settings`]. Nothing else reads raw options. Each
//! option is declared once, in `settings/options.rs`.

mod options;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use isocloud_auth::{Secret, Subhoster};
use isocloud_ingress::{BodyBound, ListenerBounds, ListenerKind};
use serde::Deserialize;
use url::Url;

pub use options::{CommonFlags, EdgeFlags, ServeFlags, SubhostFlags};
use options::{FileConfig, Given};

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
        #[command(flatten)]
        serve: Box<ServeFlags>,
    },
    /// Run as a subhosting runner: relays sign requests, origins describe deployments.
    Runner {
        #[command(flatten)]
        common: CommonFlags,
        #[command(flatten)]
        subhost: SubhostFlags,
    },
    /// Run as an edge: the public listener in front of several runners, for
    /// the control plane's deployments (host table from its routing feed,
    /// runners chosen by hashing the deployment id).
    #[command(mut_args(hide_unless_edge))]
    Edge {
        #[command(flatten)]
        common: CommonFlags,
        /// Only `--tls-listen` of these (the others are refused by name).
        #[command(flatten)]
        serve: Box<ServeFlags>,
        #[command(flatten)]
        subhost: SubhostFlags,
        #[command(flatten)]
        edge: EdgeFlags,
    },
    /// The client commands that talk to a control plane (login, deploy, …).
    #[command(flatten)]
    Client(crate::client::ClientCommand),
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

/// A sandbox layer: on where the runner can have it, on or refuse to
/// start, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Toggle {
    Auto,
    On,
    Off,
}

/// A layer that is always there unless turned off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `--acme-challenge`: how the ACME server checks that a domain is ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
pub enum AcmeChallenge {
    /// HTTP-01: a token fetched from the public listener on port 80.
    #[value(name = "http-01")]
    #[serde(rename = "http-01")]
    Http01,
    /// TLS-ALPN-01: a TLS handshake with the TLS listener on port 443.
    #[value(name = "tls-alpn-01")]
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

/// As the help and the README show a default: the value's name.
macro_rules! display_as_value_name {
    ($($ty:ty),*) => {$(
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.to_possible_value().expect("no value is skipped").get_name())
            }
        }
    )*};
}
display_as_value_name!(Toggle, Switch, LogFormat, AcmeChallenge);

/// `--isolate-uid` as given: a number or `off`; `isolate_uid` in the TOML
/// file: a number or `"off"`. Whether the number may be a uid is
/// [`Settings::from_cli`]'s to say, naming the setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "UidValue")]
pub enum UidChoice {
    Off,
    Id(u32),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum UidValue {
    Id(u32),
    Text(String),
}

impl FromStr for UidChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "off" => Ok(UidChoice::Off),
            _ => text.parse().map(UidChoice::Id).map_err(|_| format!("{text:?} is neither a number nor \"off\"")),
        }
    }
}

impl TryFrom<UidValue> for UidChoice {
    type Error = String;

    fn try_from(value: UidValue) -> Result<Self, String> {
        match value {
            UidValue::Id(id) => Ok(UidChoice::Id(id)),
            UidValue::Text(text) => text.parse(),
        }
    }
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
    /// `--blob-store`: blobs in a bucket; `None`: files in the data dir.
    pub blob_store: Option<isocloud_controlplane::S3Config>,
    pub blob_gc_grace: Duration,
    /// `--origin-listen`: the origin RPCs for runners on other machines.
    pub origin: Option<OriginListen>,
    /// `--acme-email` and the other `--acme-*`: automatic certificates.
    pub acme: Option<isocloud_controlplane::AcmeOptions>,
}

/// The control plane's origin RPCs over HTTP (`--origin-listen`), and the
/// keys their callers sign with.
#[derive(Debug, Clone)]
pub struct OriginListen {
    pub addr: SocketAddr,
    /// Never logged (`Secret`'s `Debug` redacts).
    pub keys: Vec<isocloud_controlplane::origin_http::OriginKey>,
    /// `--origin-tls-cert` and `--origin-tls-key`, read: TLS only; `None`:
    /// plain HTTP.
    pub tls: Option<Arc<isocloud_ingress::CertificateFiles>>,
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
    /// Subhosting: other roots answering for `--rpc-root` (empty otherwise).
    pub rpc_root_fallbacks: Vec<Url>,
    /// Subhosting: `--rpc-root-ca`, trusted for https roots beside the
    /// public roots.
    pub rpc_trust: isocloud_origin::RpcTrust,
    /// `runner --tls-cert --tls-key`, read: the public listener speaks TLS
    /// only; `None`: plain HTTP (and h2c).
    pub listen_tls: Option<Arc<isocloud_ingress::CertificateFiles>>,
    /// `serve`'s build step (the control plane's deployments, apps mode).
    pub build: BuildSettings,
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub deno: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub idle_timeout: Duration,
    pub boot_timeout: Duration,
    pub origin_timeout: Duration,
    /// How old a kept boot answer may be to boot while the origin is down;
    /// zero: off.
    pub boot_stale_max_age: Duration,
    pub drain_timeout: Duration,
    /// `--drain-delay-s`: serving on, health checks failing, before the drain.
    pub drain_delay: Duration,
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
    /// `None`: tokio's default, one worker per core.
    pub runtime_threads: Option<usize>,
    /// `None`: [`BOOT_QUEUE_PER_CONCURRENT_BOOT`] per concurrent boot.
    pub max_boot_queue: Option<usize>,
    pub max_isolates_per_tenant: usize,
    /// `--otlp-endpoint`: spans and console lines exported; `None`: off.
    pub otlp: Option<isocloud_telemetry::OtlpOptions>,
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

/// The listeners' bounds: `isocloud_ingress::LISTENER_DEFAULTS` with the
/// caps given (flag, file or that default), validated.
fn listener_bounds(given: &Given, header_timeout: Duration) -> Result<ListenerBoundsSet, SettingsError> {
    let body = BodyBound {
        timeout: Duration::from_secs(given.body_timeout_s),
        min_rate_bytes_per_s: given.min_body_rate_kb_s * 1024,
    };
    let caps = |kind: ListenerKind| -> Result<ListenerBounds, SettingsError> {
        let (per_peer_field, per_peer, total_field, total) = match kind {
            ListenerKind::Public | ListenerKind::Tls => {
                ("max_connections_per_peer", given.max_connections_per_peer, "max_connections", given.max_connections)
            }
            ListenerKind::Control => (
                "control_max_connections_per_peer",
                given.control_max_connections_per_peer,
                "control_max_connections",
                given.control_max_connections,
            ),
            ListenerKind::Admin => (
                "admin_max_connections_per_peer",
                given.admin_max_connections_per_peer,
                "admin_max_connections",
                given.admin_max_connections,
            ),
        };
        let mut bounds = ListenerBounds::defaults(kind, header_timeout, body);
        (bounds.max_connections_per_peer, bounds.max_connections) = (per_peer, total);
        if per_peer > total {
            return Err(invalid(
                per_peer_field,
                format!("{per_peer} is more than {total_field} ({total}): it could never apply (0 turns it off)"),
            ));
        }
        Ok(bounds)
    };
    Ok(ListenerBoundsSet {
        public: caps(ListenerKind::Public)?,
        tls: caps(ListenerKind::Tls)?,
        control: caps(ListenerKind::Control)?,
        admin: caps(ListenerKind::Admin)?,
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
        let (common, serve, subhost) = match command {
            Command::Serve { common, serve } => (common, Some(*serve), None),
            Command::Runner { common, subhost } => (common, None, Some(subhost)),
            // main.rs dispatches client commands and the edge before settings are built.
            Command::Client(_) => return Err(invalid("command", "a client command has no runner settings")),
            Command::Edge { .. } => return Err(invalid("command", "the edge has settings of its own (EdgeSettings)")),
        };
        let mut file = match &common.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        // The flags, if either is given, else the file's: a uid from one
        // source never meets a range from the other.
        if common.isolate_uid.is_some() || common.isolate_uid_range.is_some() {
            (file.isolate_uid, file.isolate_uid_range) = (None, None);
        }
        // With --apps, these flags are a mistake (the file's are ignored).
        let control_flags_given = serve.as_ref().is_some_and(|s| {
            s.data.is_some() || s.database_url.is_some() || s.tls_listen.is_some() || s.origin_listen.is_some()
        });
        let is_serve = serve.is_some();
        let given =
            Given::merge(common, serve.unwrap_or_default(), subhost.unwrap_or_default(), EdgeFlags::default(), file)?;
        // `serve` without an apps folder runs the control plane.
        let apps_given = is_serve && given.apps.is_some();
        let build = build_settings(&given)?;
        let control_plane = if is_serve && !apps_given { Some(control_plane_settings(&given)?) } else { None };
        let listen = parse_addr("listen", &given.listen)?;
        let admin_listen = given.admin_listen.as_deref().map(|a| parse_addr("admin_listen", a)).transpose()?;
        let header_timeout = Duration::from_secs(given.header_timeout_s);
        let listeners = listener_bounds(&given, header_timeout)?;
        // Idle 60 s: what nginx (proxy_read_timeout) and AWS load balancers
        // allow by default, so clients already ping inside it (WebSocket
        // libraries every 20–30 s, SSE keep-alive comments). Lifetime 1 h: a
        // busy stream keeps its isolate's slot, so it must end some time;
        // an hour outlasts any download or session a client would not
        // resume anyway (AWS API Gateway allows 2 h).
        if given.stream_idle_timeout_s > given.stream_max_lifetime_s {
            return Err(invalid(
                "stream_idle_timeout_s",
                format!(
                    "{} s is longer than stream_max_lifetime_s ({} s): a stream could never idle out",
                    given.stream_idle_timeout_s, given.stream_max_lifetime_s
                ),
            ));
        }
        let egress_proxy = given.egress_proxy == Switch::On;
        if given.network_namespace == Toggle::On && !egress_proxy {
            return Err(invalid(
                "network_namespace",
                "--network-namespace on needs --egress-proxy on: the proxy is the isolates' only way out",
            ));
        }
        let egress_allow_private = given
            .egress_allow_private
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
        let isolate_uid = match (given.isolate_uid, given.isolate_uid_range.as_deref()) {
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
            (Some(UidChoice::Off), None) => IsolateUid::Off,
            (Some(UidChoice::Id(id)), None) => IsolateUid::Id(check_id("isolate_uid", id)?),
        };
        let isolate_gid = check_id("isolate_gid", given.isolate_gid)?;
        let state_dir = match &given.state_dir {
            Some(dir) => dir.clone(),
            None => default_state_dir()
                .ok_or_else(|| invalid("state_dir", "no $XDG_STATE_HOME or $HOME; pass --state-dir"))?,
        };
        let subhost_keys_given = !given.subhost_secret.is_empty()
            || !given.subhost_secret_file.is_empty()
            || given.rpc_root.is_some()
            || !given.rpc_root_fallback.is_empty()
            || !given.rpc_root_ca.is_empty()
            || given.tls_cert.is_some()
            || given.tls_key.is_some();
        let rpc_root_fallbacks = rpc_root_fallbacks(&given.rpc_root_fallback)?;
        let rpc_trust = rpc_trust(&given.rpc_root_ca)?;
        let listen_tls = certificate_files(("tls_cert", &given.tls_cert), ("tls_key", &given.tls_key))?;

        let mode = if let Some(control) = control_plane {
            if subhost_keys_given {
                return Err(invalid("subhost_secret", "subhosting options belong to `isocloud runner`, not `serve`"));
            }
            Mode::ControlPlane(Box::new(control))
        } else if is_serve {
            let dir = given.apps.as_ref().expect("apps given, or the control plane's branch above");
            if control_flags_given {
                return Err(invalid(
                    "apps",
                    "--apps serves a folder without the control plane: drop --data, --database-url, --tls-listen and \
                     --origin-listen",
                ));
            }
            if !dir.is_dir() {
                return Err(invalid("apps", format!("{} is not a directory", dir.display())));
            }
            if subhost_keys_given {
                return Err(invalid("subhost_secret", "subhosting options belong to `isocloud runner`, not `serve`"));
            }
            Mode::Apps(dir.canonicalize().map_err(|e| invalid("apps", e.to_string()))?)
        } else {
            if given.apps.is_some() {
                return Err(invalid("apps", "`apps` belongs to `isocloud serve`, not `runner`"));
            }
            let rpc_root = given
                .rpc_root
                .as_deref()
                .ok_or_else(|| invalid("rpc_root", "runner needs --rpc-root URL (or `rpc_root` in the config file)"))?;
            let rpc_root = parse_rpc_root(rpc_root)?;
            Mode::Subhost(subhosters(
                &rpc_root,
                &given.subhost_secret,
                &given.subhost_secret_file,
                &given.allow_rpc_root,
            )?)
        };
        let max_isolates_per_tenant = given.max_isolates_per_tenant.unwrap_or_else(|| {
            let tenants = match &mode {
                Mode::Apps(_) => Some(1),
                Mode::Subhost(subhosters) => Some(subhosters.len()),
                Mode::ControlPlane(_) => None,
            };
            default_max_isolates_per_tenant(given.max_isolates, tenants)
        });
        let otlp = otlp_settings(&given)?;
        Ok(Settings {
            mode,
            rpc_root_fallbacks,
            rpc_trust,
            listen_tls,
            build,
            listen,
            admin_listen,
            deno: given.deno,
            state_dir,
            idle_timeout: Duration::from_secs(given.idle_timeout_s),
            boot_timeout: Duration::from_secs(given.boot_timeout_s),
            origin_timeout: Duration::from_secs(given.origin_timeout_s),
            boot_stale_max_age: Duration::from_secs(given.boot_stale_max_age_s),
            drain_timeout: Duration::from_secs(given.drain_timeout_s),
            drain_delay: Duration::from_secs(given.drain_delay_s),
            memory_limit_mb: given.memory_limit_mb,
            cpu_limit_ms: given.cpu_limit_ms,
            request_timeout: Duration::from_secs(given.request_timeout_s),
            max_isolates: given.max_isolates,
            max_request_body_bytes: (given.max_request_body_mb * 1024 * 1024) as usize,
            max_header_bytes: (given.max_header_kb * 1024) as usize,
            header_timeout,
            listeners,
            stream_idle_timeout: Duration::from_secs(given.stream_idle_timeout_s),
            stream_max_lifetime: Duration::from_secs(given.stream_max_lifetime_s),
            cache_max_bytes: given.cache_max_mb * 1024 * 1024,
            package_store_max_bytes: given.package_store_max_mb * 1024 * 1024,
            spool_max_bytes: given.spool_max_mb * 1024 * 1024,
            log_format: given.log_format,
            mount_namespace: given.mount_namespace,
            landlock: given.landlock,
            seccomp: given.seccomp == Switch::On,
            rlimits: given.rlimits == Switch::On,
            isolate_uid,
            isolate_gid,
            egress_proxy,
            network_namespace: given.network_namespace,
            egress_allow_private,
            max_hops: given.max_hops,
            usage_interval: Duration::from_secs(given.usage_interval_s),
            prestarted_isolates: given.prestarted_isolates,
            max_concurrent_boots: given.max_concurrent_boots,
            runtime_threads: given.runtime_threads,
            max_boot_queue: given.max_boot_queue,
            max_isolates_per_tenant,
            otlp,
        })
    }
}

/// `--otlp-endpoint` (an http or https URL with a host, no query, fragment
/// or credentials: it is logged) and `--otlp-service-name` (1 to 128
/// printable characters).
fn otlp_settings(given: &Given) -> Result<Option<isocloud_telemetry::OtlpOptions>, SettingsError> {
    let Some(text) = &given.otlp_endpoint else { return Ok(None) };
    let endpoint =
        Url::parse(text.trim()).map_err(|e| invalid("otlp_endpoint", format!("{text:?} is not a URL: {e}")))?;
    if !matches!(endpoint.scheme(), "http" | "https") || endpoint.host_str().is_none() {
        return Err(invalid("otlp_endpoint", format!("{text:?} is not an http(s) URL of a collector (OTLP/HTTP)")));
    }
    if endpoint.query().is_some() || endpoint.fragment().is_some() {
        return Err(invalid("otlp_endpoint", "the collector's base URL takes no query or fragment"));
    }
    if !endpoint.username().is_empty() || endpoint.password().is_some() {
        return Err(invalid("otlp_endpoint", "no credentials in the URL: it is printed at start-up"));
    }
    let service_name = given.otlp_service_name.trim();
    if service_name.is_empty() || service_name.len() > 128 || service_name.chars().any(char::is_control) {
        return Err(invalid("otlp_service_name", "1 to 128 printable characters"));
    }
    Ok(Some(isocloud_telemetry::OtlpOptions { endpoint, service_name: service_name.to_owned() }))
}

/// The edge's help shows the options it reads; the others (the groups it
/// shares with the runner) are refused if given.
fn hide_unless_edge(arg: clap::Arg) -> clap::Arg {
    let key = arg.get_id().as_str().to_owned();
    if EDGE_OPTIONS.contains(&key.as_str()) { arg } else { arg.hide(true) }
}

/// `isocloud edge`, validated: the only form the edge's wiring sees.
pub struct EdgeSettings {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// The control plane's origin listener (its routing feed is `routing` there).
    pub rpc_root: Url,
    /// Its other nodes' origin listeners, tried when it cannot be reached.
    pub rpc_root_fallbacks: Vec<Url>,
    /// `--rpc-root-ca`: trusted for https roots beside the public roots.
    pub rpc_trust: isocloud_origin::RpcTrust,
    /// Signs the relay tokens and the routing feed's: the runners'
    /// `--subhost-secret` and the control plane's `--origin-secret`.
    pub key: isocloud_edge::SigningKey,
    pub runners: Vec<Url>,
    /// `--runners-file`: where `runners` came from, watched for changes.
    pub runners_file: Option<PathBuf>,
    /// What an `https://` runner's certificate may chain to: the public
    /// roots and `--runner-ca`'s certificates.
    pub runner_roots: rustls::RootCertStore,
    pub runner_http2: bool,
    pub runner_max_idle: usize,
    pub health_interval: Duration,
    pub request_timeout: Duration,
    /// One poll of the routing feed.
    pub origin_timeout: Duration,
    pub drain_timeout: Duration,
    /// `--drain-delay-s`: serving on, `/healthz` failing, before the drain.
    pub drain_delay: Duration,
    pub max_request_body_bytes: usize,
    pub public_bounds: ListenerBounds,
    /// `--tls-listen`: HTTPS with the control plane's certificates by SNI;
    /// `None`: plain HTTP only (and the edge holds no private key).
    pub tls_listen: Option<SocketAddr>,
    /// The TLS listener's bounds (the runner's `--tls-listen`'s).
    pub tls_bounds: ListenerBounds,
    pub admin_bounds: ListenerBounds,
    /// `--otlp-endpoint`: a span per request; `None`: off.
    pub otlp: Option<isocloud_telemetry::OtlpOptions>,
}

/// The options `isocloud edge` reads; any other given on its command line is
/// refused, naming itself (in a shared config file they are ignored, as
/// `serve --apps` ignores the control plane's).
pub const EDGE_OPTIONS: [&str; 30] = [
    "config",
    "listen",
    "tls_listen",
    "admin_listen",
    "log_format",
    "origin_timeout_s",
    "drain_timeout_s",
    "drain_delay_s",
    "request_timeout_s",
    "max_request_body_mb",
    "header_timeout_s",
    "body_timeout_s",
    "min_body_rate_kb_s",
    "max_connections_per_peer",
    "max_connections",
    "admin_max_connections_per_peer",
    "admin_max_connections",
    "rpc_root",
    "rpc_root_fallback",
    "rpc_root_ca",
    "subhost_secret",
    "subhost_secret_file",
    "runner",
    "runners_file",
    "runner_ca",
    "runner_http2",
    "runner_max_idle",
    "health_interval_ms",
    "otlp_endpoint",
    "otlp_service_name",
];

impl EdgeSettings {
    pub fn from_flags(
        common: CommonFlags,
        serve: ServeFlags,
        subhost: SubhostFlags,
        edge: EdgeFlags,
    ) -> Result<Self, SettingsError> {
        let given_keys = [common.given_keys(), serve.given_keys(), subhost.given_keys(), edge.given_keys()].concat();
        if let Some(key) = given_keys.iter().find(|key| !EDGE_OPTIONS.contains(key)) {
            return Err(invalid(
                key,
                format!(
                    "--{} is not an edge option: the edge runs no isolates and verifies no relay; the runners \
                     behind it apply their own settings",
                    key.replace('_', "-")
                ),
            ));
        }
        let file = match &common.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        // Of `serve`'s group, only `tls_listen` was let through above.
        let given = Given::merge(common, serve, subhost, edge, file)?;
        let rpc_root = match &given.rpc_root {
            Some(text) => parse_rpc_root(text)?,
            None => {
                return Err(invalid(
                    "rpc_root",
                    "the edge needs --rpc-root URL: the control plane's --origin-listen, where it follows the \
                     host table",
                ));
            }
        };
        let key = edge_key(&given.subhost_secret, &given.subhost_secret_file)?;
        let mut runners: Vec<Url> = Vec::new();
        let runners_file = given.runners_file.as_deref().map(PathBuf::from);
        if let Some(path) = &runners_file {
            if !given.runner.is_empty() {
                return Err(invalid(
                    "runners_file",
                    "--runners-file and --runner exclude each other: name the runners once",
                ));
            }
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid("runners_file", format!("{}: {e}", path.display())))?;
            runners = isocloud_edge::parse_runner_list(&text)
                .map_err(|e| invalid("runners_file", format!("{}: {e}", path.display())))?;
        }
        for text in &given.runner {
            let url = Url::parse(text).map_err(|e| invalid("runner", format!("{text:?} is not a URL: {e}")))?;
            isocloud_edge::Runner::new(&url).map_err(|e| invalid("runner", e.to_string()))?;
            if runners.contains(&url) {
                return Err(invalid("runner", format!("{url} is named twice")));
            }
            runners.push(url);
        }
        if runners.is_empty() {
            return Err(invalid("runner", "the edge needs at least one --runner URL (a runner's public listener)"));
        }
        let listeners = listener_bounds(&given, Duration::from_secs(given.header_timeout_s))?;
        Ok(EdgeSettings {
            listen: parse_addr("listen", &given.listen)?,
            admin_listen: given.admin_listen.as_deref().map(|a| parse_addr("admin_listen", a)).transpose()?,
            log_format: given.log_format,
            rpc_root,
            rpc_root_fallbacks: rpc_root_fallbacks(&given.rpc_root_fallback)?,
            rpc_trust: rpc_trust(&given.rpc_root_ca)?,
            key,
            runners,
            runners_file,
            runner_roots: runner_roots(&given.runner_ca)?,
            runner_http2: given.runner_http2 == Switch::On,
            runner_max_idle: given.runner_max_idle,
            health_interval: Duration::from_millis(given.health_interval_ms),
            request_timeout: Duration::from_secs(given.request_timeout_s),
            origin_timeout: Duration::from_secs(given.origin_timeout_s),
            drain_timeout: Duration::from_secs(given.drain_timeout_s),
            drain_delay: Duration::from_secs(given.drain_delay_s),
            max_request_body_bytes: usize::try_from(given.max_request_body_mb * 1024 * 1024).unwrap_or(usize::MAX),
            public_bounds: listeners.public,
            tls_listen: given.tls_listen.as_deref().map(|a| parse_addr("tls_listen", a)).transpose()?,
            tls_bounds: listeners.tls,
            admin_bounds: listeners.admin,
            otlp: otlp_settings(&given)?,
        })
    }
}

/// The edge's one key, `KID=SECRET` or `KID=PATH`: what it signs with must
/// be what the runners verify with and the control plane checks.
fn edge_key(secrets: &[String], files: &[String]) -> Result<isocloud_edge::SigningKey, SettingsError> {
    use isocloud_controlplane::origin_http::MIN_SECRET_BYTES;
    let (field, kid, secret) = match (secrets, files) {
        ([spec], []) => {
            let (kid, secret) = split_pair("subhost_secret", spec)?;
            ("subhost_secret", kid, secret.as_bytes().to_vec())
        }
        ([], [spec]) => {
            let (kid, path) = split_pair("subhost_secret_file", spec)?;
            let text =
                std::fs::read_to_string(path).map_err(|e| invalid("subhost_secret_file", format!("{path}: {e}")))?;
            ("subhost_secret_file", kid, text.trim_end_matches(['\n', '\r']).as_bytes().to_vec())
        }
        _ => {
            return Err(invalid(
                "subhost_secret",
                "the edge signs with one key: exactly one --subhost-secret KID=SECRET or --subhost-secret-file \
                 KID=PATH (the runners' --subhost-secret, the control plane's --origin-secret)",
            ));
        }
    };
    if secret.len() < MIN_SECRET_BYTES {
        return Err(invalid(
            field,
            format!(
                "key {kid:?} has {} bytes, fewer than {MIN_SECRET_BYTES}: the control plane refuses it",
                secret.len()
            ),
        ));
    }
    Ok(isocloud_edge::SigningKey { kid: kid.to_owned(), secret: Secret::new(secret) })
}

/// An isolate uid or gid: never root's, never the "no id" value.
fn check_id(field: &'static str, id: u32) -> Result<u32, SettingsError> {
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

fn read_file_config(path: &Path) -> Result<FileConfig, SettingsError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| invalid("config", format!("cannot read {}: {e}", path.display())))?;
    let file: FileConfig = toml::from_str(&text).map_err(|e| {
        // Name the line and its key, never quote the line: it may hold a secret.
        let place = e.span().map(|span| {
            let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
            let line_number = text[..span.start].matches('\n').count() + 1;
            let key = text[line_start..].split(['=', '\n']).next().unwrap_or("").trim();
            format!("line {line_number}, key `{key}`: ")
        });
        invalid("config", format!("{}: {}{}", path.display(), place.unwrap_or_default(), e.message()))
    })?;
    if file.config.is_some() {
        return Err(invalid("config", format!("{}: `config` is a flag; a config file names no other", path.display())));
    }
    Ok(file)
}

fn parse_addr(field: &'static str, text: &str) -> Result<SocketAddr, SettingsError> {
    text.parse().map_err(|_| invalid(field, format!("{text:?} is not an address like 127.0.0.1:8080")))
}

/// `--rpc-root-fallback`s: roots like `--rpc-root`, each named once.
fn rpc_root_fallbacks(texts: &[String]) -> Result<Vec<Url>, SettingsError> {
    let mut roots: Vec<Url> = Vec::new();
    for text in texts {
        let root = parse_rpc_root(text).map_err(|e| invalid("rpc_root_fallback", e.message))?;
        if roots.contains(&root) {
            return Err(invalid("rpc_root_fallback", format!("{root} is named twice")));
        }
        roots.push(root);
    }
    Ok(roots)
}

/// The public roots and `--runner-ca`'s certificates, each file read and
/// checked now.
fn runner_roots(paths: &[String]) -> Result<rustls::RootCertStore, SettingsError> {
    let mut files = Vec::new();
    for path in paths {
        let pem = std::fs::read(path).map_err(|e| invalid("runner_ca", format!("{path}: {e}")))?;
        files.push((path.clone(), pem));
    }
    let mut roots = isocloud_edge::runner_roots(&files).map_err(|e| invalid("runner_ca", e))?;
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    Ok(roots)
}

/// A certificate option and its key option (field, value), read now: both
/// or neither; an error names the option at fault.
fn certificate_files(
    (cert_field, cert): (&'static str, &Option<String>),
    (key_field, key): (&'static str, &Option<String>),
) -> Result<Option<Arc<isocloud_ingress::CertificateFiles>>, SettingsError> {
    let flag = |field: &str| format!("--{}", field.replace('_', "-"));
    match (cert, key) {
        (Some(cert), Some(key)) => isocloud_ingress::CertificateFiles::load(Path::new(cert), Path::new(key))
            .map(|files| Some(Arc::new(files)))
            .map_err(|e| invalid(cert_field, e.to_string())),
        (None, None) => Ok(None),
        (Some(_), None) => Err(invalid(key_field, format!("{} needs its {}", flag(cert_field), flag(key_field)))),
        (None, Some(_)) => Err(invalid(cert_field, format!("{} needs its {}", flag(key_field), flag(cert_field)))),
    }
}

/// `--rpc-root-ca`s, each read and checked now.
fn rpc_trust(paths: &[String]) -> Result<isocloud_origin::RpcTrust, SettingsError> {
    let paths: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
    isocloud_origin::RpcTrust::from_pem_files(&paths).map_err(|e| invalid("rpc_root_ca", e.to_string()))
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

/// The control plane's options, validated.
fn control_plane_settings(given: &Given) -> Result<ControlPlaneSettings, SettingsError> {
    let data_dir = match &given.data {
        Some(dir) => dir.clone(),
        None => default_data_dir().ok_or_else(|| invalid("data", "no $XDG_DATA_HOME or $HOME; pass --data DIR"))?,
    };
    if let Some(url) = &given.database_url
        && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
    {
        // Never quote it: it may hold a password.
        return Err(invalid("database_url", "must be a postgres:// or postgresql:// URL"));
    }
    let base_domain = given.base_domain.trim_end_matches('.').to_ascii_lowercase();
    if !isocloud_controlplane::is_base_domain(&base_domain) {
        return Err(invalid("base_domain", format!("{base_domain:?} is not a DNS name")));
    }
    let control_listen = parse_addr("control_listen", &given.control_listen)?;
    let tls_listen = given.tls_listen.as_deref().map(|a| parse_addr("tls_listen", a)).transpose()?;
    let dns_resolver = given.dns_resolver.as_deref().map(|a| parse_addr("dns_resolver", a)).transpose()?;
    let origin = origin_listen(given)?;
    let acme = acme_settings(given)?;
    Ok(ControlPlaneSettings {
        data_dir,
        database_url: given.database_url.clone(),
        base_domain,
        control_listen,
        tls_listen,
        log_retention: Duration::from_secs(given.log_retention_h * 3600),
        usage_retention: Duration::from_secs(given.usage_retention_d * 86_400),
        max_blob_bytes: given.max_blob_mb * 1024 * 1024,
        domain_verify_http_port: given.domain_verify_http_port,
        dns_resolver,
        public_http_port: given.public_http_port,
        blob_store: blob_store(given)?,
        blob_gc_grace: blob_gc_grace(given)?,
        origin,
        acme,
    })
}

/// `--acme-email` turns ACME on (an explicit choice: no certificate is
/// ordered, and no CA's terms agreed to, unless the operator names a
/// contact); the other `--acme-*` need it. The directory must be https
/// (RFC 8555 §6.1), the CA file readable PEM.
fn acme_settings(given: &Given) -> Result<Option<isocloud_controlplane::AcmeOptions>, SettingsError> {
    let Some(email) = &given.acme_email else {
        if given.acme_directory.is_some() || given.acme_ca_file.is_some() || given.acme_challenge.is_some() {
            let field = if given.acme_directory.is_some() {
                "acme_directory"
            } else if given.acme_ca_file.is_some() {
                "acme_ca_file"
            } else {
                "acme_challenge"
            };
            return Err(invalid(field, "ACME is off without --acme-email: give the account's contact to turn it on"));
        }
        return Ok(None);
    };
    let email = email.trim();
    let valid_email = email.len() <= 254
        && email.split_once('@').is_some_and(|(user, host)| !user.is_empty() && host.contains('.'))
        && !email.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ',' | ';'));
    if !valid_email {
        return Err(invalid("acme_email", format!("{email:?} is not an email address")));
    }
    let directory_url =
        given.acme_directory.clone().unwrap_or_else(|| isocloud_controlplane::LETS_ENCRYPT_DIRECTORY.into());
    let parsed = Url::parse(&directory_url)
        .map_err(|e| invalid("acme_directory", format!("{directory_url:?} is not a URL: {e}")))?;
    if parsed.scheme() != "https" || parsed.host_str().is_none() {
        return Err(invalid("acme_directory", format!("{directory_url:?} is not an https URL (RFC 8555 needs TLS)")));
    }
    let ca_pem = match &given.acme_ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| invalid("acme_ca_file", format!("{}: {e}", path.display())))?;
            if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(invalid("acme_ca_file", format!("{} holds no PEM certificate", path.display())));
            }
            Some(pem)
        }
        None => None,
    };
    let challenge = match given.acme_challenge.unwrap_or(AcmeChallenge::Http01) {
        AcmeChallenge::Http01 => isocloud_controlplane::ChallengeKind::Http01,
        // Answered on the TLS listener: a node without one would order
        // challenges only other nodes could answer (if any has a listener).
        AcmeChallenge::TlsAlpn01 if given.tls_listen.is_none() => {
            return Err(invalid(
                "acme_challenge",
                "tls-alpn-01 is answered by the TLS listener: give --tls-listen (the CA connects to port 443)",
            ));
        }
        AcmeChallenge::TlsAlpn01 => isocloud_controlplane::ChallengeKind::TlsAlpn01,
    };
    Ok(Some(isocloud_controlplane::AcmeOptions {
        directory_url,
        email: Some(email.to_owned()),
        ca_pem,
        renew_before: Duration::from_secs(given.acme_renew_before_days * 86_400),
        retry_min: Duration::from_secs(given.acme_retry_min_s),
        challenge,
    }))
}

/// `--origin-listen` with its keys (`--origin-secret`, `--origin-secret-file`),
/// validated: a listener needs a key, a key needs the listener.
fn origin_listen(given: &Given) -> Result<Option<OriginListen>, SettingsError> {
    use isocloud_controlplane::origin_http::{OriginHttpError, OriginKey, check_keys};
    let Some(addr) = given.origin_listen.as_deref() else {
        if !given.origin_secret.is_empty() || !given.origin_secret_file.is_empty() {
            return Err(invalid("origin_secret", "origin keys are --origin-listen's: without it nothing reads them"));
        }
        if given.origin_tls_cert.is_some() || given.origin_tls_key.is_some() {
            return Err(invalid(
                "origin_tls_cert",
                "the origin certificate is --origin-listen's: without it nothing serves it",
            ));
        }
        return Ok(None);
    };
    let tls =
        certificate_files(("origin_tls_cert", &given.origin_tls_cert), ("origin_tls_key", &given.origin_tls_key))?;
    let addr = parse_addr("origin_listen", addr)?;
    let mut keys: Vec<OriginKey> = Vec::new();
    let mut add = |field: &'static str, kid: &str, secret: &[u8]| {
        if keys.iter().any(|k| k.kid == kid) {
            return Err(invalid(field, format!("origin key {kid:?} is configured twice")));
        }
        keys.push(OriginKey { kid: kid.to_owned(), secret: Secret::new(secret) });
        Ok(())
    };
    for spec in &given.origin_secret {
        let (kid, secret) = split_pair("origin_secret", spec)?;
        add("origin_secret", kid, secret.as_bytes())?;
    }
    for spec in &given.origin_secret_file {
        let (kid, path) = split_pair("origin_secret_file", spec)?;
        let text = std::fs::read_to_string(path).map_err(|e| invalid("origin_secret_file", format!("{path}: {e}")))?;
        add("origin_secret_file", kid, text.trim_end_matches(['\n', '\r']).as_bytes())?;
    }
    check_keys(&keys).map_err(|e| match e {
        OriginHttpError::NoKeys => invalid(
            "origin_secret",
            "--origin-listen needs at least one --origin-secret KID=SECRET or --origin-secret-file KID=PATH: \
             every RPC must be signed",
        ),
        e => invalid("origin_secret", e.to_string()),
    })?;
    Ok(Some(OriginListen { addr, keys, tls }))
}

/// `--blob-store` and the options that only it reads, validated (the
/// bucket's name and the prefix are checked when the store opens).
fn blob_store(given: &Given) -> Result<Option<isocloud_controlplane::S3Config>, SettingsError> {
    let Some(url) = &given.blob_store else {
        let only_with_a_bucket = [
            ("blob_store_endpoint", given.blob_store_endpoint.is_some()),
            ("blob_store_region", given.blob_store_region.is_some()),
            ("blob_store_access_key_id", given.blob_store_access_key_id.is_some()),
            ("blob_store_secret_access_key_file", given.blob_store_secret_access_key_file.is_some()),
        ];
        if let Some((field, _)) = only_with_a_bucket.iter().find(|(_, set)| *set) {
            return Err(invalid(field, "belongs to --blob-store s3://…: the data dir's blobs need no bucket"));
        }
        return Ok(None);
    };
    if !url.starts_with("s3://") || url.len() == "s3://".len() {
        return Err(invalid("blob_store", format!("{url:?} is not an s3://BUCKET/PREFIX URL")));
    }
    if let Some(endpoint) = &given.blob_store_endpoint {
        let parsed = Url::parse(endpoint)
            .map_err(|e| invalid("blob_store_endpoint", format!("{endpoint:?} is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(invalid("blob_store_endpoint", format!("{endpoint:?} is not an http(s) URL")));
        }
    }
    let secret_access_key = match &given.blob_store_secret_access_key_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid("blob_store_secret_access_key_file", format!("{}: {e}", path.display())))?;
            let secret = text.trim_end_matches(['\n', '\r']);
            if secret.is_empty() {
                return Err(invalid("blob_store_secret_access_key_file", format!("{} is empty", path.display())));
            }
            Some(secret.to_owned())
        }
        None => None,
    };
    Ok(Some(isocloud_controlplane::S3Config {
        endpoint: given.blob_store_endpoint.clone(),
        region: given.blob_store_region.clone(),
        access_key_id: given.blob_store_access_key_id.clone(),
        secret_access_key,
        ..isocloud_controlplane::S3Config::new(url.clone())
    }))
}

/// `--blob-gc-grace-s`: a build holds the blobs it was given, not yet
/// referenced, for up to --build-timeout-s, and a confirmed blob is kept at
/// least half the grace period.
fn blob_gc_grace(given: &Given) -> Result<Duration, SettingsError> {
    if given.blob_gc_grace_s < 2 * given.build_timeout_s {
        return Err(invalid(
            "blob_gc_grace_s",
            format!(
                "{} s is less than twice build_timeout_s ({} s): a build's blobs could be collected under it",
                given.blob_gc_grace_s, given.build_timeout_s
            ),
        ));
    }
    Ok(Duration::from_secs(given.blob_gc_grace_s))
}

/// The build step's settings, validated.
fn build_settings(given: &Given) -> Result<BuildSettings, SettingsError> {
    let registry = |field: &'static str, given: Option<&str>| -> Result<Option<url::Url>, SettingsError> {
        let Some(given) = given else { return Ok(None) };
        let mut url = url::Url::parse(given).map_err(|e| invalid(field, format!("{given:?} is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(invalid(field, format!("{given:?} is not an http(s) URL")));
        }
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        Ok(Some(url))
    };
    let npm_registry = registry("npm_registry", given.npm_registry.as_deref())?;
    let jsr_registry = registry("jsr_registry", given.jsr_registry.as_deref())?;
    for host in &given.build_allow_import {
        if host.is_empty() || host.contains(['/', ',', ' ', '@']) {
            return Err(invalid("build_allow_import", format!("{host:?} is not a host or host:port")));
        }
    }
    Ok(BuildSettings {
        npm_registry,
        jsr_registry,
        timeout: Duration::from_secs(given.build_timeout_s),
        memory_limit_bytes: given.build_memory_mb * 1024 * 1024,
        allow_import: given.build_allow_import.clone(),
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
