//! `isocloud deploy`: walk and hash the folder, ask the server which blobs
//! it lacks, upload only those (a few at a time, with a progress bar on a
//! terminal), then create the deployment, recording the git commit when
//! the folder is in a work tree.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::IsTerminal as _;
use std::path::PathBuf;

use clap::Args;
use futures_util::TryStreamExt as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::AsyncReadExt as _;

use super::api::{Api, CallError, CommitBody, CreateDeploymentBody, Deployment, FileRef, code};
use super::error::{ClientError, FilesError, InputError};
use super::git::{GitInfo, WorkTree};
use super::glob::Glob;
use super::output::{human_bytes, sanitize};
use super::walk::{self, HashedFile, WalkOptions};
use super::{ConnectionFlags, connect};

/// Uploads at once: enough to hide round trips, few enough not to flood
/// the server or a slow uplink.
const UPLOAD_CONCURRENCY: usize = 4;
/// Hashes per `/blobs/missing` call, keeping each body small.
const MISSING_BATCH: usize = 1000;
const UPLOAD_CHUNK_BYTES: usize = 64 * 1024;

#[derive(Args, Debug)]
pub struct DeployArgs {
    #[command(flatten)]
    pub connection: ConnectionFlags,
    /// The project to deploy to.
    #[arg(long, short = 'p', value_name = "NAME")]
    pub project: String,
    /// The module to start, relative to DIR [default: the first of main.ts,
    /// main.js, mod.ts, index.ts, index.js, server.ts, server.js].
    #[arg(long, value_name = "PATH")]
    pub entrypoint: Option<String>,
    /// Make the new deployment the project's production deployment.
    #[arg(long)]
    pub prod: bool,
    /// An ESZIP archive to deploy, as a layer ahead of DIR's files (DIR is
    /// then deployed only when given).
    #[arg(long, value_name = "FILE")]
    pub eszip: Option<PathBuf>,
    /// Deploy only files matching this pattern (repeatable), e.g. '*.ts' or 'static/**'.
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Leave out files and folders matching this pattern (repeatable), e.g.
    /// 'node_modules' or '/dist'; `.git` is always left out.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Print the created deployment as JSON instead of its URL.
    #[arg(long)]
    pub json: bool,
    /// The folder to deploy [default: .].
    #[arg(value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// What the upload did, for the summary line.
#[derive(Debug, Default, PartialEq, Eq)]
struct UploadSummary {
    files: usize,
    uploaded_files: usize,
    uploaded_bytes: u64,
}

impl std::fmt::Display for UploadSummary {
    /// Scripts (and the e2e test) parse this line; keep its shape.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "uploaded {} of {} files ({}), {} already on the server",
            self.uploaded_files,
            self.files,
            human_bytes(self.uploaded_bytes),
            self.files - self.uploaded_files
        )
    }
}

pub async fn run(args: DeployArgs) -> Result<(), ClientError> {
    let parse = |patterns: &[String]| patterns.iter().map(|p| Glob::parse(p)).collect::<Result<Vec<_>, _>>();
    let options = WalkOptions {
        include: parse(&args.include).map_err(InputError::Pattern)?,
        exclude: parse(&args.exclude).map_err(InputError::Pattern)?,
    };
    let api = connect(&args.connection)?;
    // Fail before hashing and uploading anything.
    match api.project(&args.project).await {
        Ok(_) => {}
        Err(e) if e.code() == Some(code::NOT_FOUND) => return Err(InputError::NoProject { name: args.project }.into()),
        Err(e) => return Err(e.into()),
    }

    // With only --eszip, the current folder is not swept in unasked.
    let dir = match (&args.dir, &args.eszip) {
        (Some(dir), _) => Some(dir.clone()),
        (None, Some(_)) => None,
        (None, None) => Some(PathBuf::from(".")),
    };
    let eszip_path = args.eszip.clone();
    let walk_dir = dir.clone();
    let (files, eszip, warnings) = tokio::task::spawn_blocking(move || read_sources(walk_dir, eszip_path, &options))
        .await
        .map_err(FilesError::WalkStopped)??;
    for warning in warnings {
        eprintln!("warning: {}", sanitize(&warning));
    }
    if files.is_empty() && eszip.is_none() {
        let dir = dir.unwrap_or_else(|| PathBuf::from("."));
        return Err(FilesError::NothingToDeploy { dir }.into());
    }
    let tree: BTreeMap<String, FileRef> =
        files.iter().map(|f| (f.path.clone(), FileRef { hash: f.hash.clone(), size: f.size })).collect();
    let entrypoint = walk::choose_entrypoint(args.entrypoint.as_deref(), &tree, eszip.is_some())?;

    let git = match dir.clone() {
        Some(dir) => tokio::task::spawn_blocking(move || super::git::work_tree(&dir)).await.ok().flatten(),
        None => None,
    };
    // The API records a commit with its branch, which a detached HEAD lacks.
    let commit = match git {
        Some(WorkTree { info: GitInfo { commit, message, branch: Some(branch) }, dirty }) => {
            if dirty {
                eprintln!("note: the folder has uncommitted changes; recording commit {} anyway", short(&commit));
            }
            Some(CommitBody { commit, message, branch })
        }
        Some(WorkTree { info, .. }) => {
            eprintln!("note: HEAD is detached (no branch), so commit {} is not recorded", short(&info.commit));
            None
        }
        None => None,
    };

    let mut blobs: Vec<HashedFile> = files.clone();
    blobs.extend(eszip.clone());
    let summary = upload(&api, &blobs).await?;
    eprintln!("{summary}");

    let request = CreateDeploymentBody {
        entrypoint,
        files: tree.into(),
        eszip: eszip.map(|e| e.hash),
        permissions: None,
        git: commit,
        production: args.prod,
    };
    let deployment = create(&api, &args.project, &request, &blobs).await?;
    if deployment.status == "failed" {
        let reason = sanitize(deployment.error.as_deref().unwrap_or("no reason given")).into_owned();
        return Err(ClientError::DeployFailed { id: deployment.id, reason });
    }
    let production_url = if args.prod { production_url(&api, &args.project).await } else { None };
    print_result(&deployment, production_url.as_deref(), args.json)
}

