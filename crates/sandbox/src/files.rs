//! The files of one isolate: its module graph written out where deno will
//! load it, an import map that keeps every specifier pointing into the
//! layers (a remote `https:` module is never fetched), the asset manifest,
//! and the bootstrap record the harness reads first.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use isocloud_eszip::ModuleKind;
use isocloud_origin::Deployment;
use sha2::{Digest, Sha256};
use url::Url;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot prepare isolate files: {0}")]
    Io(#[from] std::io::Error),
    #[error("module specifier {0} cannot be placed in the deployment root")]
    BadSpecifier(String),
    #[error("asset path {0:?} is not inside the deployment root")]
    BadAssetPath(String),
}

/// The on-disk layout of one isolate instance, under its own directory.
#[derive(Debug, Clone)]
pub struct IsolateFiles {
    pub dir: PathBuf,
    /// The deployment root (`file:///src/`): modules and assets, the
    /// isolate's working directory.
    pub src: PathBuf,
    /// Modules that live outside `/src` (remote ones, mostly).
    pub modules: PathBuf,
    pub import_map: PathBuf,
    pub tree: PathBuf,
    pub bootstrap: PathBuf,
    /// The isolate serves HTTP here.
    pub socket: PathBuf,
    /// The runner listens here for the harness's reports and asset requests.
    pub control: PathBuf,
    pub entrypoint: Url,
}

/// Names deno reads at start-up that the runner sets unless the tenant
/// configured them; the harness removes every name the tenant did not configure.
pub(crate) const RUNNER_ENV: [&str; 3] = ["DENO_DIR", "DENO_NO_UPDATE_CHECK", "NO_COLOR"];

impl IsolateFiles {
    /// Writes `deployment` into a fresh directory `dir` (which must not exist).
    pub fn prepare(dir: &Path, deployment: &Deployment, harness_dir: &Path) -> Result<Self, SandboxError> {
        std::fs::create_dir_all(dir)?;
        let files = Self {
            dir: dir.to_owned(),
            src: dir.join("src"),
            modules: dir.join("modules"),
            import_map: dir.join("import_map.json"),
            tree: dir.join("tree.json"),
            bootstrap: dir.join("bootstrap.json"),
            socket: dir.join("isolate.sock"),
            control: dir.join("control.sock"),
            entrypoint: deployment.config.entrypoint.clone(),
        };
        std::fs::create_dir(&files.src)?;
        std::fs::create_dir(&files.modules)?;

        let mut imports: BTreeMap<String, String> = BTreeMap::new();
        imports.insert("file:///src/".into(), file_url_dir(&files.src));
        let mut locations: BTreeMap<&Url, PathBuf> = BTreeMap::new();
        for (specifier, module) in &deployment.modules {
            let (path, mapping) = files.place(specifier, module.kind)?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, &module.source)?;
            match mapping {
                Mapping::Covered => {}
                Mapping::Prefix(from, to) => {
                    imports.insert(from, file_url_dir(&to));
                }
                Mapping::Exact => {
                    imports.insert(specifier.to_string(), file_url(&path));
                }
            }
            locations.insert(specifier, path);
        }
        for (from, to) in &deployment.redirects {
            if let Some(path) = locations.get(to) {
                imports.insert(from.to_string(), file_url(path));
            }
        }
        let import_map = serde_json::json!({ "imports": imports });
        std::fs::write(&files.import_map, serde_json::to_vec_pretty(&import_map).expect("json value"))?;
        std::fs::write(&files.tree, serde_json::to_vec(&deployment.tree).expect("tree serializes"))?;

