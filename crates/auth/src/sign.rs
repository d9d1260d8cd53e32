//! Minting HS256 tokens: the runner's RPC tokens (§2), the edge's relay
//! tokens (§1) and its routing-feed tokens, and, for tests, examples and
//! benches, relay tokens of any claims.

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

/// The `aud` of the relay tokens an isocloud edge mints for runners. The
/// runner ignores it; an origin refuses a deployment RPC whose token carries
/// an `aud`, so a relay token seen between edge and runner opens no RPC.
pub const RUNNER_AUDIENCE: &str = "isocloud-runner";

/// The `aud` of the edge's token for the control plane's routing feed (a
/// token of no deployment, so it opens no RPC either).
pub const ROUTING_AUDIENCE: &str = "isocloud-routing";

/// The relay token an edge puts in `x-deno-subhost` (§1): header `kid`,
/// claims `{deployment_id, iat: now, exp: now + ttl, aud: RUNNER_AUDIENCE}`.
pub fn sign_relay_token(kid: &str, secret: &Secret, deployment_id: &str, now_unix_s: u64, ttl_s: u64) -> String {
    let claims = serde_json::json!({
        "deployment_id": deployment_id,
        "iat": now_unix_s,
        "exp": now_unix_s.saturating_add(ttl_s),
        "aud": RUNNER_AUDIENCE,
    });
    sign_subhost_token(Some(kid), secret, &claims)
}

/// A token for one of isocloud's own services (`audience`, e.g.
/// [`ROUTING_AUDIENCE`]): claims `{aud, iat: now, exp: now + ttl}`, no
/// deployment. Checked by [`crate::SubhostVerifier::verify_audience`].
pub fn sign_audience_token(kid: &str, secret: &Secret, audience: &str, now_unix_s: u64, ttl_s: u64) -> String {
    let claims = serde_json::json!({
        "aud": audience,
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
