//! The deploy manifests (`deploy/kubernetes/*.yaml`, `deploy/systemd/*.service`)
//! against the binary they start: every document parses and names itself,
//! every flag a container or unit passes is one `isocloud <role> --help`
//! lists, each role gets the flags it cannot start without, probes ask the
//! admin listener's `/healthz`, Services select pods that exist, and the stop
//! timeouts leave the drain its time. A renamed flag fails here, not at an
//! operator's first `kubectl apply`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml_ng::Value;

const ROLES: [&str; 3] = ["serve", "runner", "edge"];
/// The drain timeout when a manifest does not set `--drain-timeout-s`.
const DEFAULT_DRAIN_TIMEOUT_S: u64 = 10;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The long flags `isocloud <role> --help` lists.
fn help_flags(role: &str) -> BTreeSet<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_isocloud")).args([role, "--help"]).output().expect("run isocloud");
    assert!(output.status.success(), "isocloud {role} --help failed: {output:?}");
    let text = String::from_utf8(output.stdout).expect("utf-8 help");
    let flags: BTreeSet<String> = text
        .lines()
        .filter_map(|line| {
            let line = line.trim_start();
            // Option lines read `--name <VALUE>` or `-h, --help`.
            let line = line.strip_prefix("-h, ").unwrap_or(line);
            let name = line.strip_prefix("--")?.split([' ', '=', ',']).next()?;
            (!name.is_empty()).then(|| format!("--{name}"))
        })
        .collect();
    // The parse itself must see the flags every role has, or nothing below means anything.
    for flag in ["--listen", "--admin-listen", "--drain-timeout-s", "--config"] {
        assert!(flags.contains(flag), "{role} --help parsed without {flag}: {flags:?}");
    }
    flags
}

fn all_help_flags() -> BTreeMap<&'static str, BTreeSet<String>> {
    ROLES.iter().map(|role| (*role, help_flags(role))).collect()
}

/// Each `--name` of `args` (as `--name=value` or `--name value`), in order.
fn flags_of(args: &[String]) -> Vec<String> {
    args.iter().filter(|a| a.starts_with("--")).map(|a| a.split('=').next().unwrap_or(a).to_owned()).collect()
}

/// The value of `--name` in `args`, either spelling.
fn flag_value<'a>(args: &'a [String], name: &str) -> Vec<&'a str> {
    let mut values = Vec::new();
    for (i, arg) in args.iter().enumerate() {
        if let Some(value) = arg.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')) {
            values.push(value);
        } else if arg == name
            && let Some(next) = args.get(i + 1)
        {
            values.push(next.as_str());
        }
    }
    values
}

/// What is wrong with one role's command line: flags its `--help` lacks,
/// and flags it cannot start without (a multi-machine layout's).
fn problems(role: &str, args: &[String], help: &BTreeMap<&str, BTreeSet<String>>) -> Vec<String> {
    let Some(known) = help.get(role) else {
        return vec![format!("{role:?} is not a role (serve, runner, edge)")];
    };
    let mut problems: Vec<String> = flags_of(args)
        .into_iter()
        .filter(|f| !known.contains(f))
        .map(|f| format!("{f} is not an option of `isocloud {role}`"))
        .collect();
    let has = |name: &str| !flag_value(args, name).is_empty();
    let mut required: Vec<&[&str]> = vec![&["--listen"], &["--admin-listen"]];
    match role {
        "runner" => required.extend([&["--rpc-root"][..], &["--subhost-secret", "--subhost-secret-file"]]),
        "edge" => required.extend([
            &["--rpc-root"][..],
            &["--subhost-secret", "--subhost-secret-file"],
            &["--runner", "--runners-file"],
        ]),
        _ => {
            if has("--origin-listen") {
                required.push(&["--origin-secret", "--origin-secret-file"]);
            }
        }
    }
    for any_of in required {
        if !any_of.iter().any(|name| has(name)) {
            problems.push(format!("`isocloud {role}` needs {}", any_of.join(" or ")));
        }
    }
    problems
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{addr:?} has no port"))
}

