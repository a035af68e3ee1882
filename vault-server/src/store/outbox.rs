//! The revocation outbox of each agent: sealed token sets deleted from the vault whose
//! revocation at the provider (RFC 7009) is still owed.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{AgentRecord, StoreError};
use crate::crypto::SealedCredential;
use crate::ids::{Generation, Tool, UserId};

/// A revocation owed to a provider.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    /// Row id within its agent's outbox.
    pub id: i64,
    /// Whose credential it was.
    pub user: UserId,
    /// Which tool.
    pub tool: Tool,
    /// The generation its envelope is bound to.
    pub generation: Generation,
    /// The token set, still sealed.
    pub sealed: SealedCredential,
    /// Failed deliveries so far.
    pub attempts: u32,
    /// When the revocation was requested.
    pub created_at: DateTime<Utc>,
}

/// Revocations owed, leased to one deliverer at a time.
#[async_trait::async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    /// Deletes credentials and queues their provider revocation in one transaction; the new
    /// entries come back leased to `owner` for immediate delivery. `audit` is appended to the
    /// agent's chain in the same transaction.
    async fn delete_into_outbox(
        &self,
        agent: &AgentRecord,
        user: &UserId,
        tool: Option<&Tool>,
        owner: uuid::Uuid,
        lease: Duration,
        audit: Vec<crate::audit::AuditRecord>,
    ) -> Result<Vec<OutboxEntry>, StoreError>;

    /// Leases up to `limit` due outbox entries across all agents to `owner`.
    async fn claim_outbox(
        &self,
        owner: uuid::Uuid,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<(AgentRecord, OutboxEntry)>, StoreError>;

    /// Removes a delivered (or abandoned) outbox entry.
    async fn finish_outbox(&self, agent: &AgentRecord, id: i64) -> Result<(), StoreError>;

    /// Schedules the next delivery attempt after `wait`, recording `error`. A failure at the
    /// provider is `counted` (it lengthens the next backoff); an attempt the vault's own provider
    /// guard never sent is not.
    async fn retry_outbox(
        &self,
        agent: &AgentRecord,
        id: i64,
        wait: Duration,
        error: &str,
        counted: bool,
    ) -> Result<(), StoreError>;
}
