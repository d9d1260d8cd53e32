//! What a deployment is once loaded: its merged module graph
//! ([`Deployment`], [`ModuleFile`]) and its file manifest ([`AssetTree`]),
//! the model the origin assembles and the sandbox writes out for an isolate.
//! Plain data with its own checks (a manifest's paths and links stay inside
//! the tree); it must not do I/O or know how a deployment is fetched, so the
//! confinement crate can use it without the HTTP client and JWTs behind
//! `isocloud-origin`.

#![forbid(unsafe_code)]

mod tree;

use std::collections::BTreeMap;

use bytes::Bytes;
use isocloud_eszip::{ModuleKind, NpmSnapshot};
use isocloud_protocol::IsolateConfig;
use url::Url;

pub use tree::{AssetEntry, AssetTree, TreeError, is_valid_file_id, link_stays_inside};

/// One module of the merged graph.
#[derive(Debug, Clone)]
pub struct ModuleFile {
    pub specifier: Url,
    pub kind: ModuleKind,
    pub source: Bytes,
}

/// Everything needed to start an isolate for one deployment.
#[derive(Debug, Clone)]
pub struct Deployment {
    pub deployment_id: String,
    pub config: IsolateConfig,
    /// The merged module graph, by specifier.
    pub modules: BTreeMap<Url, ModuleFile>,
    /// `specifier → target` redirects carried by ESZIP layers.
    pub redirects: BTreeMap<Url, Url>,
    pub tree: AssetTree,
    /// Why the origin's `read_tree` failed, when it did: boot is the only
    /// required RPC (the protocol says so), so the deployment runs with no
    /// files instead, and the runner reports this as an event.
    pub tree_error: Option<String>,
    /// The tree was not asked for (see [`Origin::tree_at_boot`]): `tree` is
    /// empty until the isolate asks for it.
    pub tree_deferred: bool,
    /// The import maps the ESZIP layers carry, by URL, in layer order: bare
    /// imports resolve through them at run time, as Deno's ESZIP loader does.
    pub import_maps: Vec<(Url, serde_json::Value)>,
    /// The npm packages the ESZIP layers' `npm:` imports resolved to, merged
    /// (the earlier layer wins a request both name): the runner lays them
    /// out from its npm registry before deno starts.
    pub npm: Option<NpmSnapshot>,
}
