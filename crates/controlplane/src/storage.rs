//! What the control plane's storage takes and what is left (#21 row 10),
//! for `/metrics`, and the operator's log line when a write finds the disk
//! full. Measured in the background (a blob store walk is not free), read
//! from atomics.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;

use crate::ControlPlane;

/// How often the figures are measured.
pub(crate) const REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// Below this much free space on the data dir's disk, a warning is logged
/// (once, and once more when there is space again): a few minutes of
/// uploads at the blob bound, before writes start failing.
const LOW_FREE_BYTES: u64 = 256 * 1024 * 1024;

/// The storage figures, as last measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageFigures {
    /// The database: SQLite's files, or PostgreSQL's `pg_database_size`.
    pub database_bytes: u64,
    /// The blob store's files.
    pub blob_bytes: u64,
    /// Free bytes on the data dir's file system (`None`: unknown).
    pub data_disk_free_bytes: Option<u64>,
    /// Log lines dropped over a project's rate bound, and removed
    /// oldest-first for its total bound, by this process.
    pub log_lines_dropped: u64,
    pub log_lines_evicted: u64,
    /// API writes answered 507 by this process.
    pub storage_full_errors: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Gauges {
    database_bytes: AtomicU64,
    blob_bytes: AtomicU64,
    /// `u64::MAX`: unknown.
    free_bytes: AtomicU64,
    storage_full_errors: AtomicU64,
    low_on_space: std::sync::atomic::AtomicBool,
}

impl Gauges {
    pub(crate) fn figures(&self) -> StorageFigures {
        let free = self.free_bytes.load(Ordering::Relaxed);
        StorageFigures {
            database_bytes: self.database_bytes.load(Ordering::Relaxed),
            blob_bytes: self.blob_bytes.load(Ordering::Relaxed),
            data_disk_free_bytes: (free != u64::MAX).then_some(free),
            log_lines_dropped: crate::store::activity::LOG_LINES_DROPPED.load(Ordering::Relaxed),
            log_lines_evicted: crate::store::activity::LOG_LINES_EVICTED.load(Ordering::Relaxed),
            storage_full_errors: self.storage_full_errors.load(Ordering::Relaxed),
        }
    }
}

/// Bytes of the files below `dir` (symlinks not followed).
fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => total += entry.metadata().map_or(0, |m| m.len()),
                _ => {}
            }
        }
    }
    total
}

impl ControlPlane {
    /// The storage figures as last measured (every [`REFRESH_INTERVAL`]).
    pub fn storage(&self) -> StorageFigures {
        self.storage.figures()
    }

    /// Measures the storage figures now (the background does it every
    /// [`REFRESH_INTERVAL`]).
    pub async fn measure_storage(&self) {
        match self.store.size_bytes().await {
            Ok(bytes) => self.storage.database_bytes.store(bytes, Ordering::Relaxed),
            Err(e) => tracing::warn!(target: "isocloud::controlplane", error = %e, "measuring the database failed"),
        }
        let data_dir = self.options.data_dir.clone();
        let measured = tokio::task::spawn_blocking(move || {
            (tree_bytes(&data_dir.join("blobs")), crate::private::free_bytes(&data_dir))
        })
        .await;
        if let Ok((blob_bytes, free)) = measured {
            self.storage.blob_bytes.store(blob_bytes, Ordering::Relaxed);
            self.storage.free_bytes.store(free.unwrap_or(u64::MAX), Ordering::Relaxed);
            let Some(free) = free else { return };
            let low = free < LOW_FREE_BYTES;
            if self.storage.low_on_space.swap(low, Ordering::Relaxed) != low {
                let data_dir = self.options.data_dir.display().to_string();
                if low {
                    tracing::warn!(target: "isocloud::controlplane", data_dir, data_disk_free_bytes = free,
                        "the data dir's disk is nearly full: writes will be refused with 507 STORAGE_FULL");
                } else {
                    tracing::info!(target: "isocloud::controlplane", data_dir, data_disk_free_bytes = free,
                        "the data dir's disk has space again");
                }
            }
        }
    }
}

/// A layer over the API: a write answered 507 is logged with the data dir
/// and the free space on its disk, once per request, so the operator reads
/// in one line what is full and where.
pub(crate) async fn log_storage_full(State(cp): State<Arc<ControlPlane>>, request: Request, next: Next) -> Response {
    let route = format!("{} {}", request.method(), request.uri().path());
    let response = next.run(request).await;
    if response.status() == StatusCode::INSUFFICIENT_STORAGE {
        cp.storage.storage_full_errors.fetch_add(1, Ordering::Relaxed);
        let data_dir = &cp.options.data_dir;
        let free = crate::private::free_bytes(data_dir);
        let database =
            if cp.options.database_url.is_some() { "postgres (its own disk)" } else { "sqlite in the data dir" };
        tracing::error!(
            target: "isocloud::controlplane",
            route,
            data_dir = %data_dir.display(),
            data_disk_free_bytes = free.map_or_else(|| "unknown".to_owned(), |b| b.to_string()),
            database,
            "storage full: a write was refused (507 STORAGE_FULL); free space on the data dir's disk (or the database's)"
        );
    }
    response
}
