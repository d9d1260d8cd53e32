//! The asset manifest of `read_tree`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Why a manifest is refused (the origin names the RPC around it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TreeError(pub String);

/// A deployment's read-only file tree. Paths are `""` (the root) or start with
/// `/` and never contain `.`/`..` segments or NUL.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssetTree {
    pub entries: BTreeMap<String, AssetEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum AssetEntry {
    Directory,
    File { size: u64, hash: String },
    Symlink { target: String },
}

/// Bounds that keep a hostile manifest from costing us more than a listing.
const MAX_ENTRIES: usize = 200_000;
const MAX_PATH_BYTES: usize = 4096;

impl AssetTree {
    pub fn parse(json: &[u8]) -> Result<Self, TreeError> {
        let malformed = TreeError;
        let tree: AssetTree = serde_json::from_slice(json).map_err(|e| malformed(e.to_string()))?;
        if tree.entries.len() > MAX_ENTRIES {
            return Err(malformed(format!("more than {MAX_ENTRIES} entries")));
        }
        for (path, entry) in &tree.entries {
            check_path(path).map_err(|m| malformed(format!("entry {path:?}: {m}")))?;
            match entry {
                AssetEntry::File { hash, .. } if !is_valid_file_id(hash) => {
                    return Err(malformed(format!("entry {path:?}: file id {hash:?} is not a plain token")));
                }
                AssetEntry::Symlink { target } if target.contains('\0') || target.len() > MAX_PATH_BYTES => {
                    return Err(malformed(format!("entry {path:?}: bad symlink target")));
                }
                _ => {}
            }
        }
        Ok(tree)
    }

    /// The file entry at `path`, following symlinks inside the tree.
    pub fn resolve_file(&self, path: &str) -> Option<(&str, u64, &str)> {
        let mut current = path.to_owned();
        for _ in 0..16 {
            match self.entries.get_key_value(current.as_str())? {
                (key, AssetEntry::File { size, hash }) => return Some((key.as_str(), *size, hash.as_str())),
                (_, AssetEntry::Symlink { target }) => {
                    current = resolve_link(&current, target)?;
                }
                (_, AssetEntry::Directory) => return None,
            }
        }
        None
    }
}

/// Whether a symlink at `link` (a tree path, with or without its leading
/// `/`) pointing at `target` stays inside the tree: relative, and never
/// more `..` than the link's folder is deep.
pub fn link_stays_inside(link: &str, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
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

/// Joins a symlink target onto the link's directory, staying inside the tree.
fn resolve_link(link: &str, target: &str) -> Option<String> {
    let base: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        let mut parts: Vec<&str> = link.split('/').filter(|s| !s.is_empty()).collect();
        parts.pop();
        parts
    };
    let mut parts = base;
    for seg in target.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            s => parts.push(s),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

fn check_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Ok(());
    }
    if path.len() > MAX_PATH_BYTES {
        return Err("path too long");
    }
    if !path.starts_with('/') {
        return Err("path must start with '/'");
    }
    if path.contains('\0') || path.contains('\\') {
        return Err("path contains NUL or backslash");
    }
    if path[1..].split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
        return Err("path has an empty, '.' or '..' segment");
    }
    Ok(())
}

/// File ids go into query strings and cache file names; keep them tame.
pub fn is_valid_file_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 256 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_protocol_example() {
        let json = br#"{"entries": {"": {"kind":"directory"}, "/static/a.txt": {"kind":"file","size":5,"hash":"abc"}, "/static": {"kind":"directory"}, "/ln": {"kind":"symlink","target":"/static/a.txt"}}}"#;
        let tree = AssetTree::parse(json).unwrap();
        assert_eq!(tree.resolve_file("/ln"), Some(("/static/a.txt", 5, "abc")));
        assert_eq!(tree.resolve_file("/static"), None);
    }

    #[test]
    fn refuses_escaping_paths() {
        for bad in ["/../etc/passwd", "rel", "/a//b", "/a/./b"] {
            let json = format!(r#"{{"entries": {{"{bad}": {{"kind":"directory"}}}}}}"#);
            let err = AssetTree::parse(json.as_bytes()).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn relative_symlinks_cannot_leave_the_tree() {
        assert_eq!(resolve_link("/a/ln", "../b"), Some("/b".into()));
        assert_eq!(resolve_link("/ln", "../../etc/passwd"), None);
    }
}
