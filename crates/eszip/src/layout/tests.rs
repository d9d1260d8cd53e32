//! The bounds walk on hand-made layouts. The walk verifies no checksum, so
//! digests here are filler bytes.

use super::*;

/// Builds v2 layouts field by field.
#[derive(Default)]
struct Bytes(Vec<u8>);

impl Bytes {
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn u32(self, n: u32) -> Self {
        self.raw(&n.to_be_bytes())
    }
    fn str(self, s: &str) -> Self {
        self.u32(s.len() as u32).raw(s.as_bytes())
    }
    /// `len | body | digest`.
    fn section(self, body: &[u8], digest: usize) -> Self {
        self.u32(body.len() as u32).raw(body).raw(&vec![0xAA; digest])
    }
}

fn module(specifier: &str, source: (u32, u32), map: (u32, u32), kind: u8) -> Vec<u8> {
    Bytes::default().str(specifier).raw(&[0]).u32(source.0).u32(source.1).u32(map.0).u32(map.1).raw(&[kind]).0
}

fn redirect(specifier: &str, target: &str) -> Vec<u8> {
    Bytes::default().str(specifier).raw(&[1]).str(target).0
}

/// An ESZIP2.3 archive without checksums: options `[0, 0]`, then the given
/// header entries, npm section, sources and source maps.
fn v23(header: &[u8], npm: &[u8], sources: &[u8], maps: &[u8]) -> Vec<u8> {
    Bytes::default()
        .raw(b"ESZIP2.3")
        .section(&[0, 0], 0)
        .section(header, 0)
        .section(npm, 0)
        .section(sources, 0)
        .section(maps, 0)
        .0
}

fn entry_specifiers(input: &[u8], layout: &Layout) -> Vec<String> {
    layout
        .entries
        .iter()
        .map(|e| match e {
            RawEntry::Module { specifier, kind } => {
                format!("{}:{kind}", lossy(input, specifier))
            }
            RawEntry::Redirect { specifier, target } => {
                format!("{}->{}", lossy(input, specifier), lossy(input, target))
            }
        })
        .collect()
}

#[test]
fn walks_modules_redirects_and_sources() {
    let header = [
        module("file:///a.js", (0, 3), (0, 0), 0),
        module("file:///b.json", (3, 2), (0, 4), 1),
        redirect("file:///c.js", "file:///a.js"),
    ]
    .concat();
    let input = v23(&header, &[], b"abc{}", b"map!");
    let layout = walk(&input).unwrap();
    assert_eq!(layout.version, Version::V2_3);
    assert_eq!(layout.checksum, Checksum::None);
    assert_eq!(entry_specifiers(&input, &layout), ["file:///a.js:0", "file:///b.json:1", "file:///c.js->file:///a.js"]);
}

#[test]
fn v2_and_v2_1_imply_sha256_digests() {
    let header = module("file:///a.js", (0, 1), (0, 0), 0);
    let sources = [b"x".as_slice(), &[0xAA; 32]].concat();
    let v2 = Bytes::default().raw(b"ESZIP_V2").section(&header, 32).section(&sources, 0).section(&[], 0).0;
    assert_eq!(walk(&v2).unwrap().checksum, Checksum::Sha256);

    let v21 =
        Bytes::default().raw(b"ESZIP2.1").section(&header, 32).section(&[], 32).section(&sources, 0).section(&[], 0).0;
    let layout = walk(&v21).unwrap();
    assert_eq!((layout.version, layout.checksum), (Version::V2_1, Checksum::Sha256));

    // Without the digest after the source, the sources do not tile.
    let short = Bytes::default().raw(b"ESZIP_V2").section(&header, 32).section(b"x", 0).section(&[], 0).0;
    assert!(matches!(walk(&short), Err(EszipError::Malformed { .. })));
}

#[test]
fn options_select_the_digest_size() {
    let header = module("file:///a.js", (0, 1), (0, 0), 0);
    let sources = [b"x".as_slice(), &[0xAA; 8]].concat();
    // xxh3 (2), explicit size 8, and an unknown option 9 that is ignored.
    let input = Bytes::default()
        .raw(b"ESZIP2.2")
        .section(&[0, 2, 1, 8, 9, 9], 8)
        .section(&header, 8)
        .section(&[], 8)
        .section(&sources, 0)
        .section(&[], 0)
        .0;
    assert_eq!(walk(&input).unwrap().checksum, Checksum::XxHash3);
}

#[test]
fn refuses_bad_options() {
    let with_options = |options: &[u8], digest: usize| {
        Bytes::default()
            .raw(b"ESZIP2.2")
            .section(options, digest)
            .section(&[], digest)
            .section(&[], digest)
            .section(&[], 0)
            .section(&[], 0)
            .0
    };
    assert_eq!(walk(&with_options(&[0, 7], 0)).unwrap_err(), EszipError::UnsupportedChecksum { algorithm: 7 });
    // An unknown algorithm is refused even with an explicit digest size.
    assert_eq!(walk(&with_options(&[0, 3, 1, 16], 16)).unwrap_err(), EszipError::UnsupportedChecksum { algorithm: 3 });
    assert!(matches!(walk(&with_options(&[0], 0)), Err(EszipError::Malformed { .. })));
    assert!(matches!(
        walk(&with_options(&[0, 1, 1, 8], 8)),
        Err(EszipError::Malformed { reason, .. }) if reason.contains("checksum size 8")
    ));
    assert!(walk(&with_options(&[0, 1, 1, 32], 32)).is_ok());
    assert!(walk(&with_options(&[], 0)).is_ok());
}

