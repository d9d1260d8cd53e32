//! `isocloud-client`: the client commands of the `isocloud` CLI (login,
//! projects, deploy, promote, rollback, deployments, env, domains, logs,
//! tokens, audit).
//! This crate owns speaking the control plane's HTTP API
//! (`docs/control-plane-api.md`) for them: the clap arguments, saved
//! credentials, walking and uploading a folder, and what the terminal shows.
//! It must not hold server logic (the API's rules live in the control plane)
//! nor touch the runner: the binary parses `ClientCommand` beside its runner
//! commands and hands it to [`run`] before any runner setting is read.

#![forbid(unsafe_code)]

mod analytics;
mod api;
mod credentials;
mod deploy;
mod deployments;
mod domains;
mod env;
mod error;
mod git;
mod glob;
mod login;
mod logs;
mod output;
mod projects;
mod prompt;
mod time;
mod tokens;
mod walk;

use clap::{Args, Subcommand};

use api::Api;
use error::ClientError;

/// Where to reach the control plane; on every client command.
#[derive(Args, Debug, Clone, Default)]
pub struct ConnectionFlags {
    /// The control plane, e.g. http://127.0.0.1:8081 [default: the one `isocloud login` saved].
    #[arg(long, env = "ISOCLOUD_URL", value_name = "URL", global = true)]
    pub url: Option<String>,
    /// An API token [default: the one `isocloud login` saved for that URL].
    #[arg(long, env = "ISOCLOUD_TOKEN", value_name = "TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Check a token against a control plane and save both for the other commands.
    Login(login::LoginArgs),
    /// List, create, rename or delete projects.
    Projects {
        #[command(flatten)]
        connection: ConnectionFlags,
        #[command(subcommand)]
        command: projects::ProjectsCommand,
    },
    /// Upload a folder (only the files the server lacks) and create a deployment of it.
    Deploy(deploy::DeployArgs),
    /// Make a deployment the project's production deployment.
    Promote {
        #[command(flatten)]
        connection: ConnectionFlags,
        #[arg(long, short = 'p', value_name = "NAME")]
        project: String,
        deployment_id: String,
    },
    /// Go back to the previous production deployment, or to a given earlier one.
    Rollback {
        #[command(flatten)]
        connection: ConnectionFlags,
        #[arg(long, short = 'p', value_name = "NAME")]
        project: String,
        deployment_id: Option<String>,
    },
    /// List a project's deployments, newest first.
    Deployments {
        #[command(flatten)]
        connection: ConnectionFlags,
        #[arg(long, short = 'p', value_name = "NAME")]
        project: String,
        /// At most this many.
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List, set or delete a project's env vars.
    Env {
        #[command(flatten)]
        connection: ConnectionFlags,
        #[command(subcommand)]
        command: env::EnvCommand,
    },
    /// Custom domains: add, verify, attach, detach, certificates.
    Domains {
        #[command(flatten)]
        connection: ConnectionFlags,
        #[command(subcommand)]
        command: domains::DomainsCommand,
    },
    /// Print a project's logs, or follow them.
    Logs(logs::LogsArgs),
    /// A project's traffic by time step: requests, errors, status classes, latency, CPU, bandwidth.
    Analytics(analytics::AnalyticsArgs),
    /// Scoped API tokens (admin only): create (the secret shown once), list, revoke.
    Tokens {
        #[command(flatten)]
        connection: ConnectionFlags,
        #[command(subcommand)]
        command: tokens::TokensCommand,
    },
    /// The audit log of every change made through the API, newest first (admin only).
    Audit {
        #[command(flatten)]
        connection: ConnectionFlags,
        /// Only this project's entries.
        #[arg(long, short = 'p', value_name = "NAME")]
        project: Option<String>,
        /// At most this many.
        #[arg(long, value_name = "N", default_value_t = 50)]
        limit: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a client command; errors are printed as `error: …` (exit code 1).
pub fn run(command: ClientCommand) -> std::process::ExitCode {
    // One thread is plenty for a handful of concurrent requests; hashing
    // runs on the blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", output::render_error(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: ClientCommand) -> Result<(), ClientError> {
    match command {
        ClientCommand::Login(args) => login::run(args).await,
        ClientCommand::Projects { connection, command } => projects::run(connect(&connection)?, command).await,
        ClientCommand::Deploy(args) => deploy::run(args).await,
        ClientCommand::Promote { connection, project, deployment_id } => {
            deployments::promote(connect(&connection)?, &project, &deployment_id).await
        }
        ClientCommand::Rollback { connection, project, deployment_id } => {
            deployments::rollback(connect(&connection)?, &project, deployment_id.as_deref()).await
        }
        ClientCommand::Deployments { connection, project, limit, json } => {
            deployments::list(connect(&connection)?, &project, limit, json).await
        }
        ClientCommand::Env { connection, command } => env::run(connect(&connection)?, command).await,
        ClientCommand::Domains { connection, command } => domains::run(connect(&connection)?, command).await,
        ClientCommand::Logs(args) => logs::run(args).await,
        ClientCommand::Analytics(args) => analytics::run(args).await,
        ClientCommand::Tokens { connection, command } => tokens::run(connect(&connection)?, command).await,
        ClientCommand::Audit { connection, project, limit, json } => {
            tokens::audit(connect(&connection)?, project.as_deref(), limit, json).await
        }
    }
}

/// The API client for the flags, falling back to the saved credentials.
fn connect(flags: &ConnectionFlags) -> Result<Api, ClientError> {
    let both_given = flags.url.as_deref().is_some_and(|u| !u.trim().is_empty())
        && flags.token.as_deref().is_some_and(|t| !t.trim().is_empty());
    // With both flags the file is not needed (and not read: CI has no HOME).
    let saved = if both_given { None } else { credentials::load(&credentials::config_dir()?)? };
    let connection = credentials::resolve(flags.url.as_deref(), flags.token.as_deref(), saved)?;
    Ok(Api::new(connection.url, connection.token)?)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// The client commands as the binary flattens them into its own.
    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        command: ClientCommand,
    }

    fn parse(args: &[&str]) -> Result<ClientCommand, clap::Error> {
        Cli::try_parse_from(std::iter::once("isocloud").chain(args.iter().copied())).map(|cli| cli.command)
    }

    #[test]
    fn the_command_tree_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn connection_flags_work_after_the_subcommand() {
        let Ok(ClientCommand::Projects { connection, .. }) =
            parse(&["projects", "list", "--url", "http://x:1", "--token", "t"])
        else {
            panic!("projects list")
        };
        assert_eq!(connection.url.as_deref(), Some("http://x:1"));
        assert_eq!(connection.token.as_deref(), Some("t"));
    }

    #[test]
    fn deploy_flags() {
        let Ok(ClientCommand::Deploy(args)) =
            parse(&["deploy", "-p", "hello", "--prod", "--exclude", "*.log", "--exclude", "dist", "site"])
        else {
            panic!("deploy")
        };
        assert_eq!(args.project, "hello");
        assert!(args.prod);
        assert_eq!(args.exclude, ["*.log", "dist"]);
        assert_eq!(args.dir.as_deref(), Some(std::path::Path::new("site")));
        assert!(parse(&["deploy"]).is_err(), "--project is required");
    }

    #[test]
    fn env_set_forms() {
        assert!(parse(&["env", "set", "-p", "x", "K", "V"]).is_ok());
        assert!(parse(&["env", "set", "-p", "x", "K=V"]).is_ok());
        assert!(parse(&["env", "set", "-p", "x", "K", "--stdin"]).is_ok());
        assert!(parse(&["env", "set", "-p", "x", "K", "V", "--stdin"]).is_err());
    }

    #[test]
    fn tokens_create_takes_a_scope_and_a_duration() {
        let Ok(ClientCommand::Tokens { command: tokens::TokensCommand::Create { scope, name, expires }, .. }) =
            parse(&["tokens", "create", "--scope", "project:hello:deploy", "--name", "ci", "--expires", "30d"])
        else {
            panic!("tokens create")
        };
        assert_eq!((scope.as_str(), name.as_deref(), expires), ("project:hello:deploy", Some("ci"), Some(2_592_000)));
        assert!(parse(&["tokens", "create", "--scope", "admin", "--expires", "30y"]).is_err());
        assert!(parse(&["tokens", "create"]).is_err(), "--scope is required");
        assert!(parse(&["tokens", "revoke", "abc"]).is_ok());
        assert!(parse(&["audit", "--project", "hello"]).is_ok());
    }

    #[test]
    fn domain_cert_needs_both_files_or_remove() {
        assert!(parse(&["domains", "cert", "a.example", "--cert", "c.pem", "--key", "k.pem"]).is_ok());
        assert!(parse(&["domains", "cert", "a.example", "--remove"]).is_ok());
        assert!(parse(&["domains", "cert", "a.example", "--cert", "c.pem"]).is_err());
        assert!(parse(&["domains", "cert", "a.example"]).is_err());
        assert!(parse(&["domains", "cert", "a.example", "--remove", "--key", "k.pem"]).is_err());
    }
}
