//! Who may call which route: the access table ([`RULES`], one entry per
//! method and route with the reason for its rule) and the middleware that
//! applies it to every authenticated request ([`guard`]): the bearer token
//! looked up by its SHA-256 (on every request, no cache: a revocation holds
//! at the next request on every node sharing the store), refused when
//! unknown, expired or revoked (401, each with its own code), then checked
//! against the route's rule (403 naming the scope needed). A route missing
//! from the table is refused, admin tokens included: deny by default.
//! Every mutation is written to the audit log with how it ended.
//!
//! What `deploy` allows is what a CI pipeline needs to ship one project:
//! upload blobs, create deployments, promote and roll back, and read the
//! project (its deployments, builds, logs, usage, env var names). Not env
//! writes (secrets are set by people, and a changed secret moves every later
//! deployment), not git settings (the webhook secret, and what builds), not
//! domains or certificates (they move traffic between projects), not
//! renaming or deleting the project, not limits, tokens or the audit log.
//! `read` is the reading half of that; it mutates nothing.

use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sqlx::AnyConnection;

use super::AppState;
use crate::error::ApiError;
use crate::store::audit::{self, NewEntry};
use crate::store::tokens::{self, Kind, TokenRow};
use crate::time::{format_ms, now_ms};

/// What a route asks of the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// No token at all: the route authenticates the request itself.
    Public,
    /// Any valid token.
    Anyone,
    /// `read` (or `deploy`) of the route's project, or admin.
    Read,
    /// `deploy` of the route's project, or admin.
    Deploy,
    /// `deploy` of any project, or admin: the route belongs to no project.
    AnyDeploy,
    Admin,
}

/// Which path parameter names the project a rule is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Subject {
    None,
    /// `{name}`: a project's name.
    Project,
    /// `{id}`: a deployment's id (its project).
    Deployment,
}

#[derive(Debug)]
pub(crate) struct Rule {
    pub method: &'static str,
    /// As mounted under `/api/v1`.
    pub path: &'static str,
    pub need: Need,
    pub subject: Subject,
    /// The audit log's name for it; `None` for a route that changes nothing.
    pub action: Option<&'static str>,
    pub why: &'static str,
}

const fn rule(
    method: &'static str,
    path: &'static str,
    need: Need,
    subject: Subject,
    action: Option<&'static str>,
    why: &'static str,
) -> Rule {
    Rule { method, path, need, subject, action, why }
}

use Need::*;
use Subject::{Deployment as Dep, None as NoSubject, Project as Proj};

