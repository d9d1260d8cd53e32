//! The runner's package store: a built deployment's `node_modules/` and
//! `vendor/` (files and npm's symlinks, from its asset tree) laid out once
//! per distinct set of packages, read-only, and bound into every isolate of
//! every deployment that has the same set — a cold start writes no package
//! file. A folder is named by the SHA-256 of its listing and appears only
//! complete (built beside, then renamed into place). Bytes come through the
//! origin's `read_blob` and the blob cache; a file id that is a SHA-256 is
//! checked against the bytes.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use isocloud_origin::{AssetEntry, AssetTree, CacheKind, DiskCache, Origin, link_stays_inside};
use isocloud_sandbox::is_package_path;
use sha2::{Digest, Sha256};

/// Files fetched at once when a set is laid out.
const PARALLEL_FETCHES: usize = 16;

pub(crate) struct PackageStore {
    root: PathBuf,
    /// One layout per set at a time; others wait for it.
    building: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Every complete set: its size, when a boot last used it, and how many
    /// isolates hold it now (bound into their root: never removed then).
    sets: Arc<Mutex<HashMap<String, SetUse>>>,
    max_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct SetUse {
    bytes: u64,
    last_used: std::time::SystemTime,
    holders: usize,
}

/// A set of packages an isolate has bound: it stays on disk while any
/// lease of it lives (the isolate's files hold it until the isolate ends).
pub(crate) struct PackageLease {
    sets: Arc<Mutex<HashMap<String, SetUse>>>,
    key: String,
}

impl Drop for PackageLease {
    fn drop(&mut self) {
        if let Some(set) = self.sets.lock().expect("package store poisoned").get_mut(&self.key) {
            set.holders = set.holders.saturating_sub(1);
        }
    }
}

fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(listing) = std::fs::read_dir(&dir) else { continue };
        for entry in listing.flatten() {
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => stack.push(entry.path()),
                Ok(kind) if kind.is_file() => total += entry.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

impl PackageStore {
    /// The store at `root`, holding at most about `max_bytes` of sets no
    /// isolate uses (the least recently used go first; a set in use stays).
    pub(crate) fn new(root: PathBuf, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(&root)?;
        let mut sets = HashMap::new();
        for entry in std::fs::read_dir(&root)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".partial") {
                // Half-built sets of a runner that died.
                let _ = std::fs::remove_dir_all(entry.path());
            } else if entry.file_type().is_ok_and(|k| k.is_dir()) {
                let last_used = entry.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
                sets.insert(name, SetUse { bytes: tree_bytes(&entry.path()), last_used, holders: 0 });
            }
        }
        Ok(Self { root, building: Mutex::new(HashMap::new()), sets: Arc::new(Mutex::new(sets)), max_bytes })
    }

    /// Bytes of all complete sets (metrics, tests).
    #[cfg(test)]
    fn bytes(&self) -> u64 {
        self.sets.lock().expect("package store poisoned").values().map(|s| s.bytes).sum()
    }

    /// A hold on set `key` (while it lives, the set is never removed).
    pub(crate) fn lease(&self, key: &str, bytes: Option<u64>) -> PackageLease {
        let mut sets = self.sets.lock().expect("package store poisoned");
        let set = sets.entry(key.to_owned()).or_insert(SetUse {
            bytes: bytes.unwrap_or(0),
            last_used: std::time::SystemTime::now(),
            holders: 0,
        });
        set.holders += 1;
        set.last_used = std::time::SystemTime::now();
        PackageLease { sets: Arc::clone(&self.sets), key: key.to_owned() }
    }

    /// Removes the least recently used sets no isolate holds until the
    /// store is within its bound; returns how many went.
    fn evict(&self) -> usize {
        let victims: Vec<String> = {
            let mut sets = self.sets.lock().expect("package store poisoned");
            let mut total: u64 = sets.values().map(|s| s.bytes).sum();
            let mut idle: Vec<(std::time::SystemTime, String, u64)> =
                sets.iter().filter(|(_, s)| s.holders == 0).map(|(k, s)| (s.last_used, k.clone(), s.bytes)).collect();
            idle.sort();
            let mut victims = Vec::new();
            for (_, key, bytes) in idle {
                if total <= self.max_bytes {
                    break;
                }
                total = total.saturating_sub(bytes);
                sets.remove(&key);
                victims.push(key);
            }
            victims
        };
        for key in &victims {
            // Renamed first: a boot that looks for it now lays it out anew.
            let doomed = self.root.join(format!("{key}.{:08x}.partial", rand::random::<u32>()));
            if std::fs::rename(self.root.join(key), &doomed).is_ok() {
                let _ = std::fs::remove_dir_all(&doomed);
            }
        }
        victims.len()
    }

