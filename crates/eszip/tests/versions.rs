//! Every format version and checksum: archives from older Deno toolchains
//! (`fixtures/deno/`), the hand-written v1 fixture, and layouts from the
//! test writer (`common/writer.rs`) for the combinations and the mistakes
//! the toolchain does not produce.

mod common;

use common::writer::{Archive, Checksum, Item, JS, JSON, JSONC, NpmPackage, OPAQUE, Version, WASM, module, redirect};
use common::{find_once, fixture, parse, summary};
use isocloud_eszip::{ChecksumScope, Entry, EszipError, ModuleGraph, ModuleKind};

fn sample_items() -> Vec<Item> {
    vec![
        Item::Module {
            specifier: "file:///src/main.js".into(),
            kind: JS,
            source: b"import \"./data.json\" with { type: \"json\" }; // MAIN_MARKER\n".to_vec(),
            source_map: b"{\"version\":3,\"mappings\":\"MAP_MARKER\"}".to_vec(),
        },
        module("file:///src/data.json", JSON, "{\"a\":1}"),
        redirect("https://example.com/x", "https://example.com/x.js"),
        module("https://example.com/x.js", JS, "export {};\n"),
        module("file:///src/empty.js", JS, ""),
    ]
}

fn sample_summary() -> Vec<String> {
    vec![
        "file:///src/main.js JavaScript import \"./data.json\" with { type: \"json\" }; // MAIN_MARKER\n".into(),
        "file:///src/data.json Json {\"a\":1}".into(),
        "https://example.com/x -> https://example.com/x.js".into(),
        "https://example.com/x.js JavaScript export {};\n".into(),
        "file:///src/empty.js JavaScript ".into(),
    ]
}

/// Every (version, checksum) pair the format allows.
fn combinations() -> impl Iterator<Item = (Version, Checksum)> {
    Version::ALL.into_iter().flat_map(|v| v.checksums().iter().map(move |c| (v, *c)))
}

#[test]
fn every_version_and_checksum_decodes() {
    for (version, checksum) in combinations() {
        let bytes = Archive::new(version, checksum, sample_items()).encode();
        let graph = parse(&bytes).unwrap_or_else(|e| panic!("{version:?} {checksum:?}: {e}"));
        assert_eq!(summary(&graph), sample_summary(), "{version:?} {checksum:?}");
    }
}

#[test]
fn the_test_writer_matches_the_eszip_crate_writer() {
    for (checksum, theirs) in [
        (Checksum::None, eszip::v2::Checksum::NoChecksum),
        (Checksum::Sha256, eszip::v2::Checksum::Sha256),
        (Checksum::XxHash3, eszip::v2::Checksum::XxHash3),
    ] {
        let ours = Archive::new(Version::V2_3, checksum, sample_items()).encode();
        let reencoded = common::writer::reencode_with_eszip_crate(&ours, theirs);
        assert!(ours == reencoded, "{checksum:?}");
    }
}

#[test]
fn corruption_is_caught_wherever_there_is_a_checksum() {
    for (version, checksum) in combinations().filter(|(_, c)| *c != Checksum::None) {
        let clean = Archive::new(version, checksum, sample_items()).encode();
        let what = format!("{version:?} {checksum:?}");

        let mut bytes = clean.clone();
        let at = find_once(&bytes, b"MAIN_MARKER");
        bytes[at] ^= 1;
        assert_eq!(
            parse(&bytes).unwrap_err(),
            EszipError::ChecksumMismatch { scope: ChecksumScope::Module { specifier: "file:///src/main.js".into() } },
            "{what}: source"
        );

        let mut bytes = clean.clone();
        let at = find_once(&bytes, b"MAP_MARKER");
        bytes[at] ^= 1;
        assert_eq!(
            parse(&bytes).unwrap_err(),
            EszipError::ChecksumMismatch { scope: ChecksumScope::Module { specifier: "file:///src/main.js".into() } },
            "{what}: source map"
        );

        let mut bytes = clean.clone();
        let at = find_once(&bytes, b"file:///src/empty.js") + 8;
        bytes[at] ^= 1;
        assert_eq!(
            parse(&bytes).unwrap_err(),
            EszipError::ChecksumMismatch { scope: ChecksumScope::ModulesHeader },
            "{what}: header"
        );

        // The digest itself, last bytes of the archive's last source map.
        let mut bytes = clean.clone();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(parse(&bytes), Err(EszipError::ChecksumMismatch { .. })), "{what}: digest");
    }
}

