//! `permissions.net`: all (the default), none (`false` or `[]`) and an allow
//! list, set by `isolate.json` in apps mode and by the isolate config in
//! subhosting mode, checked with `fetch` and `Deno.connect` against real
//! servers on loopback that count who reached them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A tiny HTTP server on 127.0.0.1:0 answering every request with
/// `hello from <name>`; it counts the connections it accepted.
struct TargetServer {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TargetServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TargetServer {
    async fn start(name: &str) -> TargetServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let body = format!("hello from {name}");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                let body = body.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        TargetServer { addr, connections, task }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// deno's own permission layer, alone: the layers under it that also stop
/// these calls — the egress proxy's refusal of internal addresses (the
/// target servers listen on loopback), the network namespace and Landlock's
/// TCP rules (which stop `Deno.connect` whatever deno allows) — are off
/// here, and tested in hostile_network.rs.
const DENO_PERMISSIONS_ONLY: [&str; 6] =
    ["--egress-allow-private", "127.0.0.0/8", "--network-namespace", "off", "--landlock", "off"];

/// Tries `fetch` (or `Deno.connect` with `?op=connect`) to `?target=HOST:PORT`
/// and answers `{"ok": …}` or `{"error": <name>, "message": …}`.
const PROBE: &str = r#"
const attempt = async (f) => {
  try { return { ok: await f() }; } catch (e) { return { error: e.name, message: String(e.message) }; }
};
Deno.serve(async (req) => {
  const query = new URL(req.url).searchParams;
  const target = query.get("target");
  if (query.get("op") === "connect") {
    return Response.json(await attempt(async () => {
      const [hostname, port] = target.split(":");
      const conn = await Deno.connect({ hostname, port: Number(port) });
      conn.close();
      return "connected";
    }));
  }
  return Response.json(await attempt(async () => await (await fetch(`http://${target}/`)).text()));
});
"#;

/// Asks the probe at `send` to reach `target` with `op` ("fetch" or "connect").
async fn probe(send: impl std::future::Future<Output = reqwest::Response>) -> Value {
    let response = send.await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn probe_path(op: &str, target: &TargetServer) -> String {
    format!("/?op={op}&target={}", target.addr)
}

/// Checks that the probe's answer is a permission refusal naming `target`,
/// and that `target` was never reached.
fn assert_denied(answer: &Value, target: &TargetServer, connections_before: usize) {
    assert_eq!(answer["error"], "NotCapable", "{answer}");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(message.contains(&target.addr.to_string()), "{answer}");
    assert_eq!(target.connections(), connections_before, "a denied probe reached {}", target.addr);
}

#[tokio::test]
async fn apps_mode_net_permissions_from_isolate_json() {
    let a = TargetServer::start("server a").await;
    let b = TargetServer::start("server b").await;
    let only_a = json!({ "permissions": { "net": [a.addr.to_string()] } }).to_string();
    let host_only = json!({ "permissions": { "net": ["127.0.0.1"] } }).to_string();
    let apps = AppsDir::new();
    apps.app("default", &[("main.js", PROBE)])
        .app("all", &[("main.js", PROBE), ("isolate.json", r#"{ "permissions": { "net": true } }"#)])
        .app("none", &[("main.js", PROBE), ("isolate.json", r#"{ "permissions": { "net": false } }"#)])
        .app("empty", &[("main.js", PROBE), ("isolate.json", r#"{ "permissions": { "net": [] } }"#)])
        .app("only-a", &[("main.js", PROBE), ("isolate.json", &only_a)])
        .app("host", &[("main.js", PROBE), ("isolate.json", &host_only)]);
    let runner = apps.serve(&DENO_PERMISSIONS_ONLY);
    let ask = |app: &str, op: &str, target: &TargetServer| {
        let host = format!("{app}.localhost");
        let path = probe_path(op, target);
        let runner = &runner;
        async move { probe(runner.get(&host, &path)).await }
    };

    // Everything is allowed by default and with `true`.
    for app in ["default", "all", "host"] {
        assert_eq!(ask(app, "fetch", &a).await, json!({ "ok": "hello from server a" }), "{app}");
        assert_eq!(ask(app, "fetch", &b).await, json!({ "ok": "hello from server b" }), "{app}");
        assert_eq!(ask(app, "connect", &b).await, json!({ "ok": "connected" }), "{app}");
    }

    // Nothing with `false` or `[]`.
    for app in ["none", "empty"] {
        for op in ["fetch", "connect"] {
            let before = a.connections();
            assert_denied(&ask(app, op, &a).await, &a, before);
        }
    }

    // Exactly the listed host:port.
    assert_eq!(ask("only-a", "fetch", &a).await, json!({ "ok": "hello from server a" }));
    assert_eq!(ask("only-a", "connect", &a).await, json!({ "ok": "connected" }));
    let before = b.connections();
    assert_denied(&ask("only-a", "fetch", &b).await, &b, before);
    assert_denied(&ask("only-a", "connect", &b).await, &b, before);
}

#[tokio::test]
async fn subhosting_net_permissions_from_the_isolate_config() {
    let a = TargetServer::start("server a").await;
    let b = TargetServer::start("server b").await;
    let origin = TestOrigin::start().await;
    origin.deploy("open", TestDeployment::inline_js(PROBE));
    origin.deploy("closed", TestDeployment::inline_js(PROBE).with(|c| c["permissions"] = json!({ "net": false })));
    let only_a = a.addr.to_string();
    origin.deploy("only-a", TestDeployment::inline_js(PROBE).with(|c| c["permissions"] = json!({ "net": [only_a] })));
    let runner = origin.runner(&DENO_PERMISSIONS_ONLY);
    let ask = |deployment: &str, op: &str, target: &TargetServer| {
        let request = reqwest::Client::new()
            .get(format!("http://{}{}", runner.addr, probe_path(op, target)))
            .header("x-deno-subhost", subhost_token(claims_for(deployment)))
            .timeout(Duration::from_secs(60))
            .send();
        async move { probe(async move { request.await.expect("request to the runner") }).await }
    };

    assert_eq!(ask("open", "fetch", &a).await, json!({ "ok": "hello from server a" }));
    assert_eq!(ask("open", "fetch", &b).await, json!({ "ok": "hello from server b" }));

    for op in ["fetch", "connect"] {
        let before = a.connections();
        assert_denied(&ask("closed", op, &a).await, &a, before);
    }

    assert_eq!(ask("only-a", "fetch", &a).await, json!({ "ok": "hello from server a" }));
    assert_eq!(ask("only-a", "connect", &a).await, json!({ "ok": "connected" }));
    let before = b.connections();
    assert_denied(&ask("only-a", "fetch", &b).await, &b, before);
    assert_denied(&ask("only-a", "connect", &b).await, &b, before);
}
