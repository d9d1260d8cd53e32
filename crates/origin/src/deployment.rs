//! From `boot` to a complete module graph: fetch every layer (cache first, in
//! parallel, and beside the asset tree), decode it, merge with the earlier
//! layer winning.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{Either, select, try_join_all};
use isocloud_eszip::{Entry, ModuleKind, NpmSnapshot};
use isocloud_protocol::{ConfigError, IsolateConfig, LayerSpec};
use url::Url;

use crate::stale::{self, Fault, StaleBoots};
use crate::{AssetTree, CacheKind, Deployment, DiskCache, ModuleFile, Origin, OriginError};

/// Asks `origin` for deployment `deployment_id` and assembles it (no boot
/// answer kept or used: [`load_deployment_with`]).
pub async fn load_deployment(
    origin: &dyn Origin,
    cache: &DiskCache,
    deployment_id: &str,
) -> Result<Deployment, OriginError> {
    load_deployment_with(origin, cache, deployment_id, StaleBoots::OFF).await.map(|loaded| loaded.deployment)
}

/// A deployment [`load_deployment_with`] assembled.
#[derive(Debug)]
pub struct Loaded {
    pub deployment: Deployment,
    /// Booted from the kept answer: the origin could not give one.
    pub stale: Option<StaleBoot>,
}

/// A boot from the deployment's kept answer.
#[derive(Debug)]
pub struct StaleBoot {
    /// How old the answer was.
    pub age: Duration,
    /// Why the origin's own answer could not be had.
    pub cause: OriginError,
}

/// Asks `origin` for deployment `deployment_id` and assembles it; keeps
/// its answer (and its tree, once read) for `stale`'s time, and boots from
/// the kept one when the origin cannot answer (see `stale.rs`).
pub async fn load_deployment_with(
    origin: &dyn Origin,
    cache: &DiskCache,
    deployment_id: &str,
    stale: StaleBoots,
) -> Result<Loaded, OriginError> {
    // read_tree needs only the id: it runs beside boot, and the layers beside
    // whatever of it is left, so a remote origin costs two round trips, not
    // three. boot's error wins: it says why better than the tree's would.
    let mut tree_deferred = !origin.tree_at_boot();
    let boot = std::pin::pin!(origin.boot(deployment_id));
    let tree = std::pin::pin!(async move {
        if tree_deferred { Ok(AssetTree::default()) } else { origin.read_tree(deployment_id).await }
    });
    let (boot, tree) = match select(boot, tree).await {
        Either::Left((boot, tree)) => (boot, Either::Left(tree)),
        Either::Right((tree, boot)) => (boot.await, Either::Right(std::future::ready(tree))),
    };
    let (boot, stale_boot) = match boot {
        Ok(boot) => (boot, None),
        Err(e) => match stale::fault_of(&e) {
            Fault::Gone => {
                stale::forget(cache, origin.name(), deployment_id);
                return Err(e);
            }
            Fault::Refused => return Err(e),
            Fault::Unavailable => match stale::recall(cache, origin.name(), deployment_id, stale.max_age).await {
                Some(kept) => (kept.answer, Some(StaleBoot { age: kept.age, cause: e })),
                None => return Err(e),
            },
        },
    };
    // A stale boot's tree: the kept one, not another wait on the origin.
    let kept_tree = match stale_boot {
        Some(_) => stale::recall_tree(cache, origin.name(), deployment_id).await,
        None => None,
    };
    if kept_tree.is_some() {
        tree_deferred = false;
    }
    let config = boot.config.clone();
    let layers = try_join_all(
        config.layers().iter().map(|spec| fetch_layer(origin, cache, deployment_id, spec, &config, &boot.inline_layer)),
    );
    // A failed read_tree never fails the boot: the files are unavailable,
    // what does not read them still serves.
    let tree = async {
        Ok::<_, OriginError>(match kept_tree {
            Some(tree) => (tree, None),
            None => match tree.await {
                Ok(tree) => (tree, None),
                Err(e) => (AssetTree::default(), Some(e.to_string())),
            },
        })
    };
    let (layers, (mut tree, mut tree_error)) = tokio::try_join!(layers, tree)?;

    let mut modules = BTreeMap::new();
    let mut redirects = BTreeMap::new();
    let mut import_maps = Vec::new();
    let mut npm: Option<NpmSnapshot> = None;
    for decoded in layers {
        import_maps.extend(decoded.import_map);
        if let Some(snapshot) = decoded.npm {
            let merged = npm.get_or_insert_with(NpmSnapshot::default);
            for (request, id) in snapshot.root_packages {
                merged.root_packages.entry(request).or_insert(id);
            }
            for (id, package) in snapshot.packages {
                merged.packages.entry(id).or_insert(package);
            }
        }
        for (specifier, module) in decoded.modules {
            modules.entry(specifier).or_insert(module);
        }
        for (from, to) in decoded.redirects {
            redirects.entry(from).or_insert(to);
        }
    }
    let mut entry = config.entrypoint().clone();
    for _ in 0..16 {
        match redirects.get(&entry) {
            Some(target) => entry = Url::clone(target),
            None => break,
        }
    }
    if !modules.contains_key(&entry) {
        return Err(OriginError::InvalidConfig(ConfigError {
            field: "entrypoint".into(),
            message: format!("{} is not in any layer", config.entrypoint()),
        }));
    }
    if tree_deferred && let Some(reason) = needs_tree_at_boot(&modules, npm.is_some()) {
        tracing::debug!(deployment_id, reason, "a built deployment: its tree is read at boot");
        match origin.read_tree(deployment_id).await {
            Ok(read) => tree = read,
            Err(e) => tree_error = Some(e.to_string()),
        }
        tree_deferred = false;
    }
    if stale_boot.is_none() && stale.enabled() {
        stale::remember(cache, origin.name(), deployment_id, &boot).await;
        if !tree_deferred && tree_error.is_none() {
            stale::remember_tree(cache, origin.name(), deployment_id, &tree).await;
        }
    }
    let deployment = Deployment {
        deployment_id: deployment_id.to_owned(),
        config,
        modules,
        redirects,
        tree,
        tree_error,
        tree_deferred,
        import_maps,
        npm,
    };
    Ok(Loaded { deployment, stale: stale_boot })
}

