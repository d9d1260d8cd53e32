//! A byte-exact ESZIP v2 writer for tests: every version and checksum, npm
//! sections, and module kinds the toolchain does not emit. For ESZIP2.3 its
//! output is identical to the `eszip` crate's `into_bytes` (a test checks
//! this), so the other versions differ from real archives only in the
//! fields the format says they differ in.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V2,
    V2_1,
    V2_2,
    V2_3,
}

impl Version {
    pub const ALL: [Version; 4] = [Version::V2, Version::V2_1, Version::V2_2, Version::V2_3];

    pub fn magic(self) -> &'static [u8; 8] {
        match self {
            Version::V2 => b"ESZIP_V2",
            Version::V2_1 => b"ESZIP2.1",
            Version::V2_2 => b"ESZIP2.2",
            Version::V2_3 => b"ESZIP2.3",
        }
    }

    fn has_options(self) -> bool {
        matches!(self, Version::V2_2 | Version::V2_3)
    }

    fn has_npm(self) -> bool {
        self != Version::V2
    }

    /// The checksums this version can carry.
    pub fn checksums(self) -> &'static [Checksum] {
        if self.has_options() { &[Checksum::None, Checksum::Sha256, Checksum::XxHash3] } else { &[Checksum::Sha256] }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    None,
    Sha256,
    XxHash3,
}

impl Checksum {
    pub fn id(self) -> u8 {
        match self {
            Checksum::None => 0,
            Checksum::Sha256 => 1,
            Checksum::XxHash3 => 2,
        }
    }

    pub fn hash(self, bytes: &[u8]) -> Vec<u8> {
        match self {
            Checksum::None => Vec::new(),
            Checksum::Sha256 => {
                use sha2::Digest;
                sha2::Sha256::digest(bytes).to_vec()
            }
            Checksum::XxHash3 => xxhash_rust::xxh3::xxh3_64(bytes).to_be_bytes().to_vec(),
        }
    }
}

/// Module kind bytes as stored.
pub const JS: u8 = 0;
pub const JSON: u8 = 1;
pub const JSONC: u8 = 2;
pub const OPAQUE: u8 = 3;
pub const WASM: u8 = 4;

#[derive(Debug, Clone)]
pub enum Item {
    Module {
        specifier: String,
        kind: u8,
        source: Vec<u8>,
        source_map: Vec<u8>,
    },
    Redirect {
        specifier: String,
        target: String,
    },
    /// An npm specifier entry pointing at package `index` of the snapshot.
    Npm {
        req: String,
        index: u32,
    },
}

pub fn module(specifier: &str, kind: u8, source: impl AsRef<[u8]>) -> Item {
    Item::Module { specifier: specifier.into(), kind, source: source.as_ref().to_vec(), source_map: Vec::new() }
}

pub fn redirect(specifier: &str, target: &str) -> Item {
    Item::Redirect { specifier: specifier.into(), target: target.into() }
}

/// An npm package of the snapshot: serialized id and (name, package index)
/// dependencies.
#[derive(Debug, Clone)]
pub struct NpmPackage {
    pub id: String,
    pub deps: Vec<(String, u32)>,
}

#[derive(Debug, Clone)]
pub struct Archive {
    pub version: Version,
    pub checksum: Checksum,
    pub items: Vec<Item>,
    pub npm: Vec<NpmPackage>,
}

impl Archive {
    pub fn new(version: Version, checksum: Checksum, items: Vec<Item>) -> Self {
        Archive { version, checksum, items, npm: Vec::new() }
    }

    pub fn encode(&self) -> Vec<u8> {
        let sum = self.checksum;
        let mut out = self.version.magic().to_vec();
        if self.version.has_options() {
            let digest_len = sum.hash(b"").len() as u8;
            section(&mut out, &[0, sum.id(), 1, digest_len], sum);
        } else {
            assert_eq!(sum, Checksum::Sha256, "{:?} is always SHA-256", self.version);
        }

        let mut header = Vec::new();
        let mut sources = Vec::new();
        let mut maps = Vec::new();
        for item in &self.items {
            match item {
                Item::Module { specifier, kind, source, source_map } => {
                    string(&mut header, specifier.as_bytes());
                    header.push(0);
                    data(&mut header, &mut sources, source, sum);
                    data(&mut header, &mut maps, source_map, sum);
                    header.push(*kind);
                }
                Item::Redirect { specifier, target } => {
                    string(&mut header, specifier.as_bytes());
                    header.push(1);
                    string(&mut header, target.as_bytes());
                }
                Item::Npm { req, index } => {
                    string(&mut header, req.as_bytes());
                    header.push(2);
                    header.extend_from_slice(&index.to_be_bytes());
                }
            }
        }
        section(&mut out, &header, sum);

        if self.version.has_npm() {
            let mut npm = Vec::new();
            for pkg in &self.npm {
                string(&mut npm, pkg.id.as_bytes());
                npm.extend_from_slice(&(pkg.deps.len() as u32).to_be_bytes());
                for (name, index) in &pkg.deps {
                    string(&mut npm, name.as_bytes());
                    npm.extend_from_slice(&index.to_be_bytes());
                }
            }
            section(&mut out, &npm, sum);
        } else {
            assert!(self.npm.is_empty(), "ESZIP_V2 has no npm section");
        }

        out.extend_from_slice(&(sources.len() as u32).to_be_bytes());
        out.extend_from_slice(&sources);
        out.extend_from_slice(&(maps.len() as u32).to_be_bytes());
        out.extend_from_slice(&maps);
        out
    }
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// `len | body | digest`.
fn section(out: &mut Vec<u8>, body: &[u8], sum: Checksum) {
    string(out, body);
    out.extend_from_slice(&sum.hash(body));
}

/// Appends `bytes` (and its digest) to a data section and its offset and
/// length to the header; empty data is stored as (0, 0) with no digest.
fn data(header: &mut Vec<u8>, section: &mut Vec<u8>, bytes: &[u8], sum: Checksum) {
    if bytes.is_empty() {
        header.extend_from_slice(&[0; 8]);
        return;
    }
    header.extend_from_slice(&(section.len() as u32).to_be_bytes());
    header.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    section.extend_from_slice(bytes);
    section.extend_from_slice(&sum.hash(bytes));
}

/// Re-encodes a (toolchain-built) v2 archive with another checksum using
/// the `eszip` crate's own writer, which always writes ESZIP2.3.
///
/// A parsed archive keeps its explicit checksum size (option 1), which
/// `into_bytes` insists matches the new algorithm; for an unchecksummed
/// archive with options `[0, 0, 1, 0]` (what the toolchain writes) the size
/// option is dropped first so that any checksum can be chosen.
pub fn reencode_with_eszip_crate(archive: &[u8], checksum: eszip::v2::Checksum) -> Vec<u8> {
    use futures_util::FutureExt;
    let mut archive = archive.to_vec();
    if archive.get(8..16) == Some(&[0, 0, 0, 4, 0, 0, 1, 0]) {
        archive.splice(8..16, [0, 0, 0, 2, 0, 0]);
    }
    let reader = futures_util::io::BufReader::new(&archive[..]);
    let (mut eszip, rest) =
        eszip::EszipV2::parse(reader).now_or_never().expect("in-memory parse is immediate").expect("valid archive");
    rest.now_or_never().expect("in-memory parse is immediate").expect("valid archive data");
    eszip.set_checksum(checksum);
    eszip.into_bytes()
}
