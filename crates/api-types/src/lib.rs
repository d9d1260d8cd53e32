//! The control plane's `/api/v1` wire shapes (`docs/control-plane-api.md`):
//! what each route answers, as plain serde types. The server builds them from
//! its store rows and serialises them; the client deserialises the very same
//! types, so a field renamed on one side is a compile error on the other, and
//! a field missing from an answer is a decode error naming it, not a silent
//! `""`. This crate owns the shapes only: it must not do I/O, nor know HTTP
//! frameworks, databases or clients (its dependencies are serde, and
//! serde_json for the one field whose shape another crate checks:
//! [`CreateDeploymentBody::permissions`]).
//!
//! Every field the server always sends is required when decoding, `Option`
//! fields included (they may be `null`, not absent; see [`present`]). Fields
//! the types do not know are ignored, so a newer server that adds one does not
//! break an older CLI. Field order is the order on the wire.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Decodes a field as its type. On an `Option` field this makes the field
/// required: serde's derive reads an absent `Option` as `None`, which would
/// hide a renamed field; with this, `null` is `None` and absence an error.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<T, D::Error> {
    T::deserialize(deserializer)
}

mod access;
pub use access::{AuditEntry, CreatedToken, NewTokenBody, Token};

/// `GET /whoami`: the token the call was made with, and what it may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Whoami {
    pub token_name: String,
    pub token_id: String,
    /// `admin`, `project:NAME:deploy` or `project:NAME:read`.
    pub scope: String,
    /// The project a project token is for (its current name); `null` for admin.
    #[serde(deserialize_with = "present")]
    pub project: Option<String>,
}

/// A project, as every `/projects` route answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    pub id: String,
    pub name: String,
    /// RFC 3339, UTC, milliseconds.
    pub created_at: String,
    pub updated_at: String,
    #[serde(deserialize_with = "present")]
    pub production_deployment_id: Option<String>,
    /// Set exactly when there is a production deployment.
    #[serde(deserialize_with = "present")]
    pub production_url: Option<String>,
    #[serde(deserialize_with = "present")]
    pub git: Option<ProjectGit>,
}

/// A project's repository settings (the webhook secret is never shown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectGit {
    pub repository: String,
    pub branch: String,
    pub entrypoint: String,
}

/// A deployment, as `/projects/{name}/deployments` and `/deployments/{id}`
/// answer it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: String,
    /// The project's name.
    pub project: String,
    pub created_at: String,
    /// `building`, `ready` or `failed` (a string, so a status a newer server
    /// adds still decodes).
    pub status: String,
    #[serde(deserialize_with = "present")]
    pub error: Option<String>,
    /// A module specifier (`file:///src/main.ts`).
    pub entrypoint: String,
    /// This deployment's own URL (`<project>-<id>.<base domain>`).
    pub url: String,
    pub production: bool,
    #[serde(deserialize_with = "present")]
    pub git: Option<DeploymentGit>,
    /// The names of the env vars copied into it (values are never shown).
    pub env_names: Vec<String>,
    pub files: u64,
    pub size_bytes: u64,
}

/// The commit a deployment was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentGit {
    pub commit: String,
    /// Its first line.
    pub message: String,
    pub branch: String,
}

/// `GET /deployments/{id}/build`: the build step's outcome and log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    /// The deployment's id.
    pub id: String,
    pub status: String,
    #[serde(deserialize_with = "present")]
    pub error: Option<String>,
    /// What the build printed; `null` when no build ran.
    #[serde(deserialize_with = "present")]
    pub log: Option<String>,
    /// `name@version` of each npm package the build installed, sorted.
    pub npm_packages: Vec<String>,
}

/// An env var of a project, as `GET`/`PUT /projects/{name}/env…` answer it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    pub name: String,
    pub updated_at: String,
}