/// Every route of `/api/v1`, and who may call it.
pub(crate) const RULES: &[Rule] = &[
    rule("GET", "/whoami", Anyone, NoSubject, None, "a token may learn its own name and scope"),
    rule(
        "GET",
        "/projects",
        Anyone,
        NoSubject,
        None,
        "the answer is filtered: a project token sees its own project only",
    ),
    rule(
        "POST",
        "/projects",
        Admin,
        NoSubject,
        Some("project.create"),
        "a project token is bound to one existing project",
    ),
    rule("GET", "/projects/{name}", Read, Proj, None, "reading the project is the least a project token does"),
    rule(
        "PATCH",
        "/projects/{name}",
        Admin,
        Proj,
        Some("project.rename"),
        "renaming moves every URL of the project; not CI's to do",
    ),
    rule(
        "DELETE",
        "/projects/{name}",
        Admin,
        Proj,
        Some("project.delete"),
        "deleting loses every deployment, log and env var",
    ),
    rule("GET", "/projects/{name}/deployments", Read, Proj, None, "a CI job checks what it deployed"),
    rule("POST", "/projects/{name}/deployments", Deploy, Proj, Some("deployment.create"), "what a deploy token is for"),
    rule(
        "POST",
        "/projects/{name}/promote",
        Deploy,
        Proj,
        Some("project.promote"),
        "CI ships to production: deploy --prod promotes",
    ),
    rule(
        "POST",
        "/projects/{name}/rollback",
        Deploy,
        Proj,
        Some("project.rollback"),
        "the undo of a promotion, with the same power",
    ),
    rule("GET", "/projects/{name}/env", Read, Proj, None, "names and times only; values are never shown"),
    rule(
        "PUT",
        "/projects/{name}/env/{env_name}",
        Admin,
        Proj,
        Some("env.set"),
        "secrets are set by people, and reach every later deployment",
    ),
    rule("DELETE", "/projects/{name}/env/{env_name}", Admin, Proj, Some("env.delete"), "as setting one"),
    rule("GET", "/projects/{name}/logs", Read, Proj, None, "a project's own logs"),
    rule("GET", "/projects/{name}/limits", Read, Proj, None, "what the control plane keeps for the project, no secret"),
    rule(
        "PUT",
        "/projects/{name}/limits",
        Admin,
        Proj,
        Some("limits.set"),
        "the operator's bounds on what a tenant may store",
    ),
    rule("GET", "/projects/{name}/usage", Read, Proj, None, "a project's own usage"),
    rule("GET", "/projects/{name}/analytics", Read, Proj, None, "a project's own usage, charted"),
    rule("PUT", "/projects/{name}/git", Admin, Proj, Some("git.set"), "sets the webhook secret and what builds"),
    rule("DELETE", "/projects/{name}/git", Admin, Proj, Some("git.delete"), "as setting it"),
    rule(
        "POST",
        "/projects/{name}/git/webhook",
        Public,
        Proj,
        None,
        "signed with the project's webhook secret instead of a token",
    ),
    rule(
        "POST",
        "/blobs/missing",
        AnyDeploy,
        NoSubject,
        None,
        "the first step of a deploy; blobs belong to no project (it tells which hashes exist: content-addressed dedupe)",
    ),
    rule("PUT", "/blobs/{hash}", AnyDeploy, NoSubject, Some("blob.upload"), "the upload step of a deploy"),
    rule("GET", "/deployments/{id}", Read, Dep, None, "the deployment's project decides"),
    rule("GET", "/deployments/{id}/logs", Read, Dep, None, "the deployment's project decides"),
    rule("GET", "/deployments/{id}/build", Read, Dep, None, "the deployment's project decides"),
    rule("GET", "/deployments/{id}/files", Read, Dep, None, "the deployment's project decides (paths and sizes)"),
    rule("GET", "/domains", Admin, NoSubject, None, "lists every project's domains"),
    rule("POST", "/domains", Admin, NoSubject, Some("domain.create"), "domains move traffic between projects"),
    rule("GET", "/domains/{domain}", Admin, NoSubject, None, "as the list"),
    rule("PATCH", "/domains/{domain}", Admin, NoSubject, Some("domain.attach"), "moves a host to another project"),
    rule("DELETE", "/domains/{domain}", Admin, NoSubject, Some("domain.delete"), "as attaching"),
    rule("POST", "/domains/{domain}/verify", Admin, NoSubject, Some("domain.verify"), "as attaching"),
    rule("PUT", "/domains/{domain}/certificate", Admin, NoSubject, Some("certificate.set"), "a private key for a host"),
    rule("DELETE", "/domains/{domain}/certificate", Admin, NoSubject, Some("certificate.delete"), "as setting one"),
    rule("GET", "/tokens", Admin, NoSubject, None, "who holds which access"),
    rule("POST", "/tokens", Admin, NoSubject, Some("token.create"), "minting access is the admin's alone"),
    rule("DELETE", "/tokens/{id}", Admin, NoSubject, Some("token.revoke"), "as minting"),
    rule("GET", "/audit", Admin, NoSubject, None, "every token's actions"),
];

/// The rule for a request, by method and route (HEAD as GET).
pub(crate) fn rule_for(method: &Method, path: &str) -> Option<&'static Rule> {
    let method = if method == Method::HEAD { "GET" } else { method.as_str() };
    RULES.iter().find(|r| r.method == method && r.path == path)
}

/// The token a request was made with, put into it by [`guard`].
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub TokenRow);

impl Caller {
    /// The project a project token is bound to; `None` for admin.
    pub fn project_id(&self) -> Option<&str> {
        match self.0.kind {
            Kind::Admin => None,
            Kind::Deploy | Kind::Read => Some(self.0.project_id.as_deref().unwrap_or("")),
        }
    }
}

/// Put into a response by a handler that wrote its own audit entry in its
/// transaction: [`guard`] writes none.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AuditedInTx;

