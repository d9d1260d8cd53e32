//! The build step of a deployment made from files: between upload and
//! `ready`, the pinned deno resolves the module graph once (`deno install
//! --entrypoint`), honouring `deno.json`/`deno.jsonc`, `package.json`,
//! import maps and `deno.lock` (frozen when committed), and downloads its
//! `npm:`, `jsr:` and `https:` dependencies from the configured registries.
//! What it wrote — `node_modules/` (npm's layout, symlinks included) and
//! `vendor/` (remote and JSR modules) — becomes more files of the
//! deployment, stored as content-addressed blobs like any other, so a
//! hundred deployments of one package store it once, and the isolate later
//! starts offline from them. A syntax error, an unresolvable import, a
//! missing package, a lockfile mismatch or a registry that is down fails
//! the deployment with deno's message in isocloud's words, and its log.
//!
//! The graph is tenant input: the step runs under
//! [`isocloud_sandbox::BuildConfinement`] (an unprivileged uid, rlimits, no
//! new privileges, seccomp, its own PID namespace, a wall-clock bound), and
//! deno refuses a remote import from a host outside its allow-list
//! (loopback and private addresses among them) unless the operator adds it.

use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;

use isocloud_origin::link_stays_inside;

use crate::blobs::BlobStore;
use crate::store::deployments::FileRow;

/// Bounds on what one build may add to a deployment.
const MAX_OUTPUT_FILES: usize = 60_000;
const MAX_OUTPUT_BYTES: u64 = 1024 * 1024 * 1024;
/// The part of deno's output a deployment keeps as its build log.
const MAX_LOG_BYTES: usize = 64 * 1024;

/// How builds run; `None` in [`crate::ControlPlaneOptions::build`] keeps
/// deployments as uploaded (no deno on the machine: the API tests).
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub deno: PathBuf,
    /// `NPM_CONFIG_REGISTRY`; `None`: the public npm registry.
    pub npm_registry: Option<url::Url>,
    /// `JSR_URL`; `None`: the public JSR.
    pub jsr_registry: Option<url::Url>,
    /// Hosts a remote `https:` import may come from beyond deno's default
    /// allow-list (`--allow-import`): never loopback or private unless named.
    pub allow_import: Vec<String>,
    pub timeout: Duration,
    /// At most this many builds at once on this node.
    pub max_concurrent: usize,
    pub confinement: isocloud_sandbox::BuildConfinement,
}

/// A finished build: the files it added, and what deno printed.
#[derive(Debug)]
pub struct BuildOutput {
    pub files: Vec<FileRow>,
    pub log: String,
}

/// Why a build failed (one paragraph, for the API and the CLI), and the log.
#[derive(Debug)]
pub struct BuildFailure {
    pub error: String,
    pub log: String,
}

impl BuildFailure {
    fn internal(error: impl std::fmt::Display) -> Self {
        Self { error: format!("the build could not run: {error}"), log: String::new() }
    }
}

pub(crate) struct Builder {
    options: BuildOptions,
    root: PathBuf,
    /// deno's download cache, shared by builds (registry answers and
    /// packages, verified by deno against their integrity).
    cache: PathBuf,
    slots: tokio::sync::Semaphore,
}

impl Builder {
    pub(crate) fn new(options: BuildOptions, data_dir: &Path) -> std::io::Result<Self> {
        let root = data_dir.join("builds");
        // A crash leaves work folders behind: nothing in them is needed.
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let cache = data_dir.join("build-cache");
        std::fs::create_dir_all(&cache)?;
        if let Some(ids) = options.confinement.ids {
            // The data dir is private (0700): the build's uid reaches these
            // two folders through it by ownership of the folders alone.
            isocloud_sandbox::identity::allow_traversal(data_dir)?;
            chown_tree(&cache, ids.uid, ids.gid)?;
        }
        let slots = tokio::sync::Semaphore::new(options.max_concurrent.max(1));
        Ok(Self { options, root, cache, slots })
    }

