//! Hostile tenants against native code (issue 11, rows 1 and 2): a shared
//! object the tenant ships, loaded by `LD_PRELOAD` from its isolate config;
//! V8's natives syntax by `DENO_V8_FLAGS`; a "Wasm" module that is an ELF;
//! and the kernel mapping tenant bytes executable at all. Each attack is
//! first shown to work on a plain deno started by the test, then shown to
//! fail against the runner — refused with a clear error, its probe silent.
//!
//! The shared object is built here with `cc`: its constructor writes a
//! marker file and connects to a loopback listener of the test, so "it ran"
//! is seen from outside whatever the isolate may do.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

/// A shared object whose constructor leaves two traces: a line in
/// `marker` and a TCP connection to `listener`.
struct NativeProbe {
    _dir: tempfile::TempDir,
    so: PathBuf,
    marker: PathBuf,
    listener: TcpListener,
}

impl NativeProbe {
    fn build() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let marker = dir.path().join("constructor-ran");
        let source = dir.path().join("probe.c");
        std::fs::write(
            &source,
            r#"#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

__attribute__((constructor)) static void probe(void) {
  int fd = open(MARKER, O_WRONLY | O_CREAT | O_APPEND, 0666);
  if (fd >= 0) { (void)!write(fd, "ran\n", 4); close(fd); }
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(PORT) };
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (s >= 0) { connect(s, (struct sockaddr *)&to, sizeof to); close(s); }
}
"#,
        )
        .unwrap();
        let so = dir.path().join("x.wasm");
        let output = Command::new("cc")
            .args(["-shared", "-fPIC", "-O1"])
            .arg(format!("-DMARKER={:?}", marker.to_str().unwrap()))
            .arg(format!("-DPORT={port}"))
            .arg("-o")
            .arg(&so)
            .arg(&source)
            .output()
            .expect("cc is installed (the native-code tests build a shared object)");
        assert!(output.status.success(), "cc failed: {}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(&std::fs::read(&so).unwrap()[..4], b"\x7fELF");
        NativeProbe { _dir: dir, so, marker, listener }
    }

    fn elf(&self) -> Vec<u8> {
        std::fs::read(&self.so).unwrap()
    }

    /// Connections that arrived since the last call.
    fn connections(&self) -> usize {
        let mut n = 0;
        while self.listener.accept().is_ok() {
            n += 1;
        }
        n
    }

    fn ran(&self) -> bool {
        self.marker.exists()
    }

    /// Forgets the traces of a run.
    fn reset(&self) {
        let _ = std::fs::remove_file(&self.marker);
        self.connections();
    }
}

