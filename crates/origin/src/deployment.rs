//! From `boot` to a complete module graph: fetch every layer (cache first, in
//! parallel, and beside the asset tree), decode it, merge with the earlier
//! layer winning.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures_util::future::{Either, select, try_join_all};
use isocloud_eszip::{Entry, ModuleKind, NpmSnapshot};
use isocloud_protocol::{ConfigError, IsolateConfig, LayerSpec};
use url::Url;

use crate::{AssetTree, CacheKind, Deployment, DiskCache, ModuleFile, Origin, OriginError};

/// Asks `origin` for deployment `deployment_id` and assembles it.
pub async fn load_deployment(
    origin: &dyn Origin,
    cache: &DiskCache,
    deployment_id: &str,
) -> Result<Deployment, OriginError> {
    // read_tree needs only the id: it runs beside boot, and the layers beside
    // whatever of it is left, so a remote origin costs two round trips, not
    // three. boot's error wins: it says why better than the tree's would.
    let tree_deferred = !origin.tree_at_boot();
    let boot = std::pin::pin!(origin.boot(deployment_id));
    let tree = std::pin::pin!(async move {
        if tree_deferred { Ok(AssetTree::default()) } else { origin.read_tree(deployment_id).await }
    });
    let (boot, tree) = match select(boot, tree).await {
        Either::Left((boot, tree)) => (boot?, Either::Left(tree)),
        Either::Right((tree, boot)) => (boot.await?, Either::Right(std::future::ready(tree))),
    };
    let config = boot.config;
    let layers = try_join_all(
        config.layers().iter().map(|spec| fetch_layer(origin, cache, deployment_id, spec, &config, &boot.inline_layer)),
    );
    // A failed read_tree never fails the boot: the files are unavailable,
    // what does not read them still serves.
    let tree = async {
        Ok::<_, OriginError>(match tree.await {
            Ok(tree) => (tree, None),
            Err(e) => (AssetTree::default(), Some(e.to_string())),
        })
    };
    let (layers, (tree, tree_error)) = tokio::try_join!(layers, tree)?;

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
    Ok(Deployment {
        deployment_id: deployment_id.to_owned(),
        config,
        modules,
        redirects,
        tree,
        tree_error,
        tree_deferred,
        import_maps,
        npm,
    })
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
