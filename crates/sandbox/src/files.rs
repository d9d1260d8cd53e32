//! The files of one isolate: its module graph written out where deno will
//! load it, an import map that keeps every specifier pointing into the
//! layers (a remote `https:` module is never fetched), the asset manifest,
//! and the bootstrap record the harness reads first (with the tenant's envs,
//! which never reach deno's process environment).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use isocloud_eszip::ModuleKind;

use crate::uids::UidLease;
use crate::{IsolateIds, SandboxPolicy};
use isocloud_model::Deployment;
use isocloud_protocol::harness::{Assignment, NodeServers};
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
    #[error(transparent)]
    Uid(#[from] crate::UidError),
}

impl SandboxError {
    /// The runner is full (no isolate uid free): retry later, not a fault.
    pub fn is_capacity(&self) -> bool {
        matches!(self, SandboxError::Uid(e) if e.is_capacity())
    }
}

/// The on-disk layout of one isolate instance, under its own directory.
/// Paths are the runner's (host) paths; [`IsolateFiles::guest`] holds the
/// same places as the isolate sees them.
#[derive(Debug, Clone)]
pub struct IsolateFiles {
    pub dir: PathBuf,
    /// The deployment root (`file:///src/`): modules and assets, the
    /// isolate's working directory.
    pub src: PathBuf,
    /// Modules that live outside `/src` (remote ones, mostly).
    pub modules: PathBuf,
    /// Records the runner writes for the harness and deno: import map,
    /// asset manifest, bootstrap.
    pub meta: PathBuf,
    pub import_map: PathBuf,
    pub tree: PathBuf,
    pub bootstrap: PathBuf,
    /// The sockets' folder, the only place the isolate may write to.
    pub run: PathBuf,
    /// The isolate serves HTTP here.
    pub socket: PathBuf,
    /// The runner listens here for the harness's reports and asset requests.
    pub control: PathBuf,
    /// The deployment's own deno cache dir (V8 code cache), kept across
    /// boots of the same deployment and shared with no other.
    pub deno_dir: PathBuf,
    /// Mount points of the isolate's own root (mount-namespace mode only).
    pub root: Option<PathBuf>,
    pub entrypoint: Url,
    pub guest: GuestPaths,
    /// The uid and gid the isolate runs as; `None`: the runner's own.
    pub ids: Option<IsolateIds>,
    /// Its own uid (per-isolate uids), held until the last clone of these
    /// files is gone and its process has exited.
    uid_lease: Option<Arc<UidLease>>,
    /// What a build left for deno to read from disk ([`IsolateFiles::add_project`]).
    pub project: Option<Project>,
}

/// A built deployment as deno reads it: its packages (a folder of the
/// runner's package store holding `node_modules/` and/or `vendor/`, bound
/// read-only at `/src/node_modules` and `/src/vendor`) and its `deno.json`.
#[derive(Clone, Default)]
pub struct Project {
    /// The package store folder, when the build wrote packages.
    pub packages: Option<PathBuf>,
    pub node_modules: bool,
    pub vendor: bool,
    /// `/src/deno.json` (or `.jsonc`) as deno is pointed at it, when the
    /// deployment has one (and its own root: mount-namespace mode).
    pub config: Option<String>,
    /// Keeps `packages` on disk while these files (the isolate) live.
    pub lease: Option<Arc<dyn std::any::Any + Send + Sync>>,
    /// Which set `packages` is ([`package_set_key`]).
    pub packages_key: Option<String>,
}

impl std::fmt::Debug for Project {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Project")
            .field("packages", &self.packages)
            .field("node_modules", &self.node_modules)
            .field("vendor", &self.vendor)
            .field("config", &self.config)
            .field("packages_key", &self.packages_key)
            .finish_non_exhaustive()
    }
}

/// The tree folders a build writes, which the runner's package store lays out.
pub const PACKAGE_DIRS: [&str; 2] = ["/node_modules", "/vendor"];

