//! Why a client command failed, one enum per concern under [`ClientError`].
//! Each message is what the user reads after `error: ` and names the fix
//! where there is one. A cause (an `io::Error`, a decode error) is the
//! error's `source`, not part of its message: `output::render_error`
//! appends the chain as `: <cause>`, once.

use std::path::PathBuf;

use isocloud_protocol::DEFAULT_ENTRYPOINTS;

use super::api::CallError;
use super::credentials::CredentialsError;
use super::walk::WalkError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A call to the control plane: its error answer, or the transport.
    #[error(transparent)]
    Call(#[from] CallError),
    /// Which control plane and token: flags, the credentials file.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// Local files: the folder to deploy, an ESZIP, PEM and token files.
    #[error(transparent)]
    Files(#[from] FilesError),
    /// Arguments that do not go together, or say too little.
    #[error(transparent)]
    Input(#[from] InputError),
    /// stdin: questions asked on the terminal, values piped in.
    #[error(transparent)]
    Prompt(#[from] PromptError),
    /// One blob of a deploy; the cause says why.
    #[error("cannot upload {path}")]
    Upload { path: String, source: Box<ClientError> },
    /// The deployment was created, but its build failed.
    #[error("deployment {id} failed: {reason}\n(its whole build log: isocloud logs --build {id})")]
    DeployFailed { id: String, reason: String },
    /// `logs --build` of a failed build (its log is already printed).
    #[error("deployment {id} failed: {reason}")]
    BuildFailed { id: String, reason: String },
    #[error("{domain} is not verified yet")]
    NotVerified { domain: String },
    #[error("the log stream sent a line over {} MiB", .max_bytes >> 20)]
    LogLineTooLong { max_bytes: usize },
    /// An answer printed with `--json`.
    #[error(transparent)]
    Print(#[from] serde_json::Error),
}

impl ClientError {
    /// What to try next, when the failure says.
    pub fn hint(&self) -> Option<String> {
        match self {
            ClientError::Call(e) => e.hint(),
            ClientError::Upload { source, .. } => source.hint(),
            _ => None,
        }
    }
}

impl From<WalkError> for ClientError {
    fn from(error: WalkError) -> Self {
        ClientError::Files(error.into())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error(transparent)]
    Walk(#[from] WalkError),
    /// The walk's blocking task panicked or was cancelled.
    #[error("the file walk stopped")]
    WalkStopped(#[source] tokio::task::JoinError),
    #[error("cannot deploy {}", .dir.display())]
    CannotDeploy { dir: PathBuf, source: std::io::Error },
    #[error("{} is not a folder", .dir.display())]
    NotAFolder { dir: PathBuf },
    #[error("nothing to deploy: {} has no files (after --include/--exclude)", .dir.display())]
    NothingToDeploy { dir: PathBuf },
    #[error("cannot read {}", .path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot open {path}")]
    Open { path: String, source: std::io::Error },
    /// The server hashed other bytes than the walk did.
    #[error("{path} changed while deploying; run the deploy again")]
    Changed { path: String },
    /// A file over the server's `--max-blob-mb`, refused before any upload.
    #[error(
        "{path} is {} MiB, over the server's bound of {} MiB per file (its --max-blob-mb); \
         leave it out with `--exclude '{path}'`, or ask the operator to raise the bound",
        mib(*size_bytes), mib(*max_blob_bytes)
    )]
    TooLarge { path: String, size_bytes: u64, max_blob_bytes: u64 },
    #[error("{} is not PEM (no -----BEGIN line)", .path.display())]
    NotPem { path: PathBuf },
    #[error("cannot read the token from {}", .path.display())]
    ReadToken { path: PathBuf, source: std::io::Error },
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// An `--include`/`--exclude` pattern; the text says what is wrong.
    #[error("{0}")]
    Pattern(String),
    /// A `--since` time; the text says what is wrong.
    #[error("{0}")]
    Since(String),
    #[error("`{0}` is not a step between 10s and 1d (30s, 5m, 1h)")]
    Step(String),
    #[error("there is no project `{name}`: create it with `isocloud projects create {name}`")]
    NoProject { name: String },
    #[error("the entrypoint `{given}` is not among the files to deploy")]
    EntrypointNotInFiles { given: String },
    #[error("pass --entrypoint with --eszip: the module in the ESZIP to start (e.g. file:///src/main.ts)")]
    EntrypointForEszip,
    #[error("no entrypoint: none of {} exists; pass --entrypoint PATH", DEFAULT_ENTRYPOINTS.join(", "))]
    NoEntrypoint,
    #[error("give --cert FILE and --key FILE, or --remove")]
    CertificateFiles,
    #[error("give the value once: `NAME VALUE`, `NAME=VALUE` or `NAME --stdin`")]
    ValueTwice,
    #[error("--stdin and a VALUE exclude each other")]
    StdinAndValue,
    #[error("no value for {name}: use `NAME VALUE`, `NAME=VALUE` or `NAME --stdin`")]
    NoValue { name: String },
    #[error("which control plane? Pass --url URL (or set ISOCLOUD_URL)")]
    NoUrl,
    #[error("no token: pass --token TOKEN or --token-file PATH, or pipe it on stdin")]
    NoToken,
    #[error("--project NAME is required")]
    ProjectRequired,
}

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// `what`: "the answer", "the token", "the value".
    #[error("cannot read {what} from stdin")]
    Read { what: &'static str, source: std::io::Error },
    #[error("the value on stdin is not UTF-8")]
    NotUtf8(#[source] std::string::FromUtf8Error),
    #[error("refusing to delete project `{name}` without --yes (stdin is not a terminal to ask on)")]
    NoTerminal { name: String },
    #[error("not deleted: the name typed was not `{name}`")]
    NotConfirmed { name: String },
}

/// Bytes in MiB with one decimal, as the server's `--max-blob-mb` counts.
fn mib(bytes: u64) -> String {
    let value = bytes as f64 / (1024.0 * 1024.0);
    if value.fract() == 0.0 { format!("{value:.0}") } else { format!("{value:.1}") }
}