/// A custom domain, as every `/domains` route answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Domain {
    pub domain: String,
    /// The project it is attached to, if any.
    #[serde(deserialize_with = "present")]
    pub project: Option<String>,
    pub created_at: String,
    pub verified: bool,
    #[serde(deserialize_with = "present")]
    pub verified_at: Option<String>,
    pub verification: Verification,
    #[serde(deserialize_with = "present")]
    pub certificate: Option<Certificate>,
    /// Automatic certificates (ACME): the last order's outcome and the next
    /// attempt; `null` when none was ever ordered.
    #[serde(deserialize_with = "present")]
    pub acme: Option<AcmeStatus>,
}

/// How to prove a domain is yours: a DNS TXT record or an HTTP token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub txt_name: String,
    pub txt_value: String,
    pub http_url: String,
    pub http_body: String,
}

/// What may be shown of a domain's certificate (never its PEMs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub not_after: String,
    pub names: Vec<String>,
    /// `manual` (uploaded; it always wins) or `acme` (ordered automatically).
    pub source: String,
}

/// A domain's automatic certificate orders (ACME).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeStatus {
    /// `valid` (the last order gave the certificate), `failed`, or
    /// `pending` (the first order is under way).
    pub status: String,
    /// Why the last order failed: the ACME server's error text.
    #[serde(deserialize_with = "present")]
    pub error: Option<String>,
    /// Failed orders in a row (0 after a success).
    pub failures: i64,
    /// When the next order is due: the renewal, or the retry after a
    /// failure (backing off).
    pub next_attempt_at: String,
    #[serde(deserialize_with = "present")]
    pub last_attempt_at: Option<String>,
}

/// One log entry (`GET …/logs`; with `follow=true`, one NDJSON line each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub id: i64,
    pub deployment_id: String,
    pub timestamp: String,
    /// `console`, `boot`, `dropped`, … (open-ended).
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(deserialize_with = "present")]
    pub level: Option<String>,
    pub message: String,
    #[serde(deserialize_with = "present")]
    pub request_id: Option<String>,
}

/// `POST /blobs/missing`: the asked-for hashes the server lacks, and the
/// largest blob it takes (`--max-blob-mb`), so a client can refuse an
/// oversized file by name before uploading anything (absent from servers
/// older than the field: a newer CLI still talks to them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingBlobs {
    pub missing: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_blob_bytes: Option<u64>,
}

/// `PUT /blobs/{hash}`: the blob as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBlob {
    pub hash: String,
    pub size: u64,
}

/// One usage record (`GET /projects/{name}/usage`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub deployment_id: String,
    pub interval_start: String,
    pub interval_end: String,
    pub requests: i64,
    pub errors: i64,
    pub cpu_ms: i64,
    pub wall_ms: i64,
    pub ingress_bytes: i64,
    pub egress_bytes: i64,
    pub peak_memory_bytes: i64,
    pub fetch_requests: i64,
    pub fetch_sent_bytes: i64,
    pub fetch_received_bytes: i64,
    /// Requests by the class of their status (the runner's own answers for
    /// the deployment included); zeros from a runner that does not report them.
    pub status_1xx: i64,
    pub status_2xx: i64,
    pub status_3xx: i64,
    pub status_4xx: i64,
    pub status_5xx: i64,
    /// Requests by time to the response head, one count per bucket of
    /// [`Analytics::latency_le_ms`] and a last one past it (`+Inf`).
    pub latency_counts: Vec<i64>,
}

/// `GET /projects/{name}/analytics`: usage summed per step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Analytics {
    pub step_s: i64,
    /// The latency histogram's bucket bounds (ms, inclusive); each point's
    /// `latency_counts` has one more entry, for the requests past the last.
    pub latency_le_ms: Vec<i64>,
    pub points: Vec<AnalyticsPoint>,
}

