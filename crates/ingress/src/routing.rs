//! Which deployment serves a request: by a verified subhost token, or by Host.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use isocloud_auth::{SubhostVerifier, TokenError};
use isocloud_origin::{Origin, RemoteOrigins};
use isocloud_protocol::ErrorCode;

use crate::EdgeError;

pub const SUBHOST_HEADER: &str = "x-deno-subhost";

/// What the router decided for a request.
pub enum Routed {
    Serve(Route),
    /// Plain HTTP to a host that has a certificate: 308 to this URL.
    RedirectToHttps(String),
}

/// A control plane's table of hosts (production and deployment URLs, custom
/// domains). Looked up on every request: implementations answer from memory.
pub trait HostRoutes: Send + Sync + 'static {
    /// `hostname`: lowercase, without port.
    fn resolve(&self, hostname: &str) -> Option<HostRoute>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    pub deployment_id: String,
    /// The host has a certificate: plain HTTP is redirected to HTTPS.
    pub https_only: bool,
}

/// Host routing of a control plane: its table and the origin that boots
/// what the table names.
pub struct HostRouting {
    pub routes: Arc<dyn HostRoutes>,
    pub origin: Arc<dyn Origin>,
    /// The public HTTPS port, for redirects (omitted when 443).
    pub https_port: Option<u16>,
}

/// Where a request goes and what the isolate sees as `request.url`'s origin.
pub struct Route {
    pub origin: Arc<dyn Origin>,
    pub deployment_id: String,
    pub public_scheme: &'static str,
    pub public_host: String,
    /// The end user's address as a verified relay gave it (the first
    /// `x-forwarded-for` entry); for a request routed by `Host`, the
    /// connection's peer is the client and this is `None`.
    pub relayed_client: Option<IpAddr>,
}

/// Subhosting: tokens verified per subhoster, the origin a token names
/// from the runner's registry of remote origins.
pub struct SubhostRouting {
    verifier: SubhostVerifier,
    origins: Arc<RemoteOrigins>,
}

impl SubhostRouting {
    /// `origins` holds the same subhosters as `verifier`.
    pub fn new(verifier: SubhostVerifier, origins: Arc<RemoteOrigins>) -> Self {
        Self { verifier, origins }
    }
}

#[derive(Default)]
pub struct Router {
    /// The apps-folder origin: `<name>.localhost` → deployment `<name>`.
    apps: Option<Arc<dyn Origin>>,
    subhost: Option<SubhostRouting>,
    hosts: Option<HostRouting>,
}

impl Router {
    pub fn new(apps: Option<Arc<dyn Origin>>, subhost: Option<SubhostRouting>) -> Self {
        Self { apps, subhost, hosts: None }
    }

    /// Routes requests without a subhost token by the control plane's table
    /// (before the apps folder, when both are given).
    pub fn with_hosts(mut self, hosts: HostRouting) -> Self {
        self.hosts = Some(hosts);
        self
    }

    /// `secure`: the request came over TLS. A request whose host is
    /// ambiguous (see [`request_authority`]) is 400 before anything else.
    pub fn route<B>(&self, request: &http::Request<B>, secure: bool) -> Result<Routed, EdgeError> {
        let (headers, uri) = (request.headers(), request.uri());
        let authority = request_authority(request.version(), headers, uri)?;
        if let Some(token) = headers.get(SUBHOST_HEADER) {
            return self.route_subhost(token, headers, authority).map(Routed::Serve);
        }
        let host = authority.ok_or_else(|| EdgeError::new(ErrorCode::BadRequest, "the request names no host"))?;
        let not_found = || EdgeError::new(ErrorCode::DeploymentNotFound, format!("no deployment serves {host}"));
        let scheme = if secure { "https" } else { "http" };
        if let Some(hosts) = &self.hosts
            && let Some(found) = hosts.routes.resolve(hostname(&host))
        {
            if found.https_only && !secure {
                return Ok(Routed::RedirectToHttps(https_location(&host, uri, hosts.https_port)));
            }
            return Ok(Routed::Serve(Route {
                origin: hosts.origin.clone(),
                deployment_id: found.deployment_id,
                public_scheme: scheme,
                public_host: host,
                relayed_client: None,
            }));
        }
        let name = hostname(&host).strip_suffix(".localhost").ok_or_else(not_found)?.to_owned();
        let origin = self.apps.clone().ok_or_else(not_found)?;
        if name.is_empty() || name.contains('.') {
            return Err(not_found());
        }
        Ok(Routed::Serve(Route {
            origin,
            deployment_id: name,
            public_scheme: scheme,
            public_host: host,
            relayed_client: None,
        }))
    }