    /// Builds the deployment made of `files` (its own, as uploaded) starting
    /// at `entrypoint` (a path among them).
    pub(crate) async fn build(
        &self,
        blobs: &Arc<dyn BlobStore>,
        files: &[FileRow],
        entrypoint: &str,
    ) -> Result<BuildOutput, BuildFailure> {
        let _slot = self.slots.acquire().await.map_err(BuildFailure::internal)?;
        let work = self.root.join(format!("{:016x}", rand::random::<u64>()));
        let result = self.build_in(&work, blobs, files, entrypoint).await;
        if let Err(e) = tokio::fs::remove_dir_all(&work).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(target: "isocloud::controlplane", dir = %work.display(), error = %e, "cannot remove a build's folder");
        }
        result
    }

    async fn build_in(
        &self,
        work: &Path,
        blobs: &Arc<dyn BlobStore>,
        files: &[FileRow],
        entrypoint: &str,
    ) -> Result<BuildOutput, BuildFailure> {
        let src = work.join("src");
        tokio::fs::create_dir_all(&src).await.map_err(BuildFailure::internal)?;
        for file in files.iter().filter(|f| f.symlink_target.is_none() && !is_output_path(&f.path)) {
            let bytes = blobs
                .get(&file.sha256)
                .await
                .map_err(BuildFailure::internal)?
                .ok_or_else(|| BuildFailure::internal(format!("blob of {} is missing", file.path)))?;
            let path = inside(&src, &file.path).ok_or_else(|| BuildFailure::internal("a file path escapes"))?;
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent).await.map_err(BuildFailure::internal)?;
            }
            tokio::fs::write(&path, &bytes).await.map_err(BuildFailure::internal)?;
        }
        let log = self.run_install(work, entrypoint).await?;
        let files = collect_output(&src, blobs).await.map_err(|error| BuildFailure { error, log: log.clone() })?;
        Ok(BuildOutput { files, log })
    }

    /// Runs `deno install` in `work/src` (the files already there), under
    /// the build's confinement and bound; deno's output, cleaned.
    async fn run_install(&self, work: &Path, entrypoint: &str) -> Result<String, BuildFailure> {
        let src = work.join("src");
        if let Some(ids) = self.options.confinement.ids {
            chown_tree(work, ids.uid, ids.gid).map_err(BuildFailure::internal)?;
        }

        // In its own root (when the machine allows): deno, the system
        // folders, the work copy at /src and the cache; no other host path.
        let paths = isocloud_sandbox::BuildRoot {
            root: work.join("root"),
            deno: self.options.deno.clone(),
            src: src.clone(),
            cache: self.cache.clone(),
        };
        let jailed = self.options.confinement.mount_namespace;
        let (program, cache, home) = if jailed {
            (
                PathBuf::from(isocloud_sandbox::BuildRoot::DENO),
                PathBuf::from(isocloud_sandbox::BuildRoot::CACHE),
                PathBuf::from(isocloud_sandbox::BuildRoot::CACHE),
            )
        } else {
            (self.options.deno.clone(), self.cache.clone(), work.to_owned())
        };
        let mut command = tokio::process::Command::new(program);
        command.arg("install").arg("--entrypoint").arg(entrypoint);
        command.args(["--node-modules-dir=auto", "--vendor", "--quiet"]);
        if src.join("deno.lock").is_file() {
            // A committed lockfile is the truth: a mismatch fails the build.
            command.arg("--frozen");
        }
        if !self.options.allow_import.is_empty() {
            command.arg(format!("--allow-import={}", self.options.allow_import.join(",")));
        }
        if !jailed {
            // A jail starts in its /src by itself.
            command.current_dir(&src);
        }
        command
            .env_clear()
            .env("DENO_DIR", cache)
            .env("HOME", home)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("NO_COLOR", "1")
            .env("DENO_NO_UPDATE_CHECK", "1")
            .env("DENO_NO_PROMPT", "1")
            // The machine's trust store too: registries behind an operator's
            // TLS proxy or a private CA work as they do for curl.
            .env("DENO_TLS_CA_STORE", "system,mozilla")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for name in ["SSL_CERT_FILE", "SSL_CERT_DIR"] {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        if let Some(registry) = &self.options.npm_registry {
            command.env("NPM_CONFIG_REGISTRY", registry.as_str());
        }
        if let Some(registry) = &self.options.jsr_registry {
            command.env("JSR_URL", registry.as_str());
        }
        let (mut child, cgroup) = self.options.confinement.spawn(command, &paths).map_err(BuildFailure::internal)?;
        let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(BuildFailure::internal("no pipes"));
        };
        let outcome = tokio::time::timeout(self.options.timeout, async {
            let (out, err) = tokio::join!(read_bounded(&mut stdout), read_bounded(&mut stderr));
            let (mut out, err) = (out?, err?);
            let status = child.wait().await?;
            out.extend_from_slice(&err);
            Ok::<_, std::io::Error>((status, out))
        })
        .await;
        let (status, output) = match outcome {
            Ok(result) => result.map_err(BuildFailure::internal)?,
            Err(_) => {
                if let Some(pid) = child.id() {
                    let _ = isocloud_sandbox::signal_process_group(pid, isocloud_sandbox::SIGKILL);
                }
                return Err(BuildFailure {
                    error: format!(
                        "the build took longer than {} s (--build-timeout-s): a registry too slow, or a graph too large",
                        self.options.timeout.as_secs()
                    ),
                    log: String::new(),
                });
            }
        };
        let log = clean_log(&output);
        if let (Some(cgroup), Some(memory)) = (&cgroup, &self.options.confinement.memory)
            && !status.success()
            && cgroup.oom_killed()
        {
            return Err(BuildFailure {
                error: format!(
                    "the build ran out of memory ({} MiB, --build-memory-mb): a graph too large to resolve here",
                    memory.limit_bytes >> 20
                ),
                log,
            });
        }
        drop(cgroup);
        if !status.success() {
            return Err(BuildFailure { error: explain(&log, entrypoint), log });
        }
        if let Some(registry) = &self.options.jsr_registry {
            let vendor = src.join("vendor");
            let moved = tokio::task::spawn_blocking({
                let registry = registry.clone();
                move || vendor_jsr_as_public(&vendor, &registry)
            })
            .await;
            match moved {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(BuildFailure { error, log }),
                Err(e) => return Err(BuildFailure::internal(e)),
            }
        }
        Ok(log)
    }
}