    /// The store folder holding `tree`'s packages, laid out if missing;
    /// `None` when the deployment has none.
    pub(crate) async fn ensure(
        &self,
        tree: &AssetTree,
        origin: &Arc<dyn Origin>,
        cache: &Arc<DiskCache>,
        deployment_id: &str,
    ) -> Result<Option<(PathBuf, PackageLease)>, String> {
        let entries: Vec<(&String, &AssetEntry)> = tree.entries.iter().filter(|(p, _)| is_package_path(p)).collect();
        if entries.is_empty() {
            return Ok(None);
        }
        let Some(key) = isocloud_sandbox::package_set_key(tree) else { return Ok(None) };
        let io = |e: std::io::Error| format!("package store: {e}");
        self.ensure_set(
            &key,
            io,
            |partial| async move { lay_out(&partial, &entries, origin, cache, deployment_id).await },
        )
        .await
        .map(Some)
    }

    /// The store folder holding an ESZIP's npm snapshot, fetched from
    /// `registry` if missing.
    pub(crate) async fn ensure_npm(
        &self,
        snapshot: &isocloud_eszip::NpmSnapshot,
        registry: &crate::npm::NpmRegistry,
    ) -> Result<(PathBuf, PackageLease), crate::npm::NpmError> {
        let key = crate::npm::set_key(snapshot);
        self.ensure_set(&key, crate::npm::NpmError::Io, |partial| async move {
            let uses_node_http = crate::npm::lay_out(&partial, snapshot, registry).await?;
            if uses_node_http {
                std::fs::write(partial.join(crate::node_http::NODE_HTTP_MARKER), b"")?;
            }
            Ok(())
        })
        .await
    }

    /// Set `key`'s folder, laid out by `lay_out` into a fresh folder beside
    /// it (renamed into place only when complete) if missing; one layout per
    /// set at a time.
    async fn ensure_set<E, F, Fut>(
        &self,
        key: &str,
        io: impl Fn(std::io::Error) -> E,
        lay_out: F,
    ) -> Result<(PathBuf, PackageLease), E>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        let dir = self.root.join(key);
        // Leased before the check: eviction never takes a set being handed out.
        let lease = self.lease(key, None);
        if dir.is_dir() {
            return Ok((dir, lease));
        }
        let lock = Arc::clone(self.building.lock().expect("package store poisoned").entry(key.to_owned()).or_default());
        let _held = lock.lock().await;
        if dir.is_dir() {
            return Ok((dir, lease));
        }
        let partial = self.root.join(format!("{key}.{:08x}.partial", rand::random::<u32>()));
        let result = match lay_out(partial.clone()).await {
            Ok(()) => std::fs::rename(&partial, &dir).map_err(&io),
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&partial);
        }
        self.building.lock().expect("package store poisoned").remove(key);
        result?;
        let bytes = tree_bytes(&dir);
        if let Some(set) = self.sets.lock().expect("package store poisoned").get_mut(key) {
            set.bytes = bytes;
        }
        let evicted = self.evict();
        if evicted > 0 {
            tracing::info!(evicted, "package store over its bound: least recently used sets removed");
        }
        Ok((dir, lease))
    }
}

fn place(root: &Path, tree_path: &str) -> Result<PathBuf, String> {
    let mut path = root.to_path_buf();
    for component in Path::new(tree_path.trim_start_matches('/')).components() {
        match component {
            Component::Normal(part) => path.push(part),
            _ => return Err(format!("package path {tree_path:?} leaves the deployment")),
        }
    }
    Ok(path)
}

async fn lay_out(
    dir: &Path,
    entries: &[(&String, &AssetEntry)],
    origin: &Arc<dyn Origin>,
    cache: &Arc<DiskCache>,
    deployment_id: &str,
) -> Result<(), String> {
    let io = |e: std::io::Error| format!("package store: {e}");
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut files = Vec::new();
    for (path, entry) in entries {
        let host = place(dir, path)?;
        match entry {
            AssetEntry::Directory => std::fs::create_dir_all(&host).map_err(io)?,
            AssetEntry::Symlink { target } => {
                if !link_stays_inside(path, target) {
                    return Err(format!("the package link {path} -> {target} leaves the deployment"));
                }
                if let Some(parent) = host.parent() {
                    std::fs::create_dir_all(parent).map_err(io)?;
                }
                std::os::unix::fs::symlink(target, &host).map_err(io)?;
            }
            AssetEntry::File { hash, size } => files.push((host, (*path).clone(), hash.clone(), *size)),
        }
    }
    let uses_node_http = std::sync::atomic::AtomicBool::new(false);
    futures_util::stream::iter(files)
        .map(|(host, path, hash, size)| {
            let uses_node_http = &uses_node_http;
            async move {
                let bytes = fetch_file(origin, cache, deployment_id, &path, &hash, size, true).await?;
                if crate::node_http::is_script(&path) && crate::node_http::names_node_http(&bytes) {
                    uses_node_http.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::PermissionsExt;
                    if let Some(parent) = host.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::write(&host, &bytes)?;
                    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o444))
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(io)
            }
        })
        .buffer_unordered(PARALLEL_FETCHES)
        .try_collect::<()>()
        .await?;
    if uses_node_http.into_inner() && dir.join("node_modules").is_dir() {
        // The harness loads node:http (10-65 ms of a cold start) only for
        // packages that may start a Node server (Express, Koa, Fastify, …).
        std::fs::write(dir.join(crate::node_http::NODE_HTTP_MARKER), b"").map_err(io)?;
    }
    Ok(())
}

