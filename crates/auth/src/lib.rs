//! Verification of the relay's `x-deno-subhost` JWT and minting of the
//! runner's origin-RPC tokens (`subhosting-protocol.md` §1 and §2), and of
//! the tokens of isocloud's own services (an edge's relay tokens, its
//! routing feed: an `aud` claim each, [`SubhostVerifier::verify_audience`]).
//!
//! This crate owns the HS256 rules: which algorithm is accepted, how `kid`
//! picks a subhoster's secret, the clock leeway, and where a token may aim the
//! runner's RPCs (`rpc_root`). Its only output is [`VerifiedClaims`], which
//! nothing but [`SubhostVerifier::verify`] can build, so a route decision cannot
//! be made from an unchecked token. It does no I/O and reads no clock (callers
//! pass `now_unix_s`), and it must never put a secret into an error, a log line
//! or a `Debug` output.

#![forbid(unsafe_code)]

mod config;
mod sign;
mod verify;

pub use config::{AuthConfigError, Secret, Subhoster};
pub use sign::{
    ROUTING_AUDIENCE, RUNNER_AUDIENCE, sign_audience_token, sign_relay_token, sign_rpc_token, sign_subhost_token,
};
pub use verify::{AudienceClaims, CLOCK_LEEWAY_S, MAX_TOKEN_BYTES, SubhostVerifier, TokenError, VerifiedClaims};

#[cfg(test)]
mod tests;