/// The public JSR, where an isolate looks for `jsr:` packages.
const PUBLIC_JSR: &str = "https://jsr.io/";

/// deno names a vendored module's folder after its URL, so a build against
/// `--jsr-registry` vendors JSR packages under that registry's host
/// (`vendor/http_127.0.0.1_port_4873/@std/…`), while the isolate — started
/// offline from the deployment alone, without `JSR_URL` — resolves `jsr:`
/// against the public JSR and looks in `vendor/jsr.io/`. Moving them there
/// (and the URLs in `vendor/manifest.json` with them) makes the deployment
/// run the same wherever it was built.
fn vendor_jsr_as_public(vendor: &Path, registry: &url::Url) -> Result<(), String> {
    if registry.as_str() == PUBLIC_JSR {
        return Ok(());
    }
    let Some(folder) = vendor_folder_of(registry) else {
        tracing::warn!(
            target: "isocloud::controlplane", %registry,
            "deno hashes a segment of the JSR registry's path: its packages stay where deno put them"
        );
        return Ok(());
    };
    let from = vendor.join(&folder);
    if !from.is_dir() {
        return Ok(());
    }
    let error = |e: std::io::Error| format!("moving the JSR packages in vendor/: {e}");
    merge_into(&from, &vendor.join("jsr.io")).map_err(error)?;
    // The registry's host folder, now empty when the URL had a path.
    let mut parent = from.parent();
    while let Some(dir) = parent.filter(|d| *d != vendor) {
        if std::fs::remove_dir(dir).is_err() {
            break;
        }
        parent = dir.parent();
    }
    let manifest = vendor.join("manifest.json");
    if let Ok(text) = std::fs::read_to_string(&manifest) {
        let rewritten = rewrite_vendor_manifest(&text, registry.as_str(), &folder)
            .map_err(|e| format!("vendor/manifest.json: {e}"))?;
        std::fs::write(&manifest, rewritten).map_err(error)?;
    }
    Ok(())
}

/// The folder under `vendor/` deno (2.9) puts `registry`'s files in:
/// `http_` unless https, the host (`_` as `%5f`), `_port_N`, then the path's
/// segments; `None` when a segment is one deno would hash.
fn vendor_folder_of(registry: &url::Url) -> Option<String> {
    let host = registry.host_str()?.replace('_', "%5f");
    let mut folder = match registry.scheme() {
        "https" => host,
        "http" => format!("http_{host}"),
        _ => return None,
    };
    if let Some(port) = registry.port() {
        folder.push_str(&format!("_port_{port}"));
    }
    for segment in registry.path().split('/').filter(|s| !s.is_empty()) {
        let verbatim = segment.len() <= 30
            && segment.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            && !["con", "prn", "aux", "nul"].contains(&segment)
            && !(segment.len() == 4 && (segment.starts_with("com") || segment.starts_with("lpt")));
        if !verbatim {
            return None;
        }
        folder.push('/');
        folder.push_str(segment);
    }
    Some(folder)
}

