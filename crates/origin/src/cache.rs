//! A bounded on-disk cache of layers and blobs, keyed by their immutable ids.
//!
//! Layer ids are immutable per subhoster and file ids are content addresses
//! (protocol §2), so an entry never goes stale: it only ages out. When the
//! total size passes `max_bytes`, the least recently used entries are deleted
//! until it fits again.
//!
//! It also keeps each deployment's last boot answer and asset tree
//! ([`CacheKind::Boot`], see `stale.rs`), which do change: a newer answer
//! replaces the older, and a deployment the origin says is gone has its
//! entries removed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    Layer,
    Blob,
    /// A deployment's last boot answer or asset tree: small files, and
    /// they hold the deployment's env values (written owner-only).
    Boot,
}

impl CacheKind {
    const ALL: [CacheKind; 3] = [CacheKind::Layer, CacheKind::Blob, CacheKind::Boot];

    fn dir(self) -> &'static str {
        match self {
            CacheKind::Layer => "layers",
            CacheKind::Blob => "blobs",
            CacheKind::Boot => "boots",
        }
    }

    /// What an entry of `size` bytes counts against the bound. A boot
    /// answer is a few hundred bytes but takes a block of the disk: counted
    /// so, the bound holds on disk, and a runner of a million deployments
    /// keeps at most `max_bytes / 4 KiB` of them.
    fn charged(self, size: u64) -> u64 {
        match self {
            CacheKind::Boot => size.max(BLOCK_BYTES),
            CacheKind::Layer | CacheKind::Blob => size,
        }
    }
}

/// A file system block: the least a small file costs on disk.
const BLOCK_BYTES: u64 = 4096;

pub struct DiskCache {
    root: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct Index {
    entries: HashMap<PathBuf, Entry>,
    total_bytes: u64,
    clock: u64,
}

struct Entry {
    size: u64,
    last_used: u64,
}

impl DiskCache {
    /// Opens (creating) the cache at `root`, indexing what an earlier run left.
    pub fn open(root: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let mut index = Index::default();
        for kind in CacheKind::ALL {
            let dir = root.join(kind.dir());
            std::fs::create_dir_all(&dir)?;
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let path = entry.path();
                // Half-written files of a crashed run are never valid entries.
                if path.extension().is_some_and(|e| e == "tmp") {
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                let size = kind.charged(entry.metadata()?.len());
                index.total_bytes += size;
                index.entries.insert(path, Entry { size, last_used: 0 });
            }
        }
        let cache = Self {
            root: root.to_owned(),
            max_bytes,
            index: Mutex::new(index),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        };
        cache.evict_over_budget();
        Ok(cache)
    }

    fn path_for(&self, kind: CacheKind, namespace: &str, id: &str) -> PathBuf {
        let mut hasher = Sha256::new();
        hasher.update(namespace.as_bytes());
        hasher.update([0]);
        hasher.update(id.as_bytes());
        self.root.join(kind.dir()).join(hex::encode(hasher.finalize()))
    }