#[test]
fn huge_declared_lengths_are_refused_before_allocation() {
    // Header length u32::MAX with a handful of bytes behind it.
    let input = Bytes::default().raw(b"ESZIP2.3").section(&[0, 0], 0).u32(u32::MAX).raw(b"tiny").0;
    assert_eq!(
        walk(&input).unwrap_err(),
        EszipError::Truncated { section: "modules header", offset: 18, needed: u64::from(u32::MAX), available: 4 }
    );

    // A module claiming a 4 GiB source in a 3-byte sources section.
    let header = module("file:///a.js", (0, u32::MAX), (0, 0), 0);
    let input = v23(&header, &[], b"abc", &[]);
    assert!(matches!(
        walk(&input),
        Err(EszipError::Malformed { reason, .. }) if reason.contains("overruns")
    ));

    // A specifier length larger than the header.
    let header = Bytes::default().u32(1 << 30).raw(b"file:///").0;
    assert!(matches!(
        walk(&v23(&header, &[], &[], &[])),
        Err(EszipError::Malformed { reason, .. }) if reason.contains("specifier")
    ));

    // An npm package claiming 2^32-1 dependencies in a few bytes.
    let npm = Bytes::default().str("chalk@5.3.0").u32(u32::MAX).0;
    assert!(matches!(
        walk(&v23(&[], &npm, &[], &[])),
        Err(EszipError::Malformed { reason, .. }) if reason.contains("npm")
    ));
}

#[test]
fn sources_must_tile_exactly() {
    // A source never reached (offset past the end of what is walked).
    let header = [module("file:///a.js", (0, 1), (0, 0), 0), module("file:///b.js", (5, 1), (0, 0), 0)].concat();
    assert!(matches!(walk(&v23(&header, &[], b"ab", &[])), Err(EszipError::Malformed { .. })));
    // A module referenced at an offset nothing starts at.
    let header = module("file:///a.js", (1, 1), (0, 0), 0);
    assert!(matches!(
        walk(&v23(&header, &[], b"ab", &[])),
        Err(EszipError::Malformed { reason, .. }) if reason.contains("offset 0")
    ));
    // Two modules sharing one source.
    let header = [module("file:///a.js", (0, 1), (0, 0), 0), module("file:///b.js", (0, 1), (0, 0), 0)].concat();
    assert!(matches!(
        walk(&v23(&header, &[], b"a", &[])),
        Err(EszipError::Malformed { reason, .. }) if reason.contains("share")
    ));
    // A zero-length source at a non-zero offset with no digest.
    let header = [module("file:///a.js", (0, 1), (0, 0), 0), module("file:///b.js", (1, 0), (0, 0), 0)].concat();
    assert!(matches!(walk(&v23(&header, &[], b"ab", &[])), Err(EszipError::Malformed { .. })));
    // Source maps are held to the same rule.
    let header = module("file:///a.js", (0, 0), (0, 9), 0);
    assert!(matches!(
        walk(&v23(&header, &[], &[], b"short")),
        Err(EszipError::Malformed { reason, .. }) if reason.contains("source map")
    ));
}

#[test]
fn refuses_duplicates_unknown_entries_and_trailing_bytes() {
    let header = [module("file:///a.js", (0, 0), (0, 0), 0), redirect("file:///a.js", "file:///b.js")].concat();
    assert_eq!(
        walk(&v23(&header, &[], &[], &[])).unwrap_err(),
        EszipError::DuplicateSpecifier { specifier: "file:///a.js".into() }
    );

    let header = Bytes::default().str("file:///a.js").raw(&[7]).0;
    assert!(matches!(
        walk(&v23(&header, &[], &[], &[])),
        Err(EszipError::Malformed { reason, .. }) if reason.contains("entry kind 7")
    ));

    // npm specifier entries only exist from ESZIP2.1 on.
    let header = Bytes::default().str("chalk@5").raw(&[2]).u32(0).0;
    let v2 = Bytes::default().raw(b"ESZIP_V2").section(&header, 32).section(&[], 0).section(&[], 0).0;
    assert!(matches!(walk(&v2), Err(EszipError::Malformed { .. })));
    // ... where they are skipped.
    let layout = walk(&v23(&header, &[], &[], &[])).unwrap();
    assert!(layout.entries.is_empty());

    let mut input = v23(&[], &[], &[], &[]);
    let end = input.len();
    input.extend_from_slice(b"junk");
    assert_eq!(walk(&input).unwrap_err(), EszipError::TrailingBytes { offset: end, count: 4 });
}

#[test]
fn every_truncation_is_an_error() {
    let header = [module("file:///a.js", (0, 3), (0, 2), 0), redirect("file:///c.js", "file:///a.js")].concat();
    let npm = Bytes::default().str("a@1.0.0").u32(1).str("b").u32(0).0;
    let input = v23(&header, &npm, b"abc", b"{}");
    assert!(walk(&input).is_ok());
    for len in 0..input.len() {
        assert!(walk(&input[..len]).is_err(), "prefix of {len} bytes");
    }
}
