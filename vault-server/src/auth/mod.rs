//! Who is calling: JWT verification against issuer keys (DESIGN §3). The output is a
//! [`Caller`]; nothing else in the service decides identity.

mod jwks;
mod verifier;

pub use jwks::{KeySet, KeySetError};
pub use verifier::Verifier;

use crate::ids::{AgentId, UserId};

/// The scope that unlocks admin calls.
pub const ADMIN_SCOPE: &str = "vault:admin";

/// A verified caller: an agent acting for a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// From the configured agent claim.
    pub agent: AgentId,
    /// From `sub`.
    pub user: UserId,
    /// The token's scope contains `vault:admin`.
    pub admin: bool,
}

/// Why a caller token was refused. Each message is safe to return: it describes the token's
/// defect without echoing the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("missing authorization metadata: send `authorization: Bearer <JWT>`")]
    Missing,
    /// Not `Bearer <JWT>`, or not a JWT.
    #[error("malformed caller token: {0}")]
    Malformed(&'static str),
    /// The token is well-formed but not acceptable.
    #[error("caller token refused: {0}")]
    Refused(&'static str),
    /// The issuer's keys could not be fetched to check a new `kid`.
    #[error("issuer keys unavailable")]
    KeysUnavailable,
}
