//! `isocloud projects list|create|rename|delete`.

use clap::Subcommand;

use super::api::Api;
use super::error::{ClientError, PromptError};
use super::output::{sanitize, short_time, table};
use super::prompt;

#[derive(Subcommand, Debug)]
pub enum ProjectsCommand {
    /// List the projects.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create a project (1–63 of a-z, 0-9 and '-').
    Create { name: String },
    /// Rename a project; its URLs change with its name.
    Rename { name: String, new_name: String },
    /// Delete a project with its deployments, env vars, logs and usage (its domains are detached).
    Delete {
        name: String,
        /// Do not ask; needed when stdin is not a terminal.
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

pub async fn run(api: Api, command: ProjectsCommand) -> Result<(), ClientError> {
    match command {
        ProjectsCommand::List { json } => {
            let projects = api.projects().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&projects)?);
                return Ok(());
            }
            if projects.is_empty() {
                eprintln!("no projects yet: create one with `isocloud projects create NAME`");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = projects
                .iter()
                .map(|p| {
                    vec![
                        sanitize(&p.name).into_owned(),
                        p.production_deployment_id.clone().unwrap_or_else(|| "-".into()),
                        sanitize(p.production_url.as_deref().unwrap_or("-")).into_owned(),
                        short_time(&p.updated_at),
                    ]
                })
                .collect();
            print!("{}", table(&["NAME", "PRODUCTION", "URL", "UPDATED"], &rows));
        }
        ProjectsCommand::Create { name } => {
            let project = api.create_project(&name).await?;
            println!("created project {}", sanitize(&project.name));
            eprintln!("deploy to it with `isocloud deploy --project {}`", sanitize(&project.name));
        }
        ProjectsCommand::Rename { name, new_name } => {
            let project = api.rename_project(&name, &new_name).await?;
            println!("renamed project {name} to {}", sanitize(&project.name));
            if let Some(url) = &project.production_url {
                eprintln!("its production URL is now {}", sanitize(url));
            }
        }
        ProjectsCommand::Delete { name, yes } => {
            if !yes {
                if !prompt::stdin_is_terminal() {
                    return Err(PromptError::NoTerminal { name }.into());
                }
                eprintln!(
                    "This deletes project `{name}` with all its deployments, env vars, logs and usage; \
                     its domains are detached."
                );
                let answer = prompt::ask("Type the project's name to confirm: ")?;
                if answer != name {
                    return Err(PromptError::NotConfirmed { name }.into());
                }
            }
            api.delete_project(&name).await?;
            println!("deleted project {name}");
        }
    }
    Ok(())
}
