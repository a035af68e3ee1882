//! Rotating one agent's key: the registry's retiring key, and the agent's rows still sealed
//! under it (credentials, queued revocations, consent-flow secrets), which a rotation re-seals
//! in batches before it destroys the retiring key.

use super::{AgentRecord, StoreError};
use crate::audit::AuditRecord;
use crate::crypto::SealedCredential;
use crate::ids::{Generation, Tool, UserId};

/// One of an agent's rows that holds a seal under an agent key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealedRow {
    /// A stored credential.
    Credential {
        /// Its user.
        user: UserId,
        /// Its tool.
        tool: Tool,
        /// Its generation.
        generation: Generation,
        /// Its envelope.
        sealed: SealedCredential,
    },
    /// A provider revocation still queued.
    Revocation {
        /// Its id in the agent's outbox.
        id: i64,
        /// Its user.
        user: UserId,
        /// Its tool.
        tool: Tool,
        /// The generation its envelope is bound to.
        generation: Generation,
        /// Its envelope.
        sealed: SealedCredential,
    },
    /// A consent flow's sealed secrets (each starts with the version that sealed it).
    Flow {
        /// Its `authorization_id`.
        id: String,
        /// Its user.
        user: UserId,
        /// Its tool.
        tool: Tool,
        /// The sealed PKCE verifier, until the flow ends.
        verifier: Option<Vec<u8>>,
        /// The sealed authorization code, from the callback until the flow ends.
        code: Option<Vec<u8>>,
    },
}

/// The registry's rotation of agent keys and the re-sealing of an agent's rows.
#[async_trait::async_trait]
pub trait AgentKeyStore: Send + Sync + 'static {
    /// Starts a rotation of `agent`'s key: `wrapped_key` (version `key_version`, wrapped by the
    /// current root) becomes current at once and the current key retiring, in a transaction
    /// that waits for every write still sealing under the current version, and appends `audit`
    /// to the agent's chain in it. False (nothing changed, nothing recorded) if the agent's key
    /// is no longer the one `agent` holds (its version and its wrap: a root rotation may have
    /// re-wrapped it), a rotation of it is in progress, or the agent is gone: re-read the
    /// registry. Refused with [`StoreError::KeyRotationInProgress`] while a root rotation is in
    /// progress.
    async fn begin_agent_key_rotation(
        &self,
        agent: &AgentRecord,
        wrapped_key: &[u8],
        key_version: u32,
        audit: Vec<AuditRecord>,
    ) -> Result<bool, StoreError>;

    /// At most `limit` of the agent's rows sealed under `version`: credentials, then queued
    /// revocations, then consent flows.
    async fn sealed_under(
        &self,
        agent: &AgentRecord,
        version: u32,
        limit: u32,
    ) -> Result<Vec<SealedRow>, StoreError>;

    /// How many of the agent's rows are sealed under `version`.
    async fn count_sealed_under(
        &self,
        agent: &AgentRecord,
        version: u32,
    ) -> Result<u64, StoreError>;

    /// Replaces the seals of `old` (as [`Self::sealed_under`] read it) by those of `new`, the
    /// same row re-sealed, only if the row still holds what `old` read; false otherwise (it
    /// changed or went meanwhile, and a new read finds whatever replaced it).
    async fn reseal(
        &self,
        agent: &AgentRecord,
        old: &SealedRow,
        new: &SealedRow,
    ) -> Result<bool, StoreError>;

    /// Ends the rotation retiring `retiring_version`: when no row of the agent is sealed under
    /// it any more, destroys the retiring key (in one transaction with that count, and with
    /// `audit` appended to the agent's chain) and answers `Some(0)`; otherwise changes nothing
    /// and answers `Some(rows left)`. `None` when that version is not retiring (another run
    /// finished, or the agent is gone).
    async fn finish_agent_key_rotation(
        &self,
        agent: &AgentRecord,
        retiring_version: u32,
        audit: Vec<AuditRecord>,
    ) -> Result<Option<u64>, StoreError>;
}
