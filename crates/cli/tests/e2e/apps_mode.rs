//! `isocloud serve --apps DIR`: Host routing, handler styles, isolate.json,
//! envs, assets — real deno isolates behind the real binary.

use std::time::Duration;

use crate::support::*;
use serde_json::Value;

#[tokio::test]
async fn routes_by_host_and_serves_each_handler_style() {
    let apps = AppsDir::new();
    apps.app("serve", &[("main.ts", "Deno.serve((req: Request) => new Response(`serve ${req.method} ${req.url}`));")])
        .app("options", &[("main.js", "Deno.serve({ port: 1234, hostname: '0.0.0.0', onListen() {} }, (req) => new Response('options form'));")])
        .app("handler-key", &[("mod.ts", "Deno.serve({ handler: () => new Response('handler key') });")])
        .app("default-export", &[("index.ts", "export default { fetch(req: Request) { return new Response('default ' + new URL(req.url).search); } };")])
        .app("legacy", &[("index.js", "addEventListener('fetch', (e) => e.respondWith(new Response('legacy ' + e.request.url)));")]);
    let runner = apps.serve(&[]);
    let port = runner.addr.port();

    let body = runner.get("serve.localhost", "/a/b?x=1").await.text().await.unwrap();
    assert_eq!(body, format!("serve GET http://serve.localhost:{port}/a/b?x=1"));
    assert_eq!(runner.get("options.localhost", "/").await.text().await.unwrap(), "options form");
    assert_eq!(runner.get("handler-key.localhost", "/").await.text().await.unwrap(), "handler key");
    assert_eq!(runner.get("default-export.localhost", "/?q=2").await.text().await.unwrap(), "default ?q=2");
    assert_eq!(
        runner.get("legacy.localhost", "/p").await.text().await.unwrap(),
        format!("legacy http://legacy.localhost:{port}/p")
    );

    // Unknown hosts and apps: 404 with the stable code, no isolate started.
    let before = runner.isolate_pids().len();
    expect_error(runner.get("nope.localhost", "/").await, 404, "DEPLOYMENT_NOT_FOUND").await;
    expect_error(runner.get("example.com", "/").await, 404, "DEPLOYMENT_NOT_FOUND").await;
    expect_error(runner.get("a.b.localhost", "/").await, 404, "DEPLOYMENT_NOT_FOUND").await;
    assert_eq!(runner.isolate_pids().len(), before);
}

