//! Builds against registries the test serves itself on loopback
//! ([`TestRegistry`]): `isocloud serve --npm-registry … --jsr-registry …`,
//! the CLI, the build's deno, and the runner starting the isolate offline.
//! A `jsr:` package (two modules, exports) imported directly and through a
//! `deno.json` import map; npm packages with a dependency, CommonJS, ESM, a
//! scoped name and `process.env`; a committed `deno.lock` that no longer
//! matches (the registry changed a tarball, or the imports changed) fails
//! the build; and two projects with the same packages store them once.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::builds::{api_get, client, count_files, deployment_host, deployment_id};
use crate::support::registry::{JsrPackage, NpmPackage, TestRegistry};
use crate::support::{ControlPlaneServe, metric_value};
use serde_json::{Value, json};

/// `isocloud serve` whose builds use `registry` for npm and JSR.
fn serve_with(registry: &TestRegistry) -> ControlPlaneServe {
    ControlPlaneServe::start(&["--npm-registry", &registry.npm_url(), "--jsr-registry", &registry.jsr_url()])
}

/// `isocloud deploy --project P DIR`, which must succeed; the deployment's host.
fn deploy_ok(serve: &ControlPlaneServe, config: &Path, project: &str, dir: &Path) -> String {
    let (ok, stdout, stderr) = client(serve, config, &["deploy", "--project", project, dir.to_str().unwrap()]);
    assert!(ok, "the deploy failed:\n{stdout}\n{stderr}\nrunner:\n{}", serve.runner.stderr());
    deployment_host(&stdout)
}

/// GET `path` on `host` through the runner: (status, body).
async fn get(serve: &ControlPlaneServe, host: &str, path: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .get(format!("{}{path}", serve.public_url()))
        .header("host", host)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("request to the runner");
    (response.status().as_u16(), response.text().await.unwrap())
}

fn write(dir: &Path, files: &[(&str, &str)]) {
    for (path, text) in files {
        let full = dir.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, text).unwrap();
    }
}

/// `deno install` in `dir` as a developer runs it before committing:
/// against `registry`, with a cache of its own; writes `deno.lock`.
fn install_locally(registry: &TestRegistry, dir: &Path) {
    let home = tempfile::tempdir().unwrap();
    let (status, stdout, stderr) = crate::support::run_with_timeout(
        Command::new(crate::support::deno_path())
            .args(["install", "--entrypoint", "main.ts"])
            .current_dir(dir)
            .env_clear()
            .env("HOME", home.path())
            .env("DENO_DIR", home.path().join("deno"))
            .env("NO_COLOR", "1")
            .env("DENO_NO_UPDATE_CHECK", "1")
            .env("NPM_CONFIG_REGISTRY", registry.npm_url())
            .env("JSR_URL", registry.jsr_url()),
        Duration::from_secs(60),
    );
    assert!(status.is_some_and(|s| s.success()), "deno install:\n{stdout}\n{stderr}");
    // Only the lockfile is committed: the build makes node_modules again.
    let _ = std::fs::remove_dir_all(dir.join("node_modules"));
    assert!(dir.join("deno.lock").is_file(), "deno install wrote no deno.lock");
}

/// `@isocloud/greet`: `mod.ts` importing `./name.ts`, exports `.` and `./name`.
fn greet_package(version: &str) -> JsrPackage {
    JsrPackage::new("@isocloud/greet", version)
        .export(".", "./mod.ts")
        .export("./name", "./name.ts")
        .file(
            "mod.ts",
            "import { name } from \"./name.ts\";\nexport function greet(who: string): string {\n  return `hello ${who} from ${name}`;\n}\n",
        )
        .file("name.ts", &format!("export const name: string = \"greet@{version}\";\n"))
}

