//! Content-addressed blob storage: file contents, ESZIP archives and code
//! files are stored once by SHA-256 and shared by every deployment. The
//! database never holds blob bytes; a deployment row names hashes.
//!
//! [`BlobStore`] is the seam for the back ends: [`DiskBlobStore`] keeps
//! `<root>/ab/cdef…` files, written to a temp file, verified, fsynced and
//! renamed into place, so a reader never sees a partial blob;
//! [`S3BlobStore`] keeps the same keys in an S3-compatible bucket (`s3`).
//! A blob that no deployment references is collected after a grace period
//! (`gc`); confirming a blob is there (`has`, `size`, a put of a blob
//! already stored) restarts its grace period once half of it has passed, so
//! a deployment being created never loses a blob it was told is stored.

mod gc;
mod s3;
#[doc(hidden)]
pub mod test_s3;

use std::io::ErrorKind;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::validate;

pub(crate) use gc::collect;
pub use gc::{BlobGcError, BlobGcReport};
pub use s3::{S3BlobStore, S3Config};

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob is larger than {limit_bytes} bytes")]
    TooLarge { limit_bytes: u64 },
    #[error("blob's SHA-256 is {actual}, expected {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("not a blob hash: {0}")]
    BadHash(String),
    #[error("reading the upload failed: {0}")]
    Body(String),
    #[error("blob store i/o at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl BlobError {
    /// Whether a write failed for want of space (`ENOSPC`, `EDQUOT`).
    pub fn is_storage_full(&self) -> bool {
        matches!(self, BlobError::Io { source, .. } if crate::store::is_io_storage_full(source))
    }
}

/// What [`BlobStore::put_stream`] stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutOutcome {
    pub size_bytes: u64,
    /// `false` when the blob was already there.
    pub created: bool,
}

/// A byte stream to store (an HTTP body, a file from a git tree).
pub type ByteStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// A stored blob as garbage collection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobEntry {
    pub hash: String,
    pub size_bytes: u64,
    /// When it was stored, or last confirmed in use: its grace period
    /// runs from here.
    pub used_at: SystemTime,
}

/// A confirmed blob's grace period starts again once this fraction of it
/// has passed (a deployment created from it then has at least the other
/// half to be committed, which bounds every build's timeout by far).
pub const REFRESH_FRACTION: u32 = 2;

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Stores the bytes of `body` as `hash`, refusing them when they are more
    /// than `limit_bytes` or do not hash to `hash`. Nothing is stored then.
    async fn put_stream(&self, hash: &str, body: ByteStream, limit_bytes: u64) -> Result<PutOutcome, BlobError>;

    /// The blob's bytes, `None` when it is not stored.
    async fn get(&self, hash: &str) -> Result<Option<Bytes>, BlobError>;

    /// The blob's size, `None` when it is not stored.
    async fn size(&self, hash: &str) -> Result<Option<u64>, BlobError>;

    /// Stores bytes already in memory under their own hash, which it returns.
    async fn put(&self, data: Bytes) -> Result<String, BlobError> {
        let hash = hex::encode(Sha256::digest(&data));
        let size = data.len() as u64;
        let stream: ByteStream = futures_util::stream::once(async move { Ok(data) }).boxed();
        self.put_stream(&hash, stream, size).await?;
        Ok(hash)
    }

    async fn has(&self, hash: &str) -> Result<bool, BlobError> {
        Ok(self.size(hash).await?.is_some())
    }

    /// Every stored blob, in no particular order (for garbage collection).
    fn list(&self) -> BoxStream<'_, Result<BlobEntry, BlobError>>;

    /// One blob as [`BlobStore::list`] shows it, `None` when it is not
    /// stored; unlike `size`, it never restarts the grace period.
    async fn entry(&self, hash: &str) -> Result<Option<BlobEntry>, BlobError>;

    /// Removes the blob (nothing when it is not stored).
    async fn delete(&self, hash: &str) -> Result<(), BlobError>;

    /// Where the blobs are, for logs (`s3://bucket/prefix`, a directory).
    fn describe(&self) -> String;
}

/// Blobs as files under one directory.
pub struct DiskBlobStore {
    root: PathBuf,
    /// A confirmed blob older than this gets its mtime set to now.
    refresh_after: Duration,
}

