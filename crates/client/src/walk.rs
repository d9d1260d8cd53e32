//! The files `isocloud deploy` uploads: a walk of the folder (`.git` and
//! `--exclude` matches skipped, `--include` narrowing), symlinks followed
//! only while they stay inside the folder, names required to be UTF-8, and
//! each file's SHA-256.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::error::InputError;
use super::glob::Glob;

/// More files than this is almost certainly the wrong folder (a home
/// directory, a `node_modules` forest); the walk stops instead of hashing on.
pub const MAX_FILES: usize = 100_000;
/// Folder depth bound: guards against deep symlink chains as well.
const MAX_DEPTH: usize = 64;

#[derive(Debug, Default)]
pub struct WalkOptions {
    pub include: Vec<Glob>,
    pub exclude: Vec<Glob>,
}

/// A file to deploy: its path in the deployment and where it is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFile {
    /// Relative, `/`-separated, no `.`/`..` segments.
    pub path: String,
    pub source: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashedFile {
    pub path: String,
    pub source: PathBuf,
    pub hash: String,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("`{path}` is not a valid UTF-8 name; rename it or leave it out with --exclude")]
    NotUtf8 { path: String },
    #[error("`{path}` is a link to {target}, outside the deployed folder; remove it or leave it out with --exclude")]
    EscapingLink { path: String, target: String },
    #[error("`{path}` is a link to one of its own parent folders; leave it out with --exclude")]
    LinkCycle { path: String },
    #[error("more than {MAX_FILES} files: is this the right folder? Leave some out with --exclude")]
    TooManyFiles,
    #[error("folders nest deeper than {MAX_DEPTH} levels at `{path}`")]
    TooDeep { path: String },
    /// The cause is the source (shown after the message, once).
    #[error("cannot read `{path}`")]
    Io { path: String, source: std::io::Error },
}

