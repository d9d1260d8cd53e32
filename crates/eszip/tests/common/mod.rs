//! Shared test helpers: the npm toolchain (`tools/eszip/build.mjs` on top of
//! `@deno/eszip`), a byte-exact ESZIP writer for layouts the toolchain does
//! not produce, and small byte utilities.
//!
//! Each test binary includes this module and uses a different part of it.
#![allow(dead_code, reason = "each test binary uses a different part")]

pub mod toolchain;
pub mod writer;

use futures_util::FutureExt;
use isocloud_eszip::{Entry, EszipError, ModuleGraph, ModuleKind};

/// `isocloud_eszip::parse`, which must complete without ever waiting.
pub fn parse(bytes: &[u8]) -> Result<ModuleGraph, EszipError> {
    isocloud_eszip::parse(bytes::Bytes::copy_from_slice(bytes)).now_or_never().expect("parse completes without waiting")
}

/// The repository root (`/work/main`).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

pub fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Position of `needle` in `haystack`; panics unless it occurs exactly once.
pub fn find_once(haystack: &[u8], needle: &[u8]) -> usize {
    let hits: Vec<usize> =
        haystack.windows(needle.len()).enumerate().filter(|(_, w)| *w == needle).map(|(i, _)| i).collect();
    assert_eq!(hits.len(), 1, "{:?} occurs {} times", String::from_utf8_lossy(needle), hits.len());
    hits[0]
}

/// A compact, comparable view of a graph: `"spec kind source"` for modules
/// (source lossily decoded) and `"spec -> target"` for redirects.
pub fn summary(graph: &ModuleGraph) -> Vec<String> {
    graph
        .entries
        .iter()
        .map(|e| match e {
            Entry::Module(m) => format!("{} {:?} {}", m.specifier, m.kind, String::from_utf8_lossy(&m.source)),
            Entry::Redirect { specifier, target } => format!("{specifier} -> {target}"),
        })
        .collect()
}

/// The module with this specifier; panics if absent.
pub fn module<'a>(graph: &'a ModuleGraph, specifier: &str) -> &'a isocloud_eszip::Module {
    graph
        .entries
        .iter()
        .find_map(|e| match e {
            Entry::Module(m) if m.specifier == specifier => Some(m),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no module {specifier} in {:#?}", summary(graph)))
}

pub fn source_text(graph: &ModuleGraph, specifier: &str, kind: ModuleKind) -> String {
    let m = module(graph, specifier);
    assert_eq!(m.kind, kind, "kind of {specifier}");
    String::from_utf8(m.source.to_vec()).expect("UTF-8 source")
}
