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

use crate::blobs::BlobStore;
use crate::store::deployments::FileRow;

/// Folders a build writes: a deployment's own files there are replaced.
pub const OUTPUT_DIRS: [&str; 2] = ["node_modules", "vendor"];
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
        if let Some(ids) = self.options.confinement.ids {
            chown_tree(work, ids.uid, ids.gid).map_err(BuildFailure::internal)?;
        }

        let mut command = tokio::process::Command::new(&self.options.deno);
        command.arg("install").arg("--entrypoint").arg(entrypoint);
        command.args(["--node-modules-dir=auto", "--vendor", "--quiet"]);
        if src.join("deno.lock").is_file() {
            // A committed lockfile is the truth: a mismatch fails the build.
            command.arg("--frozen");
        }
        if !self.options.allow_import.is_empty() {
            command.arg(format!("--allow-import={}", self.options.allow_import.join(",")));
        }
        command
            .current_dir(&src)
            .env_clear()
            .env("DENO_DIR", &self.cache)
            .env("HOME", work)
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
        let mut child = self.options.confinement.spawn(command).map_err(BuildFailure::internal)?;
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
        if !status.success() {
            return Err(BuildFailure { error: explain(&log, entrypoint), log });
        }
        let files = collect_output(&src, blobs).await.map_err(|error| BuildFailure { error, log: log.clone() })?;
        Ok(BuildOutput { files, log })
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
pub fn is_output_path(path: &str) -> bool {
    OUTPUT_DIRS.iter().any(|dir| path == *dir || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/')))
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
        if !after[..src].bytes().all(|b| b.is_ascii_hexdigit()) {
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
const FLAG_ADVICE: [(&str, &str); 4] = [
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
];

/// The build's output folders as deployment files: regular files into the
/// blob store, symlinks kept when they stay inside the deployment.
async fn collect_output(src: &Path, blobs: &Arc<dyn BlobStore>) -> Result<Vec<FileRow>, String> {
    let mut found = Vec::new();
    for dir in OUTPUT_DIRS {
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

/// A relative target that, joined to the link's folder, stays inside the
/// deployment root.
pub(crate) fn link_stays_inside(link: &str, target: &str) -> bool {
    if target.starts_with('/') || target.contains('\0') || target.is_empty() {
        return false;
    }
    let mut depth: Vec<&str> = link.split('/').collect();
    depth.pop();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if depth.pop().is_none() {
                    return false;
                }
            }
            other => depth.push(other),
        }
    }
    true
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
    fn deno_flags_become_isocloud_advice() {
        let log = "error: Requires import access to \"127.0.0.1:8765\", run again with the --allow-import flag\n    at file:///src/main.ts:1:19";
        let message = explain(log, "main.ts");
        assert!(!message.contains("--allow-import flag"), "{message}");
        assert!(message.contains("127.0.0.1:8765"), "{message}");
        assert!(message.contains("--build-allow-import"), "{message}");
    }
}
