//! Git builds: a push webhook leaves a `building` deployment; a worker in
//! `run_background` claims it, keeps a bare mirror of the project's
//! repository in `<data dir>/git/<project id>/`, fetches, reads the tree at
//! the pushed commit (`git ls-tree` + `git cat-file --batch`), puts every
//! file into the blob store and makes the deployment ready (promoting it) or
//! failed with a message.
//!
//! `git` runs with no terminal prompts, only the transports that cannot run
//! commands, and a deadline per step; a repository is never checked out, so
//! no hook or filter of the repository runs.
//!
//! A push is built only while its commit is still the branch's head once the
//! mirror is fetched: a late or replayed delivery of an older commit fails
//! saying so, builds nothing and never moves production.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::ControlPlane;
use crate::origin::file_specifier;
use crate::store::deployments::{self, DeploymentRow, FileRow};
use crate::store::projects;
use crate::time::now_ms;
use crate::validate;

/// A fetch may take this long; other git steps less.
const FETCH_TIMEOUT: Duration = Duration::from_secs(300);
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// A whole build, claim to result.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// A claim older than this belongs to a node that died: take it over.
pub const STALE_CLAIM: Duration = Duration::from_secs(900);
/// Bytes of a commit's tree a build reads at most.
const MAX_TREE_BYTES: u64 = 1024 * 1024 * 1024;
/// How much of git's stderr an error message keeps.
const MAX_STDERR_BYTES: usize = 2048;

/// The public webhook's bodies are read before they are authenticated
/// (the signature covers the whole body), so what an outsider can make the
/// control plane hold is bounded: at most this many bytes of bodies being
/// read, all deliveries together, counted as they arrive (a delivery whose
/// next bytes would pass it is answered 503 and its connection closed). A
/// body trickling in holds only what it sent: a few slow senders cannot
/// shut the webhook, as a count of bodies at once let 16 of them do;
/// filling this takes sending 64 MiB and keeping it unfinished ...
pub const MAX_WEBHOOK_BUFFERED_BYTES: usize = 64 * 1024 * 1024;
/// ... of at most this many bytes each (a larger declared length is
/// answered 413 unread). A push payload is a few KB; one listing thousands
/// of changed paths about 1 MB (GitHub caps each list at 5,000 paths and
/// drops payloads over 25 MB; a push this refuses can be deployed with
/// `isocloud deploy`) ...
pub const MAX_WEBHOOK_BODY_BYTES: usize = 4 * 1024 * 1024;
/// ... each read within this long from the request head (GitHub gives up
/// on a delivery after 10 s too).
pub const WEBHOOK_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// What bounds the public webhook's unauthenticated bodies (read by
/// `api::git::webhook`): one per control plane.
pub(crate) struct WebhookGate {
    /// The bytes of bodies being read before their signature is known, in
    /// KiB permits ([`MAX_WEBHOOK_BUFFERED_BYTES`]); past it, 503.
    pub body_kib: Arc<tokio::sync::Semaphore>,
    /// The key a delivery to a project without git settings (or to no
    /// project) is checked against, so it costs the same HMAC as any other.
    pub unknown_project_key: [u8; 32],
    /// Deliveries refused, by why, for `/metrics`.
    pub refused: [AtomicU64; WebhookRefusal::ALL.len()],
}

/// Why the webhook refused a delivery before it was authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookRefusal {
    /// The bodies being read held [`MAX_WEBHOOK_BUFFERED_BYTES`] (503).
    Busy,
    /// The body took longer than [`WEBHOOK_BODY_TIMEOUT`] (408).
    BodyTimeout,
    /// The body was over [`MAX_WEBHOOK_BODY_BYTES`] (413).
    TooLarge,
    /// Not signed with the project's secret (401).
    Unsigned,
}

impl WebhookRefusal {
    pub const ALL: [WebhookRefusal; 4] = [Self::Busy, Self::BodyTimeout, Self::TooLarge, Self::Unsigned];

