//! `isocloud tokens create|list|revoke` and `isocloud audit`: scoped API
//! tokens (admin only) and the audit log of every mutation.

use clap::Subcommand;
use reqwest::Method;

use super::api::{Api, AuditEntry, CallError, CreatedToken, Token};
use super::error::ClientError;
use super::output::{sanitize, short_time, table};

#[derive(Subcommand, Debug)]
pub enum TokensCommand {
    /// Create a token; its secret is printed once and never shown again.
    Create {
        /// admin, project:NAME:deploy (upload, deploy, promote, roll back, read) or project:NAME:read.
        #[arg(long, value_name = "SCOPE")]
        scope: String,
        /// A name to tell it by in lists and the audit log [default: made up from the scope].
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Expire after this long: a number and s, m, h or d (e.g. 30d) [default: never].
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_s)]
        expires: Option<u64>,
    },
    /// List every token (never their secrets).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its id (from `isocloud tokens list`); it is refused from its next request.
    Revoke { id: String },
}

/// `30d`, `12h`, `15m`, `90s` → seconds.
pub fn parse_duration_s(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration such as 30d, 12h or 90m"))?;
    let unit_s = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d (e.g. 30d)")),
    };
    match number.checked_mul(unit_s) {
        Some(0) | None => Err(format!("{text:?} must be above 0 and below ten years")),
        Some(s) => Ok(s),
    }
}

impl Api {
    pub async fn create_token(
        &self,
        scope: &str,
        name: Option<&str>,
        expires_in_s: Option<u64>,
    ) -> Result<CreatedToken, CallError> {
        let body = isocloud_api::NewTokenBody { scope: scope.to_owned(), name: name.map(str::to_owned), expires_in_s };
        self.json(self.request(Method::POST, &["tokens"])?.json(&body)).await
    }

    /// Every token, following the list's pages.
    pub async fn tokens(&self) -> Result<Vec<Token>, CallError> {
        let first = self.request(Method::GET, &["tokens"])?.query(&[("limit", 1000)]);
        self.pages(first, usize::MAX).await
    }

    pub async fn revoke_token(&self, id: &str) -> Result<(), CallError> {
        self.empty(self.request(Method::DELETE, &["tokens", id])?).await
    }

    /// The newest `limit` audit entries, of one project when given.
    pub async fn audit(&self, project: Option<&str>, limit: u32) -> Result<Vec<AuditEntry>, CallError> {
        let mut first = self.request(Method::GET, &["audit"])?.query(&[("limit", limit.clamp(1, 1000))]);
        if let Some(project) = project {
            first = first.query(&[("project", project)]);
        }
        self.pages(first, limit as usize).await
    }
}

pub async fn run(api: Api, command: TokensCommand) -> Result<(), ClientError> {
    match command {
        TokensCommand::Create { scope, name, expires } => {
            let created = api.create_token(&scope, name.as_deref(), expires).await?;
            let token = &created.token;
            eprintln!(
                "created token {} ({}), scope {}{}",
                sanitize(&token.name),
                token.id,
                sanitize(&token.scope),
                token.expires_at.as_deref().map(|at| format!(", expires {at}")).unwrap_or_default()
            );
            eprintln!("the secret below is shown this once and cannot be shown again; store it now:");
            println!("{}", created.secret);
        }
        TokensCommand::List { json } => {
            let tokens = api.tokens().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        sanitize(&t.name).into_owned(),
                        sanitize(&t.scope).into_owned(),
                        t.status.clone(),
                        t.expires_at.as_deref().map(short_time).unwrap_or_else(|| "never".into()),
                        t.last_used_at.as_deref().map(short_time).unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print!("{}", table(&["ID", "NAME", "SCOPE", "STATUS", "EXPIRES", "LAST USED"], &rows));
        }
        TokensCommand::Revoke { id } => {
            api.revoke_token(&id).await?;
            println!("revoked token {}", sanitize(&id));
            eprintln!("it is refused from its next request, on every node");
        }
    }
    Ok(())
}

pub async fn audit(api: Api, project: Option<&str>, limit: u32, json: bool) -> Result<(), ClientError> {
    let entries = api.audit(project, limit).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                short_time(&e.at),
                sanitize(&e.token_name).into_owned(),
                sanitize(&e.action).into_owned(),
                format!("{} {}", e.status, e.outcome),
                sanitize(&e.target).into_owned(),
            ]
        })
        .collect();
    print!("{}", table(&["WHEN", "TOKEN", "ACTION", "OUTCOME", "TARGET"], &rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_s("30d"), Ok(30 * 86_400));
        assert_eq!(parse_duration_s("12h"), Ok(12 * 3600));
        assert_eq!(parse_duration_s("90m"), Ok(5400));
        assert_eq!(parse_duration_s("5s"), Ok(5));
        for bad in ["", "d", "30", "30y", "0d", "-1d", "99999999999999999999d"] {
            assert!(parse_duration_s(bad).is_err(), "{bad}");
        }
    }
}
