//! Hostile tenants against the isolate sandbox: reading the host's files,
//! another deployment's files, the runner's environment; writing anywhere;
//! starting processes; FFI; signals. Every attempt must fail for the
//! attacker and leave the runner and a neighbour deployment serving. The
//! runner runs with every layer on (a root runner's default), and the
//! isolate's own process is checked from outside: its uid, no-new-privs,
//! seccomp mode, capabilities and limits.
//!
//! These attacks go through the tenant's API, so deno's permissions stop
//! them first; that Landlock and seccomp hold on their own, for a process
//! with *every* deno permission and FFI, is proven in `crates/sandbox`
//! (`command::tests`).

/// One attack request runs dozens of failing probes, each throwing with a
/// stack trace through code compiled cold: more CPU than the default 50 ms
/// budget on a loaded machine. These tests are about the sandbox; the CPU
/// limit has its own (hostile_limits.rs).
const PROBE_LIMITS: &[&str] = &["--cpu-limit-ms", "5000"];

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;
use serde_json::Value;

const FULL_SANDBOX: &str = "sandbox: mount-namespace=on pid-namespace=on landlock=on seccomp=on no-new-privs=on uid=1900000000-1900099999 gid=65534 rlimits=on";

/// The uid of `pid`, one of the default range's (a uid per isolate), the
/// same as real, effective, saved and file system uid.
fn isolate_uid(pid: u32) -> u32 {
    let ids: Vec<u32> = status_field(pid, "Uid").split_whitespace().map(|n| n.parse().unwrap()).collect();
    assert!(ids.iter().all(|id| *id == ids[0]) && (1_900_000_000..=1_900_099_999).contains(&ids[0]), "{ids:?}");
    ids[0]
}

const NEIGHBOUR_SECRET: &str = "neighbour-secret-5d1f0c";

/// Answers its pid; holds a secret in its module and in its environment.
fn neighbour_main() -> String {
    format!("const token = {NEIGHBOUR_SECRET:?};\nDeno.serve(() => new Response(String(Deno.pid)));\n")
}

/// Every probe answers `{ name: { ok: value } | { error: name, message } }`.
const ATTACKER: &str = r#"
const attempt = async (f) => {
  try {
    const v = await f();
    return { ok: typeof v === "string" ? v : JSON.stringify(v) ?? "undefined" };
  } catch (e) {
    return { error: e?.name ?? String(e), message: String(e?.message ?? e) };
  }
};
const text = (bytes) => new TextDecoder().decode(bytes);

async function read(path) {
  return {
    readTextFile: await attempt(() => Deno.readTextFile(path)),
    readFileSync: await attempt(() => text(Deno.readFileSync(path))),
    open: await attempt(async () => {
      using file = await Deno.open(path);
      const buf = new Uint8Array(256);
      const n = await file.read(buf);
      return text(buf.subarray(0, n ?? 0));
    }),
    stat: await attempt(async () => (await Deno.stat(path)).size),
    realPath: await attempt(() => Deno.realPath(path)),
    fetch: await attempt(async () => (await fetch(new URL(`file://${path}`))).text()),
    importJson: await attempt(() => import(`file://${path}`, { with: { type: "json" } })),
    nodeFs: await attempt(async () => (await import("node:fs")).readFileSync(path, "utf8")),
  };
}

async function write(path) {
  return {
    writeTextFile: await attempt(() => Deno.writeTextFile(path, "pwned")),
    append: await attempt(() => Deno.writeTextFile(path, "pwned", { append: true })),
    create: await attempt(async () => (await Deno.create(path)).close()),
    mkdir: await attempt(() => Deno.mkdir(`${path}.d`)),
    remove: await attempt(() => Deno.remove(path)),
    truncate: await attempt(() => Deno.truncate(path, 0)),
    symlink: await attempt(() => Deno.symlink("/etc/passwd", `${path}.link`)),
    chmod: await attempt(() => Deno.chmod(path, 0o777)),
    nodeFs: await attempt(async () => (await import("node:fs")).writeFileSync(path, "pwned")),
  };
}

