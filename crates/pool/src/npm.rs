//! An ESZIP's npm snapshot laid out as a package-store set: every package
//! the snapshot names is fetched from the runner's npm registry, its tarball
//! checked against the registry's `sha512` integrity, unpacked read-only in
//! deno's `node_modules/.deno/<id>/node_modules/<name>` layout, and linked to
//! its dependencies as the snapshot resolved them; each `npm:` request of the
//! modules gets its top-level `node_modules/<name>`. The isolate then starts
//! offline with `--node-modules-dir=manual`, as a built deployment does.
//!
//! The snapshot is tenant input: names, versions and ids are checked before
//! they become paths or URLs; a tarball comes only from the registry's own
//! origin; sizes, file counts and package counts are bounded; a tarball's
//! links, devices and paths that leave the package are not unpacked. This
//! module must not run anything it unpacks (npm lifecycle scripts never run).

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use futures_util::{StreamExt, TryStreamExt};
use isocloud_eszip::NpmSnapshot;
use sha2::{Digest, Sha512};
use url::Url;

/// Packages one snapshot may name.
pub(crate) const MAX_PACKAGES: usize = 4000;
/// One package's tarball, as fetched.
const MAX_TARBALL_BYTES: u64 = 64 * 1024 * 1024;
/// One package's registry document (abbreviated form).
const MAX_PACKUMENT_BYTES: u64 = 32 * 1024 * 1024;
/// All files of one set, unpacked.
const MAX_SET_BYTES: u64 = 1024 * 1024 * 1024;
/// Files (and folders) of one set.
const MAX_SET_FILES: u64 = 300_000;
/// Registry requests at once while a set is laid out.
const PARALLEL_FETCHES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub(crate) enum NpmError {
    /// The registry does not have it: the deployment names a package that
    /// cannot be had (the user's error, `MODULE_NOT_FOUND`).
    #[error("the npm registry {registry} has no package {package}")]
    Missing { package: String, registry: String },
    #[error("the ESZIP's npm snapshot is not usable: {0}")]
    BadSnapshot(String),
    #[error("npm package {package}: {message}")]
    BadPackage { package: String, message: String },
    #[error("npm registry {registry}: {message}")]
    Registry { registry: String, message: String },
    #[error("package store: {0}")]
    Io(#[from] std::io::Error),
}

/// The registry the runner fetches snapshot packages from.
#[derive(Debug, Clone)]
pub struct NpmRegistry {
    base: Url,
    client: reqwest::Client,
}

impl NpmRegistry {
    /// `base` must end in `/` (`https://registry.npmjs.org/`); `timeout`
    /// bounds each request.
    pub fn new(base: Url, timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a client without custom TLS builds");
        Self { base, client }
    }

    /// npm's public registry.
    pub fn public(timeout: Duration) -> Self {
        Self::new(Url::parse("https://registry.npmjs.org/").expect("static url"), timeout)
    }

    fn registry_error(&self, message: impl Into<String>) -> NpmError {
        NpmError::Registry { registry: self.base.to_string(), message: message.into() }
    }

    /// A GET of `url`, its body read up to `max_bytes`; `Ok(None)` on 404.
    async fn get(&self, url: &Url, accept: &str, max_bytes: u64) -> Result<Option<Vec<u8>>, NpmError> {
        let response = self
            .client
            .get(url.clone())
            .header(reqwest::header::ACCEPT, accept)
            .send()
            .await
            .map_err(|e| self.registry_error(format!("GET {url}: {e}")))?;
        match response.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            status => return Err(self.registry_error(format!("GET {url} answered HTTP {status}"))),
        }
        if response.content_length().is_some_and(|n| n > max_bytes) {
            return Err(self.registry_error(format!("GET {url}: larger than {max_bytes} bytes")));
        }
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.registry_error(format!("GET {url}: {e}")))?;
            if body.len() as u64 + chunk.len() as u64 > max_bytes {
                return Err(self.registry_error(format!("GET {url}: larger than {max_bytes} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Some(body))
    }

    /// Where to fetch `name@version` and the hash it must have.
    async fn dists(&self, name: String, versions: Vec<String>) -> Result<Vec<((String, String), Dist)>, NpmError> {
        // A scoped name is one path segment: `@scope%2fname`.
        let url = self
            .base
            .join(&name.replace('/', "%2f"))
            .map_err(|e| NpmError::BadSnapshot(format!("package name {name:?}: {e}")))?;
        const ABBREVIATED: &str = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8";
        let Some(body) = self.get(&url, ABBREVIATED, MAX_PACKUMENT_BYTES).await? else {
            let package = versions.iter().map(|v| format!("{name}@{v}")).collect::<Vec<_>>().join(", ");
            return Err(NpmError::Missing { package, registry: self.base.to_string() });
        };
        let document: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| self.registry_error(format!("the document of {name} is not JSON: {e}")))?;
        let mut out = Vec::with_capacity(versions.len());
        for version in versions {
            let package = format!("{name}@{version}");
            let dist = &document["versions"][&version]["dist"];
            if dist.is_null() {
                return Err(NpmError::Missing { package, registry: self.base.to_string() });
            }
            let tarball = dist["tarball"]
                .as_str()
                .and_then(|t| Url::parse(t).ok())
                .ok_or_else(|| NpmError::BadPackage { package: package.clone(), message: "no tarball URL".into() })?;
            if tarball.origin() != self.base.origin() {
                return Err(NpmError::BadPackage {
                    package,
                    message: format!("its tarball {tarball} is not on the registry {}", self.base),
                });
            }
            let sha512 = dist["integrity"]
                .as_str()
                .unwrap_or("")
                .split_whitespace()
                .find_map(|hash| hash.strip_prefix("sha512-"))
                .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
                .filter(|digest| digest.len() == 64)
                .ok_or_else(|| NpmError::BadPackage {
                    package: package.clone(),
                    message: "the registry gives no sha512 integrity for it".into(),
                })?;
            out.push(((name.clone(), version), Dist { tarball, sha512 }));
        }
        Ok(out)
    }
}

struct Dist {
    tarball: Url,
    sha512: Vec<u8>,
}

/// The package store's name for a snapshot's set: the SHA-256 of what it
/// resolves to (two deployments with the same packages share one folder).
pub(crate) fn set_key(snapshot: &NpmSnapshot) -> String {
    let mut hash = sha2::Sha256::new();
    for (request, id) in &snapshot.root_packages {
        hash.update(format!("root\t{request}\t{id}\n"));
    }
    for (id, package) in &snapshot.packages {
        hash.update(format!("package\t{id}\n"));
        for (name, dep) in &package.dependencies {
            hash.update(format!("dep\t{name}\t{dep}\n"));
        }
    }
    format!("npm-{}", hex::encode(hash.finalize()))
}

/// npm's package name rules (a legacy name may have capitals).
fn valid_name(name: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '_'])
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
    };
    if name.len() > 214 {
        return false;
    }
    match name.strip_prefix('@') {
        Some(scoped) => scoped.split_once('/').is_some_and(|(scope, rest)| part(scope) && part(rest)),
        None => part(name),
    }
}

