//! Persistence of agents and sealed credentials. The store sees only ciphertext; it never holds
//! a key or a token in clear.

mod postgres;
mod sqlite;

use chrono::{DateTime, Utc};

pub use postgres::{PgStore, drop_database_and_roles, namespace_for};
pub use sqlite::SqliteStore;

use crate::crypto::SealedCredential;
use crate::ids::{AgentId, Generation, IssuerId, Tool, UserId};

/// What can go wrong below the service.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or the pool is exhausted: worth retrying.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// Stored data violates an invariant the vault relies on.
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    /// Anything else from the database.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// Applying migrations failed.
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Opens (but does not migrate) the store the settings name.
pub async fn open(
    settings: &crate::config::DatabaseSettings,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    use crate::config::Database;
    if let Some(risk) = &settings.transport_warning {
        tracing::warn!("{risk}");
    }
    Ok(match &settings.database {
        Database::Postgres(_) => std::sync::Arc::new(PgStore::connect(settings).await?),
        Database::SqliteFile(path) => {
            std::sync::Arc::new(SqliteStore::open_file(path, settings.max_connections).await?)
        }
        Database::SqliteMemory => std::sync::Arc::new(SqliteStore::open_memory().await?),
    })
}

pub(crate) fn generation_of(value: i64) -> Result<Generation, StoreError> {
    u64::try_from(value)
        .ok()
        .and_then(Generation::new)
        .ok_or_else(|| StoreError::Corrupt(format!("non-positive generation {value}")))
}

pub(crate) fn key_version_of(value: i64) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|_| StoreError::Corrupt("key version out of range".into()))
}

impl StoreError {
    pub(crate) fn from_sqlx(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                Self::Unavailable(e)
            }
            other => Self::Database(other),
        }
    }
}

/// A registered agent: where its credentials live and its wrapped key.
#[derive(Debug, Clone)]
pub struct AgentRecord {
    /// The issuer that vouches for the agent.
    pub issuer: IssuerId,
    /// The agent.
    pub agent: AgentId,
    /// Its schema, derived from a hash of the id.
    pub namespace: String,
    /// The agent key, wrapped by the root key.
    pub wrapped_key: Vec<u8>,
    /// The agent key's version.
    pub key_version: u32,
}

/// Root key metadata kept in the control schema.
#[derive(Debug, Clone)]
pub struct RootKeyRecord {
    /// Seal of a constant under the root key.
    pub key_check: Vec<u8>,
    /// Argon2id salt and costs when the key comes from a passphrase.
    pub kdf: Option<(Vec<u8>, crate::crypto::KdfParams)>,
}

/// Credential state, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialState {
    /// Usable.
    Active,
    /// The provider rejected the grant; only a new StoreToken makes it usable again.
    ReauthRequired,
}

/// One stored credential version, still sealed.
#[derive(Debug, Clone)]
pub struct StoredCredential {
    /// Its version.
    pub generation: Generation,
    /// Its state.
    pub state: CredentialState,
    /// The envelope.
    pub sealed: SealedCredential,
}

/// What a write of a new credential version needs.
#[derive(Debug)]
pub struct NewCredential<'a> {
    /// The owning user.
    pub user: &'a UserId,
    /// The tool.
    pub tool: &'a Tool,
    /// The generation the envelope is bound to.
    pub generation: Generation,
    /// The envelope.
    pub sealed: &'a SealedCredential,
    /// When the access token expires, if known (kept in clear for refresh scheduling).
    pub access_expires_at: Option<DateTime<Utc>>,
    /// Vault TTL from now, in seconds. A refresh keeps the existing TTL and ignores this.
    pub ttl_seconds: u64,
}

/// Result of an upsert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    /// Written; the credential now expires from the vault at this time.
    Written {
        /// The vault TTL expiry, from the database clock.
        ttl_expires_at: DateTime<Utc>,
    },
    /// A concurrent write with a newer generation is already stored; ours is older and was
    /// dropped, exactly as if it had been written first and then replaced.
    Superseded,
}

/// Result of one sweep pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SweepOutcome {
    /// Credentials deleted (or, in a dry run, that would be).
    pub swept: u64,
    /// The limit was reached: more expired credentials may remain.
    pub more: bool,
}

/// Result of asking for the refresh lease of one credential generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshLease {
    /// This caller may call the provider; nobody else will until the lease expires.
    Acquired,
    /// Another caller (another replica) is refreshing it now.
    Held,
    /// A recent transient failure: no provider call before `until`.
    BackingOff {
        /// When the next attempt is allowed.
        until: DateTime<Utc>,
    },
    /// The generation moved on, or the credential needs re-authorization or is gone: re-read.
    Changed,
}

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
    pub attempts: i32,
    /// When the revocation was requested.
    pub created_at: DateTime<Utc>,
}

