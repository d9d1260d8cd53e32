//! Checking an `x-deno-subhost` token: the rules of `subhosting-protocol.md` §1.
//!
//! The token is split and parsed here rather than by `jsonwebtoken::decode`,
//! because the rules need things that API cannot express: the caller's clock
//! (`now_unix_s`), the rejected algorithm's name, a future `iat`, and strict
//! types for every claim. `jsonwebtoken` still does the HMAC, and compares the
//! signature in constant time.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use url::Url;

use crate::config::{AuthConfigError, Subhoster, rpc_root_problem};

/// How far `exp`, `nbf` and `iat` may be off the runner's clock.
pub const CLOCK_LEEWAY_S: u64 = 10;

/// Longer tokens are refused before any decoding: a relay's token is a few
/// hundred bytes, and the bound keeps the work per request small.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Token-derived text echoed in an error is cut to this many characters.
const MAX_ECHO_CHARS: usize = 128;

/// Why a token was refused. Every message is safe to show the client: it
/// names what was wrong, never a secret or the expected signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("unsupported JWT algorithm {0:?}: only HS256 is accepted")]
    UnsupportedAlgorithm(String),
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("unknown kid {0:?}")]
    UnknownKid(String),
    #[error("the token has no kid, and several subhosters are configured")]
    MissingKid,
    #[error("the token has expired")]
    Expired,
    #[error("the token has no exp claim")]
    MissingExp,
    #[error("the token is not valid yet (nbf or iat is in the future)")]
    NotYetValid,
    #[error("the token has no deployment_id claim, or an empty one")]
    MissingDeploymentId,
    #[error("claim {claim}: {reason}")]
    InvalidClaim { claim: &'static str, reason: &'static str },
    #[error("rpc_root {0:?} is not allowed for this subhoster")]
    RpcRootNotAllowed(String),
    #[error("invalid rpc_root claim: {0}")]
    InvalidRpcRoot(&'static str),
}

/// The claims of a token that passed every rule. Only [`SubhostVerifier::verify`]
/// builds one, so holding one proves the check happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedClaims {
    kid: String,
    deployment_id: String,
    rpc_root: Url,
    audience: Option<String>,
}

impl VerifiedClaims {
    /// The subhoster whose secret verified the token (also when the token
    /// itself named no `kid` and the only subhoster was used).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Opaque, non-empty.
    pub fn deployment_id(&self) -> &str {
        &self.deployment_id
    }

    /// Where this request's RPCs go: the allowed claim, or the subhoster's
    /// default. Absolute http(s), ends with `/`.
    pub fn rpc_root(&self) -> &Url {
        &self.rpc_root
    }

    /// The token's `aud` claim, if it has one (a list as its JSON text). The
    /// protocol has none, and a runner ignores it; an origin refuses RPC
    /// tokens that carry one: they were minted for something else (an
    /// edge's relay token, [`crate::RUNNER_AUDIENCE`]).
    pub fn audience(&self) -> Option<&str> {
        self.audience.as_deref()
    }
}

/// A token that passed every rule for one audience
/// ([`SubhostVerifier::verify_audience`]): signed by a configured key, in
/// its time, its `aud` the one asked for. It names no deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudienceClaims {
    kid: String,
}

impl AudienceClaims {
    /// The key that verified the token.
    pub fn kid(&self) -> &str {
        &self.kid
    }
}

#[derive(Debug, Clone)]
struct Entry {
    subhoster: Subhoster,
    // jsonwebtoken's form of the secret, made once rather than per request.
    key: DecodingKey,
}

/// Verifies relay tokens against the configured subhosters.
#[derive(Debug, Clone)]
pub struct SubhostVerifier {
    by_kid: HashMap<String, Entry>,
}

