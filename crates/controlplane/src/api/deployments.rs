//! `/projects/{name}/deployments` and `/deployments/{id}`: immutable
//! deployments made of uploaded blobs.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use futures_util::FutureExt;
use isocloud_protocol::NetPermission;
use serde_json::Value;

use super::access::AuditNote;
use super::paging::PageRequest;
use super::projects::{not_found, project_or_404};
use super::{ApiJson, ApiPath, ApiQuery, AppState, check, views};
use crate::error::ApiError;
use crate::origin::{file_specifier, normalize_specifier};
use crate::store::deployments::{self, FileRow, GitInfo, NewDeployment, Status};
use crate::store::{env, projects};
use crate::time::now_ms;
use crate::{ControlPlane, ids, validate};
use isocloud_api as wire;

/// Checks the files' paths (each named once), hashes and sizes, and that no
/// file is also another file's directory.
pub(crate) fn check_files(files: &wire::FileManifest, max_blob_bytes: u64) -> Result<(), ApiError> {
    if let Some(path) = files.named_twice() {
        return Err(ApiError::field(
            format!("files.{path}"),
            format!("the path {path:?} is named twice; a deployment names each path once"),
        ));
    }
    if files.len() > validate::MAX_FILES {
        return Err(ApiError::field("files", format!("at most {} files per deployment", validate::MAX_FILES)));
    }
    for (path, spec) in files.iter() {
        let field = format!("files.{path}");
        check(&field, validate::file_path(path))?;
        if validate::is_code_path(path) {
            check(&field, validate::code_path(path))?;
        }
        check(format!("{field}.hash"), validate::sha256(&spec.hash))?;
        if spec.size > max_blob_bytes {
            return Err(ApiError::field(
                format!("{field}.size"),
                format!("{} bytes is over the blob bound of {max_blob_bytes} bytes", spec.size),
            ));
        }
        let mut dir = String::new();
        for segment in path.split('/').take(path.split('/').count() - 1) {
            if !dir.is_empty() {
                dir.push('/');
            }
            dir.push_str(segment);
            if files.contains_key(&dir) {
                return Err(ApiError::field(field, format!("{dir:?} is a file, so it cannot also be a directory")));
            }
        }
    }
    Ok(())
}

/// Checks a `permissions` object and returns it as stored.
pub(crate) fn check_permissions(permissions: Option<&Value>) -> Result<String, ApiError> {
    let Some(value) = permissions else { return Ok("null".into()) };
    if !value.is_object() {
        return Err(ApiError::field("permissions", "must be an object such as {\"net\": true}"));
    }
    NetPermission::from_json_value(value.clone()).map_err(|e| {
        let field = if e.field.starts_with("permissions") {
            e.field.clone()
        } else if e.field.is_empty() {
            "permissions".to_owned()
        } else {
            format!("permissions.{}", e.field)
        };
        ApiError::field(field, e.message)
    })?;
    Ok(value.to_string())
}

fn check_git(git: Option<&wire::CommitBody>) -> Result<Option<GitInfo>, ApiError> {
    let Some(git) = git else { return Ok(None) };
    check("git.commit", validate::git_commit(&git.commit))?;
    check("git.message", validate::git_message(&git.message))?;
    check("git.branch", validate::git_branch(&git.branch))?;
    Ok(Some(GitInfo {
        commit: git.commit.clone(),
        message: validate::first_line(&git.message),
        branch: git.branch.clone(),
    }))
}

/// The specifiers an ESZIP archive holds (modules and redirects), or why it
/// does not decode.
async fn eszip_specifiers(cp: &ControlPlane, hash: &str) -> Result<HashSet<String>, ApiError> {
    let bytes = cp.blobs.get(hash).await?.ok_or_else(|| ApiError::MissingBlobs { missing: vec![hash.to_owned()] })?;
    // Decoding is CPU-bound and completes without waiting (see the eszip
    // crate), so it runs on a blocking thread.
    let graph = tokio::task::spawn_blocking(move || isocloud_eszip::parse(bytes).now_or_never())
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::internal("ESZIP decoding did not complete synchronously"))?
        .map_err(|e| ApiError::field("eszip", format!("the blob is not a valid ESZIP archive: {e}")))?;
    Ok(graph
        .entries
        .into_iter()
        .map(|entry| match entry {
            isocloud_eszip::Entry::Module(module) => normalize_specifier(&module.specifier),
            isocloud_eszip::Entry::Redirect { specifier, .. } => normalize_specifier(&specifier),
        })
        .collect())
}

