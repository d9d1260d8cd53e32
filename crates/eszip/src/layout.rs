//! A bounds-checking walk over the ESZIP v2 layout, run *before* the input
//! reaches the `eszip` crate.
//!
//! The `eszip` crate allocates `vec![0; declared_len + digest]` for every
//! section and source it reads, trusting the lengths in the archive (up to
//! 4 GiB each), and its streaming design lets a module whose source is never
//! reached stay "pending" forever. This walk proves, without allocating
//! anything proportional to a declared size, that every length fits inside
//! the input, that the sources and source maps tile their sections exactly
//! (every module's data is reached once), that the checksum algorithm is one
//! we can verify, and that nothing follows the last section. It reads no
//! content beyond the framing and verifies no checksum; that is left to the
//! `eszip` crate, which only ever sees archives that passed this walk.
//!
//! Layout (all integers big-endian u32; `D` = digest size of the checksum,
//! 32 for SHA-256, 8 for xxh3-64, 0 for none):
//!
//! ```text
//! magic (8)
//! [2.2+] options:  len | (option, value) byte pairs | D
//! modules header:  len | entries | D
//! [2.1+] npm:      len | packages | D
//! sources:         len | (source | D)*        (at the offsets the header names)
//! source maps:     len | (source map | D)*
//!
//! entry:    specifier len | specifier | kind (1) | body
//!   kind 0 module:   source offset | source len | map offset | map len | module kind (1)
//!   kind 1 redirect: target len | target
//!   kind 2 npm (2.1+): package index
//! package:  name len | name | dep count | (dep name len | dep name | package index)*
//! ```
//!
//! A module whose (offset, len) is (0, 0) has no data and no digest.

use std::collections::HashMap;
use std::ops::Range;

use crate::error::EszipError;

/// The ESZIP v2 revisions, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Version {
    /// `ESZIP_V2`: SHA-256 always, no npm section.
    V2,
    /// `ESZIP2.1`: adds the npm section.
    V2_1,
    /// `ESZIP2.2`: adds the options header (checksum choice).
    V2_2,
    /// `ESZIP2.3`: adds Wasm modules.
    V2_3,
}

impl Version {
    pub(crate) fn from_magic(magic: &[u8]) -> Option<Self> {
        match magic {
            b"ESZIP_V2" => Some(Self::V2),
            b"ESZIP2.1" => Some(Self::V2_1),
            b"ESZIP2.2" => Some(Self::V2_2),
            b"ESZIP2.3" => Some(Self::V2_3),
            _ => None,
        }
    }
}

/// Checksum algorithms of the options header (option 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Checksum {
    None,
    Sha256,
    XxHash3,
}

impl Checksum {
    fn from_id(id: u8) -> Option<Self> {
        match id {
            0 => Some(Self::None),
            1 => Some(Self::Sha256),
            2 => Some(Self::XxHash3),
            _ => None,
        }
    }

    fn digest_len(self) -> usize {
        match self {
            Self::None => 0,
            Self::Sha256 => 32,
            Self::XxHash3 => 8,
        }
    }
}

/// One header entry, as byte ranges into the input (decoded only after the
/// `eszip` crate has verified the header checksum).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RawEntry {
    Module {
        specifier: Range<usize>,
        /// The module kind byte: 0 JS, 1 JSON, 2 JSONC, 3 opaque, 4 Wasm.
        kind: u8,
    },
    Redirect {
        specifier: Range<usize>,
        target: Range<usize>,
    },
}

/// What the walk learned.
#[derive(Debug)]
pub(crate) struct Layout {
    #[cfg_attr(not(test), allow(dead_code, reason = "read by the tests"))]
    pub(crate) version: Version,
    #[cfg_attr(not(test), allow(dead_code, reason = "read by the tests"))]
    pub(crate) checksum: Checksum,
    /// Module and redirect entries in header order; npm specifier entries
    /// are left out.
    pub(crate) entries: Vec<RawEntry>,
}

/// Walks a v2 archive. `input` must start with a v2 magic.
pub(crate) fn walk(input: &[u8]) -> Result<Layout, EszipError> {
    let mut r = Reader { input, pos: 0 };
    let magic = r.take(8, "magic")?;
    let Some(version) = Version::from_magic(magic) else {
        return Err(EszipError::UnsupportedVersion { magic: String::from_utf8_lossy(magic).into_owned() });
    };

    let checksum = if version >= Version::V2_2 {
        read_options(&mut r)?
    } else {
        // Before 2.2 there is no choice: SHA-256 everywhere.
        Checksum::Sha256
    };
    let digest = checksum.digest_len();

    let (header_start, header) = r.section("modules header", digest)?;
    let (entries, data) = read_header(header, header_start, version)?;

    if version >= Version::V2_1 {
        let (npm_start, npm) = r.section("npm snapshot", digest)?;
        walk_npm(npm, npm_start)?;
    }

    let (sources_start, sources) = r.section("sources", 0)?;
    tile("source", sources_start, sources.len(), digest, data.iter().map(|d| (&d.specifier, &d.source)), input)?;
    let (maps_start, maps) = r.section("source maps", 0)?;
    tile("source map", maps_start, maps.len(), digest, data.iter().map(|d| (&d.specifier, &d.source_map)), input)?;

    if r.remaining() > 0 {
        return Err(EszipError::TrailingBytes { offset: r.pos, count: r.remaining() });
    }
    Ok(Layout { version, checksum, entries })
}

