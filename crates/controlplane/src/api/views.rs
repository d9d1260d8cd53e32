//! The JSON shapes the API answers with (`docs/control-plane-api.md`).

use serde_json::{Value, json};

use crate::ControlPlane;
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

pub fn project(cp: &ControlPlane, project: &ProjectRow) -> Value {
    json!({
        "id": project.id,
        "name": project.name,
        "created_at": format_ms(project.created_at_ms),
        "updated_at": format_ms(project.updated_at_ms),
        "production_deployment_id": project.production_deployment_id,
        "production_url": project.production_deployment_id.as_ref().map(|_| cp.base_url(&project.name)),
        "git": project.git.as_ref().map(|git| json!({
            "repository": git.repository,
            "branch": git.branch,
            "entrypoint": git.entrypoint,
        })),
    })
}

pub fn deployment(cp: &ControlPlane, deployment: &DeploymentRow) -> Value {
    json!({
        "id": deployment.id,
        "project": deployment.project_name,
        "created_at": format_ms(deployment.created_at_ms),
        "status": deployment.status.as_str(),
        "error": deployment.error,
        "entrypoint": deployment.entrypoint,
        "url": cp.base_url(&format!("{}-{}", deployment.project_name, deployment.id)),
        "production": deployment.is_production(),
        "git": deployment.git.as_ref().map(|git| json!({
            "commit": git.commit,
            "message": git.message,
            "branch": git.branch,
        })),
        "env_names": deployment.envs.keys().collect::<Vec<_>>(),
        "files": deployment.file_count,
        "size_bytes": deployment.size_bytes,
    })
}

pub fn domain(cp: &ControlPlane, domain: &DomainRow) -> Value {
    json!({
        "domain": domain.domain,
        "project": domain.project_name,
        "created_at": format_ms(domain.created_at_ms),
        "verified": domain.verified_at_ms.is_some(),
        "verified_at": domain.verified_at_ms.map(format_ms),
        "verification": {
            "txt_name": verify::txt_name(&domain.domain),
            "txt_value": domain.token,
            "http_url": verify::http_url(&domain.domain, cp.options.domain_verify_http_port, &domain.token),
            "http_body": domain.token,
        },
        "certificate": domain.certificate.as_ref().map(|cert| json!({
            "not_after": format_ms(cert.not_after_ms),
            "names": cert.names,
        })),
    })
}
