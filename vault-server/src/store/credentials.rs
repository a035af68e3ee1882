//! The credentials table of each agent: one sealed token set per (user, tool), its generation,
//! its state and its vault TTL.

use chrono::{DateTime, Utc};

use super::{AgentRecord, StoreError};
use crate::audit::AuditRecord;
use crate::crypto::SealedCredential;
use crate::ids::{Generation, Tool, UserId};

/// Where one credential lives: its agent's registry entry (issuer, agent and schema), the user
/// and the tool.
#[derive(Debug, Clone, Copy)]
pub struct CredentialKey<'a> {
    /// The agent, as registered.
    pub agent: &'a AgentRecord,
    /// The owning user.
    pub user: &'a UserId,
    /// The tool.
    pub tool: &'a Tool,
}

/// The audit record of a release, for [`CredentialStore::load_releasing`].
#[derive(Debug, Clone)]
pub struct Release {
    /// The call's record, outcome OK; its generation is the one read.
    pub record: crate::audit::AuditRecord,
    /// Released only if the access token is valid past this (Unix seconds).
    pub valid_until: i64,
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

/// One credential as a connection list shows it; still sealed (scopes and whether a refresh
/// token is held are inside).
#[derive(Debug, Clone)]
pub struct CredentialSummary {
    /// The tool.
    pub tool: Tool,
    /// Its version.
    pub generation: Generation,
    /// Its state.
    pub state: CredentialState,
    /// The envelope.
    pub sealed: SealedCredential,
    /// When the access token expires, if known.
    pub access_expires_at: Option<DateTime<Utc>>,
    /// When it expires from the vault (it may already have: listing does not hide it).
    pub ttl_expires_at: DateTime<Utc>,
    /// When it was last written.
    pub updated_at: DateTime<Utc>,
}

/// What a write of a new credential version needs.
#[derive(Debug)]
pub struct NewCredential<'a> {
    /// The generation the envelope is bound to.
    pub generation: Generation,
    /// The envelope.
    pub sealed: &'a SealedCredential,
    /// When the access token expires, if known (kept in clear for refresh scheduling).
    pub access_expires_at: Option<DateTime<Utc>>,
    /// Vault TTL from now, in seconds. A refresh keeps the existing TTL and ignores this.
    pub ttl_seconds: u64,
}

/// A credential version to write at a generation the write itself takes, for
/// [`CredentialStore::upsert_next`].
pub struct NextCredential<'a> {
    /// The agent key version `seal` seals under: the write is fenced on it.
    pub key_version: u32,
    /// Seals the token set for the generation taken, under agent key `key_version`.
    pub seal: &'a (dyn Fn(Generation) -> SealedCredential + Send + Sync),
    /// When the access token expires, if known.
    pub access_expires_at: Option<DateTime<Utc>>,
    /// Vault TTL from now, in seconds.
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

impl SweepOutcome {
    /// The outcome of deleting `swept` credentials with at most `limit` asked for.
    pub(crate) fn of(swept: u64, limit: u32) -> Self {
        Self {
            swept,
            more: swept >= u64::from(limit),
        }
    }
}

/// The audit action of a credential the sweep deleted.
pub const SWEPT: &str = "sweep.expired";