fn valid_version(version: &str) -> bool {
    !version.is_empty()
        && version.len() <= 256
        && version.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'))
}

/// A package id as one folder name (`@scope/a@1.0.0_b@2.0.0` →
/// `@scope+a@1.0.0_b@2.0.0`), or `None` when it is not one.
fn id_folder(id: &str) -> Option<String> {
    let folder = id.replace('/', "+");
    let ok = !folder.is_empty()
        && folder.len() <= 1024
        && !folder.starts_with('.')
        && folder.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'@' | b'.' | b'-' | b'_' | b'~' | b'+'));
    ok.then_some(folder)
}

/// Checks every name, version and id of `snapshot` before any becomes a
/// path or a URL.
fn check(snapshot: &NpmSnapshot) -> Result<(), NpmError> {
    let bad = |message: String| Err(NpmError::BadSnapshot(message));
    if snapshot.packages.len() > MAX_PACKAGES {
        return bad(format!(
            "it names {} packages; the runner lays out at most {MAX_PACKAGES}",
            snapshot.packages.len()
        ));
    }
    for (id, package) in &snapshot.packages {
        if !valid_name(&package.name) || !valid_version(&package.version) {
            return bad(format!("package {id:?} has no valid name and version"));
        }
        if !id.starts_with(&format!("{}@{}", package.name, package.version)) || id_folder(id).is_none() {
            return bad(format!("package id {id:?} is not {}@{}", package.name, package.version));
        }
        for (name, dep) in &package.dependencies {
            if !valid_name(name) {
                return bad(format!("{id} requires a package by the invalid name {name:?}"));
            }
            if !snapshot.packages.contains_key(dep) {
                return bad(format!("{id} requires {dep}, which the snapshot does not hold"));
            }
        }
    }
    for (request, id) in &snapshot.root_packages {
        if !snapshot.packages.contains_key(id) {
            return bad(format!("npm:{request} resolves to {id}, which the snapshot does not hold"));
        }
    }
    Ok(())
}