        let env_names: Vec<&str> = deployment.config.envs.keys().map(String::as_str).collect();
        let bootstrap = serde_json::json!({
            "socket_path": files.socket,
            "control_path": files.control,
            "entrypoint": deployment.config.entrypoint.as_str(),
            "src_root": files.src,
            "tree_path": files.tree,
            "env_names": env_names,
            "harness_dir": harness_dir,
        });
        std::fs::write(&files.bootstrap, serde_json::to_vec(&bootstrap).expect("json value"))?;
        Ok(files)
    }

    /// Where a module goes on disk and how the import map reaches it.
    fn place(&self, specifier: &Url, kind: ModuleKind) -> Result<(PathBuf, Mapping), SandboxError> {
        let bad = || SandboxError::BadSpecifier(specifier.to_string());
        let (root, segments, prefix) = match specifier.scheme() {
            "file" => {
                let segments = decoded_segments(specifier).ok_or_else(bad)?;
                if segments.first().map(String::as_str) == Some("src") && segments.len() > 1 {
                    (self.src.clone(), segments[1..].to_vec(), None)
                } else {
                    (self.modules.join("file"), segments, None)
                }
            }
            "http" | "https" => {
                let host = specifier.host_str().ok_or_else(bad)?;
                let host_dir = match specifier.port() {
                    Some(port) => format!("{host}_{port}"),
                    None => host.to_owned(),
                };
                check_segment(&host_dir).ok_or_else(bad)?;
                let root = self.modules.join(specifier.scheme()).join(&host_dir);
                let authority = &specifier[url::Position::BeforeHost..url::Position::AfterPort];
                let prefix = format!("{}://{authority}/", specifier.scheme());
                (root.clone(), decoded_segments(specifier).ok_or_else(bad)?, Some((prefix, root)))
            }
            _ => return Err(bad()),
        };
        let mut path = root.clone();
        for segment in &segments {
            path.push(segment);
        }
        if segments.is_empty() || specifier.path().ends_with('/') {
            path.push("index");
        }
        let mut exact = specifier.query().is_some() || segments.is_empty() || specifier.path().ends_with('/');
        if let Some(query) = specifier.query() {
            let digest = hex::encode(&Sha256::digest(query.as_bytes())[..8]);
            let name = format!("{}_q{digest}", path.file_name().and_then(|n| n.to_str()).unwrap_or("index"));
            path.set_file_name(name);
        }
        // deno picks a file's media type by its extension.
        let wanted = match kind {
            ModuleKind::JavaScript => None,
            ModuleKind::Json => Some("json"),
            ModuleKind::Wasm => Some("wasm"),
        };
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let script_ext = ["js", "mjs", "cjs", "jsx", "ts", "mts", "cts", "tsx"].contains(&ext);
        let fits = match wanted {
            None => script_ext,
            Some(w) => ext == w,
        };
        if !fits {
            let name =
                format!("{}.{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("index"), wanted.unwrap_or("js"));
            path.set_file_name(name);
            exact = true;
        }
        if !path.starts_with(&root) {
            return Err(bad());
        }
        let mapping = match (exact, prefix) {
            (true, _) => Mapping::Exact,
            (false, Some((from, to))) => Mapping::Prefix(from, to),
            (false, None) if root == self.src => Mapping::Covered,
            (false, None) => Mapping::Exact,
        };
        Ok((path, mapping))
    }

    /// Writes an asset's bytes at its manifest path (atomically: a reader
    /// never sees half a file).
    pub fn materialize_asset(&self, tree_path: &str, bytes: &[u8]) -> Result<PathBuf, SandboxError> {
        let bad = || SandboxError::BadAssetPath(tree_path.to_owned());
        let relative = tree_path.strip_prefix('/').ok_or_else(bad)?;
        let mut path = self.src.clone();
        for component in Path::new(relative).components() {
            match component {
                Component::Normal(part) => path.push(part),
                _ => return Err(bad()),
            }
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // Modules of the graph share the root with assets; a module already
        // written there is the same file, and stays.
        if path.exists() {
            return Ok(path);
        }
        let tmp = path
            .with_file_name(format!(".{}.isocloud-tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("asset")));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }
}

enum Mapping {
    /// Reached through the `file:///src/` prefix entry.
    Covered,
    Prefix(String, PathBuf),
    Exact,
}

fn check_segment(segment: &str) -> Option<()> {
    let ok = !segment.is_empty() && segment != "." && segment != ".." && !segment.contains(['/', '\0', '\\']);
    ok.then_some(())
}

fn decoded_segments(url: &Url) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for raw in url.path_segments()? {
        if raw.is_empty() {
            continue;
        }
        let decoded = percent_decode(raw)?;
        check_segment(&decoded)?;
        out.push(decoded);
    }
    Some(out)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn file_url(path: &Path) -> String {
    Url::from_file_path(path).expect("isolate paths are absolute").to_string()
}

fn file_url_dir(path: &Path) -> String {
    Url::from_directory_path(path).expect("isolate paths are absolute").to_string()
}

#[cfg(test)]
mod tests;
