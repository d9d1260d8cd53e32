//! TLS certificates of custom domains: checked on upload (parses, the key
//! matches, it covers the domain, it is valid now) and served by SNI from an
//! in-memory table, each for the one domain it was uploaded for: never for
//! the other names it lists, which may be other projects' domains. The PEMs
//! are stored, never shown.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::extensions::GeneralName;

use crate::store::domains::CertRow;

pub const MAX_CERT_PEM_BYTES: usize = 64 * 1024;
pub const MAX_KEY_PEM_BYTES: usize = 16 * 1024;

/// Why a certificate was refused; `field` is `cert_pem` or `key_pem`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct CertError {
    pub field: &'static str,
    pub message: String,
}

fn cert_error(message: impl Into<String>) -> CertError {
    CertError { field: "cert_pem", message: message.into() }
}

fn key_error(message: impl Into<String>) -> CertError {
    CertError { field: "key_pem", message: message.into() }
}

/// A certificate that passed every check.
#[derive(Debug, Clone)]
pub struct CheckedCertificate {
    /// DNS names of the leaf's subject alternative names, lowercase.
    pub names: Vec<String>,
    pub not_after_ms: i64,
}

/// A parsed pair whose key matches, names and dates not yet looked at.
pub struct ParsedCertificate {
    pub key: CertifiedKey,
    /// DNS names of the leaf's subject alternative names, lowercase.
    pub names: Vec<String>,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
}

/// Parses a PEM chain (leaf first) and its key into a [`CertifiedKey`]
/// whose public key matches, without looking at names or dates.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<ParsedCertificate, CertError> {
    if cert_pem.len() > MAX_CERT_PEM_BYTES {
        return Err(cert_error(format!("must be at most {MAX_CERT_PEM_BYTES} bytes")));
    }
    if key_pem.len() > MAX_KEY_PEM_BYTES {
        return Err(key_error(format!("must be at most {MAX_KEY_PEM_BYTES} bytes")));
    }
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(format!("is not PEM: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(cert_error("holds no CERTIFICATE block"));
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| cert_error(format!("is not an X.509 certificate: {e}")))?;
    let not_before_ms = parsed.validity().not_before.timestamp().saturating_mul(1000);
    let not_after_ms = parsed.validity().not_after.timestamp().saturating_mul(1000);
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| key_error(format!("is not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}")))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| key_error(format!("is not a supported key type (RSA, ECDSA P-256/P-384, Ed25519): {e}")))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|e| key_error(format!("does not match the certificate: {e}")))?;
    Ok(ParsedCertificate { key: certified, names, not_before_ms, not_after_ms })
}

/// Every check of an upload for `domain` at time `now_ms`.
pub fn check(cert_pem: &str, key_pem: &str, domain: &str, now_ms: i64) -> Result<CheckedCertificate, CertError> {
    let ParsedCertificate { names, not_before_ms, not_after_ms, .. } = certified_key(cert_pem, key_pem)?;
    if names.is_empty() {
        return Err(cert_error("has no DNS subject alternative names"));
    }
    if !names.iter().any(|name| covers(name, domain)) {
        return Err(cert_error(format!("does not cover {domain} (its names: {})", names.join(", "))));
    }
    if not_after_ms <= now_ms {
        return Err(cert_error(format!("expired at {}", crate::time::format_ms(not_after_ms))));
    }
    if not_before_ms > now_ms {
        return Err(cert_error(format!("is not valid before {}", crate::time::format_ms(not_before_ms))));
    }
    Ok(CheckedCertificate { names, not_after_ms })
}

/// Does certificate name `name` cover `host`? Exact, or a wildcard one label
/// deep (`*.example.com` covers `www.example.com`, not `example.com` nor
/// `a.b.example.com`).
pub fn covers(name: &str, host: &str) -> bool {
    match name.strip_prefix("*.") {
        Some(zone) => host.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest == zone),
        None => name == host,
    }
}

/// Stored row `row` as the SNI table serves it, for its domain alone: `None`
/// (and a log line saying why) for a domain at or under the base domain, a
/// pair that does not load, or a certificate that does not cover its
/// domain. The SNI table and the edges' certificate feed (`origin_http`)
/// apply this one rule.
pub fn servable(row: &CertRow, base_domain: &str) -> Option<CertifiedKey> {
    if crate::validate::is_at_or_under(&row.domain, base_domain) {
        tracing::warn!(target: "isocloud::controlplane", domain = row.domain, base_domain, "stored certificate is for a name under the base domain; not served");
        return None;
    }
    match certified_key(&row.cert_pem, &row.key_pem) {
        Ok(parsed) if parsed.names.iter().any(|name| covers(name, &row.domain)) => Some(parsed.key),
        Ok(_) => {
            tracing::warn!(target: "isocloud::controlplane", domain = row.domain, "stored certificate does not cover its domain; not served");
            None
        }
        Err(e) => {
            tracing::warn!(target: "isocloud::controlplane", domain = row.domain, error = %e, "stored certificate does not load");
            None
        }
    }
}

/// The SNI table: verified domain → the certificate uploaded for it.
#[derive(Debug, Default)]
pub struct CertTable {
    by_domain: HashMap<String, Arc<CertifiedKey>>,
}