/// Lays out `snapshot` in `dir` (which must not exist) from `registry`.
/// Returns whether a package's scripts name `node:http`.
pub(crate) async fn lay_out(dir: &Path, snapshot: &NpmSnapshot, registry: &NpmRegistry) -> Result<bool, NpmError> {
    check(snapshot)?;
    let store = dir.join("node_modules").join(".deno");
    std::fs::create_dir_all(&store)?;

    let mut versions_of: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for package in snapshot.packages.values() {
        let versions = versions_of.entry(&package.name).or_default();
        if !versions.contains(&package.version.as_str()) {
            versions.push(&package.version);
        }
    }
    let lookups: Vec<_> = versions_of
        .into_iter()
        .map(|(name, versions)| registry.dists(name.to_owned(), versions.into_iter().map(str::to_owned).collect()))
        .collect();
    let found: Vec<Vec<((String, String), Dist)>> =
        futures_util::stream::iter(lookups).buffer_unordered(PARALLEL_FETCHES).try_collect().await?;
    let dists: HashMap<(String, String), Dist> = found.into_iter().flatten().collect();

    let budget = Arc::new(Budget::default());
    let uses_node_http = Arc::new(AtomicBool::new(false));
    let unpacks: Vec<_> = snapshot
        .packages
        .values()
        .map(|package| fetch_and_unpack(registry, &store, &dists, &budget, &uses_node_http, package))
        .collect();
    futures_util::stream::iter(unpacks).buffer_unordered(PARALLEL_FETCHES).try_collect::<()>().await?;

    link(dir, snapshot)?;
    Ok(uses_node_http.load(Ordering::Relaxed))
}

/// Fetches one package's tarball, checks it and unpacks it in its place.
async fn fetch_and_unpack(
    registry: &NpmRegistry,
    store: &Path,
    dists: &HashMap<(String, String), Dist>,
    budget: &Arc<Budget>,
    uses_node_http: &Arc<AtomicBool>,
    package: &isocloud_eszip::NpmPackage,
) -> Result<(), NpmError> {
    let dist = &dists[&(package.name.clone(), package.version.clone())];
    let Some(tgz) = registry.get(&dist.tarball, "application/octet-stream", MAX_TARBALL_BYTES).await? else {
        return Err(NpmError::Missing { package: package.id.clone(), registry: registry.base.to_string() });
    };
    if Sha512::digest(&tgz)[..] != dist.sha512[..] {
        return Err(NpmError::BadPackage {
            package: package.id.clone(),
            message: "its tarball does not match the registry's sha512 integrity".into(),
        });
    }
    let dest = store.join(id_folder(&package.id).expect("checked")).join("node_modules").join(&package.name);
    let (budget, uses_node_http) = (Arc::clone(budget), Arc::clone(uses_node_http));
    tokio::task::spawn_blocking(move || unpack(&tgz, &dest, &budget, &uses_node_http))
        .await
        .map_err(|e| NpmError::Io(std::io::Error::other(e)))?
        .map_err(|message| NpmError::BadPackage { package: package.id.clone(), message })
}

/// What one set may still take as it is unpacked.
#[derive(Default)]
struct Budget {
    bytes: AtomicU64,
    files: AtomicU64,
}

impl Budget {
    fn take(&self, bytes: u64) -> Result<(), String> {
        if self.files.fetch_add(1, Ordering::Relaxed) >= MAX_SET_FILES {
            return Err(format!("the packages hold more than {MAX_SET_FILES} files"));
        }
        if self.bytes.fetch_add(bytes, Ordering::Relaxed).saturating_add(bytes) > MAX_SET_BYTES {
            return Err(format!("the packages unpack to more than {} MiB", MAX_SET_BYTES >> 20));
        }
        Ok(())
    }
}

