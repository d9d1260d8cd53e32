//! The edge role (issue 15 item 2): `isocloud serve --origin-listen` (the
//! control plane), two `isocloud runner`s fed by it, and one `isocloud edge`
//! in front of them. Apps deployed with the CLI are served through the edge
//! by Host, each on the runner its rendezvous ranking names; a project
//! deployed later is served within 2 s; when a runner is killed, GETs in
//! flight on it are answered by the other runner, and every deployment
//! keeps answering; with the control plane gone, the edge keeps its table.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::Runner;
use crate::support::edge::{Edge, isolates_of, ranking};
use crate::support::{
    ControlPlaneServe, SECRET, isocloud_cli, metric_value, origin_certificate, runner_fed_by, runner_fed_by_root,
};

/// Answers `NAME METHOD PATH HOST`; `/slow` takes 1.5 s first.
fn write_app(dir: &Path, name: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("main.ts"),
        format!(
            "Deno.serve(async (req) => {{\n  const url = new URL(req.url);\n  \
             if (url.pathname === \"/slow\") await new Promise((r) => setTimeout(r, 1500));\n  \
             return new Response(`{name} ${{req.method}} ${{url.pathname}} ${{url.host}}`);\n}});\n"
        ),
    )
    .unwrap();
}

/// Creates project `name`, deploys its app to production; its deployment id.
fn deploy(serve: &ControlPlaneServe, config: &Path, work: &Path, name: &str) -> String {
    let cli = |args: &[&str]| isocloud_cli(&serve.control_url(), &serve.admin_token(), config, args);
    cli(&["projects", "create", name]);
    let app = work.join(name);
    write_app(&app, name);
    let out = cli(&["deploy", "--project", name, "--prod", app.to_str().unwrap()]);
    let host = out.lines().last().unwrap().trim().strip_prefix("http://").unwrap().split(':').next().unwrap();
    host.strip_prefix(&format!("{name}-")).and_then(|h| h.strip_suffix(".localhost")).unwrap().to_owned()
}