/// One step of [`Analytics`], starting at `t` (zeros when nothing ran).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnalyticsPoint {
    pub t: String,
    pub requests: i64,
    pub errors: i64,
    pub cpu_ms: i64,
    pub wall_ms: i64,
    pub peak_memory_bytes: i64,
    pub ingress_bytes: i64,
    pub egress_bytes: i64,
    pub status_1xx: i64,
    pub status_2xx: i64,
    pub status_3xx: i64,
    pub status_4xx: i64,
    pub status_5xx: i64,
    /// The median and 99th percentile of the time to the response head,
    /// from the step's merged histogram: the upper bound of the bucket the
    /// quantile falls in (one of `latency_le_ms`; the last bound when it
    /// falls past it, meaning that or more); `null` when nothing was timed.
    #[serde(deserialize_with = "present")]
    pub latency_p50_ms: Option<i64>,
    #[serde(deserialize_with = "present")]
    pub latency_p99_ms: Option<i64>,
    /// The step's merged histogram (see [`Analytics::latency_le_ms`]).
    pub latency_counts: Vec<i64>,
}

/// One file of a deployment (`GET /deployments/{id}/files`), in path order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentFile {
    /// Relative to the deployment's root (`main.ts`, `static/a.css`).
    pub path: String,
    pub size_bytes: u64,
    /// Its content's SHA-256 (hex): the blob it is stored as; empty for a
    /// symlink.
    pub sha256: String,
    /// A symlink a build made (npm's `node_modules` layout): where it points,
    /// relative; `null` for a file.
    #[serde(deserialize_with = "present")]
    pub symlink_target: Option<String>,
}

/// Every failed call's answer: `{"error": {…}}`, with the status of its kind
/// (`docs/control-plane-api.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    pub error: ApiErrorBody,
}

/// The `error` object of a failed call. `field` and `missing` are sent only
/// when they apply, so they are the two fields that may be absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// One of [`code`] (a string, so a code a newer server adds still
    /// decodes).
    pub code: String,
    pub message: String,
    /// The one input field at fault, as a JSON path (`files.main.ts.hash`)
    /// or a query parameter's name; the message then starts with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// With [`code::MISSING_BLOBS`]: the hashes the server lacks (sent even
    /// when empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<Vec<String>>,
}

impl ApiErrorBody {
    /// An error with neither `field` nor `missing`.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ApiErrorBody { code: code.to_owned(), message: message.into(), field: None, missing: None }
    }

    /// The hashes of a [`code::MISSING_BLOBS`] error; empty otherwise.
    pub fn missing(&self) -> &[String] {
        self.missing.as_deref().unwrap_or_default()
    }
}

/// The error codes the server sends, one constant each, so the server's
/// renderer and the client's checks cannot spell one differently.
pub mod code {
    /// 400: the body is not JSON, or not the expected shape.
    pub const INVALID_REQUEST: &str = "INVALID_REQUEST";
    /// 400: a field breaks a rule (`field` names it).
    pub const INVALID_FIELD: &str = "INVALID_FIELD";
    /// 400: a deployment names blobs the server lacks (`missing`).
    pub const MISSING_BLOBS: &str = "MISSING_BLOBS";
    /// 401: a missing or unknown token, or an unsigned webhook delivery.
    pub const UNAUTHORIZED: &str = "UNAUTHORIZED";
    /// 401: the token is past its expiry.
    pub const TOKEN_EXPIRED: &str = "TOKEN_EXPIRED";
    /// 401: the token was revoked.
    pub const TOKEN_REVOKED: &str = "TOKEN_REVOKED";
    /// 403: the token's scope does not cover the route (the message names
    /// the scope needed).
    pub const FORBIDDEN: &str = "FORBIDDEN";
    pub const NOT_FOUND: &str = "NOT_FOUND";
    pub const METHOD_NOT_ALLOWED: &str = "METHOD_NOT_ALLOWED";
    /// 408: the git webhook's body did not arrive in time.
    pub const REQUEST_TIMEOUT: &str = "REQUEST_TIMEOUT";
    pub const CONFLICT: &str = "CONFLICT";
    pub const PAYLOAD_TOO_LARGE: &str = "PAYLOAD_TOO_LARGE";
    /// 500: logged in full; the message is generic.
    pub const INTERNAL: &str = "INTERNAL";
    /// 503: the git webhook is reading its bound of bodies already.
    pub const CAPACITY: &str = "CAPACITY";
    /// 507: the database or the blob store's disk is full.
    pub const STORAGE_FULL: &str = "STORAGE_FULL";
}

