//! `isocloud env list|set|delete`: a project's env vars. Values go to the
//! server and are never printed (the server never sends them back).

use std::io::Read as _;

use clap::Subcommand;

use super::api::Api;
use super::error::{ClientError, InputError, PromptError};
use super::output::{sanitize, short_time, table};

/// The server's bound on a value (32 KiB); reading stops a little past it
/// so an oversized value gets the server's clear error, not an OOM.
const MAX_VALUE_BYTES: u64 = 64 * 1024;

#[derive(Subcommand, Debug)]
pub enum EnvCommand {
    /// List a project's env var names.
    List {
        #[arg(long, short = 'p', value_name = "NAME")]
        project: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Set an env var: `NAME VALUE`, `NAME=VALUE`, or `NAME --stdin`. It
    /// applies to deployments created from now on.
    Set {
        #[arg(long, short = 'p', value_name = "NAME")]
        project: String,
        /// NAME, or NAME=VALUE.
        #[arg(value_name = "NAME[=VALUE]")]
        name: String,
        value: Option<String>,
        /// Read the value from stdin (one trailing newline is dropped); keeps
        /// it out of the shell history and the process list.
        #[arg(long, conflicts_with = "value")]
        stdin: bool,
    },
    /// Delete an env var; deployments created from now on lack it.
    Delete {
        #[arg(long, short = 'p', value_name = "NAME")]
        project: String,
        name: String,
    },
}

pub async fn run(api: Api, command: EnvCommand) -> Result<(), ClientError> {
    match command {
        EnvCommand::List { project, json } => {
            let vars = api.env(&project).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vars)?);
            } else if vars.is_empty() {
                eprintln!("project {project} has no env vars");
            } else {
                let rows: Vec<Vec<String>> =
                    vars.iter().map(|v| vec![sanitize(&v.name).into_owned(), short_time(&v.updated_at)]).collect();
                print!("{}", table(&["NAME", "UPDATED"], &rows));
            }
        }
        EnvCommand::Set { project, name, value, stdin } => {
            let (name, value) = assignment(name, value, stdin.then(read_stdin).transpose()?)?;
            let var = api.set_env(&project, &name, &value).await?;
            println!("set {} on project {project}", sanitize(&var.name));
            eprintln!("it applies to deployments created from now on");
        }
        EnvCommand::Delete { project, name } => {
            api.delete_env(&project, &name).await?;
            println!("deleted {name} from project {project}");
            eprintln!("deployments created from now on lack it");
        }
    }
    Ok(())
}

/// `NAME VALUE`, `NAME=VALUE` or `NAME` + stdin. An env var name never
/// holds `=`, so the first `=` splits.
fn assignment(name: String, value: Option<String>, stdin: Option<String>) -> Result<(String, String), InputError> {
    let inline = name.split_once('=').map(|(n, v)| (n.to_string(), v.to_string()));
    match (inline, value, stdin) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(InputError::ValueTwice),
        (Some((name, value)), None, None) => Ok((name, value)),
        (None, Some(value), None) | (None, None, Some(value)) => Ok((name, value)),
        (None, Some(_), Some(_)) => Err(InputError::StdinAndValue),
        (None, None, None) => Err(InputError::NoValue { name }),
    }
}

fn read_stdin() -> Result<String, PromptError> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .take(MAX_VALUE_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|source| PromptError::Read { what: "the value", source })?;
    let mut value = String::from_utf8(bytes).map_err(PromptError::NotUtf8)?;
    // `echo secret | isocloud env set K --stdin` should store `secret`.
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(name: &str, value: Option<&str>, stdin: Option<&str>) -> Result<(String, String), InputError> {
        assignment(name.to_string(), value.map(str::to_string), stdin.map(str::to_string))
    }

    #[test]
    fn the_three_forms() {
        assert_eq!(a("K", Some("v=1"), None).unwrap(), ("K".into(), "v=1".into()));
        assert_eq!(a("K=v=1", None, None).unwrap(), ("K".into(), "v=1".into()));
        assert_eq!(a("K=", None, None).unwrap(), ("K".into(), "".into()));
        assert_eq!(a("K", None, Some("from stdin")).unwrap(), ("K".into(), "from stdin".into()));
        assert!(a("K", None, None).is_err());
        assert!(a("K=v", Some("w"), None).is_err());
        assert!(a("K=v", None, Some("w")).is_err());
    }
}