pub(crate) async fn create(
    State(cp): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<wire::CreateDeploymentBody>,
) -> Result<(StatusCode, axum::Extension<AuditNote>, Json<wire::Deployment>), ApiError> {
    // Everything that needs no database first.
    check_files(&body.files, cp.options.max_blob_bytes)?;
    if body.files.is_empty() && body.eszip.is_none() {
        return Err(ApiError::field("files", "a deployment needs files, an eszip, or both"));
    }
    if let Some(eszip) = &body.eszip {
        check("eszip", validate::sha256(eszip))?;
    }
    let permissions_json = check_permissions(body.permissions.as_ref())?;
    let git = check_git(body.git.as_ref())?;
    let entrypoint = body.entrypoint.trim();
    if entrypoint.is_empty() {
        return Err(ApiError::field("entrypoint", "must not be empty"));
    }
    let specifier = if entrypoint.contains("://") {
        url::Url::parse(entrypoint)
            .map_err(|e| ApiError::field("entrypoint", format!("{entrypoint:?} is not a URL: {e}")))?
            .to_string()
    } else {
        let path = entrypoint.trim_start_matches("./");
        check("entrypoint", validate::file_path(path))?;
        file_specifier(path)
    };

    // Every blob must be there, at the size the client says.
    let mut hashes: BTreeSet<&str> = body.files.values().map(|f| f.hash.as_str()).collect();
    hashes.extend(body.eszip.as_deref());
    let mut missing = Vec::new();
    let mut sizes = BTreeMap::new();
    for hash in hashes {
        match cp.blobs.size(hash).await? {
            Some(size) => {
                sizes.insert(hash, size);
            }
            None => missing.push(hash.to_owned()),
        }
    }
    if !missing.is_empty() {
        return Err(ApiError::MissingBlobs { missing });
    }
    for (path, spec) in body.files.iter() {
        let stored = sizes.get(spec.hash.as_str()).copied().unwrap_or(0);
        if stored != spec.size {
            return Err(ApiError::field(
                format!("files.{path}.size"),
                format!("is {} but blob {} is {stored} bytes", spec.size, spec.hash),
            ));
        }
    }

    // The entrypoint must be a module of the deployment.
    let code_specifiers: HashSet<String> =
        body.files.keys().filter(|p| validate::is_code_path(p)).map(|p| file_specifier(p)).collect();
    let eszip_specifiers = match &body.eszip {
        Some(hash) => eszip_specifiers(&cp, hash).await?,
        None => HashSet::new(),
    };
    if !code_specifiers.contains(&specifier) && !eszip_specifiers.contains(&specifier) {
        let why = if body.files.contains_key(entrypoint.trim_start_matches("./")) {
            format!("{entrypoint:?} is not a code file ({})", validate::CODE_EXTENSIONS.join(", "))
        } else {
            format!("{specifier} is neither a code file in files nor a module of the eszip")
        };
        return Err(ApiError::field("entrypoint", why));
    }

    let mut files: Vec<FileRow> = body
        .files
        .iter()
        .map(|(path, spec)| {
            FileRow::file(path.clone(), spec.hash.clone(), i64::try_from(spec.size).unwrap_or(i64::MAX))
        })
        .collect();

    // The build step (when this node runs builds and the entrypoint is one
    // of the files): dependencies resolved once, now; a failure is kept.
    let entry_path = entrypoint.trim_start_matches("./");
    let (status, error, build_log) = match &cp.builder {
        Some(builder) if !entrypoint.contains("://") && body.files.contains_key(entry_path) => {
            match builder.build(&cp.blobs, &files, entry_path).await {
                Ok(output) => {
                    files.retain(|f| !crate::build::is_output_path(&f.path));
                    files.extend(output.files);
                    (Status::Ready, None, Some(output.log))
                }
                Err(failure) => (Status::Failed, Some(failure.error), Some(failure.log)),
            }
        }
        _ => (Status::Ready, None, None),
    };

    let now = now_ms();
    let mut tx = cp.store.write().await?;
    let project = if body.production {
        projects::lock_by_name(&mut tx, &name, now).await?.ok_or_else(|| not_found(&name))?
    } else {
        project_or_404(&mut tx, &name).await?
    };
    let envs = env::snapshot(&mut tx, &project.id).await?;
    let new = NewDeployment {
        id: ids::deployment_id(),
        project_id: project.id.clone(),
        created_at_ms: now,
        status,
        entrypoint: specifier,
        eszip_sha256: body.eszip.clone(),
        permissions_json,
        envs,
        git,
        files,
        build_promote: false,
        error,
        build_log,
    };
    deployments::insert(&mut tx, &new).await?;
    // A failed build is kept (its error and log) but never serves.
    if body.production && new.status == Status::Ready {
        projects::promote(&mut tx, &project.id, &new.id, now).await?;
    }
    let deployment =
        deployments::get(&mut tx, &new.id).await?.ok_or_else(|| ApiError::internal("deployment vanished"))?;
    tx.commit().await?;
    cp.reload_routing_logged().await;
    let promoted = if deployment.is_production() { ", promoted" } else { "" };
    let note = AuditNote(format!("deployment {} {}{promoted}", deployment.id, deployment.status.as_str()));
    Ok((StatusCode::CREATED, axum::Extension(note), Json(views::deployment(&cp, &deployment))))
}