/// deno with `args` and `env` (and nothing else): the probe that a variable
/// acts on deno.
fn plain_deno(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(deno_path());
    command.args(args).env_clear().env("NO_COLOR", "1").env("DENO_NO_UPDATE_CHECK", "1");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

/// An `ESZIP2.3` archive without checksums, made by hand: the toolchain
/// would never pack an ELF as a Wasm module, an attacker would.
/// `modules`: (specifier, kind byte: 0 JS, 4 Wasm, source).
fn eszip(modules: &[(&str, u8, &[u8])]) -> Vec<u8> {
    fn section(out: &mut Vec<u8>, body: &[u8]) {
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
    }
    let mut out = b"ESZIP2.3".to_vec();
    // Options: checksum none (0 → 0), digest size 0 (1 → 0).
    section(&mut out, &[0, 0, 1, 0]);
    let mut header = Vec::new();
    let mut sources = Vec::new();
    for (specifier, kind, source) in modules {
        section(&mut header, specifier.as_bytes());
        header.push(0);
        header.extend_from_slice(&(sources.len() as u32).to_be_bytes());
        header.extend_from_slice(&(source.len() as u32).to_be_bytes());
        header.extend_from_slice(&[0; 8]);
        header.push(*kind);
        sources.extend_from_slice(source);
    }
    section(&mut out, &header);
    section(&mut out, &[]);
    section(&mut out, &sources);
    section(&mut out, &[]);
    out
}

const SERVE_OK: &[u8] = b"Deno.serve(() => new Response('booted'));";
/// The smallest WebAssembly module: magic and version.
const EMPTY_WASM: &[u8] = b"\0asm\x01\0\0\0";

/// An ESZIP deployment of `main.js` and `x.wasm`, with `envs`.
fn eszip_deployment(origin: &TestOrigin, id: &str, wasm: &[u8], envs: Value) {
    let layer = format!("{id}-layer");
    origin.layer(&layer, eszip(&[("file:///src/main.js", 0, SERVE_OK), ("file:///src/x.wasm", 4, wasm)]));
    origin.deploy(
        id,
        TestDeployment::config(json!({
            "entrypoint": "file:///src/main.js",
            "layers": [{ "kind": "eszip", "id": layer }],
            "envs": envs,
        })),
    );
}

#[tokio::test]
async fn ld_preload_of_a_shared_object_the_tenant_shipped_is_refused() {
    let probe = NativeProbe::build();
    // The probe works: a plain deno with LD_PRELOAD runs its constructor.
    let output = plain_deno(&["--version"], &[("LD_PRELOAD", probe.so.to_str().unwrap())]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(probe.ran(), "the constructor wrote its marker");
    assert!(probe.connections() >= 1, "the constructor connected to the test's listener");
    probe.reset();

    let origin = TestOrigin::start().await;
    let runner = origin.runner(&[]);
    // The attack of the hostile run: the ELF as a module of the tenant's own
    // ESZIP, preloaded from /src.
    eszip_deployment(&origin, "preload", &probe.elf(), json!({ "LD_PRELOAD": "/src/x.wasm" }));
    let message = expect_error(runner.subhost_get("preload", "/").await, 502, "INVALID_ISOLATE_CONFIG").await;
    assert!(message.contains("envs.LD_PRELOAD") && message.contains("may not be set by a tenant"), "{message}");
    assert!(message.contains("dynamic loader"), "the message says why: {message}");

    // Without the env, the ELF is still no Wasm module.
    eszip_deployment(&origin, "elf-as-wasm", &probe.elf(), json!({}));
    let message = expect_error(runner.subhost_get("elf-as-wasm", "/").await, 502, "LAYER_FAILED").await;
    assert!(message.contains("file:///src/x.wasm") && message.contains("Wasm magic"), "{message}");

    // Control: the same deployment with a real Wasm module and an ordinary
    // env boots and serves.
    eszip_deployment(&origin, "real-wasm", EMPTY_WASM, json!({ "GREETING": "hi" }));
    let response = runner.subhost_get("real-wasm", "/").await;
    assert_eq!(response.status(), 200, "{}", runner.stderr());
    assert_eq!(response.text().await.unwrap(), "booted");

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!probe.ran(), "the constructor never ran");
    assert_eq!(probe.connections(), 0, "the constructor never connected");
    assert_eq!(runner.isolate_pids().len(), 1, "only the healthy deployment's isolate was started");
}

/// Answers whether V8's natives syntax works in the isolate, after trying to
/// turn it on through its own environment.
const NATIVES: &str = r#"
Deno.env.set("DENO_V8_FLAGS", "--allow-natives-syntax");
Deno.serve(() => {
  try {
    return new Response(String(eval("%IsSmi(1)")));
  } catch (e) {
    return new Response(e.name);
  }
});
"#;

#[tokio::test]
async fn deno_v8_flags_are_refused_and_natives_syntax_stays_off() {
    // The probe works: with the flag, a plain deno evaluates natives syntax;
    // without it, it is a syntax error.
    let script = "console.log(eval('%IsSmi(1)'))";
    let on = plain_deno(&["eval", script], &[("DENO_V8_FLAGS", "--allow-natives-syntax")]);
    assert_eq!(String::from_utf8_lossy(&on.stdout).trim(), "true", "{}", String::from_utf8_lossy(&on.stderr));
    let off = plain_deno(&["eval", script], &[]);
    assert!(String::from_utf8_lossy(&off.stderr).contains("SyntaxError"), "{off:?}");

    // Through a subhoster's isolate config.
    let origin = TestOrigin::start().await;
    let runner = origin.runner(&[]);
    let flags = json!({ "DENO_V8_FLAGS": "--allow-natives-syntax" });
    origin.deploy("natives", TestDeployment::inline_js(NATIVES).with(|c| c["envs"] = flags.clone()));
    origin.deploy(
        "natives-lower",
        TestDeployment::inline_js(NATIVES).with(|c| c["envs"] = json!({ "deno_v8_flags": "--allow-natives-syntax" })),
    );
    origin.deploy("plain", TestDeployment::inline_js(NATIVES));
    for deployment in ["natives", "natives-lower"] {
        let message = expect_error(runner.subhost_get(deployment, "/").await, 502, "INVALID_ISOLATE_CONFIG").await;
        assert!(message.to_lowercase().contains("envs.deno_v8_flags"), "{message}");
        assert!(message.contains("deno's own settings"), "{message}");
    }
    // What the tenant may do itself — set it at run time — changes nothing:
    // V8 read its flags long before.
    let response = runner.subhost_get("plain", "/").await;
    assert_eq!(response.status(), 200, "{}", runner.stderr());
    assert_eq!(response.text().await.unwrap(), "SyntaxError");

    // Through an apps folder's isolate.json: the same validation.
    let apps = AppsDir::new();
    apps.app("natives", &[("main.ts", NATIVES), ("isolate.json", &json!({ "envs": flags }).to_string())]);
    apps.app("plain", &[("main.ts", NATIVES)]);
    let runner = apps.serve(&[]);
    let message = expect_error(runner.get("natives.localhost", "/").await, 502, "INVALID_ISOLATE_CONFIG").await;
    assert!(message.contains("envs.DENO_V8_FLAGS"), "{message}");
    assert_eq!(runner.get("plain.localhost", "/").await.text().await.unwrap(), "SyntaxError");
}

const TENANT_GREETING: &str = "greeting-from-tenant-5e1b";
const TENANT_NODE_ENV: &str = "production-of-tenant-93ac";

/// The names deno's process may start with: the runner's alone.
const RUNNER_ENV: [&str; 5] = ["DENO_DIR", "DENO_NO_UPDATE_CHECK", "NO_COLOR", "HTTP_PROXY", "HTTPS_PROXY"];

fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for child in children_of(pid) {
        out.push(child);
        out.extend(descendants(child));
    }
    out
}

