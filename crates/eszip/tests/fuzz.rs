//! The fuzz target: a bounded property test. `parse` must return — never
//! panic, never wait, never allocate past the input — for arbitrary bytes,
//! for arbitrary bytes behind a valid magic, and for byte flips, truncations,
//! insertions, deletions and length-field overwrites of valid archives of
//! every version. When it returns `Ok`, the graph must hold together.
//! Plus a round trip: random graphs written by the test writer decode to
//! themselves.
//!
//! Cases per property are bounded so the whole file runs in a few seconds
//! in debug; set `PROPTEST_CASES` to fuzz longer, e.g.
//! `PROPTEST_CASES=200000 cargo test -p isocloud-eszip --test fuzz --release`.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::OnceLock;

use common::writer::{Archive, Checksum, Item, JS, JSON, NpmPackage, Version, WASM};
use common::{fixture, parse};
use isocloud_eszip::{Entry, EszipError, ModuleKind};
use proptest::prelude::*;

/// Records the largest single allocation made by the current thread, so the
/// fuzz target can check that no declared size is allocated before it is
/// checked against the input.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the slot may be gone while the thread shuts down.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged; the bookkeeping touches only a const-initialised thread-local
// `Cell`, which never allocates.
#[allow(unsafe_code, reason = "a global allocator that records the largest allocation")]
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Valid archives to mutate: the toolchain-built fixture, the same graph in
/// every version and checksum, one with an npm snapshot, and v1 JSON.
fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let hello = fixture("hello.eszip2");
        let graph = parse(&hello).expect("the fixture parses");
        let items: Vec<Item> = graph
            .entries
            .iter()
            .map(|e| match e {
                Entry::Module(m) => Item::Module {
                    specifier: m.specifier.clone(),
                    kind: match m.kind {
                        ModuleKind::JavaScript => JS,
                        ModuleKind::Json => JSON,
                        ModuleKind::Wasm => WASM,
                    },
                    source: m.source.to_vec(),
                    source_map: b"{}".to_vec(),
                },
                Entry::Redirect { specifier, target } => {
                    Item::Redirect { specifier: specifier.clone(), target: target.clone() }
                }
            })
            .chain([Item::Redirect { specifier: "https://example.com/r".into(), target: "file:///src/main.ts".into() }])
            .collect();
        let mut seeds = vec![hello, fixture("hello.v1.json")];
        for version in Version::ALL {
            for checksum in version.checksums() {
                seeds.push(Archive::new(version, *checksum, items.clone()).encode());
            }
        }
        let mut npm = Archive::new(Version::V2_1, Checksum::Sha256, items);
        npm.items.push(Item::Npm { req: "chalk@^5".into(), index: 0 });
        npm.npm = vec![NpmPackage { id: "chalk@5.3.0".into(), deps: vec![] }];
        seeds.push(npm.encode());
        for seed in &seeds {
            parse(seed).expect("every seed parses");
        }
        seeds
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        mask: u8,
    },
    Set {
        at: usize,
        byte: u8,
    },
    Truncate {
        len: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Delete {
        at: usize,
        len: usize,
    },
    /// Overwrite 4 bytes with a "length-like" value.
    U32 {
        at: usize,
        value: u32,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<usize>();
    prop_oneof![
        (at, 1..=255u8).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        (at, any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        (at, prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (at, 1..64usize).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (at, prop_oneof![Just(0u32), Just(1), Just(0x7fff_ffff), Just(u32::MAX), 0..4096u32, any::<u32>()])
            .prop_map(|(at, value)| Mutation::U32 { at, value }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    let pick = |at: usize| if n == 0 { 0 } else { at % n };
    match m {
        Mutation::Flip { at, mask } if n > 0 => bytes[pick(*at)] ^= mask,
        Mutation::Set { at, byte } if n > 0 => bytes[pick(*at)] = *byte,
        Mutation::Truncate { len } => bytes.truncate(len % (n + 1)),
        Mutation::Insert { at, bytes: ins } => {
            let at = at % (n + 1);
            bytes.splice(at..at, ins.iter().copied());
        }
        Mutation::Delete { at, len } if n > 0 => {
            let at = pick(*at);
            let end = (at + len).min(n);
            bytes.drain(at..end);
        }
        Mutation::U32 { at, value } if n >= 4 => {
            let at = at % (n - 3);
            bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
        }
        _ => {}
    }
}

/// `parse` returns without waiting (checked by `common::parse`), without a
/// caught panic, and without any allocation out of proportion to the input
/// (a 4 GiB length field must not become a 4 GiB buffer). Whatever it
/// accepts must be usable as documented.
fn check(bytes: &[u8]) {
    LARGEST.with(|l| l.set(0));
    let result = parse(bytes);
    let largest = LARGEST.with(Cell::get);
    // Linear in the input: the entry tables hold a few dozen bytes per
    // header entry, and an entry can be as small as 9 bytes.
    let bound = 32 * bytes.len() + (1 << 20);
    assert!(largest <= bound, "allocated {largest} bytes at once for a {}-byte input", bytes.len());
    let graph = match result {
        Ok(graph) => graph,
        Err(EszipError::DecoderPanicked { message }) => {
            panic!("the eszip crate panicked and the bounds walk let it: {message}")
        }
        Err(_) => return,
    };
    let mut seen = std::collections::HashSet::new();
    for entry in &graph.entries {
        let (specifier, target) = match entry {
            Entry::Module(m) => {
                if m.kind != ModuleKind::Wasm {
                    assert!(std::str::from_utf8(&m.source).is_ok(), "{}", m.specifier);
                }
                assert!(m.source.len() <= bytes.len());
                (&m.specifier, None)
            }
            Entry::Redirect { specifier, target } => (specifier, Some(target)),
        };
        assert!(url::Url::parse(specifier).is_ok(), "{specifier}");
        if let Some(target) = target {
            assert!(url::Url::parse(target).is_ok(), "{target}");
        }
        assert!(seen.insert(specifier.clone()), "duplicate {specifier}");
    }
}

#[test]
fn the_allocation_bound_is_observed() {
    // The tracker sees the decoder's buffers: a 1 MiB source needs a 1 MiB
    // allocation...
    let source = "x".repeat(1 << 20);
    let archive =
        Archive::new(Version::V2_3, Checksum::None, vec![common::writer::module("file:///src/big.js", JS, &source)])
            .encode();
    LARGEST.with(|l| l.set(0));
    parse(&archive).unwrap();
    assert!(LARGEST.with(Cell::get) >= 1 << 20);
    // ... and one far larger than the input.
    LARGEST.with(|l| l.set(0));
    let big = std::hint::black_box(Vec::<u8>::with_capacity(64 << 20));
    assert!(LARGEST.with(Cell::get) >= 64 << 20);
    drop(big);
}

#[test]
fn every_length_field_set_to_4_gib() {
    for seed in seeds() {
        for at in 0..seed.len().saturating_sub(3) {
            for value in [u32::MAX, 0x8000_0000] {
                let mut bytes = seed.clone();
                bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
                check(&bytes);
            }
        }
    }
}

#[test]
fn every_single_byte_deletion() {
    for seed in seeds() {
        for at in 0..seed.len() {
            let mut bytes = seed.clone();
            bytes.remove(at);
            check(&bytes);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 5000,
        // Failures are minimised and reported by the test itself.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check(&bytes);
    }

    #[test]
    fn arbitrary_bytes_behind_a_magic(
        magic in prop::sample::select(vec![
            &b"ESZIP_V2"[..], b"ESZIP2.1", b"ESZIP2.2", b"ESZIP2.3", b"{", b"{\"version\":1,",
        ]),
        rest in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        check(&[magic, &rest].concat());
    }

    #[test]
    fn mutated_archives(
        seed in 0..64usize,
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let seeds = seeds();
        let mut bytes = seeds[seed % seeds.len()].clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        check(&bytes);
    }

    #[test]
    fn random_graphs_round_trip(
        version_and_checksum in (0..4usize, 0..3usize),
        modules in prop::collection::vec(
            (
                "[a-z]{1,8}(/[a-z0-9]{1,8}){0,2}\\.(js|json|wasm)",
                "[ -~\u{e9}\u{1F600}]{0,64}",
                prop::collection::vec(any::<u8>(), 0..32),
                any::<bool>(),
            ),
            0..8,
        ),
    ) {
        let version = Version::ALL[version_and_checksum.0];
        let checksums = version.checksums();
        let checksum = checksums[version_and_checksum.1 % checksums.len()];
        let mut seen = std::collections::HashSet::new();
        let mut items = Vec::new();
        let mut expected = Vec::new();
        for (path, text, map, redirect) in modules {
            let specifier = format!("file:///src/{path}");
            if !seen.insert(specifier.clone()) {
                continue;
            }
            if redirect {
                let target = format!("https://example.com/{path}");
                items.push(Item::Redirect { specifier: specifier.clone(), target: target.clone() });
                expected.push(format!("{specifier} -> {target}"));
                continue;
            }
            let (kind, name) = match path.rsplit('.').next() {
                Some("json") => (JSON, "Json"),
                Some("wasm") => (WASM, "Wasm"),
                _ => (JS, "JavaScript"),
            };
            expected.push(format!("{specifier} {name} {text}"));
            items.push(Item::Module { specifier, kind, source: text.into_bytes(), source_map: map });
        }
        let bytes = Archive::new(version, checksum, items).encode();
        let graph = parse(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(common::summary(&graph), expected);
    }
}