/// Walks `root`, returning files sorted by path and warnings (dangling
/// links, sockets, …) for the caller to show.
pub fn walk(root: &Path, options: &WalkOptions) -> Result<(Vec<LocalFile>, Vec<String>), WalkError> {
    let io = |path: &str| {
        let path = path.to_string();
        move |source| WalkError::Io { path, source }
    };
    let root = root.canonicalize().map_err(io("."))?;
    let mut files = Vec::new();
    let mut warnings = Vec::new();
    // (real folder on disk, its path in the deployment, depth)
    let mut stack = vec![(root.clone(), String::new(), 0usize)];
    while let Some((dir, prefix, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            return Err(WalkError::TooDeep { path: prefix });
        }
        let shown = if prefix.is_empty() { ".".to_string() } else { prefix.clone() };
        let mut entries =
            std::fs::read_dir(&dir).map_err(io(&shown))?.collect::<Result<Vec<_>, _>>().map_err(io(&shown))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let raw_name = entry.file_name();
            let lossy_name = raw_name.to_string_lossy();
            let lossy_path = join(&prefix, &lossy_name);
            if raw_name == ".git" {
                continue;
            }
            let on_disk = entry.path();
            let metadata = std::fs::symlink_metadata(&on_disk).map_err(io(&lossy_path))?;
            // A link takes the kind of what it points to, once that is known
            // to stay inside the folder.
            let (real_path, metadata) = if metadata.file_type().is_symlink() {
                let target = match on_disk.canonicalize() {
                    Ok(target) => target,
                    Err(_) => {
                        if !is_excluded(options, &lossy_path, false) {
                            warnings.push(format!("skipping `{lossy_path}`: a link to nothing"));
                        }
                        continue;
                    }
                };
                let target_metadata = std::fs::metadata(&target).map_err(io(&lossy_path))?;
                if is_excluded(options, &lossy_path, target_metadata.is_dir()) {
                    continue;
                }
                if !target.starts_with(&root) {
                    return Err(WalkError::EscapingLink { path: lossy_path, target: target.display().to_string() });
                }
                if target_metadata.is_dir() && dir.starts_with(&target) {
                    return Err(WalkError::LinkCycle { path: lossy_path });
                }
                (target, target_metadata)
            } else {
                if is_excluded(options, &lossy_path, metadata.is_dir()) {
                    continue;
                }
                (on_disk, metadata)
            };
            let Some(name) = raw_name.to_str() else {
                return Err(WalkError::NotUtf8 { path: lossy_path });
            };
            let path = join(&prefix, name);
            if metadata.is_dir() {
                stack.push((real_path, path, depth + 1));
            } else if metadata.is_file() {
                if !options.include.is_empty() && !options.include.iter().any(|g| g.matches(&path, false)) {
                    continue;
                }
                if files.len() == MAX_FILES {
                    return Err(WalkError::TooManyFiles);
                }
                files.push(LocalFile { path, source: real_path });
            } else {
                // Reading a FIFO would block; sockets and devices are no content.
                warnings.push(format!("skipping `{path}`: not a regular file"));
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((files, warnings))
}

fn is_excluded(options: &WalkOptions, path: &str, is_dir: bool) -> bool {
    options.exclude.iter().any(|g| g.matches(path, is_dir))
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() { name.to_string() } else { format!("{prefix}/{name}") }
}

/// SHA-256 (hex) and size of a file, read in chunks.
pub fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

pub fn hash_files(files: Vec<LocalFile>) -> Result<Vec<HashedFile>, WalkError> {
    files
        .into_iter()
        .map(|file| {
            let (hash, size) =
                hash_file(&file.source).map_err(|source| WalkError::Io { path: file.path.clone(), source })?;
            Ok(HashedFile { path: file.path, source: file.source, hash, size })
        })
        .collect()
}

/// The files an entrypoint is looked for among when none is given, in order.
pub use isocloud_protocol::DEFAULT_ENTRYPOINTS;

/// The entrypoint to deploy: the one given (checked against the files,
/// unless an ESZIP may hold it), else the first default that exists.
pub fn choose_entrypoint(
    given: Option<&str>,
    files: &BTreeMap<String, super::api::FileRef>,
    has_eszip: bool,
) -> Result<String, InputError> {
    if let Some(given) = given {
        let path = given.trim_start_matches("./");
        if has_eszip || files.contains_key(path) {
            return Ok(path.to_string());
        }
        return Err(InputError::EntrypointNotInFiles { given: given.to_owned() });
    }
    if let Some(found) = DEFAULT_ENTRYPOINTS.iter().find(|name| files.contains_key(**name)) {
        return Ok(found.to_string());
    }
    Err(if has_eszip { InputError::EntrypointForEszip } else { InputError::NoEntrypoint })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::api::FileRef;

    fn write(root: &Path, path: &str, content: &str) {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    fn paths(root: &Path, options: &WalkOptions) -> Vec<String> {
        walk(root, options).unwrap().0.into_iter().map(|f| f.path).collect()
    }

    fn globs(patterns: &[&str]) -> Vec<Glob> {
        patterns.iter().map(|p| Glob::parse(p).unwrap()).collect()
    }

    #[test]
    fn walks_sorted_and_skips_git() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "main.ts", "x");
        write(dir.path(), "static/b.svg", "b");
        write(dir.path(), "static/a/c.txt", "c");
        write(dir.path(), ".git/HEAD", "ref");
        write(dir.path(), "sub/.git", "gitdir: ../.git/modules/sub");
        write(dir.path(), ".env.example", "A=1");
        assert_eq!(
            paths(dir.path(), &WalkOptions::default()),
            [".env.example", "main.ts", "static/a/c.txt", "static/b.svg"]
        );
    }

    #[test]
    fn exclude_and_include() {
        let dir = tempfile::tempdir().unwrap();
        for path in ["main.ts", "a.log", "x/b.log", "node_modules/m/index.js", "dist/out.js", "src/dist/keep.ts"] {
            write(dir.path(), path, "x");
        }
        let options = WalkOptions { exclude: globs(&["*.log", "node_modules", "/dist"]), include: Vec::new() };
        assert_eq!(paths(dir.path(), &options), ["main.ts", "src/dist/keep.ts"]);
        let options = WalkOptions { include: globs(&["*.ts"]), exclude: Vec::new() };
        assert_eq!(paths(dir.path(), &options), ["main.ts", "src/dist/keep.ts"]);
    }

    #[test]
    fn links_inside_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "real/a.txt", "a");
        symlink("real", dir.path().join("alias")).unwrap();
        symlink("real/a.txt", dir.path().join("b.txt")).unwrap();
        symlink("nowhere", dir.path().join("dangling")).unwrap();
        let (files, warnings) = walk(dir.path(), &WalkOptions::default()).unwrap();
        let found: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(found, ["alias/a.txt", "b.txt", "real/a.txt"]);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("dangling"));
    }

    #[test]
    fn links_escaping_the_folder_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        write(outside.path(), "secret.txt", "s");
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "main.ts", "x");
        symlink(outside.path().join("secret.txt"), dir.path().join("leak.txt")).unwrap();
        let error = walk(dir.path(), &WalkOptions::default()).unwrap_err();
        assert!(matches!(&error, WalkError::EscapingLink { path, .. } if path == "leak.txt"), "{error}");
        // Escaping through a folder link and through `..` too.
        std::fs::remove_file(dir.path().join("leak.txt")).unwrap();
        symlink("..", dir.path().join("up")).unwrap();
        assert!(matches!(walk(dir.path(), &WalkOptions::default()), Err(WalkError::EscapingLink { .. })));
        // Leaving it out with --exclude makes the deploy possible again.
        let options = WalkOptions { exclude: globs(&["up"]), include: Vec::new() };
        assert_eq!(paths(dir.path(), &options), ["main.ts"]);
    }

    #[test]
    fn link_cycles_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a/x.txt", "x");
        symlink("..", dir.path().join("a/loop")).unwrap();
        assert!(matches!(walk(dir.path(), &WalkOptions::default()), Err(WalkError::LinkCycle { .. })));
    }

    #[test]
    fn non_utf8_names_are_refused_with_their_path() {
        use std::os::unix::ffi::OsStrExt as _;
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "main.ts", "x");
        let bad = std::ffi::OsStr::from_bytes(b"bad\xffname.txt");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub").join(bad), "x").unwrap();
        let error = walk(dir.path(), &WalkOptions::default()).unwrap_err();
        let WalkError::NotUtf8 { path } = &error else { panic!("{error}") };
        assert_eq!(path, "sub/bad\u{fffd}name.txt");
        assert!(error.to_string().contains("--exclude"));
        let options = WalkOptions { exclude: globs(&["bad*"]), include: Vec::new() };
        assert_eq!(paths(dir.path(), &options), ["main.ts"]);
    }

    #[test]
    fn hashes_are_sha256_hex() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.txt", "hello");
        let (files, _) = walk(dir.path(), &WalkOptions::default()).unwrap();
        let hashed = hash_files(files).unwrap();
        assert_eq!(hashed[0].hash, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(hashed[0].size, 5);
    }

    fn file_map(names: &[&str]) -> BTreeMap<String, FileRef> {
        names.iter().map(|n| (n.to_string(), FileRef { hash: "h".into(), size: 1 })).collect()
    }

    #[test]
    fn entrypoint_defaults_in_order() {
        let files = file_map(&["index.ts", "main.js", "server.ts", "lib/main.ts"]);
        assert_eq!(choose_entrypoint(None, &files, false).unwrap(), "main.js");
        let files = file_map(&["server.js", "index.js"]);
        assert_eq!(choose_entrypoint(None, &files, false).unwrap(), "index.js");
        let error = choose_entrypoint(None, &file_map(&["lib/main.ts", "app.ts"]), false).unwrap_err().to_string();
        assert!(error.contains("main.ts, main.tsx, main.js, main.jsx, main.mjs, mod.ts, index.ts"), "{error}");
        let files = file_map(&["index.tsx", "server.ts"]);
        assert_eq!(choose_entrypoint(None, &files, false).unwrap(), "index.tsx", "TSX entrypoints are found");
        assert_eq!(
            choose_entrypoint(Some("./lib/main.ts"), &file_map(&["lib/main.ts"]), false).unwrap(),
            "lib/main.ts"
        );
        assert!(choose_entrypoint(Some("missing.ts"), &files, false).is_err());
        assert_eq!(
            choose_entrypoint(Some("file:///src/main.ts"), &BTreeMap::new(), true).unwrap(),
            "file:///src/main.ts"
        );
        assert!(choose_entrypoint(None, &BTreeMap::new(), true).unwrap_err().to_string().contains("--entrypoint"));
    }
}