/// The deployment root's modules (`/src` in the isolate).
const SRC_PREFIX: &str = "file:///src/";

/// What a build wrote that a module's import needs from disk.
#[derive(Debug, Clone, Copy)]
enum BuildOutput {
    /// `node_modules`: npm packages.
    NodeModules,
    /// `vendor`: JSR and remote modules.
    Vendor,
}

/// What in a module says deno will read its deployment's build output at
/// start, one entry per marker.
const BUILD_MARKERS: [(&[u8], BuildOutput); 10] = [
    (b"\"npm:", BuildOutput::NodeModules),
    (b"'npm:", BuildOutput::NodeModules),
    (b"\"jsr:", BuildOutput::Vendor),
    (b"'jsr:", BuildOutput::Vendor),
    (b"from \"http", BuildOutput::Vendor),
    (b"from 'http", BuildOutput::Vendor),
    (b"import \"http", BuildOutput::Vendor),
    (b"import 'http", BuildOutput::Vendor),
    (b"import(\"http", BuildOutput::Vendor),
    (b"import('http", BuildOutput::Vendor),
];

/// Why a deployment whose origin defers its tree needs it at boot after
/// all, if it does: a built deployment's project files and packages
/// (`deno.json`, `package.json`, `node_modules`, `vendor`) are on disk
/// before deno starts, laid out from the tree. Its config names none of
/// them; its modules say: a project file among them, or an import only a
/// build's output answers — not one an ESZIP answers itself (its npm
/// snapshot; the remote and JSR modules it carries). Any other deployment's
/// tree still waits for its first file operation.
fn needs_tree_at_boot(modules: &BTreeMap<Url, ModuleFile>, npm_snapshot: bool) -> Option<&'static str> {
    let remote_in_graph = modules.keys().any(|url| matches!(url.scheme(), "http" | "https"));
    for (specifier, module) in modules.iter().filter(|(url, _)| url.as_str().starts_with(SRC_PREFIX)) {
        let path = &specifier.as_str()[SRC_PREFIX.len()..];
        if ["deno.json", "deno.jsonc", "package.json"].contains(&path) {
            return Some("a project config file");
        }
        for (marker, output) in BUILD_MARKERS {
            let (answered, reason) = match output {
                BuildOutput::NodeModules => (npm_snapshot, "an npm: import"),
                BuildOutput::Vendor => (remote_in_graph, "a jsr: or remote import"),
            };
            if !answered && memchr::memmem::find(&module.source, marker).is_some() {
                return Some(reason);
            }
        }
    }
    None
}

