//! Activity reports to origins: batched per origin and deployment, bounded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use isocloud_origin::Origin;
use isocloud_protocol::{ActivityBatch, ActivityEvent, ActivityKind};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::PoolMetrics;

/// Events waiting to be sent; past this, new events are dropped and counted.
const QUEUE_EVENTS: usize = 16_384;
const MAX_BATCH_EVENTS: usize = 500;
const FLUSH_INTERVAL: Duration = Duration::from_millis(500);
const DELIVERY_ATTEMPTS: u32 = 4;

/// Hands events to a background task that sends them in batches.
#[derive(Clone)]
pub struct ActivitySink {
    tx: mpsc::Sender<Message>,
    metrics: PoolMetrics,
}

enum Message {
    Event(Arc<dyn Origin>, ActivityEvent),
    /// Send everything queued now and answer when delivery has ended.
    Flush(oneshot::Sender<()>),
}

impl ActivitySink {
    pub fn start(metrics: PoolMetrics) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_EVENTS);
        tokio::spawn(run(rx));
        Self { tx, metrics }
    }

    pub fn report(&self, origin: &Arc<dyn Origin>, deployment_id: &str, kind: ActivityKind) {
        let event = ActivityEvent { deployment_id: deployment_id.to_owned(), timestamp: now_rfc3339(), kind };
        if self.tx.try_send(Message::Event(origin.clone(), event)).is_err() {
            self.metrics.activity_dropped.inc();
        }
    }

    /// Delivers everything reported so far (retries included) before
    /// returning, or gives up after `timeout`. Used at shutdown.
    pub async fn flush(&self, timeout: Duration) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.tx.send(Message::Flush(done_tx)).await.is_ok() {
            let _ = tokio::time::timeout(timeout, done_rx).await;
        }
    }
}

type BatchKey = (String, String);

async fn run(mut rx: mpsc::Receiver<Message>) {
    let mut pending: HashMap<BatchKey, (Arc<dyn Origin>, Vec<ActivityEvent>)> = HashMap::new();
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    loop {
        tokio::select! {
            received = rx.recv() => match received {
                None => break,
                Some(Message::Event(origin, event)) => {
                    let key = (origin.name().to_owned(), event.deployment_id.clone());
                    let slot = pending.entry(key).or_insert_with(|| (origin, Vec::new()));
                    slot.1.push(event);
                    if slot.1.len() >= MAX_BATCH_EVENTS {
                        flush(&mut pending);
                    }
                }
                Some(Message::Flush(done)) => {
                    let deliveries = flush(&mut pending);
                    tokio::spawn(async move {
                        futures_util::future::join_all(deliveries).await;
                        let _ = done.send(());
                    });
                }
            },
            _ = tick.tick() => {
                flush(&mut pending);
            }
        }
    }
    flush(&mut pending);
}

fn flush(pending: &mut HashMap<BatchKey, (Arc<dyn Origin>, Vec<ActivityEvent>)>) -> Vec<JoinHandle<()>> {
    let mut deliveries = Vec::new();
    for ((_, deployment_id), (origin, events)) in pending.drain() {
        let batch = ActivityBatch { batch_id: uuid::Uuid::new_v4().to_string(), events };
        deliveries.push(tokio::spawn(async move {
            let mut delay = Duration::from_millis(250);
            for attempt in 1..=DELIVERY_ATTEMPTS {
                match origin.report_activity(&deployment_id, &batch).await {
                    Ok(()) => return,
                    Err(e) if attempt == DELIVERY_ATTEMPTS => {
                        tracing::warn!(origin = origin.name(), deployment_id, error = %e, events = batch.events.len(), "activity batch dropped after retries");
                    }
                    Err(e) => {
                        tracing::debug!(origin = origin.name(), deployment_id, error = %e, attempt, "activity delivery failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            }
        }));
    }
    deliveries
}

/// RFC 3339 in UTC with millisecond precision, without a date crate.
pub(crate) fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamp_shape() {
        let ts = super::now_rfc3339();
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.starts_with("20") && ts.ends_with('Z'), "{ts}");
    }
}
