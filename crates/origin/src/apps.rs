//! The embedded default origin: every subdirectory `DIR/<name>/` of a folder
//! is a deployment named `<name>`. It answers the same RPCs as a remote origin
//! (one bundle layer per code file, the files as the asset tree), so the
//! runner has a single path from "origin" to "isolate".

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use isocloud_protocol::{ActivityBatch, ActivityKind, ConfigError, IsolateConfig};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::{AssetEntry, AssetTree, BootAnswer, Origin, OriginError};

/// Entrypoints tried in order when `isolate.json` names none.
pub use isocloud_protocol::DEFAULT_ENTRYPOINTS;
/// Extensions loaded as modules (bundle layers); everything else is only an asset.
const MODULE_EXTENSIONS: [&str; 10] = ["ts", "tsx", "mts", "cts", "js", "jsx", "mjs", "cjs", "json", "jsonc"];
const MAX_FILES: usize = 20_000;
const MAX_DEPTH: usize = 32;
const CONFIG_FILE: &str = "isolate.json";

/// The optional per-app `isolate.json`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppConfig {
    entrypoint: Option<String>,
    #[serde(default)]
    envs: BTreeMap<String, String>,
    permissions: Option<serde_json::Value>,
}

pub struct AppsOrigin {
    root: PathBuf,
    /// Layer ids and file ids handed out by `boot`/`read_tree`, to the files
    /// they name. Ids are content hashes, so an entry never changes meaning.
    files_by_id: Mutex<HashMap<String, PathBuf>>,
    /// Builds apps that import packages (`npm:`, `jsr:`, `https:`) or have a
    /// `deno.json`/`package.json`, into folders under the path.
    builder: Option<(Arc<dyn AppBuilder>, PathBuf)>,
    /// Per app: its current build (by the hash of its modules), as tree
    /// entries of `node_modules`/`vendor`; or why it failed.
    builds: Mutex<HashMap<String, Arc<BuildSlot>>>,
}

/// A build's tree entries (`node_modules`, `vendor`), or why it failed.
type BuildResult = Result<Arc<Vec<(String, AssetEntry)>>, String>;
/// An app's current build: the key of the modules it was made from, and
/// its result; locked while a build of the app runs.
type BuildSlot = tokio::sync::Mutex<Option<(String, BuildResult)>>;

/// The build step for apps mode (dev mode), as the binary wires it: the same
/// `deno install` as a control-plane deployment's, on a copy of the app.
#[async_trait]
pub trait AppBuilder: Send + Sync + 'static {
    /// Runs the build in `work/src` (a copy of the app's files the builder
    /// may write), starting at `entrypoint` (a path in it); on success
    /// `node_modules/` and `vendor/` are there. The error is deno's reason
    /// in isocloud's words.
    async fn build(&self, work: &Path, entrypoint: &str) -> Result<(), String>;
}

/// The folders a build writes; an app's own copies are not served.
const BUILD_OUTPUT_DIRS: [&str; 2] = ["node_modules", "vendor"];
/// Builds kept per app folder (older ones are removed).
const KEEP_BUILDS: usize = 2;

impl AppsOrigin {
    pub fn new(root: PathBuf) -> Self {
        Self { root, files_by_id: Mutex::new(HashMap::new()), builder: None, builds: Default::default() }
    }

    /// Apps that need it are built (`builder`) into folders under `work_root`.
    pub fn with_builder(mut self, builder: Arc<dyn AppBuilder>, work_root: PathBuf) -> Self {
        self.builder = Some((builder, work_root));
        self
    }

