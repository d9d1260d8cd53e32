//! The API's answers (`docs/control-plane-api.md`), built from store rows as
//! the `isocloud-api` types the client reads.

use isocloud_api as wire;

use crate::ControlPlane;
use crate::store::activity::{Bucket, LogRow, UsageRow};
use crate::store::deployments::DeploymentRow;
use crate::store::domains::DomainRow;
use crate::store::projects::ProjectRow;
use crate::time::format_ms;
use crate::verify;

impl ControlPlane {
    /// `http://<label>.<base domain>[:port]`.
    pub(crate) fn base_url(&self, label: &str) -> String {
        let port = self.options.public_http_port;
        let base = &self.options.base_domain;
        if port == 80 { format!("http://{label}.{base}") } else { format!("http://{label}.{base}:{port}") }
    }
}

pub fn project(cp: &ControlPlane, project: &ProjectRow) -> wire::Project {
    wire::Project {
        id: project.id.clone(),
        name: project.name.clone(),
        created_at: format_ms(project.created_at_ms),
        updated_at: format_ms(project.updated_at_ms),
        production_deployment_id: project.production_deployment_id.clone(),
        production_url: project.production_deployment_id.as_ref().map(|_| cp.base_url(&project.name)),
        git: project.git.as_ref().map(|git| wire::ProjectGit {
            repository: git.repository.clone(),
            branch: git.branch.clone(),
            entrypoint: git.entrypoint.clone(),
        }),
    }
}

pub fn deployment(cp: &ControlPlane, deployment: &DeploymentRow) -> wire::Deployment {
    wire::Deployment {
        id: deployment.id.clone(),
        project: deployment.project_name.clone(),
        created_at: format_ms(deployment.created_at_ms),
        status: deployment.status.as_str().to_owned(),
        error: deployment.error.clone(),
        entrypoint: deployment.entrypoint.clone(),
        url: cp.base_url(&format!("{}-{}", deployment.project_name, deployment.id)),
        production: deployment.is_production(),
        git: deployment.git.as_ref().map(|git| wire::DeploymentGit {
            commit: git.commit.clone(),
            message: git.message.clone(),
            branch: git.branch.clone(),
        }),
        env_names: deployment.envs.keys().cloned().collect(),
        // Counts the store keeps as i64 (SQL's integer); never negative.
        files: u64::try_from(deployment.file_count).unwrap_or_default(),
        size_bytes: u64::try_from(deployment.size_bytes).unwrap_or_default(),
    }
}

pub fn domain(cp: &ControlPlane, domain: &DomainRow) -> wire::Domain {
    wire::Domain {
        domain: domain.domain.clone(),
        project: domain.project_name.clone(),
        created_at: format_ms(domain.created_at_ms),
        verified: domain.verified_at_ms.is_some(),
        verified_at: domain.verified_at_ms.map(format_ms),
        verification: wire::Verification {
            txt_name: verify::txt_name(&domain.domain),
            txt_value: domain.token.clone(),
            http_url: verify::http_url(&domain.domain, cp.options.domain_verify_http_port, &domain.token),
            http_body: domain.token.clone(),
        },
        certificate: domain.certificate.as_ref().map(|cert| wire::Certificate {
            not_after: format_ms(cert.not_after_ms),
            names: cert.names.clone(),
            source: cert.source.clone(),
        }),
        acme: domain.acme.as_ref().map(|acme| wire::AcmeStatus {
            status: acme.status.clone(),
            error: acme.error.clone(),
            failures: acme.failures,
            next_attempt_at: format_ms(acme.next_attempt_at_ms),
            last_attempt_at: acme.last_attempt_at_ms.map(format_ms),
        }),
    }
}

pub fn log(log: &LogRow) -> wire::LogEntry {
    wire::LogEntry {
        id: log.id,
        deployment_id: log.deployment_id.clone(),
        timestamp: format_ms(log.timestamp_ms),
        kind: log.kind.clone(),
        level: log.level.clone(),
        message: log.message.clone(),
        request_id: log.request_id.clone(),
    }
}

pub fn usage(usage: &UsageRow) -> wire::Usage {
    wire::Usage {
        deployment_id: usage.deployment_id.clone(),
        interval_start: format_ms(usage.interval_start_ms),
        interval_end: format_ms(usage.interval_end_ms),
        requests: usage.requests,
        errors: usage.errors,
        cpu_ms: usage.cpu_ms,
        wall_ms: usage.wall_ms,
        ingress_bytes: usage.ingress_bytes,
        egress_bytes: usage.egress_bytes,
        peak_memory_bytes: usage.peak_memory_bytes,
        fetch_requests: usage.fetch_requests,
        fetch_sent_bytes: usage.fetch_sent_bytes,
        fetch_received_bytes: usage.fetch_received_bytes,
        status_1xx: usage.status[0],
        status_2xx: usage.status[1],
        status_3xx: usage.status[2],
        status_4xx: usage.status[3],
        status_5xx: usage.status[4],
        latency_counts: usage.latency.to_vec(),
    }
}

pub fn point(bucket: &Bucket) -> wire::AnalyticsPoint {
    wire::AnalyticsPoint {
        t: format_ms(bucket.bucket_start_ms),
        requests: bucket.requests,
        errors: bucket.errors,
        cpu_ms: bucket.cpu_ms,
        wall_ms: bucket.wall_ms,
        peak_memory_bytes: bucket.peak_memory_bytes,
        ingress_bytes: bucket.ingress_bytes,
        egress_bytes: bucket.egress_bytes,
        status_1xx: bucket.status[0],
        status_2xx: bucket.status[1],
        status_3xx: bucket.status[2],
        status_4xx: bucket.status[3],
        status_5xx: bucket.status[4],
        latency_p50_ms: bucket.latency_quantile_ms(500),
        latency_p99_ms: bucket.latency_quantile_ms(990),
        latency_counts: bucket.latency.to_vec(),
    }
}

/// The latency histogram's bounds, as the analytics answer names them.
pub fn latency_le_ms() -> Vec<i64> {
    isocloud_protocol::LATENCY_BOUNDS_MS.iter().map(|&ms| ms as i64).collect()
}

pub fn file(file: &crate::store::deployments::FileRow) -> wire::DeploymentFile {
    wire::DeploymentFile {
        path: file.path.clone(),
        size_bytes: u64::try_from(file.size_bytes).unwrap_or(0),
        sha256: file.sha256.clone(),
        symlink_target: file.symlink_target.clone(),
    }
}