/// npm packages: `a` (CommonJS) requires `b` (CommonJS); `esm-pkg` is ESM;
/// `@isocloud/scoped` is scoped ESM; `envpkg` reads `process.env.GREETING`.
pub(crate) fn publish_npm_set(registry: &TestRegistry) {
    registry.publish_npm(
        NpmPackage::new("b", "1.2.0")
            .field("main", json!("index.js"))
            .file("index.js", "module.exports = { shout: (s) => s.toUpperCase() + \"!\" };\n"),
    );
    registry.publish_npm(
        NpmPackage::new("a", "1.0.0").dependency("b", "^1.0.0").field("main", json!("lib/a.js")).file(
            "lib/a.js",
            "const { shout } = require(\"b\");\nmodule.exports = function greet(n) { return shout(\"hi \" + n); };\n",
        ),
    );
    registry.publish_npm(
        NpmPackage::new("esm-pkg", "2.0.0")
            .field("type", json!("module"))
            .field("exports", json!({ ".": "./index.js" }))
            .file("index.js", "export const kind = \"esm\";\nexport default function tag(x) { return `esm:${x}`; }\n"),
    );
    registry.publish_npm(
        NpmPackage::new("@isocloud/scoped", "0.1.0")
            .field("type", json!("module"))
            .field("main", json!("index.js"))
            .file("index.js", "export const scoped = \"scoped ok\";\n"),
    );
    registry.publish_npm(
        NpmPackage::new("envpkg", "1.0.0")
            .field("main", json!("index.js"))
            .file("index.js", "module.exports = () => process.env.GREETING ?? \"unset\";\n"),
    );
}

const NPM_MAIN: &str = r#"import greet from "npm:a@1";
import tag, { kind } from "npm:esm-pkg@2";
import { scoped } from "npm:@isocloud/scoped@0.1";
import env from "npm:envpkg@1";
Deno.serve(() => Response.json({ a: greet("bob"), esm: tag(kind), scoped, env: env() }));
"#;

#[tokio::test]
async fn a_jsr_package_from_the_loopback_jsr_builds_and_serves_offline() {
    let registry = TestRegistry::start();
    registry.publish_jsr(greet_package("1.0.0"));
    registry.publish_jsr(greet_package("1.1.0"));
    let serve = serve_with(&registry);
    let config = tempfile::tempdir().unwrap();
    assert!(client(&serve, config.path(), &["projects", "create", "jsr"]).0);

    // A jsr: specifier: `^1` resolves to the latest 1.x, both modules and
    // the `./name` export come from the registry at build time.
    let app = tempfile::tempdir().unwrap();
    write(
        app.path(),
        &[(
            "main.ts",
            "import { greet } from \"jsr:@isocloud/greet@^1\";\nimport { name } from \"jsr:@isocloud/greet@^1/name\";\nDeno.serve(() => new Response(`${greet(\"you\")} (${name})`));\n",
        )],
    );
    let host = deploy_ok(&serve, config.path(), "jsr", app.path());
    let fetched = registry.requests();
    for path in ["meta.json", "1.1.0_meta.json", "1.1.0/mod.ts", "1.1.0/name.ts"] {
        let line = format!("GET /jsr/@isocloud/greet/{path} 200");
        assert!(fetched.contains(&line), "the build fetched {line}: {fetched:?}");
    }
    assert_eq!(get(&serve, &host, "/").await, (200, "hello you from greet@1.1.0 (greet@1.1.0)".to_owned()));
    // The isolate starts from the deployment's files: no request reached
    // the registry after the build.
    assert_eq!(registry.requests(), fetched, "the isolate fetched nothing");

    // The same package through a deno.json import map (a bare specifier).
    let mapped = tempfile::tempdir().unwrap();
    write(
        mapped.path(),
        &[
            ("deno.json", "{ \"imports\": { \"@isocloud/greet\": \"jsr:@isocloud/greet@^1\" } }\n"),
            (
                "main.ts",
                "import { greet } from \"@isocloud/greet\";\nDeno.serve(() => new Response(greet(\"map\")));\n",
            ),
        ],
    );
    let host = deploy_ok(&serve, config.path(), "jsr", mapped.path());
    assert_eq!(get(&serve, &host, "/").await, (200, "hello map from greet@1.1.0".to_owned()));
}

