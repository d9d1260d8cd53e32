//! The deno cache template: what a deployment's own deno cache dir starts
//! from. Each deployment has its own cache dir (no tenant reads or poisons
//! another's), so its first boot would compile the harness from scratch;
//! instead the runner boots one isolate of its own at start-up — the
//! harness and a one-line handler, nothing a tenant wrote — and every new
//! cache dir starts as a copy of that one's.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use isocloud_origin::{ActivityBatch, AssetTree, BootAnswer, IsolateConfig, Origin, OriginError};

use crate::boot::{BootContext, boot, deno_dir_name};

const WARMUP_ORIGIN: &str = "isocloud-warmup";
const WARMUP_DEPLOYMENT: &str = "template";
const WARMUP_MAIN: &str = "Deno.serve(() => new Response(\"\"));\n";

/// An origin of one runner-owned deployment, in memory.
struct WarmupOrigin;

#[async_trait]
impl Origin for WarmupOrigin {
    fn name(&self) -> &str {
        WARMUP_ORIGIN
    }

    async fn boot(&self, _deployment_id: &str) -> Result<BootAnswer, OriginError> {
        let config = IsolateConfig::from_header(
            br#"{"entrypoint":"file:///src/main.js","layers":[{"kind":"bundle","id":"isocloud-warmup-main","specifier":"file:///src/main.js"}],"inline_layer":"isocloud-warmup-main","permissions":{"net":false}}"#,
        )
        .map_err(OriginError::InvalidConfig)?;
        Ok(BootAnswer { config, inline_layer: Bytes::from_static(WARMUP_MAIN.as_bytes()) })
    }

    async fn layer(&self, _deployment_id: &str, layer_id: &str) -> Result<Bytes, OriginError> {
        Err(OriginError::Layer {
            layer_id: layer_id.to_owned(),
            message: "the warm-up has only its inline layer".into(),
        })
    }

    async fn read_tree(&self, _deployment_id: &str) -> Result<AssetTree, OriginError> {
        Ok(AssetTree::default())
    }

    async fn read_blob(&self, _deployment_id: &str, file_id: &str) -> Result<Bytes, OriginError> {
        Err(OriginError::AssetNotFound(file_id.to_owned()))
    }

    async fn report_activity(&self, _deployment_id: &str, _batch: &ActivityBatch) -> Result<(), OriginError> {
        Ok(())
    }
}

/// Boots the warm-up isolate, ends it, and makes its cache dir the template
/// (replacing an earlier run's: the harness or deno may have changed).
/// Failing leaves no template; deployments then start from empty caches.
pub(crate) async fn build(ctx: &BootContext) -> Result<(), String> {
    let template = isocloud_sandbox::deno_template_dir(&ctx.policy);
    let warm_dir = ctx.policy.deno_dir.join(deno_dir_name(WARMUP_ORIGIN, WARMUP_DEPLOYMENT));
    let _ = std::fs::remove_dir_all(&warm_dir);
    let origin: Arc<dyn Origin> = Arc::new(WarmupOrigin);
    let (isolate, _) = boot(ctx, origin, WARMUP_DEPLOYMENT.to_owned(), 0, false).await.map_err(|e| e.to_string())?;
    // deno writes its code cache as modules load; a clean exit closes its
    // databases before the copy.
    isolate.terminate(Duration::from_secs(5)).await;
    drop(isolate);
    let _ = std::fs::remove_dir_all(&template);
    std::fs::rename(&warm_dir, &template).map_err(|e| format!("{}: {e}", template.display()))
}