Deno.serve(async (req) => {
  const url = new URL(req.url);
  const path = url.searchParams.get("path") ?? "";
  // Host pids the test passes, as an attacker who guessed them would name
  // them: `?pid=` the neighbour's, `?runner=` the runner's. In its own PID
  // namespace the isolate knows neither (`Deno.ppid` is 0), and 0 must never
  // get through: `kill(0, …)` signals the attacker's own process group.
  const hostPid = (name) => {
    const pid = Number(url.searchParams.get(name));
    if (!Number.isInteger(pid) || pid <= 0) throw new Error(`?${name}= is not a host pid`);
    return pid;
  };
  switch (url.pathname) {
    case "/pid":
      return new Response(String(Deno.pid));
    case "/whoami": {
      const process = (await import("node:process")).default;
      return Response.json({ pid: Deno.pid, ppid: Deno.ppid, nodePid: process.pid, nodePpid: process.ppid });
    }
    case "/read":
      return Response.json(await read(path));
    case "/write": {
      const out = {};
      for (const target of url.searchParams.getAll("path")) out[target] = await write(target);
      out.tempFile = { makeTempFile: await attempt(() => Deno.makeTempFile()) };
      return Response.json(out);
    }
    case "/environ": {
      const [neighbour, runner] = [hostPid("pid"), hostPid("runner")];
      return Response.json({
        self: await read("/proc/self/environ"),
        init: await read("/proc/1/environ"),
        runner: await read(`/proc/${runner}/environ`),
        neighbour: await read(`/proc/${neighbour}/environ`),
        neighbourMem: await read(`/proc/${neighbour}/mem`),
      });
    }
    case "/env":
      return Response.json({
        env: Deno.env.toObject(),
        home: Deno.env.get("HOME") ?? null,
        processEnv: Object.keys((await import("node:process")).env),
      });
    case "/spawn": {
      const [neighbour, runner] = [hostPid("pid"), hostPid("runner")];
      return Response.json({
        commandOutput: await attempt(async () => (await new Deno.Command("/bin/sh", { args: ["-c", "id"] }).output()).code),
        commandSpawn: await attempt(() => new Deno.Command("/usr/bin/unshare", { args: ["-U", "true"] }).spawn().pid),
        commandSync: await attempt(() => new Deno.Command("/bin/true").outputSync().code),
        childProcess: await attempt(async () => (await import("node:child_process")).execSync("id").toString()),
        // spawnSync does not throw: it reports failure in `.error`, and when
        // deno refuses it, by an empty result with no exit status.
        spawnSync: await attempt(async () => {
          const result = (await import("node:child_process")).spawnSync("/bin/true");
          if (result.error || typeof result.status !== "number") {
            throw result.error ?? new Error(`no process ran: ${JSON.stringify(result)}`);
          }
          return result.status;
        }),
        killRunner: await attempt(() => Deno.kill(runner, "SIGKILL")),
        killNeighbour: await attempt(() => Deno.kill(neighbour, "SIGKILL")),
        killEveryone: await attempt(() => Deno.kill(-1, "SIGKILL")),
        nodeKill: await attempt(async () => (await import("node:process")).kill(runner, "SIGKILL")),
      });
    }
    case "/ffi":
      return Response.json({
        dlopen: await attempt(() => Deno.dlopen("libc.so.6", { unshare: { parameters: ["i32"], result: "i32" } })),
        dlopenPtrace: await attempt(() =>
          Deno.dlopen("/lib/x86_64-linux-gnu/libc.so.6", {
            ptrace: { parameters: ["i64", "i64", "pointer", "pointer"], result: "i64" },
          })
        ),
        pointer: await attempt(() => Deno.UnsafePointer.of(new Uint8Array(8))),
        nodeDlopen: await attempt(async () => (await import("node:process")).dlopen({ exports: {} }, "libc.so.6")),
      });
    default:
      return new Response("attacker");
  }
});
"#;

