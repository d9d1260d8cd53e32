//! Decoding ESZIP archives, the module-graph format of the Deno toolchain
//! (protocol doc §4), into a [`ModuleGraph`] the runner can load. This crate
//! owns every version seen in the wild: the v1 JSON form, `ESZIP_V2`,
//! `ESZIP2.1` (npm section), `ESZIP2.2` (options header with the checksum
//! choice: none, SHA-256 or xxh3-64) and `ESZIP2.3` (Wasm modules); and it
//! owns checksum verification: [`parse`] returns only after every section
//! and every module source has been read and its checksum, if the archive
//! has one, verified.
//!
//! It must not touch the network or the file system, and it must not panic,
//! hang or allocate without bound on any input: an archive comes from an
//! origin we do not control and a bad one is a boot failure (a 502 naming
//! the [`EszipError`]), never a crash. To that end:
//!
//! * v2 archives first go through a bounds walk (`layout.rs`) that proves
//!   every declared length fits in the input before the `eszip` crate, which
//!   allocates what the archive declares, sees them; sources that do not
//!   tile their section exactly, unknown checksum algorithms and trailing
//!   bytes are refused there.
//! * The `eszip` crate is then driven over the in-memory bytes and polled
//!   once (it never needs to wait on an in-memory reader), so a source that
//!   would stay pending is an error rather than a hang.
//! * The whole decode runs under [`std::panic::catch_unwind`]: the `eszip`
//!   crate has `expect`s and `panic!`s on paths the walk should make
//!   unreachable, and it parses npm package names with `deno_semver`; if
//!   one fires anyway the caller gets [`EszipError::DecoderPanicked`]. (This
//!   relies on `panic = "unwind"`, the default.)
//!
//! What is kept: modules (JavaScript — already transpiled by the toolchain
//! when built from TypeScript —, JSON, Wasm) and redirects, in archive
//! order, with specifiers as stored, and the ESZIP2.1+ npm snapshot
//! ([`NpmSnapshot`]: the resolved packages and what each `npm:` request
//! resolved to; bounds-checked, decoded by the `eszip` crate and, with a
//! checksum, verified). The snapshot names packages, never their files:
//! the runner fetches those from its npm registry. Specifiers must be
//! absolute URLs and unique; JavaScript and JSON sources must be UTF-8. What
//! is skipped: source maps. What is refused: `jsonc` and `opaque data` modules
//! ([`EszipError::UnsupportedModuleKind`]); an isolate cannot import them.
//! Redirect targets are not resolved here: a target may live in another
//! layer of the same deployment.
//!
//! The work is CPU-bound and done inline (hashing is the bulk of it, tens of
//! milliseconds for tens of MiB); callers with large archives on a shared
//! executor may prefer to run [`parse`] on a blocking thread.
//!
//! Fuzzing: `tests/fuzz.rs` is the fuzz target, a bounded `proptest` run
//! (raise `PROPTEST_CASES` to fuzz longer) over arbitrary bytes and over
//! byte flips, truncations, insertions, deletions and length overwrites of
//! valid archives of every version. It asserts that [`parse`] returns
//! without waiting, without a caught panic and without any allocation out
//! of proportion to the input, and that what it accepts is well-formed.

#![forbid(unsafe_code)]

use std::panic::{AssertUnwindSafe, catch_unwind};

use bytes::Bytes;

mod error;
mod layout;
mod v1;
mod v2;

pub use error::{ChecksumScope, EszipError};

/// A decoded archive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleGraph {
    /// The entries in archive order. For v2 that is the toolchain's order
    /// (roots first); for v1 it is the order of the JSON object.
    pub entries: Vec<Entry>,
    /// The npm packages the modules' `npm:` imports resolved to (ESZIP2.1+).
    pub npm: Option<NpmSnapshot>,
}

/// An ESZIP's npm section: what Deno's resolver decided when the archive was
/// written. Names and versions only; no files, no integrity (the format has
/// neither).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NpmSnapshot {
    /// Each `npm:` request of the modules (`hono@^4`) → the package id it
    /// resolved to (`hono@4.6.3`).
    pub root_packages: std::collections::BTreeMap<String, String>,
    /// Every package of the resolution, by id.
    pub packages: std::collections::BTreeMap<String, NpmPackage>,
}

/// One resolved npm package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpmPackage {
    /// `name@version`, with `_peer@version` suffixes when peers shaped it.
    pub id: String,
    pub name: String,
    pub version: String,
    /// The name it requires another package by → that package's id.
    pub dependencies: std::collections::BTreeMap<String, String>,
}