    /// Builds app `name` (files `files`, modules hashing to `key`) unless its
    /// current build is of the same key; the build's entries.
    async fn ensure_built(
        &self,
        name: &str,
        files: &[AppFile],
        key: &str,
        entrypoint: &str,
    ) -> Result<Arc<Vec<(String, AssetEntry)>>, OriginError> {
        let Some((builder, work_root)) = &self.builder else { return Ok(Arc::new(Vec::new())) };
        // One build at a time per app; other apps' boots never wait for it.
        let slot = Arc::clone(self.builds.lock().expect("apps builds poisoned").entry(name.to_owned()).or_default());
        let mut current = slot.lock().await;
        if let Some((built_key, result)) = current.as_ref()
            && built_key == key
        {
            return result.clone().map_err(OriginError::BuildFailed);
        }
        let work = work_root.join(format!("{name}-{}", &key[..16]));
        let result = async {
            let _ = std::fs::remove_dir_all(&work);
            let src = work.join("src");
            for file in files {
                let to = src.join(file.tree_path.trim_start_matches('/'));
                if let Some(parent) = to.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                }
                std::fs::copy(&file.disk_path, &to).map_err(|e| e.to_string())?;
            }
            builder.build(&work, entrypoint).await?;
            let mut entries = Vec::new();
            for dir in BUILD_OUTPUT_DIRS {
                let out = src.join(dir);
                if out.is_dir() {
                    let (built_files, built_entries) = walk(&out).map_err(|e| e.to_string())?;
                    entries.push((format!("/{dir}"), AssetEntry::Directory));
                    for (path, entry) in built_entries.into_iter().filter(|(p, _)| !p.is_empty()) {
                        entries.push((format!("/{dir}{path}"), entry));
                    }
                    for file in built_files {
                        let bytes = std::fs::read(&file.disk_path).map_err(|e| e.to_string())?;
                        // A plain SHA-256: the runner's package store checks it.
                        let hash = hex::encode(Sha256::digest(&bytes));
                        self.remember(&hash, &file.disk_path);
                        entries.push((
                            format!("/{dir}{}", file.tree_path),
                            AssetEntry::File { size: bytes.len() as u64, hash },
                        ));
                    }
                }
            }
            Ok::<_, String>(Arc::new(entries))
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&work);
        }
        // The app's older builds go; the last few stay for boots in flight.
        if let Ok(listing) = std::fs::read_dir(work_root) {
            let prefix = format!("{name}-");
            let mut own: Vec<(std::time::SystemTime, PathBuf)> = listing
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix) && e.path() != work)
                .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                .collect();
            own.sort();
            let excess = own.len().saturating_sub(KEEP_BUILDS - 1);
            for (_, path) in own.into_iter().take(excess) {
                let _ = std::fs::remove_dir_all(path);
            }
        }
        *current = Some((key.to_owned(), result.clone()));
        result.map_err(OriginError::BuildFailed)
    }

    /// The current build's entries of app `name`, if it has one.
    async fn built_entries(&self, name: &str) -> Vec<(String, AssetEntry)> {
        let slot = self.builds.lock().expect("apps builds poisoned").get(name).cloned();
        let Some(slot) = slot else { return Vec::new() };
        match slot.lock().await.as_ref() {
            Some((_, Ok(entries))) => entries.as_ref().clone(),
            _ => Vec::new(),
        }
    }

    /// The app folder for `name`, if `name` is a plain folder name that exists.
    fn app_dir(&self, name: &str) -> Result<PathBuf, OriginError> {
        let plain = !name.is_empty()
            && name.len() <= 63
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        let dir = self.root.join(name);
        if plain && dir.is_dir() { Ok(dir) } else { Err(OriginError::DeploymentNotFound) }
    }

    fn remember(&self, id: &str, path: &Path) {
        self.files_by_id.lock().expect("apps index poisoned").insert(id.to_owned(), path.to_owned());
    }

    fn lookup(&self, id: &str) -> Option<PathBuf> {
        self.files_by_id.lock().expect("apps index poisoned").get(id).cloned()
    }
}

fn config_error(field: &str, message: impl Into<String>) -> OriginError {
    OriginError::InvalidConfig(ConfigError { field: format!("{CONFIG_FILE}: {field}"), message: message.into() })
}

fn read_app_config(dir: &Path) -> Result<AppConfig, OriginError> {
    let path = dir.join(CONFIG_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| config_error("", e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AppConfig::default()),
        Err(e) => Err(config_error("", format!("cannot read: {e}"))),
    }
}

/// One file of an app folder, with its path inside the deployment root.
struct AppFile {
    tree_path: String,
    disk_path: PathBuf,
}

