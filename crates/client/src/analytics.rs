//! `isocloud analytics`: a project's (or one deployment's) traffic by time
//! step — requests, errors, status classes, latency, CPU, bandwidth and
//! peak memory — and the totals over the whole span, the latency quantiles
//! of the totals read from the steps' histograms merged.

use std::time::{Duration, SystemTime};

use clap::Args;

use super::api::{Analytics, AnalyticsPoint, AnalyticsQuery};
use super::error::{ClientError, InputError};
use super::output::{human_bytes, short_time, table};
use super::{ConnectionFlags, connect, time};

/// The server's step bounds (`step_s`).
const MIN_STEP: Duration = Duration::from_secs(10);
const MAX_STEP: Duration = Duration::from_secs(86_400);

#[derive(Args, Debug)]
pub struct AnalyticsArgs {
    #[command(flatten)]
    pub connection: ConnectionFlags,
    #[arg(long, short = 'p', value_name = "NAME")]
    pub project: String,
    /// Only this deployment's traffic.
    #[arg(long, value_name = "ID")]
    pub deployment: Option<String>,
    /// From this time on: RFC 3339 or a duration back from now (10m, 6h, 2d) [default: 1h].
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// One row per this much time: 10s to 1d (30s, 5m, 1h) [default: 5m].
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    pub step: String,
    /// Steps in which nothing ran too.
    #[arg(long)]
    pub all: bool,
    /// Print the server's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: AnalyticsArgs) -> Result<(), ClientError> {
    let step = time::parse_duration(&args.step)
        .filter(|step| (MIN_STEP..=MAX_STEP).contains(step))
        .ok_or_else(|| InputError::Step(args.step.clone()))?;
    let since =
        time::parse_since(args.since.as_deref().unwrap_or("1h"), SystemTime::now()).map_err(InputError::Since)?;
    let api = connect(&args.connection)?;
    let query = AnalyticsQuery { deployment: args.deployment.clone(), since: Some(since), step_s: step.as_secs() };
    let analytics = api.analytics(&args.project, &query).await?;
    if args.json {
        println!("{}", serde_json::to_string(&analytics)?);
        return Ok(());
    }
    print!("{}", render(&analytics, args.all));
    Ok(())
}

/// The table (steps with traffic, or all of them), then the totals.
fn render(analytics: &Analytics, all: bool) -> String {
    let headers =
        ["TIME", "REQUESTS", "ERRORS", "2XX", "3XX", "4XX", "5XX", "P50", "P99", "CPU", "EGRESS", "PEAK MEMORY"];
    let rows: Vec<Vec<String>> = analytics
        .points
        .iter()
        .filter(|point| all || point.requests > 0 || point.cpu_ms > 0)
        .map(|point| {
            vec![
                short_time(&point.t),
                point.requests.to_string(),
                point.errors.to_string(),
                point.status_2xx.to_string(),
                point.status_3xx.to_string(),
                point.status_4xx.to_string(),
                point.status_5xx.to_string(),
                latency(point.latency_p50_ms, analytics),
                latency(point.latency_p99_ms, analytics),
                format!("{} ms", point.cpu_ms),
                human_bytes(point.egress_bytes.max(0) as u64),
                human_bytes(point.peak_memory_bytes.max(0) as u64),
            ]
        })
        .collect();
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("no traffic in this span\n");
    } else {
        out.push_str(&table(&headers, &rows));
    }
    let total = totals(&analytics.points);
    let counts = merged_histogram(analytics);
    let errors_share = if total.requests > 0 { 100.0 * total.errors as f64 / total.requests as f64 } else { 0.0 };
    out.push_str(&format!(
        "\ntotal: {} requests, {} errors ({errors_share:.1}%), 2xx {} 3xx {} 4xx {} 5xx {}, p50 {}, p99 {}, CPU {} ms, \
         egress {}\n",
        total.requests,
        total.errors,
        total.status_2xx,
        total.status_3xx,
        total.status_4xx,
        total.status_5xx,
        latency(quantile(&counts, &analytics.latency_le_ms, 0.50), analytics),
        latency(quantile(&counts, &analytics.latency_le_ms, 0.99), analytics),
        total.cpu_ms,
        human_bytes(total.egress_bytes.max(0) as u64),
    ));
    out
}

