//! Which deployment serves a request: by a verified subhost token, or by Host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use isocloud_auth::{SubhostVerifier, TokenError};
use isocloud_origin::{Origin, RemoteOrigin, RemoteOriginOptions};
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
}

/// Subhosting: tokens verified per subhoster, one remote origin per
/// (subhoster, rpc root), created on first use.
pub struct SubhostRouting {
    verifier: SubhostVerifier,
    client: reqwest::Client,
    options: RemoteOriginOptions,
    origins: Mutex<HashMap<(String, String), Arc<dyn Origin>>>,
}

/// A bound on distinct (kid, rpc_root) origins kept; allowed prefixes limit
/// them already, this keeps a misconfigured wide prefix from growing memory.
const MAX_REMOTE_ORIGINS: usize = 4096;

impl SubhostRouting {
    pub fn new(verifier: SubhostVerifier, options: RemoteOriginOptions) -> Self {
        let client = RemoteOrigin::client(&options);
        Self { verifier, client, options, origins: Mutex::new(HashMap::new()) }
    }

    fn origin_for(&self, kid: &str, rpc_root: &url::Url) -> Arc<dyn Origin> {
        let key = (kid.to_owned(), rpc_root.to_string());
        let mut origins = self.origins.lock().expect("origins poisoned");
        if let Some(origin) = origins.get(&key) {
            return origin.clone();
        }
        let subhoster = self.verifier.subhoster(kid).expect("verified claims name a configured subhoster");
        let origin: Arc<dyn Origin> = Arc::new(RemoteOrigin::new(
            kid.to_owned(),
            subhoster.secret.clone(),
            rpc_root.clone(),
            self.client.clone(),
            self.options.clone(),
        ));
        if origins.len() >= MAX_REMOTE_ORIGINS {
            origins.clear();
        }
        origins.insert(key, origin.clone());
        origin
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

    /// `secure`: the request came over TLS.
    pub fn route(&self, headers: &HeaderMap, uri: &http::Uri, secure: bool) -> Result<Routed, EdgeError> {
        if let Some(token) = headers.get(SUBHOST_HEADER) {
            return self.route_subhost(token, headers, uri).map(Routed::Serve);
        }
        let host = request_host(headers, uri)
            .ok_or_else(|| EdgeError::new(ErrorCode::BadRequest, "the request names no host"))?;
        let not_found = || EdgeError::new(ErrorCode::DeploymentNotFound, format!("no deployment serves {host}"));
        let scheme = if secure { "https" } else { "http" };
        if let Some(hosts) = &self.hosts
            && let Some(found) = hosts.routes.resolve(hostname(&host))
        {
            if found.https_only && !secure {
                let authority = match hosts.https_port {
                    None | Some(443) => hostname(&host).to_owned(),
                    Some(port) => format!("{}:{port}", hostname(&host)),
                };
                let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                return Ok(Routed::RedirectToHttps(format!("https://{authority}{path}")));
            }
            return Ok(Routed::Serve(Route {
                origin: hosts.origin.clone(),
                deployment_id: found.deployment_id,
                public_scheme: scheme,
                public_host: host,
            }));
        }
        let name = hostname(&host).strip_suffix(".localhost").ok_or_else(not_found)?.to_owned();
        let origin = self.apps.clone().ok_or_else(not_found)?;
        if name.is_empty() || name.contains('.') {
            return Err(not_found());
        }
        Ok(Routed::Serve(Route { origin, deployment_id: name, public_scheme: scheme, public_host: host }))
    }

    fn route_subhost(
        &self,
        token: &http::HeaderValue,
        headers: &HeaderMap,
        uri: &http::Uri,
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
            .or_else(|| request_host(headers, uri))
            .ok_or_else(|| EdgeError::new(ErrorCode::BadRequest, "the request names no host"))?;
        let public_scheme = match headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()) {
            Some(p) if p.eq_ignore_ascii_case("https") => "https",
            _ => "http",
        };
        let origin = subhost.origin_for(claims.kid(), claims.rpc_root());
        Ok(Route { origin, deployment_id: claims.deployment_id().to_owned(), public_scheme, public_host })
    }
}

/// The host the client asked for: `:authority` (HTTP/2) or `Host`.
fn request_host(headers: &HeaderMap, uri: &http::Uri) -> Option<String> {
    let host = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned))?;
    let host = host.trim().to_ascii_lowercase();
    let valid = !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b));
    valid.then_some(host)
}

/// `host:port` → `host` (IPv6 literals keep their brackets).
fn hostname(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map(|(h, _)| &host[..=h.len()]).unwrap_or(host);
    }
    host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_strips_ports() {
        assert_eq!(hostname("hello.localhost:8080"), "hello.localhost");
        assert_eq!(hostname("hello.localhost"), "hello.localhost");
        assert_eq!(hostname("[::1]:80"), "[::1]");
    }

    #[test]
    fn request_host_refuses_garbage() {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, "Hello.LOCALHOST:1".parse().unwrap());
        assert_eq!(request_host(&headers, &"/".parse().unwrap()).as_deref(), Some("hello.localhost:1"));
        headers.insert(http::header::HOST, "a/b".parse().unwrap());
        assert_eq!(request_host(&headers, &"/".parse().unwrap()), None);
    }
}