/// Lists the app's files and folders (not following symlinks), bounded.
fn walk(dir: &Path) -> Result<(Vec<AppFile>, BTreeMap<String, AssetEntry>), OriginError> {
    walk_skipping(dir, &[])
}

/// [`walk`], leaving out the top-level folders named in `skip`.
fn walk_skipping(dir: &Path, skip: &[&str]) -> Result<(Vec<AppFile>, BTreeMap<String, AssetEntry>), OriginError> {
    let mut files = Vec::new();
    let mut entries = BTreeMap::from([(String::new(), AssetEntry::Directory)]);
    let mut stack = vec![(dir.to_owned(), String::new(), 0usize)];
    while let Some((disk, tree, depth)) = stack.pop() {
        let listing = std::fs::read_dir(&disk).map_err(OriginError::Cache)?;
        for item in listing {
            let item = item.map_err(OriginError::Cache)?;
            let Some(name) = item.file_name().to_str().map(str::to_owned) else { continue };
            if name == ".git" || (depth == 0 && (name == CONFIG_FILE || skip.contains(&name.as_str()))) {
                continue;
            }
            let tree_path = format!("{tree}/{name}");
            let file_type = item.file_type().map_err(OriginError::Cache)?;
            if file_type.is_dir() {
                if depth + 1 < MAX_DEPTH {
                    entries.insert(tree_path.clone(), AssetEntry::Directory);
                    stack.push((item.path(), tree_path, depth + 1));
                }
            } else if file_type.is_symlink() {
                if let Ok(target) = std::fs::read_link(item.path())
                    && let Some(target) = target.to_str()
                {
                    entries.insert(tree_path, AssetEntry::Symlink { target: target.to_owned() });
                }
            } else if file_type.is_file() {
                files.push(AppFile { tree_path, disk_path: item.path() });
                if files.len() > MAX_FILES {
                    return Err(config_error("", format!("the app has more than {MAX_FILES} files")));
                }
            }
        }
    }
    files.sort_by(|a, b| a.tree_path.cmp(&b.tree_path));
    Ok((files, entries))
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
        hasher.update([0]);
    }
    hex::encode(hasher.finalize())
}

/// An app with one of these at its root is built (apps mode with a builder).
const PROJECT_FILES: [&str; 4] = ["deno.json", "deno.jsonc", "package.json", "deno.lock"];
/// A module naming one of these imports something a build must fetch.
const BUILD_MARKERS: [&[u8]; 4] = [b"npm:", b"jsr:", b"https://", b"http://"];

impl AppsOrigin {
    /// The app's own files: with a builder, its `node_modules`/`vendor` are
    /// the build's, not whatever the folder holds.
    fn walk_app(&self, dir: &Path) -> Result<(Vec<AppFile>, BTreeMap<String, AssetEntry>), OriginError> {
        if self.builder.is_some() { walk_skipping(dir, &BUILD_OUTPUT_DIRS) } else { walk(dir) }
    }
}

fn is_module(path: &str) -> bool {
    path.rsplit_once('.').is_some_and(|(_, ext)| MODULE_EXTENSIONS.contains(&ext))
}

#[async_trait]
impl Origin for AppsOrigin {
    fn name(&self) -> &str {
        "apps"
    }

