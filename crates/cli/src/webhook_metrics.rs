//! The control plane's public git webhook in `/metrics` (#21 row 1): the
//! deliveries it refused before they were authenticated, by reason — a
//! rising `busy` or `body_timeout` is someone holding the webhook's bounded
//! body slots.

use std::sync::Arc;

use isocloud_controlplane::ControlPlane;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::registry::Registry;

struct WebhookCollector(Arc<ControlPlane>);

impl std::fmt::Debug for WebhookCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookCollector")
    }
}

impl Collector for WebhookCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "isocloud_webhook_refused",
            "Git webhook deliveries refused before they were authenticated: busy (503, all body slots taken), \
             body_timeout (408), too_large (413), unsigned (401)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, count) in self.0.webhook_refusals() {
            ConstCounter::new(count).encode(family.encode_family(&[("reason", reason)])?)?;
        }
        Ok(())
    }
}

pub fn register(registry: &mut Registry, control_plane: Arc<ControlPlane>) {
    registry.register_collector(Box::new(WebhookCollector(control_plane)));
}