/// Moves `from` to `to`, merging folders that both have; on a clash of
/// files, `from`'s wins (what `jsr:` resolved to).
fn merge_into(from: &Path, to: &Path) -> std::io::Result<()> {
    let from_dir = std::fs::symlink_metadata(from)?.is_dir();
    match std::fs::symlink_metadata(to) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::rename(from, to)
        }
        Err(e) => Err(e),
        Ok(meta) if meta.is_dir() && from_dir => {
            for entry in std::fs::read_dir(from)? {
                let entry = entry?;
                merge_into(&entry.path(), &to.join(entry.file_name()))?;
            }
            std::fs::remove_dir(from)
        }
        Ok(meta) => {
            if meta.is_dir() {
                std::fs::remove_dir_all(to)?;
            } else {
                std::fs::remove_file(to)?;
            }
            std::fs::rename(from, to)
        }
    }
}

/// `vendor/manifest.json` with the registry's URLs (`modules` and `folders`
/// keys) and local folders (`folders` values) moved to the public JSR's.
fn rewrite_vendor_manifest(text: &str, registry: &str, folder: &str) -> Result<String, serde_json::Error> {
    let mut manifest: serde_json::Value = serde_json::from_str(text)?;
    let local = format!("{folder}/");
    for section in ["modules", "folders"] {
        let Some(map) = manifest.get_mut(section).and_then(|m| m.as_object_mut()) else { continue };
        *map = std::mem::take(map)
            .into_iter()
            .map(|(url, mut value)| {
                if let Some(path) = value.as_str().and_then(|p| p.strip_prefix(&local)) {
                    value = serde_json::Value::String(format!("jsr.io/{path}"));
                }
                match url.strip_prefix(registry) {
                    Some(rest) => (format!("{PUBLIC_JSR}{rest}"), value),
                    None => (url, value),
                }
            })
            .collect();
    }
    serde_json::to_string_pretty(&manifest)
}

/// The build step of apps mode (dev mode): the same `deno install`, under
/// the same confinement, on a copy of an app folder the apps origin made.
pub struct AppFolderBuilder {
    builder: Builder,
}

impl AppFolderBuilder {
    /// Its download cache and work folders live under `dir`.
    pub fn new(options: BuildOptions, dir: &Path) -> std::io::Result<Self> {
        Ok(Self { builder: Builder::new(options, dir)? })
    }

    /// Where the apps origin makes its work folders (emptied at start).
    pub fn work_root(&self) -> PathBuf {
        self.builder.root.clone()
    }
}

#[async_trait::async_trait]
impl isocloud_origin::AppBuilder for AppFolderBuilder {
    async fn build(&self, work: &Path, entrypoint: &str) -> Result<(), String> {
        let _slot = self.builder.slots.acquire().await.map_err(|e| e.to_string())?;
        self.builder.run_install(work, entrypoint).await.map(drop).map_err(|failure| failure.error)
    }
}

/// Everything the pipe gives (so deno never blocks on it), the first
/// [`MAX_LOG_BYTES`] × 4 kept.
async fn read_bounded(reader: &mut (impl tokio::io::AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut kept = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            return Ok(kept);
        }
        let room = (MAX_LOG_BYTES * 4).saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..n.min(room)]);
    }
}

/// Whether a deployment path is one a build writes.
/// (The folders are the runner's package dirs, `isocloud_sandbox::PACKAGE_DIRS`:
/// a deployment's own files there are replaced.)
pub fn is_output_path(path: &str) -> bool {
    output_dirs().any(|dir| path == dir || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/')))
}

/// `node_modules`, `vendor`: the build's output folders, relative.
fn output_dirs() -> impl Iterator<Item = &'static str> {
    isocloud_sandbox::PACKAGE_DIRS.iter().map(|dir| dir.trim_start_matches('/'))
}

fn inside(root: &Path, relative: &str) -> Option<PathBuf> {
    let mut path = root.to_path_buf();
    for component in Path::new(relative).components() {
        match component {
            Component::Normal(part) => path.push(part),
            _ => return None,
        }
    }
    Some(path)
}

fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            chown_tree(&entry.path(), uid, gid)?;
        } else {
            std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

/// deno's output as text: ANSI colours out, its Rust backtrace out, cut to
/// [`MAX_LOG_BYTES`], and the work folder's path shown as the deployment's.
fn clean_log(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let mut clean = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        clean.push(c);
    }
    let mut lines: Vec<&str> = Vec::new();
    for line in clean.lines() {
        if line.trim_start().starts_with("Stack backtrace:") {
            break;
        }
        lines.push(line);
    }
    let mut log = lines.join("\n");
    if log.len() > MAX_LOG_BYTES {
        let mut cut = MAX_LOG_BYTES;
        while !log.is_char_boundary(cut) {
            cut -= 1;
        }
        log.truncate(cut);
        log.push_str("\n… (cut)");
    }
    strip_work_paths(&log)
}

/// `file:///…/builds/<id>/src/main.ts` → `file:///src/main.ts`, the
/// specifier the deployment's module has when it runs.
fn strip_work_paths(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut rest = log;
    while let Some(at) = rest.find("/builds/") {
        let after = &rest[at + "/builds/".len()..];
        let Some(src) = after.find("/src/") else { break };
        let folder = &after[..src];
        if folder.is_empty() || folder.contains(['/', ' ', '"', '\'']) {
            out.push_str(&rest[..at + 1]);
            rest = &rest[at + 1..];
            continue;
        }
        // Back to the start of the absolute path (after `file://`, a space
        // or the line start).
        let head = &rest[..at];
        let start = head.rfind(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '(').map_or(0, |i| i + 1);
        let prefix = &head[start..];
        let keep = if let Some(stripped) = prefix.strip_prefix("file://") {
            let _ = stripped;
            "file://"
        } else {
            ""
        };
        out.push_str(&head[..start]);
        out.push_str(keep);
        out.push_str("/src/");
        rest = &after[src + "/src/".len()..];
    }
    out.push_str(rest);
    out
}

/// The failure in isocloud's words: deno's first error paragraph (what and
/// where), with what to do instead of a deno flag to pass.
pub(crate) fn explain(log: &str, entrypoint: &str) -> String {
    let start = log.lines().position(|l| l.starts_with("error:")).unwrap_or(0);
    let paragraph: Vec<&str> =
        log.lines().skip(start).take_while(|l| !l.trim().is_empty() || l.starts_with(' ')).take(12).collect();
    let mut message = paragraph.join("\n").trim().to_owned();
    if message.is_empty() {
        message = format!("deno could not build the module graph of {entrypoint}");
    }
    for (deno_says, isocloud_says) in FLAG_ADVICE {
        if let Some(at) = message.find(deno_says) {
            let end = message[at..].find('\n').map_or(message.len(), |i| at + i);
            message.replace_range(at..end, isocloud_says);
        }
    }
    message.strip_prefix("error: ").unwrap_or(&message).to_owned()
}

/// deno's advice names its own flags; a deployment cannot pass flags.
const FLAG_ADVICE: [(&str, &str); 6] = [
    (
        ", run again with the --allow-import flag",
        ": remote imports come only from the hosts deno allows by default (jsr.io, deno.land, esm.sh, \
         cdn.jsdelivr.net, …) and those the operator adds with --build-allow-import; use a jsr: or npm: \
         specifier, or deploy the module as a file",
    ),
    ("run again with --allow-scripts", "isocloud does not run npm lifecycle scripts: use a package that needs none"),
    ("Run `deno install` to update", "update deno.lock (run `deno install` locally) and deploy again"),
    (
        "Run again with `--frozen=false`",
        "the committed deno.lock does not match the imports: run `deno install` locally and commit deno.lock",
    ),
    // deno 2.9's wording of the same.
    (
        "Run `deno install --frozen=false`",
        "The committed deno.lock does not match the imports: run `deno install` locally and commit deno.lock",
    ),
    // Not a flag, but deno blames the registry when the expected integrity
    // is the one deno.lock recorded.
    (
        "Tarball checksum did not match what was provided by npm registry",
        "The package's bytes do not match the integrity deno.lock records for it (without a deno.lock, the \
         registry's own): it changed since it was locked. If that is expected, run `deno install` locally and \
         commit deno.lock",
    ),
];

