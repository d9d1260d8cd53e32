//! `isocloud deployments`, `promote`, `rollback`: a project's deployments
//! and which one is production.

use super::api::{Api, Project};
use super::error::ClientError;
use super::output::{sanitize, short_time, table};

pub async fn list(api: Api, project: &str, limit: u32, json: bool) -> Result<(), ClientError> {
    let deployments = api.deployments(project, limit).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&deployments)?);
        return Ok(());
    }
    if deployments.is_empty() {
        eprintln!("project {project} has no deployments yet: `isocloud deploy --project {project}`");
        return Ok(());
    }
    // The project names the current production deployment; a deployment's
    // own flag may describe its creation.
    let production = api.project(project).await?.production_deployment_id;
    let rows: Vec<Vec<String>> = deployments
        .iter()
        .map(|d| {
            let git = d.git.as_ref().map_or(String::new(), |g| {
                format!("{} {}", g.commit.get(..7).unwrap_or(&g.commit), sanitize(&g.message))
            });
            vec![
                sanitize(&d.id).into_owned(),
                short_time(&d.created_at),
                sanitize(&d.status).into_owned(),
                if production.as_deref() == Some(d.id.as_str()) { "Prod" } else { "" }.to_string(),
                git,
            ]
        })
        .collect();
    print!("{}", table(&["ID", "CREATED", "STATUS", "PROD", "GIT"], &rows));
    Ok(())
}

pub async fn promote(api: Api, project: &str, deployment_id: &str) -> Result<(), ClientError> {
    let answer = api.promote(project, deployment_id).await?;
    report(&answer);
    Ok(())
}

pub async fn rollback(api: Api, project: &str, deployment_id: Option<&str>) -> Result<(), ClientError> {
    let answer = api.rollback(project, deployment_id).await?;
    report(&answer);
    Ok(())
}

/// Production deployment on stderr, the production URL alone on stdout.
fn report(project: &Project) {
    eprintln!(
        "production of {} is now {}",
        sanitize(&project.name),
        sanitize(project.production_deployment_id.as_deref().unwrap_or("nothing"))
    );
    if let Some(url) = &project.production_url {
        println!("{}", sanitize(url));
    }
}
