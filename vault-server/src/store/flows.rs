//! Consent flows (authorization code + PKCE) between BeginAuthorization and
//! CompleteAuthorization. A flow is found by its id (the caller's `authorization_id`) or by the
//! SHA-256 of its `state` (the provider's callback); the state itself is never stored. Its
//! secrets, the PKCE verifier and later the code, arrive sealed under the agent key.
//!
//! Every state change is a compare-and-set from an expected status, so a callback or a
//! completion happens at most once across replicas.

use chrono::{DateTime, Utc};

use super::StoreError;
use crate::ids::{AgentId, IssuerId, Tool, UserId};

/// Where a flow is in its life, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowStatus {
    /// Begun; the user is at the provider.
    Pending,
    /// The provider redirected back with a code.
    CallbackReceived,
    /// A completion claimed the flow and is exchanging the code.
    Exchanging,
    /// The credential is stored.
    Completed,
    /// The user or the provider refused consent.
    Denied,
    /// Ended without a credential (code refused, caller mismatch, bad callback).
    Failed,
}

impl FlowStatus {
    /// The stored code (a small integer; both backends store the same values).
    pub const fn code(self) -> i16 {
        match self {
            Self::Pending => 0,
            Self::CallbackReceived => 1,
            Self::Exchanging => 2,
            Self::Completed => 3,
            Self::Denied => 4,
            Self::Failed => 5,
        }
    }

    /// The status a stored code names.
    pub fn from_code(code: i16) -> Result<Self, StoreError> {
        Ok(match code {
            0 => Self::Pending,
            1 => Self::CallbackReceived,
            2 => Self::Exchanging,
            3 => Self::Completed,
            4 => Self::Denied,
            5 => Self::Failed,
            other => return Err(StoreError::Corrupt(format!("unknown flow status {other}"))),
        })
    }

    /// The statuses of a flow nobody has finished or claimed: it expires in these.
    pub const UNFINISHED: [Self; 2] = [Self::Pending, Self::CallbackReceived];

    /// Whether the flow has ended (its secrets are gone).
    pub const fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Denied | Self::Failed)
    }
}

/// A flow to record at BeginAuthorization.
#[derive(Debug)]
pub struct NewFlow<'a> {
    /// The opaque `authorization_id`.
    pub id: &'a str,
    /// SHA-256 of the `state` sent to the provider.
    pub state_hash: &'a [u8; 32],
    /// The agent that began it (its registry entry's namespace names its schema).
    pub issuer: &'a IssuerId,
    /// The agent.
    pub agent: &'a AgentId,
    /// The agent's namespace.
    pub namespace: &'a str,
    /// The user that began it.
    pub user: &'a UserId,
    /// The tool.
    pub tool: &'a Tool,
    /// The scopes asked for.
    pub scopes: &'a [String],
    /// Where the callback sends the browser; `None` for an unbound flow.
    pub return_url: Option<&'a str>,
    /// The `redirect_uri` sent to the provider (the code exchange repeats it).
    pub redirect_uri: &'a str,
    /// The authorization server and client the authorization URL named (a provider binding);
    /// the callback and the exchange are held to it.
    pub provider_binding: Option<&'a str>,
    /// The PKCE verifier, sealed under the agent key.
    pub sealed_verifier: &'a [u8],
    /// After this the flow cannot take a callback or complete.
    pub expires_at: DateTime<Utc>,
}

/// A stored flow.
#[derive(Debug, Clone)]
pub struct Flow {
    /// The `authorization_id`.
    pub id: String,
    /// The issuer of the agent that began it.
    pub issuer: IssuerId,
    /// The agent.
    pub agent: AgentId,
    /// The agent's namespace.
    pub namespace: String,
    /// The user.
    pub user: UserId,
    /// The tool.
    pub tool: Tool,
    /// The scopes asked for.
    pub scopes: Vec<String>,
    /// Where the callback sends the browser.
    pub return_url: Option<String>,
    /// The `redirect_uri` sent to the provider.
    pub redirect_uri: String,
    /// The provider binding the flow began with.
    pub provider_binding: Option<String>,
    /// Its status.
    pub status: FlowStatus,
    /// Why it was denied or failed; safe to show (never a code or token).
    pub error: Option<String>,
    /// The sealed PKCE verifier; `None` once the flow has ended.
    pub sealed_verifier: Option<Vec<u8>>,
    /// The sealed authorization code; present from the callback until the flow ends.
    pub sealed_code: Option<Vec<u8>>,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
    /// When it was begun.
    pub created_at: DateTime<Utc>,
}

/// A state change of one flow.
#[derive(Debug, Clone, Copy)]
pub struct FlowChange<'a> {
    /// The status the flow must be in now, or nothing changes.
    pub from: FlowStatus,
    /// The status it moves to.
    pub to: FlowStatus,
    /// Only while unexpired (by the database clock): callbacks and claims for completion.
    pub unexpired: bool,
    /// The sealed code to keep (set by the callback).
    pub sealed_code: Option<&'a [u8]>,
    /// Why it was denied or failed.
    pub error: Option<&'a str>,
}

/// Consent flows.
#[async_trait::async_trait]
pub trait FlowStore: Send + Sync + 'static {
    /// Records a new flow in status `Pending`.
    async fn create_flow(&self, flow: &NewFlow<'_>) -> Result<(), StoreError>;

    /// The flow with this id, in any status, expired or not.
    async fn flow(&self, id: &str) -> Result<Option<Flow>, StoreError>;

    /// The flow whose state hashes to `state_hash`, in any status, expired or not.
    async fn flow_by_state(&self, state_hash: &[u8; 32]) -> Result<Option<Flow>, StoreError>;

    /// Moves the flow from `change.from` to `change.to` if it is still in `change.from` (and,
    /// with `unexpired`, not past its expiry); returns whether it moved. Moving to a final
    /// status erases both sealed secrets; `sealed_code` and `error` are written when given.
    async fn transition(&self, id: &str, change: FlowChange<'_>) -> Result<bool, StoreError>;

    /// Up to `limit` flows that expired (by the database clock) before anyone finished them:
    /// still pending or holding a callback's code, oldest first.
    async fn expired_unfinished(&self, limit: u32) -> Result<Vec<Flow>, StoreError>;

    /// Deletes up to `limit` flows that expired before `before`; returns how many. Also erases
    /// the sealed secrets of every flow already past its expiry (by the database clock), so
    /// nothing of a flow outlives it but its record.
    async fn sweep_flows(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, StoreError>;
}
