//! A traced request (`--otlp-endpoint`): its span and the isolate's CPU
//! clock at its start. Untraced requests carry `None` and pay nothing else.

use std::sync::Arc;
use std::time::Duration;

use isocloud_telemetry::RequestSpan;

use crate::isolates::Upstream;

pub struct Traced {
    pub span: RequestSpan,
    /// The isolate serving it and its CPU clock when the request went in.
    cpu_from: Option<(Arc<dyn Upstream>, Duration)>,
}

impl Traced {
    pub fn new(span: RequestSpan) -> Self {
        Self { span, cpu_from: None }
    }

    /// The request goes into `isolate`: its CPU from now on is the request's
    /// (shared with any request overlapping it in the same isolate).
    pub fn measure_cpu(&mut self, isolate: &Arc<dyn Upstream>) {
        self.cpu_from = isolate.cpu_time().map(|now| (isolate.clone(), now));
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if let Some((isolate, from)) = self.cpu_from.take()
            && let Some(now) = isolate.cpu_time()
        {
            self.span.cpu(now.saturating_sub(from));
        }
        // The span is exported as it drops, after this.
    }
}
