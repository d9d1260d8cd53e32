//! Scoped tokens and the audit log (`/tokens`, `/audit`; issue 16 item 5).

use serde::{Deserialize, Serialize};

use super::present;

/// A token as `GET /tokens` lists it (its secret is never shown again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub id: String,
    pub name: String,
    /// `admin`, `project:NAME:deploy` or `project:NAME:read`, with the
    /// project's current name (`(deleted)` once it is gone).
    pub scope: String,
    /// The project's current name; `null` for admin tokens and deleted projects.
    #[serde(deserialize_with = "present")]
    pub project: Option<String>,
    pub created_at: String,
    #[serde(deserialize_with = "present")]
    pub expires_at: Option<String>,
    #[serde(deserialize_with = "present")]
    pub revoked_at: Option<String>,
    /// To the minute: uses are noted at most once a minute.
    #[serde(deserialize_with = "present")]
    pub last_used_at: Option<String>,
    /// `active`, `expired` or `revoked`.
    pub status: String,
}

/// `POST /tokens`: the new token, and its secret, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    pub token: Token,
    pub secret: String,
}

/// One audited mutation, as `GET /audit` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: String,
    pub at: String,
    pub token_id: String,
    /// The token's name when it acted.
    pub token_name: String,
    /// What was asked, e.g. `deployment.create` (the access table's name).
    pub action: String,
    /// What it was asked of: the request's path, and what it made.
    pub target: String,
    /// The project's current name, when the call was about one that still exists.
    #[serde(deserialize_with = "present")]
    pub project: Option<String>,
    /// The HTTP status it was answered with.
    pub status: u16,
    /// `ok`, `denied` or `failed`.
    pub outcome: String,
}

/// `POST /tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTokenBody {
    /// `admin`, `project:NAME:deploy` or `project:NAME:read`.
    pub scope: String,
    /// Unique among all tokens, revoked ones included; made up when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Seconds from now; absent: the token does not expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_s: Option<u64>,
}