type Sources = (Vec<HashedFile>, Option<HashedFile>, Vec<String>);

fn read_sources(dir: Option<PathBuf>, eszip: Option<PathBuf>, options: &WalkOptions) -> Result<Sources, FilesError> {
    let (mut files, mut warnings) = (Vec::new(), Vec::new());
    if let Some(dir) = &dir {
        let metadata =
            std::fs::metadata(dir).map_err(|source| FilesError::CannotDeploy { dir: dir.clone(), source })?;
        if !metadata.is_dir() {
            return Err(FilesError::NotAFolder { dir: dir.clone() });
        }
        let (walked, walk_warnings) = walk::walk(dir, options)?;
        files = walk::hash_files(walked)?;
        warnings = walk_warnings;
    }
    let eszip = match eszip {
        Some(path) => {
            let (hash, size) =
                walk::hash_file(&path).map_err(|source| FilesError::Read { path: path.clone(), source })?;
            Some(HashedFile { path: path.display().to_string(), source: path, hash, size })
        }
        None => None,
    };
    Ok((files, eszip, warnings))
}

/// Uploads what the server lacks; one upload per distinct content.
async fn upload(api: &Api, files: &[HashedFile]) -> Result<UploadSummary, ClientError> {
    let mut unique: BTreeMap<&str, &HashedFile> = BTreeMap::new();
    for file in files {
        unique.entry(&file.hash).or_insert(file);
    }
    let hashes: Vec<String> = unique.keys().map(|h| h.to_string()).collect();
    let mut missing: HashSet<String> = HashSet::new();
    let mut max_blob_bytes = u64::MAX;
    for batch in hashes.chunks(MISSING_BATCH) {
        let answer = api.missing_blobs(batch).await?;
        max_blob_bytes = max_blob_bytes.min(answer.max_blob_bytes.unwrap_or(u64::MAX));
        missing.extend(answer.missing);
    }
    // Every file, also one the server has: the deployment would be refused.
    if let Some(file) = files.iter().filter(|f| f.size > max_blob_bytes).max_by_key(|f| f.size) {
        return Err(FilesError::TooLarge { path: file.path.clone(), size_bytes: file.size, max_blob_bytes }.into());
    }
    // Only what was asked about: anything else in the answer is ignored.
    let to_upload: Vec<&HashedFile> =
        unique.iter().filter(|(hash, _)| missing.contains(**hash)).map(|(_, file)| *file).collect();
    let summary = UploadSummary {
        files: files.len(),
        uploaded_files: files.iter().filter(|f| missing.contains(&f.hash)).count(),
        uploaded_bytes: to_upload.iter().map(|f| f.size).sum(),
    };
    upload_blobs(api, &to_upload, summary.uploaded_bytes).await?;
    Ok(summary)
}