/// Reads the 2.2+ options header and returns the checksum it selects.
fn read_options(r: &mut Reader<'_>) -> Result<Checksum, EszipError> {
    // The digest size is only known after reading the options themselves.
    let (start, options) = r.section("options header", 0)?;
    if options.len() % 2 != 0 {
        return Err(malformed(
            start,
            format!("options header has odd length {} (options are byte pairs)", options.len()),
        ));
    }
    let mut checksum = Checksum::None;
    let mut digest_len = None;
    for pair in options.chunks_exact(2) {
        match pair {
            [0, id] => {
                checksum = Checksum::from_id(*id).ok_or(EszipError::UnsupportedChecksum { algorithm: *id })?;
            }
            [1, len] => digest_len = Some(usize::from(*len)),
            // Unknown options are ignored, as the format asks, for forward
            // compatibility.
            _ => {}
        }
    }
    if let Some(len) = digest_len
        && len != checksum.digest_len()
    {
        return Err(malformed(
            start,
            format!("checksum size {len} does not match {checksum:?} ({} bytes)", checksum.digest_len()),
        ));
    }
    r.take(checksum.digest_len(), "options header checksum")?;
    Ok(checksum)
}

/// Where one module's source or source map lies in its data section.
#[derive(Debug, Clone, Copy)]
struct Slot {
    offset: u32,
    len: u32,
}

impl Slot {
    /// (0, 0) means "no data, no digest".
    fn is_empty_marker(self) -> bool {
        self.offset == 0 && self.len == 0
    }
}

struct ModuleData {
    specifier: Range<usize>,
    source: Slot,
    source_map: Slot,
}

fn read_header(header: &[u8], base: usize, version: Version) -> Result<(Vec<RawEntry>, Vec<ModuleData>), EszipError> {
    let mut r = Reader { input: header, pos: 0 };
    let mut entries = Vec::new();
    let mut data = Vec::new();
    let mut seen: HashMap<&[u8], usize> = HashMap::new();
    while r.remaining() > 0 {
        let entry_start = base + r.pos;
        let specifier = r.string_range("specifier").map_err(|e| in_header(e, base))?;
        let specifier_bytes = &header[specifier.clone()];
        let specifier = shift(specifier, base);
        let kind_at = base + r.pos;
        let kind = r.take(1, "entry kind").map_err(|e| in_header(e, base))?[0];
        match kind {
            0 => {
                let mut slot = || -> Result<Slot, EszipError> {
                    Ok(Slot { offset: r.u32("source offset")?, len: r.u32("source length")? })
                };
                let source = slot().map_err(|e| in_header(e, base))?;
                let source_map = slot().map_err(|e| in_header(e, base))?;
                let kind = r.take(1, "module kind").map_err(|e| in_header(e, base))?[0];
                data.push(ModuleData { specifier: specifier.clone(), source, source_map });
                entries.push(RawEntry::Module { specifier, kind });
            }
            1 => {
                let target = r.string_range("redirect target").map_err(|e| in_header(e, base))?;
                entries.push(RawEntry::Redirect { specifier, target: shift(target, base) });
            }
            2 if version >= Version::V2_1 => {
                // An npm specifier pointing into the npm snapshot; skipped.
                r.u32("npm package index").map_err(|e| in_header(e, base))?;
                continue;
            }
            other => {
                return Err(malformed(kind_at, format!("unknown entry kind {other} in the modules header")));
            }
        }
        if seen.insert(specifier_bytes, entry_start).is_some() {
            return Err(EszipError::DuplicateSpecifier {
                specifier: String::from_utf8_lossy(specifier_bytes).into_owned(),
            });
        }
    }
    Ok((entries, data))
}