#[test]
fn a_corrupt_options_header_is_caught() {
    for checksum in [Checksum::Sha256, Checksum::XxHash3] {
        let clean = Archive::new(Version::V2_2, checksum, sample_items()).encode();
        // Options are at 12..16: [0, id, 1, size]; then the digest.
        let mut bytes = clean.clone();
        bytes[16] ^= 1;
        assert_eq!(
            parse(&bytes).unwrap_err(),
            EszipError::ChecksumMismatch { scope: ChecksumScope::OptionsHeader },
            "{checksum:?}"
        );
        // An algorithm this crate cannot verify is refused, not skipped.
        let mut bytes = clean;
        bytes[13] = 9;
        assert_eq!(parse(&bytes).unwrap_err(), EszipError::UnsupportedChecksum { algorithm: 9 });
    }
}

fn npm_archive(version: Version, checksum: Checksum) -> Archive {
    let mut archive = Archive::new(version, checksum, sample_items());
    archive.items.push(Item::Npm { req: "chalk@^5".into(), index: 0 });
    archive.npm = vec![
        NpmPackage { id: "chalk@5.3.0".into(), deps: vec![("ansi-styles".into(), 1)] },
        NpmPackage { id: "ansi-styles@6.2.1".into(), deps: vec![] },
    ];
    archive
}

#[test]
fn npm_sections_are_returned_as_the_snapshot() {
    for version in [Version::V2_1, Version::V2_2, Version::V2_3] {
        for checksum in version.checksums() {
            let bytes = npm_archive(version, *checksum).encode();
            let graph = parse(&bytes).unwrap_or_else(|e| panic!("{version:?} {checksum:?}: {e}"));
            assert_eq!(summary(&graph), sample_summary(), "{version:?} {checksum:?}");
            let npm = graph.npm.expect("the snapshot");
            assert_eq!(npm.root_packages.into_iter().collect::<Vec<_>>(), [("chalk@^5".into(), "chalk@5.3.0".into())]);
            let chalk = &npm.packages["chalk@5.3.0"];
            assert_eq!((chalk.name.as_str(), chalk.version.as_str()), ("chalk", "5.3.0"));
            assert_eq!(
                chalk.dependencies.iter().collect::<Vec<_>>(),
                [(&"ansi-styles".to_owned(), &"ansi-styles@6.2.1".to_owned())]
            );
            assert!(npm.packages["ansi-styles@6.2.1"].dependencies.is_empty());
        }
    }
    assert_eq!(parse(&Archive::new(Version::V2_3, Checksum::None, sample_items()).encode()).unwrap().npm, None);
}

#[test]
fn a_corrupt_npm_section_is_refused() {
    let clean = npm_archive(Version::V2_1, Checksum::Sha256).encode();
    let mut bytes = clean.clone();
    let at = find_once(&bytes, b"ansi-styles@6.2.1");
    bytes[at] ^= 1;
    assert_eq!(parse(&bytes).unwrap_err(), EszipError::ChecksumMismatch { scope: ChecksumScope::NpmSnapshot });

    // Without a checksum, a package index that points nowhere is still
    // caught by the decoder.
    let mut archive = npm_archive(Version::V2_3, Checksum::None);
    archive.npm[0].deps[0].1 = 7;
    assert!(matches!(
        parse(&archive.encode()),
        Err(EszipError::Rejected { reason }) if reason.contains("missing index")
    ));
}

