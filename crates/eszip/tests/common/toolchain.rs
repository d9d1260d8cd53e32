//! Real archives from the Deno toolchain: `node tools/eszip/build.mjs`, which
//! drives the pinned `@deno/eszip` package. Without node and npm these tests
//! fail (they never skip): the archives the runner sees in production come
//! from this writer, so testing only against our own writer would prove
//! little.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::repo_root;

fn tools_dir() -> PathBuf {
    repo_root().join("tools/eszip")
}

/// Makes sure `tools/eszip/node_modules` is installed (`npm ci` if not) and
/// returns the path of `build.mjs`. Runs once per test binary; a file lock
/// keeps concurrent test binaries from running `npm ci` together.
pub fn build_script() -> &'static Path {
    static SCRIPT: OnceLock<PathBuf> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        let tools = tools_dir();
        require("node", &["--version"]);
        let installed = || tools.join("node_modules/@deno/eszip/package.json").is_file();
        if !installed() {
            require("npm", &["--version"]);
            let lock_path = std::env::temp_dir().join("isocloud-eszip-npm-ci.lock");
            let lock = File::create(&lock_path).unwrap_or_else(|e| panic!("creating {}: {e}", lock_path.display()));
            lock.lock().expect("locking the npm ci lock file");
            if !installed() {
                let out = Command::new("npm")
                    .args(["ci", "--no-audit", "--no-fund", "--prefix"])
                    .arg(&tools)
                    .output()
                    .unwrap_or_else(|e| panic!("running npm ci: {e}"));
                assert!(
                    out.status.success(),
                    "`npm ci --prefix {}` failed ({}); the ESZIP toolchain tests need \
                     the npm registry once.\nstdout:\n{}\nstderr:\n{}",
                    tools.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                );
            }
            drop(lock);
        }
        tools.join("build.mjs")
    })
}

fn require(program: &str, args: &[&str]) {
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`{program} {}` failed ({}): {}. The ESZIP toolchain tests need node (v20+) \
             and npm on PATH; they do not skip.",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "cannot run `{program}`: {e}. The ESZIP toolchain tests need node (v20+) and \
             npm on PATH; they do not skip."
        ),
    }
}

/// A small app on disk: `root/` holds `file:///src/...`, `remote/<host>/...`
/// holds https modules. Lives in its own temp dir, removed on drop.
pub struct App {
    dir: tempfile::TempDir,
}

impl App {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("isocloud-eszip-app-").tempdir().expect("temp dir");
        fs::create_dir_all(dir.path().join("root")).unwrap();
        fs::create_dir_all(dir.path().join("remote")).unwrap();
        App { dir }
    }

    /// Writes `root/<path>`, i.e. `file:///src/<path>`.
    pub fn file(self, path: &str, content: impl AsRef<[u8]>) -> Self {
        write(&self.dir.path().join("root").join(path), content.as_ref());
        self
    }

    /// Writes `remote/<host>/<path>`, served as `https://<host>/<path>`.
    pub fn remote(self, host_and_path: &str, content: impl AsRef<[u8]>) -> Self {
        write(&self.dir.path().join("remote").join(host_and_path), content.as_ref());
        self
    }

    /// Makes `https://<host_and_path>` redirect to `target`.
    pub fn remote_redirect(self, host_and_path: &str, target: &str) -> Self {
        let file = format!("{host_and_path}.redirect");
        self.remote(&file, format!("{target}\n"))
    }

    /// Builds an archive from `entries` (relative to `file:///src/`, or
    /// absolute) and returns its bytes.
    pub fn build(&self, entries: &[&str]) -> Vec<u8> {
        self.try_build(entries).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`App::build`], but returns the tool's stderr on failure.
    pub fn try_build(&self, entries: &[&str]) -> Result<Vec<u8>, String> {
        build(&self.dir.path().join("root"), Some(&self.dir.path().join("remote")), entries)
    }
}

/// Runs `node tools/eszip/build.mjs --root ROOT [--remote REMOTE] ENTRY...`
/// into a temp file and returns the archive, or the tool's stderr.
pub fn build(root: &Path, remote: Option<&Path>, entries: &[&str]) -> Result<Vec<u8>, String> {
    let out_dir = tempfile::Builder::new().prefix("isocloud-eszip-out-").tempdir().expect("temp dir");
    let out_file = out_dir.path().join("out.eszip");
    let mut cmd = Command::new("node");
    cmd.arg(build_script()).arg("--root").arg(root);
    if let Some(remote) = remote {
        cmd.arg("--remote").arg(remote);
    }
    let out = cmd.arg("--out").arg(&out_file).args(entries).output().unwrap_or_else(|e| panic!("running node: {e}"));
    if !out.status.success() {
        return Err(format!(
            "build.mjs {entries:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(fs::read(&out_file).expect("reading the built archive"))
}

fn write(path: &Path, content: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A Wasm module exporting `add(i32, i32) -> i32`.
pub const ADD_WASM: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version 1
    0x01, 0x07, 0x01, 0x60, 0x02, 0x7f, 0x7f, 0x01, 0x7f, // type: (i32, i32) -> i32
    0x03, 0x02, 0x01, 0x00, // function 0 has type 0
    0x07, 0x07, 0x01, 0x03, b'a', b'd', b'd', 0x00, 0x00, // export "add" = func 0
    0x0a, 0x09, 0x01, 0x07, 0x00, 0x20, 0x00, 0x20, 0x01, 0x6a, 0x0b, // local.get 0 1; i32.add
];