/// The first four bytes of every WebAssembly binary.
const WASM_MAGIC: &[u8] = b"\0asm";

struct DecodedLayer {
    modules: Vec<(Url, ModuleFile)>,
    redirects: Vec<(Url, Url)>,
    /// The import map an ESZIP carries (its writer puts it first, a JSON
    /// module with `imports` or `scopes`), by its own URL.
    import_map: Option<(Url, serde_json::Value)>,
    npm: Option<NpmSnapshot>,
}

async fn fetch_layer(
    origin: &dyn Origin,
    cache: &DiskCache,
    deployment_id: &str,
    spec: &LayerSpec,
    config: &IsolateConfig,
    inline: &Bytes,
) -> Result<DecodedLayer, OriginError> {
    let id = spec.id();
    let bytes = if config.inline_layer() == Some(id) {
        inline.clone()
    } else if let Some(bytes) = cache.get(CacheKind::Layer, origin.name(), id).await {
        bytes
    } else {
        let bytes = origin.layer(deployment_id, id).await.map_err(|e| match e {
            // The user should see which layer broke, whatever the cause.
            OriginError::BadStatus { status, .. } => {
                OriginError::Layer { layer_id: id.to_owned(), message: format!("origin answered HTTP {status}") }
            }
            other => other,
        })?;
        if let Err(e) = cache.put(CacheKind::Layer, origin.name(), id, &bytes).await {
            tracing::warn!(layer_id = id, error = %e, "could not cache layer");
        }
        bytes
    };
    decode_layer(spec, bytes).await
}