/// The environment a process was exec'd with, read from outside (as root).
fn exec_environment(pid: u32) -> Vec<(String, String)> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|b| *b == 0)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let text = String::from_utf8_lossy(entry);
            let (name, value) = text.split_once('=').unwrap_or((&text, ""));
            (name.to_owned(), value.to_owned())
        })
        .collect()
}

fn env_app() -> AppsDir {
    let apps = AppsDir::new();
    let config = json!({ "envs": { "GREETING": TENANT_GREETING, "NODE_ENV": TENANT_NODE_ENV } });
    apps.app(
        "envs",
        &[
            ("main.ts", "Deno.serve(() => Response.json({ env: Deno.env.toObject() }));"),
            ("isolate.json", &config.to_string()),
        ],
    );
    apps
}

/// The tenant sees exactly its envs, and no deno process of the runner was
/// started with any of them.
async fn assert_envs_reach_the_tenant_only(runner: &Runner) {
    let response = runner.get("envs.localhost", "/").await;
    assert_eq!(response.status(), 200, "{}", runner.stderr());
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["env"], json!({ "GREETING": TENANT_GREETING, "NODE_ENV": TENANT_NODE_ENV }));
    // Only processes that are deno by now: a child the runner is forking
    // this instant (a pre-started isolate's refill) still shows the
    // runner's own image and environment until its exec.
    let pids: Vec<u32> = descendants(runner.pid())
        .into_iter()
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.file_name().is_some_and(|name| name.to_string_lossy().starts_with("deno")))
        })
        .collect();
    assert!(!pids.is_empty());
    for pid in pids {
        let env = exec_environment(pid);
        assert!(env.iter().any(|(name, _)| name == "DENO_DIR"), "{pid} is a deno the runner started: {env:?}");
        for (name, value) in &env {
            assert!(RUNNER_ENV.contains(&name.as_str()), "{pid} started with {name}: {env:?}");
            assert!(!value.contains(TENANT_GREETING) && !value.contains(TENANT_NODE_ENV), "{pid}: {env:?}");
        }
    }
}

