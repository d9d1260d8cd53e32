//! The control plane as the runner's origin, in process: `boot`, `layer`,
//! `read_tree`, `read_blob` and `report_activity` answered straight from the
//! store, in the shape the apps folder uses (an optional ESZIP layer first,
//! then one bundle layer per code file at `file:///src/<path>`, every file an
//! asset). Layer and file ids are blob hashes; a hash is served only to a
//! deployment that has it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use isocloud_origin::{ActivityBatch, AssetEntry, AssetTree, BootAnswer, IsolateConfig, Origin, OriginError};
use isocloud_protocol::ConfigError;

use crate::ControlPlane;
use crate::store::deployments::{self, DeploymentRow, FileRow, Status};
use crate::store::{StoreError, activity};
use crate::validate;

/// The origin's name in the runner's logs, metrics and cache keys.
pub const ORIGIN_NAME: &str = "controlplane";

pub struct ControlPlaneOrigin {
    pub(crate) control_plane: Arc<ControlPlane>,
}

fn store_error(e: StoreError) -> OriginError {
    tracing::error!(target: "isocloud::controlplane", error = %e, "origin: store failed");
    OriginError::Unreachable(format!("control plane store: {e}"))
}

/// The layer id of a bundle: the blob hash, with `.<n>` added when an
/// earlier layer of the same config already has that hash (two code files
/// with the same bytes), since layer ids must be unique in a config.
fn layer_ids(eszip: Option<&str>, code_files: &[&FileRow]) -> Vec<String> {
    let mut seen: HashSet<String> = eszip.iter().map(|h| (*h).to_owned()).collect();
    code_files
        .iter()
        .map(|file| {
            let mut id = file.sha256.clone();
            let mut n = 1;
            while !seen.insert(id.clone()) {
                id = format!("{}.{n}", file.sha256);
                n += 1;
            }
            id
        })
        .collect()
}

/// The blob hash a layer id names.
fn hash_of_layer(layer_id: &str) -> &str {
    layer_id.split_once('.').map_or(layer_id, |(hash, _)| hash)
}

/// `file:///src/<path>`: where a deployment file is as a module, as a
/// normalised URL (the form the runner compares).
pub(crate) fn file_specifier(path: &str) -> String {
    normalize_specifier(&format!("file:///src/{path}"))
}

pub(crate) fn normalize_specifier(specifier: &str) -> String {
    url::Url::parse(specifier).map(String::from).unwrap_or_else(|_| specifier.to_owned())
}

/// Builds the isolate config of a ready deployment.
pub fn isolate_config(deployment: &DeploymentRow, files: &[FileRow]) -> Result<IsolateConfig, OriginError> {
    let mut layers = Vec::new();
    if let Some(eszip) = &deployment.eszip_sha256 {
        layers.push(serde_json::json!({ "kind": "eszip", "id": eszip }));
    }
    // A build's output (node_modules, vendor) is read by deno from disk,
    // where the runner lays it out from the tree: not a layer per file.
    let code: Vec<&FileRow> = files
        .iter()
        .filter(|f| {
            f.symlink_target.is_none() && validate::is_code_path(&f.path) && !crate::build::is_output_path(&f.path)
        })
        .collect();
    for (file, id) in code.iter().zip(layer_ids(deployment.eszip_sha256.as_deref(), &code)) {
        layers.push(serde_json::json!({
            "kind": "bundle",
            "id": id,
            "specifier": file_specifier(&file.path),
        }));
    }
    let permissions: serde_json::Value = serde_json::from_str(&deployment.permissions_json)
        .map_err(|e| OriginError::InvalidConfig(ConfigError { field: "permissions".into(), message: e.to_string() }))?;
    let mut config = serde_json::json!({
        "entrypoint": deployment.entrypoint,
        "layers": layers,
        "envs": deployment.envs,
    });
    if !permissions.is_null() {
        config["permissions"] = permissions;
    }
    let json =
        serde_json::to_vec(&config).map_err(|e| OriginError::Malformed { rpc: "boot", message: e.to_string() })?;
    Ok(IsolateConfig::from_json(&json)?)
}