#[tokio::test]
async fn the_edge_hashes_deployments_to_runners_follows_deploys_and_fails_over() {
    let (serve, origin) = ControlPlaneServe::start_with_origin(&[]);
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("config");
    let alpha = deploy(&serve, &config, work.path(), "alpha");
    let beta = deploy(&serve, &config, work.path(), "beta");
    let runners = [runner_fed_by(origin, SECRET, &[]), runner_fed_by(origin, SECRET, &[])];
    let edge = Edge::start(origin, &[&runners[0], &runners[1]], &[]);
    let port = edge.addr.port();

    // By Host, production and deployment URL alike, each to its own
    // deployment, with the host the client asked for in request.url.
    for (host, expected) in [
        ("alpha.localhost".to_owned(), format!("alpha GET /a alpha.localhost:{port}")),
        (format!("alpha-{alpha}.localhost"), format!("alpha GET /a alpha-{alpha}.localhost:{port}")),
        ("beta.localhost".to_owned(), format!("beta GET /a beta.localhost:{port}")),
    ] {
        let (status, body) = edge.text(&host, "/a").await;
        assert_eq!((status, body.as_str()), (200, expected.as_str()), "{host}; edge:\n{}", edge.stderr());
    }
    let (status, _) = edge.text("nope.localhost", "/").await;
    assert_eq!(status, 404);

    // Each deployment on the runner its ranking names, and only there,
    // however many requests come.
    for _ in 0..5 {
        assert_eq!(edge.text("alpha.localhost", "/").await.0, 200);
        assert_eq!(edge.text("beta.localhost", "/").await.0, 200);
    }
    let both = [&runners[0], &runners[1]];
    for deployment in [&alpha, &beta] {
        let home = ranking(deployment, &both)[0];
        for runner in &runners {
            let expected = usize::from(std::ptr::eq(runner, home));
            assert_eq!(isolates_of(runner, deployment).await, expected, "{deployment} on {}", runner.addr);
        }
    }

    // A project deployed now is served through the edge within 2 s of its
    // deploy returning (the edge's next poll of the routing feed).
    let gamma_deployed = Instant::now();
    let gamma = deploy(&serve, &config, work.path(), "gamma");
    let deploy_returned = Instant::now();
    let first_found = loop {
        let sent = Instant::now();
        let (status, body) = edge.text("gamma.localhost", "/").await;
        if status != 404 {
            assert_eq!((status, body.as_str()), (200, format!("gamma GET / gamma.localhost:{port}").as_str()));
            break sent;
        }
        assert!(sent < deploy_returned + Duration::from_secs(5), "gamma never served; edge:\n{}", edge.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let delay = first_found.saturating_duration_since(deploy_returned);
    println!(
        "gamma served through the edge {} ms after its deploy returned (deploy took {} ms)",
        delay.as_millis(),
        (deploy_returned - gamma_deployed).as_millis()
    );
    assert!(delay < Duration::from_secs(2), "{delay:?}");

    // Kill alpha's runner with GETs in flight in alpha's isolate there: the
    // edge sends them again to the other runner, which answers them.
    let alpha_on_first = ranking(&alpha, &both)[0].addr == runners[0].addr;
    let [first, second] = runners;
    let (dying_runner, surviving_runner) = if alpha_on_first { (first, second) } else { (second, first) };
    let in_flight: Vec<_> = (0..4)
        .map(|i| {
            let request = edge.client("alpha.localhost").get(edge.url("alpha.localhost", &format!("/slow?{i}")));
            tokio::spawn(async move {
                let response = request.send().await.unwrap();
                (response.status().as_u16(), response.text().await.unwrap())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(isolates_of(&dying_runner, &alpha).await, 1, "the slow GETs are on alpha's runner");
    let retries_before = metric_value(&edge.metrics().await, "isocloud_edge_retries_total");
    let dying_name = format!("http://{}/", dying_runner.addr);
    drop(dying_runner); // SIGKILL
    for request in in_flight {
        let (status, body) = request.await.unwrap();
        assert_eq!((status, body.as_str()), (200, format!("alpha GET /slow alpha.localhost:{port}").as_str()));
    }
    let retries = metric_value(&edge.metrics().await, "isocloud_edge_retries_total") - retries_before;
    assert!(retries >= 4, "each GET in flight was sent again ({retries})");
    assert_eq!(isolates_of(&surviving_runner, &alpha).await, 1, "alpha moved to the surviving runner");

    // Right after the kill, every deployment answers (GETs go on to the
    // next runner); once the dead runner is out, requests with a body too.
    for name in ["alpha", "beta", "gamma"] {
        let (status, body) = edge.text(&format!("{name}.localhost"), "/after").await;
        assert_eq!(status, 200, "{name}: {body}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let list = edge.runners().await;
        if list.iter().any(|r| r["runner"] == dying_name.as_str() && r["up"] == false) {
            break;
        }
        assert!(Instant::now() < deadline, "the dead runner is still in: {list:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for name in ["alpha", "beta", "gamma"] {
        let host = format!("{name}.localhost");
        let response = edge.client(&host).post(edge.url(&host, "/form")).body("x=1").send().await.unwrap();
        assert_eq!(response.status(), 200, "{name}");
        assert_eq!(response.text().await.unwrap(), format!("{name} POST /form {host}:{port}"));
    }
    for deployment in [&alpha, &beta, &gamma] {
        assert_eq!(isolates_of(&surviving_runner, deployment).await, 1, "{deployment} runs on the surviving runner");
    }

    // The control plane gone: the edge serves the table it holds (the
    // isolates are warm on the surviving runner).
    drop(serve);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for name in ["alpha", "beta", "gamma"] {
        let (status, body) = edge.text(&format!("{name}.localhost"), "/still").await;
        assert_eq!(status, 200, "{name}: {body}");
    }
    assert!(edge.stderr().contains("serving the host table held"), "{}", edge.stderr());
}

#[tokio::test]
async fn over_tls_the_edge_follows_an_origin_listener_whose_ca_it_trusts() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = origin_certificate(pki.path());
    let (serve, origin) =
        ControlPlaneServe::start_with_origin(&["--origin-tls-cert", cert.as_str(), "--origin-tls-key", key.as_str()]);
    let work = tempfile::tempdir().unwrap();
    deploy(&serve, &work.path().join("config"), work.path(), "alpha");
    let rpc_root = format!("https://{origin}/");
    let trust = ["--rpc-root-ca", ca.as_str()];
    let runner = runner_fed_by_root(&rpc_root, SECRET, &trust);

    // The routing feed over TLS: the edge serves the deployment by Host.
    let edge = Edge::start_with_root(&rpc_root, &[&runner], &trust);
    let port = edge.addr.port();
    let (status, body) = edge.text("alpha.localhost", "/a").await;
    assert_eq!(
        (status, body.as_str()),
        (200, format!("alpha GET /a alpha.localhost:{port}").as_str()),
        "{}",
        edge.stderr()
    );

    // Without the CA the edge gets no table, and its log says why.
    let untrusting = Edge::start_with_root(&rpc_root, &[&runner], &[]);
    let (status, _) = untrusting.text("alpha.localhost", "/a").await;
    assert_ne!(status, 200);
    let log = untrusting.stderr();
    assert!(log.contains("invalid peer certificate: UnknownIssuer"), "the log says why:\n{log}");
}

/// POSTs to `host` through `edge`, one after another for `span`: each
/// answer's status (0: no answer).
async fn posts_for(edge: &Edge, host: &str, span: Duration) -> Vec<u16> {
    let client = reqwest::Client::builder().resolve(host, edge.addr).timeout(Duration::from_secs(10)).build().unwrap();
    let end = Instant::now() + span;
    let mut statuses = Vec::new();
    while Instant::now() < end {
        let sent = client.post(format!("http://{host}:{}/p", edge.addr.port())).body("order").send().await;
        statuses.push(sent.map_or(0, |response| response.status().as_u16()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    statuses
}

fn terminate(runner: &Runner) {
    terminate_pid(runner.pid());
}

fn terminate_pid(pid: u32) {
    let pid = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: signalling a child process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
}

#[tokio::test]
async fn a_runner_stopping_with_a_drain_delay_leaves_the_edge_before_it_closes_and_no_post_is_lost() {
    let (serve, origin) = ControlPlaneServe::start_with_origin(&[]);
    let work = tempfile::tempdir().unwrap();
    let alpha = deploy(&serve, &work.path().join("config"), work.path(), "alpha");
    // The probe first: with no delay, POSTs sent before the edge notices the
    // runner is gone find its port closed (a POST is never retried
    // elsewhere: 502). Then with a delay, none is lost.
    for delay_s in ["0", "3"] {
        let flags = ["--drain-delay-s", delay_s];
        let runners = [runner_fed_by(origin, SECRET, &flags), runner_fed_by(origin, SECRET, &flags)];
        let edge = Edge::start(origin, &[&runners[0], &runners[1]], &[]);
        assert_eq!(posts_for(&edge, "alpha.localhost", Duration::from_millis(100)).await[0], 200);
        let both = [&runners[0], &runners[1]];
        let (home, next) = (ranking(&alpha, &both)[0], ranking(&alpha, &both)[1]);
        assert_eq!(isolates_of(home, &alpha).await, 1);

        terminate(home);
        if delay_s != "0" {
            // Still serving, while its admin listener says it is leaving.
            let health = reqwest::get(format!("http://{}/healthz", home.admin)).await.unwrap();
            assert_eq!((health.status().as_u16(), health.text().await.unwrap()), (503, "draining\n".to_owned()));
        }
        let statuses = posts_for(&edge, "alpha.localhost", Duration::from_secs(3)).await;
        let lost = statuses.iter().filter(|status| **status != 200).count();
        if delay_s == "0" {
            assert!(lost > 0, "the probe: with no delay some POSTs must fail ({statuses:?})");
        } else {
            assert_eq!(lost, 0, "{statuses:?}\nedge:\n{}", edge.stderr());
            assert!(edge.stderr().contains("runner is stopping: out now"), "{}", edge.stderr());
            assert_eq!(isolates_of(next, &alpha).await, 1, "the later POSTs went to the next runner");
        }
    }
}

#[tokio::test]
async fn runners_named_in_a_file_are_added_and_taken_out_without_restarting_the_edge() {
    let (serve, origin) = ControlPlaneServe::start_with_origin(&[]);
    let work = tempfile::tempdir().unwrap();
    let alpha = deploy(&serve, &work.path().join("config"), work.path(), "alpha");
    let (first, second) = (runner_fed_by(origin, SECRET, &[]), runner_fed_by(origin, SECRET, &[]));
    let list = work.path().join("runners");
    std::fs::write(&list, format!("# the runners\nhttp://{}\n", first.addr)).unwrap();
    let edge = Edge::start(origin, &[], &["--runners-file", list.to_str().unwrap()]);
    assert_eq!(edge.text("alpha.localhost", "/a").await.0, 200);
    assert_eq!((isolates_of(&first, &alpha).await, isolates_of(&second, &alpha).await), (1, 0));

    // The file now names the second runner only: within a few seconds
    // every request goes there, and the first gets none.
    std::fs::write(&list, format!("http://{}\n", second.addr)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while isolates_of(&second, &alpha).await == 0 {
        assert!(Instant::now() < deadline, "the new list was not followed:\n{}", edge.stderr());
        assert_eq!(edge.text("alpha.localhost", "/a").await.0, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let requests = async |runner: &Runner| -> u64 {
        let metrics = runner.metrics().await;
        let lines = metrics.lines().filter(|line| line.starts_with(r#"isocloud_requests_total{status="200"}"#));
        lines.filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok()).sum::<f64>() as u64
    };
    let (first_before, second_before) = (requests(&first).await, requests(&second).await);
    for _ in 0..10 {
        assert_eq!(edge.text("alpha.localhost", "/a").await.0, 200);
    }
    assert_eq!(requests(&first).await, first_before, "a runner taken out gets no requests");
    assert_eq!(requests(&second).await, second_before + 10);
    assert!(edge.stderr().contains("runners file changed: the list is replaced"), "{}", edge.stderr());

    // A file that does not read as a list keeps the runners as they were.
    std::fs::write(&list, "ftp://nowhere\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !edge.stderr().contains("does not read as a list") {
        assert!(Instant::now() < deadline, "{}", edge.stderr());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(edge.text("alpha.localhost", "/a").await.0, 200);
}

#[tokio::test]
async fn over_tls_to_runners_the_edge_reaches_a_runner_whose_ca_it_trusts() {
    let (serve, origin) = ControlPlaneServe::start_with_origin(&[]);
    let work = tempfile::tempdir().unwrap();
    let alpha = deploy(&serve, &work.path().join("config"), work.path(), "alpha");
    let (ca, cert, key) = origin_certificate(work.path());
    let runner = runner_fed_by(origin, SECRET, &["--tls-cert", cert.as_str(), "--tls-key", key.as_str()]);
    let url = format!("https://{}", runner.addr);

    // The runner speaks TLS only: plain HTTP to it gets no answer.
    let plain = reqwest::Client::new().get(format!("http://{}/", runner.addr)).send().await;
    assert!(plain.is_err(), "plain HTTP answered: {:?}", plain.map(|r| r.status()));

    // An edge trusting its CA serves through it, over HTTP/2 (the default)
    // and over HTTP/1.1.
    for http2 in ["on", "off"] {
        let trust =
            ["--runner", &url, "--runner-ca", ca.as_str(), "--runner-http2", http2, "--health-interval-ms", "200"];
        let edge = Edge::start(origin, &[], &trust);
        let port = edge.addr.port();
        let (status, body) = edge.text("alpha.localhost", "/a").await;
        assert_eq!((status, body), (200, format!("alpha GET /a alpha.localhost:{port}")), "{}", edge.stderr());
        tokio::time::sleep(Duration::from_millis(700)).await; // probes every 200 ms
        assert_eq!(edge.runners().await[0]["up"], true, "its health probes pass over TLS: {}", edge.stderr());
    }
    assert_eq!(isolates_of(&runner, &alpha).await, 1);

    // Without the CA the runner's certificate is not trusted: nothing is
    // sent to it, and the edge says why.
    let untrusting = Edge::start(origin, &[], &["--runner", &url, "--health-interval-ms", "200"]);
    let (status, _) = untrusting.text("alpha.localhost", "/a").await;
    assert_eq!(status, 502);
    let deadline = Instant::now() + Duration::from_secs(10);
    while untrusting.runners().await[0]["up"] == true {
        assert!(Instant::now() < deadline, "{}", untrusting.stderr());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(untrusting.stderr().contains("UnknownIssuer"), "{}", untrusting.stderr());
}

#[tokio::test]
async fn an_edge_stopping_with_a_drain_delay_serves_on_while_its_health_says_draining() {
    let (serve, origin) = ControlPlaneServe::start_with_origin(&[]);
    let work = tempfile::tempdir().unwrap();
    deploy(&serve, &work.path().join("config"), work.path(), "alpha");
    let runner = runner_fed_by(origin, SECRET, &[]);
    let edge = Edge::start(origin, &[&runner], &["--drain-delay-s", "2"]);
    assert_eq!(edge.text("alpha.localhost", "/a").await.0, 200);
    assert_eq!(edge.health().await, (200, "ok\n".to_owned()), "the probe: ready before the stop");

    terminate_pid(edge.pid());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(edge.health().await, (503, "draining\n".to_owned()), "a load balancer moves away");
    assert_eq!(edge.text("alpha.localhost", "/a").await.0, 200, "while it still serves");
    // Then it closes: within the delay plus a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while edge.try_text("alpha.localhost", "/a").await.0 != 0 {
        assert!(Instant::now() < deadline, "the edge did not close after its delay:\n{}", edge.stderr());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