/// Sealed credentials: written only with a generation newer than the stored one, read only
/// within their vault TTL.
#[async_trait::async_trait]
pub trait CredentialStore: Send + Sync + 'static {
    /// A new generation for a credential of this agent, never handed out before.
    async fn next_generation(&self, agent: &AgentRecord) -> Result<Generation, StoreError>;

    /// Writes a credential version unless a newer generation is already stored. A new token
    /// set is a new grant: it clears any re-auth mark, refresh lease and backoff. `audit` is
    /// appended to the agent's chain in the same transaction, whether or not a newer
    /// generation won: the write and its record commit or fail together.
    async fn upsert(
        &self,
        key: CredentialKey<'_>,
        new: NewCredential<'_>,
        audit: Vec<AuditRecord>,
    ) -> Result<Upserted, StoreError>;

    /// Writes a credential version at a new generation, as [`Self::next_generation`] and then
    /// [`Self::upsert`] would, and answers the generation. The last record of `audit` (the
    /// write's own) is stamped with it. A store may take the generation inside the write's
    /// transaction: one transaction and one commit where the two calls take two of each.
    async fn upsert_next(
        &self,
        key: CredentialKey<'_>,
        next: NextCredential<'_>,
        mut audit: Vec<AuditRecord>,
    ) -> Result<(Generation, Upserted), StoreError> {
        let generation = self.next_generation(key.agent).await?;
        if let Some(record) = audit.last_mut() {
            record.generation = Some(generation.get());
        }
        let sealed = (next.seal)(generation);
        let upserted = self
            .upsert(
                key,
                NewCredential {
                    generation,
                    sealed: &sealed,
                    access_expires_at: next.access_expires_at,
                    ttl_seconds: next.ttl_seconds,
                },
                audit,
            )
            .await?;
        Ok((generation, upserted))
    }

    /// The credential, unless absent or past its vault TTL.
    async fn load(&self, key: CredentialKey<'_>) -> Result<Option<StoredCredential>, StoreError>;

    /// The credential, as [`Self::load`] reads it, and `release`'s audit record appended to the
    /// agent's chain in the same statement when the credential can be released as it stands
    /// (usable, and its access token valid past `release.valid_until`), with the generation read:
    /// one round trip and one commit where a read and then an append take two of each.
    /// Answers the sequence of the record written, if one was. A store that cannot do both at
    /// once (or whose chain moved under it) writes nothing and answers `None`; the caller then
    /// records the call itself.
    async fn load_releasing(
        &self,
        key: CredentialKey<'_>,
        release: &Release,
    ) -> Result<(Option<StoredCredential>, Option<u64>), StoreError> {
        let _ = release;
        Ok((self.load(key).await?, None))
    }

    /// Every credential of `user` at this agent, past their vault TTL included (not yet swept),
    /// ordered by tool.
    async fn list(
        &self,
        agent: &AgentRecord,
        user: &UserId,
    ) -> Result<Vec<CredentialSummary>, StoreError>;

    /// Deletes one tool's credential, or every tool's when `tool` is `None`; returns how many.
    /// `audit` is appended in the same transaction.
    async fn delete(
        &self,
        agent: &AgentRecord,
        user: &UserId,
        tool: Option<&Tool>,
        audit: Vec<AuditRecord>,
    ) -> Result<u64, StoreError>;

    /// Replaces `old` with a refreshed version, only if `old` is still the stored generation
    /// (compare-and-swap); false means a newer write won and nothing was changed. Releases the
    /// refresh lease and clears the backoff. `audit` is appended in the same transaction when
    /// the swap happens, and not at all when it does not.
    async fn complete_refresh(
        &self,
        key: CredentialKey<'_>,
        old: Generation,
        new: NewCredential<'_>,
        audit: Vec<AuditRecord>,
    ) -> Result<bool, StoreError>;

    /// Marks `generation` as needing re-authorization and releases its refresh lease; `audit`
    /// is appended in the same transaction when `generation` is still the stored one.
    async fn mark_reauth_required(
        &self,
        key: CredentialKey<'_>,
        generation: Generation,
        audit: Vec<AuditRecord>,
    ) -> Result<(), StoreError>;

    /// Deletes up to `limit` credentials past their vault TTL, across all agents. With
    /// `revoke`, each deleted credential moves to its agent's revocation outbox in the same
    /// transaction, so its tokens are revoked at the provider as a Revoke would. Each deletion
    /// is recorded in its agent's audit chain in the same transaction, as [`SWEPT`].
    async fn sweep(
        &self,
        limit: u32,
        dry_run: bool,
        revoke: bool,
    ) -> Result<SweepOutcome, StoreError>;
}

/// The audit record of one credential the sweep deleted.
pub(crate) fn swept_record(agent: &str, user: &str, tool: &str, generation: i64) -> AuditRecord {
    AuditRecord {
        at_ms: crate::audit::now_ms(),
        action: SWEPT.into(),
        agent: Some(agent.into()),
        user: Some(user.into()),
        tool: Some(tool.into()),
        generation: u64::try_from(generation).ok(),
        verified: true,
        ..AuditRecord::default()
    }
}