/// Put into a response by a handler: what the call made or touched, for the
/// audit entry's target (the path alone does not say, e.g. a new project's name).
#[derive(Debug, Clone)]
pub(crate) struct AuditNote(pub String);

/// The audit entry for `caller` doing `action` on `target`.
pub(crate) fn entry(
    caller: &TokenRow,
    action: &str,
    target: String,
    project_id: Option<String>,
    status: u16,
) -> NewEntry {
    NewEntry {
        token_id: caller.id.clone(),
        token_name: caller.name.clone(),
        action: action.to_owned(),
        target,
        project_id,
        status,
    }
}

/// `Authorization: Bearer <token>` → the token's row, or why not.
async fn caller_of(conn: &mut AnyConnection, headers: &HeaderMap, now: i64) -> Result<TokenRow, ApiError> {
    let token = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let Some(token) = token.filter(|t| !t.is_empty() && t.len() <= 512) else {
        return Err(ApiError::Unauthorized("missing `Authorization: Bearer <token>`".into()));
    };
    let hash = crate::ids::sha256_hex(token.as_bytes());
    let Some(row) = tokens::by_hash(conn, &hash).await? else {
        return Err(ApiError::Unauthorized("unknown token".into()));
    };
    if let Some(at) = row.revoked_at_ms {
        return Err(ApiError::TokenRevoked(format!(
            "token {:?} was revoked at {}; ask an admin for a new one",
            row.name,
            format_ms(at)
        )));
    }
    if let Some(at) = row.expires_at_ms.filter(|at| *at <= now) {
        return Err(ApiError::TokenExpired(format!(
            "token {:?} expired at {}; ask an admin for a new one",
            row.name,
            format_ms(at)
        )));
    }
    Ok(row)
}

/// The project the route's path names: its id (`None`: no such project),
/// and the name to show.
async fn subject_project(
    conn: &mut AnyConnection,
    subject: Subject,
    params: &[(String, String)],
) -> Result<(Option<String>, String), ApiError> {
    let param = |key: &str| params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or("");
    match subject {
        Subject::None => Ok((None, String::new())),
        Subject::Project => {
            let name = param("name");
            Ok((tokens::project_id_by_name(conn, name).await?, name.to_owned()))
        }
        Subject::Deployment => {
            let id = tokens::project_of_deployment(conn, param("id")).await?;
            let name = match &id {
                Some(id) => crate::store::projects::by_id(conn, id).await?.map(|p| p.name),
                None => None,
            };
            Ok((id, name.unwrap_or_else(|| "NAME".to_owned())))
        }
    }
}

/// Whether `token` may do what `rule` asks on the project `project_id`.
fn allows(token: &TokenRow, rule: &Rule, project_id: Option<&str>) -> bool {
    let own = token.project_id.is_some() && token.project_id.as_deref() == project_id;
    match (rule.need, token.kind) {
        (Public | Anyone, _) | (_, Kind::Admin) => true,
        (Admin, _) => false,
        (AnyDeploy, kind) => kind == Kind::Deploy,
        (Deploy, kind) => kind == Kind::Deploy && own,
        (Read, _) => own,
    }
}

fn forbidden(token: &TokenRow, rule: &Rule, project_name: &str) -> ApiError {
    let needed = match rule.need {
        Read => format!("project:{project_name}:read (or :deploy, or admin)"),
        Deploy => format!("project:{project_name}:deploy (or admin)"),
        AnyDeploy => "a project:NAME:deploy scope (or admin)".to_owned(),
        _ => "admin".to_owned(),
    };
    ApiError::Forbidden(format!(
        "this token's scope is {}; {} {} needs {needed} ({})",
        token.scope(),
        rule.method,
        rule.path,
        rule.why,
    ))
}