impl DiskBlobStore {
    /// Opens (creating) the store at `root`, removing temp files a crash left.
    pub fn open(root: PathBuf) -> Result<Self, BlobError> {
        let tmp = root.join("tmp");
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| BlobError::Io { path, source }
        };
        // Blobs are tenants' code: private (0700 dirs, 0600 files) whatever
        // the umask, like the rest of the data dir.
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&tmp).map_err(io(&tmp))?;
        for entry in std::fs::read_dir(&tmp).map_err(io(&tmp))? {
            let entry = entry.map_err(io(&tmp))?;
            // A leftover is garbage from an interrupted upload; losing the
            // race with a concurrent cleanup is fine.
            let _ = std::fs::remove_file(entry.path());
        }
        let refresh_after = Duration::from_secs(crate::defaults::BLOB_GC_GRACE_S) / REFRESH_FRACTION;
        Ok(Self { root, refresh_after })
    }

    /// The garbage collector's grace period this store's blobs get (the
    /// default is [`crate::defaults::BLOB_GC_GRACE_S`]).
    pub fn with_gc_grace(mut self, grace: Duration) -> Self {
        self.refresh_after = grace / REFRESH_FRACTION;
        self
    }

    /// Sets the mtime of the blob at `path` (whose metadata is `meta`) to
    /// now when it is older than `refresh_after`: it was just confirmed.
    async fn refresh(&self, path: &Path, meta: &std::fs::Metadata) -> Result<(), BlobError> {
        let modified = meta.modified().map_err(Self::io(path))?;
        let now = SystemTime::now();
        if now.duration_since(modified).unwrap_or_default() < self.refresh_after {
            return Ok(());
        }
        let owned = path.to_owned();
        let touched = tokio::task::spawn_blocking(move || std::fs::File::open(&owned)?.set_modified(now))
            .await
            .map_err(|e| BlobError::Io { path: path.to_owned(), source: std::io::Error::other(e) })?;
        match touched {
            // Collected in between: the caller saw it, the next look won't.
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            other => other.map_err(Self::io(path)),
        }
    }

    fn path_of(&self, hash: &str) -> Result<PathBuf, BlobError> {
        validate::sha256(hash).map_err(BlobError::BadHash)?;
        Ok(self.root.join(&hash[..2]).join(&hash[2..]))
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
        move |source| BlobError::Io { path: path.to_owned(), source }
    }
}