/// The asset manifest of a deployment's files.
pub fn asset_tree(files: &[FileRow]) -> AssetTree {
    let mut entries = BTreeMap::from([(String::new(), AssetEntry::Directory)]);
    for file in files {
        let path = format!("/{}", file.path);
        // Its folders, deepest first, up to the first one already there
        // (the files come sorted: mostly the previous file's folder).
        let mut end = path.len();
        while let Some(slash) = path[..end].rfind('/').filter(|slash| *slash > 0) {
            if entries.contains_key(&path[..slash]) {
                break;
            }
            entries.insert(path[..slash].to_owned(), AssetEntry::Directory);
            end = slash;
        }
        let entry = match &file.symlink_target {
            Some(target) => AssetEntry::Symlink { target: target.clone() },
            None => AssetEntry::File { size: u64::try_from(file.size_bytes).unwrap_or(0), hash: file.sha256.clone() },
        };
        entries.insert(path, entry);
    }
    AssetTree { entries }
}

/// Deployments whose file listing is kept (a built one's is ~600 rows).
const FILES_CACHE_DEPLOYMENTS: usize = 128;

type Listing = Arc<tokio::sync::OnceCell<Arc<Vec<FileRow>>>>;

/// The file listings of the deployments booted lately. A deployment is
/// immutable, so its listing never changes: `boot` and `read_tree`, asked at
/// once, share one query, and a re-boot makes none. Whether the deployment
/// is still ready is asked every time.
#[derive(Default)]
pub(crate) struct FilesCache {
    listings: Mutex<(HashMap<String, Listing>, VecDeque<String>)>,
}

impl FilesCache {
    fn slot(&self, deployment_id: &str) -> Listing {
        let mut guard = self.listings.lock().unwrap_or_else(|p| p.into_inner());
        let (listings, order) = &mut *guard;
        if let Some(listing) = listings.get(deployment_id) {
            return Arc::clone(listing);
        }
        while order.len() >= FILES_CACHE_DEPLOYMENTS {
            if let Some(oldest) = order.pop_front() {
                listings.remove(&oldest);
            }
        }
        let listing = Listing::default();
        listings.insert(deployment_id.to_owned(), Arc::clone(&listing));
        order.push_back(deployment_id.to_owned());
        listing
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.listings.lock().unwrap_or_else(|p| p.into_inner()).0.len()
    }
}

impl ControlPlaneOrigin {
    /// The files of a ready deployment, from the cache or one query.
    async fn files(&self, deployment_id: &str) -> Result<Arc<Vec<FileRow>>, OriginError> {
        let slot = self.control_plane.deployment_files.slot(deployment_id);
        slot.get_or_try_init(|| async {
            let mut conn = self.control_plane.store.read().await.map_err(store_error)?;
            Ok(Arc::new(deployments::files(&mut conn, deployment_id).await.map_err(store_error)?))
        })
        .await
        .cloned()
    }

    async fn ready_deployment(&self, deployment_id: &str) -> Result<DeploymentRow, OriginError> {
        if !validate::is_deployment_id(deployment_id) {
            return Err(OriginError::DeploymentNotFound);
        }
        let mut conn = self.control_plane.store.read().await.map_err(store_error)?;
        match deployments::get(&mut conn, deployment_id).await.map_err(store_error)? {
            Some(deployment) if deployment.status == Status::Ready => Ok(deployment),
            _ => Err(OriginError::DeploymentNotFound),
        }
    }

    /// The blob's bytes, if `hash` belongs to the deployment.
    async fn deployment_blob(&self, deployment_id: &str, hash: &str) -> Result<Option<Bytes>, OriginError> {
        if validate::sha256(hash).is_err() || !validate::is_deployment_id(deployment_id) {
            return Ok(None);
        }
        {
            let mut conn = self.control_plane.store.read().await.map_err(store_error)?;
            if !deployments::has_blob(&mut conn, deployment_id, hash).await.map_err(store_error)? {
                return Ok(None);
            }
        }
        self.control_plane.blobs.get(hash).await.map_err(|e| OriginError::Unreachable(format!("blob store: {e}")))
    }
}

