//! The egress proxy end to end: real isolates calling out through the
//! runner's proxy, counted in the usage reports, and a tenant calling back
//! into the cloud in a loop cut off at the hop bound.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const BIG_BYTES: usize = 1 << 20;

/// The upstreams these tests start listen on loopback, which the proxy
/// refuses unless the operator opens it (hostile_network.rs tests that).
const OPEN_LOOPBACK: [&str; 2] = ["--egress-allow-private", "127.0.0.0/8"];

/// A plain HTTP server on loopback that records each request head and
/// answers `/big` with 1 MiB, anything else with `upstream`.
async fn upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let recorded = heads.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let body = if head.starts_with("GET /big ") { vec![b'x'; BIG_BYTES] } else { b"upstream".to_vec() };
                recorded.lock().unwrap().push(head);
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.write_all(&body).await;
            });
        }
    });
    (addr, heads)
}

/// Every `usage` event of `deployment` the origin received, summed by field.
fn usage_total(origin: &TestOrigin, deployment: &str, field: &str) -> u64 {
    origin
        .activity_events()
        .iter()
        .filter(|e| e["type"] == "usage" && e["deployment_id"] == deployment)
        .map(|e| e[field].as_u64().unwrap_or(0))
        .sum()
}

const CALLER: &str = r#"
Deno.serve(async (req) => {
  const target = new URL(req.url).searchParams.get("target");
  try {
    const res = await fetch(target);
    const body = new Uint8Array(await res.arrayBuffer());
    return Response.json({ status: res.status, bytes: body.length, env: Object.keys(Deno.env.toObject()) });
  } catch (e) {
    return Response.json({ error: `${e.name}: ${e.message}` });
  }
});
"#;

const NEIGHBOUR: &str = r#"Deno.serve(() => new Response("neighbour ok"));"#;

