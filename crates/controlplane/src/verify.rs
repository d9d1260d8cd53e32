//! Proving that whoever adds a custom domain controls it: a DNS TXT record
//! `_isocloud-challenge.<domain>` holding the domain's token, or an HTTP
//! answer with the token at
//! `http://<domain>:<port>/.well-known/isocloud-challenge/<token>`.
//!
//! Both checks are bounded in time and size. The HTTP check follows no
//! redirects, uses no proxy, and never echoes what the server answered.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::Resolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;

pub const CHALLENGE_LABEL: &str = "_isocloud-challenge";
pub const WELL_KNOWN_PATH: &str = "/.well-known/isocloud-challenge/";
const DNS_TIMEOUT: Duration = Duration::from_secs(3);
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HTTP_BODY_BYTES: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    DnsTxt,
    HttpToken,
}

/// The outcome of one verification attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Verified(Method),
    /// Why each check failed, for the log.
    NotVerified {
        dns: String,
        http: String,
    },
}

#[derive(Debug, Clone)]
pub struct Verifier {
    /// `None`: the system's resolver configuration.
    dns_server: Option<SocketAddr>,
    http_port: u16,
}

pub fn txt_name(domain: &str) -> String {
    format!("{CHALLENGE_LABEL}.{domain}")
}

pub fn http_url(domain: &str, port: u16, token: &str) -> String {
    if port == 80 {
        format!("http://{domain}{WELL_KNOWN_PATH}{token}")
    } else {
        format!("http://{domain}:{port}{WELL_KNOWN_PATH}{token}")
    }
}

impl Verifier {
    pub fn new(dns_server: Option<SocketAddr>, http_port: u16) -> Self {
        Self { dns_server, http_port }
    }

    /// DNS first, then HTTP.
    pub async fn verify(&self, domain: &str, token: &str) -> Outcome {
        let dns = match self.dns_txt(domain, token).await {
            Ok(()) => return Outcome::Verified(Method::DnsTxt),
            Err(e) => e,
        };
        let http = match self.http_token(domain, token).await {
            Ok(()) => return Outcome::Verified(Method::HttpToken),
            Err(e) => e,
        };
        Outcome::NotVerified { dns, http }
    }

    /// A fresh resolver per attempt: a user who just added the record must
    /// not wait out a cached negative answer.
    fn resolver(&self) -> Result<Resolver<TokioConnectionProvider>, String> {
        let mut builder = match self.dns_server {
            Some(server) => {
                let mut config = ResolverConfig::new();
                config.add_name_server(NameServerConfig::new(server, Protocol::Udp));
                config.add_name_server(NameServerConfig::new(server, Protocol::Tcp));
                Resolver::builder_with_config(config, TokioConnectionProvider::default())
            }
            None => Resolver::builder_tokio().map_err(|e| format!("no system resolver configuration: {e}"))?,
        };
        let options = builder.options_mut();
        options.timeout = DNS_TIMEOUT;
        options.attempts = 1;
        options.cache_size = 0;
        Ok(builder.build())
    }

    async fn dns_txt(&self, domain: &str, token: &str) -> Result<(), String> {
        let resolver = self.resolver()?;
        let name = format!("{}.", txt_name(domain));
        let lookup = tokio::time::timeout(DNS_TIMEOUT * 2, resolver.txt_lookup(name.as_str()))
            .await
            .map_err(|_| format!("TXT {name}: timed out"))?
            .map_err(|e| format!("TXT {name}: {e}"))?;
        let found = lookup.iter().any(|txt| {
            // A TXT record's character strings form one value.
            let value: Vec<u8> = txt.txt_data().iter().flat_map(|part| part.iter().copied()).collect();
            value == token.as_bytes()
        });
        if found { Ok(()) } else { Err(format!("TXT {name}: no record holds the token")) }
    }

    async fn http_token(&self, domain: &str, token: &str) -> Result<(), String> {
        let url = http_url(domain, self.http_port, token);
        let mut client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(HTTP_TIMEOUT)
            .connect_timeout(HTTP_TIMEOUT);
        if self.dns_server.is_some() {
            // The configured nameserver answers for the domain's address too.
            let resolver = self.resolver()?;
            let ips = tokio::time::timeout(DNS_TIMEOUT * 2, resolver.lookup_ip(format!("{domain}.").as_str()))
                .await
                .map_err(|_| format!("{domain}: address lookup timed out"))?
                .map_err(|e| format!("{domain}: address lookup failed: {e}"))?;
            let addrs: Vec<SocketAddr> = ips.iter().map(|ip| SocketAddr::new(ip, self.http_port)).collect();
            client = client.resolve_to_addrs(domain, &addrs);
        }
        let client = client.build().map_err(|e| format!("HTTP client: {e}"))?;
        let mut response = client.get(&url).send().await.map_err(|e| format!("GET {url}: {}", without_url(&e)))?;
        if !response.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", response.status().as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| format!("GET {url}: {}", without_url(&e)))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_HTTP_BODY_BYTES {
                return Err(format!("GET {url}: the answer is longer than {MAX_HTTP_BODY_BYTES} bytes"));
            }
        }
        if body.trim_ascii() == token.as_bytes() {
            Ok(())
        } else {
            Err(format!("GET {url}: the answer is not the token"))
        }
    }
}

fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(&format!(" ({url})"), "").replace(url.as_str(), "");
    }
    text
}