#[async_trait]
impl Origin for ControlPlaneOrigin {
    fn name(&self) -> &str {
        ORIGIN_NAME
    }

    /// The deployment's project, from the in-memory routing table (every
    /// ready deployment is in it); one the table does not know cannot boot,
    /// and counts as the control plane's own meanwhile.
    fn tenant_of(&self, deployment_id: &str) -> String {
        let table = self.control_plane.routing.read().unwrap_or_else(|p| p.into_inner());
        match table.project_of(deployment_id) {
            Some(project) => format!("{ORIGIN_NAME}/{project}"),
            None => ORIGIN_NAME.to_owned(),
        }
    }

    async fn boot(&self, deployment_id: &str) -> Result<BootAnswer, OriginError> {
        let deployment = self.ready_deployment(deployment_id).await?;
        let files = self.files(deployment_id).await?;
        Ok(BootAnswer { config: isolate_config(&deployment, &files)?, inline_layer: Bytes::new() })
    }

    async fn layer(&self, deployment_id: &str, layer_id: &str) -> Result<Bytes, OriginError> {
        let unknown = || OriginError::Layer { layer_id: layer_id.to_owned(), message: "unknown layer".into() };
        self.deployment_blob(deployment_id, hash_of_layer(layer_id)).await?.ok_or_else(unknown)
    }

    async fn read_tree(&self, deployment_id: &str) -> Result<AssetTree, OriginError> {
        self.ready_deployment(deployment_id).await?;
        Ok(asset_tree(&self.files(deployment_id).await?))
    }

    async fn read_blob(&self, deployment_id: &str, file_id: &str) -> Result<Bytes, OriginError> {
        self.deployment_blob(deployment_id, file_id)
            .await?
            .ok_or_else(|| OriginError::AssetNotFound(file_id.to_owned()))
    }

    async fn report_activity(&self, deployment_id: &str, batch: &ActivityBatch) -> Result<(), OriginError> {
        activity::store_batch(&self.control_plane.store, deployment_id, batch).await.map_err(store_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, hash: char) -> FileRow {
        FileRow::file(path, hash.to_string().repeat(64), 3)
    }

    #[test]
    fn duplicate_contents_get_distinct_layer_ids() {
        let a = file("a.ts", 'a');
        let b = file("b.ts", 'a');
        let c = file("c.ts", 'c');
        let ids = layer_ids(Some(&"c".repeat(64)), &[&a, &b, &c]);
        assert_eq!(ids, vec!["a".repeat(64), format!("{}.1", "a".repeat(64)), format!("{}.1", "c".repeat(64))]);
        assert_eq!(hash_of_layer(&ids[1]), "a".repeat(64));
    }

    #[test]
    fn the_files_cache_is_bounded_and_keeps_the_newest() {
        let cache = FilesCache::default();
        let first = cache.slot("d0");
        assert!(Arc::ptr_eq(&first, &cache.slot("d0")), "one slot per deployment: boot and read_tree share it");
        for n in 1..FILES_CACHE_DEPLOYMENTS + 10 {
            cache.slot(&format!("d{n}"));
        }
        assert_eq!(cache.len(), FILES_CACHE_DEPLOYMENTS);
        assert!(!Arc::ptr_eq(&first, &cache.slot("d0")), "the oldest went first");
    }

    #[test]
    fn tree_lists_every_directory() {
        let tree = asset_tree(&[file("main.ts", 'a'), file("static/img/logo.svg", 'b')]);
        let keys: Vec<&str> = tree.entries.keys().map(String::as_str).collect();
        assert_eq!(keys, vec!["", "/main.ts", "/static", "/static/img", "/static/img/logo.svg"]);
        assert_eq!(tree.resolve_file("/static/img/logo.svg").map(|(_, size, _)| size), Some(3));
    }
}
