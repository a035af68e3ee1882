//! Persistence of agents and sealed credentials. The store sees only ciphertext; it never holds
//! a key or a token in clear.
//!
//! The boundary is one trait per table group ([`SchemaStore`], [`KeyStore`], [`AgentKeyStore`],
//! [`CredentialStore`], [`LeaseStore`], [`OutboxStore`], [`FlowStore`], [`RegistrationStore`],
//! [`AuditStore`]), gathered in [`Store`]. A new kind of state is a new trait and a new field,
//! and leaves the others alone. The stores persist what they are told and answer what they are
//! asked: every policy (backoff, lease lengths, which state follows which) is decided by the
//! caller in `vault/`, so the two backends differ only in SQL.

mod agent_keys;
mod audit;
mod credentials;
mod flows;
mod keys;
mod leases;
mod outbox;
mod postgres;
mod registrations;
mod rows;
mod sqlite;

use std::sync::Arc;

pub use agent_keys::{AgentKeyStore, SealedRow};
pub use audit::{AuditStore, Chain};
pub use credentials::{
    CredentialKey, CredentialState, CredentialStore, CredentialSummary, NewCredential,
    NextCredential, Release, SWEPT, StoredCredential, SweepOutcome, Upserted,
};
pub use flows::{Flow, FlowChange, FlowStatus, FlowStore, NewFlow};
pub use keys::{
    AgentPages, AgentRecord, KeyStore, NextRoot, RetiringKey, RootKeyRecord, RotationSwitch, Shred,
    ShredCounts, ShredPlan,
};
pub use leases::{LeaseStore, RefreshLease};
pub use outbox::{OutboxEntry, OutboxStore};
pub use postgres::{AUDIT_CHANNEL, AuditListener, PgStore, drop_database_and_roles, namespace_for};
pub use registrations::{NewRegistration, Registration, RegistrationStore};
pub use sqlite::SqliteStore;

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
    Database(#[source] sqlx::Error),
    /// The root key this process verified is no longer the vault's current one (a rotation
    /// finished, or is in progress towards it): it may not register agents.
    #[error("this process's root key is not the vault's current root key")]
    RootKeyChanged,
    /// The agent was shredded (`shred-agent`): its identity cannot be registered again.
    #[error("this agent was shredded and cannot be registered again")]
    AgentShredded,
    /// A write was sealed under an agent key version that a rotation has since retired: seal
    /// it again under the agent's current key (re-read the registry) and retry.
    #[error("the agent's key was rotated: the write was sealed under a retired version")]
    AgentKeyRotated,
    /// A key rotation cannot start while another kind is in progress (root and agent key
    /// rotations exclude each other); the message says which.
    #[error("{0}")]
    KeyRotationInProgress(String),
    /// Applying migrations failed.
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    pub(crate) fn from_sqlx(e: sqlx::Error) -> Self {
        if transient(&e) {
            Self::Unavailable(e)
        } else {
            Self::Database(e)
        }
    }
}

/// Every database error is classified on its way out of the store, so that an outage (a
/// restart, a failover, a full pool) reaches callers as UNAVAILABLE, which they retry, and
/// never as INTERNAL.
impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        Self::from_sqlx(e)
    }
}

/// Whether `e` says the database is (for now) out of reach rather than that the statement is
/// wrong: the connection broke or could not be made (a TLS handshake or a protocol message cut
/// short by a restarting server included: a misconfigured one stops startup instead), or the
/// database said so in its own terms (see [`sqlstate_transient`] and [`sqlite_transient`]).
fn transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => match db.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
            // SQLite's codes are numbers, which PostgreSQL's classes would misread (SQLite's
            // 531, a commit-hook constraint, is not PostgreSQL's class 53).
            Some(sqlite) => sqlx::error::DatabaseError::code(sqlite)
                .and_then(|code| code.parse::<u32>().ok())
                .is_some_and(sqlite_transient),
            None => db.code().is_some_and(|code| sqlstate_transient(&code)),
        },
        _ => false,
    }
}

/// A PostgreSQL SQLSTATE that a retry may get past: the server is shutting down or starting up
/// (class 57P), out of connections or resources (53), lost its connection (08), hit an I/O
/// error (58), or aborted a transaction that a retry would redo (serialization failure,
/// deadlock).
fn sqlstate_transient(code: &str) -> bool {
    ["08", "53", "57P", "58"]
        .iter()
        .any(|class| code.starts_with(class))
        || code == "40001"
        || code == "40P01"
        // lock_timeout: an agent schema's upgrade gave way to a long transaction on its tables.
        || code == "55P03"
}

/// A SQLite extended result code that a retry may get past: its primary code (the low byte) is
/// BUSY (5) or LOCKED (6), another connection holding the database, or IOERR (10), FULL (13) or
/// PROTOCOL (15), the disk or its locks failing for now.
fn sqlite_transient(code: u32) -> bool {
    matches!(code & 0xff, 5 | 6 | 10 | 13 | 15)
}

/// One batch of [`SchemaStore::upgrade_agents`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentUpgrades {
    /// Agent schemas this batch upgraded.
    pub upgraded: u64,
    /// Agent schemas still behind after it.
    pub left: u64,
}