#[tokio::test]
async fn allowed_envs_reach_the_tenant_but_never_deno_s_exec_environment() {
    // A deno of its own for the deployment.
    let apps = env_app();
    let runner = apps.serve(&[]);
    assert_envs_reach_the_tenant_only(&runner).await;
    let metrics = runner.metrics().await;
    assert_eq!(metric_value(&metrics, r#"isocloud_prestarted_boots_total{result="hit"}"#), 0, "{metrics}");
    drop(runner);

    // A pre-started deno, handed the deployment.
    let runner = apps.serve(&["--prestarted-isolates", "1"]);
    wait_until("a pre-started isolate waits", Duration::from_secs(20), || runner.isolate_pids().len() == 1).await;
    let mut waiting = 0;
    for _ in 0..200 {
        waiting = metric_value(&runner.metrics().await, "isocloud_prestarted_waiting");
        if waiting == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(waiting, 1, "{}", runner.stderr());
    assert_envs_reach_the_tenant_only(&runner).await;
    let metrics = runner.metrics().await;
    assert_eq!(metric_value(&metrics, r#"isocloud_prestarted_boots_total{result="hit"}"#), 1, "{metrics}");
}

/// Reads an asset on request, so the runner writes it into `/src`.
const CARRIER: &str = r#"
Deno.serve(async () => new Response(String((await Deno.readFile("./x.so")).length)));
"#;

/// The mount options of `point` in a mountinfo table.
fn mount_options(mountinfo: &str, point: &str) -> Option<Vec<String>> {
    let line = mountinfo.lines().find(|line| line.split(' ').nth(4) == Some(point))?;
    Some(line.split(' ').nth(5).unwrap().split(',').map(str::to_owned).collect())
}

/// `program` with `env`, in the mount namespace of `pid` (its root and
/// mounts; nothing else of its confinement).
fn run_in_mount_namespace(pid: u32, program: &str, env: &[(&str, &str)]) -> std::process::Output {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let namespace = std::fs::File::open(format!("/proc/{pid}/ns/mnt")).unwrap();
    let fd = namespace.as_raw_fd();
    let mut command = Command::new(program);
    command.arg("--version").env_clear().env("NO_COLOR", "1");
    for (name, value) in env {
        command.env(name, value);
    }
    // SAFETY: setns and chdir are plain syscalls on a descriptor and a
    // static string; nothing is allocated between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNS) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output = command.output().unwrap();
    drop(namespace);
    output
}

#[tokio::test]
async fn tenant_bytes_are_mounted_noexec_and_the_loader_cannot_map_them() {
    let probe = NativeProbe::build();
    let apps = AppsDir::new();
    apps.app("carrier", &[("main.ts", CARRIER)]);
    std::fs::write(apps.dir.path().join("carrier/x.so"), probe.elf()).unwrap();
    let runner = apps.serve(&[]);
    let response = runner.get("carrier.localhost", "/").await;
    assert_eq!(response.status(), 200, "{}", runner.stderr());
    assert_eq!(response.text().await.unwrap(), probe.elf().len().to_string(), "the .so is in its /src now");
    let pids = runner.isolate_pids();
    assert_eq!(pids.len(), 1);
    let pid = pids[0];

    // Its mounts, read from outside (deno gives the tenant no /proc/self).
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    for point in
        ["/src", "/isocloud/modules", "/isocloud/meta", "/isocloud/run", "/isocloud/deno-dir", "/isocloud/harness"]
    {
        let options = mount_options(&mountinfo, point).unwrap_or_else(|| panic!("no {point}:\n{mountinfo}"));
        for flag in ["noexec", "nosuid", "nodev"] {
            assert!(options.iter().any(|o| o == flag), "{point} lacks {flag}: {options:?}");
        }
    }
    let dev = mount_options(&mountinfo, "/dev").unwrap();
    assert!(["ro", "noexec", "nosuid"].iter().all(|flag| dev.iter().any(|o| o == flag)), "/dev: {dev:?}");
    assert!(mount_options(&mountinfo, "/dev/shm").is_none(), "no writable tmpfs: {mountinfo}");
    let deno = mount_options(&mountinfo, "/isocloud/bin/deno").unwrap();
    assert!(!deno.iter().any(|o| o == "noexec"), "deno itself stays executable: {deno:?}");

    // The probe works on a plain deno...
    probe.reset();
    let output = plain_deno(&["--version"], &[("LD_PRELOAD", probe.so.to_str().unwrap())]);
    assert!(output.status.success() && probe.connections() >= 1, "{output:?}");
    // ...and in the isolate's mount namespace deno starts, but the loader
    // cannot map the tenant's copy of it, even for root.
    let output = run_in_mount_namespace(pid, "/isocloud/bin/deno", &[]);
    assert!(output.status.success(), "control: deno runs in the isolate's root: {output:?}");
    let output = run_in_mount_namespace(pid, "/isocloud/bin/deno", &[("LD_PRELOAD", "/src/x.so")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot be preloaded") && stderr.contains("failed to map segment"), "{stderr}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(probe.connections(), 0, "the constructor never ran");
}