#[tokio::test]
async fn npm_packages_from_the_loopback_registry_serve_through_the_runner() {
    let registry = TestRegistry::start();
    publish_npm_set(&registry);
    let serve = serve_with(&registry);
    let config = tempfile::tempdir().unwrap();
    assert!(client(&serve, config.path(), &["projects", "create", "npm"]).0);
    let (ok, _, stderr) = client(&serve, config.path(), &["env", "set", "--project", "npm", "GREETING=hej"]);
    assert!(ok, "{stderr}");

    let app = tempfile::tempdir().unwrap();
    write(app.path(), &[("main.ts", NPM_MAIN)]);
    let host = deploy_ok(&serve, config.path(), "npm", app.path());
    let fetched = registry.requests();
    assert!(fetched.contains(&"GET /npm/b/-/b-1.2.0.tgz 200".to_owned()), "a's dependency came along: {fetched:?}");
    let (status, body) = get(&serve, &host, "/").await;
    assert_eq!(status, 200, "{body}\nrunner:\n{}", serve.runner.stderr());
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body, json!({ "a": "HI BOB!", "esm": "esm:esm", "scoped": "scoped ok", "env": "hej" }));
    assert_eq!(registry.requests(), fetched, "the isolate fetched nothing");
}

#[tokio::test]
async fn a_committed_deno_lock_that_does_not_match_fails_the_build() {
    let registry = TestRegistry::start();
    let pinned = |text: &str| {
        NpmPackage::new("pinned", "1.0.0")
            .field("main", json!("index.js"))
            .file("index.js", &format!("module.exports = \"{text}\";\n"))
    };
    registry.publish_npm(pinned("pinned as locked"));
    registry.publish_npm(NpmPackage::new("extra", "1.0.0").file("index.js", "module.exports = 1;\n"));
    registry.publish_jsr(greet_package("1.0.0"));
    let serve = serve_with(&registry);
    let config = tempfile::tempdir().unwrap();
    assert!(client(&serve, config.path(), &["projects", "create", "locked"]).0);

    // The probe: an app with a deno.lock that matches builds (frozen) and serves.
    let app = tempfile::tempdir().unwrap();
    write(
        app.path(),
        &[
            (
                "deno.json",
                "{ \"imports\": { \"pinned\": \"npm:pinned@1\", \"@isocloud/greet\": \"jsr:@isocloud/greet@1\" } }\n",
            ),
            (
                "main.ts",
                "import pinned from \"pinned\";\nimport { greet } from \"@isocloud/greet\";\nDeno.serve(() => new Response(`${pinned}; ${greet(\"lock\")}`));\n",
            ),
        ],
    );
    install_locally(&registry, app.path());
    let lock = std::fs::read_to_string(app.path().join("deno.lock")).unwrap();
    assert!(lock.contains("pinned@1.0.0") && lock.contains("@isocloud/greet@1.0.0"), "{lock}");
    let host = deploy_ok(&serve, config.path(), "locked", app.path());
    assert_eq!(get(&serve, &host, "/").await, (200, "pinned as locked; hello lock from greet@1.0.0".to_owned()));

    let failed_deploy = |dir: &Path| {
        let (ok, stdout, stderr) =
            client(&serve, config.path(), &["deploy", "--project", "locked", dir.to_str().unwrap()]);
        assert!(!ok, "a lockfile mismatch must fail the deploy:\n{stdout}\n{stderr}");
        assert!(!stderr.contains("run again with") && !stderr.contains("--frozen"), "deno's flags leaked: {stderr}");
        let id = stderr.split("deployment ").nth(1).and_then(|rest| rest.split(' ').next()).unwrap().to_owned();
        (id, stderr)
    };

    // 1. The imports changed (a package the lock does not list): frozen.
    let changed = tempfile::tempdir().unwrap();
    for name in ["deno.json", "deno.lock"] {
        std::fs::copy(app.path().join(name), changed.path().join(name)).unwrap();
    }
    write(
        changed.path(),
        &[(
            "main.ts",
            "import pinned from \"pinned\";\nimport extra from \"npm:extra@1\";\nDeno.serve(() => new Response(`${pinned} ${extra}`));\n",
        )],
    );
    let (id, stderr) = failed_deploy(changed.path());
    assert!(stderr.contains("deno.lock"), "the lockfile is named:\n{stderr}");
    let build = api_get(&serve, &format!("/deployments/{id}/build")).await;
    assert_eq!(build["status"], "failed", "{build}");
    assert!(build["log"].as_str().unwrap().contains("npm:extra@1"), "the build log shows the change: {build}");

    // 2. The registry serves other bytes for a locked version than when the
    // lock was made. (A package the control plane has not fetched before:
    // one it has is built from its cache, which still matches the lock.)
    let tampered = |text: &str| {
        NpmPackage::new("tampered", "1.0.0")
            .field("main", json!("index.js"))
            .file("index.js", &format!("module.exports = \"{text}\";\n"))
    };
    registry.publish_npm(tampered("as locked"));
    let swapped = tempfile::tempdir().unwrap();
    write(
        swapped.path(),
        &[
            ("deno.json", "{ \"imports\": { \"tampered\": \"npm:tampered@1\" } }\n"),
            ("main.ts", "import t from \"tampered\";\nDeno.serve(() => new Response(t));\n"),
        ],
    );
    install_locally(&registry, swapped.path());
    registry.publish_npm(tampered("swapped"));
    let (id, stderr) = failed_deploy(swapped.path());
    let build = api_get(&serve, &format!("/deployments/{id}/build")).await;
    assert_eq!(build["status"], "failed", "{build}");
    assert!(
        stderr.contains("deno.lock") && stderr.contains("tampered@1.0.0"),
        "the mismatch is named:\n{stderr}\n{build}"
    );

    let list = api_get(&serve, "/projects/locked/deployments").await;
    let statuses: Vec<&str> = list.as_array().unwrap().iter().map(|d| d["status"].as_str().unwrap()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == "failed").count(), 2, "{list}");
    assert_eq!(statuses.iter().filter(|s| **s == "ready").count(), 1, "{list}");
    assert_eq!(get(&serve, &host, "/").await.1, "pinned as locked; hello lock from greet@1.0.0", "the good one stays");
}