#[tokio::test]
async fn outbound_http_goes_through_the_proxy_and_is_counted() {
    let (up, heads) = upstream().await;
    let origin = TestOrigin::start().await;
    origin.deploy("caller", TestDeployment::inline_js(CALLER));
    let runner = origin.runner(&[&["--usage-interval-s", "1", "--cpu-limit-ms", "5000"][..], &OPEN_LOOPBACK].concat());

    let target = format!("http://{up}/big");
    let response = runner.subhost_get("caller", &format!("/?target={target}")).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(answer["bytes"], BIG_BYTES, "{answer}");
    assert_eq!(answer["env"], json!([]), "the proxy's credentials stay out of Deno.env: {answer}");

    let head = heads.lock().unwrap().last().cloned().expect("the upstream was called");
    assert!(head.starts_with("GET /big HTTP/1.1"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("x-isocloud-hops: 1"),
        "the call went through the egress proxy, which marks the hop: {head}"
    );
    assert!(!head.to_ascii_lowercase().contains("proxy-authorization"), "{head}");

    // The proxy's count reaches the origin in the next usage report.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while usage_total(&origin, "caller", "fetch_received_bytes") < BIG_BYTES as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "no usage with the fetched bytes: {:?}",
            origin.activity_events()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(usage_total(&origin, "caller", "fetch_requests") >= 1);
    let metrics = runner.metrics().await;
    assert!(
        metrics.lines().any(|l| l.starts_with("isocloud_deployment_fetch_bytes_total{deployment=\"caller\"}")),
        "{metrics}"
    );
}

#[tokio::test]
async fn https_is_tunnelled_through_the_proxy() {
    // Not a TLS server: it records what arrives. A tunnelled TLS handshake
    // arrives from the proxy, and the isolate's usage counts the tunnel.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_port = listener.local_addr().unwrap().port();
    let first_bytes = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 3];
        stream.read_exact(&mut buf).await.unwrap();
        buf
    });
    let origin = TestOrigin::start().await;
    origin.deploy("caller", TestDeployment::inline_js(CALLER));
    let runner = origin.runner(&[&["--usage-interval-s", "1", "--cpu-limit-ms", "5000"][..], &OPEN_LOOPBACK].concat());

    let response = runner.subhost_get("caller", &format!("/?target=https://127.0.0.1:{tls_port}/")).await;
    let answer: Value = response.json().await.unwrap();
    assert!(answer["error"].is_string(), "no TLS server there, the fetch fails: {answer}");
    let hello = tokio::time::timeout(Duration::from_secs(10), first_bytes).await.unwrap().unwrap();
    assert_eq!(hello[0], 0x16, "a TLS handshake record arrived through the tunnel");

    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while usage_total(&origin, "caller", "fetch_requests") < 1 {
        assert!(std::time::Instant::now() < deadline, "the tunnel was not counted: {:?}", origin.activity_events());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_loop_back_into_the_cloud_stops_at_the_hop_bound() {
    let origin = TestOrigin::start().await;
    let token = subhost_token(json!({ "deployment_id": "looper", "iat": now_s(), "exp": now_s() + 600 }));
    origin.deploy("looper", TestDeployment::inline_js(LOOPER).with(|c| c["envs"] = json!({ "TOKEN": token })));
    origin.deploy("neighbour", TestDeployment::inline_js(NEIGHBOUR));
    let runner = origin.runner(&["--max-hops", "3", "--usage-interval-s", "1", "--cpu-limit-ms", "5000"]);

    // The neighbour keeps serving while the loop runs.
    let neighbour = {
        let addr = runner.addr;
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut served = 0;
            for _ in 0..20 {
                let response = client
                    .get(format!("http://{addr}/"))
                    .header("x-deno-subhost", subhost_token(claims_for("neighbour")))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                served += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            served
        })
    };

    let response = runner.subhost_get("looper", "/").await;
    assert_eq!(response.status(), 200);
    let chain = response.text().await.unwrap();
    // Hops 0 (the user's request), 1, 2 and 3 are served; the call that
    // would be hop 4 is refused by the proxy before it leaves.
    assert_eq!(chain.matches("200:|").count(), 3, "{chain}");
    assert!(chain.contains("508:LOOP_DETECTED|"), "{chain}");
    assert_eq!(neighbour.await.unwrap(), 20);

    // The refusal is in the deployment's activity, for its owner to see.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let events = origin.activity_events();
        let logged = events.iter().any(|e| {
            e["deployment_id"] == "looper"
                && e["type"] == "log"
                && e["message"].as_str().is_some_and(|m| m.contains("LOOP_DETECTED"))
        });
        if logged {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no loop report: {events:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = runner.metrics().await;
    assert!(has_metric(&metrics, "isocloud_deployment_loops_refused_total{deployment=\"looper\"} 1"), "{metrics}");
}

#[tokio::test]
async fn a_hop_count_from_outside_is_honoured_at_the_edge() {
    // A call that came back through someone's relay carries the header the
    // proxy put on it; past the bound the runner refuses to boot anything.
    let origin = TestOrigin::start().await;
    origin.deploy("neighbour", TestDeployment::inline_js(NEIGHBOUR));
    let runner = origin.runner(&["--max-hops", "3"]);
    let client = reqwest::Client::new();
    let send = |hops: &'static str| {
        client
            .get(format!("http://{}/", runner.addr))
            .header("x-deno-subhost", subhost_token(claims_for("neighbour")))
            .header("x-isocloud-hops", hops)
            .send()
    };
    expect_error(send("4").await.unwrap(), 508, "LOOP_DETECTED").await;
    assert_eq!(origin.calls_to("boot"), 0, "a loop boots nothing");
    assert_eq!(send("3").await.unwrap().status(), 200);
}

const GUARDED: &str = r#"
Deno.serve(async (req) => {
  const target = new URL(req.url).searchParams.get("target");
  try {
    const res = await fetch(target);
    return new Response(`reached ${res.status}`);
  } catch (e) {
    return new Response(`refused ${e.name}`, { status: 403 });
  }
});
"#;

#[tokio::test]
async fn hosts_outside_the_allow_list_are_refused_by_name_and_by_ip() {
    let (up, heads) = upstream().await;
    let origin = TestOrigin::start().await;
    let allowed = format!("allowed.localhost:{}", up.port());
    origin
        .deploy("guarded", TestDeployment::inline_js(GUARDED).with(|c| c["permissions"] = json!({ "net": [allowed] })));
    let runner = origin.runner(&["--cpu-limit-ms", "5000", OPEN_LOOPBACK[0], OPEN_LOOPBACK[1]]);

    let get = |target: String| {
        let path = format!("/?target={target}");
        let runner = &runner;
        async move { runner.subhost_get("guarded", &path).await }
    };
    let response = get(format!("http://allowed.localhost:{}/", up.port())).await;
    assert_eq!(response.text().await.unwrap(), "reached 200");
    for denied in [
        format!("http://other.localhost:{}/", up.port()),
        format!("http://127.0.0.1:{}/", up.port()),
        format!("http://localhost:{}/", up.port()),
        format!("http://allowed.localhost:{}/", up.port() ^ 1),
    ] {
        let response = get(denied.clone()).await;
        assert_eq!(response.status(), 403, "{denied}");
        assert_eq!(response.text().await.unwrap(), "refused NotCapable", "{denied}");
    }
    assert_eq!(heads.lock().unwrap().len(), 1, "only the allowed call reached the upstream");
}

/// Fetches `target` (through the proxy) and opens a raw TCP connection to
/// `host:port` (which no proxy sees), and says how each went.
const RAW_AND_FETCH: &str = r#"
Deno.serve(async (req) => {
  const params = new URL(req.url).searchParams;
  const out = {};
  try {
    const res = await fetch(params.get("target"));
    out.fetch = { status: res.status, bytes: (await res.arrayBuffer()).byteLength };
  } catch (e) {
    out.fetch = { error: `${e.name}: ${e.message}` };
  }
  try {
    const conn = await Deno.connect({ hostname: params.get("host"), port: Number(params.get("port")) });
    conn.close();
    out.connect = "connected";
  } catch (e) {
    out.connect = `${e.name}: ${e.message}`;
  }
  return Response.json(out);
});
"#;

#[tokio::test]
async fn a_network_namespace_leaves_only_the_egress_proxy() {
    let (up, heads) = upstream().await;
    let origin = TestOrigin::start().await;
    origin.deploy("raw", TestDeployment::inline_js(RAW_AND_FETCH).with(|c| c["permissions"] = json!({ "net": true })));
    let path = format!("/?target=http://{up}/big&host=127.0.0.1&port={}", up.port());

    // Without the namespace (and Landlock's TCP rules, the other layer
    // that stops raw TCP), it reaches the upstream: the namespace is what
    // stops it below, not deno's permissions.
    let layers_off = ["--network-namespace", "off", "--landlock", "off", "--cpu-limit-ms", "5000"];
    let runner = origin.runner(&[&layers_off[..], &OPEN_LOOPBACK].concat());
    runner.wait_for_log("netns=off");
    let answer: Value = runner.subhost_get("raw", &path).await.json().await.unwrap();
    assert_eq!(answer["fetch"]["bytes"], BIG_BYTES, "{answer}");
    assert_eq!(answer["connect"], "connected", "{answer}");
    drop(runner);

    // Landlock off: the namespace alone (hostile_network.rs tests each layer).
    let namespace_only = ["--network-namespace", "on", "--landlock", "off", "--usage-interval-s", "1"];
    let runner = origin.runner(&[&namespace_only[..], &["--cpu-limit-ms", "5000"], &OPEN_LOOPBACK].concat());
    runner.wait_for_log("netns=on");
    let calls_before = heads.lock().unwrap().len();
    let answer: Value = runner.subhost_get("raw", &path).await.json().await.unwrap();
    assert_eq!(answer["fetch"]["status"], 200, "fetch leaves through the proxy: {answer}");
    assert_eq!(answer["fetch"]["bytes"], BIG_BYTES, "{answer}");
    let head = heads.lock().unwrap().last().cloned().expect("the upstream was called");
    assert!(head.to_ascii_lowercase().contains("x-isocloud-hops: 1"), "through the egress proxy: {head}");
    let connect = answer["connect"].as_str().unwrap_or_default();
    assert!(connect.starts_with("ConnectionRefused"), "raw TCP cannot leave the namespace: {answer}");
    assert_eq!(heads.lock().unwrap().len(), calls_before + 1, "only the fetch reached the upstream");
}