impl SubhostVerifier {
    pub fn new(subhosters: Vec<Subhoster>) -> Result<Self, AuthConfigError> {
        let mut by_kid = HashMap::with_capacity(subhosters.len());
        for subhoster in subhosters {
            subhoster.validate()?;
            if by_kid.contains_key(&subhoster.kid) {
                return Err(AuthConfigError::DuplicateKid(subhoster.kid));
            }
            let key = DecodingKey::from_secret(subhoster.secret.as_bytes());
            by_kid.insert(subhoster.kid.clone(), Entry { subhoster, key });
        }
        Ok(Self { by_kid })
    }

    pub fn subhoster(&self, kid: &str) -> Option<&Subhoster> {
        self.by_kid.get(kid).map(|e| &e.subhoster)
    }

    /// Checks `token` (the `x-deno-subhost` value) at time `now_unix_s`.
    /// Claims are looked at only after the signature verified.
    pub fn verify(&self, token: &str, now_unix_s: u64) -> Result<VerifiedClaims, TokenError> {
        let (entry, claims) = self.check_signed(token, now_unix_s)?;
        let deployment_id = match claims.deployment_id {
            None => return Err(TokenError::MissingDeploymentId),
            Some(Value::String(id)) if id.is_empty() => {
                return Err(TokenError::MissingDeploymentId);
            }
            Some(Value::String(id)) => id,
            Some(_) => {
                return Err(TokenError::InvalidClaim { claim: "deployment_id", reason: "must be a string" });
            }
        };
        let rpc_root = match claims.rpc_root {
            None => entry.subhoster.rpc_root.clone(),
            Some(Value::String(text)) => {
                let url = Url::parse(&text).map_err(|_| TokenError::InvalidRpcRoot("not an absolute URL"))?;
                if let Some(reason) = rpc_root_problem(&url) {
                    return Err(TokenError::InvalidRpcRoot(reason));
                }
                // Checked on the normalised URL, so `..` segments, case and
                // default ports cannot dodge the prefix.
                if !entry.subhoster.may_use_rpc_root(&url) {
                    return Err(TokenError::RpcRootNotAllowed(clip(url.as_str())));
                }
                url
            }
            Some(_) => return Err(TokenError::InvalidRpcRoot("not a string")),
        };
        // Any form is let through here (a relay's token may carry a list):
        // only whether there is one matters to its readers.
        let audience = match claims.aud {
            None => None,
            Some(Value::String(aud)) => Some(clip(&aud)),
            Some(other) => Some(clip(&other.to_string())),
        };
        Ok(VerifiedClaims { kid: entry.subhoster.kid.clone(), deployment_id, rpc_root, audience })
    }

    /// Checks a token minted for `audience` (an isocloud service's own, such
    /// as [`crate::ROUTING_AUDIENCE`]) at time `now_unix_s`: every rule of
    /// [`SubhostVerifier::verify`] but the deployment's, and an `aud` claim
    /// that is exactly `audience`.
    pub fn verify_audience(&self, token: &str, audience: &str, now_unix_s: u64) -> Result<AudienceClaims, TokenError> {
        let (entry, claims) = self.check_signed(token, now_unix_s)?;
        match claims.aud {
            Some(Value::String(aud)) if aud == audience => Ok(AudienceClaims { kid: entry.subhoster.kid.clone() }),
            None => Err(TokenError::InvalidClaim { claim: "aud", reason: "is missing" }),
            Some(_) => Err(TokenError::InvalidClaim { claim: "aud", reason: "is not this service's audience" }),
        }
    }