#[tokio::test]
async fn two_projects_with_the_same_packages_store_them_once() {
    let registry = TestRegistry::start();
    publish_npm_set(&registry);
    registry.publish_jsr(greet_package("1.0.0"));
    let serve = serve_with(&registry);
    let config = tempfile::tempdir().unwrap();
    let main = |who: &str| {
        format!(
            "import greet from \"npm:a@1\";\nimport tag from \"npm:esm-pkg@2\";\nimport {{ greet as hello }} from \"jsr:@isocloud/greet@1\";\nDeno.serve(() => new Response(`{who}: ${{greet(\"x\")}} ${{tag(1)}} ${{hello(\"y\")}}`));\n"
        )
    };
    let blobs = serve.data_dir.path().join("blobs");

    let mut hosts = Vec::new();
    let mut counts = Vec::new();
    for project in ["one", "two"] {
        assert!(client(&serve, config.path(), &["projects", "create", project]).0);
        let app = tempfile::tempdir().unwrap();
        write(app.path(), &[("main.ts", &main(project))]);
        hosts.push(deploy_ok(&serve, config.path(), project, app.path()));
        counts.push(count_files(&blobs));
    }
    for (host, project) in hosts.iter().zip(["one", "two"]) {
        let expected = format!("{project}: HI X! esm:1 hello y from greet@1.0.0");
        assert_eq!(get(&serve, host, "/").await, (200, expected));
    }
    // The second project's own main.ts is the one new blob; every package
    // file (npm's and JSR's) was already stored by the first.
    let deployment = api_get(&serve, &format!("/deployments/{}", deployment_id(&hosts[1]))).await;
    assert!(deployment["files"].as_i64().unwrap() > 5, "the packages are files of the deployment: {deployment}");
    assert_eq!(counts[1], counts[0] + 1, "only main.ts is new ({counts:?})");
}