/// Authenticates, authorises by [`RULES`], runs the handler, audits.
pub(crate) async fn guard(State(cp): State<AppState>, request: Request, next: Next) -> Response {
    let now = now_ms();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().strip_prefix("/api/v1").unwrap_or(m.as_str()).to_owned())
        .unwrap_or_default();
    let Some(rule) = rule_for(request.method(), &route) else {
        // Deny by default: a route nobody wrote a rule for.
        let message =
            format!("{} {route} has no rule in the access table; it is refused until one is written", request.method());
        tracing::error!(target: "isocloud::controlplane", %message, "API route without an access rule");
        return ApiError::Forbidden(message).into_response();
    };
    if rule.need == Public {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let params: Vec<(String, String)> = match RawPathParams::from_request_parts(&mut parts, &()).await {
        Ok(params) => params.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
        Err(_) => Vec::new(),
    };
    let headers = parts.headers.clone();
    let mut request = Request::from_parts(parts, body);
    let target = request.uri().path().strip_prefix("/api/v1").unwrap_or(request.uri().path()).to_owned();

    let checked = async {
        let mut conn = cp.store.read().await.map_err(|e| (ApiError::from(e), None))?;
        let token = caller_of(&mut conn, &headers, now).await.map_err(|e| (e, None))?;
        let known = |e: ApiError, project_id: Option<String>| (e, Some((token.clone(), project_id)));
        // The project is looked up for a project token's check, and for any
        // mutation (the audit entry names it, and may be filtered by it).
        let wanted = token.kind != Kind::Admin || rule.action.is_some();
        let (project_id, project_name) = if wanted && rule.subject != Subject::None {
            subject_project(&mut conn, rule.subject, &params).await.map_err(|e| known(e, None))?
        } else {
            (None, String::new())
        };
        if !allows(&token, rule, project_id.as_deref()) {
            return Err(known(forbidden(&token, rule, &project_name), project_id));
        }
        Ok::<_, (ApiError, Option<(TokenRow, Option<String>)>)>((token.clone(), project_id))
    }
    .await;

    let (token, project_id, response) = match checked {
        Ok((token, project_id)) => {
            if token.last_used_at_ms.is_none_or(|at| now - at >= tokens::LAST_USED_RESOLUTION_MS) {
                touch_later(&cp, &token.id, now);
            }
            request.extensions_mut().insert(Caller(token.clone()));
            let response = next.run(request).await;
            (token, project_id, response)
        }
        // Unknown or malformed tokens are nobody: nothing to audit.
        Err((error, None)) => return error.into_response(),
        Err((error, Some((token, project_id)))) => (token, project_id, error.into_response()),
    };
    if let Some(action) = rule.action
        && response.extensions().get::<AuditedInTx>().is_none()
    {
        let target = match response.extensions().get::<AuditNote>() {
            Some(AuditNote(note)) => format!("{target} ({note})"),
            None => target,
        };
        let entry = entry(&token, action, target, project_id, response.status().as_u16());
        record(&cp, &entry, now).await;
    }
    response
}

/// Writes an audit entry after the change it records committed: a failure
/// is logged with the entry (the change stands).
async fn record(cp: &AppState, entry: &NewEntry, now: i64) {
    let written = async {
        let mut tx = cp.store.write().await?;
        audit::insert(&mut tx, entry, now).await?;
        tx.commit().await
    }
    .await;
    if let Err(e) = written {
        tracing::error!(target: "isocloud::controlplane", error = %e, ?entry, "writing an audit entry failed");
    }
}