#[test]
fn older_toolchain_archives_decode() {
    // ESZIP_V2 with a redirect.
    let graph = parse(&fixture("deno/redirect.eszip2")).unwrap();
    let s = summary(&graph);
    assert_eq!(s.len(), 3, "{s:#?}");
    assert!(s[0].starts_with("file:///main.ts JavaScript export * as a from \"./a.ts\";"));
    assert!(s[1].starts_with("file:///b.ts JavaScript export const b = \"b\";"));
    assert_eq!(s[2], "file:///a.ts -> file:///b.ts");

    // ESZIP_V2 with a JSON module.
    let graph = parse(&fixture("deno/json.eszip2")).unwrap();
    let json = common::module(&graph, "file:///data.json");
    assert_eq!(json.kind, ModuleKind::Json);
    serde_json::from_slice::<serde_json::Value>(&json.source).unwrap();

    // ESZIP2.1 with and without an npm snapshot.
    let with = parse(&fixture("deno/npm_packages.eszip2_1")).unwrap();
    let without = parse(&fixture("deno/no_npm_packages.eszip2_1")).unwrap();
    assert!(!with.entries.is_empty());
    assert_eq!(with.entries, without.entries);
    assert_eq!(without.npm, None, "an empty npm section is no snapshot");
    let npm = with.npm.expect("the toolchain's npm snapshot");
    assert_eq!(npm.root_packages["package@^1.2"], "package@1.2.2");
    assert_eq!(npm.root_packages["d@5"], "d@5.0.0");
    assert_eq!(npm.packages["b@1.2.3"].dependencies["someotherspecifier"], "c@1.1.1");
    assert_eq!(npm.packages.len(), 5);

    // ESZIP2.1 with one byte of the npm snapshot changed.
    assert_eq!(
        parse(&fixture("deno/npm_packages_invalid_1.eszip2_1")).unwrap_err(),
        EszipError::ChecksumMismatch { scope: ChecksumScope::NpmSnapshot }
    );

    // ESZIP2.3 with a Wasm module.
    let graph = parse(&fixture("deno/wasm.eszip2_3")).unwrap();
    let wasm = common::module(&graph, "file:///math.wasm");
    assert_eq!(wasm.kind, ModuleKind::Wasm);
    assert_eq!(&wasm.source[..4], b"\0asm");

    // v1.
    let graph = parse(&fixture("deno/basic.json")).unwrap();
    assert_eq!(graph.entries.len(), 1);
    let Entry::Module(m) = &graph.entries[0] else {
        panic!("a module");
    };
    assert_eq!(m.kind, ModuleKind::JavaScript);
    // The transpiled text is preferred over the original.
    assert!(m.source.starts_with(b"addEventListener(\"fetch\", (event)=>{"));
}

#[test]
fn v1_keeps_order_redirects_and_json() {
    let graph = parse(&fixture("hello.v1.json")).unwrap();
    let s = summary(&graph);
    assert!(s[0].starts_with("file:///src/main.ts JavaScript import { greet }"));
    assert!(s[0].contains("const n = 1;"), "transpiled: {}", s[0]);
    assert!(s[1].starts_with("file:///src/greet.js JavaScript export function greet"));
    assert_eq!(s[2], "https://example.com/config -> https://example.com/config.json");
    assert_eq!(s[3], "https://example.com/config.json Json { \"name\": \"isocloud\" }\n");
    assert_eq!(s.len(), 4);
}

