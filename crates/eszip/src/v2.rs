//! ESZIP v2 (`ESZIP_V2`, `ESZIP2.1`, `ESZIP2.2`, `ESZIP2.3`): the bounds
//! walk of [`crate::layout`], then the `eszip` crate's own decoder for the
//! checksums and the sources.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::io::BufReader;

use crate::error::EszipError;
use crate::layout::{self, RawEntry};
use crate::{Entry, Module, ModuleGraph, ModuleKind, NpmPackage, NpmSnapshot, check_specifier};

/// Decodes a v2 archive. Completes without yielding: the reader is an
/// in-memory slice, so every read the `eszip` crate awaits is ready at once,
/// and this function polls it exactly once (`now_or_never`) instead of
/// waiting, so that a future that could never complete is an error, not a
/// hang.
pub(crate) fn decode(input: &[u8]) -> Result<ModuleGraph, EszipError> {
    let layout = layout::walk(input)?;

    let (mut eszip, rest) =
        eszip::EszipV2::parse(BufReader::new(input)).now_or_never().ok_or_else(not_synchronous)??;
    let npm = eszip
        .take_npm_snapshot()
        .map(|snapshot| {
            let snapshot = snapshot.into_serialized();
            NpmSnapshot {
                root_packages: snapshot
                    .root_packages
                    .iter()
                    .map(|(request, id)| (request.to_string(), id.as_serialized().to_string()))
                    .collect(),
                packages: snapshot
                    .packages
                    .iter()
                    .map(|package| {
                        let id = package.id.as_serialized().to_string();
                        let dependencies = package
                            .dependencies
                            .iter()
                            .map(|(name, dep)| (name.to_string(), dep.as_serialized().to_string()))
                            .collect();
                        let package = NpmPackage {
                            id: id.clone(),
                            name: package.id.nv.name.to_string(),
                            version: package.id.nv.version.to_string(),
                            dependencies,
                        };
                        (id, package)
                    })
                    .collect(),
            }
        })
        .filter(|snapshot| !snapshot.packages.is_empty() || !snapshot.root_packages.is_empty());
    // Reads all sources and source maps and verifies their checksums.
    rest.now_or_never().ok_or_else(not_synchronous)??;

    let mut entries = Vec::with_capacity(layout.entries.len());
    for raw in layout.entries {
        entries.push(match raw {
            RawEntry::Redirect { specifier, target } => {
                Entry::Redirect { specifier: specifier_at(input, specifier)?, target: specifier_at(input, target)? }
            }
            RawEntry::Module { specifier, kind } => {
                let specifier = specifier_at(input, specifier)?;
                let kind = module_kind(kind, &specifier)?;
                let source = take_source(&eszip, &specifier)?;
                if kind != ModuleKind::Wasm && std::str::from_utf8(&source).is_err() {
                    return Err(EszipError::InvalidUtf8 { specifier });
                }
                Entry::Module(Module { specifier, kind, source })
            }
        });
    }
    Ok(ModuleGraph { entries, npm })
}

fn not_synchronous() -> EszipError {
    EszipError::Rejected { reason: "decoding an in-memory archive did not complete synchronously".into() }
}

/// A header string, checked to be UTF-8 and an absolute URL.
fn specifier_at(input: &[u8], range: std::ops::Range<usize>) -> Result<String, EszipError> {
    let bytes = input.get(range).unwrap_or_default();
    let specifier = String::from_utf8(bytes.to_vec()).map_err(|_| EszipError::InvalidSpecifier {
        specifier: String::from_utf8_lossy(bytes).into_owned(),
        reason: "not UTF-8".into(),
    })?;
    check_specifier(&specifier)?;
    Ok(specifier)
}

fn module_kind(byte: u8, specifier: &str) -> Result<ModuleKind, EszipError> {
    let unsupported = |kind| EszipError::UnsupportedModuleKind { specifier: specifier.to_owned(), kind };
    match byte {
        0 => Ok(ModuleKind::JavaScript),
        1 => Ok(ModuleKind::Json),
        2 => Err(unsupported("jsonc")),
        3 => Err(unsupported("opaque data")),
        4 => Ok(ModuleKind::Wasm),
        // The eszip crate refuses these before we get here.
        _ => Err(unsupported("unknown")),
    }
}

/// Takes the source the `eszip` crate loaded (and verified) for a module,
/// without copying it.
fn take_source(eszip: &eszip::EszipV2, specifier: &str) -> Result<Bytes, EszipError> {
    let missing = || EszipError::MissingSource { specifier: specifier.to_owned() };
    let module = eszip.get_module(specifier).ok_or_else(missing)?;
    // A slot still pending after the data sections were read would never
    // resolve; `now_or_never` turns that into an error instead of a hang.
    let source: Arc<[u8]> = module.take_source().now_or_never().flatten().ok_or_else(missing)?;
    Ok(Bytes::from_owner(source))
}