/// The operations the vault needs from a database. Implemented for PostgreSQL; the embedded
/// store implements the same trait.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies control migrations and upgrades every agent schema (as the owner role).
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Checks that the database is migrated to this version and loads what serving needs from
    /// it; for a server that does not migrate (the serving role has no DDL right).
    async fn ready(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The root key metadata, if the vault has been initialised.
    async fn root_key(&self) -> Result<Option<RootKeyRecord>, StoreError>;

    /// Records root key metadata unless another replica did first; returns what is stored.
    async fn init_root_key(&self, record: &RootKeyRecord) -> Result<RootKeyRecord, StoreError>;

    /// The agent's registry entry, if it has stored anything.
    async fn agent(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
    ) -> Result<Option<AgentRecord>, StoreError>;

    /// Registers the agent with `wrapped_key` and creates its schema, unless a concurrent call
    /// already did; returns the stored entry either way.
    async fn create_agent(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
        wrapped_key: &[u8],
        key_version: u32,
    ) -> Result<AgentRecord, StoreError>;

    /// Agents registered before identities named their issuer: (agent, key version, wrapped
    /// key). Their keys are wrapped without an issuer binding.
    async fn legacy_agents(&self) -> Result<Vec<(AgentId, u32, Vec<u8>)>, StoreError>;

    /// Gives a legacy agent to `issuer` with its key re-wrapped for it; false if another
    /// replica already did.
    async fn adopt_agent(
        &self,
        agent: &AgentId,
        issuer: &IssuerId,
        wrapped_key: &[u8],
    ) -> Result<bool, StoreError>;

    /// A new generation for a credential of this agent, never handed out before.
    async fn next_generation(&self, agent: &AgentRecord) -> Result<Generation, StoreError>;

    /// Writes a credential version unless a newer generation is already stored.
    async fn upsert(
        &self,
        agent: &AgentRecord,
        new: NewCredential<'_>,
    ) -> Result<Upserted, StoreError>;

    /// The credential, unless absent or past its vault TTL.
    async fn load(
        &self,
        agent: &AgentRecord,
        user: &UserId,
        tool: &Tool,
    ) -> Result<Option<StoredCredential>, StoreError>;

    /// Deletes one tool's credential, or every tool's when `tool` is `None`; returns how many.
    async fn delete(
        &self,
        agent: &AgentRecord,
        user: &UserId,
        tool: Option<&Tool>,
    ) -> Result<u64, StoreError>;

    /// Deletes up to `limit` credentials past their vault TTL, across all agents. With
    /// `revoke`, each deleted credential moves to its agent's revocation outbox in the same
    /// transaction, so its tokens are revoked at the provider as a Revoke would.
    async fn sweep(
        &self,
        limit: u32,
        dry_run: bool,
        revoke: bool,
    ) -> Result<SweepOutcome, StoreError>;

    /// Takes the refresh lease on `generation` for `ttl`, unless someone else holds it, the
    /// credential is backing off, or it has changed.
    async fn try_refresh_lease(
        &self,
        agent: &AgentRecord,
        user: &UserId,
        tool: &Tool,
        generation: Generation,
        owner: uuid::Uuid,
        ttl: std::time::Duration,
    ) -> Result<RefreshLease, StoreError>;

    /// Replaces `old` with a refreshed version, only if `old` is still the stored generation
    /// (compare-and-swap); false means a newer write won and nothing was changed.
    async fn complete_refresh(
        &self,
        agent: &AgentRecord,
        old: Generation,
        new: NewCredential<'_>,
    ) -> Result<bool, StoreError>;

    /// Marks `generation` as needing re-authorization (the provider rejected the grant).
    async fn mark_reauth_required(
        &self,
        agent: &AgentRecord,
        user: &UserId,
        tool: &Tool,
        generation: Generation,
    ) -> Result<(), StoreError>;

    /// Records a transient refresh failure of `generation` and returns when the next provider
    /// call is allowed: exponential from `base`, capped at `cap`, never before `retry_after`.
    #[allow(clippy::too_many_arguments)]
    async fn record_refresh_failure(
        &self,
        agent: &AgentRecord,
        user: &UserId,
        tool: &Tool,
        generation: Generation,
        retry_after: Option<std::time::Duration>,
        base: std::time::Duration,
        cap: std::time::Duration,
    ) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Deletes credentials and queues their provider revocation in one transaction; the new
    /// entries come back leased to `owner` for immediate delivery.
    async fn delete_into_outbox(
        &self,
        agent: &AgentRecord,
        user: &UserId,
        tool: Option<&Tool>,
        owner: uuid::Uuid,
        lease: std::time::Duration,
    ) -> Result<Vec<OutboxEntry>, StoreError>;

    /// Leases up to `limit` due outbox entries across all agents to `owner`.
    async fn claim_outbox(
        &self,
        owner: uuid::Uuid,
        lease: std::time::Duration,
        limit: u32,
    ) -> Result<Vec<(AgentRecord, OutboxEntry)>, StoreError>;

    /// Removes a delivered (or abandoned) outbox entry.
    async fn finish_outbox(&self, agent: &AgentRecord, id: i64) -> Result<(), StoreError>;

    /// Schedules another delivery attempt with exponential backoff.
    async fn retry_outbox(
        &self,
        agent: &AgentRecord,
        id: i64,
        error: &str,
    ) -> Result<(), StoreError>;

    /// Takes or renews the named lease for `ttl`; true if `holder` has it now.
    async fn try_lease(
        &self,
        name: &str,
        holder: uuid::Uuid,
        ttl: std::time::Duration,
    ) -> Result<bool, StoreError>;
}