    pub fn label(self) -> &'static str {
        match self {
            Self::Busy => "busy",
            Self::BodyTimeout => "body_timeout",
            Self::TooLarge => "too_large",
            Self::Unsigned => "unsigned",
        }
    }
}

impl WebhookGate {
    pub fn new() -> Self {
        use rand::Rng;
        Self {
            body_kib: Arc::new(tokio::sync::Semaphore::new(MAX_WEBHOOK_BUFFERED_BYTES / 1024)),
            unknown_project_key: rand::rng().random(),
            refused: Default::default(),
        }
    }

    pub fn count(&self, refusal: WebhookRefusal) {
        self.refused[refusal as usize].fetch_add(1, Ordering::Relaxed);
    }
}

impl ControlPlane {
    /// How many webhook deliveries this process refused before they were
    /// authenticated, by reason (`busy`, `body_timeout`, `too_large`,
    /// `unsigned`), for `/metrics`.
    pub fn webhook_refusals(&self) -> [(&'static str, u64); WebhookRefusal::ALL.len()] {
        WebhookRefusal::ALL.map(|r| (r.label(), self.webhook_gate.refused[r as usize].load(Ordering::Relaxed)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Failed(String),
    #[error("git {step} timed out after {seconds} s")]
    Timeout { step: &'static str, seconds: u64 },
    /// The pushed commit is not the branch's head any more (a later push, a
    /// late delivery, or a replay of an old one).
    #[error(
        "commit {commit} is not the head of branch {branch} (the head is {head}): a late or replayed push builds nothing and production is unchanged"
    )]
    NotHead { commit: String, branch: String, head: String },
}

fn failed(message: impl Into<String>) -> BuildError {
    BuildError::Failed(message.into())
}

fn git(git_dir: Option<&Path>) -> Command {
    let mut command = Command::new("git");
    if let Some(dir) = git_dir {
        command.arg("--git-dir").arg(dir);
    }
    command
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ALLOW_PROTOCOL", "file:git:http:https:ssh")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if std::env::var_os("GIT_SSH_COMMAND").is_none() {
        command.env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes");
    }
    command
}

/// Runs a git command to completion, returning stdout.
async fn run(step: &'static str, mut command: Command, timeout: Duration) -> Result<Vec<u8>, BuildError> {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let output = tokio::time::timeout(timeout, command.output())
        .await
        .map_err(|_| BuildError::Timeout { step, seconds: timeout.as_secs() })?
        .map_err(|e| failed(format!("git {step}: cannot run git: {e}")))?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.trim();
        let tail = &stderr[stderr.len().saturating_sub(MAX_STDERR_BYTES)..];
        let tail = tail.trim_start_matches(|c: char| !c.is_ascii());
        Err(failed(format!("git {step} failed ({}): {tail}", output.status)))
    }
}

/// Clones (first time) or fetches the mirror of `repository` at `dir`.
async fn update_mirror(repository: &str, dir: &Path) -> Result<(), BuildError> {
    if !dir.join("HEAD").is_file() {
        if dir.exists() {
            tokio::fs::remove_dir_all(dir).await.map_err(|e| failed(format!("cannot clear {}: {e}", dir.display())))?;
        }
        if let Some(parent) = dir.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| failed(format!("cannot create {}: {e}", parent.display())))?;
        }
        let mut clone = git(None);
        clone.args(["clone", "--mirror", "--quiet", "--"]).arg(repository).arg(dir);
        run("clone", clone, FETCH_TIMEOUT).await?;
        return Ok(());
    }
    // The project's repository may have changed since the last build.
    let mut set_url = git(Some(dir));
    set_url.args(["remote", "set-url", "origin"]).arg(repository);
    run("remote set-url", set_url, STEP_TIMEOUT).await?;
    let mut fetch = git(Some(dir));
    fetch.args(["fetch", "--prune", "--quiet", "origin"]);
    run("fetch", fetch, FETCH_TIMEOUT).await?;
    Ok(())
}

/// One blob of a commit's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TreeBlob {
    object: String,
    size_bytes: u64,
    path: String,
}