    /// `authority`: the request's own, already checked ([`request_authority`]).
    fn route_subhost(
        &self,
        token: &http::HeaderValue,
        headers: &HeaderMap,
        authority: Option<String>,
    ) -> Result<Route, EdgeError> {
        let unauthorized = |message: String| EdgeError::new(ErrorCode::Unauthorized, message);
        let Some(subhost) = &self.subhost else {
            return Err(unauthorized("this runner accepts no x-deno-subhost tokens".into()));
        };
        let token = token.to_str().map_err(|_| unauthorized("x-deno-subhost: not a valid token".into()))?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let claims = subhost
            .verifier
            .verify(token, now)
            .map_err(|e: TokenError| unauthorized(format!("x-deno-subhost: {e}")))?;
        // A verified relay speaks for the end user: its forwarded host and
        // scheme are what the tenant's code should see.
        let public_host = headers
            .get("x-forwarded-host")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(',').next().unwrap_or(v).trim().to_owned())
            .filter(|v| !v.is_empty())
            .or(authority)
            .ok_or_else(|| EdgeError::new(ErrorCode::BadRequest, "the request names no host"))?;
        let public_scheme = match headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()) {
            Some(p) if p.eq_ignore_ascii_case("https") => "https",
            _ => "http",
        };
        // Its end user is the first address of the chain it forwarded; one
        // that is not an address is dropped (the relay's own address stands).
        let relayed_client = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical());
        // Verified claims name a configured subhoster and a root it may use,
        // the rule the registry applies too.
        let origin = subhost
            .origins
            .get(claims.kid(), claims.rpc_root())
            .ok_or_else(|| unauthorized("the token's rpc_root is not one this subhoster may use".into()))?;
        Ok(Route {
            origin,
            deployment_id: claims.deployment_id().to_owned(),
            public_scheme,
            public_host,
            relayed_client,
        })
    }
}

/// Where plain HTTP to a host with a certificate is sent (308): the same
/// host and target over HTTPS, on `https_port` (omitted when 443 or
/// unknown). `host`: the request's authority, its port dropped. The
/// runner's router and `isocloud edge` apply this one rule.
pub fn https_location(host: &str, uri: &http::Uri, https_port: Option<u16>) -> String {
    let authority = match https_port {
        None | Some(443) => hostname(host).to_owned(),
        Some(port) => format!("{}:{port}", hostname(host)),
    };
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    format!("https://{authority}{path}")
}

/// The one host a request names, lowercase: the request target's authority
/// (HTTP/2 `:authority`, or an HTTP/1.1 absolute-form target) or else `Host`.
/// Where two sources could disagree, the request is refused (400) rather
/// than routed by one while a proxy in front of the runner looked at the
/// other:
/// - more than one `Host`, or a `Host` that is not a host (RFC 9112 §3.2);
/// - an HTTP/1.1 request without `Host` (RFC 9112 §3.2);
/// - a `Host` that names another authority than the target (RFC 9112 §3.2.2
///   makes the client send them identical; RFC 9113 §8.3.1 for HTTP/2).
///
/// `Ok(None)`: the request names no host at all (HTTP/1.0, or HTTP/2 without
/// `:authority` or `Host`).
pub fn request_authority(
    version: http::Version,
    headers: &HeaderMap,
    uri: &http::Uri,
) -> Result<Option<String>, EdgeError> {
    let bad = |message: String| EdgeError::new(ErrorCode::BadRequest, message);
    let mut hosts = headers.get_all(http::header::HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(bad("the request has more than one Host header".into()));
    }
    let host = match host_header {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(valid_host)
                .ok_or_else(|| bad("the Host header does not name a host".into()))?,
        ),
        None if version == http::Version::HTTP_11 => {
            return Err(bad("an HTTP/1.1 request must carry a Host header".into()));
        }
        None => None,
    };
    let Some(authority) = uri.authority() else {
        return Ok(host);
    };
    let target = valid_host(authority.as_str())
        .ok_or_else(|| bad("the request target's authority does not name a host".into()))?;
    if let Some(host) = host {
        let default_port = match uri.scheme_str() {
            Some("https") => "443",
            _ => "80",
        };
        if without_port(&host, default_port) != without_port(&target, default_port) {
            return Err(bad(format!(
                "the Host header ({host}) disagrees with the request target's authority ({target})"
            )));
        }
    }
    Ok(Some(target))
}

