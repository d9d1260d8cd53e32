//! ESZIP v1: one JSON object, `{"version": 1, "modules": {url: info}}`.
//!
//! The module records are deserialised with the `eszip` crate's own
//! [`eszip::v1::ModuleInfo`] type, but the outer object is read here rather
//! than through [`eszip::EszipV1`], which keeps the modules in a `HashMap`
//! (losing the archive order), hides redirect targets behind the modules
//! they lead to, and `unwrap`s a URL round-trip when a source is read.

use std::fmt;

use bytes::Bytes;
use eszip::v1::ModuleInfo;
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};

use crate::error::EszipError;
use crate::{Entry, Module, ModuleGraph, ModuleKind, check_specifier};

const VERSION: u32 = 1;

#[derive(Deserialize)]
struct Archive {
    version: u32,
    modules: OrderedModules,
}

/// The `modules` object as a list, in document order.
struct OrderedModules(Vec<(String, ModuleInfo)>);

impl<'de> Deserialize<'de> for OrderedModules {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedModules;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object from module URLs to module records")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                // No `with_capacity(size_hint)`: the hint is not trusted.
                let mut modules = Vec::new();
                while let Some(entry) = map.next_entry::<String, ModuleInfo>()? {
                    modules.push(entry);
                }
                Ok(OrderedModules(modules))
            }
        }
        d.deserialize_map(V)
    }
}

pub(crate) fn decode(input: &[u8]) -> Result<ModuleGraph, EszipError> {
    let archive: Archive =
        serde_json::from_slice(input).map_err(|e| EszipError::InvalidV1 { reason: e.to_string() })?;
    if archive.version != VERSION {
        return Err(EszipError::InvalidV1 { reason: format!("version is {}, expected {VERSION}", archive.version) });
    }
    let mut seen = std::collections::HashSet::new();
    let mut entries = Vec::with_capacity(archive.modules.0.len());
    for (specifier, info) in archive.modules.0 {
        check_specifier(&specifier)?;
        if !seen.insert(specifier.clone()) {
            return Err(EszipError::DuplicateSpecifier { specifier });
        }
        entries.push(match info {
            ModuleInfo::Redirect(target) => Entry::Redirect { specifier, target: target.into() },
            ModuleInfo::Source(module) => {
                let kind = kind_of(module.content_type.as_deref());
                let text = module.transpiled.unwrap_or(module.source);
                Entry::Module(Module { specifier, kind, source: Bytes::copy_from_slice(text.as_bytes()) })
            }
        });
    }
    Ok(ModuleGraph { entries, npm: None })
}

/// v1 records carry the HTTP content type; everything but JSON was emitted
/// as JavaScript (TypeScript is stored transpiled).
fn kind_of(content_type: Option<&str>) -> ModuleKind {
    let essence = content_type.unwrap_or_default().split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if essence == "application/json" || essence == "text/json" || essence.ends_with("+json") {
        ModuleKind::Json
    } else {
        ModuleKind::JavaScript
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types_are_json() {
        for ct in ["application/json", "application/json; charset=utf-8", "Text/JSON", "application/ld+json"] {
            assert_eq!(kind_of(Some(ct)), ModuleKind::Json, "{ct}");
        }
        for ct in [None, Some("application/typescript"), Some("text/javascript"), Some("")] {
            assert_eq!(kind_of(ct), ModuleKind::JavaScript, "{ct:?}");
        }
    }
}