#[tokio::test]
async fn isolate_json_sets_entrypoint_envs_and_permissions() {
    let apps = AppsDir::new();
    apps.app(
        "configured",
        &[
            ("isolate.json", r#"{ "entrypoint": "server/app.ts", "envs": { "GREETING": "hej", "EMPTY": "" } }"#),
            ("main.ts", "Deno.serve(() => new Response('wrong entrypoint'));"),
            (
                "server/app.ts",
                "Deno.serve(() => Response.json({ env: Deno.env.toObject(), path: Deno.env.get('PATH') ?? null }));",
            ),
        ],
    )
    .app("bad-config", &[("isolate.json", r#"{ "envs": { "A=B": "x" } }"#), ("main.ts", "")])
    .app("unknown-field", &[("isolate.json", r#"{ "entry": "x.ts" }"#), ("main.ts", "")])
    .app("no-entry", &[("readme.md", "nothing to run")]);
    let runner = apps.serve(&[]);

    let body: Value = runner.get("configured.localhost", "/").await.json().await.unwrap();
    // Exactly the configured envs: nothing of the runner's environment.
    assert_eq!(body["env"], serde_json::json!({ "GREETING": "hej", "EMPTY": "" }));
    assert_eq!(body["path"], Value::Null);

    let message = expect_error(runner.get("bad-config.localhost", "/").await, 502, "INVALID_ISOLATE_CONFIG").await;
    assert!(message.contains("envs.A=B"), "{message}");
    let message = expect_error(runner.get("unknown-field.localhost", "/").await, 502, "INVALID_ISOLATE_CONFIG").await;
    assert!(message.contains("entry"), "{message}");
    let message = expect_error(runner.get("no-entry.localhost", "/").await, 502, "INVALID_ISOLATE_CONFIG").await;
    assert!(message.contains("main.ts"), "{message}");
}

#[tokio::test]
async fn assets_are_readable_and_nothing_is_writable() {
    let apps = AppsDir::new();
    apps.app(
        "files",
        &[
            ("static/a.txt", "alpha"),
            ("static/nested/b.json", r#"{"b":1}"#),
            (
                "main.ts",
                r#"
const attempt = async (f: () => Promise<unknown>) => { try { await f(); return "ok"; } catch (e) { return (e as Error).name; } };
Deno.serve(async (req) => {
  const url = new URL(req.url);
  if (url.pathname === "/read") {
    const entries = [];
    for await (const e of Deno.readDir("static")) entries.push(`${e.name}:${e.isFile ? "f" : "d"}`);
    const stat = await Deno.stat("static/a.txt");
    return Response.json({
      text: await Deno.readTextFile("static/a.txt"),
      viaUrl: await Deno.readTextFile(new URL("./static/nested/b.json", import.meta.url)),
      bytes: (await Deno.readFile("static/a.txt")).length,
      sync: Deno.readTextFileSync("static/nested/b.json"),
      size: stat.size,
      isFile: stat.isFile,
      entries: entries.sort(),
      fetched: await (await fetch(new URL("./static/a.txt", import.meta.url))).text(),
    });
  }
  return Response.json({
    writeAsset: await attempt(() => Deno.writeTextFile("static/a.txt", "x")),
    writeNew: await attempt(() => Deno.writeTextFile("new.txt", "x")),
    writeTmp: await attempt(() => Deno.writeTextFile("/tmp/isocloud-escape.txt", "x")),
    mkdir: await attempt(() => Deno.mkdir("dir")),
    remove: await attempt(() => Deno.remove("static/a.txt")),
    readPasswd: await attempt(() => Deno.readTextFile("/etc/passwd")),
    run: await attempt(() => new Deno.Command("/bin/true").output()),
  });
});
"#,
            ),
        ],
    );
    let runner = apps.serve(&[]);
    let read: Value = runner.get("files.localhost", "/read").await.json().await.unwrap();
    assert_eq!(read["text"], "alpha");
    assert_eq!(read["viaUrl"], r#"{"b":1}"#);
    assert_eq!(read["bytes"], 5);
    assert_eq!(read["sync"], r#"{"b":1}"#);
    assert_eq!(read["size"], 5);
    assert_eq!(read["isFile"], true);
    assert_eq!(read["entries"], serde_json::json!(["a.txt:f", "nested:d"]));
    assert_eq!(read["fetched"], "alpha");

    let denied: Value = runner.get("files.localhost", "/write").await.json().await.unwrap();
    for key in ["writeAsset", "writeNew", "writeTmp", "mkdir", "remove", "readPasswd", "run"] {
        assert_eq!(denied[key], "NotCapable", "{key}: {denied}");
    }
    assert!(!std::path::Path::new("/tmp/isocloud-escape.txt").exists());
}

#[tokio::test]
async fn the_isolate_sees_its_deployment_at_src_and_no_host_path() {
    let apps = AppsDir::new();
    apps.app(
        "jailed",
        &[
            ("static/a.txt", "alpha"),
            (
                "main.ts",
                r#"
Deno.serve(async () => {
  let stack = "";
  try { throw new Error("where am I"); } catch (e) { stack = (e as Error).stack ?? ""; }
  return Response.json({
    url: import.meta.url,
    cwd: Deno.cwd(),
    main: Deno.mainModule,
    stack,
    absolute: await Deno.readTextFile("/src/static/a.txt"),
  });
});
"#,
            ),
        ],
    );
    let runner = apps.serve(&["--mount-namespace", "on"]);
    runner.wait_for_log("mount-namespace=on");
    let response = runner.get("jailed.localhost", "/").await;
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["url"], "file:///src/main.ts");
    assert_eq!(body["cwd"], "/src");
    assert_eq!(body["absolute"], "alpha");
    assert!(body["stack"].as_str().unwrap().contains("file:///src/main.ts"), "{body}");
    let state = runner.state_dir.path().to_str().unwrap();
    let apps_dir = apps.path();
    for leak in [state, apps_dir] {
        assert!(!text.contains(leak), "host path {leak} visible in {text}");
    }
}

/// A Deploy-era server: a TCP listener and `Deno.serveHttp`, in a top-level
/// `for await` that never ends.
fn deploy_era_app(port: u16, name: &str) -> String {
    format!(
        r#"const listener = Deno.listen({{ port: {port} }});
console.log("listening on", listener.addr.port);
for await (const conn of listener) {{
  (async () => {{
    for await (const event of Deno.serveHttp(conn)) {{
      event.respondWith(new Response(`{name} ${{new URL(event.request.url).pathname}} ${{listener.addr.port}}`));
    }}
  }})();
}}
"#
    )
}

#[tokio::test]
async fn deploy_era_listeners_receive_the_runners_requests_and_bind_nothing_on_the_host() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // The probe: the same app under a plain deno binds the host's port.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("main.ts"), deploy_era_app(port, "plain")).unwrap();
    let mut plain = std::process::Command::new(repo_root().join(".isocloud/deno/bin/deno"))
        .args(["run", "--allow-net", "main.ts"])
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let bound = wait_until("plain deno to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    bound.await;
    plain.kill().unwrap();
    plain.wait().unwrap();

    // Two tenants on the same port, each served through the runner.
    let apps = AppsDir::new();
    apps.app("one", &[("main.ts", &deploy_era_app(port, "one"))]);
    apps.app("two", &[("main.ts", &deploy_era_app(port, "two"))]);
    let runner = apps.serve(&[]);
    for (host, name) in [("one.localhost", "one"), ("two.localhost", "two")] {
        let response = runner.get(host, "/path").await;
        assert_eq!(response.status(), 200, "{}", runner.stderr());
        assert_eq!(response.text().await.unwrap(), format!("{name} /path {port}"));
    }
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens on the host's port {port} while both serve"
    );
}

/// `--runtime-threads N` is the runner's worker count (its `/metrics` say
/// so, and it serves); without it, one worker per core.
#[tokio::test]
async fn runtime_threads_sets_the_runners_workers() {
    let apps = AppsDir::new();
    apps.app("hello", &[("main.ts", "Deno.serve(() => new Response('hello'));")]);
    let workers = |metrics: &str| -> usize {
        let line = metrics.lines().find(|l| l.starts_with("isocloud_runtime_threads ")).expect("the gauge");
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let cores = std::thread::available_parallelism().unwrap().get();
    let default = apps.serve(&[]);
    assert_eq!(default.get("hello.localhost", "/").await.text().await.unwrap(), "hello");
    assert_eq!(workers(&default.metrics().await), cores, "one per core by default");
    // A count no machine's default gives here: one more than the cores.
    let given = (cores + 1).to_string();
    let runner = apps.serve(&["--runtime-threads", &given]);
    assert_eq!(runner.get("hello.localhost", "/").await.text().await.unwrap(), "hello");
    assert_eq!(workers(&runner.metrics().await), cores + 1);
}