/// Walks the npm snapshot so the `eszip` crate's `with_capacity(dep count)`
/// is bounded by real bytes.
fn walk_npm(npm: &[u8], base: usize) -> Result<(), EszipError> {
    let mut r = Reader { input: npm, pos: 0 };
    let result = (|| {
        while r.remaining() > 0 {
            r.string_range("npm package name")?;
            let deps = r.u32("npm dependency count")?;
            for _ in 0..deps {
                r.string_range("npm dependency name")?;
                r.u32("npm dependency index")?;
            }
        }
        Ok(())
    })();
    result.map_err(|e| match e {
        EszipError::Truncated { section, offset, .. } => {
            malformed(base + offset, format!("{section} overruns the npm snapshot section"))
        }
        other => other,
    })
}

/// Checks that the data slots of all modules tile a data section of
/// `section_len` bytes exactly, in the order the `eszip` crate reads them:
/// from offset 0, each step consumes the slot that starts there plus its
/// digest.
fn tile<'a>(
    what: &'static str,
    section_start: usize,
    section_len: usize,
    digest: usize,
    slots: impl Iterator<Item = (&'a Range<usize>, &'a Slot)>,
    input: &[u8],
) -> Result<(), EszipError> {
    let mut by_offset: HashMap<usize, (usize, &Range<usize>)> = HashMap::new();
    for (specifier, slot) in slots {
        if slot.is_empty_marker() {
            continue;
        }
        let offset = slot.offset as usize;
        if let Some((_, other)) = by_offset.insert(offset, (slot.len as usize, specifier)) {
            return Err(malformed(
                section_start + offset,
                format!("{what}s of {} and {} share offset {offset}", lossy(input, other), lossy(input, specifier)),
            ));
        }
    }
    let mut read = 0usize;
    while read < section_len {
        let Some((len, specifier)) = by_offset.remove(&read) else {
            return Err(malformed(
                section_start + read,
                format!("no module's {what} starts at offset {read} of the {what}s section"),
            ));
        };
        let step = len + digest;
        if step > section_len - read {
            return Err(malformed(
                section_start + read,
                format!(
                    "{what} of {} ({len} bytes + {digest} digest) overruns the {what}s section",
                    lossy(input, specifier)
                ),
            ));
        }
        if step == 0 {
            // Cannot happen with a non-empty marker and no digest unless
            // len is 0; the next lookup at the same offset would fail anyway.
            return Err(malformed(section_start + read, format!("zero-length {what} of {}", lossy(input, specifier))));
        }
        read += step;
    }
    if let Some((offset, (_, specifier))) = by_offset.into_iter().min_by_key(|(o, _)| *o) {
        return Err(malformed(
            section_start + read,
            format!("{what} of {} at offset {offset} is never reached in the {what}s section", lossy(input, specifier)),
        ));
    }
    Ok(())
}

fn lossy(input: &[u8], range: &Range<usize>) -> String {
    input.get(range.clone()).map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default()
}

fn shift(range: Range<usize>, by: usize) -> Range<usize> {
    range.start + by..range.end + by
}

fn malformed(offset: usize, reason: String) -> EszipError {
    EszipError::Malformed { offset, reason }
}

/// A truncation inside the modules header is a malformed header: the header
/// length itself was within the input.
fn in_header(err: EszipError, base: usize) -> EszipError {
    match err {
        EszipError::Truncated { section, offset, .. } => {
            malformed(base + offset, format!("{section} overruns the modules header"))
        }
        other => other,
    }
}

/// A cursor that never reads past its input and never allocates.
struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.input.len() - self.pos
    }

    fn take(&mut self, n: usize, section: &'static str) -> Result<&'a [u8], EszipError> {
        let available = self.remaining();
        if n > available {
            return Err(EszipError::Truncated { section, offset: self.pos, needed: n as u64, available });
        }
        let start = self.pos;
        self.pos += n;
        Ok(&self.input[start..self.pos])
    }

    fn u32(&mut self, section: &'static str) -> Result<u32, EszipError> {
        let b = self.take(4, section)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A length-prefixed byte string; returns its range in this reader.
    fn string_range(&mut self, section: &'static str) -> Result<Range<usize>, EszipError> {
        let len = self.u32(section)? as usize;
        let start = self.pos;
        self.take(len, section)?;
        Ok(start..self.pos)
    }

    /// `len | body | digest`; returns the body's start and the body.
    fn section(&mut self, section: &'static str, digest: usize) -> Result<(usize, &'a [u8]), EszipError> {
        let len = self.u32(section)? as usize;
        let start = self.pos;
        let available = self.remaining();
        // `len` is at most u32::MAX, so this cannot overflow a 64-bit usize;
        // saturate anyway for 32-bit targets.
        let needed = len.saturating_add(digest);
        if needed > available {
            return Err(EszipError::Truncated {
                section,
                offset: start,
                needed: len as u64 + digest as u64,
                available,
            });
        }
        let body = self.take(len, section)?;
        self.take(digest, section)?;
        Ok((start, body))
    }
}

#[cfg(test)]
mod tests;