/// One entry of an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A module with its source.
    Module(Module),
    /// `specifier` redirects to `target` (one hop; `target` need not be in
    /// the same archive).
    Redirect {
        /// The specifier that was requested.
        specifier: String,
        /// Where it leads.
        target: String,
    },
}

/// A module and its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Absolute URL as stored in the archive.
    pub specifier: String,
    /// How to load `source`.
    pub kind: ModuleKind,
    /// JavaScript (already transpiled by the toolchain when built from
    /// TypeScript) or JSON text, both UTF-8; or Wasm bytes.
    pub source: Bytes,
}

/// What kind of module a source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    /// An ES module.
    JavaScript,
    /// A JSON module (`import x from "./x.json" with { type: "json" }`).
    Json,
    /// A WebAssembly module (ESZIP2.3).
    Wasm,
}

/// Decodes an ESZIP archive of any version and verifies its checksums.
///
/// Returns once every module source is loaded; nothing is left pending.
/// Never panics; every malformed input is an [`EszipError`].
pub async fn parse(bytes: Bytes) -> Result<ModuleGraph, EszipError> {
    parse_now(&bytes)
}

fn parse_now(input: &[u8]) -> Result<ModuleGraph, EszipError> {
    // `AssertUnwindSafe` is sound here: the closure only reads `input`, and
    // everything it builds is dropped while unwinding, so no broken state
    // can be observed after a caught panic.
    catch_unwind(AssertUnwindSafe(|| decode(input))).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned());
        Err(EszipError::DecoderPanicked { message })
    })
}

fn decode(input: &[u8]) -> Result<ModuleGraph, EszipError> {
    let magic = input.get(..8);
    if magic.and_then(layout::Version::from_magic).is_some() {
        return v2::decode(input);
    }
    if first_non_whitespace(input) == Some(b'{') {
        return v1::decode(input);
    }
    let prefix = &input[..input.len().min(8)];
    if prefix.starts_with(b"ESZIP") {
        return Err(EszipError::UnsupportedVersion { magic: String::from_utf8_lossy(prefix).into_owned() });
    }
    Err(EszipError::NotAnArchive { prefix: String::from_utf8_lossy(prefix).into_owned() })
}

/// Cheap sniff: does `bytes` start like an ESZIP archive (a known v2 magic,
/// or a JSON object for v1)? Looks at the first bytes only; [`parse`] may
/// still refuse the archive.
pub fn is_eszip(bytes: &[u8]) -> bool {
    bytes.get(..8).and_then(layout::Version::from_magic).is_some() || first_non_whitespace(bytes) == Some(b'{')
}

/// The first byte that is not JSON whitespace.
fn first_non_whitespace(bytes: &[u8]) -> Option<u8> {
    bytes.iter().copied().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

/// Specifiers and redirect targets must be absolute URLs.
fn check_specifier(specifier: &str) -> Result<(), EszipError> {
    url::Url::parse(specifier)
        .map(drop)
        .map_err(|e| EszipError::InvalidSpecifier { specifier: specifier.to_owned(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_every_magic_and_v1_json() {
        for magic in [b"ESZIP_V2", b"ESZIP2.1", b"ESZIP2.2", b"ESZIP2.3"] {
            assert!(is_eszip(magic));
        }
        assert!(is_eszip(b"{\"version\":1}"));
        assert!(is_eszip(b" \r\n\t{"));
        assert!(!is_eszip(b""));
        assert!(!is_eszip(b"ESZIP2.9"));
        assert!(!is_eszip(b"ESZIP_V"));
        assert!(!is_eszip(b"\x0c{"));
        assert!(!is_eszip(b"\0asm\x01\0\0\0"));
    }

    #[test]
    fn names_unknown_inputs() {
        assert!(matches!(
            parse_now(b"ESZIP2.9rest"),
            Err(EszipError::UnsupportedVersion { magic }) if magic == "ESZIP2.9"
        ));
        assert!(matches!(
            parse_now(b"hello"),
            Err(EszipError::NotAnArchive { prefix }) if prefix == "hello"
        ));
        assert!(matches!(parse_now(b""), Err(EszipError::NotAnArchive { .. })));
        assert!(matches!(parse_now(b"ESZIP_V"), Err(EszipError::UnsupportedVersion { .. })));
    }

    #[test]
    fn relative_specifiers_are_refused() {
        assert!(check_specifier("file:///src/main.ts").is_ok());
        assert!(matches!(check_specifier("main.ts"), Err(EszipError::InvalidSpecifier { .. })));
    }
}
