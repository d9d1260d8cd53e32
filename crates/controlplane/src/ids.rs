//! Random identifiers and secrets.

use rand::Rng;
use sha2::{Digest, Sha256};

const BASE36: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// `len` random characters of `a-z0-9` (deployment ids: 12, about 62 bits).
pub fn base36(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len).map(|_| char::from(BASE36[rng.random_range(0..BASE36.len())])).collect()
}

pub fn deployment_id() -> String {
    base36(12)
}

pub fn project_id() -> String {
    base36(16)
}

/// A random positive `i64` row id, for tables whose ids are never shown in
/// order (two control-plane nodes may insert at once, so no `MAX()+1`).
pub fn row_id() -> i64 {
    rand::rng().random_range(1..i64::MAX)
}

/// A bearer token: 32 random bytes, hex.
pub fn secret_token() -> String {
    hex::encode(rand::rng().random::<[u8; 32]>())
}

/// A domain-verification token: 16 random bytes, hex (it lands in a DNS TXT
/// record and a URL path, so no characters that need escaping).
pub fn verification_token() -> String {
    hex::encode(rand::rng().random::<[u8; 16]>())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let id = deployment_id();
        assert_eq!(id.len(), 12);
        assert!(id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        assert_eq!(secret_token().len(), 64);
        assert_ne!(secret_token(), secret_token());
        assert!(row_id() > 0);
    }
}