/// The build's output folders as deployment files: regular files into the
/// blob store, symlinks kept when they stay inside the deployment.
async fn collect_output(src: &Path, blobs: &Arc<dyn BlobStore>) -> Result<Vec<FileRow>, String> {
    let mut found = Vec::new();
    for dir in output_dirs() {
        let root = src.join(dir);
        if tokio::fs::symlink_metadata(&root).await.is_ok() {
            let src = src.to_owned();
            let walked = tokio::task::spawn_blocking(move || walk(&src, &root))
                .await
                .map_err(|e| format!("walking the build's output: {e}"))??;
            found.extend(walked);
        }
    }
    if found.len() > MAX_OUTPUT_FILES {
        return Err(format!("the build wrote more than {MAX_OUTPUT_FILES} files (node_modules and vendor)"));
    }
    let mut total = 0u64;
    let mut files = Vec::with_capacity(found.len());
    for entry in found {
        match entry {
            Walked::File { path, host } => {
                let bytes = tokio::fs::read(&host).await.map_err(|e| format!("reading {path}: {e}"))?;
                total += bytes.len() as u64;
                if total > MAX_OUTPUT_BYTES {
                    return Err(format!(
                        "the build wrote more than {MAX_OUTPUT_BYTES} bytes (node_modules and vendor)"
                    ));
                }
                let size = bytes.len() as i64;
                let hash = blobs.put(Bytes::from(bytes)).await.map_err(|e| format!("storing {path}: {e}"))?;
                files.push(FileRow::file(path, hash, size));
            }
            Walked::Link { path, target } => {
                files.push(FileRow { path, sha256: String::new(), size_bytes: 0, symlink_target: Some(target) })
            }
        }
    }
    Ok(files)
}

enum Walked {
    File { path: String, host: PathBuf },
    Link { path: String, target: String },
}

