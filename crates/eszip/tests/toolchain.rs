//! Archives built by the real Deno toolchain (`@deno/eszip` through
//! `tools/eszip/build.mjs`) from small apps written to temp dirs, decoded and
//! checked; then corrupted.

mod common;

use common::toolchain::{ADD_WASM, App, build};
use common::{find_once, fixture, module, parse, source_text, summary};
use isocloud_eszip::{ChecksumScope, Entry, EszipError, ModuleKind, is_eszip};

/// An app with a TypeScript entry, a JS module, a JSON module, a remote
/// TypeScript module and a remote redirect.
fn app() -> App {
    App::new()
        .file(
            "main.ts",
            r#"import { shout } from "./lib/util.js";
import data from "./data.json" with { type: "json" };
import { greet } from "https://deno.land/x/greet/mod.ts";
import { moved } from "https://example.com/old.js";

interface Req {
  url: string;
}

export default {
  fetch(req: Req): Response {
    return new Response(shout(greet(data.name)) + moved + req.url);
  },
};
"#,
        )
        .file("lib/util.js", "export function shout(s) {\n  return s.toUpperCase() + \"!UTIL_MARKER\";\n}\n")
        .file("data.json", "{ \"name\": \"isocloud\" }\n")
        .remote("deno.land/x/greet/mod.ts", "export const greet = (n: string): string => `hello ${n}`;\n")
        .remote_redirect("example.com/old.js", "https://example.com/new.js")
        .remote("example.com/new.js", "export const moved = \"moved\";\n")
}

#[test]
fn decodes_a_toolchain_archive() {
    let bytes = app().build(&["main.ts"]);
    assert_eq!(&bytes[..8], b"ESZIP2.3", "the pinned @deno/eszip writes ESZIP2.3");
    assert!(is_eszip(&bytes));
    let graph = parse(&bytes).unwrap();

    let order: Vec<String> = graph
        .entries
        .iter()
        .map(|e| match e {
            Entry::Module(m) => format!("{} {:?}", m.specifier, m.kind),
            Entry::Redirect { specifier, target } => format!("{specifier} -> {target}"),
        })
        .collect();
    assert_eq!(
        order,
        [
            "file:///src/main.ts JavaScript",
            "file:///src/lib/util.js JavaScript",
            "file:///src/data.json Json",
            "https://deno.land/x/greet/mod.ts JavaScript",
            "https://example.com/new.js JavaScript",
            "https://example.com/old.js -> https://example.com/new.js",
        ]
    );

    // TypeScript arrives transpiled, imports and attributes intact.
    let main = source_text(&graph, "file:///src/main.ts", ModuleKind::JavaScript);
    assert!(main.contains("export default"), "{main}");
    assert!(main.contains("from \"./lib/util.js\""), "{main}");
    assert!(main.contains("type: \"json\""), "{main}");
    assert!(!main.contains("interface Req"), "types stripped: {main}");
    assert!(!main.contains("req: Req"), "types stripped: {main}");

    let util = source_text(&graph, "file:///src/lib/util.js", ModuleKind::JavaScript);
    assert!(util.contains("s.toUpperCase()"), "{util}");

    let data = source_text(&graph, "file:///src/data.json", ModuleKind::Json);
    let data: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(data, serde_json::json!({ "name": "isocloud" }));

    let greet = source_text(&graph, "https://deno.land/x/greet/mod.ts", ModuleKind::JavaScript);
    assert!(greet.contains("export const greet"), "{greet}");
    assert!(!greet.contains(": string"), "types stripped: {greet}");

    let moved = source_text(&graph, "https://example.com/new.js", ModuleKind::JavaScript);
    assert!(moved.contains("\"moved\""), "{moved}");
}

#[test]
fn decodes_wasm_modules() {
    let bytes = App::new()
        .file("main.js", "import { add } from \"./math.wasm\";\nexport const three = add(1, 2);\n")
        .file("math.wasm", ADD_WASM)
        .build(&["main.js"]);
    let graph = parse(&bytes).unwrap();
    let wasm = module(&graph, "file:///src/math.wasm");
    assert_eq!(wasm.kind, ModuleKind::Wasm);
    assert_eq!(&wasm.source[..], ADD_WASM);
    let main = source_text(&graph, "file:///src/main.js", ModuleKind::JavaScript);
    assert!(main.contains("./math.wasm"), "{main}");
}

#[test]
fn several_roots_and_absolute_entry_specifiers() {
    let bytes = App::new()
        .file("a.js", "export const a = 1;\n")
        .file("b.js", "export const b = 2;\n")
        .build(&["a.js", "file:///src/b.js"]);
    let graph = parse(&bytes).unwrap();
    assert_eq!(
        summary(&graph),
        ["file:///src/a.js JavaScript export const a = 1;\n", "file:///src/b.js JavaScript export const b = 2;\n",]
    );
}

#[test]
fn build_errors_are_reported() {
    let err = App::new().file("main.js", "import \"./missing.js\";\n").try_build(&["main.js"]).unwrap_err();
    assert!(err.contains("missing.js"), "{err}");

    let err =
        App::new().file("main.js", "import \"https://nowhere.example/x.js\";\n").try_build(&["main.js"]).unwrap_err();
    assert!(err.contains("nowhere.example"), "{err}");
}