async fn decode_layer(spec: &LayerSpec, bytes: Bytes) -> Result<DecodedLayer, OriginError> {
    let layer_error = |message: String| OriginError::Layer { layer_id: spec.id().to_owned(), message };
    match spec {
        LayerSpec::Bundle { specifier, .. } => {
            if std::str::from_utf8(&bytes).is_err() {
                return Err(layer_error("a bundle layer must be UTF-8 JavaScript".into()));
            }
            // A `.json` file is a JSON module (`import x from "./x.json" with
            // { type: "json" }`); every other bundle is JavaScript or TypeScript.
            let kind = if specifier.path().ends_with(".json") { ModuleKind::Json } else { ModuleKind::JavaScript };
            let module = ModuleFile { specifier: specifier.clone(), kind, source: bytes };
            Ok(DecodedLayer {
                modules: vec![(specifier.clone(), module)],
                redirects: Vec::new(),
                import_map: None,
                npm: None,
            })
        }
        LayerSpec::Eszip { .. } => {
            let graph = isocloud_eszip::parse(bytes).await.map_err(|e| layer_error(format!("invalid ESZIP: {e}")))?;
            let mut decoded =
                DecodedLayer { modules: Vec::new(), redirects: Vec::new(), import_map: None, npm: graph.npm };
            if let Some(Entry::Module(first)) = graph.entries.first()
                && first.kind == ModuleKind::Json
                && let Ok(specifier) = Url::parse(&first.specifier)
                && let Ok(map @ serde_json::Value::Object(_)) =
                    serde_json::from_slice::<serde_json::Value>(&first.source)
                && (map.get("imports").is_some_and(serde_json::Value::is_object)
                    || map.get("scopes").is_some_and(serde_json::Value::is_object))
            {
                decoded.import_map = Some((specifier, map));
            }
            for entry in graph.entries {
                match entry {
                    Entry::Module(m) => {
                        let specifier = Url::parse(&m.specifier)
                            .map_err(|e| layer_error(format!("module specifier {:?}: {e}", m.specifier)))?;
                        // Written to disk under the name the tenant chose,
                        // a `.wasm` must be WebAssembly, not some other
                        // binary (a shared object) in its clothes.
                        if m.kind == ModuleKind::Wasm && !m.source.starts_with(WASM_MAGIC) {
                            return Err(layer_error(format!(
                                "module {specifier} is declared WebAssembly but does not start with the Wasm magic \
                                 bytes (\\0asm)"
                            )));
                        }
                        decoded
                            .modules
                            .push((specifier.clone(), ModuleFile { specifier, kind: m.kind, source: m.source }));
                    }
                    Entry::Redirect { specifier, target } => {
                        let parse =
                            |s: &str| Url::parse(s).map_err(|e| layer_error(format!("redirect specifier {s:?}: {e}")));
                        decoded.redirects.push((parse(&specifier)?, parse(&target)?));
                    }
                }
            }
            Ok(decoded)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::{ActivityBatch, AssetEntry, BootAnswer};

    /// An origin of one deployment whose `boot` answers what the test says,
    /// deferring its tree as a remote origin does (or not).
    struct Fake {
        boot: Mutex<Result<(), fn() -> OriginError>>,
        source: &'static str,
        tree_at_boot: bool,
        tree_reads: AtomicUsize,
    }

    impl Fake {
        fn new(source: &'static str, tree_at_boot: bool) -> Self {
            Self { boot: Mutex::new(Ok(())), source, tree_at_boot, tree_reads: AtomicUsize::new(0) }
        }

        fn fail_with(&self, error: fn() -> OriginError) {
            *self.boot.lock().unwrap() = Err(error);
        }
    }

    fn tree() -> AssetTree {
        AssetTree {
            entries: BTreeMap::from([
                (String::new(), AssetEntry::Directory),
                ("/a.txt".into(), AssetEntry::File { size: 1, hash: "h".into() }),
            ]),
        }
    }

    #[async_trait]
    impl Origin for Fake {
        fn name(&self) -> &str {
            "fake"
        }
        fn tree_at_boot(&self) -> bool {
            self.tree_at_boot
        }
        async fn boot(&self, _: &str) -> Result<BootAnswer, OriginError> {
            (*self.boot.lock().unwrap()).map_err(|error| error())?;
            let config = serde_json::json!({
                "entrypoint": "file:///src/main.ts",
                "layers": [{ "kind": "bundle", "id": "main", "specifier": "file:///src/main.ts" }],
                "inline_layer": "main",
                "envs": { "KEY": "value" },
            });
            let config = IsolateConfig::from_json(config.to_string().as_bytes()).unwrap();
            Ok(BootAnswer { config, inline_layer: Bytes::from_static(self.source.as_bytes()) })
        }
        async fn layer(&self, _: &str, id: &str) -> Result<Bytes, OriginError> {
            Err(OriginError::Layer { layer_id: id.into(), message: "none".into() })
        }
        async fn read_tree(&self, _: &str) -> Result<AssetTree, OriginError> {
            self.tree_reads.fetch_add(1, Ordering::SeqCst);
            (*self.boot.lock().unwrap()).map_err(|error| error())?;
            Ok(tree())
        }
        async fn read_blob(&self, _: &str, id: &str) -> Result<Bytes, OriginError> {
            Err(OriginError::AssetNotFound(id.into()))
        }
        async fn report_activity(&self, _: &str, _: &ActivityBatch) -> Result<(), OriginError> {
            Ok(())
        }
    }

    const DAY: StaleBoots = StaleBoots { max_age: Duration::from_secs(86_400) };
    const HELLO: &str = "Deno.serve(() => new Response('hi'));";

    fn cache() -> (tempfile::TempDir, DiskCache) {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        (dir, cache)
    }

    #[tokio::test]
    async fn an_unreachable_origin_is_answered_by_the_last_boot_answer_and_its_tree() {
        let (_dir, cache) = cache();
        let origin = Fake::new(HELLO, true);
        let fresh = load_deployment_with(&origin, &cache, "d", DAY).await.unwrap();
        assert!(fresh.stale.is_none());

        origin.fail_with(|| OriginError::Unreachable("connection refused".into()));
        // Without a kept answer (off), the fault is the boot's.
        let off = load_deployment_with(&origin, &cache, "d", StaleBoots::OFF).await.unwrap_err();
        assert!(matches!(off, OriginError::Unreachable(_)), "{off}");

        let loaded = load_deployment_with(&origin, &cache, "d", DAY).await.unwrap();
        let stale = loaded.stale.expect("booted from the kept answer");
        assert!(matches!(stale.cause, OriginError::Unreachable(_)));
        assert_eq!(loaded.deployment.config, fresh.deployment.config);
        assert_eq!(loaded.deployment.config.envs()["KEY"], "value");
        let main = Url::parse("file:///src/main.ts").unwrap();
        assert_eq!(loaded.deployment.modules[&main].source, HELLO.as_bytes());
        assert_eq!(loaded.deployment.tree, tree(), "the kept tree, not the origin's failure");
        assert!(loaded.deployment.tree_error.is_none());

        // A 5xx is a fault too; a 401 is the origin's word.
        origin.fail_with(|| OriginError::BootRefused { status: 502 });
        assert!(load_deployment_with(&origin, &cache, "d", DAY).await.unwrap().stale.is_some());
        origin.fail_with(|| OriginError::BootRefused { status: 401 });
        load_deployment_with(&origin, &cache, "d", DAY).await.unwrap_err();
    }

    #[tokio::test]
    async fn a_deployment_the_origin_says_is_gone_loses_its_kept_answer() {
        let (_dir, cache) = cache();
        let origin = Fake::new(HELLO, true);
        load_deployment_with(&origin, &cache, "d", DAY).await.unwrap();
        assert!(cache.total_bytes() > 0, "the answer and the tree are kept");

        origin.fail_with(|| OriginError::BootRefused { status: 404 });
        let gone = load_deployment_with(&origin, &cache, "d", DAY).await.unwrap_err();
        assert!(matches!(gone, OriginError::BootRefused { status: 404 }), "{gone}");
        assert_eq!(cache.total_bytes(), 0, "nothing kept of it");
        origin.fail_with(|| OriginError::Unreachable("connection refused".into()));
        load_deployment_with(&origin, &cache, "d", DAY).await.unwrap_err();
    }

    #[tokio::test]
    async fn a_built_deployment_reads_its_deferred_tree_at_boot_and_no_other_does() {
        let (_dir, cache) = cache();
        let plain = Fake::new(HELLO, false);
        let loaded = load_deployment_with(&plain, &cache, "plain", StaleBoots::OFF).await.unwrap();
        assert!(loaded.deployment.tree_deferred);
        assert_eq!(plain.tree_reads.load(Ordering::SeqCst), 0, "the tree waits for a file operation");

        let built = Fake::new("import a from \"npm:a@1\";\nDeno.serve(() => new Response(a()));", false);
        let loaded = load_deployment_with(&built, &cache, "built", StaleBoots::OFF).await.unwrap();
        assert!(!loaded.deployment.tree_deferred);
        assert_eq!(loaded.deployment.tree, tree());
        assert_eq!(built.tree_reads.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn which_modules_need_the_build_output_at_boot() {
        let modules = |entries: &[(&str, &str)]| -> BTreeMap<Url, ModuleFile> {
            entries
                .iter()
                .map(|(specifier, source)| {
                    let specifier = Url::parse(specifier).unwrap();
                    let module = ModuleFile {
                        specifier: specifier.clone(),
                        kind: ModuleKind::JavaScript,
                        source: Bytes::from(source.to_string()),
                    };
                    (specifier, module)
                })
                .collect()
        };
        let main = "file:///src/main.ts";
        /// Modules (specifier, source), whether an npm snapshot came, why.
        type Case<'a> = (&'a [(&'a str, &'a str)], bool, Option<&'a str>);
        let cases: [Case; 9] = [
            (&[(main, "Deno.serve(() => new Response('x'))")], false, None),
            (&[(main, "const u = \"https://api.example.com\"; fetch(u)")], false, None),
            (&[(main, "import a from 'npm:a@1';")], false, Some("an npm: import")),
            (&[(main, "import a from 'npm:a@1';")], true, None),
            (&[(main, "import { x } from \"jsr:@std/path\";")], false, Some("a jsr: or remote import")),
            (&[(main, "import { x } from \"https://deno.land/x/y.ts\";")], false, Some("a jsr: or remote import")),
            (
                &[(main, "import { x } from \"https://deno.land/x/y.ts\";"), ("https://deno.land/x/y.ts", "")],
                false,
                None,
            ),
            (&[(main, ""), ("file:///src/deno.json", "{}")], false, Some("a project config file")),
            (&[("file:///other/main.ts", "import a from 'npm:a';")], false, None),
        ];
        for (entries, snapshot, expected) in cases {
            assert_eq!(needs_tree_at_boot(&modules(entries), snapshot), expected, "{entries:?}");
        }
    }
}
