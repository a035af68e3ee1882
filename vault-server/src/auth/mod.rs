//! Who is calling: JWT verification against issuer keys (DESIGN §3). The output is a
//! [`Caller`]; nothing else in the service decides identity.

mod jwks;
mod verifier;

pub use jwks::{KeySet, KeySetError};
pub use verifier::Verifier;

use crate::ids::{AgentId, IssuerId, UserId};

/// The scope that unlocks admin calls.
pub const ADMIN_SCOPE: &str = "vault:admin";

/// The default scope that allows StoreToken (`VAULT_STORE_SCOPE`). Writing a credential is a
/// privilege of its own: the vault redeems a stored refresh token with its own client secret, so
/// a caller that could store any refresh token could use the vault as a refresh oracle for
/// tokens stolen elsewhere. Gateways that acquire tokens get this scope; agents do not.
pub const STORE_SCOPE: &str = "vault:store";

/// A verified caller: an agent acting for a user, both vouched for by one issuer. The identity
/// is the triple (issuer, agent, user): credentials are keyed by all three, so one issuer can
/// never name another issuer's agents or users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The configured issuer whose key verified the token.
    pub issuer: IssuerId,
    /// From the configured agent claim.
    pub agent: AgentId,
    /// From `sub`.
    pub user: UserId,
    /// The token's scope contains `vault:admin`.
    pub admin: bool,
    /// The token's scope contains the store scope (`vault:store` unless configured otherwise).
    pub store: bool,
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