/// Creating and upgrading the database itself.
#[async_trait::async_trait]
pub trait SchemaStore: Send + Sync + 'static {
    /// Applies control migrations and upgrades the spare schemas (as the owner role); agent
    /// schemas are upgraded online, by [`Self::upgrade_agents`] or on first use.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Checks that the database is migrated to this version and loads what serving needs from
    /// it; for a server that does not migrate (the serving role has no DDL right).
    async fn ready(&self) -> Result<(), StoreError>;

    /// Upgrades up to `batch` agent schemas that are behind this version's per-agent migrations,
    /// each in its own transaction, and says how many are still behind. Online: replicas keep
    /// serving, and upgrade an agent themselves if they use it first.
    async fn upgrade_agents(&self, batch: u32) -> Result<AgentUpgrades, StoreError>;

    /// Makes one spare agent schema, ready to be taken by the next new agent, when fewer than
    /// `target` are ready and no other replica is making one; true if it made one. A store
    /// without per-agent schemas (SQLite) makes none.
    async fn make_spare_schema(&self, target: u32) -> Result<bool, StoreError>;

    /// Resolves when a registration on this process may have taken a spare schema (a hint to
    /// make another; other replicas' registrations are found by polling). Never, for a store
    /// without spares.
    async fn spare_taken(&self);
}

/// A backend: every table group, from one database.
pub trait Backend:
    SchemaStore
    + KeyStore
    + AgentKeyStore
    + CredentialStore
    + LeaseStore
    + OutboxStore
    + FlowStore
    + RegistrationStore
    + AuditStore
{
}

impl<
    T: SchemaStore
        + KeyStore
        + AgentKeyStore
        + CredentialStore
        + LeaseStore
        + OutboxStore
        + FlowStore
        + RegistrationStore
        + AuditStore,
> Backend for T
{
}

/// The store, one handle per table group. Cheap to clone; every handle shares the backend's
/// connections.
#[derive(Clone)]
pub struct Store {
    /// Migrations and readiness.
    pub schema: Arc<dyn SchemaStore>,
    /// The root key record and the agent registry with its wrapped keys.
    pub keys: Arc<dyn KeyStore>,
    /// Agent key rotations, and the agent rows sealed under a retiring key.
    pub agent_keys: Arc<dyn AgentKeyStore>,
    /// Sealed credentials and their generations.
    pub credentials: Arc<dyn CredentialStore>,
    /// Refresh leases on credentials, and named leases for background jobs.
    pub leases: Arc<dyn LeaseStore>,
    /// Provider revocations owed.
    pub outbox: Arc<dyn OutboxStore>,
    /// Consent flows in progress.
    pub flows: Arc<dyn FlowStore>,
    /// Dynamic client registrations at authorization servers, shared by every replica.
    pub registrations: Arc<dyn RegistrationStore>,
    /// The audit chains: one per agent, one for the control plane.
    pub audit: Arc<dyn AuditStore>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Every table group served by `backend`.
    pub fn new<B: Backend>(backend: B) -> Self {
        let backend = Arc::new(backend);
        Self {
            schema: backend.clone(),
            keys: backend.clone(),
            agent_keys: backend.clone(),
            credentials: backend.clone(),
            leases: backend.clone(),
            outbox: backend.clone(),
            flows: backend.clone(),
            registrations: backend.clone(),
            audit: backend,
        }
    }
}

/// A migrated in-memory SQLite store, for unit tests.
#[cfg(test)]
pub(crate) async fn open_memory_for_tests() -> Store {
    let store = Store::new(
        SqliteStore::open_memory()
            .await
            .expect("an in-memory SQLite store"),
    );
    store
        .schema
        .migrate()
        .await
        .expect("migrations apply to an empty store");
    store
}

/// Opens (but does not migrate) the store the settings name.
pub async fn open(settings: &crate::config::DatabaseSettings) -> Result<Store, StoreError> {
    use crate::config::Database;
    if let Some(risk) = &settings.transport_warning {
        tracing::warn!("{risk}");
    }
    Ok(match &settings.database {
        Database::Postgres(_) => Store::new(PgStore::connect(settings).await?),
        Database::SqliteFile(path) => {
            Store::new(SqliteStore::open_file(path, settings.max_connections).await?)
        }
        Database::SqliteMemory => Store::new(SqliteStore::open_memory().await?),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::Connection as _;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

    use super::*;

    #[test]
    fn sqlstate_classes_that_pass_are_transient_and_statement_errors_are_not() {
        for code in [
            "08006", "53300", "57P01", "57P03", "58030", "40001", "40P01",
        ] {
            assert!(sqlstate_transient(code), "{code}");
        }
        for code in ["23505", "42P01", "22001", "57014"] {
            assert!(!sqlstate_transient(code), "{code}");
        }
    }

    #[tokio::test]
    async fn a_busy_sqlite_database_is_transient_and_its_constraint_errors_are_not() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("classify.db"))
            .create_if_missing(true)
            .busy_timeout(Duration::ZERO);
        let mut holder = SqliteConnection::connect_with(&options).await.unwrap();
        let mut other = SqliteConnection::connect_with(&options).await.unwrap();
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .execute(&mut holder)
            .await
            .unwrap();
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut holder)
            .await
            .unwrap();
        let busy = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut other)
            .await
            .unwrap_err();
        assert!(transient(&busy), "{busy}");
        sqlx::query("COMMIT").execute(&mut holder).await.unwrap();

        sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut other)
            .await
            .unwrap();
        let duplicate = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut other)
            .await
            .unwrap_err();
        assert!(!transient(&duplicate), "{duplicate}");
        // A commit-hook constraint (531) reads like PostgreSQL's class 53 but is not transient.
        assert!(!sqlite_transient(531));
        assert!(sqlite_transient(517), "BUSY_SNAPSHOT");
    }
}
