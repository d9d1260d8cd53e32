//! The isolate's network boundary under attack (issue 11, rows 3, 4, 6, 7,
//! 8): a loopback "internal service" started by each test, reached first
//! where a layer is off or the operator opened it (the probe works), then
//! refused by default — by every spelling through the egress proxy, by raw
//! TCP, by a direct HTTP client, by a redirect; the runner's admin and
//! control-plane listeners never reachable, its public one still (hop
//! counted); `Deno.listen` invisible to the host; a connection flood to the
//! proxy bounded per isolate.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A tiny HTTP server on `bind` (127.0.0.1:0, or another loopback address):
/// answers `internal secret`, or `/redirect?to=URL` with a 302 to URL;
/// counts connections and keeps each request head.
struct Service {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Service {
    async fn start(bind: &str) -> Service {
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (counter, recorded) = (connections.clone(), heads.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    recorded.lock().unwrap().push(head.clone());
                    let target = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    let response = match target.strip_prefix("/redirect?to=") {
                        Some(to) => format!(
                            "HTTP/1.1 302 Found\r\nlocation: {to}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        ),
                        None => "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 15\r\n\
                                 connection: close\r\n\r\ninternal secret"
                            .to_owned(),
                    };
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Service { addr, connections, heads, task }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Whether the last request came through the egress proxy (which marks
    /// every plain-HTTP call with its hop count).
    fn last_came_through_the_proxy(&self) -> bool {
        let heads = self.heads.lock().unwrap();
        heads.last().expect("a request arrived").to_ascii_lowercase().contains("x-isocloud-hops:")
    }
}

/// Every way out an isolate might try, by `?op=`.
const PROBE: &str = r#"
const held = [];
const attempt = async (f) => {
  try { return await f(); } catch (e) { return { error: e.name, message: String(e.message), cause: String(e.cause ?? "") }; }
};
const answer = async (res) => ({
  status: res.status,
  code: res.headers.get("x-isocloud-error"),
  location: res.headers.get("location"),
  body: await res.text(),
});
Deno.serve(async (req) => {
  const q = new URL(req.url).searchParams;
  const op = q.get("op");
  if (op === "fetch") {
    return Response.json(await attempt(async () => answer(await fetch(q.get("url"), { redirect: q.get("redirect") ?? "follow" }))));
  }
  if (op === "client") {
    // A client of its own, without the proxy settings deno took from the environment.
    return Response.json(await attempt(async () => {
      const client = Deno.createHttpClient({});
      try { return await answer(await fetch(q.get("url"), { client })); } finally { client.close(); }
    }));
  }
  if (op === "connect") {
    return Response.json(await attempt(async () => {
      const conn = await Deno.connect({ hostname: q.get("host"), port: Number(q.get("port")) });
      conn.close();
      return { connected: true };
    }));
  }
  if (op === "listen") {
    // Deno.listen, not Deno.serve (the harness takes that one for routing).
    return Response.json(await attempt(async () => {
      const listener = Deno.listen({ hostname: "127.0.0.1", port: Number(q.get("port")) });
      held.push(listener);
      (async () => {
        for await (const conn of listener) {
          const body = "served by the isolate's own listener";
          await conn.write(new TextEncoder().encode(
            `HTTP/1.1 200 OK\r\ncontent-length: ${body.length}\r\nconnection: close\r\n\r\n${body}`));
          conn.close();
        }
      })().catch(() => {});
      return { listening: true };
    }));
  }
  if (op === "flood") {
    const n = Number(q.get("n"));
    const results = await Promise.allSettled(Array.from({ length: n }, () =>
      Deno.connect({ hostname: q.get("host"), port: Number(q.get("port")) })));
    for (const r of results) if (r.status === "fulfilled") held.push(r.value);
    const failed = results.filter((r) => r.status === "rejected");
    return Response.json({ connected: n - failed.length, failed: failed.length, first_error: String(failed[0]?.reason ?? "") });
  }
  if (op === "drop") {
    for (const c of held.splice(0)) { try { c.close(); } catch {} }
    return Response.json({ dropped: true });
  }
  return new Response("probe ready");
});
"#;

/// Asks `deployment`'s probe for `query` and returns its JSON answer.
async fn ask(runner: &Runner, deployment: &str, query: &str) -> Value {
    let response = runner.subhost_get(deployment, &format!("/?{query}")).await;
    assert_eq!(response.status(), 200, "the probe itself answers");
    response.json().await.unwrap()
}

fn encode(url: &str) -> String {
    url.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn fetch_query(url: &str) -> String {
    format!("op=fetch&url={}", encode(url))
}

/// A probe deployment, `net: true` (the default), on a runner with `args`.
async fn probe_runner(args: &[&str]) -> (TestOrigin, Runner) {
    let origin = TestOrigin::start().await;
    origin.deploy("probe", TestDeployment::inline_js(PROBE));
    let mut all = vec!["--cpu-limit-ms", "5000"];
    all.extend_from_slice(args);
    let runner = origin.runner(&all);
    (origin, runner)
}

/// Asserts a plain-HTTP fetch answer is the proxy's refusal of an internal
/// address, naming one of `classes`.
fn assert_refused(answer: &Value, what: &str, classes: &[&str]) {
    assert_eq!(answer["status"], 403, "{what}: {answer}");
    assert_eq!(answer["code"], "EGRESS_DENIED", "{what}: {answer}");
    let body = answer["body"].as_str().unwrap_or_default();
    assert!(classes.iter().any(|c| body.contains(c)), "{what}: the refusal names the address class: {answer}");
}

/// Names in /etc/hosts that stand for a loopback address besides
/// `localhost` (the proxy maps that one itself): these go through the
/// system resolver, as any DNS name would.
fn loopback_names_in_etc_hosts() -> Vec<String> {
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let mut names = Vec::new();
    for line in hosts.lines().map(|l| l.split('#').next().unwrap_or("")) {
        let mut fields = line.split_whitespace();
        let Some(ip) = fields.next().and_then(|ip| ip.parse::<std::net::IpAddr>().ok()) else { continue };
        if ip.is_loopback() {
            names.extend(fields.filter(|n| !n.contains("localhost")).map(str::to_owned));
        }
    }
    names
}

/// `isocloud_egress_refused_total{reason=…}` from the runner's metrics.
fn refusals(metrics: &str, reason: &str) -> usize {
    let prefix = format!("isocloud_egress_refused_total{{reason=\"{reason}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

fn must_be_root(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var("CI").is_err(), "{what} needs a root runner, and CI runs as root");
    eprintln!("skipped: {what} needs a root runner");
    false
}

#[tokio::test]
async fn internal_addresses_are_refused_by_every_spelling() {
    let service = Service::start("127.0.0.1:0").await;
    let port = service.addr.port();

    // The probe: where the operator opened loopback, the isolate's fetch
    // reaches the service, through the proxy.
    let (_origin, open) = probe_runner(&["--egress-allow-private", "127.0.0.0/8"]).await;
    let answer = ask(&open, "probe", &fetch_query(&format!("http://127.0.0.1:{port}/"))).await;
    assert_eq!(answer["body"], "internal secret", "{answer}");
    assert!(service.last_came_through_the_proxy());
    drop(open);

    let (_origin, runner) = probe_runner(&[]).await;
    runner.wait_for_log("netns=on");
    let reached = service.connections();
    let mut hosts: Vec<String> = [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "[::ffff:127.0.0.1]",
        "0.0.0.0",
        "localhost",
        "localhost.",
        "internal.localhost",
        "a.b.localhost.",
    ]
    .iter()
    .map(|h| h.to_string())
    .collect();
    hosts.extend(loopback_names_in_etc_hosts());
    for host in &hosts {
        let url = format!("http://{host}:{port}/");
        let answer = ask(&runner, "probe", &fetch_query(&url)).await;
        assert_refused(&answer, &url, &["loopback", "unspecified"]);
        // HTTPS goes through a CONNECT tunnel, refused the same way: the
        // fetch fails.
        let url = format!("https://{host}:{port}/");
        let answer = ask(&runner, "probe", &fetch_query(&url)).await;
        assert!(answer["error"].is_string(), "{url}: {answer}");
    }
    assert_eq!(service.connections(), reached, "no spelling reached the internal service");
    let refused = refusals(&runner.metrics().await, "internal_address");
    assert!(refused >= 2 * hosts.len(), "every refusal counted: {refused}");
}

#[tokio::test]
async fn a_redirect_to_an_internal_address_is_refused_on_the_second_hop() {
    let internal = Service::start("127.0.0.1:0").await;
    // Stands in for an external server the operator lets isolates reach
    // (the test cannot rely on outside DNS): its own loopback address,
    // opened alone.
    let external = Service::start("127.0.0.2:0").await;
    let (_origin, runner) = probe_runner(&["--egress-allow-private", "127.0.0.2/32"]).await;

    // The probe: the external server is reachable, and redirects.
    let answer = ask(&runner, "probe", &fetch_query(&format!("http://{}/", external.addr))).await;
    assert_eq!(answer["body"], "internal secret", "{answer}");
    let to_internal = format!("http://127.0.0.1:{}/", internal.addr.port());
    let redirect = format!("http://{}/redirect?to={to_internal}", external.addr);
    let answer = ask(&runner, "probe", &format!("{}&redirect=manual", fetch_query(&redirect))).await;
    assert_eq!(answer["status"], 302, "{answer}");

    // Followed (deno's fetch does; each hop comes back through the proxy):
    // the second hop is refused.
    let answer = ask(&runner, "probe", &fetch_query(&redirect)).await;
    assert_refused(&answer, &redirect, &["loopback"]);
    assert!(external.last_came_through_the_proxy(), "the first hop went through the proxy");
    let to_admin = format!("http://localhost:{}/metrics", runner.admin.port());
    let answer = ask(&runner, "probe", &fetch_query(&format!("http://{}/redirect?to={to_admin}", external.addr))).await;
    assert_refused(&answer, &to_admin, &["admin listener"]);
    assert_eq!(internal.connections(), 0, "the internal service was never reached");
}

#[tokio::test]
async fn raw_tcp_and_a_direct_http_client_cannot_leave() {
    if !must_be_root("a network namespace per isolate") {
        return;
    }
    let service = Service::start("127.0.0.1:0").await;
    let connect = format!("op=connect&host=127.0.0.1&port={}", service.addr.port());
    let client = format!("op=client&url={}", encode(&format!("http://{}/", service.addr)));

    // The probe: with the network namespace and Landlock off, raw TCP and a
    // client of the isolate's own reach the service, around the proxy.
    let open = ["--network-namespace", "off", "--landlock", "off", "--egress-allow-private", "127.0.0.0/8"];
    let (_origin, runner) = probe_runner(&open).await;
    runner.wait_for_log("netns=off");
    assert_eq!(ask(&runner, "probe", &connect).await, json!({ "connected": true }));
    let answer = ask(&runner, "probe", &client).await;
    assert_eq!(answer["body"], "internal secret", "{answer}");
    assert!(!service.last_came_through_the_proxy(), "Deno.createHttpClient({{}}) went around the proxy");
    let self_call = format!("op=connect&host=127.0.0.1&port={}", runner.addr.port());
    assert_eq!(ask(&runner, "probe", &self_call).await, json!({ "connected": true }), "raw TCP to itself");
    drop(runner);

    // Each layer alone closes them: the network namespace (nothing but the
    // proxy listens there), Landlock's TCP rules (no connect but to the
    // proxy's port); by default both.
    for (layers, expect) in [
        (&["--landlock", "off"][..], "ConnectionRefused"),
        (&["--network-namespace", "off"][..], "PermissionDenied"),
        (&[][..], ""),
    ] {
        let mut args = layers.to_vec();
        args.extend(["--egress-allow-private", "127.0.0.0/8"]);
        let (_origin, runner) = probe_runner(&args).await;
        let reached = service.connections();
        let answer = ask(&runner, "probe", &connect).await;
        assert!(answer["error"].as_str().is_some_and(|e| e.contains(expect)), "{layers:?}: {answer}");
        let answer = ask(&runner, "probe", &client).await;
        assert!(answer["error"].is_string(), "{layers:?}: a direct client fails: {answer}");
        let self_call = format!("op=connect&host=127.0.0.1&port={}", runner.addr.port());
        assert!(ask(&runner, "probe", &self_call).await["error"].is_string(), "{layers:?}: raw TCP to itself");
        assert_eq!(service.connections(), reached, "{layers:?}: nothing reached the service");
        // The proxy is still the way out (the operator opened loopback).
        let answer = ask(&runner, "probe", &fetch_query(&format!("http://{}/", service.addr))).await;
        assert_eq!(answer["body"], "internal secret", "{layers:?}: {answer}");
        assert!(service.last_came_through_the_proxy());
    }
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Connects to 127.0.0.1:`port` from the host and reads what it answers.
async fn host_reads(port: u16) -> Result<String, String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    stream.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.map_err(|e| e.to_string())?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut out))
        .await
        .map_err(|_| "no answer".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(out)
}

#[tokio::test]
async fn deno_listen_is_not_reachable_from_the_host() {
    if !must_be_root("a network namespace per isolate") {
        return;
    }
    // The probe: without a network namespace or Landlock, the isolate's
    // listener serves the host directly, around routing and metering.
    let (_origin, runner) = probe_runner(&["--network-namespace", "off", "--landlock", "off"]).await;
    let port = free_port();
    assert_eq!(ask(&runner, "probe", &format!("op=listen&port={port}")).await, json!({ "listening": true }));
    let served = host_reads(port).await.expect("the host reaches the isolate's listener");
    assert!(served.contains("served by the isolate's own listener"), "{served}");
    drop(runner);

    // In its network namespace the listen succeeds, and nobody outside sees it.
    let (_origin, runner) = probe_runner(&["--landlock", "off"]).await;
    runner.wait_for_log("netns=on");
    let port = free_port();
    assert_eq!(ask(&runner, "probe", &format!("op=listen&port={port}")).await, json!({ "listening": true }));
    assert!(host_reads(port).await.is_err(), "the host must not reach a listener inside the namespace");
    drop(runner);

    // Landlock alone: no bind at all. By default: both.
    for layers in [&["--network-namespace", "off"][..], &[][..]] {
        let (_origin, runner) = probe_runner(layers).await;
        let port = free_port();
        let answer = ask(&runner, "probe", &format!("op=listen&port={port}")).await;
        assert!(answer["error"].as_str().is_some_and(|e| e.contains("PermissionDenied")), "{layers:?}: {answer}");
        assert!(host_reads(port).await.is_err(), "{layers:?}");
    }
}

#[tokio::test]
async fn the_admin_listener_is_never_reachable_and_the_public_one_is_hop_counted() {
    let service = Service::start("127.0.0.1:0").await;
    let origin = TestOrigin::start().await;
    origin.deploy("probe", TestDeployment::inline_js(PROBE));
    let token = subhost_token(json!({ "deployment_id": "looper", "iat": now_s(), "exp": now_s() + 600 }));
    origin.deploy("looper", TestDeployment::inline_js(LOOPER).with(|c| c["envs"] = json!({ "TOKEN": token })));

    for args in [&["--egress-allow-private", "127.0.0.0/8"][..], &[][..]] {
        let runner = origin.runner(&[&["--max-hops", "2", "--cpu-limit-ms", "5000"][..], args].concat());
        // The probe: the admin listener answers the host; where loopback is
        // open, the isolate reaches the internal service.
        assert!(runner.metrics().await.contains("isocloud_"), "the admin listener serves the host");
        let metrics_url = format!("http://127.0.0.1:{}/metrics", runner.admin.port());
        let answer = ask(&runner, "probe", &fetch_query(&metrics_url)).await;
        assert_refused(&answer, &metrics_url, &["admin listener"]);
        let answer = ask(&runner, "probe", &fetch_query(&format!("http://localhost:{}/", runner.admin.port()))).await;
        assert_refused(&answer, "admin by name", &["admin listener"]);
        let internal = ask(&runner, "probe", &fetch_query(&format!("http://{}/", service.addr))).await;
        if args.is_empty() {
            assert_refused(&internal, "internal service", &["loopback"]);
        } else {
            assert_eq!(internal["body"], "internal secret", "{internal}");
        }

        // Another deployment by the public listener: served, hop counted,
        // and the loop cut at the bound (hops 0, 1 and 2 served).
        let response = runner.subhost_get("looper", "/").await;
        assert_eq!(response.status(), 200);
        let chain = response.text().await.unwrap();
        assert!(chain.starts_with("200:|200:|508:LOOP_DETECTED|"), "{chain}");
        assert_eq!(chain.matches("200:|").count(), 2, "{chain}");
    }
}

/// The runner's open descriptors now.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|dir| dir.count()).unwrap_or(0)
}

/// The egress proxy's port, from the runner's start-up log.
fn proxy_port(runner: &Runner) -> u16 {
    let log = runner.wait_for_log("egress: isolates' HTTP(S)");
    let line = log.lines().find(|l| l.contains("egress: isolates' HTTP(S)")).unwrap();
    let after = line.split("127.0.0.1:").nth(1).expect("the proxy's address in the log");
    after.chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap()
}

/// Floods the proxy with `n` raw connections from one isolate while the
/// test watches the runner's descriptors; returns the flood's answer and
/// the largest rise in descriptors seen.
async fn flood(runner: &Runner, n: usize) -> (Value, usize) {
    // Boot and settle first, so the isolate's own descriptors are in the base.
    assert_eq!(runner.subhost_get("flooder", "/").await.text().await.unwrap(), "probe ready");
    assert_eq!(runner.subhost_get("neighbour", "/").await.text().await.unwrap(), "probe ready");
    let pid = runner.pid();
    let base = descriptors(pid);
    let query = format!("op=flood&host=127.0.0.1&port={}&n={n}", proxy_port(runner));
    let flooding = ask(runner, "flooder", &query);
    tokio::pin!(flooding);
    let mut peak = base;
    let answer = loop {
        tokio::select! {
            answer = &mut flooding => break answer,
            () = tokio::time::sleep(Duration::from_millis(10)) => peak = peak.max(descriptors(pid)),
        }
    };
    // The proxy may still be accepting what the kernel completed; held
    // connections stay until its header timeout (5 s).
    for _ in 0..150 {
        peak = peak.max(descriptors(pid));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (answer, peak.saturating_sub(base))
}

#[tokio::test]
async fn a_connection_flood_to_the_proxy_is_bounded_per_isolate() {
    if !must_be_root("a network namespace per isolate") {
        return;
    }
    let service = Service::start("127.0.0.1:0").await;
    let origin = TestOrigin::start().await;
    origin.deploy("flooder", TestDeployment::inline_js(PROBE));
    origin.deploy("neighbour", TestDeployment::inline_js(PROBE));
    const N: usize = 1000;
    const BOUND: usize = isocloud_egress::MAX_CONNECTIONS_PER_ISOLATE;

    // The probe: without a network namespace the isolate floods the shared
    // listener, whose bound is for all isolates together: the runner holds
    // every connection, and the measurement sees them.
    let runner = origin.runner(&["--network-namespace", "off", "--cpu-limit-ms", "5000"]);
    let (answer, rise) = flood(&runner, N).await;
    eprintln!("connection flood of {N} without the namespace: runner descriptors +{rise}: {answer}");
    assert_eq!(answer["connected"], N, "{answer}");
    // Well above the per-isolate bound below (the proxy accepts what the
    // kernel completed at its own pace: not every one is counted at once).
    assert!(rise > 2 * BOUND, "the runner held the flood's connections: +{rise} descriptors");
    drop(runner);

    // By default each isolate reaches the proxy through its own listener,
    // which holds at most BOUND connections; the rest are refused at once.
    let runner = origin.runner(&["--cpu-limit-ms", "5000", "--egress-allow-private", "127.0.0.0/8"]);
    runner.wait_for_log("netns=on");
    let (answer, rise) = flood(&runner, N).await;
    assert!(answer["connected"].as_u64().unwrap_or(0) >= BOUND as u64, "{answer}");
    assert!(rise >= BOUND * 3 / 4, "the bound's worth is held (the probe of the measurement): +{rise}");
    assert!(rise <= BOUND + 64, "the runner's descriptors rose by {rise}, past the bound of {BOUND}");
    // A neighbour is served, and its own calls through the proxy work.
    let neighbour = ask(&runner, "neighbour", &fetch_query(&format!("http://{}/", service.addr))).await;
    assert_eq!(neighbour["body"], "internal secret", "{neighbour}");
    // Connections the kernel completed are refused as the proxy accepts them:
    // all 744 past the bound within a second or two alone. Under the whole
    // suite on two cores the accept queue overflows first (the flood's
    // handshakes complete faster than a starved accept loop drains it; 653
    // and 527 counted in two such runs), and those never reach the proxy. So
    // a quarter must be counted: refusals happen and are counted; the bound
    // itself is the `rise` above.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let refused = refusals(&runner.metrics().await, "isolate_connections");
        if refused >= (N - BOUND) / 4 {
            break;
        }
        assert!(Instant::now() < deadline, "refusals counted: {refused} of {N}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("connection flood of {N}: runner descriptors +{rise} (bound {BOUND}): {answer}");
}

#[tokio::test]
async fn the_control_plane_listener_is_never_reachable_even_with_loopback_open() {
    let service = Service::start("127.0.0.1:0").await;
    let data = tempfile::tempdir().unwrap();
    let control_port = free_port();
    let control = format!("127.0.0.1:{control_port}");
    let args = [
        "serve",
        "--data",
        data.path().to_str().unwrap(),
        "--control-listen",
        &control,
        "--base-domain",
        "localhost",
        "--egress-allow-private",
        "127.0.0.0/8",
        "--cpu-limit-ms",
        "5000",
    ];
    let (runner, _) =
        Runner::start_with_lines(&args, tempfile::tempdir().unwrap(), &["isocloud: control plane on http://"]);
    let token_file = data.path().join("admin-token");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !token_file.is_file() {
        assert!(Instant::now() < deadline, "no admin token");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let token = std::fs::read_to_string(&token_file).unwrap().trim().to_owned();
    let control_url = format!("http://{control}");
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("config");
    isocloud_cli(&control_url, &token, &config, &["projects", "create", "probe"]);
    let app = work.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("main.ts"), PROBE).unwrap();
    isocloud_cli(&control_url, &token, &config, &["deploy", "--project", "probe", "--prod", app.to_str().unwrap()]);

    let ask_app = async |query: String| -> Value {
        let response = reqwest::Client::new()
            .get(format!("http://{}/?{query}", runner.addr))
            .header("host", format!("probe.localhost:{}", runner.addr.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    };
    // The probe: the host reaches the control plane; the isolate reaches
    // an internal service on loopback, which the operator opened.
    let dashboard = reqwest::get(format!("{control_url}/")).await.unwrap();
    assert!(dashboard.status().is_success() || dashboard.status().is_redirection());
    let answer = ask_app(fetch_query(&format!("http://{}/", service.addr))).await;
    assert_eq!(answer["body"], "internal secret", "{answer}");

    for url in [format!("{control_url}/api/v1/projects"), format!("http://localhost:{control_port}/")] {
        let answer = ask_app(fetch_query(&url)).await;
        assert_refused(&answer, &url, &["control plane listener"]);
    }
    let answer = ask_app(fetch_query(&format!("http://127.0.0.1:{}/metrics", runner.admin.port()))).await;
    assert_refused(&answer, "admin", &["admin listener"]);
}