/// Parses `git ls-tree -r -l -z` output: regular files only (symlinks and
/// submodules are skipped: a deployment's files are plain files).
fn parse_ls_tree(output: &[u8]) -> Result<Vec<TreeBlob>, BuildError> {
    let mut blobs = Vec::new();
    for record in output.split(|&b| b == 0).filter(|r| !r.is_empty()) {
        let record = std::str::from_utf8(record).map_err(|_| failed("the tree has a path that is not UTF-8"))?;
        let (meta, path) =
            record.split_once('\t').ok_or_else(|| failed(format!("unexpected ls-tree line {record:?}")))?;
        let mut fields = meta.split_whitespace();
        let (Some(mode), Some(kind), Some(object), Some(size)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(failed(format!("unexpected ls-tree line {record:?}")));
        };
        if kind != "blob" || !(mode == "100644" || mode == "100755") {
            continue;
        }
        let size_bytes = size.parse().map_err(|_| failed(format!("unexpected ls-tree size {size:?}")))?;
        blobs.push(TreeBlob { object: object.to_owned(), size_bytes, path: path.to_owned() });
    }
    Ok(blobs)
}

impl ControlPlane {
    /// Claims and runs git builds until the end of time; at most two at once.
    pub(crate) async fn build_loop(self: Arc<Self>) {
        let slots = Arc::new(tokio::sync::Semaphore::new(2));
        loop {
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { return };
            let claimed = async {
                let mut tx = self.store.write().await?;
                let now = now_ms();
                let claimed =
                    deployments::claim_build(&mut tx, now, now - crate::time::duration_ms(STALE_CLAIM)).await?;
                tx.commit().await?;
                Ok::<_, crate::store::StoreError>(claimed)
            }
            .await;
            match claimed {
                Ok(Some(deployment)) => {
                    let cp = Arc::clone(&self);
                    tokio::spawn(async move {
                        cp.build(deployment).await;
                        drop(permit);
                    });
                    continue;
                }
                Ok(None) => drop(permit),
                Err(e) => {
                    drop(permit);
                    tracing::warn!(target: "isocloud::controlplane", error = %e, "claiming a git build failed");
                }
            }
            // Woken by a webhook on this node; the timeout finds builds that
            // other nodes queued or that a dead node left behind.
            let _ = tokio::time::timeout(Duration::from_secs(2), self.builds.notified()).await;
        }
    }

    async fn build(&self, deployment: DeploymentRow) {
        let id = deployment.id.clone();
        tracing::info!(target: "isocloud::controlplane", deployment = id, project = deployment.project_name, "git build started");
        let outcome = match tokio::time::timeout(BUILD_TIMEOUT, self.build_files(&deployment)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(failed(format!("the build took longer than {} s", BUILD_TIMEOUT.as_secs()))),
        };
        // Then the build step, as for an uploaded deployment.
        let outcome = match (outcome, &self.builder) {
            (Ok(mut files), Some(builder)) => {
                let entry = deployment.entrypoint.strip_prefix("file:///src/").unwrap_or(&deployment.entrypoint);
                match builder.build(&self.blobs, &files, entry).await {
                    Ok(output) => {
                        files.retain(|f| !crate::build::is_output_path(&f.path));
                        files.extend(output.files);
                        Ok((files, Some(output.log)))
                    }
                    Err(failure) => Err((failure.error, Some(failure.log))),
                }
            }
            (Ok(files), None) => Ok((files, None)),
            // Said in the build log too, where a build's story is read.
            (Err(e @ BuildError::NotHead { .. }), _) => Err((e.to_string(), Some(e.to_string()))),
            (Err(e), _) => Err((e.to_string(), None)),
        };
        let result = match outcome {
            Ok((files, log)) => self.finish_build(&deployment, &files, log.as_deref()).await,
            Err((error, log)) => {
                tracing::info!(target: "isocloud::controlplane", deployment = id, error, "git build failed");
                async {
                    let mut tx = self.store.write().await?;
                    deployments::fail_build(&mut tx, &id, &error, log.as_deref()).await?;
                    tx.commit().await
                }
                .await
            }
        };
        if let Err(e) = result {
            tracing::error!(target: "isocloud::controlplane", deployment = id, error = %e, "recording a git build's result failed");
        }
        self.reload_routing_logged().await;
    }

