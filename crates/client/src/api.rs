//! A small typed client of the control plane's `/api/v1`
//! (`docs/control-plane-api.md`). The answers are the `isocloud-api` types
//! the server writes: a field missing from one is a decode error naming it
//! (the CLI reports it), while fields they do not know are ignored, so a
//! newer server does not break an older CLI. The request bodies are
//! `isocloud-api` types too, the very ones the server reads.

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use url::Url;

use isocloud_api::ErrorEnvelope;
pub use isocloud_api::{
    Analytics, AnalyticsPoint, ApiErrorBody, AuditEntry, Build, CommitBody, CreateDeploymentBody, CreatedToken,
    Deployment, Domain, EnvVar, FileRef, LogEntry, MissingBlobs, Project, Token, Whoami, code,
};

use super::output::sanitize;

/// Ordinary calls; uploads and log streams run without an overall bound.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Enough of an unexpected (non-JSON) error body to recognise it.
const ERROR_SNIPPET_CHARS: usize = 300;
/// Pages of one list followed at most (a server that links forever).
const MAX_PAGES: usize = 10_000;

/// A failed call's `error` object, the `isocloud-api` type the server wrote.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub body: ApiErrorBody,
}

impl ApiError {
    /// Whether the server answered with this code (one of [`code`]).
    pub fn is(&self, code: &str) -> bool {
        self.body.code == code
    }
}

impl std::fmt::Display for ApiError {
    /// `<message> (<code>, field <field>)`. A message that already opens
    /// with `<field>: ` loses that prefix, so the field is not named twice.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ApiErrorBody { code, message, field, .. } = &self.body;
        match field {
            Some(field) => {
                let message = message.strip_prefix(&format!("{field}: ")).unwrap_or(message);
                write!(f, "{message} ({code}, field {field})")
            }
            None => write!(f, "{message} ({code})"),
        }
    }
}

/// Why a call to the control plane failed: its error answer, or the way
/// there and back.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The documented error answer: a code and a message.
    #[error("{0}")]
    Api(ApiError),
    /// An answer that is not the documented error shape (a proxy's 502 page, …).
    #[error("{method} {url} answered {status}: {body}")]
    Http { method: Method, url: String, status: StatusCode, body: String },
    #[error("cannot reach the control plane at {base} ({cause})")]
    Unreachable { base: String, cause: String },
    #[error("the control plane at {base} did not answer within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout { base: String },
    #[error("unexpected answer from {url}: {message}")]
    Decode { url: String, message: String },
    #[error("`{0}` is not a valid name")]
    InvalidName(String),
    /// The HTTP client could not be built (no TLS backend, …).
    #[error(transparent)]
    Setup(reqwest::Error),
}

impl CallError {
    pub fn code(&self) -> Option<&str> {
        match self {
            CallError::Api(e) => Some(&e.body.code),
            _ => None,
        }
    }

    /// What to try next, when the failure says.
    pub fn hint(&self) -> Option<String> {
        match self {
            CallError::Api(e) if e.is(code::UNAUTHORIZED) => {
                Some("the token was refused; log in again with `isocloud login --url URL`".to_string())
            }
            CallError::Api(e) if e.is(code::TOKEN_EXPIRED) || e.is(code::TOKEN_REVOKED) => Some(
                "ask an admin for a new token (`isocloud tokens create`), then `isocloud login --url URL`".to_string(),
            ),
            CallError::Api(e) if e.is(code::FORBIDDEN) => {
                Some("this token's scope does not cover that; the message names the scope needed".to_string())
            }
            CallError::Unreachable { .. } | CallError::Timeout { .. } => Some(
                "is the control plane running there? Pass --url (or ISOCLOUD_URL), or log in to another one \
                 with `isocloud login --url URL`"
                    .to_string(),
            ),
            _ => None,
        }
    }
}

/// The server's bound on one page of logs, and its page without `limit`.
const MAX_LOG_PAGE: u32 = 1000;
const DEFAULT_LOG_PAGE: usize = 100;

/// The filters of a log query.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub deployment: Option<String>,
    pub since: Option<String>,
    pub limit: Option<u32>,
}

/// `GET /projects/{name}/analytics`'s filters.
pub struct AnalyticsQuery {
    pub deployment: Option<String>,
    pub since: Option<String>,
    pub step_s: u64,
}

