//! Blob garbage collection: a blob no deployment references (no file row
//! names its hash, no deployment has it as its ESZIP) is deleted once its
//! grace period has passed since it was stored or last confirmed in use.
//!
//! Safe with several control-plane nodes on one store, each running it:
//! - a blob uploaded for a deployment still being created is unreferenced
//!   until that deployment is committed; its upload (or, when it was there
//!   already, the `has`/`size` that told the client so, which restarts the
//!   grace period once half of it has passed) keeps it for at least half the
//!   grace period, a day by default, far beyond any build;
//! - the references are read for a batch of candidates right before they
//!   are deleted, and each candidate's time is read again right before its
//!   delete: a blob confirmed since the listing is kept. What is left is the
//!   few milliseconds between that last read and the delete, during which a
//!   blob that is both past its grace and unreferenced would have to be
//!   confirmed for a new deployment;
//! - two nodes collecting at once delete the same blobs: deletes of what is
//!   gone are no-ops.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;

use super::{BlobEntry, BlobError, BlobStore};
use crate::store::{Arg, Sql, Store, StoreError, col};

/// Candidates whose references are read at once: one query (a scan of the
/// file rows, which have no index by hash alone) per batch, well under
/// SQLite's and PostgreSQL's bounds on bound parameters.
const BATCH: usize = 500;

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlobGcReport {
    /// Blobs listed.
    pub scanned: u64,
    /// Kept: inside their grace period.
    pub kept_recent: u64,
    /// Kept: past their grace period, but a deployment references them.
    pub kept_referenced: u64,
    pub deleted: u64,
    pub deleted_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BlobGcError {
    #[error("blob store: {0}")]
    Blobs(#[from] BlobError),
    #[error("database: {0}")]
    Store(#[from] StoreError),
}

/// One pass at `now`: deletes every blob unreferenced and past `grace`.
pub(crate) async fn collect(
    blobs: &dyn BlobStore,
    store: &Store,
    grace: Duration,
    now: SystemTime,
) -> Result<BlobGcReport, BlobGcError> {
    let cutoff = now.checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH);
    let mut report = BlobGcReport::default();
    let mut batch: Vec<BlobEntry> = Vec::new();
    let mut listing = blobs.list();
    while let Some(entry) = listing.next().await {
        let entry = entry?;
        report.scanned += 1;
        if entry.used_at >= cutoff {
            report.kept_recent += 1;
            continue;
        }
        batch.push(entry);
        if batch.len() == BATCH {
            sweep(blobs, store, cutoff, &mut batch, &mut report).await?;
        }
    }
    sweep(blobs, store, cutoff, &mut batch, &mut report).await?;
    Ok(report)
}

/// Deletes the candidates of `batch` that no deployment references and that
/// are still past the cutoff, read again right before each delete.
async fn sweep(
    blobs: &dyn BlobStore,
    store: &Store,
    cutoff: SystemTime,
    batch: &mut Vec<BlobEntry>,
    report: &mut BlobGcReport,
) -> Result<(), BlobGcError> {
    if batch.is_empty() {
        return Ok(());
    }
    let hashes: Vec<&str> = batch.iter().map(|e| e.hash.as_str()).collect();
    let referenced = referenced_among(store, &hashes).await?;
    for candidate in batch.drain(..) {
        if referenced.contains(&candidate.hash) {
            report.kept_referenced += 1;
            continue;
        }
        match blobs.entry(&candidate.hash).await? {
            Some(now) if now.used_at < cutoff => {
                blobs.delete(&candidate.hash).await?;
                report.deleted += 1;
                report.deleted_bytes += now.size_bytes;
                tracing::debug!(target: "isocloud::controlplane", hash = candidate.hash, "collected an unreferenced blob");
            }
            // Stored again or confirmed since it was listed.
            Some(_) => report.kept_recent += 1,
            // Another node collected it.
            None => {}
        }
    }
    Ok(())
}

/// Which of `hashes` a deployment references (a file or its ESZIP).
async fn referenced_among(store: &Store, hashes: &[&str]) -> Result<HashSet<String>, StoreError> {
    let list = |sql: &mut Sql| {
        for (i, hash) in hashes.iter().enumerate() {
            sql.push(if i == 0 { "" } else { ", " }).bind(Arg::Text((*hash).to_owned()));
        }
    };
    let mut sql = Sql::new("SELECT sha256 AS hash FROM deployment_files WHERE sha256 IN (");
    list(&mut sql);
    sql.push(") UNION SELECT eszip_sha256 AS hash FROM deployments WHERE eszip_sha256 IN (");
    list(&mut sql);
    sql.push(")");
    let mut conn = store.read().await?;
    let rows = sql.query().fetch_all(&mut *conn).await?;
    rows.iter().map(|row| col::<String>(row, "hash")).collect()
}
