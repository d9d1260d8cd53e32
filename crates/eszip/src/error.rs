//! The one error type of this crate.

use std::fmt;

/// Why an archive was refused. Every variant names the problem and, where it
/// is known, the byte offset or the module it concerns; none of them carries
/// module source text, so they are safe to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EszipError {
    /// Neither an ESZIP v2 magic nor a v1 JSON object.
    #[error("not an ESZIP archive (starts with {prefix:?})")]
    NotAnArchive {
        /// The first bytes of the input, lossily decoded, for the log.
        prefix: String,
    },

    /// An `ESZIP`-looking magic this crate does not know (say `ESZIP2.9`).
    #[error("unsupported ESZIP version: magic {magic:?}")]
    UnsupportedVersion {
        /// The 8-byte magic, lossily decoded.
        magic: String,
    },

    /// The input ends before a part it declares. Also raised when a declared
    /// length is larger than what is left of the input, before anything of
    /// that size is allocated.
    #[error("truncated archive: {section} at byte {offset} needs {needed} bytes, only {available} left")]
    Truncated {
        /// Which part of the archive was being read.
        section: &'static str,
        /// Where that part starts.
        offset: usize,
        /// How many bytes it declares or needs.
        needed: u64,
        /// How many bytes the input still had.
        available: usize,
    },

    /// The bytes are there but do not fit the format (bad entry kind, a
    /// length that overruns its section, sources that do not tile, ...).
    #[error("malformed archive at byte {offset}: {reason}")]
    Malformed {
        /// Byte offset in the input where the problem was found.
        offset: usize,
        /// What is wrong.
        reason: String,
    },

    /// Bytes after the end of the last section.
    #[error("{count} unexpected bytes after the end of the archive at byte {offset}")]
    TrailingBytes {
        /// Where the archive ends.
        offset: usize,
        /// How many bytes follow it.
        count: usize,
    },

    /// The ESZIP2.2+ options header names a checksum algorithm this crate
    /// cannot verify. Refused rather than accepted unverified.
    #[error("unsupported checksum algorithm {algorithm} in the options header")]
    UnsupportedChecksum {
        /// The algorithm byte (0 = none, 1 = SHA-256, 2 = xxh3-64 are known).
        algorithm: u8,
    },

    /// A checksum did not match its content.
    #[error("checksum mismatch in {scope}")]
    ChecksumMismatch {
        /// Which part of the archive is corrupt.
        scope: ChecksumScope,
    },

    /// A JavaScript or JSON module whose source is not UTF-8.
    #[error("module {specifier}: source is not valid UTF-8")]
    InvalidUtf8 {
        /// The module.
        specifier: String,
    },

    /// A specifier or redirect target that is not an absolute URL.
    #[error("invalid specifier {specifier:?}: {reason}")]
    InvalidSpecifier {
        /// The specifier as stored (lossily decoded if it was not UTF-8).
        specifier: String,
        /// Why it was refused.
        reason: String,
    },

    /// The same specifier appears twice in the archive.
    #[error("specifier {specifier} appears more than once")]
    DuplicateSpecifier {
        /// The repeated specifier.
        specifier: String,
    },

    /// A module of a kind an isolate cannot load: `jsonc` (an embedded
    /// `deno.jsonc` import map) or `opaque data`.
    #[error("module {specifier}: unsupported module kind {kind}")]
    UnsupportedModuleKind {
        /// The module.
        specifier: String,
        /// The kind's name.
        kind: &'static str,
    },

    /// A v1 (JSON) archive that is not valid JSON, has the wrong shape, or
    /// the wrong `version`.
    #[error("invalid ESZIP v1 archive: {reason}")]
    InvalidV1 {
        /// What is wrong.
        reason: String,
    },

    /// The archive declares a module whose source the decoder did not
    /// produce.
    #[error("module {specifier}: source missing from the archive")]
    MissingSource {
        /// The module.
        specifier: String,
    },

    /// The `eszip` crate refused the archive for a reason not covered above.
    #[error("rejected by the eszip decoder: {reason}")]
    Rejected {
        /// The decoder's message.
        reason: String,
    },

    /// The decoder panicked. The panic was caught; this is a bug to report,
    /// but for the caller it is just another bad archive.
    #[error("the ESZIP decoder panicked: {message}")]
    DecoderPanicked {
        /// The panic message, if it was a string.
        message: String,
    },
}

/// Which checksummed part of an archive failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChecksumScope {
    /// The ESZIP2.2+ options header.
    OptionsHeader,
    /// The modules header (the table of specifiers, kinds and offsets).
    ModulesHeader,
    /// The ESZIP2.1+ npm snapshot section.
    NpmSnapshot,
    /// The source or the source map of one module (the decoder does not say
    /// which of the two).
    Module {
        /// The module.
        specifier: String,
    },
}

impl fmt::Display for ChecksumScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OptionsHeader => f.write_str("the options header"),
            Self::ModulesHeader => f.write_str("the modules header"),
            Self::NpmSnapshot => f.write_str("the npm snapshot"),
            Self::Module { specifier } => write!(f, "the source or source map of {specifier}"),
        }
    }
}

impl From<eszip::ParseError> for EszipError {
    fn from(err: eszip::ParseError) -> Self {
        use eszip::ParseError as P;
        let scope = match err {
            P::InvalidV22OptionsHeaderHash => ChecksumScope::OptionsHeader,
            P::InvalidV2HeaderHash => ChecksumScope::ModulesHeader,
            P::InvalidV2NpmSnapshotHash => ChecksumScope::NpmSnapshot,
            P::InvalidV2SourceHash(specifier) => ChecksumScope::Module { specifier },
            other => {
                return Self::Rejected {
                    // `{:#}` keeps the anyhow context some variants carry.
                    reason: format!("{other:#}"),
                };
            }
        };
        Self::ChecksumMismatch { scope }
    }
}