/// Whether `path` (a tree path) is inside one of [`PACKAGE_DIRS`].
pub fn is_package_path(path: &str) -> bool {
    PACKAGE_DIRS.iter().any(|dir| path == *dir || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/')))
}

/// The name of a deployment's package set: the SHA-256 of its listing
/// (paths, kinds, file ids and sizes, link targets); `None` without one.
/// Two deployments with the same set share its layout on the runner, and
/// its pre-started isolates.
pub fn package_set_key(tree: &isocloud_model::AssetTree) -> Option<String> {
    use isocloud_model::AssetEntry;
    let mut listing = Sha256::new();
    let mut any = false;
    for (path, entry) in tree.entries.iter().filter(|(p, _)| is_package_path(p)) {
        any = true;
        listing.update(path.as_bytes());
        match entry {
            AssetEntry::Directory => listing.update(b"\0d\0"),
            AssetEntry::File { hash, size } => listing.update(format!("\0f\0{hash}\0{size}\0").as_bytes()),
            AssetEntry::Symlink { target } => listing.update(format!("\0l\0{target}\0").as_bytes()),
        }
    }
    any.then(|| hex::encode(listing.finalize()))
}

/// The deployment-root files deno reads itself at start-up (not through the
/// harness): written into `/src` before the spawn.
pub const PROJECT_CONFIG_FILES: [&str; 3] = ["deno.json", "deno.jsonc", "package.json"];

/// Where things are from inside the isolate. In mount-namespace mode the
/// isolate's root is its own: `/src` is the deployment root and no host path
/// shows; otherwise these are the host paths.
#[derive(Debug, Clone)]
pub struct GuestPaths {
    pub src: String,
    pub modules: String,
    pub meta: String,
    pub import_map: String,
    pub bootstrap: String,
    pub tree: String,
    pub socket: String,
    pub control: String,
    pub harness_dir: String,
    pub deno_dir: String,
    pub deno: String,
}

/// The fixed layout of the isolate's own root in mount-namespace mode.
pub(crate) mod jail {
    pub const SRC: &str = "/src";
    pub const MODULES: &str = "/isocloud/modules";
    pub const META: &str = "/isocloud/meta";
    pub const RUN: &str = "/isocloud/run";
    pub const HARNESS: &str = "/isocloud/harness";
    pub const DENO_DIR: &str = "/isocloud/deno-dir";
    pub const DENO: &str = "/isocloud/bin/deno";
    /// Host folders shared read-only with every isolate (libraries, CA
    /// certificates, resolver config); deno's permissions still decide what
    /// the tenant may read of them.
    pub const SHARED_DIRS: [&str; 2] = ["/usr", "/etc"];
    /// Top-level names that are symlinks into /usr on merged-usr systems.
    pub const USR_LINKS: [&str; 6] = ["bin", "sbin", "lib", "lib32", "lib64", "libx32"];
}

/// How an isolate reaches the runner's egress proxy.
#[derive(Debug, Clone)]
pub struct EgressRoute {
    /// `http://isolate:<token>@127.0.0.1:<port>`: a credential.
    pub proxy_url: String,
    /// `127.0.0.1:<port>`.
    pub proxy_authority: String,
}

/// Where the runner keeps the deno cache every new deployment cache dir
/// starts from: the harness compiled once, nothing a tenant wrote (see
/// `isocloud_pool`'s template).
pub fn deno_template_dir(policy: &SandboxPolicy) -> PathBuf {
    policy.deno_dir.with_file_name("deno-template")
}

/// Creates (or keeps) a deployment's deno cache dir — a new one as a copy of
/// the template, when there is one — marks it used now (for
/// [`prune_deno_dirs`]) and hands it to the isolate's uid (`lease`: which
/// takes it back when the uid goes back to the pool).
fn prepare_deno_dir(
    deno_dir: &Path,
    policy: &SandboxPolicy,
    ids: Option<IsolateIds>,
    lease: Option<&UidLease>,
) -> std::io::Result<()> {
    if !deno_dir.exists() {
        let template = deno_template_dir(policy);
        if template.is_dir() {
            // Into a temp name, then renamed: a half copy is never used.
            let partial = deno_dir.with_extension("partial");
            let _ = std::fs::remove_dir_all(&partial);
            copy_tree(&template, &partial)?;
            std::fs::rename(&partial, deno_dir)?;
        }
    }
    std::fs::create_dir_all(deno_dir)?;
    let now = std::time::SystemTime::now();
    std::fs::File::open(deno_dir)?.set_times(std::fs::FileTimes::new().set_accessed(now).set_modified(now))?;
    if let Some(ids) = ids {
        crate::identity::hand_over_dir(deno_dir, ids)?;
    }
    if let Some(lease) = lease {
        lease.hold_deno_dir(deno_dir)?;
    }
    Ok(())
}

/// Copies regular files and folders (no links: the template has none).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Keeps the `keep` most recently used deployment cache dirs under `root`
/// (and every one in `in_use`), removing the rest. Returns how many went.
pub fn prune_deno_dirs(root: &Path, keep: usize, in_use: &std::collections::HashSet<PathBuf>) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else { return 0 };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if dirs.len() <= keep {
        return 0;
    }
    dirs.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    let mut removed = 0;
    for (_, dir) in dirs.into_iter().skip(keep) {
        if !in_use.contains(&dir) && std::fs::remove_dir_all(&dir).is_ok() {
            removed += 1;
        }
    }
    removed
}