/// Notes the token's use, off the request's path.
fn touch_later(cp: &AppState, token_id: &str, now: i64) {
    let cp = std::sync::Arc::clone(cp);
    let token_id = token_id.to_owned();
    tokio::spawn(async move {
        let touched = async {
            let mut tx = cp.store.write().await?;
            tokens::touch(&mut tx, &token_id, now).await?;
            tx.commit().await
        }
        .await;
        if let Err(e) = touched {
            tracing::warn!(target: "isocloud::controlplane", error = %e, "noting a token's last use failed");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The routes `api::router` mounts, read from its source: each
    /// `.route("PATH", get(…).post(…))` as (METHOD, PATH).
    fn mounted_routes() -> Vec<(String, String)> {
        let source = include_str!("mod.rs");
        let router = source.split("pub(crate) fn router").nth(1).expect("api::router");
        let router = router.split("\n}\n").next().unwrap();
        let mut routes = Vec::new();
        for chunk in router.split(".route(\"").skip(1) {
            let (path, rest) = chunk.split_once('"').unwrap();
            let call = rest.split(".route(").next().unwrap();
            for method in ["get", "post", "put", "patch", "delete"] {
                if call.contains(&format!("{method}(")) {
                    routes.push((method.to_uppercase(), path.to_owned()));
                }
            }
        }
        routes
    }

    #[test]
    fn every_mounted_route_has_a_rule_and_every_rule_a_route() {
        let mounted = mounted_routes();
        // The probe reads the router: the routes it must find are there.
        assert!(mounted.contains(&("POST".into(), "/projects/{name}/deployments".into())), "{mounted:?}");
        assert!(mounted.len() >= 30, "{mounted:?}");
        for (method, path) in &mounted {
            assert!(
                RULES.iter().any(|r| r.method == method && r.path == path),
                "{method} {path} is mounted but has no access rule"
            );
        }
        for rule in RULES {
            assert!(
                mounted.iter().any(|(m, p)| m == rule.method && p == rule.path),
                "{} {} has a rule but is not mounted",
                rule.method,
                rule.path
            );
        }
    }

    #[test]
    fn rules_are_consistent() {
        for (i, rule) in RULES.iter().enumerate() {
            let name = format!("{} {}", rule.method, rule.path);
            assert!(!rule.why.is_empty(), "{name}: a reason");
            assert!(RULES[..i].iter().all(|r| (r.method, r.path) != (rule.method, rule.path)), "{name} twice");
            if matches!(rule.need, Read | Deploy) {
                assert_ne!(rule.subject, Subject::None, "{name}: a project rule names its project");
            }
            // Every mutation is audited (the one POST that reads aside).
            let reads = rule.method == "GET" || rule.path == "/blobs/missing" || rule.need == Public;
            assert_eq!(rule.action.is_none(), reads, "{name}: audited exactly when it changes something");
            // A read token mutates nothing.
            if rule.need == Read {
                assert_eq!(rule.method, "GET", "{name}: read rules are reads");
            }
        }
        // What stays admin-only whatever else changes.
        for (method, path) in [
            ("PUT", "/projects/{name}/limits"),
            ("PUT", "/domains/{domain}/certificate"),
            ("POST", "/tokens"),
            ("DELETE", "/tokens/{id}"),
            ("GET", "/audit"),
            ("PUT", "/projects/{name}/env/{env_name}"),
        ] {
            assert_eq!(rule_for(&method.parse().unwrap(), path).unwrap().need, Admin, "{method} {path}");
        }
    }

    fn token(kind: Kind, project: Option<&str>) -> TokenRow {
        TokenRow {
            id: "t".into(),
            name: "ci".into(),
            kind,
            project_id: project.map(str::to_owned),
            project_name: project.map(str::to_owned),
            created_at_ms: 0,
            expires_at_ms: None,
            revoked_at_ms: None,
            last_used_at_ms: None,
        }
    }

    #[test]
    fn scopes_allow_what_the_table_says() {
        let rule = |m: &str, p: &str| rule_for(&m.parse().unwrap(), p).unwrap();
        let deploy = rule("POST", "/projects/{name}/deployments");
        let read = rule("GET", "/projects/{name}/logs");
        let blobs = rule("PUT", "/blobs/{hash}");
        let admin = rule("PUT", "/projects/{name}/limits");
        let a_deploy = token(Kind::Deploy, Some("a"));
        let a_read = token(Kind::Read, Some("a"));
        let root = token(Kind::Admin, None);
        assert!(allows(&root, deploy, Some("b")) && allows(&root, admin, Some("a")));
        assert!(allows(&a_deploy, deploy, Some("a")) && allows(&a_deploy, read, Some("a")));
        assert!(allows(&a_deploy, blobs, None));
        assert!(!allows(&a_deploy, deploy, Some("b")) && !allows(&a_deploy, read, Some("b")));
        assert!(!allows(&a_deploy, deploy, None), "a project that does not exist is nobody's");
        assert!(!allows(&a_deploy, admin, Some("a")));
        assert!(allows(&a_read, read, Some("a")));
        assert!(!allows(&a_read, deploy, Some("a")) && !allows(&a_read, blobs, None));
        // A deleted project's token (its id no longer names a project) reaches none.
        assert!(!allows(&token(Kind::Read, None), read, None));
        let message = forbidden(&a_read, deploy, "a").to_string();
        assert!(message.contains("needs project:a:deploy"), "{message}");
    }
}