#[cfg(test)]
mod tests;

// ------------------------------------------------------------ request bodies
//
// What the client sends and the server reads: the server refuses a field it
// does not know (a typo is an error, not a silent no-op), so a field renamed
// on one side is a compile error on the other rather than a 400 at run time.

/// `POST /projects` (create) and `PATCH /projects/{name}` (rename).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectNameBody {
    pub name: String,
}

/// `POST /blobs/missing`: which of these the server lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobHashesBody {
    pub hashes: Vec<String>,
}

/// `POST /projects/{name}/promote` and `…/rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentRefBody {
    pub deployment_id: String,
}

/// `PUT /projects/{name}/env/{var}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvValueBody {
    pub value: String,
}

/// `POST /domains`: a domain, attached to a project or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDomainBody {
    pub domain: String,
    #[serde(default)]
    pub project: Option<String>,
}

/// `PUT /domains/{domain}/certificate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateBody {
    pub cert_pem: String,
    pub key_pem: String,
}

/// `POST /projects/{name}/deployments`: a deployment made of uploaded blobs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDeploymentBody {
    /// A code file's path in `files` (`./` allowed) or an ESZIP module's
    /// specifier.
    pub entrypoint: String,
    #[serde(default)]
    pub files: FileManifest,
    /// The sha256 of an uploaded ESZIP blob, a layer ahead of the files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eszip: Option<String>,
    /// `{"net": …}` as the isolate config takes it; the server checks it
    /// with `isocloud_protocol::NetPermission`, so it stays JSON here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<CommitBody>,
    /// Promote it in the same transaction (when its build succeeds).
    #[serde(default)]
    pub production: bool,
}

/// One file of a deployment: the blob it is and that blob's size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    pub hash: String,
    pub size: u64,
}

/// The commit a deployment is made from (the answer's [`DeploymentGit`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitBody {
    pub commit: String,
    /// The server keeps its first line.
    #[serde(default)]
    pub message: String,
    pub branch: String,
}

/// A deployment's `files`: path → blob, in path order (a stable body).
/// JSON lets an object name a key twice, and a map would keep one of them
/// silently; decoding keeps the first path named twice so the server can
/// refuse it, naming it ([`FileManifest::named_twice`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileManifest {
    files: BTreeMap<String, FileRef>,
    named_twice: Option<String>,
}

impl FileManifest {
    /// The first path the decoded object named more than once.
    pub fn named_twice(&self) -> Option<&str> {
        self.named_twice.as_deref()
    }

    pub fn into_inner(self) -> BTreeMap<String, FileRef> {
        self.files
    }
}

impl From<BTreeMap<String, FileRef>> for FileManifest {
    fn from(files: BTreeMap<String, FileRef>) -> Self {
        FileManifest { files, named_twice: None }
    }
}

impl FromIterator<(String, FileRef)> for FileManifest {
    fn from_iter<I: IntoIterator<Item = (String, FileRef)>>(iter: I) -> Self {
        BTreeMap::from_iter(iter).into()
    }
}

impl std::ops::Deref for FileManifest {
    type Target = BTreeMap<String, FileRef>;
    fn deref(&self) -> &Self::Target {
        &self.files
    }
}

impl Serialize for FileManifest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.files.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for FileManifest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = FileManifest;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of path → {\"hash\", \"size\"}")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<FileManifest, A::Error> {
                let mut manifest = FileManifest::default();
                while let Some((path, file)) = map.next_entry::<String, FileRef>()? {
                    match manifest.files.entry(path) {
                        std::collections::btree_map::Entry::Occupied(taken) => {
                            manifest.named_twice.get_or_insert_with(|| taken.key().clone());
                        }
                        std::collections::btree_map::Entry::Vacant(free) => {
                            free.insert(file);
                        }
                    }
                }
                Ok(manifest)
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// `PATCH /domains/{domain}`: attach the domain to a project, or detach it
/// with `null`. The field is required: `{}` is not a detach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachDomainBody {
    #[serde(deserialize_with = "present")]
    pub project: Option<String>,
}