/// The time a stop takes at most before the exit: `--drain-delay-s` (still
/// serving) plus `--drain-timeout-s`.
fn drain_timeout_s(args: &[String]) -> u64 {
    let delay = flag_value(args, "--drain-delay-s").last().map_or(0, |v| v.parse().expect("a number"));
    delay
        + flag_value(args, "--drain-timeout-s").last().map_or(DEFAULT_DRAIN_TIMEOUT_S, |v| v.parse().expect("a number"))
}

fn files_under(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == ext))
        .collect();
    files.sort();
    files
}

fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("read manifest");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(value, |v, key| v.get(*key))?.as_str()
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value.and_then(Value::as_sequence).map_or_else(Vec::new, |seq| {
        seq.iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => panic!("an argument that is not a string: {other:?}"),
            })
            .collect()
    })
}

#[test]
fn the_flag_check_refuses_what_a_role_lacks() {
    // The check below is only as good as this: a real option of another
    // role, a misspelling and a missing required flag are all caught.
    let help = all_help_flags();
    let args = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let edge_ok = args(&[
        "--listen=0.0.0.0:8080",
        "--admin-listen=0.0.0.0:9090",
        "--rpc-root=http://cp:8082/",
        "--subhost-secret-file=cp=/s",
        "--runner",
        "http://r:8080",
    ]);
    assert_eq!(problems("edge", &edge_ok, &help), Vec::<String>::new());
    let mut with_deno = edge_ok.clone();
    with_deno.push("--deno=/usr/bin/deno".into());
    assert_eq!(problems("edge", &with_deno, &help), ["--deno is not an option of `isocloud edge`"]);
    assert!(problems("runner", &with_deno, &help).iter().any(|p| p.contains("--runner is not an option")));
    let mut misspelt = edge_ok.clone();
    misspelt.push("--drain-timeout=5".into());
    assert_eq!(problems("edge", &misspelt, &help).len(), 1);
    let without_runner: Vec<String> = edge_ok[..4].to_vec();
    assert_eq!(problems("edge", &without_runner, &help), ["`isocloud edge` needs --runner or --runners-file"]);
    assert_eq!(problems("runner", &args(&["--listen=:1", "--admin-listen=:2"]), &help).len(), 2);
}