/// Removes a temp file unless it was renamed into place.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[async_trait]
impl BlobStore for DiskBlobStore {
    async fn put_stream(&self, hash: &str, mut body: ByteStream, limit_bytes: u64) -> Result<PutOutcome, BlobError> {
        let final_path = self.path_of(hash)?;
        let tmp_path = self.root.join("tmp").join(crate::ids::base36(24));
        let mut guard = TempFile(Some(tmp_path.clone()));
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp_path)
            .await
            .map_err(Self::io(&tmp_path))?;
        let mut hasher = Sha256::new();
        let mut size_bytes = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| BlobError::Body(e.to_string()))?;
            size_bytes += chunk.len() as u64;
            if size_bytes > limit_bytes {
                return Err(BlobError::TooLarge { limit_bytes });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(Self::io(&tmp_path))?;
        }
        let actual = hex::encode(hasher.finalize());
        if actual != hash {
            return Err(BlobError::HashMismatch { expected: hash.to_owned(), actual });
        }
        match tokio::fs::metadata(&final_path).await {
            Ok(meta) => {
                self.refresh(&final_path, &meta).await?;
                return Ok(PutOutcome { size_bytes, created: false });
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(BlobError::Io { path: final_path, source: e }),
        }
        file.sync_all().await.map_err(Self::io(&tmp_path))?;
        drop(file);
        let shard = final_path.parent().unwrap_or(&self.root);
        tokio::fs::DirBuilder::new().recursive(true).mode(0o700).create(shard).await.map_err(Self::io(shard))?;
        tokio::fs::rename(&tmp_path, &final_path).await.map_err(Self::io(&final_path))?;
        guard.0 = None;
        Ok(PutOutcome { size_bytes, created: true })
    }

    async fn get(&self, hash: &str) -> Result<Option<Bytes>, BlobError> {
        let path = self.path_of(hash)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Some(Bytes::from(bytes))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(BlobError::Io { path, source: e }),
        }
    }

    async fn size(&self, hash: &str) -> Result<Option<u64>, BlobError> {
        let path = self.path_of(hash)?;
        match tokio::fs::metadata(&path).await {
            Ok(meta) => {
                self.refresh(&path, &meta).await?;
                Ok(Some(meta.len()))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(BlobError::Io { path, source: e }),
        }
    }

    fn list(&self) -> BoxStream<'_, Result<BlobEntry, BlobError>> {
        // A shard directory at a time, read on a blocking thread: a million
        // blobs are never all in memory.
        let shards = (0..=255u8).map(|b| format!("{b:02x}"));
        futures_util::stream::iter(shards)
            .then(move |shard| {
                let dir = self.root.join(&shard);
                async move {
                    let read = tokio::task::spawn_blocking(move || list_shard(&dir, &shard)).await;
                    read.unwrap_or_else(|e| {
                        let source = std::io::Error::other(e);
                        Err(BlobError::Io { path: self.root.clone(), source })
                    })
                }
            })
            .map(|shard| {
                futures_util::stream::iter(shard.map_or_else(|e| vec![Err(e)], |v| v.into_iter().map(Ok).collect()))
            })
            .flatten()
            .boxed()
    }

    async fn entry(&self, hash: &str) -> Result<Option<BlobEntry>, BlobError> {
        let path = self.path_of(hash)?;
        match tokio::fs::metadata(&path).await {
            Ok(meta) => {
                let used_at = meta.modified().map_err(Self::io(&path))?;
                Ok(Some(BlobEntry { hash: hash.to_owned(), size_bytes: meta.len(), used_at }))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(BlobError::Io { path, source: e }),
        }
    }

    async fn delete(&self, hash: &str) -> Result<(), BlobError> {
        let path = self.path_of(hash)?;
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(BlobError::Io { path, source: e }),
            _ => Ok(()),
        }
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

/// The blobs of one shard directory (`ab/`); none when it does not exist.
/// Names that are not the rest of a hash are not blobs and are left alone.
fn list_shard(dir: &Path, shard: &str) -> Result<Vec<BlobEntry>, BlobError> {
    let io = |source| BlobError::Io { path: dir.to_owned(), source };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io)?;
        let Some(rest) = entry.file_name().to_str().map(str::to_owned) else { continue };
        let hash = format!("{shard}{rest}");
        if validate::sha256(&hash).is_err() {
            continue;
        }
        let meta = match entry.metadata() {
            Ok(meta) if meta.is_file() => meta,
            Ok(_) => continue,
            // Deleted since the listing.
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(io(e)),
        };
        let used_at = meta.modified().map_err(io)?;
        out.push(BlobEntry { hash, size_bytes: meta.len(), used_at });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(parts: Vec<&'static [u8]>) -> ByteStream {
        futures_util::stream::iter(parts.into_iter().map(|p| Ok(Bytes::from_static(p)))).boxed()
    }

    #[tokio::test]
    async fn stores_verifies_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskBlobStore::open(dir.path().join("blobs")).unwrap();
        let hash = crate::ids::sha256_hex(b"hello world");

        let out = store.put_stream(&hash, stream(vec![b"hello ", b"world"]), 100).await.unwrap();
        assert_eq!(out, PutOutcome { size_bytes: 11, created: true });
        assert!(dir.path().join("blobs").join(&hash[..2]).join(&hash[2..]).is_file());
        let again = store.put_stream(&hash, stream(vec![b"hello world"]), 100).await.unwrap();
        assert!(!again.created);
        assert_eq!(store.get(&hash).await.unwrap().unwrap(), Bytes::from_static(b"hello world"));
        assert_eq!(store.size(&hash).await.unwrap(), Some(11));

        let other = crate::ids::sha256_hex(b"other");
        let err = store.put_stream(&other, stream(vec![b"not other"]), 100).await.unwrap_err();
        assert!(matches!(err, BlobError::HashMismatch { .. }), "{err}");
        let err = store.put_stream(&other, stream(vec![b"other"]), 4).await.unwrap_err();
        assert!(matches!(err, BlobError::TooLarge { limit_bytes: 4 }), "{err}");
        assert!(!store.has(&other).await.unwrap());
        // Refused uploads leave no temp files behind.
        assert_eq!(std::fs::read_dir(dir.path().join("blobs/tmp")).unwrap().count(), 0);

        // Private whatever the umask: tenants' code.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("blobs").join(&hash[..2]).join(&hash[2..])), 0o600);
        assert_eq!(mode(&dir.path().join("blobs").join(&hash[..2])), 0o700);
        assert_eq!(mode(&dir.path().join("blobs/tmp")), 0o700);

        assert!(matches!(store.get("../../etc/passwd").await, Err(BlobError::BadHash(_))));
        assert_eq!(store.put(Bytes::from_static(b"other")).await.unwrap(), other);
    }
}