/// `text` lowercased, if it can be a host with an optional port (no user
/// info, path or list).
fn valid_host(text: &str) -> Option<String> {
    let host = text.trim().to_ascii_lowercase();
    let valid = !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b));
    valid.then_some(host)
}

/// `host:<default port>` and `host` are one authority.
fn without_port<'a>(host: &'a str, default_port: &str) -> &'a str {
    host.strip_suffix(default_port).and_then(|h| h.strip_suffix(':')).unwrap_or(host)
}

/// `host:port` → `host` (IPv6 literals keep their brackets).
fn hostname(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map(|(h, _)| &host[..=h.len()]).unwrap_or(host);
    }
    host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn hostname_strips_ports() {
        assert_eq!(hostname("hello.localhost:8080"), "hello.localhost");
        assert_eq!(hostname("hello.localhost"), "hello.localhost");
        assert_eq!(hostname("[::1]:80"), "[::1]");
    }

    use http::Version;

    fn authority(version: Version, hosts: &[&str], uri: &str) -> Result<Option<String>, ErrorCode> {
        let mut headers = HeaderMap::new();
        for host in hosts {
            headers.append(http::header::HOST, host.parse().unwrap());
        }
        request_authority(version, &headers, &uri.parse().unwrap()).map_err(|e| e.code)
    }

    #[test]
    fn the_host_header_names_the_host() {
        let host = authority(Version::HTTP_11, &["Hello.LOCALHOST:1"], "/").unwrap();
        assert_eq!(host.as_deref(), Some("hello.localhost:1"));
        assert_eq!(authority(Version::HTTP_10, &[], "/"), Ok(None));
        assert_eq!(authority(Version::HTTP_2, &[], "/"), Ok(None));
    }

    #[test]
    fn the_target_authority_wins_only_when_host_agrees() {
        let uri = "http://a.localhost:8080/p";
        for version in [Version::HTTP_11, Version::HTTP_2] {
            assert_eq!(authority(version, &["A.localhost:8080"], uri).unwrap().as_deref(), Some("a.localhost:8080"));
            assert_eq!(authority(version, &["b.localhost:8080"], uri), Err(ErrorCode::BadRequest));
            assert_eq!(authority(version, &["a.localhost:8081"], uri), Err(ErrorCode::BadRequest));
            assert_eq!(authority(version, &["a.localhost"], uri), Err(ErrorCode::BadRequest));
        }
        // HTTP/2 without Host: :authority alone.
        assert_eq!(authority(Version::HTTP_2, &[], uri).unwrap().as_deref(), Some("a.localhost:8080"));
        // The default port is no disagreement.
        let host = authority(Version::HTTP_2, &["a.localhost:80"], "http://a.localhost/").unwrap();
        assert_eq!(host.as_deref(), Some("a.localhost"));
        let host = authority(Version::HTTP_2, &["a.localhost"], "https://a.localhost:443/").unwrap();
        assert_eq!(host.as_deref(), Some("a.localhost:443"));
        assert_eq!(authority(Version::HTTP_2, &["a.localhost:80"], "https://a.localhost/"), Err(ErrorCode::BadRequest));
    }

    #[test]
    fn ambiguous_or_garbage_hosts_are_bad_requests() {
        let cases: [(Version, &[&str], &str); 7] = [
            (Version::HTTP_11, &["a.localhost", "b.localhost"], "/"),
            (Version::HTTP_11, &["a.localhost", "a.localhost"], "/"),
            (Version::HTTP_2, &["a.localhost", "a.localhost"], "http://a.localhost/"),
            (Version::HTTP_11, &[], "/"),
            (Version::HTTP_11, &[], "http://a.localhost/"),
            (Version::HTTP_11, &["a/b"], "/"),
            (Version::HTTP_11, &["a.localhost, b.localhost"], "/"),
        ];
        for (version, hosts, uri) in cases {
            assert_eq!(authority(version, hosts, uri), Err(ErrorCode::BadRequest), "{version:?} {hosts:?} {uri}");
        }
        assert_eq!(authority(Version::HTTP_11, &["a.localhost"], "http://u@a.localhost/"), Err(ErrorCode::BadRequest));
    }

    // Routing decisions, in process: by Host (the apps folder, a control
    // plane's table) and by a verified subhost token.

    use isocloud_auth::{Secret, Subhoster, sign_subhost_token};
    use isocloud_origin::{AppsOrigin, RemoteOriginOptions};

    pub(crate) const KID: &str = "relay";
    pub(crate) const RPC_ROOT: &str = "http://127.0.0.1:9/rpc/";

    pub(crate) fn apps() -> Arc<dyn Origin> {
        Arc::new(AppsOrigin::new("/nonexistent-apps".into()))
    }

    pub(crate) fn secret() -> Secret {
        Secret::from("a subhoster's shared secret")
    }

    /// Routes subhost tokens of `KID` signed with `secret()`, and apps by Host.
    pub(crate) fn subhost_router() -> Router {
        let subhoster = Subhoster {
            kid: KID.to_owned(),
            secret: secret(),
            rpc_root: RPC_ROOT.parse().unwrap(),
            allowed_rpc_root_prefixes: Vec::new(),
        };
        let verifier = SubhostVerifier::new(vec![subhoster.clone()]).unwrap();
        let origins = Arc::new(RemoteOrigins::new([subhoster], RemoteOriginOptions::default()));
        Router::new(Some(apps()), Some(SubhostRouting::new(verifier, origins)))
    }

    fn now_s() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    /// A relay token for `deployment_id`, valid for a minute.
    pub(crate) fn token(deployment_id: &str) -> String {
        let claims = serde_json::json!({ "deployment_id": deployment_id, "exp": now_s() + 60 });
        sign_subhost_token(Some(KID), &secret(), &claims)
    }

    fn request(host: &str, headers: &[(&str, &str)]) -> http::Request<()> {
        let mut builder = http::Request::get("/path?q=1").header(http::header::HOST, host);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn served(routed: Result<Routed, EdgeError>) -> Route {
        match routed {
            Ok(Routed::Serve(route)) => route,
            Ok(Routed::RedirectToHttps(location)) => panic!("expected a route, got a redirect to {location}"),
            Err(e) => panic!("expected a route, got {:?}: {}", e.code, e.message),
        }
    }

    fn refused(routed: Result<Routed, EdgeError>) -> ErrorCode {
        match routed {
            Err(e) => e.code,
            Ok(_) => panic!("expected a refusal"),
        }
    }

    #[test]
    fn apps_route_by_the_host_s_first_label_under_localhost() {
        let router = Router::new(Some(apps()), None);
        let route = served(router.route(&request("Hello.localhost:8080", &[]), false));
        assert_eq!((route.origin.name(), route.deployment_id.as_str()), ("apps", "hello"));
        assert_eq!((route.public_scheme, route.public_host.as_str()), ("http", "hello.localhost:8080"));
        assert_eq!(served(router.route(&request("hello.localhost", &[]), true)).public_scheme, "https");
        for host in ["example.com", "a.b.localhost", ".localhost", "localhost"] {
            assert_eq!(refused(router.route(&request(host, &[]), false)), ErrorCode::DeploymentNotFound, "{host}");
        }
        // Without an apps folder, nothing is served by Host.
        let none = Router::default();
        assert_eq!(refused(none.route(&request("hello.localhost", &[]), false)), ErrorCode::DeploymentNotFound);
    }

    /// A control plane's table: `app.example` (no certificate) and
    /// `secure.example` (one), both to deployment `d1`.
    struct Table;

    impl HostRoutes for Table {
        fn resolve(&self, hostname: &str) -> Option<HostRoute> {
            let https_only = match hostname {
                "app.example" => false,
                "secure.example" => true,
                _ => return None,
            };
            Some(HostRoute { deployment_id: "d1".into(), https_only })
        }
    }

    fn table_router(https_port: Option<u16>) -> Router {
        Router::new(Some(apps()), None).with_hosts(HostRouting { routes: Arc::new(Table), origin: apps(), https_port })
    }

    #[test]
    fn a_control_plane_s_table_routes_first_and_redirects_plain_http_to_its_certificates() {
        let router = table_router(Some(8443));
        let route = served(router.route(&request("APP.example:8080", &[]), false));
        assert_eq!((route.deployment_id.as_str(), route.public_host.as_str()), ("d1", "app.example:8080"));
        // Over TLS, a host with a certificate is served ...
        let route = served(router.route(&request("secure.example", &[]), true));
        assert_eq!((route.deployment_id.as_str(), route.public_scheme), ("d1", "https"));
        // ... and over plain HTTP sent there, on the public HTTPS port.
        match router.route(&request("secure.example:8080", &[]), false) {
            Ok(Routed::RedirectToHttps(location)) => assert_eq!(location, "https://secure.example:8443/path?q=1"),
            _ => panic!("expected a redirect"),
        }
        match table_router(Some(443)).route(&request("secure.example", &[]), false) {
            Ok(Routed::RedirectToHttps(location)) => assert_eq!(location, "https://secure.example/path?q=1"),
            _ => panic!("expected a redirect"),
        }
        // Not in the table: the apps folder still answers for its hosts.
        assert_eq!(served(router.route(&request("hello.localhost", &[]), false)).deployment_id, "hello");
        assert_eq!(refused(router.route(&request("other.example", &[]), false)), ErrorCode::DeploymentNotFound);
    }

    #[test]
    fn a_verified_subhost_token_routes_to_its_deployment_with_the_relay_s_host_and_scheme() {
        let router = subhost_router();
        let token = token("dep-1");
        let headers = [
            (SUBHOST_HEADER, token.as_str()),
            ("x-forwarded-host", "shop.example, inner.example"),
            ("x-forwarded-proto", "HTTPS"),
        ];
        let route = served(router.route(&request("runner.internal", &headers), false));
        assert_eq!(route.deployment_id, "dep-1");
        assert_eq!(route.origin.name(), format!("{KID}@{RPC_ROOT}"));
        assert_eq!((route.public_scheme, route.public_host.as_str()), ("https", "shop.example"));
        // Without forwarded headers: the request's own host, plain HTTP.
        let route = served(router.route(&request("runner.internal", &headers[..1]), true));
        assert_eq!((route.public_scheme, route.public_host.as_str()), ("http", "runner.internal"));
        // One remote origin per (subhoster, rpc root), made once.
        let again = served(router.route(&request("runner.internal", &headers[..1]), false));
        assert!(Arc::ptr_eq(&route.origin, &again.origin));
    }

    #[test]
    fn a_subhost_token_that_does_not_verify_is_refused_never_routed_by_host() {
        let router = subhost_router();
        // The probe: this host routes (apps), and a good token routes.
        assert_eq!(served(router.route(&request("hello.localhost", &[]), false)).deployment_id, "hello");
        let good = token("dep-1");
        assert_eq!(
            served(router.route(&request("hello.localhost", &[(SUBHOST_HEADER, &good)]), false)).deployment_id,
            "dep-1"
        );
        let expired = sign_subhost_token(
            Some(KID),
            &secret(),
            &serde_json::json!({ "deployment_id": "dep-1", "exp": now_s() - 3600 }),
        );
        let forged = sign_subhost_token(
            Some(KID),
            &Secret::from("not the secret"),
            &serde_json::json!({ "deployment_id": "dep-1", "exp": now_s() + 60 }),
        );
        let unknown_kid = sign_subhost_token(
            Some("nobody"),
            &secret(),
            &serde_json::json!({ "deployment_id": "dep-1", "exp": now_s() + 60 }),
        );
        let mut tampered = good.clone();
        tampered.pop();
        for bad in [expired.as_str(), forged.as_str(), unknown_kid.as_str(), tampered.as_str(), "garbage", ""] {
            let routed = router.route(&request("hello.localhost", &[(SUBHOST_HEADER, bad)]), false);
            assert_eq!(refused(routed), ErrorCode::Unauthorized, "{bad}");
        }
        // A runner without subhosters takes no token at all.
        let apps_only = Router::new(Some(apps()), None);
        assert_eq!(
            refused(apps_only.route(&request("hello.localhost", &[(SUBHOST_HEADER, &good)]), false)),
            ErrorCode::Unauthorized
        );
    }
}