/// A latency bound in ms as the server gives it; the last bound means "at
/// least that".
fn latency(ms: Option<i64>, analytics: &Analytics) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if analytics.latency_le_ms.last() == Some(&ms) => format!("≥{ms} ms"),
        Some(ms) => format!("≤{ms} ms"),
    }
}

struct Totals {
    requests: i64,
    errors: i64,
    status_2xx: i64,
    status_3xx: i64,
    status_4xx: i64,
    status_5xx: i64,
    cpu_ms: i64,
    egress_bytes: i64,
}

fn totals(points: &[AnalyticsPoint]) -> Totals {
    let sum = |field: fn(&AnalyticsPoint) -> i64| points.iter().map(field).fold(0i64, i64::saturating_add);
    Totals {
        requests: sum(|p| p.requests),
        errors: sum(|p| p.errors),
        status_2xx: sum(|p| p.status_2xx),
        status_3xx: sum(|p| p.status_3xx),
        status_4xx: sum(|p| p.status_4xx),
        status_5xx: sum(|p| p.status_5xx),
        cpu_ms: sum(|p| p.cpu_ms),
        egress_bytes: sum(|p| p.egress_bytes),
    }
}

/// Every step's latency histogram added up (one count per bound, then the
/// requests past the last).
fn merged_histogram(analytics: &Analytics) -> Vec<i64> {
    let mut merged = vec![0i64; analytics.latency_le_ms.len() + 1];
    for point in &analytics.points {
        for (total, count) in merged.iter_mut().zip(&point.latency_counts) {
            *total = total.saturating_add(*count);
        }
    }
    merged
}

/// The bound the `q` quantile falls under, as the server computes a step's:
/// the last bound when it falls past it; `None` when nothing was timed.
fn quantile(counts: &[i64], bounds: &[i64], q: f64) -> Option<i64> {
    let timed: i64 = counts.iter().sum();
    if timed <= 0 || bounds.is_empty() {
        return None;
    }
    let rank = ((q * timed as f64).ceil() as i64).max(1);
    let mut seen = 0i64;
    for (i, count) in counts.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return Some(bounds[i.min(bounds.len() - 1)]);
        }
    }
    bounds.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(t: &str, requests: i64, counts: Vec<i64>) -> AnalyticsPoint {
        AnalyticsPoint {
            t: t.into(),
            requests,
            errors: requests / 10,
            cpu_ms: requests * 2,
            wall_ms: 0,
            peak_memory_bytes: 30_000_000,
            ingress_bytes: 0,
            egress_bytes: requests * 100,
            status_1xx: 0,
            status_2xx: requests - requests / 10,
            status_3xx: 0,
            status_4xx: 0,
            status_5xx: requests / 10,
            latency_p50_ms: (requests > 0).then_some(5),
            latency_p99_ms: (requests > 0).then_some(10),
            latency_counts: counts,
        }
    }

    #[test]
    fn steps_with_traffic_then_totals_whose_quantiles_come_from_the_merged_histogram() {
        let analytics = Analytics {
            step_s: 300,
            latency_le_ms: vec![5, 10, 100],
            points: vec![
                point("2026-12-07T10:00:00Z", 90, vec![90, 0, 0, 0]),
                point("2026-12-07T10:05:00Z", 0, vec![0, 0, 0, 0]),
                point("2026-12-07T10:10:00Z", 10, vec![0, 0, 8, 2]),
            ],
        };
        let shown = render(&analytics, false);
        assert!(shown.starts_with("TIME "), "{shown}");
        assert_eq!(
            shown.lines().filter(|l| l.starts_with("2026-12-07T")).count(),
            2,
            "the empty step is left out: {shown}"
        );
        assert!(shown.contains("total: 100 requests, 10 errors (10.0%)"), "{shown}");
        // 90 of 100 at ≤5 ms: the median there; the 99th in the last bucket.
        assert!(shown.contains("p50 ≤5 ms, p99 ≥100 ms"), "{shown}");
        assert_eq!(render(&analytics, true).lines().filter(|l| l.starts_with("2026-12-07T")).count(), 3);

        let quiet = Analytics { points: vec![point("2026-12-07T10:00:00Z", 0, vec![0, 0, 0, 0])], ..analytics };
        let shown = render(&quiet, false);
        assert!(shown.starts_with("no traffic in this span"), "{shown}");
        assert!(shown.contains("p50 -, p99 -"), "{shown}");
    }
}