    async fn boot(&self, name: &str) -> Result<BootAnswer, OriginError> {
        let dir = self.app_dir(name)?;
        let app = read_app_config(&dir)?;
        let (files, _) = self.walk_app(&dir)?;

        let entrypoint = match &app.entrypoint {
            Some(e) if e.contains("://") => e.clone(),
            Some(e) => format!("file:///src/{}", e.trim_start_matches("./")),
            None => {
                let found = DEFAULT_ENTRYPOINTS.iter().find(|f| dir.join(f).is_file()).ok_or_else(|| {
                    config_error(
                        "entrypoint",
                        format!("none given and none of {} exists", DEFAULT_ENTRYPOINTS.join(", ")),
                    )
                })?;
                format!("file:///src/{found}")
            }
        };
        let mut layers = Vec::new();
        let mut needs_build = false;
        let mut key = Sha256::new();
        for file in files.iter().filter(|f| is_module(&f.tree_path)) {
            let source = std::fs::read(&file.disk_path).map_err(OriginError::Cache)?;
            let id = format!("apps:{}", sha256_hex(&[file.tree_path.as_bytes(), &source]));
            self.remember(&id, &file.disk_path);
            key.update(id.as_bytes());
            needs_build = needs_build
                || PROJECT_FILES.iter().any(|f| file.tree_path.strip_prefix('/') == Some(*f))
                || BUILD_MARKERS.iter().any(|marker| memchr::memmem::find(&source, marker).is_some());
            layers.push(serde_json::json!({
                "kind": "bundle",
                "id": id,
                "specifier": format!("file:///src{}", file.tree_path),
            }));
        }
        if needs_build && self.builder.is_some() {
            key.update(entrypoint.as_bytes());
            let key = hex::encode(key.finalize());
            let entry = entrypoint.strip_prefix("file:///src/").unwrap_or(&entrypoint).to_owned();
            self.ensure_built(name, &files, &key, &entry).await?;
        } else if self.builder.is_some() {
            // No build any more (its imports went): the app is as it is.
            self.builds.lock().expect("apps builds poisoned").remove(name);
        }
        let mut config = serde_json::json!({ "entrypoint": entrypoint, "layers": layers, "envs": app.envs });
        if let Some(permissions) = app.permissions {
            config["permissions"] = permissions;
        }
        let json = serde_json::to_vec(&config).expect("a json! value always serializes");
        let config = IsolateConfig::from_json(&json).map_err(|e| config_error(&e.field, e.message))?;
        Ok(BootAnswer { config, inline_layer: Bytes::new() })
    }

    async fn layer(&self, _name: &str, layer_id: &str) -> Result<Bytes, OriginError> {
        let path = self
            .lookup(layer_id)
            .ok_or_else(|| OriginError::Layer { layer_id: layer_id.to_owned(), message: "unknown layer".into() })?;
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| OriginError::Layer { layer_id: layer_id.to_owned(), message: e.to_string() })?;
        Ok(Bytes::from(bytes))
    }

    async fn read_tree(&self, name: &str) -> Result<AssetTree, OriginError> {
        let dir = self.app_dir(name)?;
        let (files, mut entries) = self.walk_app(&dir)?;
        entries.extend(self.built_entries(name).await);
        for file in files {
            let bytes = std::fs::read(&file.disk_path).map_err(OriginError::Cache)?;
            // The plain SHA-256 of the bytes, as every origin's file ids are
            // checked by the runner's package store.
            let hash = hex::encode(Sha256::digest(&bytes));
            self.remember(&hash, &file.disk_path);
            entries.insert(file.tree_path, AssetEntry::File { size: bytes.len() as u64, hash });
        }
        Ok(AssetTree { entries })
    }

    async fn read_blob(&self, _name: &str, file_id: &str) -> Result<Bytes, OriginError> {
        let path = self.lookup(file_id).ok_or_else(|| OriginError::AssetNotFound(file_id.to_owned()))?;
        let bytes = tokio::fs::read(&path).await.map_err(|_| OriginError::AssetNotFound(file_id.to_owned()))?;
        // The file may have changed since read_tree; a content address must
        // not lie.
        if hex::encode(Sha256::digest(&bytes)) != file_id {
            return Err(OriginError::AssetNotFound(file_id.to_owned()));
        }
        Ok(Bytes::from(bytes))
    }

    async fn report_activity(&self, name: &str, batch: &ActivityBatch) -> Result<(), OriginError> {
        // In the apps mode the operator is the developer: their logs go to ours.
        for event in &batch.events {
            match &event.kind {
                ActivityKind::Log { level, message, request_id } => {
                    tracing::info!(target: "isocloud::tenant", deployment = name, request_id = request_id.as_deref().unwrap_or(""), level = ?level, "{message}");
                }
                other => tracing::info!(target: "isocloud::tenant", deployment = name, event = ?other),
            }
        }
        Ok(())
    }
}