impl IsolateFiles {
    /// Writes `deployment` into a fresh directory `dir` (which must not exist),
    /// laid out for `policy` (with its own root when it uses a mount namespace).
    /// `deno_dir`: the deployment's cache dir (created if missing);
    /// `egress`: the isolate's way out, when it has the egress proxy.
    pub fn prepare(
        dir: &Path,
        deployment: &Deployment,
        policy: &SandboxPolicy,
        deno_dir: &Path,
        egress: Option<&EgressRoute>,
    ) -> Result<Self, SandboxError> {
        let mut files = Self::layout(dir, policy, deno_dir)?;
        files.entrypoint = deployment.config.entrypoint().clone();

        let mut imports: BTreeMap<String, String> = BTreeMap::new();
        if files.root.is_none() {
            // Without its own root, `/src` is reached through the import map.
            imports.insert("file:///src/".into(), file_url_dir(&files.src));
        }
        let mut locations: BTreeMap<&Url, PathBuf> = BTreeMap::new();
        for (specifier, module) in &deployment.modules {
            let (path, mapping) = files.place(specifier, module.kind)?;
            let written_as = file_url(&files.guest_path(&path));
            write_module(&path, &with_origin_meta(specifier, &written_as, module.kind, &module.source))?;
            match mapping {
                Mapping::Covered => {}
                Mapping::Prefix(from, to) => {
                    imports.insert(from, file_url_dir(&files.guest_path(&to)));
                }
                Mapping::Exact => {
                    imports.insert(specifier.to_string(), file_url(&files.guest_path(&path)));
                }
            }
            locations.insert(specifier, path);
        }
        for (from, to) in &deployment.redirects {
            if let Some(path) = locations.get(to) {
                let target = file_url(&files.guest_path(path));
                if let Some(neighbours_see) = files.neighbour_url(from) {
                    imports.entry(neighbours_see).or_insert_with(|| target.clone());
                }
                imports.insert(from.to_string(), target);
            }
        }
        // The import maps ESZIP layers carry: their bare (and relative)
        // keys resolve as Deno's ESZIP loader would, onto where each target
        // module was written; the runner's own mappings win.
        let mut scopes: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (base, map) in &deployment.import_maps {
            let target_of = |value: &str| -> Option<String> {
                let mut url = base.join(value).ok()?;
                // An import map does not chain: a target that the archive
                // redirects (a renaming loader's `.ts` → `.tsx`) must name
                // where the redirect ends.
                for _ in 0..MAX_REDIRECT_HOPS {
                    match deployment.redirects.get(&url) {
                        Some(next) => url = next.clone(),
                        None => break,
                    }
                }
                if let Some(path) = locations.get(&url) {
                    return Some(file_url(&files.guest_path(path)));
                }
                match url.path().strip_prefix("/src/") {
                    Some(rest) if url.scheme() == "file" && url.host().is_none() => {
                        Some(format!("{}/{rest}", file_url_dir(Path::new(&files.guest.src)).trim_end_matches('/')))
                    }
                    _ => Some(url.to_string()),
                }
            };
            let key_of = |key: &str| -> String {
                if key.starts_with("./") || key.starts_with("../") || key.starts_with('/') {
                    base.join(key).map(String::from).unwrap_or_else(|_| key.to_owned())
                } else {
                    key.to_owned()
                }
            };
            let entries_of = |value: &serde_json::Value| -> Vec<(String, String)> {
                value
                    .as_object()
                    .map(|object| {
                        object
                            .iter()
                            .filter_map(|(key, target)| Some((key_of(key), target_of(target.as_str()?)?)))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            for (key, target) in entries_of(&map["imports"]) {
                imports.entry(key).or_insert(target);
            }
            if let Some(map_scopes) = map["scopes"].as_object() {
                for (scope, entries) in map_scopes {
                    let Some(scope) = target_of(scope) else { continue };
                    let scope = scopes.entry(scope).or_default();
                    for (key, target) in entries_of(entries) {
                        scope.entry(key).or_insert(target);
                    }
                }
            }
        }
        let import_map = serde_json::json!({ "imports": imports, "scopes": scopes });
        std::fs::write(&files.import_map, serde_json::to_vec_pretty(&import_map).expect("json value"))?;
        if !deployment.tree_deferred {
            std::fs::write(&files.tree, harness_tree(&deployment.tree))?;
        }

        let bootstrap = serde_json::json!({
            "socket_path": files.guest.socket,
            "control_path": files.guest.control,
            "entrypoint": deployment.config.entrypoint().as_str(),
            "src_root": files.guest.src,
            "tree_path": files.guest.tree,
            // The runner writes the tree when the harness first asks for it.
            "tree_deferred": deployment.tree_deferred,
            // The harness fetches this through the proxy before it installs
            // the tenant's envs: deno reads the proxy variables when it
            // builds its HTTP client, which it does on the first fetch.
            "egress_probe": egress.map(|route| format!("http://{}/", route.proxy_authority)),
            // The tenant's envs: never in deno's process environment (the
            // loader, V8 and deno read theirs at exec), the harness sets them
            // before tenant code runs.
            "envs": deployment.config.envs(),
            "node_servers": may_start_node_servers(deployment),
        });
        files.write_bootstrap(&bootstrap)?;
        Ok(files)
    }

    /// Lays out a fresh directory `dir` for an isolate started before it is
    /// given a deployment (the pool's pre-started isolates): an empty `/src`,
    /// an empty import map, and a bootstrap that makes the harness wait for
    /// its assignment on the control socket. Its deno cache dir is its own,
    /// inside `dir`, started from the template; [`IsolateFiles::fill`] may
    /// hand it to the deployment.
    pub fn prepare_blank(
        dir: &Path,
        policy: &SandboxPolicy,
        egress: Option<&EgressRoute>,
    ) -> Result<Self, SandboxError> {
        let files = Self::layout(dir, policy, &dir.join("deno-dir"))?;
        std::fs::write(&files.import_map, br#"{"imports":{}}"#)?;
        std::fs::write(&files.tree, br#"{"entries":{}}"#)?;
        let bootstrap = serde_json::json!({
            "prestart": true,
            "socket_path": files.guest.socket,
            "control_path": files.guest.control,
            "egress_probe": egress.map(|route| format!("http://{}/", route.proxy_authority)),
            // Where a package set bound later (before deno starts) is seen:
            // the harness loads its packages' entry modules while it waits.
            "packages_dir": format!("{}/node_modules", files.guest.src),
        });
        files.write_bootstrap(&bootstrap)?;
        Ok(files)
    }

    /// The bootstrap record holds the tenant's envs (its secrets): readable
    /// by the isolate's uid alone, whatever the runner's umask.
    fn write_bootstrap(&self, bootstrap: &serde_json::Value) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&self.bootstrap)?;
        file.write_all(&serde_json::to_vec(bootstrap).expect("json value"))?;
        if let Some(ids) = self.ids {
            std::os::unix::fs::fchown(&file, Some(ids.uid), Some(ids.gid))?;
        }
        Ok(())
    }

    /// Whether `deployment` can run in an isolate laid out by
    /// [`IsolateFiles::prepare_blank`], and if not, why. Such an isolate
    /// read its import map when it started, so the deployment must not need
    /// one: every module under `file:///src/` where deno finds it unmapped
    /// (its own root: a mount namespace). Its envs do not matter: no isolate
    /// starts with the tenant's envs, the harness installs them on either path.
    pub fn fits_blank(&self, deployment: &Deployment) -> Result<(), &'static str> {
        if deployment
            .tree
            .entries
            .keys()
            .any(|path| PROJECT_CONFIG_FILES.iter().any(|f| path.strip_prefix('/') == Some(*f)))
        {
            return Err("deno reads deno.json and package.json when it starts");
        }
        // A built deployment fits only an isolate started with its package set.
        let blank_set = self.project.as_ref().and_then(|p| p.packages_key.as_deref());
        if package_set_key(&deployment.tree).as_deref() != blank_set {
            return Err("it needs a pre-started isolate of its own package set");
        }
        if self.root.is_none() {
            return Err("isolates have no mount namespace");
        }
        if deployment.npm.is_some() {
            return Err("its ESZIP's npm packages are bound before deno starts");
        }
        if !deployment.redirects.is_empty() {
            return Err("the module graph has redirects");
        }
        if !deployment.import_maps.is_empty() {
            return Err("its ESZIP carries an import map");
        }
        for (specifier, module) in &deployment.modules {
            match self.place(specifier, module.kind) {
                Ok((_, Mapping::Covered)) => {}
                _ => return Err("a module needs the import map"),
            }
        }
        Ok(())
    }

    /// Writes `deployment` into an isolate laid out by
    /// [`IsolateFiles::prepare_blank`] (after [`IsolateFiles::fits_blank`]
    /// said yes), and returns its files as they now are, with what the
    /// harness is told ([`IsolateFiles::assignment`]). When the deployment
    /// has no deno cache dir yet (`deployment_deno_dir`), the isolate's own
    /// becomes it: later boots find what this one compiles.
    pub fn fill(&self, deployment: &Deployment, deployment_deno_dir: &Path) -> Result<Self, SandboxError> {
        let mut files = self.clone();
        files.entrypoint = deployment.config.entrypoint().clone();
        for (specifier, module) in &deployment.modules {
            match files.place(specifier, module.kind)? {
                (path, Mapping::Covered) => write_module(&path, &module.source)?,
                _ => return Err(SandboxError::BadSpecifier(specifier.to_string())),
            }
        }
        files.write_tree(&deployment.tree)?;
        if let Some(root) = deployment_deno_dir.parent() {
            std::fs::create_dir_all(root)?;
        }
        if !deployment_deno_dir.exists() && std::fs::rename(&self.deno_dir, deployment_deno_dir).is_ok() {
            let now = std::time::SystemTime::now();
            std::fs::File::open(deployment_deno_dir)?
                .set_times(std::fs::FileTimes::new().set_accessed(now).set_modified(now))?;
            files.deno_dir = deployment_deno_dir.to_owned();
        }
        Ok(files)
    }

    /// What the harness of a pre-started isolate is told when it gets
    /// `deployment`: where to start, and the environment the tenant sees.
    pub fn assignment(&self, deployment: &Deployment) -> Assignment {
        Assignment {
            entrypoint: deployment.config.entrypoint().as_str().to_owned(),
            src_root: self.guest.src.clone(),
            tree_path: self.guest.tree.clone(),
            tree_deferred: deployment.tree_deferred,
            envs: deployment.config.envs().clone(),
            node_servers: may_start_node_servers(deployment),
        }
    }

    /// The directories of a fresh isolate instance, its deno cache dir
    /// included; no deployment in them yet. Takes the isolate's uid (its
    /// own, per-isolate uids) first: everything it writes to is handed to it.
    fn layout(dir: &Path, policy: &SandboxPolicy, deno_dir: &Path) -> Result<Self, SandboxError> {
        let (ids, uid_lease) = match &policy.isolate_uids {
            Some(uids) => {
                let (ids, lease) = uids.take()?;
                (Some(ids), lease)
            }
            None => (None, None),
        };
        std::fs::create_dir_all(dir)?;
        prepare_deno_dir(deno_dir, policy, ids, uid_lease.as_deref())?;
        let meta = dir.join("meta");
        let run = dir.join("run");
        let host = |p: &Path| p.to_string_lossy().into_owned();
        let guest = if policy.mount_namespace {
            GuestPaths {
                src: jail::SRC.into(),
                modules: jail::MODULES.into(),
                meta: jail::META.into(),
                import_map: format!("{}/import_map.json", jail::META),
                bootstrap: format!("{}/bootstrap.json", jail::META),
                tree: format!("{}/tree.json", jail::META),
                socket: format!("{}/isolate.sock", jail::RUN),
                control: format!("{}/control.sock", jail::RUN),
                harness_dir: jail::HARNESS.into(),
                deno_dir: jail::DENO_DIR.into(),
                deno: jail::DENO.into(),
            }
        } else {
            GuestPaths {
                src: host(&dir.join("src")),
                modules: host(&dir.join("modules")),
                meta: host(&meta),
                import_map: host(&meta.join("import_map.json")),
                bootstrap: host(&meta.join("bootstrap.json")),
                tree: host(&meta.join("tree.json")),
                socket: host(&run.join("isolate.sock")),
                control: host(&run.join("control.sock")),
                harness_dir: host(&policy.harness_dir),
                deno_dir: host(deno_dir),
                deno: host(&policy.deno),
            }
        };
        let files = Self {
            dir: dir.to_owned(),
            src: dir.join("src"),
            modules: dir.join("modules"),
            import_map: meta.join("import_map.json"),
            tree: meta.join("tree.json"),
            bootstrap: meta.join("bootstrap.json"),
            socket: run.join("isolate.sock"),
            control: run.join("control.sock"),
            deno_dir: deno_dir.to_owned(),
            meta,
            run,
            root: policy.mount_namespace.then(|| dir.join("root")),
            entrypoint: Url::parse("file:///src/").expect("static url"),
            guest,
            ids,
            uid_lease,
            project: None,
        };
        std::fs::create_dir(&files.meta)?;
        std::fs::create_dir(&files.run)?;
        if let Some(ids) = files.ids {
            // The isolate creates its socket here; nobody else but the runner
            // (root) may enter.
            std::os::unix::fs::lchown(&files.run, Some(ids.uid), Some(ids.gid))?;
            std::fs::set_permissions(&files.run, std::fs::Permissions::from_mode(0o700))?;
        }
        if let Some(root) = &files.root {
            make_mount_points(root)?;
        }
        std::fs::create_dir(&files.src)?;
        std::fs::create_dir(&files.modules)?;
        Ok(files)
    }

    /// Makes this a built deployment's isolate: `packages` (a package store
    /// folder) shows at `/src/node_modules` and `/src/vendor`, and `configs`
    /// (name → bytes, of [`PROJECT_CONFIG_FILES`]) are written into `/src`.
    pub fn add_project(&mut self, packages: Option<&Path>, configs: &[(String, Vec<u8>)]) -> Result<(), SandboxError> {
        let mut project = Project::default();
        if let Some(packages) = packages {
            project.node_modules = packages.join("node_modules").is_dir();
            project.vendor = packages.join("vendor").is_dir();
            for (present, name) in [(project.node_modules, "node_modules"), (project.vendor, "vendor")] {
                if !present {
                    continue;
                }
                let target = self.src.join(name);
                if self.root.is_some() {
                    // A mount point: the jail binds the store's folder here.
                    std::fs::create_dir_all(&target)?;
                } else {
                    std::os::unix::fs::symlink(packages.join(name), &target)?;
                }
            }
            project.packages = Some(packages.to_owned());
        }
        for (name, bytes) in configs {
            if !PROJECT_CONFIG_FILES.contains(&name.as_str()) {
                return Err(SandboxError::BadAssetPath(name.clone()));
            }
            self.materialize_asset(&format!("/{name}"), bytes)?;
        }
        // deno reads deno.json's imports and compiler options; the runner's
        // import map would override them, so only an isolate of its own root
        // (no import map needed for /src) uses it.
        if self.root.is_some() {
            project.config = ["deno.json", "deno.jsonc"]
                .iter()
                .find(|name| configs.iter().any(|(n, _)| n == *name))
                .map(|name| format!("{}/{name}", jail::SRC));
        }
        self.project = Some(project);
        Ok(())
    }

    /// Its own uid's lease (per-isolate uids), for the command that starts it.
    pub(crate) fn uid_lease(&self) -> Option<&Arc<UidLease>> {
        self.uid_lease.as_ref()
    }

    /// The isolate's name for a host path under the instance directory.
    fn guest_path(&self, host: &Path) -> PathBuf {
        let swap = |from: &Path, to: &str| host.strip_prefix(from).ok().map(|rest| Path::new(to).join(rest));
        swap(&self.src, &self.guest.src)
            .or_else(|| swap(&self.modules, &self.guest.modules))
            .or_else(|| swap(&self.meta, &self.guest.meta))
            .unwrap_or_else(|| host.to_owned())
    }

    /// The root a specifier's module is written under, the path segments
    /// below it, and the import-map prefix that reaches the root (if any).
    fn root_of(&self, specifier: &Url) -> Result<Placement, SandboxError> {
        let bad = || SandboxError::BadSpecifier(specifier.to_string());
        let (root, segments, prefix) = match specifier.scheme() {
            "file" => {
                let segments = decoded_segments(specifier).ok_or_else(bad)?;
                match specifier.host_str().filter(|h| !h.is_empty()) {
                    // `file://<slug>/v1/…`, as some subhosters' bundlers write
                    // them: a root per host, so two hosts never collide.
                    Some(host) => {
                        check_segment(host).ok_or_else(bad)?;
                        let root = self.modules.join("file-host").join(host);
                        (root.clone(), segments, Some((format!("file://{host}/"), root)))
                    }
                    None if segments.first().map(String::as_str) == Some("src") && segments.len() > 1 => {
                        (self.src.clone(), segments[1..].to_vec(), None)
                    }
                    None => (self.modules.join("file"), segments, None),
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
            // A custom scheme (`netlify:bootstrap-stage2`): one file per
            // specifier, reached through the import map by its exact name.
            scheme if specifier.cannot_be_a_base() && check_segment(scheme).is_some() => {
                let digest = hex::encode(&Sha256::digest(specifier.as_str().as_bytes())[..12]);
                (self.modules.join("scheme").join(scheme), vec![digest], None)
            }
            _ => return Err(bad()),
        };
        Ok(Placement { root, segments, prefix })
    }

    /// The URL a module's neighbour reaches when it imports `specifier`
    /// relatively: the neighbour runs from where it was written, so the
    /// import resolves under that root. A redirect's source has no file
    /// there; the import map must send this URL to the redirect's target.
    fn neighbour_url(&self, specifier: &Url) -> Option<String> {
        if specifier.cannot_be_a_base() || specifier.query().is_some() {
            return None;
        }
        let Placement { root, segments, .. } = self.root_of(specifier).ok()?;
        let path = segments.iter().fold(root, |path, segment| path.join(segment));
        let url = file_url(&self.guest_path(&path));
        (url != specifier.as_str()).then_some(url)
    }

    /// Where a module goes on disk and how the import map reaches it.
    fn place(&self, specifier: &Url, kind: ModuleKind) -> Result<(PathBuf, Mapping), SandboxError> {
        let bad = || SandboxError::BadSpecifier(specifier.to_string());
        let Placement { root, segments, prefix } = self.root_of(specifier)?;
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

    /// The asset manifest the harness reads (atomically: it never sees half
    /// of one): at boot, or when the harness first asks for a deferred one.
    pub fn write_tree(&self, tree: &isocloud_model::AssetTree) -> std::io::Result<()> {
        let partial = self.tree.with_extension("partial");
        std::fs::write(&partial, harness_tree(tree))?;
        std::fs::rename(&partial, &self.tree)
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

/// The manifest the harness reads, without the package folders: those are
/// on the isolate's disk (bound from the package store), where the harness
/// looks first, so a Hono app's 600 package entries cost no boot a parse.
fn harness_tree(tree: &isocloud_model::AssetTree) -> Vec<u8> {
    let entries: BTreeMap<&str, &isocloud_model::AssetEntry> =
        tree.entries.iter().filter(|(path, _)| !is_package_path(path)).map(|(p, e)| (p.as_str(), e)).collect();
    // `{"entries": …}`, the shape of `AssetTree`, written straight from the
    // borrowed entries (no copy of the tree as JSON values first).
    let mut out = br#"{"entries":"#.to_vec();
    serde_json::to_writer(&mut out, &entries).expect("tree serializes");
    out.push(b'}');
    out
}

/// Whether the harness must take over `node:http`'s `listen()` before the
/// tenant's code runs (it costs the cold start the loading of node:http):
/// `true` when one of its modules names the module, `"if-packages-use-it"`
/// when it has npm packages (the harness checks the package store's mark,
/// `node_modules/.isocloud-uses-node-http`), else `false`.
fn may_start_node_servers(deployment: &Deployment) -> NodeServers {
    const NEEDLES: [&[u8]; 4] = [b"node:http", b"\"http\"", b"'http'", b"express"];
    let named = deployment
        .modules
        .values()
        .any(|module| NEEDLES.iter().any(|needle| memchr::memmem::find(&module.source, needle).is_some()));
    if named {
        NodeServers::Always
    } else if deployment.tree.entries.contains_key("/node_modules") {
        NodeServers::IfPackagesUseIt
    } else {
        NodeServers::Never
    }
}

/// The empty root the isolate's mounts go onto: every mount point, and the
/// merged-usr symlinks of the host.
pub(crate) fn make_mount_points(root: &Path) -> std::io::Result<()> {
    for dir in [
        jail::SRC,
        jail::MODULES,
        jail::META,
        jail::RUN,
        jail::HARNESS,
        jail::DENO_DIR,
        "/isocloud/bin",
        "/dev",
        "/proc",
        "/tmp",
    ]
    .into_iter()
    .chain(jail::SHARED_DIRS)
    {
        std::fs::create_dir_all(root.join(&dir[1..]))?;
    }
    // An isolate of another uid must pass through every mount point's parent
    // (whatever the runner's umask).
    for dir in ["", "isocloud", "isocloud/bin"] {
        std::fs::set_permissions(root.join(dir), std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::write(root.join(&jail::DENO[1..]), b"")?;
    for name in jail::USR_LINKS {
        let host = Path::new("/").join(name);
        match std::fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() => {
                std::os::unix::fs::symlink(std::fs::read_link(&host)?, root.join(name))?;
            }
            Ok(meta) if meta.is_dir() => std::fs::create_dir_all(root.join(name))?,
            _ => {}
        }
    }
    Ok(())
}

/// Redirect chains longer than this are left unresolved (Deno's own loader
/// gives up after 10 as well).
const MAX_REDIRECT_HOPS: usize = 10;

/// A module's `import.meta` as the origin named it: Deno's ESZIP loader runs
/// a module under its specifier (`file://slug/v1/main.ts`, `https://…`,
/// `netlify:…`), while this isolate loads it from where it was written.
/// Only a module that reads `import.meta` gets the one-line prelude (on the
/// first line, so stack traces keep their line numbers); a file that does
/// not mention it may be CommonJS, where `import.meta` is a syntax error.
fn with_origin_meta<'a>(
    specifier: &Url,
    written_as: &str,
    kind: ModuleKind,
    source: &'a [u8],
) -> std::borrow::Cow<'a, [u8]> {
    use std::borrow::Cow;
    if kind != ModuleKind::JavaScript
        || specifier.as_str() == written_as
        || memchr::memmem::find(source, b"import.meta").is_none()
    {
        return Cow::Borrowed(source);
    }
    let url = serde_json::to_string(specifier.as_str()).expect("a string serializes");
    let local_path = (specifier.scheme() == "file" && specifier.host_str().is_none_or(str::is_empty))
        .then(|| specifier.to_file_path().ok())
        .flatten();
    let (filename, dirname) = match &local_path {
        Some(path) => (
            serde_json::to_string(&path.to_string_lossy()).expect("a string serializes"),
            serde_json::to_string(&path.parent().unwrap_or(Path::new("/")).to_string_lossy())
                .expect("a string serializes"),
        ),
        None => ("undefined".to_owned(), "undefined".to_owned()),
    };
    // Relative specifiers resolve against the origin's URL, as in Deno's
    // loader; bare ones through the import map, as before.
    let prelude = format!(
        "{{const m=import.meta,r=m.resolve;m.url={url};m.filename={filename};m.dirname={dirname};\
         m.resolve=(s)=>/^\\.{{0,2}}\\//.test(s)?new URL(s,{url}).href:r(s);}}"
    );
    // A hashbang must stay the first line.
    let at = if source.starts_with(b"#!") {
        memchr::memchr(b'\n', source).map_or(source.len(), |newline| newline + 1)
    } else {
        0
    };
    let mut out = Vec::with_capacity(source.len() + prelude.len() + 1);
    out.extend_from_slice(&source[..at]);
    if at == source.len() && at > 0 && !source.ends_with(b"\n") {
        out.push(b'\n');
    }
    out.extend_from_slice(prelude.as_bytes());
    out.extend_from_slice(&source[at..]);
    Cow::Owned(out)
}

fn write_module(path: &Path, source: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, source)
}

/// Where a specifier's module is written: a root, the path segments below
/// it, and the import-map prefix that reaches the root (if any).
struct Placement {
    root: PathBuf,
    segments: Vec<String>,
    prefix: Option<(String, PathBuf)>,
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
