//! The test harness: a real control plane behind a real HTTP listener on
//! 127.0.0.1:0, on SQLite in a temp dir or on a throwaway PostgreSQL
//! cluster; plus a tiny DNS responder and HTTP server for domain checks.

#![allow(dead_code, reason = "each test module uses a different part")]

pub mod dns;
pub mod postgres;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use isocloud_controlplane::{ControlPlane, ControlPlaneOptions};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// Writes each test twice: on SQLite and on PostgreSQL.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(backend) = $crate::support::Backend::postgres().await {
                        super::$name(backend).await
                    }
                }
            )*
        }
    };
}

/// What a PostgreSQL test needs; `None` (with a printed reason) when
/// PostgreSQL is not installed, unless `CI=true`, where that is a failure.
pub fn postgres_available<T>(needed: Result<T, postgres::Unavailable>) -> Option<T> {
    match needed {
        Ok(needed) => Some(needed),
        Err(postgres::Unavailable(reason)) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("PostgreSQL tests cannot run under CI=true: {reason} (run scripts/install-postgres)");
            }
            eprintln!("SKIPPED: PostgreSQL test: {reason} (run scripts/install-postgres)");
            None
        }
    }
}

#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite,
    /// A database of its own on the shared test cluster.
    Postgres {
        url: String,
    },
}

impl Backend {
    /// A fresh database on this test binary's cluster; `None` (with a
    /// printed reason) when PostgreSQL is not installed, unless `CI=true`,
    /// where that is a failure.
    pub async fn postgres() -> Option<Backend> {
        postgres_available(postgres::fresh_database().await).map(|url| Backend::Postgres { url })
    }

    fn database_url(&self) -> Option<String> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres { url } => Some(url.clone()),
        }
    }
}

/// What came back from one API call.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// `error.code`, asserting the error shape.
    pub fn code(&self) -> String {
        let json = self.json();
        assert!(json["error"]["message"].is_string(), "no error message: {json}");
        json["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code: {json}")).to_owned()
    }

    pub fn field(&self) -> Option<String> {
        self.json()["error"]["field"].as_str().map(str::to_owned)
    }

    pub fn message(&self) -> String {
        self.json()["error"]["message"].as_str().unwrap_or("").to_owned()
    }

    /// Asserts status, code and (when given) field, and that the message
    /// names the field.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str, field: Option<&str>) {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(self.code(), code, "{}", self.text);
        assert_eq!(self.field().as_deref(), field, "{}", self.text);
        if let Some(field) = field {
            assert!(self.message().contains(field), "message does not name {field}: {}", self.text);
        }
    }
}

pub struct TestServer {
    pub cp: Arc<ControlPlane>,
    pub base: String,
    pub token: String,
    pub client: reqwest::Client,
    pub dir: Arc<TempDir>,
    pub backend: Backend,
    pub options: ControlPlaneOptions,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl TestServer {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(backend: Backend, adjust: impl FnOnce(&mut ControlPlaneOptions)) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let mut options = ControlPlaneOptions::new(dir.path().join("data"));
        options.database_url = backend.database_url();
        options.public_http_port = 8080;
        options.max_blob_bytes = 1024 * 1024;
        adjust(&mut options);
        let cp = ControlPlane::open(options.clone()).await.expect("control plane opens");
        let token_path = cp.created_admin_token().expect("a fresh store makes an admin token").to_owned();
        let token = std::fs::read_to_string(&token_path).expect("admin token file").trim().to_owned();
        Self::serve(cp, token, dir, backend, options).await
    }

    async fn serve(
        cp: Arc<ControlPlane>,
        token: String,
        dir: Arc<TempDir>,
        backend: Backend,
        options: ControlPlaneOptions,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let router = cp.router();
        let server = tokio::spawn(async move {
            axum::serve(listener, router).await.expect("serve");
        });
        let client = reqwest::Client::builder().no_proxy().build().expect("client");
        TestServer { cp, base, token, client, dir, backend, options, server }
    }

    /// Drops this control plane and opens a new one on the same data dir and
    /// database, as a restart would.
    pub async fn restart(self) -> (Self, Option<PathBuf>) {
        let dir = Arc::clone(&self.dir);
        let backend = self.backend.clone();
        let options = self.options.clone();
        let token = self.token.clone();
        drop(self);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let cp = ControlPlane::open(options.clone()).await.expect("control plane reopens");
        let created = cp.created_admin_token().map(|p| p.to_owned());
        (Self::serve(cp, token, dir, backend, options).await, created)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        Reply { status, headers, text }
    }

    fn authed(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        request.bearer_auth(&self.token)
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.authed(self.client.get(self.url(path)))).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.send(self.authed(self.client.delete(self.url(path)))).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send(self.authed(self.client.post(self.url(path)).json(&body))).await
    }

    pub async fn post_empty(&self, path: &str) -> Reply {
        self.send(self.authed(self.client.post(self.url(path)))).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Reply {
        self.send(self.authed(self.client.put(self.url(path)).json(&body))).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> Reply {
        self.send(self.authed(self.client.patch(self.url(path)).json(&body))).await
    }

    /// Uploads `bytes` as a blob; returns its hash.
    pub async fn upload(&self, bytes: &[u8]) -> String {
        let hash = sha256_hex(bytes);
        let reply = self
            .send(self.authed(self.client.put(self.url(&format!("/api/v1/blobs/{hash}"))).body(bytes.to_vec())))
            .await;
        assert!(reply.status == 201 || reply.status == 200, "{}", reply.text);
        hash
    }

    pub async fn create_project(&self, name: &str) -> Value {
        let reply = self.post("/api/v1/projects", serde_json::json!({ "name": name })).await;
        assert_eq!(reply.status, 201, "{}", reply.text);
        reply.json()
    }

    /// Uploads `files` and creates a deployment of them.
    pub async fn deploy(&self, project: &str, files: &[(&str, &str)], entrypoint: &str, production: bool) -> Value {
        let mut spec = serde_json::Map::new();
        for (path, content) in files {
            let hash = self.upload(content.as_bytes()).await;
            spec.insert((*path).to_owned(), serde_json::json!({ "hash": hash, "size": content.len() }));
        }
        let reply = self
            .post(
                &format!("/api/v1/projects/{project}/deployments"),
                serde_json::json!({ "entrypoint": entrypoint, "files": spec, "production": production }),
            )
            .await;
        assert_eq!(reply.status, 201, "{}", reply.text);
        reply.json()
    }
}

/// Polls `check` every 50 ms until it is true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A one-route HTTP server: GET `path` answers `body`; anything else 404.
pub struct TokenServer {
    pub port: u16,
    routes: Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TokenServer {
    pub async fn start() -> Self {
        let routes: Arc<std::sync::Mutex<std::collections::HashMap<String, String>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let served = Arc::clone(&routes);
        let router = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let served = Arc::clone(&served);
            async move {
                match served.lock().unwrap().get(uri.path()) {
                    Some(body) => (axum::http::StatusCode::OK, body.clone()),
                    None => (axum::http::StatusCode::NOT_FOUND, "no".to_owned()),
                }
            }
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.expect("serve");
        });
        TokenServer { port, routes, task }
    }

    pub fn serve(&self, path: &str, body: &str) {
        self.routes.lock().unwrap().insert(path.to_owned(), body.to_owned());
    }
}