pub(crate) async fn list(
    State(cp): State<AppState>,
    ApiPath(name): ApiPath<String>,
    query: ApiQuery,
) -> Result<(HeaderMap, Json<Vec<wire::Deployment>>), ApiError> {
    query.only(&["limit", "cursor"])?;
    let page = PageRequest::from_query(&query, 50, 1000, 2)?;
    let after = match &page.after {
        Some(key) => {
            let ms = key[0].parse::<i64>().map_err(|_| super::paging::bad_cursor())?;
            Some((ms, key[1].as_str()))
        }
        None => None,
    };
    let mut conn = cp.store.read().await?;
    let project = project_or_404(&mut conn, &name).await?;
    let rows = deployments::list_by_project(&mut conn, &project.id, after, page.fetch()).await?;
    let path = format!("/api/v1/projects/{}/deployments", project.name);
    let (headers, rows) = page.finish(rows, &path, |d| vec![d.created_at_ms.to_string(), d.id.clone()]);
    Ok((headers, Json(rows.iter().map(|d| views::deployment(&cp, d)).collect())))
}

pub(crate) fn deployment_not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("deployment {:?} not found", validate::truncate(id, 80)))
}

/// `GET /deployments/{id}/build`: the build step's outcome and log.
pub(crate) async fn build_log(
    State(cp): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<wire::Build>, ApiError> {
    let id = validate::deployment_id(&id).ok_or_else(|| deployment_not_found(&id))?;
    let mut conn = cp.store.read().await?;
    let deployment =
        deployments::get(&mut conn, id.as_str()).await?.ok_or_else(|| deployment_not_found(id.as_str()))?;
    let files = deployments::files(&mut conn, id.as_str()).await?;
    Ok(Json(wire::Build {
        id: deployment.id,
        status: deployment.status.as_str().to_owned(),
        error: deployment.error,
        log: deployment.build_log,
        npm_packages: npm_packages(&files),
    }))
}

/// `GET /deployments/{id}/files`: its files (and a build's symlinks) in
/// byte order of their paths, a page at a time (`limit`, default 1,000, at
/// most 10,000; `cursor` from the `Link` header). A built deployment holds
/// its `node_modules` too: tens of thousands of entries.
pub(crate) async fn files(
    State(cp): State<AppState>,
    ApiPath(id): ApiPath<String>,
    query: ApiQuery,
) -> Result<(HeaderMap, Json<Vec<wire::DeploymentFile>>), ApiError> {
    query.only(&["limit", "cursor"])?;
    let page = PageRequest::from_query(&query, 1000, 10_000, 1)?;
    let id = validate::deployment_id(&id).ok_or_else(|| deployment_not_found(&id))?;
    let mut conn = cp.store.read().await?;
    deployments::get(&mut conn, id.as_str()).await?.ok_or_else(|| deployment_not_found(id.as_str()))?;
    let files = deployments::files(&mut conn, id.as_str()).await?;
    // Sorted by path: the page starts past the cursor's path.
    let start = match &page.after {
        Some(key) => files.partition_point(|f| f.path.as_str() <= key[0].as_str()),
        None => 0,
    };
    let rows: Vec<FileRow> = files.into_iter().skip(start).take(usize::try_from(page.fetch()).unwrap_or(1)).collect();
    let path = format!("/api/v1/deployments/{}/files", id.as_str());
    let (headers, rows) = page.finish(rows, &path, |f| vec![f.path.clone()]);
    Ok((headers, Json(rows.iter().map(views::file).collect())))
}

/// The npm packages a build installed, `name@version`, from npm's layout
/// (`node_modules/.deno/<name>@<version>/…`; a scope's `/` is `+` there).
fn npm_packages(files: &[FileRow]) -> Vec<String> {
    let mut packages: Vec<String> = files
        .iter()
        .filter_map(|f| f.path.strip_prefix("node_modules/.deno/")?.split('/').next())
        .filter(|folder| folder.contains('@') && *folder != "node_modules")
        .map(|folder| match folder.strip_prefix('@') {
            Some(scoped) => format!("@{}", scoped.replacen('+', "/", 1)),
            None => folder.to_owned(),
        })
        .collect();
    packages.sort();
    packages.dedup();
    packages
}

pub(crate) async fn get(
    State(cp): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<wire::Deployment>, ApiError> {
    let id = validate::deployment_id(&id).ok_or_else(|| deployment_not_found(&id))?;
    let mut conn = cp.store.read().await?;
    let deployment =
        deployments::get(&mut conn, id.as_str()).await?.ok_or_else(|| deployment_not_found(id.as_str()))?;
    Ok(Json(views::deployment(&cp, &deployment)))
}
