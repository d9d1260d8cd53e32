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
use isocloud_origin::{AssetEntry, AssetTree, CacheKind, DiskCache, Origin};
use sha2::{Digest, Sha256};

/// The tree folders a build writes, laid out here.
pub const PACKAGE_DIRS: [&str; 2] = ["/node_modules", "/vendor"];
/// Files fetched at once when a set is laid out.
const PARALLEL_FETCHES: usize = 16;

fn is_package_path(path: &str) -> bool {
    PACKAGE_DIRS.iter().any(|dir| path == *dir || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/')))
}

pub(crate) struct PackageStore {
    root: PathBuf,
    /// One layout per set at a time; others wait for it.
    building: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl PackageStore {
    pub(crate) fn new(root: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&root)?;
        // Half-built sets of a runner that died.
        for entry in std::fs::read_dir(&root)?.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".partial") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(Self { root, building: Mutex::new(HashMap::new()) })
    }

    /// The store folder holding `tree`'s packages, laid out if missing;
    /// `None` when the deployment has none.
    pub(crate) async fn ensure(
        &self,
        tree: &AssetTree,
        origin: &Arc<dyn Origin>,
        cache: &Arc<DiskCache>,
        deployment_id: &str,
    ) -> Result<Option<PathBuf>, String> {
        let entries: Vec<(&String, &AssetEntry)> = tree.entries.iter().filter(|(p, _)| is_package_path(p)).collect();
        if entries.is_empty() {
            return Ok(None);
        }
        let mut listing = Sha256::new();
        for (path, entry) in &entries {
            listing.update(path.as_bytes());
            match entry {
                AssetEntry::Directory => listing.update(b"\0d\0"),
                AssetEntry::File { hash, size } => listing.update(format!("\0f\0{hash}\0{size}\0").as_bytes()),
                AssetEntry::Symlink { target } => listing.update(format!("\0l\0{target}\0").as_bytes()),
            }
        }
        let key = hex::encode(listing.finalize());
        let dir = self.root.join(&key);
        if dir.is_dir() {
            return Ok(Some(dir));
        }
        let lock = Arc::clone(self.building.lock().expect("package store poisoned").entry(key.clone()).or_default());
        let _held = lock.lock().await;
        if dir.is_dir() {
            return Ok(Some(dir));
        }
        let partial = self.root.join(format!("{key}.{:08x}.partial", rand::random::<u32>()));
        let result = lay_out(&partial, &entries, origin, cache, deployment_id).await;
        let result = match result {
            Ok(()) => std::fs::rename(&partial, &dir).map_err(|e| format!("package store: {e}")),
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&partial);
        }
        self.building.lock().expect("package store poisoned").remove(&key);
        result.map(|()| Some(dir))
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

/// A relative symlink target that stays inside the tree.
fn link_stays_inside(link: &str, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') {
        return false;
    }
    let mut parts: Vec<&str> = link.split('/').filter(|s| !s.is_empty()).collect();
    parts.pop();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return false;
                }
            }
            other => parts.push(other),
        }
    }
    true
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
    futures_util::stream::iter(files)
        .map(|(host, path, hash, size)| async move {
            let bytes = fetch(origin, cache, deployment_id, &path, &hash, size).await?;
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
        })
        .buffer_unordered(PARALLEL_FETCHES)
        .try_collect::<()>()
        .await
}

async fn fetch(
    origin: &Arc<dyn Origin>,
    cache: &Arc<DiskCache>,
    deployment_id: &str,
    path: &str,
    file_id: &str,
    size: u64,
) -> Result<Bytes, String> {
    if let Some(bytes) = cache.get(CacheKind::Blob, origin.name(), file_id).await {
        return Ok(bytes);
    }
    let bytes = origin.read_blob(deployment_id, file_id).await.map_err(|e| format!("cannot load {path}: {e}"))?;
    if bytes.len() as u64 != size {
        return Err(format!("{path}: the origin sent {} bytes, the manifest says {size}", bytes.len()));
    }
    if file_id.len() == 64
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
            let bytes = fetch(origin, cache, deployment_id, name, file_id, size).await?;
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
}