#[test]
fn kubernetes_manifests_parse_and_start_each_role_with_flags_it_has() {
    let help = all_help_flags();
    let dir = repo_root().join("deploy/kubernetes");
    let files = files_under(&dir, "yaml");
    assert!(!files.is_empty(), "no manifests under {}", dir.display());
    let mut roles_seen = BTreeSet::new();
    // (file, name, selector) of each Service; (labels, port names and numbers) of each workload's pods.
    let mut services = Vec::new();
    let mut pods: Vec<(BTreeMap<String, String>, BTreeSet<String>)> = Vec::new();
    for file in &files {
        let name = file.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let docs = yaml_documents(file);
        assert!(!docs.is_empty(), "{name}: no documents");
        for doc in &docs {
            let kind = str_at(doc, &["kind"]).unwrap_or_else(|| panic!("{name}: a document without kind"));
            let api = str_at(doc, &["apiVersion"]).unwrap_or_else(|| panic!("{name}: {kind} without apiVersion"));
            let meta =
                str_at(doc, &["metadata", "name"]).unwrap_or_else(|| panic!("{name}: {kind} without metadata.name"));
            assert!(!api.is_empty() && !meta.is_empty(), "{name}: {kind} with an empty apiVersion or name");
            let what = format!("{name}: {kind} {meta}");
            match kind {
                "Deployment" | "StatefulSet" => {
                    assert_eq!(api, "apps/v1", "{what}");
                    let pod = doc.get("spec").and_then(|s| s.get("template")).expect("spec.template");
                    let labels: BTreeMap<String, String> = pod
                        .get("metadata")
                        .and_then(|m| m.get("labels"))
                        .map(|l| serde_yaml_ng::from_value(l.clone()).expect("labels"))
                        .unwrap_or_default();
                    let selector: BTreeMap<String, String> = doc
                        .get("spec")
                        .and_then(|s| s.get("selector"))
                        .and_then(|s| s.get("matchLabels"))
                        .map(|l| serde_yaml_ng::from_value(l.clone()).expect("matchLabels"))
                        .unwrap_or_else(|| panic!("{what}: no spec.selector.matchLabels"));
                    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)), "{what}: selector misses its pods");
                    let grace = pod
                        .get("spec")
                        .and_then(|s| s.get("terminationGracePeriodSeconds"))
                        .and_then(Value::as_u64)
                        .unwrap_or(30);
                    let containers = pod
                        .get("spec")
                        .and_then(|s| s.get("containers"))
                        .and_then(Value::as_sequence)
                        .unwrap_or_else(|| panic!("{what}: no containers"));
                    let mut ports = BTreeSet::new();
                    for container in containers {
                        let args = strings(container.get("args"));
                        let role = args.first().cloned().unwrap_or_default();
                        let problems = problems(&role, &args[1.min(args.len())..], &help);
                        assert!(problems.is_empty(), "{what}: {problems:#?}");
                        roles_seen.insert(role.clone());
                        let args = &args[1..];
                        let admin_port = port_of(flag_value(args, "--admin-listen")[0]);
                        let public_port = port_of(flag_value(args, "--listen")[0]);
                        let mut named = BTreeMap::new();
                        for port in container.get("ports").and_then(Value::as_sequence).into_iter().flatten() {
                            let number = port.get("containerPort").and_then(Value::as_u64).expect("containerPort");
                            let port_name =
                                str_at(port, &["name"]).unwrap_or_else(|| panic!("{what}: an unnamed port"));
                            named.insert(port_name.to_owned(), number);
                            ports.insert(port_name.to_owned());
                            ports.insert(number.to_string());
                        }
                        assert_eq!(
                            named.get("admin"),
                            Some(&u64::from(admin_port)),
                            "{what}: port `admin` is --admin-listen's"
                        );
                        assert_eq!(
                            named.get("http"),
                            Some(&u64::from(public_port)),
                            "{what}: port `http` is --listen's"
                        );
                        for probe in ["readinessProbe", "livenessProbe"] {
                            let get = container
                                .get(probe)
                                .and_then(|p| p.get("httpGet"))
                                .unwrap_or_else(|| panic!("{what}: no {probe}.httpGet"));
                            assert_eq!(str_at(get, &["path"]), Some("/healthz"), "{what}: {probe} path");
                            let port = match get.get("port") {
                                Some(Value::String(name)) => named.get(name).copied(),
                                Some(Value::Number(n)) => n.as_u64(),
                                _ => None,
                            };
                            assert_eq!(
                                port,
                                Some(u64::from(admin_port)),
                                "{what}: {probe} is not on the admin listener"
                            );
                        }
                        let pre_stop_s = container
                            .get("lifecycle")
                            .and_then(|l| l.get("preStop"))
                            .and_then(|p| p.get("sleep"))
                            .and_then(|s| s.get("seconds"))
                            .and_then(Value::as_u64)
                            .unwrap_or(0);
                        assert!(
                            grace > pre_stop_s + drain_timeout_s(args),
                            "{what}: terminationGracePeriodSeconds {grace} leaves no room for the preStop ({pre_stop_s} s) and the drain"
                        );
                    }
                    pods.push((labels, ports));
                }
                "Service" => {
                    assert_eq!(api, "v1", "{what}");
                    let spec = doc.get("spec").expect("spec");
                    if str_at(spec, &["type"]) == Some("ExternalName") {
                        assert!(str_at(spec, &["externalName"]).is_some(), "{what}: no externalName");
                        continue;
                    }
                    let selector: BTreeMap<String, String> =
                        serde_yaml_ng::from_value(spec.get("selector").cloned().expect("selector")).expect("selector");
                    let targets: Vec<String> = spec
                        .get("ports")
                        .and_then(Value::as_sequence)
                        .expect("ports")
                        .iter()
                        .map(|p| match p.get("targetPort").or_else(|| p.get("port")) {
                            Some(Value::String(s)) => s.clone(),
                            Some(Value::Number(n)) => n.to_string(),
                            other => panic!("{what}: a port without targetPort: {other:?}"),
                        })
                        .collect();
                    services.push((what, selector, targets));
                }
                "Namespace" | "Secret" | "ConfigMap" | "PodDisruptionBudget" | "NetworkPolicy" => {}
                other => panic!("{name}: {other} is a kind this test does not check yet: add it here"),
            }
        }
    }
    for (what, selector, targets) in &services {
        let pod = pods.iter().find(|(labels, _)| selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
        let (_, ports) = pod.unwrap_or_else(|| panic!("{what}: its selector matches no workload's pods"));
        for target in targets {
            assert!(ports.contains(target), "{what}: targetPort {target} is no port of its pods ({ports:?})");
        }
    }
    assert_eq!(roles_seen, ROLES.iter().map(|r| (*r).to_owned()).collect(), "a workload per role");
}

