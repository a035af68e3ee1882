//! Who is calling: JWT verification against issuer keys (DESIGN §3). The output is a
//! [`Caller`]; nothing else in the service decides identity.
//!
//! Identity is (issuer, agent, user). Two designs close the hole where two configured issuers
//! shared one namespace of agents and users: one issuer per deployment, enforced at startup, or
//! several issuers each bound to its own keys with every credential keyed by issuer too. This
//! vault does the second. A gateway fleet commonly has more than one trust manager (a staging
//! and a production IdP, or one per business unit during a migration), and forcing one vault
//! per issuer would split the operator's one service into several for no security gain: with
//! per-issuer keys, an issuer can only sign for its own principals, and the registry, schema
//! name and agent-key wrap all carry the issuer, so nothing one issuer's callers do can name
//! another issuer's rows. Agents stored before this was so are adopted at startup by the one
//! configured issuer; with several configured, startup refuses until an operator says which.

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
    /// The token's `jti`, for the audit log, when it has a short printable one.
    pub jti: Option<String>,
    /// What the token says about how the user signed in, for the policy's step-up rules.
    pub step_up: StepUp,
}

/// The claims of a caller token that prove a recent step-up (OpenID Connect Core §2): how the
/// user authenticated and when. Only read, never trusted beyond the issuer's signature.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepUp {
    /// `acr`, when a short string.
    pub acr: Option<String>,
    /// `amr`, its short strings (at most 16).
    pub amr: Vec<String>,
    /// `auth_time`, unix seconds.
    pub auth_time: Option<i64>,
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
    /// `aud` does not contain this vault's audience. The audience is public configuration, so
    /// naming it tells the caller's operator what to mint without giving anything away.
    #[error(
        "caller token refused: audience mismatch: aud must contain {expected:?} (VAULT_JWT_AUDIENCE)"
    )]
    WrongAudience {
        /// The configured audience.
        expected: String,
    },
    /// `iss` is none of the configured issuers (named: they are public; their keys never are).
    #[error(
        "caller token refused: issuer not accepted: iss must be one of {accepted} (VAULT_JWT_ISSUER)"
    )]
    UntrustedIssuer {
        /// The configured issuers, quoted and comma-separated.
        accepted: String,
    },
    /// The configured agent claim is missing or does not hold a valid agent id.
    #[error("caller token refused: the agent claim {claim:?} (VAULT_JWT_AGENT_CLAIM) {problem}")]
    AgentClaim {
        /// The claim looked for.
        claim: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The issuer's keys could not be fetched to check a new `kid`.
    #[error("issuer keys unavailable")]
    KeysUnavailable,
}