/// A file of the deployment's tree (at `path`, for messages): from the blob
/// cache, else `read_blob` (its size checked, then cached). `verify`: a
/// `file_id` that is a SHA-256 must be the bytes' (package files).
pub(crate) async fn fetch_file(
    origin: &Arc<dyn Origin>,
    cache: &Arc<DiskCache>,
    deployment_id: &str,
    path: &str,
    file_id: &str,
    size: u64,
    verify: bool,
) -> Result<Bytes, String> {
    if let Some(bytes) = cache.get(CacheKind::Blob, origin.name(), file_id).await {
        return Ok(bytes);
    }
    let bytes = origin.read_blob(deployment_id, file_id).await.map_err(|e| {
        tracing::warn!(deployment_id, file_id, error = %e, "read_blob failed");
        format!("cannot load {path}: {e}")
    })?;
    if bytes.len() as u64 != size {
        return Err(format!("{path}: the origin sent {} bytes, the manifest says {size}", bytes.len()));
    }
    if verify
        && file_id.len() == 64
        && file_id.bytes().all(|b| b.is_ascii_hexdigit())
        && hex::encode(Sha256::digest(&bytes)) != file_id
    {
        return Err(format!("{path}: the origin's bytes do not hash to {file_id}"));
    }
    if let Err(e) = cache.put(CacheKind::Blob, origin.name(), file_id, &bytes).await {
        tracing::warn!(error = %e, "could not cache blob");
    }
    Ok(bytes)
}

/// The deployment-root files deno itself reads at start-up, fetched now.
pub(crate) async fn project_configs(
    tree: &AssetTree,
    origin: &Arc<dyn Origin>,
    cache: &Arc<DiskCache>,
    deployment_id: &str,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut configs = Vec::new();
    for name in isocloud_sandbox::PROJECT_CONFIG_FILES {
        if let Some((_, size, file_id)) = tree.resolve_file(&format!("/{name}")) {
            let bytes = fetch_file(origin, cache, deployment_id, name, file_id, size, true).await?;
            configs.push((name.to_owned(), bytes.to_vec()));
        }
    }
    Ok(configs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_paths_and_links() {
        assert!(is_package_path("/node_modules/hono/package.json"));
        assert!(is_package_path("/vendor"));
        assert!(!is_package_path("/node_modules2/x"));
        assert!(link_stays_inside("/node_modules/hono", ".deno/hono@4/node_modules/hono"));
        assert!(!link_stays_inside("/node_modules/hono", "../../../etc"));
        assert!(!link_stays_inside("/node_modules/hono", "/etc"));
        assert!(place(Path::new("/s"), "/node_modules/../../x").is_err());
    }

    #[test]
    fn the_least_recently_used_idle_sets_go_and_leased_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in [("a", 400), ("b", 400), ("c", 400)] {
            std::fs::create_dir_all(dir.path().join(name).join("node_modules")).unwrap();
            std::fs::write(dir.path().join(name).join("node_modules/f"), vec![0u8; bytes]).unwrap();
        }
        let store = PackageStore::new(dir.path().to_owned(), 1000).unwrap();
        assert_eq!(store.bytes(), 1200);
        // "a" is oldest but in use; "b" is the least recently used idle one.
        let held = store.lease("a", None);
        drop(store.lease("b", None));
        std::thread::sleep(std::time::Duration::from_millis(5));
        drop(store.lease("c", None));
        {
            let mut sets = store.sets.lock().unwrap();
            sets.get_mut("a").unwrap().last_used = std::time::UNIX_EPOCH;
        }
        assert_eq!(store.evict(), 1);
        assert!(dir.path().join("a").is_dir(), "a leased set is never removed");
        assert!(!dir.path().join("b").exists(), "the least recently used idle set went");
        assert!(dir.path().join("c").is_dir());
        drop(held);
        assert_eq!(store.evict(), 0, "within the bound now");
        assert_eq!(store.bytes(), 800);
    }
}