fn walk(src: &Path, dir: &Path) -> Result<Vec<Walked>, String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| e.to_string())?;
            let host = entry.path();
            let relative = host.strip_prefix(src).map_err(|e| e.to_string())?;
            let path = relative.to_str().ok_or_else(|| format!("{} is not UTF-8", relative.display()))?.to_owned();
            let kind = entry.file_type().map_err(|e| e.to_string())?;
            if kind.is_dir() {
                stack.push(host);
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&host).map_err(|e| e.to_string())?;
                let target = target.to_str().ok_or_else(|| format!("the link {path} is not UTF-8"))?.to_owned();
                if !link_stays_inside(&path, &target) {
                    return Err(format!("the build made a link {path} -> {target} that leaves the deployment"));
                }
                out.push(Walked::Link { path, target });
            } else if kind.is_file() {
                out.push(Walked::File { path, host });
            }
            if out.len() > MAX_OUTPUT_FILES {
                return Err(format!("the build wrote more than {MAX_OUTPUT_FILES} files (node_modules and vendor)"));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_must_stay_inside_the_deployment() {
        assert!(link_stays_inside("node_modules/hono", ".deno/hono@4.0.0/node_modules/hono"));
        assert!(link_stays_inside("node_modules/.deno/a@1/node_modules/b", "../../b@1/node_modules/b"));
        assert!(!link_stays_inside("node_modules/x", "/etc/passwd"));
        assert!(!link_stays_inside("node_modules/x", "../../etc"));
        assert!(!link_stays_inside("x", ".."));
        assert!(!link_stays_inside("x", ""));
    }

    #[test]
    fn output_paths_are_the_build_folders_only() {
        assert!(is_output_path("node_modules/hono/package.json"));
        assert!(is_output_path("vendor/jsr.io/@std/path/meta.json"));
        assert!(!is_output_path("node_modules_backup/x"));
        assert!(!is_output_path("src/vendor/x"));
    }

    #[test]
    fn the_log_loses_colours_backtraces_and_work_paths() {
        let raw = b"\x1b[1m\x1b[31merror\x1b[0m: SyntaxError: Expression expected\n    at file:///data/builds/0123abcd0123abcd/src/main.ts:1:11\n\nStack backtrace:\n   0: <unknown>\n";
        let log = clean_log(raw);
        assert_eq!(log, "error: SyntaxError: Expression expected\n    at file:///src/main.ts:1:11\n");
        assert_eq!(explain(&log, "main.ts"), "SyntaxError: Expression expected\n    at file:///src/main.ts:1:11");
    }

    #[test]
    fn a_jsr_registry_maps_to_deno_s_vendor_folder() {
        let folder = |url: &str| vendor_folder_of(&url::Url::parse(url).unwrap());
        assert_eq!(folder("http://127.0.0.1:4873/").as_deref(), Some("http_127.0.0.1_port_4873"));
        assert_eq!(folder("https://jsr.example.com/").as_deref(), Some("jsr.example.com"));
        assert_eq!(folder("https://mirror.example:8443/api/jsr/").as_deref(), Some("mirror.example_port_8443/api/jsr"));
        assert_eq!(folder("http://my_host/").as_deref(), Some("http_my%5fhost"));
        // deno hashes these segments: not mapped.
        assert_eq!(folder("https://mirror.example/JSR/"), None);
        assert_eq!(folder("https://mirror.example/jsr.v1/"), None);
    }

    #[test]
    fn jsr_packages_move_to_the_public_jsr_s_folder() {
        let vendor = tempfile::tempdir().unwrap();
        let v = vendor.path();
        let put = |path: &str, text: &str| {
            let full = v.join(path);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(full, text).unwrap();
        };
        put("http_localhost_port_4873/jsr/@a/b/meta.json", "mirror meta");
        put("http_localhost_port_4873/jsr/@a/b/1.0.0/mod.ts", "mirror mod");
        put("jsr.io/@std/x/meta.json", "an https: import of jsr.io");
        put("deno.land/x/y.ts", "another host");
        put(
            "manifest.json",
            r#"{"folders":{"http://localhost:4873/jsr/@a/b/1.0.0/LIB/":"http_localhost_port_4873/jsr/@a/b/1.0.0/#lib_12345"},"modules":{"http://localhost:4873/jsr/@a/b/1.0.0/m":{"headers":{"content-type":"application/typescript"}},"https://deno.land/x/y":{}}}"#,
        );
        let registry = url::Url::parse("http://localhost:4873/jsr/").unwrap();
        vendor_jsr_as_public(v, &registry).unwrap();
        let read = |path: &str| std::fs::read_to_string(v.join(path)).unwrap();
        assert_eq!(read("jsr.io/@a/b/meta.json"), "mirror meta");
        assert_eq!(read("jsr.io/@a/b/1.0.0/mod.ts"), "mirror mod");
        assert_eq!(read("jsr.io/@std/x/meta.json"), "an https: import of jsr.io");
        assert_eq!(read("deno.land/x/y.ts"), "another host");
        assert!(!v.join("http_localhost_port_4873").exists(), "the registry's folder is gone");
        let manifest: serde_json::Value = serde_json::from_str(&read("manifest.json")).unwrap();
        assert_eq!(manifest["folders"]["https://jsr.io/@a/b/1.0.0/LIB/"], "jsr.io/@a/b/1.0.0/#lib_12345");
        assert!(manifest["modules"]["https://jsr.io/@a/b/1.0.0/m"].is_object(), "{manifest}");
        assert!(manifest["modules"]["https://deno.land/x/y"].is_object(), "{manifest}");
        // The public JSR itself: nothing to move.
        vendor_jsr_as_public(v, &url::Url::parse(PUBLIC_JSR).unwrap()).unwrap();
        assert_eq!(read("jsr.io/@a/b/meta.json"), "mirror meta");
    }

    #[test]
    fn deno_flags_become_isocloud_advice() {
        let log = "error: Requires import access to \"127.0.0.1:8765\", run again with the --allow-import flag\n    at file:///src/main.ts:1:19";
        let message = explain(log, "main.ts");
        assert!(!message.contains("--allow-import flag"), "{message}");
        assert!(message.contains("127.0.0.1:8765"), "{message}");
        assert!(message.contains("--build-allow-import"), "{message}");

        let log = "error: The lockfile is out of date. Run `deno install --frozen=false`, or rerun with `--frozen=false` to update it.\nchanges:\n 5 | +    \"npm:extra@1\": \"1.0.0\",";
        let message = explain(log, "main.ts");
        assert!(!message.contains("--frozen"), "{message}");
        assert!(
            message.starts_with("The lockfile is out of date. The committed deno.lock does not match"),
            "{message}"
        );
        assert!(message.contains("npm:extra@1"), "the change is shown: {message}");

        let log = "error: Failed caching npm package 'a@1.0.0'\n    0: Tarball checksum did not match what was provided by npm registry for a@1.0.0.\n       \n       Expected: x\n       Actual: y";
        let message = explain(log, "main.ts");
        assert!(message.starts_with("Failed caching npm package 'a@1.0.0'"), "{message}");
        assert!(message.contains("deno.lock records") && message.contains("Actual: y"), "{message}");
    }
}