pub struct Api {
    base: Url,
    token: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(base: Url, token: String) -> Result<Self, CallError> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("isocloud-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(CallError::Setup)?;
        Ok(Api { base, token, http })
    }

    /// `<base>/api/v1/<segments…>`; each segment is percent-encoded, so a
    /// name typed by the user can never reach another route.
    /// `.`, `..` and empty segments are refused rather than sent: URL
    /// parsing would drop or resolve them, and none is a valid name.
    fn url(&self, segments: &[&str]) -> Result<Url, CallError> {
        if let Some(bad) = segments.iter().find(|s| matches!(**s, "" | "." | "..")) {
            return Err(CallError::InvalidName(bad.to_string()));
        }
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["api", "v1"]).extend(segments);
        }
        Ok(url)
    }

    pub(crate) fn request(&self, method: Method, segments: &[&str]) -> Result<RequestBuilder, CallError> {
        Ok(self.http.request(method, self.url(segments)?).bearer_auth(&self.token))
    }

    fn base_text(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_string()
    }

    /// Sends, and turns every failure into a [`CallError`].
    async fn send(&self, builder: RequestBuilder) -> Result<Response, CallError> {
        let (client, request) = builder.build_split();
        let request = request.map_err(|e| CallError::Decode { url: self.base_text(), message: e.to_string() })?;
        let (method, url) = (request.method().clone(), request.url().to_string());
        let response = client.execute(request).await.map_err(|e| {
            if e.is_timeout() {
                CallError::Timeout { base: self.base_text() }
            } else {
                CallError::Unreachable { base: self.base_text(), cause: root_cause(&e) }
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.unwrap_or_default();
        if let Ok(envelope) = serde_json::from_slice::<ErrorEnvelope>(&body) {
            return Err(CallError::Api(ApiError { body: envelope.error }));
        }
        let text: String = String::from_utf8_lossy(&body).chars().take(ERROR_SNIPPET_CHARS).collect();
        Err(CallError::Http { method, url, status, body: sanitize(text.trim()).into_owned() })
    }

    pub(crate) async fn json<T: DeserializeOwned>(&self, builder: RequestBuilder) -> Result<T, CallError> {
        let response = self.send(builder.timeout(REQUEST_TIMEOUT)).await?;
        let url = response.url().to_string();
        let body =
            response.bytes().await.map_err(|e| CallError::Decode { url: url.clone(), message: root_cause(&e) })?;
        decode(&body).map_err(|message| CallError::Decode { url, message })
    }

    /// A list, page after page (`Link: <…>; rel="next"`), until `max_items`
    /// are in hand or the list ends. Only a link to this server's own API
    /// is followed (the token goes with it).
    pub(crate) async fn pages<T: DeserializeOwned>(
        &self,
        first: RequestBuilder,
        max_items: usize,
    ) -> Result<Vec<T>, CallError> {
        let mut items = Vec::new();
        let mut next = Some(first);
        let mut pages = 0;
        while let Some(builder) = next.take() {
            let response = self.send(builder.timeout(REQUEST_TIMEOUT)).await?;
            let url = response.url().to_string();
            let link = response.headers().get(reqwest::header::LINK).and_then(|v| v.to_str().ok()).and_then(next_link);
            let body =
                response.bytes().await.map_err(|e| CallError::Decode { url: url.clone(), message: root_cause(&e) })?;
            let page: Vec<T> = decode(&body).map_err(|message| CallError::Decode { url, message })?;
            items.extend(page);
            pages += 1;
            if items.len() >= max_items || pages >= MAX_PAGES {
                items.truncate(max_items);
                break;
            }
            if let Some((path, query)) = link {
                let mut url = self.url(&[])?;
                let base = url.path().trim_end_matches('/').to_owned();
                url.set_path(&format!("{base}/{path}"));
                url.set_query(Some(&query));
                next = Some(self.http.get(url).bearer_auth(&self.token));
            }
        }
        Ok(items)
    }

    pub(crate) async fn empty(&self, builder: RequestBuilder) -> Result<(), CallError> {
        self.send(builder.timeout(REQUEST_TIMEOUT)).await.map(drop)
    }

    pub async fn whoami(&self) -> Result<Whoami, CallError> {
        self.json(self.request(Method::GET, &["whoami"])?).await
    }

    /// Every project, following the list's pages.
    pub async fn projects(&self) -> Result<Vec<Project>, CallError> {
        let first = self.request(Method::GET, &["projects"])?.query(&[("limit", 1000)]);
        self.pages(first, usize::MAX).await
    }

    pub async fn project(&self, name: &str) -> Result<Project, CallError> {
        self.json(self.request(Method::GET, &["projects", name])?).await
    }

    pub async fn create_project(&self, name: &str) -> Result<Project, CallError> {
        let body = isocloud_api::ProjectNameBody { name: name.to_owned() };
        self.json(self.request(Method::POST, &["projects"])?.json(&body)).await
    }

    pub async fn rename_project(&self, name: &str, new_name: &str) -> Result<Project, CallError> {
        let body = isocloud_api::ProjectNameBody { name: new_name.to_owned() };
        self.json(self.request(Method::PATCH, &["projects", name])?.json(&body)).await
    }

    pub async fn delete_project(&self, name: &str) -> Result<(), CallError> {
        self.empty(self.request(Method::DELETE, &["projects", name])?).await
    }

    pub async fn missing_blobs(&self, hashes: &[String]) -> Result<MissingBlobs, CallError> {
        let body = isocloud_api::BlobHashesBody { hashes: hashes.to_vec() };
        self.json(self.request(Method::POST, &["blobs", "missing"])?.json(&body)).await
    }

    /// Uploads one blob, streamed; no overall timeout, since a large blob
    /// on a slow link may take long.
    pub async fn put_blob(&self, hash: &str, size: u64, body: reqwest::Body) -> Result<(), CallError> {
        let request = self
            .request(Method::PUT, &["blobs", hash])?
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(body);
        self.send(request).await.map(drop)
    }

    pub async fn create_deployment(
        &self,
        project: &str,
        deployment: &CreateDeploymentBody,
    ) -> Result<Deployment, CallError> {
        self.json(self.request(Method::POST, &["projects", project, "deployments"])?.json(deployment)).await
    }

    /// The newest `limit` deployments, following the list's pages.
    pub async fn deployments(&self, project: &str, limit: u32) -> Result<Vec<Deployment>, CallError> {
        let page = limit.clamp(1, 1000);
        let first = self.request(Method::GET, &["projects", project, "deployments"])?.query(&[("limit", page)]);
        self.pages(first, limit as usize).await
    }

    /// `GET /deployments/{id}/build`: the build step's status, error and log.
    pub async fn build_log(&self, deployment_id: &str) -> Result<Build, CallError> {
        self.json(self.request(Method::GET, &["deployments", deployment_id, "build"])?).await
    }

    pub async fn promote(&self, project: &str, deployment_id: &str) -> Result<Project, CallError> {
        let body = isocloud_api::DeploymentRefBody { deployment_id: deployment_id.to_owned() };
        self.json(self.request(Method::POST, &["projects", project, "promote"])?.json(&body)).await
    }

    /// Without an id the server goes back to the production deployment
    /// before the current one, so no body is sent at all.
    pub async fn rollback(&self, project: &str, deployment_id: Option<&str>) -> Result<Project, CallError> {
        let mut request = self.request(Method::POST, &["projects", project, "rollback"])?;
        if let Some(id) = deployment_id {
            request = request.json(&isocloud_api::DeploymentRefBody { deployment_id: id.to_owned() });
        }
        self.json(request).await
    }

    pub async fn env(&self, project: &str) -> Result<Vec<EnvVar>, CallError> {
        self.json(self.request(Method::GET, &["projects", project, "env"])?).await
    }

    pub async fn set_env(&self, project: &str, name: &str, value: &str) -> Result<EnvVar, CallError> {
        let body = isocloud_api::EnvValueBody { value: value.to_owned() };
        self.json(self.request(Method::PUT, &["projects", project, "env", name])?.json(&body)).await
    }

    pub async fn delete_env(&self, project: &str, name: &str) -> Result<(), CallError> {
        self.empty(self.request(Method::DELETE, &["projects", project, "env", name])?).await
    }

    pub async fn domains(&self) -> Result<Vec<Domain>, CallError> {
        let first = self.request(Method::GET, &["domains"])?.query(&[("limit", 1000)]);
        self.pages(first, usize::MAX).await
    }

    pub async fn add_domain(&self, domain: &str, project: &str) -> Result<Domain, CallError> {
        let body = isocloud_api::NewDomainBody { domain: domain.to_owned(), project: Some(project.to_owned()) };
        self.json(self.request(Method::POST, &["domains"])?.json(&body)).await
    }

    /// Attaches the domain to `project`, or detaches it with `None`.
    pub async fn attach_domain(&self, domain: &str, project: Option<&str>) -> Result<Domain, CallError> {
        let body = isocloud_api::AttachDomainBody { project: project.map(str::to_owned) };
        self.json(self.request(Method::PATCH, &["domains", domain])?.json(&body)).await
    }

    pub async fn verify_domain(&self, domain: &str) -> Result<Domain, CallError> {
        self.json(self.request(Method::POST, &["domains", domain, "verify"])?).await
    }

    pub async fn put_certificate(&self, domain: &str, cert_pem: &str, key_pem: &str) -> Result<Domain, CallError> {
        let body = isocloud_api::CertificateBody { cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned() };
        self.json(self.request(Method::PUT, &["domains", domain, "certificate"])?.json(&body)).await
    }

    pub async fn delete_certificate(&self, domain: &str) -> Result<Domain, CallError> {
        self.json(self.request(Method::DELETE, &["domains", domain, "certificate"])?).await
    }

    pub async fn delete_domain(&self, domain: &str) -> Result<(), CallError> {
        self.empty(self.request(Method::DELETE, &["domains", domain])?).await
    }

    fn logs_request(&self, project: &str, query: &LogQuery) -> Result<RequestBuilder, CallError> {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        if let Some(deployment) = &query.deployment {
            pairs.push(("deployment", deployment.clone()));
        }
        if let Some(since) = &query.since {
            pairs.push(("since", since.clone()));
        }
        if let Some(limit) = query.limit {
            pairs.push(("limit", limit.min(MAX_LOG_PAGE).to_string()));
        }
        Ok(self.request(Method::GET, &["projects", project, "logs"])?.query(&pairs))
    }

    /// The newest `limit` entries (the server's default page without one),
    /// following the pages back in time past the server's page bound.
    pub async fn logs(&self, project: &str, query: &LogQuery) -> Result<Vec<LogEntry>, CallError> {
        let wanted = query.limit.map_or(DEFAULT_LOG_PAGE, |n| n as usize);
        self.pages(self.logs_request(project, query)?, wanted).await
    }

    /// A project's traffic by step (`GET /projects/{name}/analytics`).
    pub async fn analytics(&self, project: &str, query: &AnalyticsQuery) -> Result<Analytics, CallError> {
        let mut pairs: Vec<(&str, String)> = vec![("step_s", query.step_s.to_string())];
        if let Some(deployment) = &query.deployment {
            pairs.push(("deployment", deployment.clone()));
        }
        if let Some(since) = &query.since {
            pairs.push(("since", since.clone()));
        }
        self.json(self.request(Method::GET, &["projects", project, "analytics"])?.query(&pairs)).await
    }

    /// The NDJSON stream of `follow=true`; the caller reads it line by line.
    /// Its backlog is one page at most.
    pub async fn follow_logs(&self, project: &str, query: &LogQuery) -> Result<Response, CallError> {
        self.send(self.logs_request(project, query)?.query(&[("follow", "true")])).await
    }
}

/// Decodes an answer; the error names the field, with its path when it is
/// nested (`[0].verification: missing field `txt_name``).
pub(crate) fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(body)).map_err(|e| e.to_string())
}