    /// The rules every token meets: size, form, algorithm, `kid`, signature,
    /// then the times. Claims are parsed only after the signature verified.
    fn check_signed(&self, token: &str, now_unix_s: u64) -> Result<(&Entry, RawClaims), TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed("the token is longer than 8 KiB"));
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(claims_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("expected three base64url parts separated by '.'"));
        };

        let header: RawHeader =
            decode_part(header_b64, "the header is not base64url", "the header is not a JSON object")?;
        let alg = match header.alg {
            Some(Value::String(alg)) => alg,
            _ => return Err(TokenError::Malformed("the header has no string alg")),
        };
        if alg != "HS256" {
            return Err(TokenError::UnsupportedAlgorithm(clip(&alg)));
        }
        if header.crit.is_some() {
            // RFC 7515 §4.1.11: extensions we do not implement must be refused.
            return Err(TokenError::Malformed("the header's crit extensions are not supported"));
        }
        let entry = match header.kid {
            Some(Value::String(kid)) => self.by_kid.get(&kid).ok_or_else(|| TokenError::UnknownKid(clip(&kid)))?,
            Some(_) => return Err(TokenError::Malformed("the header's kid is not a string")),
            None if self.by_kid.len() == 1 => self.by_kid.values().next().ok_or(TokenError::MissingKid)?,
            None => return Err(TokenError::MissingKid),
        };

        // The signing input is the token up to the second '.'.
        let signed_len = header_b64.len() + 1 + claims_b64.len();
        let Some(message) = token.get(..signed_len) else {
            return Err(TokenError::Malformed("expected three base64url parts separated by '.'"));
        };
        match jsonwebtoken::crypto::verify(signature_b64, message.as_bytes(), &entry.key, Algorithm::HS256) {
            Ok(true) => {}
            Ok(false) => return Err(TokenError::BadSignature),
            Err(_) => return Err(TokenError::Malformed("the signature is not base64url")),
        }

        let claims: RawClaims = decode_part(
            claims_b64,
            "the claims are not base64url",
            "the claims are not a JSON object, or repeat a name",
        )?;
        check_times(&claims, now_unix_s)?;
        Ok((entry, claims))
    }
}

/// Header fields the rules read; others (`typ`, `cty`, …) are ignored.
/// `Value` rather than typed fields, so a wrong type gets its own error.
#[derive(Deserialize)]
struct RawHeader {
    alg: Option<Value>,
    kid: Option<Value>,
    crit: Option<Value>,
}

/// Claims the rules read; others (`sub`, `jti`, …) are ignored. A JSON `null`
/// counts as absent.
#[derive(Deserialize)]
struct RawClaims {
    exp: Option<Value>,
    nbf: Option<Value>,
    iat: Option<Value>,
    deployment_id: Option<Value>,
    rpc_root: Option<Value>,
    aud: Option<Value>,
}

fn decode_part<T: DeserializeOwned>(
    part: &str,
    not_base64: &'static str,
    not_object: &'static str,
) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| TokenError::Malformed(not_base64))?;
    // serde would also read a struct from a JSON array; a JWT part is an object.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(TokenError::Malformed(not_object));
    }
    // The derived struct refuses a repeated name, so two `exp`s cannot disagree.
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed(not_object))
}

fn check_times(claims: &RawClaims, now_unix_s: u64) -> Result<(), TokenError> {
    let exp = numeric_date(claims.exp.as_ref(), "exp")?.ok_or(TokenError::MissingExp)?;
    // RFC 7519: valid while now < exp; saturating so no input can overflow.
    if now_unix_s >= exp.saturating_add(CLOCK_LEEWAY_S) {
        return Err(TokenError::Expired);
    }
    for (value, claim) in [(&claims.nbf, "nbf"), (&claims.iat, "iat")] {
        if let Some(at) = numeric_date(value.as_ref(), claim)?
            && at > now_unix_s.saturating_add(CLOCK_LEEWAY_S)
        {
            return Err(TokenError::NotYetValid);
        }
    }
    Ok(())
}

/// A NumericDate as whole seconds. Fractions, negatives and strings are
/// refused: relays sign integers, and a lenient reading is a second parser
/// for an attacker to disagree with.
fn numeric_date(value: Option<&Value>, claim: &'static str) -> Result<Option<u64>, TokenError> {
    match value {
        None => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
        Some(_) => Err(TokenError::InvalidClaim {
            claim,
            reason: "must be a non-negative whole number of seconds since the Unix epoch",
        }),
    }
}

/// Token-controlled text goes into errors cut short, so an error stays small.
fn clip(text: &str) -> String {
    text.chars().take(MAX_ECHO_CHARS).collect()
}