/// Unpacks an npm tarball (its top folder, `package/` by convention,
/// dropped) into `dest`: regular files read-only, folders; links, devices
/// and paths that leave `dest` are skipped.
fn unpack(tgz: &[u8], dest: &Path, budget: &Budget, uses_node_http: &AtomicBool) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let error = |e: std::io::Error| format!("its tarball cannot be unpacked: {e}");
    std::fs::create_dir_all(dest).map_err(error)?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(tgz));
    for entry in archive.entries().map_err(error)? {
        let mut entry = entry.map_err(error)?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            continue;
        }
        let path = entry.path().map_err(error)?.into_owned();
        let mut relative = PathBuf::new();
        let mut inside = true;
        for component in path.components().skip(1) {
            match component {
                Component::Normal(part) => relative.push(part),
                _ => inside = false,
            }
        }
        if !inside || relative.as_os_str().is_empty() {
            continue;
        }
        let size = entry.size();
        budget.take(size)?;
        let target = dest.join(&relative);
        if kind.is_dir() {
            std::fs::create_dir_all(&target).map_err(error)?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(error)?;
        }
        let mut bytes = Vec::with_capacity(size.min(MAX_TARBALL_BYTES) as usize);
        entry.by_ref().take(size).read_to_end(&mut bytes).map_err(error)?;
        if crate::node_http::is_script(&relative.to_string_lossy()) && crate::node_http::names_node_http(&bytes) {
            uses_node_http.store(true, Ordering::Relaxed);
        }
        // A tarball may name a file twice; the last one wins, as with npm.
        let _ = std::fs::remove_file(&target);
        std::fs::write(&target, &bytes).map_err(error)?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o444)).map_err(error)?;
    }
    Ok(())
}

