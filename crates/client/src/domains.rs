//! `isocloud domains …`: custom domains, their verification and certificates.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use clap::Subcommand;

use super::api::{Api, Domain};
use super::error::{ClientError, FilesError, InputError};
use super::output::{sanitize, short_time, table};

/// PEM files are a few KB; the bound keeps a wrong path (a device, a
/// huge file) from being read whole.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

#[derive(Subcommand, Debug)]
pub enum DomainsCommand {
    /// List the domains.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add a domain to a project; prints how to prove you control it.
    Add {
        domain: String,
        #[arg(long, short = 'p', value_name = "NAME")]
        project: String,
        /// Print JSON instead of instructions.
        #[arg(long)]
        json: bool,
    },
    /// Check the DNS TXT record or the HTTP token; fails while unverified.
    Verify {
        domain: String,
        /// Print JSON (and exit 0 either way).
        #[arg(long)]
        json: bool,
    },
    /// Attach a domain to a project (moving it from another).
    Attach {
        domain: String,
        #[arg(long, short = 'p', value_name = "NAME")]
        project: String,
    },
    /// Detach a domain from its project; it stops routing.
    Detach { domain: String },
    /// Upload a TLS certificate and key (PEM) for a domain, or --remove it.
    Cert {
        domain: String,
        /// The certificate chain, PEM.
        #[arg(long, value_name = "FILE", requires = "key", required_unless_present = "remove")]
        cert: Option<PathBuf>,
        /// The private key, PEM.
        #[arg(long, value_name = "FILE", requires = "cert")]
        key: Option<PathBuf>,
        /// Remove the domain's certificate instead.
        #[arg(long, conflicts_with_all = ["cert", "key"])]
        remove: bool,
    },
    /// Delete a domain.
    Delete { domain: String },
}

/// The ACME column: the last order's outcome, the next attempt, and the
/// ACME server's error of a failure (it comes from a remote server:
/// sanitised like every other cell).
fn acme_cell(acme: Option<&isocloud_api::AcmeStatus>) -> String {
    let Some(acme) = acme else { return "-".into() };
    let next = short_time(&acme.next_attempt_at);
    match (acme.status.as_str(), &acme.error) {
        ("failed", Some(error)) => {
            format!("failed {}x, retry {next}: {}", acme.failures, sanitize(error))
        }
        ("valid", _) => format!("valid, renew {next}"),
        (status, _) => format!("{}, next {next}", sanitize(status)),
    }
}

pub async fn run(api: Api, command: DomainsCommand) -> Result<(), ClientError> {
    match command {
        DomainsCommand::List { json } => {
            let domains = api.domains().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&domains)?);
            } else if domains.is_empty() {
                eprintln!("no domains yet: add one with `isocloud domains add DOMAIN --project NAME`");
            } else {
                let rows: Vec<Vec<String>> = domains
                    .iter()
                    .map(|d| {
                        vec![
                            sanitize(&d.domain).into_owned(),
                            sanitize(d.project.as_deref().unwrap_or("-")).into_owned(),
                            if d.verified { "yes" } else { "no" }.to_string(),
                            d.certificate.as_ref().map_or("-".to_string(), |c| {
                                format!("{} until {}", sanitize(&c.source), short_time(&c.not_after))
                            }),
                            acme_cell(d.acme.as_ref()),
                        ]
                    })
                    .collect();
                print!("{}", table(&["DOMAIN", "PROJECT", "VERIFIED", "CERTIFICATE", "ACME"], &rows));
            }
        }
        DomainsCommand::Add { domain, project, json } => {
            let domain = api.add_domain(&normalize(&domain), &project).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&domain)?);
            } else {
                println!("added {} to project {project}", sanitize(&domain.domain));
                print_instructions(&domain);
            }
        }
        DomainsCommand::Verify { domain, json } => {
            let domain = api.verify_domain(&normalize(&domain)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&domain)?);
            } else if domain.verified {
                println!("{} is verified", sanitize(&domain.domain));
            } else {
                print_instructions(&domain);
                return Err(ClientError::NotVerified { domain: sanitize(&domain.domain).into_owned() });
            }
        }
        DomainsCommand::Attach { domain, project } => {
            let domain = api.attach_domain(&normalize(&domain), Some(&project)).await?;
            println!("{} now serves project {project}", sanitize(&domain.domain));
            if !domain.verified {
                eprintln!("it routes once verified: `isocloud domains verify {}`", sanitize(&domain.domain));
            }
        }
        DomainsCommand::Detach { domain } => {
            let domain = api.attach_domain(&normalize(&domain), None).await?;
            println!("{} is detached", sanitize(&domain.domain));
        }
        DomainsCommand::Cert { domain, cert, key, remove } => {
            let domain = normalize(&domain);
            if remove {
                api.delete_certificate(&domain).await?;
                println!("removed the certificate of {domain}");
                return Ok(());
            }
            let (Some(cert), Some(key)) = (cert, key) else { return Err(InputError::CertificateFiles.into()) };
            let answer = api.put_certificate(&domain, &read_pem(&cert)?, &read_pem(&key)?).await?;
            match &answer.certificate {
                Some(c) => println!(
                    "certificate of {domain} stored: {} (until {})",
                    sanitize(&c.names.join(", ")),
                    short_time(&c.not_after)
                ),
                None => println!("certificate of {domain} stored"),
            }
        }
        DomainsCommand::Delete { domain } => {
            let domain = normalize(&domain);
            api.delete_domain(&domain).await?;
            println!("deleted {domain}");
        }
    }
    Ok(())
}

/// Domains are lowercase without the root dot on the server.
fn normalize(domain: &str) -> String {
    domain.trim().trim_end_matches('.').to_ascii_lowercase()
}

fn print_instructions(domain: &Domain) {
    let name = sanitize(&domain.domain);
    let v = &domain.verification;
    println!("Prove you control {name} with either:");
    println!("  a DNS TXT record:  {}  TXT  \"{}\"", sanitize(&v.txt_name), sanitize(&v.txt_value));
    println!("  or an HTTP answer: {}  with the body  {}", sanitize(&v.http_url), sanitize(&v.http_body));
    println!("then run: isocloud domains verify {name}");
}

fn read_pem(path: &Path) -> Result<String, FilesError> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM_BYTES).read_to_string(&mut text))
        .map_err(|source| FilesError::Read { path: path.to_owned(), source })?;
    if !text.contains("-----BEGIN ") {
        return Err(FilesError::NotPem { path: path.to_owned() });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    #[test]
    fn domains_are_normalised() {
        assert_eq!(super::normalize(" WWW.Example.com. "), "www.example.com");
    }
}