    /// The cached bytes of `id` in `namespace` (the origin's name), if any.
    pub async fn get(&self, kind: CacheKind, namespace: &str, id: &str) -> Option<Bytes> {
        let path = self.path_for(kind, namespace, id);
        let known = {
            let mut index = self.index.lock().expect("cache index poisoned");
            index.clock += 1;
            let clock = index.clock;
            match index.entries.get_mut(&path) {
                Some(entry) => {
                    entry.last_used = clock;
                    true
                }
                None => false,
            }
        };
        if known && let Ok(bytes) = tokio::fs::read(&path).await {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Some(Bytes::from(bytes));
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Stores `bytes` under `id`. A failure to cache is not a failure to
    /// serve, so callers may ignore the error after logging it.
    pub async fn put(&self, kind: CacheKind, namespace: &str, id: &str, bytes: &Bytes) -> std::io::Result<()> {
        let size = kind.charged(bytes.len() as u64);
        if size > self.max_bytes {
            return Ok(());
        }
        let path = self.path_for(kind, namespace, id);
        let tmp = path.with_extension(format!("{}.tmp", uuid_like()));
        let mut file = {
            use tokio::fs::OpenOptions;
            let mut options = OpenOptions::new();
            options.write(true).create_new(true);
            if kind == CacheKind::Boot {
                // Env values: the runner's alone, whatever the umask.
                options.mode(0o600);
            }
            options.open(&tmp).await?
        };
        let written = async {
            tokio::io::AsyncWriteExt::write_all(&mut file, bytes).await?;
            tokio::io::AsyncWriteExt::flush(&mut file).await
        }
        .await;
        drop(file);
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        tokio::fs::rename(&tmp, &path).await?;
        {
            let mut index = self.index.lock().expect("cache index poisoned");
            index.clock += 1;
            let clock = index.clock;
            if let Some(old) = index.entries.insert(path, Entry { size, last_used: clock }) {
                index.total_bytes -= old.size;
            }
            index.total_bytes += size;
        }
        self.evict_over_budget();
        Ok(())
    }

    /// Whether `id` is cached (without reading it or counting a hit).
    pub fn contains(&self, kind: CacheKind, namespace: &str, id: &str) -> bool {
        let path = self.path_for(kind, namespace, id);
        self.index.lock().expect("cache index poisoned").entries.contains_key(&path)
    }

    /// Removes `id`, if cached.
    pub fn remove(&self, kind: CacheKind, namespace: &str, id: &str) {
        let path = self.path_for(kind, namespace, id);
        let mut index = self.index.lock().expect("cache index poisoned");
        if let Some(entry) = index.entries.remove(&path) {
            index.total_bytes -= entry.size;
            let _ = std::fs::remove_file(&path);
        }
    }

    fn evict_over_budget(&self) {
        let mut index = self.index.lock().expect("cache index poisoned");
        if index.total_bytes <= self.max_bytes {
            return;
        }
        let mut by_age: Vec<(u64, PathBuf)> =
            index.entries.iter().map(|(path, entry)| (entry.last_used, path.clone())).collect();
        by_age.sort_unstable();
        for (_, path) in by_age {
            if index.total_bytes <= self.max_bytes {
                break;
            }
            if let Some(entry) = index.entries.remove(&path) {
                index.total_bytes -= entry.size;
                // An open reader keeps its inode; unlinking under it is fine.
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    pub fn total_bytes(&self) -> u64 {
        self.index.lock().expect("cache index poisoned").total_bytes
    }
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{}-{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_lru_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 10).unwrap();
        let a = Bytes::from_static(b"aaaa");
        let b = Bytes::from_static(b"bbbb");
        cache.put(CacheKind::Layer, "o", "a", &a).await.unwrap();
        cache.put(CacheKind::Layer, "o", "b", &b).await.unwrap();
        assert_eq!(cache.get(CacheKind::Layer, "o", "a").await, Some(a.clone()));
        // "b" is now the least recently used: adding "c" must evict it, not "a".
        cache.put(CacheKind::Blob, "o", "c", &Bytes::from_static(b"cccc")).await.unwrap();
        assert!(cache.total_bytes() <= 10);
        assert_eq!(cache.get(CacheKind::Layer, "o", "b").await, None);
        assert_eq!(cache.get(CacheKind::Layer, "o", "a").await, Some(a));
        // Namespaces keep origins apart.
        assert_eq!(cache.get(CacheKind::Layer, "other", "a").await, None);
    }

    #[tokio::test]
    async fn survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = Bytes::from_static(b"kept");
        DiskCache::open(dir.path(), 100).unwrap().put(CacheKind::Blob, "o", "k", &bytes).await.unwrap();
        let reopened = DiskCache::open(dir.path(), 100).unwrap();
        assert_eq!(reopened.get(CacheKind::Blob, "o", "k").await, Some(bytes));
        assert_eq!(reopened.total_bytes(), 4);
    }

    #[tokio::test]
    async fn a_boot_entry_counts_as_a_block_so_the_bound_caps_their_number() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 3 * BLOCK_BYTES).unwrap();
        for n in 0..10 {
            cache.put(CacheKind::Boot, "o", &format!("d{n}"), &Bytes::from_static(b"small")).await.unwrap();
        }
        assert_eq!(cache.total_bytes(), 3 * BLOCK_BYTES);
        let kept = (0..10).filter(|n| cache.contains(CacheKind::Boot, "o", &format!("d{n}"))).count();
        assert_eq!(kept, 3, "the newest three");
        assert_eq!(std::fs::read_dir(dir.path().join("boots")).unwrap().count(), 3);
        cache.remove(CacheKind::Boot, "o", "d9");
        assert_eq!(cache.total_bytes(), 2 * BLOCK_BYTES);
        // Reopened, the same charge.
        drop(cache);
        assert_eq!(DiskCache::open(dir.path(), 3 * BLOCK_BYTES).unwrap().total_bytes(), 2 * BLOCK_BYTES);
    }
}