fn apps() -> AppsDir {
    let apps = AppsDir::new();
    apps.app("attacker", &[("main.ts", ATTACKER), ("isolate.json", r#"{ "envs": { "ONLY": "mine" } }"#)]).app(
        "neighbour",
        &[
            ("main.ts", &neighbour_main()),
            ("isolate.json", &format!(r#"{{ "envs": {{ "NEIGHBOUR_TOKEN": "{NEIGHBOUR_SECRET}" }} }}"#)),
        ],
    );
    apps
}

async fn get_json(runner: &Runner, path: &str) -> Value {
    let response = runner.get("attacker.localhost", path).await;
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// What `host`'s isolate answered on `path` (its `Deno.pid`), and its host
/// pid from the runner's admin listener.
async fn answer_and_pid(runner: &Runner, host: &str, path: &str) -> (String, u32) {
    let response = runner.get(host, path).await;
    assert_eq!(response.status(), 200, "{host}");
    (response.text().await.unwrap(), runner.isolate_pid(host.strip_suffix(".localhost").unwrap()).await)
}

/// The host pid of `host`'s isolate, which is pid 1 of its own PID namespace.
async fn pid_of(runner: &Runner, host: &str, path: &str) -> u32 {
    let (answer, pid) = answer_and_pid(runner, host, path).await;
    assert_eq!(answer, "1", "{host}: deno is pid 1 of its own namespace (host pid {pid})");
    pid
}

/// The attacker's `/environ` or `/spawn` probes, aimed at the neighbour's
/// and the runner's real host pids — after showing, from the test (root on
/// the host), that both processes exist there with environments to steal
/// (the variables each was started with; the neighbour's own envs are set
/// later, in its memory, which `/mem` aims at).
async fn aimed_at_host_pids(runner: &Runner, probes: &str, neighbour_pid: u32) -> Value {
    for (pid, variable) in [(neighbour_pid, "DENO_DIR="), (runner.pid(), "ISOCLOUD_LOG=")] {
        assert!(process_alive(pid), "{pid} does not run");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(String::from_utf8_lossy(&environ).contains(variable), "{pid} was started without {variable}");
    }
    get_json(runner, &format!("/{probes}?pid={neighbour_pid}&runner={}", runner.pid())).await
}

/// Every probe of `report` (nested one level) failed.
fn assert_all_failed(report: &Value, what: &str) {
    let probes = report.as_object().unwrap_or_else(|| panic!("{what}: not an object: {report}"));
    for (name, result) in probes {
        if result.get("ok").is_some() {
            panic!("{what}: {name} succeeded: {result}");
        }
        if result.get("error").is_none() {
            assert_all_failed(result, &format!("{what}/{name}"));
        }
    }
}

/// The runner still runs and the neighbour (same isolate, same host pid)
/// still answers.
async fn assert_unharmed(runner: &Runner, neighbour_pid: u32) {
    assert!(process_alive(runner.pid()), "the runner died");
    let (_, pid) = answer_and_pid(runner, "neighbour.localhost", "/").await;
    assert_eq!(pid, neighbour_pid, "the neighbour was replaced");
    assert!(process_alive(neighbour_pid), "the neighbour died");
    assert_eq!(runner.get("attacker.localhost", "/").await.text().await.unwrap(), "attacker");
}

fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap_or_else(|| panic!("{name}?"));
    line[name.len() + 1..].trim().to_owned()
}

/// The host path of a deployment's instance dir (the runner's state dir).
fn instance_dir(runner: &Runner, deployment: &str) -> PathBuf {
    for isolates in std::fs::read_dir(runner.state_dir.path()).unwrap().flatten() {
        if !isolates.file_name().to_string_lossy().starts_with("isolates-") {
            continue;
        }
        for instance in std::fs::read_dir(isolates.path()).unwrap().flatten() {
            if instance.file_name().to_string_lossy().ends_with(&format!("-{deployment}")) {
                return instance.path();
            }
        }
    }
    panic!("no instance dir of {deployment}");
}

#[tokio::test]
async fn every_layer_is_on_and_the_isolate_runs_unprivileged() {
    let apps = apps();
    let runner = apps.serve(PROBE_LIMITS);
    runner.wait_for_log(FULL_SANDBOX);

    let pid = pid_of(&runner, "attacker.localhost", "/pid").await;
    assert!(runner.isolate_pids().contains(&pid));
    let uid = isolate_uid(pid);
    assert_eq!(status_field(pid, "Gid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(pid, "Groups"), "");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    // Its own PID namespace: pid 1 there, no parent, and its /proc (the
    // jail's, seen from the host through its root) lists itself alone —
    // though the runner and the neighbour do run on the host.
    assert_eq!(status_field(pid, "NSpid"), format!("{pid}\t1"));
    let whoami = get_json(&runner, "/whoami").await;
    assert_eq!(whoami, serde_json::json!({ "pid": 1, "ppid": 0, "nodePid": 1, "nodePpid": 0 }));
    let neighbour_pid = pid_of(&runner, "neighbour.localhost", "/").await;
    let processes = |proc_dir: &str| -> Vec<u32> {
        let mut pids: Vec<u32> = std::fs::read_dir(proc_dir)
            .unwrap()
            .filter_map(|entry| entry.unwrap().file_name().to_str()?.parse().ok())
            .collect();
        pids.sort();
        pids
    };
    let on_host = processes("/proc");
    assert!(on_host.contains(&runner.pid()) && on_host.contains(&neighbour_pid) && on_host.contains(&pid));
    assert_eq!(processes(&format!("/proc/{pid}/root/proc")), [1], "the isolate's /proc shows other processes");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    assert_eq!(open_files.split_whitespace().skip(3).take(2).collect::<Vec<_>>(), ["8192", "8192"]);
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert_eq!(core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(), ["0", "0"]);
    // Its sockets' folder is its own, and no one else's.
    let run = instance_dir(&runner, "attacker").join("run");
    let meta = std::fs::metadata(&run).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!((meta.uid(), meta.gid(), meta.permissions().mode() & 0o777), (uid, 65534, 0o700));
}

#[tokio::test]
async fn reading_host_files_fails() {
    let apps = apps();
    let runner = apps.serve(PROBE_LIMITS);
    let neighbour_pid = pid_of(&runner, "neighbour.localhost", "/").await;
    let state_dir = runner.state_dir.path().to_str().unwrap().to_owned();
    for path in ["/etc/passwd", "/etc/shadow", "/etc/hostname", "/root/.bashrc", "/proc/1/cmdline", state_dir.as_str()]
    {
        let report = get_json(&runner, &format!("/read?path={path}")).await;
        assert_all_failed(&report, path);
        assert!(!report.to_string().contains("root:x:0:0"), "{path}: {report}");
        assert_unharmed(&runner, neighbour_pid).await;
    }
}

#[tokio::test]
async fn another_deployments_files_are_out_of_reach() {
    let apps = apps();
    let runner = apps.serve(PROBE_LIMITS);
    let neighbour_pid = pid_of(&runner, "neighbour.localhost", "/").await;
    pid_of(&runner, "attacker.localhost", "/pid").await;
    let neighbour_main = instance_dir(&runner, "neighbour").join("src/main.ts");
    assert!(std::fs::read_to_string(&neighbour_main).unwrap().contains(NEIGHBOUR_SECRET));
    let neighbour_dir = neighbour_main.parent().unwrap().parent().unwrap().file_name().unwrap().to_str().unwrap();
    let host_path = neighbour_main.to_str().unwrap().to_owned();
    let apps_copy = Path::new(apps.path()).join("neighbour/main.ts").to_str().unwrap().to_owned();
    for path in [
        host_path.clone(),
        apps_copy,
        // From inside the jail, its own root's parent is itself.
        format!("/src/../../{neighbour_dir}/src/main.ts"),
        format!("/isocloud/../../../{neighbour_dir}/src/main.ts"),
    ] {
        let report = get_json(&runner, &format!("/read?path={path}")).await;
        assert_all_failed(&report, &path);
        assert!(!report.to_string().contains(NEIGHBOUR_SECRET), "{path}: {report}");
    }
    let report = aimed_at_host_pids(&runner, "environ", neighbour_pid).await;
    assert_all_failed(&report, "environ");
    assert!(!report.to_string().contains(NEIGHBOUR_SECRET), "{report}");

    // Each deployment has its own deno cache dir (the V8 code cache deno
    // writes), its isolate's uid's alone: no cache is shared between tenants.
    use std::os::unix::fs::MetadataExt;
    let uids = [isolate_uid(neighbour_pid), isolate_uid(pid_of(&runner, "attacker.localhost", "/pid").await)];
    assert_ne!(uids[0], uids[1], "a uid per isolate");
    let deno_dirs: Vec<PathBuf> = std::fs::read_dir(runner.state_dir.path().join("deno-dir"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert_eq!(deno_dirs.len(), 2, "one per deployment: {deno_dirs:?}");
    for dir in &deno_dirs {
        let meta = std::fs::metadata(dir).unwrap();
        assert!(uids.contains(&meta.uid()) && meta.mode() & 0o777 == 0o700, "{}", dir.display());
    }
    assert_unharmed(&runner, neighbour_pid).await;
}

#[tokio::test]
async fn the_runners_environment_stays_hidden() {
    let apps = apps();
    let runner = apps.serve(PROBE_LIMITS);
    let neighbour_pid = pid_of(&runner, "neighbour.localhost", "/").await;
    let seen = get_json(&runner, "/env").await;
    assert_eq!(seen["env"], serde_json::json!({ "ONLY": "mine" }), "{seen}");
    assert_eq!(seen["home"], Value::Null);
    assert_eq!(seen["processEnv"], serde_json::json!(["ONLY"]), "{seen}");
    // The runner's environment (it has ISOCLOUD_LOG, PATH, HOME, CARGO_*),
    // init's, and the isolate's own through /proc.
    let report = aimed_at_host_pids(&runner, "environ", neighbour_pid).await;
    assert_all_failed(&report, "environ");
    let text = report.to_string();
    for leak in ["ISOCLOUD_LOG", "PATH=", "CARGO", NEIGHBOUR_SECRET] {
        assert!(!text.contains(leak), "{leak} leaked: {text}");
    }
    assert_unharmed(&runner, neighbour_pid).await;
}

#[tokio::test]
async fn writing_anywhere_fails() {
    let apps = apps();
    let runner = apps.serve(PROBE_LIMITS);
    let neighbour_pid = pid_of(&runner, "neighbour.localhost", "/").await;
    pid_of(&runner, "attacker.localhost", "/pid").await;
    let attacker = instance_dir(&runner, "attacker");
    let neighbour_main = instance_dir(&runner, "neighbour").join("src/main.ts");
    let escape = std::env::temp_dir().join(format!("isocloud-hostile-{}", std::process::id()));
    let targets = [
        escape.to_str().unwrap().to_owned(),
        "/tmp/escape".to_owned(),
        "/src/main.ts".to_owned(),
        "/src/new.txt".to_owned(),
        "/isocloud/run/escape".to_owned(),
        "/isocloud/deno-dir/escape".to_owned(),
        "/isocloud/harness/harness.js".to_owned(),
        "/isocloud/meta/import_map.json".to_owned(),
        "/etc/escape".to_owned(),
        "/dev/shm/escape".to_owned(),
        neighbour_main.to_str().unwrap().to_owned(),
        attacker.join("run/escape").to_str().unwrap().to_owned(),
    ];
    let query: Vec<String> = targets.iter().map(|t| format!("path={t}")).collect();
    let report = get_json(&runner, &format!("/write?{}", query.join("&"))).await;
    assert_all_failed(&report, "write");

    assert!(!escape.exists() && !Path::new("/tmp/escape").exists());
    assert!(std::fs::read_to_string(&neighbour_main).unwrap().contains(NEIGHBOUR_SECRET));
    assert_eq!(std::fs::read_to_string(attacker.join("src/main.ts")).unwrap(), ATTACKER);
    let run: Vec<String> = std::fs::read_dir(attacker.join("run"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(run.iter().all(|name| name.ends_with(".sock")), "{run:?}");
    let deno_dir = runner.state_dir.path().join("deno-dir");
    assert!(!deno_dir.join("escape").exists());
    assert_unharmed(&runner, neighbour_pid).await;
}

#[tokio::test]
async fn starting_processes_and_signalling_fail() {
    let apps = apps();
    let runner = apps.serve(PROBE_LIMITS);
    let neighbour_pid = pid_of(&runner, "neighbour.localhost", "/").await;
    let attacker_pid = pid_of(&runner, "attacker.localhost", "/pid").await;
    let report = aimed_at_host_pids(&runner, "spawn", neighbour_pid).await;
    assert_all_failed(&report, "spawn");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(children_of(attacker_pid).is_empty(), "the attacker started {:?}", children_of(attacker_pid));
    assert_eq!(pid_of(&runner, "attacker.localhost", "/pid").await, attacker_pid);
    assert_unharmed(&runner, neighbour_pid).await;
}

#[tokio::test]
async fn ffi_is_refused() {
    let apps = apps();
    let runner = apps.serve(PROBE_LIMITS);
    let neighbour_pid = pid_of(&runner, "neighbour.localhost", "/").await;
    let report = get_json(&runner, "/ffi").await;
    assert_all_failed(&report, "ffi");
    assert_unharmed(&runner, neighbour_pid).await;
}

#[tokio::test]
async fn each_layer_is_switched_off_only_by_its_flag() {
    let apps = apps();
    let off = [
        "--landlock",
        "off",
        "--seccomp",
        "off",
        "--rlimits",
        "off",
        "--isolate-uid",
        "off",
        PROBE_LIMITS[0],
        PROBE_LIMITS[1],
    ];
    let runner = apps.serve(&off);
    let line = "sandbox: mount-namespace=on pid-namespace=on landlock=off seccomp=off no-new-privs=on uid=off gid=off rlimits=off";
    runner.wait_for_log(line);
    let pid = pid_of(&runner, "attacker.localhost", "/pid").await;
    assert_eq!(status_field(pid, "Seccomp"), "0");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1", "no-new-privs has no switch");
    // deno's permissions still hold with the OS layers off.
    assert_all_failed(&get_json(&runner, "/read?path=/etc/passwd").await, "read without OS layers");
    drop(runner);

    // Without the mount namespace, every other layer still works on host
    // paths (the isolate uid reaches its files through the state dir). The
    // PID namespace goes with it (its /proc is the jail's): deno sees its
    // host pid.
    let runner = apps.serve(&["--mount-namespace", "off", PROBE_LIMITS[0], PROBE_LIMITS[1]]);
    let line = "sandbox: mount-namespace=off pid-namespace=off landlock=on seccomp=on no-new-privs=on \
                uid=1900000000-1900099999 gid=65534 rlimits=on";
    runner.wait_for_log(line);
    let (answer, pid) = answer_and_pid(&runner, "attacker.localhost", "/pid").await;
    assert_eq!(answer, pid.to_string(), "without a PID namespace deno sees its host pid");
    isolate_uid(pid);
    let (_, neighbour_pid) = answer_and_pid(&runner, "neighbour.localhost", "/").await;
    let neighbour_main = instance_dir(&runner, "neighbour").join("src/main.ts");
    let report = get_json(&runner, &format!("/read?path={}", neighbour_main.display())).await;
    assert_all_failed(&report, "neighbour's module by host path");
    assert_unharmed(&runner, neighbour_pid).await;
}

#[tokio::test]
async fn an_isolate_uid_needs_a_valid_value() {
    let apps = apps();
    for (flag, value) in [("--isolate-uid", "0"), ("--isolate-gid", "0"), ("--landlock", "maybe")] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_isocloud"))
            .args(["serve", "--apps", apps.path(), flag, value])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&flag[2..].replace('-', "_")), "{stderr}");
    }
}