#[test]
fn v1_errors_are_named() {
    let v1 = |json: &str| parse(json.as_bytes()).unwrap_err();
    assert!(matches!(
        v1(r#"{"version": 2, "modules": {}}"#),
        EszipError::InvalidV1 { reason } if reason.contains("version is 2")
    ));
    assert!(matches!(v1(r#"{"version": 1, "modules": {"#), EszipError::InvalidV1 { .. }));
    assert!(matches!(
        v1(r#"{"version": 1}"#),
        EszipError::InvalidV1 { reason } if reason.contains("modules")
    ));
    assert!(matches!(
        v1(r#"{"version": 1, "modules": {"main.js": {"Redirect": "file:///a.js"}}}"#),
        EszipError::InvalidSpecifier { specifier, .. } if specifier == "main.js"
    ));
    assert!(matches!(
        v1(r#"{"version": 1, "modules": {"file:///a.js": {"Redirect": "b.js"}}}"#),
        EszipError::InvalidV1 { .. }
    ));
    assert!(matches!(
        v1(r#"{"version": 1, "modules": {
            "file:///a.js": {"Redirect": "file:///b.js"},
            "file:///a.js": {"Redirect": "file:///c.js"}}}"#),
        EszipError::DuplicateSpecifier { specifier } if specifier == "file:///a.js"
    ));
    assert_eq!(parse(br#" {"version": 1, "modules": {}} "#).unwrap(), ModuleGraph::default());
}

#[test]
fn module_kinds_an_isolate_cannot_load_are_refused() {
    for (kind, name) in [(JSONC, "jsonc"), (OPAQUE, "opaque data")] {
        let items = vec![module("file:///src/deno.jsonc", kind, "{ // x\n}")];
        let bytes = Archive::new(Version::V2_3, Checksum::None, items).encode();
        assert_eq!(
            parse(&bytes).unwrap_err(),
            EszipError::UnsupportedModuleKind { specifier: "file:///src/deno.jsonc".into(), kind: name }
        );
    }
    let items = vec![module("file:///src/x.js", 9, "x")];
    let bytes = Archive::new(Version::V2_3, Checksum::None, items).encode();
    assert!(matches!(
        parse(&bytes),
        Err(EszipError::Rejected { reason }) if reason.contains("module kind 9")
    ));
}

#[test]
fn sources_and_specifiers_are_checked() {
    let one = |items: Vec<Item>| parse(&Archive::new(Version::V2_3, Checksum::Sha256, items).encode());
    assert_eq!(
        one(vec![module("file:///src/a.js", JS, b"\xff\xfe")]).unwrap_err(),
        EszipError::InvalidUtf8 { specifier: "file:///src/a.js".into() }
    );
    assert_eq!(
        one(vec![module("file:///src/a.json", JSON, b"\xc3")]).unwrap_err(),
        EszipError::InvalidUtf8 { specifier: "file:///src/a.json".into() }
    );
    // Wasm is bytes.
    let graph = one(vec![module("file:///src/a.wasm", WASM, b"\0asm\xff")]).unwrap();
    assert_eq!(summary(&graph).len(), 1);

    assert!(matches!(
        one(vec![module("main.js", JS, "x")]).unwrap_err(),
        EszipError::InvalidSpecifier { specifier, .. } if specifier == "main.js"
    ));
    assert!(matches!(
        one(vec![redirect("file:///a.js", "./b.js")]).unwrap_err(),
        EszipError::InvalidSpecifier { specifier, .. } if specifier == "./b.js"
    ));
    assert!(matches!(
        one(vec![
            module("file:///a.js", JS, "1"),
            module("file:///a.js", JS, "2"),
        ])
        .unwrap_err(),
        EszipError::DuplicateSpecifier { specifier } if specifier == "file:///a.js"
    ));

    // A redirect whose target is not in this archive is kept as is: it may
    // be in another layer.
    let graph = one(vec![redirect("file:///a.js", "file:///elsewhere.js")]).unwrap();
    assert_eq!(summary(&graph), ["file:///a.js -> file:///elsewhere.js"]);
}

#[test]
fn an_empty_archive_is_an_empty_graph() {
    for (version, checksum) in combinations() {
        let bytes = Archive::new(version, checksum, vec![]).encode();
        assert_eq!(parse(&bytes).unwrap(), ModuleGraph::default());
    }
}

#[test]
fn a_large_archive_round_trips() {
    // 8 MiB of JavaScript across 64 modules, SHA-256.
    let items: Vec<Item> = (0..64)
        .map(|i| {
            let body = format!("export const v{i} = {i};\n").repeat(128 * 1024 / 24);
            module(&format!("file:///src/m{i}.js"), JS, body)
        })
        .collect();
    let bytes = Archive::new(Version::V2_3, Checksum::Sha256, items.clone()).encode();
    let graph = parse(&bytes).unwrap();
    assert_eq!(graph.entries.len(), 64);
    for (entry, item) in graph.entries.iter().zip(&items) {
        let (Entry::Module(m), Item::Module { source, .. }) = (entry, item) else {
            panic!("modules only");
        };
        assert_eq!(&m.source[..], &source[..]);
    }
}