async fn upload_blobs(api: &Api, blobs: &[&HashedFile], total_bytes: u64) -> Result<(), ClientError> {
    if blobs.is_empty() {
        return Ok(());
    }
    let progress = progress_bar(total_bytes, blobs.len());
    let done = std::sync::atomic::AtomicUsize::new(0);
    let result = futures_util::stream::iter(blobs.iter().map(Ok::<_, ClientError>))
        .try_for_each_concurrent(UPLOAD_CONCURRENCY, |file| {
            let (progress, done) = (&progress, &done);
            async move {
                upload_one(api, file, progress)
                    .await
                    .map_err(|e| ClientError::Upload { path: file.path.clone(), source: Box::new(e) })?;
                let count = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                progress.set_message(format!("{count}/{} files", blobs.len()));
                Ok(())
            }
        })
        .await;
    match &result {
        Ok(()) => progress.finish_and_clear(),
        Err(_) => progress.abandon(),
    }
    result
}

/// A bar on stderr when it is a terminal; otherwise nothing is drawn and
/// the caller's summary line is the only report.
fn progress_bar(total_bytes: u64, files: usize) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "uploading {msg:>12} [{wide_bar}] {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("0/{files} files"));
    bar
}

/// Streams the file from disk: a large asset is never held in memory whole.
async fn upload_one(api: &Api, file: &HashedFile, progress: &ProgressBar) -> Result<(), ClientError> {
    let handle = tokio::fs::File::open(&file.source)
        .await
        .map_err(|source| FilesError::Open { path: file.path.clone(), source })?;
    let progress = progress.clone();
    let chunks = futures_util::stream::try_unfold(handle, move |mut handle| {
        let progress = progress.clone();
        async move {
            let mut buffer = vec![0u8; UPLOAD_CHUNK_BYTES];
            let n = handle.read(&mut buffer).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            buffer.truncate(n);
            progress.inc(n as u64);
            Ok(Some((buffer, handle)))
        }
    });
    match api.put_blob(&file.hash, file.size, reqwest::Body::wrap_stream(chunks)).await {
        Ok(()) => Ok(()),
        Err(CallError::Api(e)) if e.is(code::INVALID_FIELD) && e.body.field.as_deref() == Some("hash") => {
            Err(FilesError::Changed { path: file.path.clone() }.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Creates the deployment; if the server lost blobs in between (a race
/// with its cleanup), uploads those once more and retries once.
async fn create(
    api: &Api,
    project: &str,
    request: &CreateDeploymentBody,
    blobs: &[HashedFile],
) -> Result<Deployment, ClientError> {
    match api.create_deployment(project, request).await {
        Err(CallError::Api(e)) if e.is(code::MISSING_BLOBS) && !e.body.missing().is_empty() => {
            let known: HashMap<&str, &HashedFile> = blobs.iter().map(|b| (b.hash.as_str(), b)).collect();
            let again: Option<Vec<&HashedFile>> =
                e.body.missing().iter().map(|h| known.get(h.as_str()).copied()).collect();
            let Some(again) = again else { return Err(CallError::Api(e).into()) };
            let mut seen = HashSet::new();
            let again: Vec<&HashedFile> = again.into_iter().filter(|b| seen.insert(&b.hash)).collect();
            eprintln!("the server lost {} blobs in the meantime; uploading them again", again.len());
            upload_blobs(api, &again, again.iter().map(|b| b.size).sum()).await?;
            Ok(api.create_deployment(project, request).await?)
        }
        other => Ok(other?),
    }
}

/// A commit id as git abbreviates it.
fn short(commit: &str) -> &str {
    commit.get(..7).unwrap_or(commit)
}

async fn production_url(api: &Api, project: &str) -> Option<String> {
    match api.project(project).await {
        Ok(project) => project.production_url,
        Err(e) => {
            eprintln!("warning: deployed, but cannot read the production URL: {e}");
            None
        }
    }
}

fn print_result(deployment: &Deployment, production_url: Option<&str>, json: bool) -> Result<(), ClientError> {
    if json {
        let mut value = serde_json::to_value(deployment)?;
        if let (Some(url), Some(object)) = (production_url, value.as_object_mut()) {
            object.insert("production_url".to_string(), url.into());
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let production = if deployment.production { ", production" } else { "" };
    let files = if deployment.files == 1 { "1 file".to_string() } else { format!("{} files", deployment.files) };
    eprintln!(
        "deployment {} of {} is {}{production} ({files}, {})",
        deployment.id,
        deployment.project,
        deployment.status,
        human_bytes(deployment.size_bytes)
    );
    // stdout: the production URL (with --prod), then the deployment URL as
    // the last line, which scripts read.
    if let Some(url) = production_url {
        println!("{}", sanitize(url));
    }
    println!("{}", sanitize(&deployment.url));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_line_keeps_its_shape() {
        let summary = UploadSummary { files: 120, uploaded_files: 3, uploaded_bytes: 2_100_000 };
        assert_eq!(summary.to_string(), "uploaded 3 of 120 files (2.1 MB), 117 already on the server");
    }
}