#[tokio::test]
async fn a_prestarted_isolate_loads_its_sets_packages_but_evaluates_them_for_the_tenant_in_its_order() {
    let registry = TestRegistry::start();
    // Reads an env and awaits at its top level: evaluated before the
    // assignment, it would see no GREETING (a pre-started deno has none of
    // the tenant's envs) and come before the tenant's first module.
    registry.publish_npm(
        NpmPackage::new("evalpkg", "1.0.0")
            .field("type", json!("module"))
            .field("exports", json!({ ".": { "import": "./index.js", "require": "./index.cjs" } }))
            .file(
                "index.js",
                "import process from \"node:process\";\n\
                 globalThis.order = [...(globalThis.order ?? []), \"evalpkg\"];\n\
                 await Promise.resolve();\n\
                 export const greeting = process.env.GREETING ?? \"unset\";\n\
                 export const order = globalThis.order;\n",
            )
            .file("index.cjs", "module.exports = { greeting: \"cjs\" };\n"),
    );
    let serve = serve_with(&registry);
    let config = tempfile::tempdir().unwrap();
    let main = "import \"./first.ts\";\nimport { greeting, order } from \"npm:evalpkg@1\";\n\
                Deno.serve(() => Response.json({ greeting, order }));\n";
    let first = "globalThis.order = [\"tenant's first module\"];\n";
    let mut hosts = Vec::new();
    for project in ["one", "two"] {
        assert!(client(&serve, config.path(), &["projects", "create", project]).0);
        let greeting = format!("GREETING=hello {project}");
        assert!(client(&serve, config.path(), &["env", "set", "--project", project, &greeting]).0);
        let app = tempfile::tempdir().unwrap();
        write(app.path(), &[("main.ts", main), ("first.ts", first)]);
        hosts.push(deploy_ok(&serve, config.path(), project, app.path()));
    }
    let expected = |project: &str| json!({ "greeting": format!("hello {project}"), "order": ["tenant's first module", "evalpkg"] });

    // The first boot of the set lays it out; from then on the pool keeps
    // isolates started with it, which load evalpkg while they wait.
    let (status, body) = get(&serve, &hosts[0], "/").await;
    assert_eq!(status, 200, "{body}\nrunner:\n{}", serve.runner.stderr());
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), expected("one"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut metrics = serve.runner.metrics().await;
    while metric_value(&metrics, "isocloud_prestarted_preloaded_packages_total") == 0
        || metric_value(&metrics, "isocloud_prestarted_waiting") == 0
    {
        assert!(std::time::Instant::now() < deadline, "no pre-started isolate loaded the set:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        metrics = serve.runner.metrics().await;
    }
    let hits = metric_value(&metrics, r#"isocloud_prestarted_boots_total{result="hit"}"#);

    // The second project boots on one of them, and evalpkg runs for it:
    // with its envs, after its first module.
    let (status, body) = get(&serve, &hosts[1], "/").await;
    assert_eq!(status, 200, "{body}\nrunner:\n{}", serve.runner.stderr());
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), expected("two"));
    let metrics = serve.runner.metrics().await;
    assert_eq!(metric_value(&metrics, r#"isocloud_prestarted_boots_total{result="hit"}"#), hits + 1, "{metrics}");
}