/// `[Section]` → its `Key=Value` lines (continuations joined, comments gone).
fn parse_unit(text: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';')) {
            continue;
        }
        if let Some(body) = line.strip_suffix('\\') {
            pending.push_str(body);
            pending.push(' ');
            continue;
        }
        let line = std::mem::take(&mut pending) + line;
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.to_owned());
            sections.entry(name.to_owned()).or_default();
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not Key=Value: {line:?}"));
        let section = current.clone().unwrap_or_else(|| panic!("{line:?} before any [Section]"));
        sections.entry(section).or_default().push((key.trim().to_owned(), value.trim().to_owned()));
    }
    sections
}

fn seconds(value: &str) -> u64 {
    let value = value.trim();
    value.strip_suffix('s').unwrap_or(value).parse().unwrap_or_else(|_| panic!("{value:?}: write plain seconds"))
}

#[test]
fn systemd_units_parse_and_start_each_role_with_flags_it_has() {
    let help = all_help_flags();
    let dir = repo_root().join("deploy/systemd");
    let files = files_under(&dir, "service");
    let names: Vec<String> =
        files.iter().map(|f| f.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["isocloud-edge.service", "isocloud-runner.service", "isocloud-serve.service"]);
    for (file, name) in files.iter().zip(&names) {
        let unit = parse_unit(&std::fs::read_to_string(file).expect("read unit"));
        for section in ["Unit", "Service", "Install"] {
            assert!(unit.contains_key(section), "{name}: no [{section}]");
        }
        let service = &unit["Service"];
        let get =
            |key: &str| -> Vec<&str> { service.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect() };
        let exec = get("ExecStart");
        assert_eq!(exec.len(), 1, "{name}: one ExecStart");
        let words: Vec<String> = exec[0].split_whitespace().map(str::to_owned).collect();
        assert!(words[0].ends_with("/isocloud"), "{name}: ExecStart runs {}", words[0]);
        let role = name.trim_start_matches("isocloud-").trim_end_matches(".service");
        assert_eq!(words.get(1).map(String::as_str), Some(role), "{name}: ExecStart's role");
        let args = &words[2..];
        let problems = problems(role, args, &help);
        assert!(problems.is_empty(), "{name}: {problems:#?}");
        assert_eq!(get("Restart"), ["on-failure"], "{name}");
        assert_eq!(get("KillSignal"), ["SIGTERM"], "{name}: the drain starts on SIGTERM");
        assert!(!get("EnvironmentFile").is_empty(), "{name}: no EnvironmentFile");
        let stop = get("TimeoutStopSec");
        assert_eq!(stop.len(), 1, "{name}: one TimeoutStopSec");
        assert!(seconds(stop[0]) > drain_timeout_s(args), "{name}: TimeoutStopSec must outlast the drain");
        assert!(unit["Install"].iter().any(|(k, _)| k == "WantedBy"), "{name}: no WantedBy");
    }
}