impl CertTable {
    /// Each verified domain's own certificate under the domain's name only:
    /// the other names a certificate lists (another project's domain, a
    /// wildcard's siblings) get nothing from it. Rows at or under the base
    /// domain (stored before `--base-domain` changed) and rows whose
    /// certificate does not cover their domain are left out and logged.
    pub fn build(rows: &[CertRow], base_domain: &str) -> Self {
        let mut table = Self::default();
        for row in rows {
            table.put(&row.domain, Some(row), base_domain);
        }
        table
    }

    /// Domain `domain`'s certificate is now `row` (`None`: none, or the
    /// domain is not verified), under the rules of [`CertTable::build`].
    pub fn put(&mut self, domain: &str, row: Option<&CertRow>, base_domain: &str) {
        self.by_domain.remove(domain);
        let Some(row) = row else { return };
        if let Some(key) = servable(row, base_domain) {
            self.by_domain.insert(row.domain.clone(), Arc::new(key));
        }
    }

    /// The certificate of exactly this domain (case and a trailing dot
    /// aside); no wildcard reading.
    pub fn lookup(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let name = server_name.strip_suffix('.').unwrap_or(server_name).to_ascii_lowercase();
        self.by_domain.get(&name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `names` and its key, PEM.
    pub(crate) fn self_signed(names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let cert = rcgen::generate_simple_self_signed(names).unwrap();
        (cert.cert.pem(), cert.key_pair.serialize_pem())
    }

    #[test]
    fn accepts_a_matching_pair() {
        let (cert, key) = self_signed(&["www.example.com", "example.com"]);
        let checked = check(&cert, &key, "www.example.com", crate::time::now_ms()).unwrap();
        assert_eq!(checked.names, vec!["www.example.com", "example.com"]);
        assert!(checked.not_after_ms > crate::time::now_ms());
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let (cert, key) = self_signed(&["www.example.com"]);
        let (_, other_key) = self_signed(&["www.example.com"]);
        let now = crate::time::now_ms();

        let err = check(&cert, &other_key, "www.example.com", now).unwrap_err();
        assert_eq!(err.field, "key_pem");
        assert!(err.message.contains("does not match"), "{err}");

        let err = check(&cert, &key, "shop.example.com", now).unwrap_err();
        assert_eq!(err.field, "cert_pem");
        assert!(err.message.contains("does not cover shop.example.com"), "{err}");

        let err = check("not pem", &key, "www.example.com", now).unwrap_err();
        assert_eq!(err.field, "cert_pem");
        let err =
            check(&cert, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "www.example.com", now)
                .unwrap_err();
        assert_eq!(err.field, "key_pem");
        let err = check(&cert, "", "www.example.com", now).unwrap_err();
        assert_eq!(err.field, "key_pem");

        // Far in the future, the certificate has expired; in 1970 it was
        // not valid yet (rcgen's default validity starts in 1975).
        let err = check(&cert, &key, "www.example.com", i64::MAX / 2).unwrap_err();
        assert!(err.message.contains("expired"), "{err}");
        let err = check(&cert, &key, "www.example.com", 0).unwrap_err();
        assert_eq!(err.field, "cert_pem");
        assert!(err.message.contains("is not valid before 1975-01-01"), "{err}");

        let huge = "x".repeat(MAX_CERT_PEM_BYTES + 1);
        assert!(check(&huge, &key, "www.example.com", now).unwrap_err().message.contains("at most"));
    }

    #[test]
    fn wildcards_cover_one_label() {
        assert!(covers("*.example.com", "www.example.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(!covers("*.example.com", "a.b.example.com"));
        assert!(!covers("*.example.com", "wwwexample.com"));
        assert!(covers("example.com", "example.com"));
        assert!(!covers("example.com", "www.example.com"));
    }

    #[test]
    fn table_serves_each_certificate_for_its_own_domain_only() {
        let (wild_cert, wild_key) = self_signed(&["*.example.com"]);
        let (own_cert, own_key) = self_signed(&["api.example.com", "victim.example.net"]);
        let (base_cert, base_key) = self_signed(&["shop.example.org", "*.localhost"]);
        let (old_cert, old_key) = self_signed(&["old.localhost"]);
        let row = |domain: &str, cert: &str, key: &str| CertRow {
            domain: domain.into(),
            cert_pem: cert.into(),
            key_pem: key.into(),
        };
        let table = CertTable::build(
            &[
                row("www.example.com", &wild_cert, &wild_key),
                row("api.example.com", &own_cert, &own_key),
                row("shop.example.org", &base_cert, &base_key),
                row("broken.example.net", "garbage", "garbage"),
                // Stored data the API refuses: not covering its domain, and
                // a domain under the base domain.
                row("other.example.net", &own_cert, &own_key),
                row("old.localhost", &old_cert, &old_key),
            ],
            "localhost",
        );
        let wild = table.lookup("www.example.com").unwrap();
        assert!(Arc::ptr_eq(&wild, &table.lookup("WWW.example.com.").unwrap()));
        let own = table.lookup("api.example.com").unwrap();
        assert!(!Arc::ptr_eq(&wild, &own));
        assert!(table.lookup("shop.example.org").is_some());
        // Nothing by the certificates' other names: not a wildcard's
        // siblings, not another domain a certificate lists, not the base
        // domain's hosts.
        for name in [
            "other.example.com",
            "example.com",
            "a.b.example.com",
            "victim.example.net",
            "other.example.net",
            "hello.localhost",
            "old.localhost",
            "broken.example.net",
        ] {
            assert!(table.lookup(name).is_none(), "{name}");
        }
    }
}
