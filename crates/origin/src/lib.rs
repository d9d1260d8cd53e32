//! Where deployments come from. This crate owns the [`Origin`] interface (the
//! RPCs of `subhosting-protocol.md` §2), its two implementations — a remote
//! origin spoken to over HTTP with signed JWTs ([`RemoteOrigin`]) and a folder
//! of apps on local disk ([`AppsOrigin`], the embedded default) — the bounded
//! on-disk cache of layers and blobs ([`DiskCache`]), the failover over a
//! control plane's several origin listeners that the runner and the edge
//! share ([`FailoverRoots`]), the assembly of a
//! deployment's layers into one module graph ([`load_deployment`]), and the
//! last boot answer of each deployment, which stands in for the origin's
//! while the origin cannot be reached ([`load_deployment_with`], `stale.rs`).
//!
//! It must not start processes, write a deployment's files for an isolate, or
//! know about the public HTTP listener: it answers "what is deployment D?"
//! and nothing else. Every answer from an origin is untrusted input, bounded in
//! size and time, and refused with an [`OriginError`] that names the problem.

#![forbid(unsafe_code)]

mod apps;
mod cache;
mod deployment;
mod error;
mod failover;
mod registry;
mod remote;
mod stale;
mod trust;

use async_trait::async_trait;
use bytes::Bytes;

pub use apps::{AppBuilder, AppsOrigin};
pub use cache::{CacheKind, DiskCache};
pub use deployment::{Loaded, StaleBoot, load_deployment, load_deployment_with};
pub use error::OriginError;
pub use failover::FailoverRoots;
pub use isocloud_model::{AssetEntry, AssetTree, Deployment, ModuleFile, link_stays_inside};
pub use isocloud_protocol::{ActivityBatch, DEFAULT_ENTRYPOINTS, IsolateConfig};
pub use registry::{MAX_REMOTE_ORIGINS, RemoteOrigins};
pub use remote::{RemoteOrigin, RemoteOriginOptions};
pub use stale::{Fault, StaleBoots, fault_of, remember_tree};
pub use trust::{RpcTrust, RpcTrustError};

/// The answer to `boot`: the validated config and the inline layer's bytes
/// (empty when the config names none).
#[derive(Debug, Clone)]
pub struct BootAnswer {
    pub config: IsolateConfig,
    pub inline_layer: Bytes,
}

/// The RPCs a runner makes to an origin. Implementations must be cheap to
/// call concurrently; the runner adds caching on top.
#[async_trait]
pub trait Origin: Send + Sync + 'static {
    /// A stable name for logs, metrics and cache keys (`apps`, or the
    /// subhoster's kid and rpc root).
    fn name(&self) -> &str;
    /// Who pays for `deployment_id`'s isolates: the runner caps the
    /// isolates one tenant holds at once (`--max-isolates-per-tenant`), so
    /// no tenant takes every slot. By default the origin is one tenant (a
    /// subhoster); an origin serving several tenants (the control plane's
    /// projects) names each. Called on the boot path, before any RPC: it
    /// must answer from memory.
    fn tenant_of(&self, deployment_id: &str) -> String {
        let _ = deployment_id;
        self.name().to_owned()
    }
    async fn boot(&self, deployment_id: &str) -> Result<BootAnswer, OriginError>;
    async fn layer(&self, deployment_id: &str, layer_id: &str) -> Result<Bytes, OriginError>;
    async fn read_tree(&self, deployment_id: &str) -> Result<AssetTree, OriginError>;
    /// Whether the tree is asked for at boot. An origin of this process
    /// answers at once, and a built deployment's packages come from it;
    /// a remote origin's tree waits until the isolate first touches a file
    /// (`read_tree` is optional in the protocol, and may be slow).
    fn tree_at_boot(&self) -> bool {
        true
    }
    async fn read_blob(&self, deployment_id: &str, file_id: &str) -> Result<Bytes, OriginError>;
    async fn report_activity(&self, deployment_id: &str, batch: &ActivityBatch) -> Result<(), OriginError>;
}
