//! Minting HS256 tokens: the runner's RPC tokens (§2) and, for tests,
//! examples and benches, relay tokens (§1).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde::Serialize;
use serde_json::Value;

use crate::config::Secret;

/// The token for an origin RPC: header `{"alg":"HS256","typ":"JWT","kid":kid}`,
/// claims `{deployment_id, iat: now, exp: now + ttl}`.
pub fn sign_rpc_token(kid: &str, secret: &Secret, deployment_id: &str, now_unix_s: u64, ttl_s: u64) -> String {
    let claims = serde_json::json!({
        "deployment_id": deployment_id,
        "iat": now_unix_s,
        "exp": now_unix_s.saturating_add(ttl_s),
    });
    sign_subhost_token(Some(kid), secret, &claims)
}

/// A relay token with arbitrary `claims` (not checked: tests mint bad ones on
/// purpose). The header is `{"alg":"HS256","typ":"JWT"}` plus `kid` if given.
pub fn sign_subhost_token(kid: Option<&str>, secret: &Secret, claims: &Value) -> String {
    // HMAC takes a key of any length and both parts serialise infallibly, so
    // this cannot fail today; should it ever, the empty string fails closed,
    // since no verifier accepts it.
    try_sign(kid, secret, claims).unwrap_or_default()
}

#[derive(Serialize)]
struct Header<'a> {
    alg: &'static str,
    typ: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kid: Option<&'a str>,
}

fn try_sign(kid: Option<&str>, secret: &Secret, claims: &Value) -> Option<String> {
    let header = serde_json::to_vec(&Header { alg: "HS256", typ: "JWT", kid }).ok()?;
    let claims = serde_json::to_vec(claims).ok()?;
    let message = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
    let key = EncodingKey::from_secret(secret.as_bytes());
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).ok()?;
    Some(format!("{message}.{signature}"))
}