/// The innermost cause (e.g. "Connection refused (os error 111)"): reqwest's
/// own message ("error sending request for url …") says nothing new.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// The next page of a `Link` header (`<path?query>; rel="next"`), as the
/// part of the path after `/api/v1/` and the query; `None` for anything
/// else, an absolute URL (another server) included.
fn next_link(header: &str) -> Option<(String, String)> {
    header.split(',').find_map(|link| {
        let (target, params) = link.trim().split_once(';')?;
        if !params.split(';').any(|p| p.trim() == "rel=\"next\"") {
            return None;
        }
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        let (path, query) = target.split_once('?')?;
        let rest = path.strip_prefix("/api/v1/")?;
        if rest.split('/').any(|segment| matches!(segment, "" | "." | "..")) {
            return None;
        }
        Some((rest.to_owned(), query.to_owned()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_next_link_into_this_api_is_followed() {
        let next = |header: &str| next_link(header);
        assert_eq!(
            next("</api/v1/projects?limit=2&cursor=WyJiIl0>; rel=\"next\""),
            Some(("projects".into(), "limit=2&cursor=WyJiIl0".into()))
        );
        assert_eq!(
            next("</api/v1/projects/a/deployments?limit=5&cursor=x>; rel=\"next\", </x>; rel=\"prev\""),
            Some(("projects/a/deployments".into(), "limit=5&cursor=x".into()))
        );
        assert_eq!(next("<https://elsewhere.example/api/v1/projects?cursor=x>; rel=\"next\""), None);
        assert_eq!(next("</api/v1/../admin?x=1>; rel=\"next\""), None);
        assert_eq!(next("</api/v1/projects?cursor=x>; rel=\"prev\""), None);
        assert_eq!(next("garbage"), None);
    }

    fn api(base: &str) -> Api {
        Api::new(Url::parse(base).unwrap(), "t".to_string()).unwrap()
    }

    #[test]
    fn segments_are_encoded_and_cannot_climb() {
        let api = api("http://127.0.0.1:8081");
        let url = |segments: &[&str]| api.url(segments).map(|u| u.to_string());
        assert_eq!(url(&["projects", "hello"]).unwrap(), "http://127.0.0.1:8081/api/v1/projects/hello");
        assert_eq!(url(&["projects", "../x?y#z"]).unwrap(), "http://127.0.0.1:8081/api/v1/projects/..%2Fx%3Fy%23z");
        assert_eq!(url(&["projects", "a%2F"]).unwrap(), "http://127.0.0.1:8081/api/v1/projects/a%252F");
        for bad in ["..", ".", ""] {
            assert!(matches!(url(&["projects", bad]), Err(CallError::InvalidName(_))), "{bad:?}");
        }
    }

    #[test]
    fn a_base_path_is_kept() {
        let api = api("https://example.com/isocloud/");
        assert_eq!(api.url(&["whoami"]).unwrap().as_str(), "https://example.com/isocloud/api/v1/whoami");
    }

    /// The server's error answers as the CLI shows them: the field named
    /// once, the missing hashes kept.
    #[test]
    fn error_envelopes_parse_with_and_without_field() {
        let shown = |text: &str| {
            let envelope: ErrorEnvelope = serde_json::from_str(text).unwrap();
            ApiError { body: envelope.error }
        };
        let e = shown(r#"{"error":{"code":"INVALID_FIELD","message":"bad","field":"name"}}"#);
        assert_eq!(e.to_string(), "bad (INVALID_FIELD, field name)");
        let e = shown(r#"{"error":{"code":"INVALID_FIELD","message":"name: bad","field":"name"}}"#);
        assert_eq!(e.to_string(), "bad (INVALID_FIELD, field name)");
        assert!(e.is(code::INVALID_FIELD));
        let e = shown(r#"{"error":{"code":"MISSING_BLOBS","message":"m","missing":["ab"]}}"#);
        assert_eq!((e.to_string().as_str(), e.body.missing()), ("m (MISSING_BLOBS)", &["ab".to_string()][..]));
    }

    #[test]
    fn unknown_fields_and_nulls_are_accepted() {
        let l: LogEntry = decode(
            br#"{"id":1,"deployment_id":"d","timestamp":"t","type":"boot","level":null,"message":"m","request_id":null,"new_field":1}"#,
        )
        .unwrap();
        assert_eq!((l.kind.as_str(), l.level), ("boot", None));
    }

    /// What a server that renamed or dropped a field answers: refused,
    /// naming the field (and where it is), not read as `""`.
    #[test]
    fn a_missing_field_is_a_decode_error_naming_it() {
        let error =
            decode::<Vec<Deployment>>(br#"[{"id":"abc","status":"ready","git":null,"error":null}]"#).unwrap_err();
        assert!(error.starts_with("[0]: missing field `project`"), "{error}");
        let domain = br#"{"domain":"a.test","project":null,"created_at":"t","verified":false,"verified_at":null,
            "verification":{"txt_name":"n","txt_value":"v","http_url":"u"},"certificate":null}"#;
        let error = decode::<Domain>(domain).unwrap_err();
        assert!(error.starts_with("verification: missing field `http_body`"), "{error}");
        // An `Option` field too: absent is not `null`.
        let error = decode::<Whoami>(b"{}").unwrap_err();
        assert!(error.starts_with("missing field `token_name`"), "{error}");
        let project =
            br#"{"id":"p","name":"n","created_at":"t","updated_at":"t","production_deployment_id":null,"git":null}"#;
        let error = decode::<Project>(project).unwrap_err();
        assert!(error.starts_with("missing field `production_url`"), "{error}");
    }
}