/// The links of deno's layout: each package's dependencies beside it, by
/// the name it requires them by, and the requests' packages at the top.
fn link(dir: &Path, snapshot: &NpmSnapshot) -> std::io::Result<()> {
    let modules = dir.join("node_modules");
    let up = |name: &str| "../".repeat(name.matches('/').count());
    for package in snapshot.packages.values() {
        let beside = modules.join(".deno").join(id_folder(&package.id).expect("checked")).join("node_modules");
        for (name, dep_id) in &package.dependencies {
            let link = beside.join(name);
            if link.symlink_metadata().is_ok() {
                continue;
            }
            let dep = &snapshot.packages[dep_id];
            if let Some(parent) = link.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let target = format!("{}../../{}/node_modules/{}", up(name), id_folder(dep_id).expect("checked"), dep.name);
            std::os::unix::fs::symlink(target, &link)?;
        }
    }
    for id in snapshot.root_packages.values() {
        let package = &snapshot.packages[id];
        let link = modules.join(&package.name);
        // Two requests for two versions of one name: the first keeps it.
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let target =
            format!("{}.deno/{}/node_modules/{}", up(&package.name), id_folder(id).expect("checked"), package.name);
        std::os::unix::fs::symlink(target, &link)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_versions_and_ids_that_cannot_be_paths_are_refused() {
        for good in ["hono", "@hono/node-server", "left-pad", "JSONStream", "a.b_c~d"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", ".hidden", "_x", "@scope", "@/x", "a/b", "../x", "@s/../x", "a b", "a\0b", &"x".repeat(215)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(valid_version("4.6.3-rc.1+build"));
        assert!(!valid_version("1.0.0/../../x"));
        assert_eq!(id_folder("@scope/a@1.0.0_b@2.0.0").as_deref(), Some("@scope+a@1.0.0_b@2.0.0"));
        // One folder name whatever the id holds: no separator survives.
        assert_eq!(id_folder("a@1/../../x").as_deref(), Some("a@1+..+..+x"));
        assert_eq!(id_folder("a@1\\x"), None);
        assert_eq!(id_folder("a@1 x"), None);
        assert_eq!(id_folder("..@1"), None);
    }

    /// `(id, name, version, [(required as, id)])`.
    type TestPackage<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)]);

    fn snapshot(packages: &[TestPackage<'_>], roots: &[(&str, &str)]) -> NpmSnapshot {
        NpmSnapshot {
            root_packages: roots.iter().map(|(r, i)| (r.to_string(), i.to_string())).collect(),
            packages: packages
                .iter()
                .map(|(id, name, version, deps)| {
                    let package = isocloud_eszip::NpmPackage {
                        id: id.to_string(),
                        name: name.to_string(),
                        version: version.to_string(),
                        dependencies: deps.iter().map(|(n, d)| (n.to_string(), d.to_string())).collect(),
                    };
                    (id.to_string(), package)
                })
                .collect(),
        }
    }

    #[test]
    fn a_snapshot_is_checked_whole_before_anything_is_fetched() {
        let good = snapshot(
            &[("a@1.0.0", "a", "1.0.0", &[("b", "b@2.0.0")]), ("b@2.0.0", "b", "2.0.0", &[])],
            &[("a@^1", "a@1.0.0")],
        );
        assert!(check(&good).is_ok());
        let dangling = snapshot(&[("a@1.0.0", "a", "1.0.0", &[("b", "b@2.0.0")])], &[]);
        assert!(check(&dangling).unwrap_err().to_string().contains("does not hold"));
        let lying = snapshot(&[("../../etc@1.0.0", "a", "1.0.0", &[])], &[]);
        assert!(check(&lying).is_err());
        let alias = snapshot(&[("a@1.0.0", "a", "1.0.0", &[("../x", "a@1.0.0")])], &[]);
        assert!(check(&alias).is_err());
        let root = snapshot(&[], &[("a@1", "a@1.0.0")]);
        assert!(check(&root).is_err());
        assert_ne!(set_key(&good), set_key(&dangling));
        assert_eq!(set_key(&good), set_key(&good.clone()));
    }

    fn tgz(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (path, kind, bytes) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(bytes.len() as u64);
            header.set_mode(0o755);
            if *kind == tar::EntryType::Symlink {
                header.set_link_name("/etc/passwd").unwrap();
            }
            // Raw names: the builder itself refuses `..`, a hostile one does not.
            let name = &mut header.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            builder.append(&header, *bytes).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn a_tarball_unpacks_only_its_own_files_read_only_and_within_the_budget() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("pkg");
        let archive = tgz(&[
            ("package/index.js", tar::EntryType::Regular, b"require('node:http')"),
            ("package/lib", tar::EntryType::Directory, b""),
            ("package/../../escaped.js", tar::EntryType::Regular, b"x"),
            ("package/link", tar::EntryType::Symlink, b""),
            ("package/hard", tar::EntryType::Link, b""),
        ]);
        let uses_node_http = AtomicBool::new(false);
        unpack(&archive, &dest, &Budget::default(), &uses_node_http).unwrap();
        assert_eq!(std::fs::read(dest.join("index.js")).unwrap(), b"require('node:http')");
        assert_eq!(std::fs::metadata(dest.join("index.js")).unwrap().permissions().mode() & 0o777, 0o444);
        assert!(dest.join("lib").is_dir());
        assert!(!dir.path().join("escaped.js").exists() && !dest.join("escaped.js").exists());
        assert!(dest.join("link").symlink_metadata().is_err() && dest.join("hard").symlink_metadata().is_err());
        assert!(uses_node_http.load(Ordering::Relaxed));

        let full = Budget::default();
        full.bytes.store(MAX_SET_BYTES, Ordering::Relaxed);
        let error = unpack(&archive, &dir.path().join("other"), &full, &AtomicBool::new(false)).unwrap_err();
        assert!(error.contains("MiB"), "{error}");
        assert!(unpack(b"not a tarball", &dir.path().join("bad"), &Budget::default(), &uses_node_http).is_err());
    }

    #[test]
    fn links_follow_the_snapshot_in_denos_layout() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = snapshot(
            &[
                ("@s/app@1.0.0", "@s/app", "1.0.0", &[("dep", "dep@2.0.0"), ("@t/x", "@t/x@3.0.0")]),
                ("dep@2.0.0", "dep", "2.0.0", &[]),
                ("@t/x@3.0.0", "@t/x", "3.0.0", &[]),
            ],
            &[("@s/app@^1", "@s/app@1.0.0")],
        );
        for package in snapshot.packages.values() {
            let folder = dir
                .path()
                .join("node_modules/.deno")
                .join(id_folder(&package.id).unwrap())
                .join("node_modules")
                .join(&package.name);
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::write(folder.join("package.json"), &package.id).unwrap();
        }
        link(dir.path(), &snapshot).unwrap();
        let read = |path: &str| std::fs::read_to_string(dir.path().join(path)).unwrap();
        assert_eq!(read("node_modules/@s/app/package.json"), "@s/app@1.0.0");
        // Node's resolution from inside the package walks up to its
        // dependencies beside it.
        let beside = "node_modules/.deno/@s+app@1.0.0/node_modules";
        assert_eq!(read(&format!("{beside}/@s/app/package.json")), "@s/app@1.0.0");
        assert_eq!(read(&format!("{beside}/dep/package.json")), "dep@2.0.0");
        assert_eq!(read(&format!("{beside}/@t/x/package.json")), "@t/x@3.0.0");
    }
}