    async fn finish_build(
        &self,
        deployment: &DeploymentRow,
        files: &[FileRow],
        log: Option<&str>,
    ) -> crate::store::Result<()> {
        let now = now_ms();
        let mut tx = self.store.write().await?;
        let project = projects::by_id(&mut tx, &deployment.project_id).await?;
        let Some(project) = project else { return Ok(()) };
        if !deployments::finish_build(&mut tx, &deployment.id, files, log).await? {
            return Ok(());
        }
        if deployment.build_promote {
            // Lock the project first, as every promotion does.
            if let Some(project) = projects::lock_by_name(&mut tx, &project.name, now).await? {
                projects::promote(&mut tx, &project.id, &deployment.id, now).await?;
            }
        }
        tx.commit().await?;
        tracing::info!(target: "isocloud::controlplane", deployment = deployment.id, files = files.len(), "git build ready");
        Ok(())
    }

    fn mirror_dir(&self, project_id: &str) -> PathBuf {
        self.options.data_dir.join("git").join(project_id)
    }

    /// Deletes a project's mirror (after the project is gone).
    pub(crate) async fn remove_git_mirror(&self, project_id: &str) {
        let lock = self.git_lock(project_id);
        let _held = lock.lock().await;
        let dir = self.mirror_dir(project_id);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(target: "isocloud::controlplane", dir = %dir.display(), error = %e, "cannot remove git mirror");
        }
    }

    fn git_lock(&self, project_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.git_locks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(locks.entry(project_id.to_owned()).or_default())
    }

    /// Fetches the commit and stores its files; the deployment's file list.
    async fn build_files(&self, deployment: &DeploymentRow) -> Result<Vec<FileRow>, BuildError> {
        let commit = deployment.git.as_ref().map(|g| g.commit.clone()).ok_or_else(|| failed("no commit recorded"))?;
        validate::git_commit(&commit).map_err(failed)?;
        let settings = {
            let mut conn = self.store.read().await.map_err(|e| failed(e.to_string()))?;
            projects::by_id(&mut conn, &deployment.project_id).await.map_err(|e| failed(e.to_string()))?
        }
        .and_then(|p| p.git)
        .ok_or_else(|| failed("the project has no git settings any more"))?;

        let lock = self.git_lock(&deployment.project_id);
        let _held = lock.lock().await;
        let dir = self.mirror_dir(&deployment.project_id);
        update_mirror(&settings.repository, &dir).await?;

        let mut exists = git(Some(&dir));
        exists.args(["cat-file", "-e"]).arg(format!("{commit}^{{commit}}"));
        run("cat-file", exists, STEP_TIMEOUT)
            .await
            .map_err(|_| failed(format!("commit {commit} is not in {}", settings.repository)))?;
        // The branch as the fetch left it: only its head deploys.
        let mut branch_head = git(Some(&dir));
        branch_head
            .args(["rev-parse", "--verify", "--quiet"])
            .arg(format!("refs/heads/{}^{{commit}}", settings.branch));
        let head = run("rev-parse", branch_head, STEP_TIMEOUT)
            .await
            .map_err(|_| failed(format!("branch {} is not in {}", settings.branch, settings.repository)))?;
        let head = String::from_utf8_lossy(&head).trim().to_ascii_lowercase();
        if head != commit {
            return Err(BuildError::NotHead { commit, branch: settings.branch, head });
        }

        let mut ls_tree = git(Some(&dir));
        ls_tree.args(["ls-tree", "-r", "-l", "-z", "--full-tree"]).arg(&commit);
        let blobs = parse_ls_tree(&run("ls-tree", ls_tree, STEP_TIMEOUT).await?)?;
        if blobs.len() > validate::MAX_FILES {
            return Err(failed(format!("the commit has more than {} files", validate::MAX_FILES)));
        }
        let mut total = 0u64;
        for blob in &blobs {
            validate::file_path(&blob.path).map_err(failed)?;
            if blob.size_bytes > self.options.max_blob_bytes {
                return Err(failed(format!(
                    "{} is {} bytes, over the blob bound of {} bytes",
                    blob.path, blob.size_bytes, self.options.max_blob_bytes
                )));
            }
            total += blob.size_bytes;
        }
        if total > MAX_TREE_BYTES {
            return Err(failed(format!("the commit's files are more than {MAX_TREE_BYTES} bytes")));
        }
        let entry = deployment.entrypoint.strip_prefix("file:///src/").unwrap_or(&deployment.entrypoint);
        let entry_found =
            blobs.iter().any(|b| file_specifier(&b.path) == deployment.entrypoint && validate::is_code_path(&b.path));
        if !entry_found {
            return Err(failed(format!("the entrypoint {entry} is not a code file in commit {commit}")));
        }
        for blob in blobs.iter().filter(|b| validate::is_code_path(&b.path)) {
            validate::code_path(&blob.path).map_err(failed)?;
        }
        self.store_blobs(&dir, &blobs).await
    }

    /// Streams the blobs' contents out of `git cat-file --batch` into the
    /// blob store.
    async fn store_blobs(&self, dir: &Path, blobs: &[TreeBlob]) -> Result<Vec<FileRow>, BuildError> {
        let mut command = git(Some(dir));
        command.args(["cat-file", "--batch"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = command.spawn().map_err(|e| failed(format!("git cat-file: cannot run git: {e}")))?;
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(failed("git cat-file: no pipes"));
        };
        let requests: Vec<u8> = blobs.iter().flat_map(|b| format!("{}\n", b.object).into_bytes()).collect();
        let writer = tokio::spawn(async move {
            let result = stdin.write_all(&requests).await;
            drop(stdin);
            result
        });
        let mut reader = BufReader::new(stdout);
        let mut files = Vec::with_capacity(blobs.len());
        for blob in blobs {
            let mut header = String::new();
            reader.read_line(&mut header).await.map_err(|e| failed(format!("git cat-file: {e}")))?;
            let mut parts = header.split_whitespace();
            let (Some(object), Some(kind), Some(size)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(failed(format!("git cat-file: unexpected header {header:?}")));
            };
            if object != blob.object || kind != "blob" || size.parse::<u64>().ok() != Some(blob.size_bytes) {
                return Err(failed(format!("git cat-file: unexpected header {header:?} for {}", blob.path)));
            }
            let mut content = vec![0u8; usize::try_from(blob.size_bytes).map_err(|_| failed("blob too large"))?];
            reader.read_exact(&mut content).await.map_err(|e| failed(format!("git cat-file: {e}")))?;
            let mut newline = [0u8; 1];
            reader.read_exact(&mut newline).await.map_err(|e| failed(format!("git cat-file: {e}")))?;
            let hash = self
                .blobs
                .put(Bytes::from(content))
                .await
                .map_err(|e| failed(format!("storing {}: {e}", blob.path)))?;
            files.push(FileRow::file(blob.path.clone(), hash, i64::try_from(blob.size_bytes).unwrap_or(i64::MAX)));
        }
        let _ = writer.await;
        let _ = child.wait().await;
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ls_tree_keeps_regular_files() {
        let output = [
            "100644 blob aaaa     12\tmain.ts",
            "100755 blob bbbb      3\tbin/run.sh",
            "120000 blob cccc      5\tlink",
            "160000 commit dddd       -\tvendor/sub",
        ]
        .join("\0");
        let output = output.as_bytes();
        let blobs = parse_ls_tree(output).unwrap();
        assert_eq!(
            blobs,
            vec![
                TreeBlob { object: "aaaa".into(), size_bytes: 12, path: "main.ts".into() },
                TreeBlob { object: "bbbb".into(), size_bytes: 3, path: "bin/run.sh".into() },
            ]
        );
        assert!(parse_ls_tree(b"garbage\0").is_err());
    }
}