#[test]
fn committed_fixture_matches_the_toolchain() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hello");
    let rebuilt = build(&root, None, &["main.ts"]).unwrap();
    assert!(
        rebuilt == fixture("hello.eszip2"),
        "tests/fixtures/hello.eszip2 is stale; rebuild it (see tests/fixtures/README.md)"
    );
    let graph = parse(&rebuilt).unwrap();
    let kinds: Vec<_> = graph
        .entries
        .iter()
        .map(|e| match e {
            Entry::Module(m) => (m.specifier.as_str(), m.kind),
            Entry::Redirect { .. } => panic!("no redirects in hello"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("file:///src/main.ts", ModuleKind::JavaScript),
            ("file:///src/greet.js", ModuleKind::JavaScript),
            ("file:///src/config.json", ModuleKind::Json),
            ("file:///src/add.wasm", ModuleKind::Wasm),
        ]
    );
}

/// The toolchain writes no checksums; the `eszip` crate's writer re-encodes
/// the same graph with one.
fn checksummed(checksum: eszip::v2::Checksum) -> Vec<u8> {
    common::writer::reencode_with_eszip_crate(&app().build(&["main.ts"]), checksum)
}

#[test]
fn checksummed_archives_decode_to_the_same_graph() {
    let plain = parse(&app().build(&["main.ts"])).unwrap();
    for checksum in [eszip::v2::Checksum::Sha256, eszip::v2::Checksum::XxHash3] {
        assert_eq!(parse(&checksummed(checksum)).unwrap(), plain, "{checksum:?}");
    }
}

#[test]
fn a_flipped_source_byte_is_a_checksum_mismatch() {
    for checksum in [eszip::v2::Checksum::Sha256, eszip::v2::Checksum::XxHash3] {
        let mut bytes = checksummed(checksum);
        let at = find_once(&bytes, b"UTIL_MARKER");
        bytes[at] ^= 0x20;
        assert_eq!(
            parse(&bytes).unwrap_err(),
            EszipError::ChecksumMismatch {
                scope: ChecksumScope::Module { specifier: "file:///src/lib/util.js".into() }
            },
            "{checksum:?}"
        );
    }
}

#[test]
fn a_flipped_header_byte_is_a_checksum_mismatch() {
    let mut bytes = checksummed(eszip::v2::Checksum::Sha256);
    // Only the header holds this specifier (main.ts imports it relatively).
    let at = find_once(&bytes, b"file:///src/lib/util.js");
    bytes[at + "file:///src/".len()] = b'L';
    let err = parse(&bytes).unwrap_err();
    assert_eq!(err, EszipError::ChecksumMismatch { scope: ChecksumScope::ModulesHeader });
    assert_eq!(err.to_string(), "checksum mismatch in the modules header");
}

#[test]
fn without_a_checksum_a_flipped_source_byte_goes_unnoticed() {
    // Documented limit: an archive without checksums cannot be verified.
    let mut bytes = app().build(&["main.ts"]);
    let at = find_once(&bytes, b"UTIL_MARKER");
    bytes[at] = b'u';
    let graph = parse(&bytes).unwrap();
    let util = source_text(&graph, "file:///src/lib/util.js", ModuleKind::JavaScript);
    assert!(util.contains("uTIL_MARKER"));
}

#[test]
fn every_truncation_is_an_error() {
    for bytes in [app().build(&["main.ts"]), checksummed(eszip::v2::Checksum::Sha256)] {
        for len in 0..bytes.len() {
            assert!(parse(&bytes[..len]).is_err(), "a prefix of {len} of {} bytes parsed", bytes.len());
        }
    }
}

#[test]
fn garbage_is_an_error() {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        // xorshift64: deterministic garbage without a dependency.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for len in [0, 1, 7, 8, 9, 64, 1000, 70_000] {
        let garbage: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        assert!(parse(&garbage).is_err());
        // Behind a valid magic, too.
        for magic in [b"ESZIP_V2", b"ESZIP2.1", b"ESZIP2.2", b"ESZIP2.3"] {
            let input = [magic.as_slice(), &garbage].concat();
            assert!(parse(&input).is_err(), "{magic:?} + {len} bytes");
        }
    }
}

#[test]
fn an_npm_snapshot_beside_the_toolchains_modules_decodes() {
    let snapshot = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        snapshot.path(),
        r#"{"roots":{"greet@^1":"greet@1.0.0"},"packages":{"greet@1.0.0":{"shout":"shout@2.0.0"},"shout@2.0.0":{}}}"#,
    )
    .unwrap();
    let app = App::new().file("main.ts", "import { hi } from \"npm:greet@^1\";\nconsole.log(hi);\n");
    let graph = parse(&app.build(&["--npm-snapshot", snapshot.path().to_str().unwrap(), "main.ts"])).unwrap();
    assert!(source_text(&graph, "file:///src/main.ts", ModuleKind::JavaScript).contains("npm:greet@^1"));
    let npm = graph.npm.expect("the snapshot");
    assert_eq!(npm.root_packages["greet@^1"], "greet@1.0.0");
    assert_eq!(npm.packages["greet@1.0.0"].dependencies["shout"], "shout@2.0.0");
    assert_eq!(npm.packages["shout@2.0.0"].name, "shout");
    // Without it, the toolchain's archive has none.
    assert_eq!(parse(&app.build(&["main.ts"])).unwrap().npm, None);
}
