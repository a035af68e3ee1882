//! The use cases: store, get, refresh, revoke, sweep. Identity arrives as a verified [`Caller`];
//! nothing here knows gRPC. Data flows one way: this module → {store, crypto, oauth}.

mod agent_rotation;
mod authorization;
mod keys;
mod refresh;
mod revocation;
mod rotation;
mod shred;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use agent_rotation::{
    AGENT_KEY_DESTROYED, AGENT_KEY_ROTATION_STARTED, AgentKeyRotation, AgentRotationProgress,
    rotate_agent_key,
};
pub use authorization::{
    AuthorizationState, AuthorizationView, BegunAuthorization, CallbackOutcome, CallbackParams,
    CompletedAuthorization, ConnectionInfo, ConsentOptions, FLOW_RETENTION, pkce_challenge,
    return_url_allowed,
};
pub use keys::{UnlockError, UnlockedRoot, unlock_root_key};
pub use refresh::refresh_backoff;
pub use revocation::outbox_backoff;
pub use rotation::{
    ROOT_ROTATED, ROOT_ROTATION_ABORTED, ROOT_ROTATION_STARTED, RootRotation, RotationError,
    RotationOutcome, RotationProgress, abort_rotation, record_switch_if_missing,
    root_from_passphrase, rotated_to,
};
pub use shred::{AGENT_SHRED_STARTED, AGENT_SHREDDED, issuers_of, shred_agent};

use chrono::{DateTime, Utc};
use secrecy::SecretString;

use crate::audit::{AuditError, AuditRecord, Call, Changes, Owner, Recorder};
use crate::auth::Caller;
use crate::crypto::{Binding, Keyring, RootError, Unlocked, open_credential, seal_credential};
use crate::ids::{AgentId, Generation, IssuerId, Tool, UserId};
use crate::oauth::Providers;
use crate::policy::{Limits, Policy, PolicyHandle};
use crate::secret::TokenSet;
use crate::store::{
    AgentRecord, CredentialKey, CredentialState, NextCredential, Release, Store, StoreError,
    SweepOutcome, Upserted,
};

/// What a use case can answer besides success; named for what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// Nothing stored for this (agent, user, tool): start a consent flow.
    #[error("no credential is stored for this tool")]
    NotFound,
    /// The grant is unusable: the user must consent again.
    #[error("{0}")]
    ReauthRequired(String),
    /// The provider could not be reached; the credential is kept. Retry later.
    #[error("{0}")]
    ProviderUnavailable(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// StoreToken brought a refresh token while `VAULT_STORE_REFRESH_TOKENS=deny`: only the
    /// vault's own code exchange may create a refreshable credential.
    #[error(
        "this vault does not accept refresh tokens through StoreToken (VAULT_STORE_REFRESH_TOKENS=deny); acquire the credential through the vault's consent flow"
    )]
    RefreshTokenDenied,
    /// A request field is invalid.
    #[error("{field}: {problem}")]
    InvalidArgument {
        /// The field, as named in the proto.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A limit was reached (such as new agents per issuer); retry after the given time.
    #[error("{message}")]
    RateLimited {
        /// Safe to show.
        message: String,
        /// When a retry may succeed.
        retry_after: Duration,
    },
    /// The caller's own rate limit is spent; retry after the given time.
    #[error("rate limit of this {bucket} reached; retry in {:.1} s", .retry_after.as_secs_f64())]
    CallerRateLimited {
        /// `"agent"` or `"user"`: which bucket refused.
        bucket: &'static str,
        /// When a retry will be admitted.
        retry_after: Duration,
    },
    /// The operator's policy does not allow this call.
    #[error("{message}")]
    PolicyDenied {
        /// The rule that decided, as the policy file names it.
        rule: String,
        /// Safe to show: names the agent, the tool and the rule, never a secret.
        message: String,
    },
    /// The caller's deadline passed before a provider call or a write began; neither began.
    #[error("the call's deadline passed before {0}; nothing was done")]
    DeadlineExceeded(&'static str),
    /// No consent flow of the caller has this id.
    #[error("no consent flow of this caller has this authorization_id")]
    AuthorizationNotFound,
    /// The flow expired or already ended.
    #[error("{0}")]
    AuthorizationExpired(String),
    /// Consent was refused, or the provider refused the code.
    #[error("{0}")]
    AuthorizationDenied(String),
    /// Another agent or user tried to complete the flow; it is burned.
    #[error("this consent flow was begun by another agent or user; it can no longer be completed")]
    AuthorizationMismatch,
    /// The user has not come back from the provider yet.
    #[error("the user has not finished at the provider yet; poll GetAuthorization, then complete")]
    AuthorizationPending,
    /// No agent of that id is registered under the caller's issuer.
    #[error("no agent of that id is registered under the caller's issuer")]
    AgentNotFound,
    /// A key rotation cannot start now; the message says why and what to do.
    #[error("{0}")]
    KeyRotationRefused(String),
    /// The database is unreachable or saturated. Retry later.
    #[error("storage is unavailable")]
    Unavailable(#[source] StoreError),
    /// This replica cannot use the agent's key now: its root key was rotated away, a rotation
    /// to its root has not re-wrapped the agent yet, or the HSM failed. Another replica may
    /// serve the call.
    #[error("{0}")]
    KeyUnavailable(String),
    /// The call's audit record could not be written, so the call did nothing. Retry later.
    #[error("the audit log is unavailable")]
    AuditUnavailable(#[source] AuditError),
    /// A bug or a broken invariant; details go to the log, not the caller.
    #[error("internal error")]
    Unexpected(#[source] anyhow::Error),
}

impl From<StoreError> for VaultError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(_) => Self::Unavailable(err),
            StoreError::AgentKeyRotated => Self::KeyUnavailable(
                "the agent's key is being rotated and this write kept meeting a newer version; retry"
                    .into(),
            ),
            StoreError::AgentShredded => Self::PermissionDenied(
                "this agent was shredded (vault-server shred-agent); it cannot be registered again"
                    .into(),
            ),
            other => Self::Unexpected(other.into()),
        }
    }
}

/// What leaves the vault: an access token and its metadata. There is no refresh token here, by
/// construction.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The bearer token.
    pub access_token: SecretString,
    /// Usually `Bearer`.
    pub token_type: String,
    /// Unix seconds, when known.
    pub expires_at: Option<i64>,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// The credential version it came from.
    pub generation: Generation,
    /// Whether it was refreshed for this call.
    pub refreshed: bool,
}

/// Result of StoreToken.
#[derive(Debug, Clone, Copy)]
pub struct StoredToken {
    /// The new version.
    pub generation: Generation,
    /// When the vault will delete it.
    pub ttl_expires_at: DateTime<Utc>,
}

/// Whose credentials a Revoke deletes.
#[derive(Debug, Clone, Default)]
pub struct RevokeTarget {
    /// Another agent (admin only).
    pub agent: Option<AgentId>,
    /// Another user (admin only).
    pub user: Option<UserId>,
    /// One tool, or every tool when `None`.
    pub tool: Option<Tool>,
}

/// Result of Revoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoked {
    /// Credentials deleted from the vault.
    pub revoked: u32,
    /// Tokens revoked at the provider before the reply.
    pub provider_revoked: u32,
}

/// The current credential, opened.
struct Opened {
    entry: Arc<AgentEntry>,
    tokens: TokenSet,
    generation: Generation,
    /// The call's release record was written with the read, at this sequence
    /// ([`crate::store::CredentialStore::load_releasing`]).
    released: Option<u64>,
}

/// Opens a credential sealed under whichever of the entry's keys its version names.
fn open_sealed(
    entry: &AgentEntry,
    binding: Binding<'_>,
    sealed: &crate::crypto::SealedCredential,
) -> Result<TokenSet, crate::crypto::OpenError> {
    let key = entry
        .key_at(sealed.key_version)
        .ok_or(crate::crypto::OpenError)?;
    open_credential(key, binding, sealed)
}

/// How many times a write sealed under a key version that a rotation retired meanwhile is
/// sealed again under the current one before the call fails (UNAVAILABLE, to retry).
const RESEAL_ATTEMPTS: u32 = 3;

/// An agent's registry entry with its key unwrapped, cached for the life of the process.
type AgentEntry = Unlocked<AgentRecord>;

/// Tunables of the use cases.
#[derive(Debug, Clone)]
pub struct VaultOptions {
    /// Default and longest vault TTL of a credential.
    pub secrets_ttl_seconds: u64,
    /// How long a refresh lease lasts; must outlive one provider call.
    pub refresh_lease: Duration,
    /// First backoff after a transient provider failure; doubles per failure.
    pub backoff_base: Duration,
    /// Longest backoff.
    pub backoff_cap: Duration,
    /// How long an undeliverable provider revocation is retried before it is dropped.
    pub revocation_max_age: Duration,
    /// Whether StoreToken may bring a refresh token.
    pub store_refresh_tokens: bool,
    /// The scope StoreToken needs, for the refusal message.
    pub store_scope: String,
    /// Largest `min_valid_seconds` GetToken accepts.
    pub max_min_valid_seconds: u64,
    /// Swept credentials are revoked at their provider through the outbox.
    pub sweep_revokes: bool,
    /// New agents one issuer may cause per minute.
    pub agent_creation_per_minute: u32,
    /// After a credential's access token was obtained, refreshes that the token's expiry does
    /// not force are answered with the current token for this long. Bounds how often callers
    /// can make the vault call a provider (refresh amplification).
    pub refresh_cooldown: Duration,
    /// The consent flow.
    pub consent: ConsentOptions,
    /// Successful GetToken releases are recorded in the audit log.
    pub audit_releases: bool,
    /// The operator's policy (`VAULT_POLICY_FILE`), hot-reloaded.
    pub policy: Arc<PolicyHandle>,
    /// The global rate limits, per agent and per (agent, user), charged by every call.
    pub limits: Arc<Limits>,
}

/// The vault's use cases over a store, the root key and the provider registry.
pub struct Vault {
    store: Store,
    keyring: Keyring<AgentRecord>,
    /// The stored key check this process's root verified at startup: agents are registered
    /// only while it is the current one.
    /// The stored key check this process's root verified; refreshed when a rotation to the same
    /// root stored a new one (each seal of the constant differs).
    key_check: arc_swap::ArcSwap<Vec<u8>>,
    providers: Providers,
    options: VaultOptions,
    /// New-agent budget per issuer: every new agent is a schema, a role and a key, so a flood of
    /// invented agent ids from one issuer is throttled rather than turned into DDL.
    creations: std::sync::Mutex<HashMap<IssuerId, TokenBucket>>,
    /// Identifies this process as a lease holder.
    instance: uuid::Uuid,
    /// Agent key rotations this replica runs for RotateAgentKey.
    rotations: agent_rotation::Runs,
    /// In-process half of refresh coalescing: one gate per credential.
    gates: refresh::Gates,
    /// Refreshes and revocations that finish after their caller hung up.
    detached: crate::jobs::Detached,
    outcomes: refresh::Outcomes,
    /// Writes the audit records that no credential write carries.
    recorder: Arc<Recorder>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").finish_non_exhaustive()
    }
}

/// A token bucket: `capacity` tokens, refilled continuously at `capacity` per minute.
#[derive(Debug, Clone, Copy)]
struct TokenBucket {
    tokens: f64,
    at: std::time::Instant,
}

impl TokenBucket {
    /// Takes one token, or says how long until one is there.
    fn take(&mut self, capacity: u32, now: std::time::Instant) -> Result<(), Duration> {
        let capacity = f64::from(capacity);
        let per_second = capacity / 60.0;
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_second).min(capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / per_second))
        }
    }
}

/// Refuses to begin `what` (a provider call, a write) once `deadline` has passed: the caller is
/// gone, and work begun for nobody only costs the provider and the database.
pub(crate) fn before(
    deadline: Option<std::time::Instant>,
    what: &'static str,
) -> Result<(), VaultError> {
    match deadline {
        Some(deadline) if std::time::Instant::now() >= deadline => {
            Err(VaultError::DeadlineExceeded(what))
        }
        _ => Ok(()),
    }
}

fn limited(limited: crate::policy::Limited) -> VaultError {
    VaultError::CallerRateLimited {
        bucket: limited.bucket,
        retry_after: limited.retry_after,
    }
}

/// `scopes` within `tool`'s ceiling under `policy`, or INVALID_ARGUMENT naming `field` and the rule.
fn within_ceiling(
    policy: Option<&Policy>,
    field: &'static str,
    tool: &Tool,
    scopes: &[String],
) -> Result<(), VaultError> {
    match policy.map(|p| p.check_scopes(tool, scopes)) {
        Some(Err(over)) => Err(VaultError::InvalidArgument {
            field,
            problem: over.problem,
        }),
        _ => Ok(()),
    }
}

/// The longest TTL a credential for `tool` may have: the tool's maximum under `policy` when
/// tighter than the vault's.
fn ttl_cap(policy: Option<&Policy>, tool: &Tool, secrets_ttl_seconds: u64) -> u64 {
    policy
        .and_then(|p| p.max_ttl(tool))
        .map_or(secrets_ttl_seconds, |max| max.min(secrets_ttl_seconds))
}

/// Whether a token expiring at `expires_at` (unix seconds; `None` = never) is expired at `now`.
const fn is_expired(expires_at: Option<i64>, now: i64) -> bool {
    match expires_at {
        Some(at) => at <= now,
        None => false,
    }
}

impl Vault {
    /// The vault's Client ID Metadata Document, when an MCP tool may use one.
    pub fn client_metadata_document(&self) -> Option<serde_json::Value> {
        self.providers.registrar()?.metadata_document()
    }

    /// A vault over `store`, whose root key has already been unlocked ([`unlock_root_key`]).
    pub fn new(
        store: Store,
        root: UnlockedRoot,
        providers: Providers,
        options: VaultOptions,
    ) -> Self {
        Self {
            keyring: Keyring::new(root.root),
            key_check: arc_swap::ArcSwap::from_pointee(root.key_check),
            providers,
            options,
            creations: std::sync::Mutex::new(HashMap::new()),
            instance: uuid::Uuid::new_v4(),
            rotations: agent_rotation::Runs::default(),
            gates: refresh::Gates::default(),
            detached: crate::jobs::Detached::default(),
            outcomes: refresh::Outcomes::default(),
            recorder: Recorder::new(store.clone(), Changes::default()),
            store,
        }
    }

    /// The audit recorder, for the RPC layer (each call's record) and the jobs.
    pub fn recorder(&self) -> &Arc<Recorder> {
        &self.recorder
    }

    /// Whether successful GetToken releases are recorded (`VAULT_AUDIT_RELEASES`).
    pub fn records_releases(&self) -> bool {
        self.options.audit_releases
    }

    /// Records a background event in `agent`'s chain. The event already happened, so a record
    /// that cannot be written is logged loudly rather than undoing anything.
    pub(crate) async fn record_event(&self, agent: &AgentRecord, record: AuditRecord) {
        OwedRecord::new(self, agent, record).record_now().await;
    }

    /// The store, for the sweeper.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Waits up to `within` for refreshes and revocations still finishing for callers that
    /// hung up; for shutdown, once no call can start new ones.
    pub async fn drain(&self, within: Duration) {
        self.detached.drain(within).await;
    }

    /// Gives agents registered before identities named their issuer to the one configured
    /// issuer, re-wrapping each agent key bound to it. With several issuers there is no safe
    /// owner to guess: startup stops and says how to proceed.
    pub async fn adopt_legacy_agents(&self, issuers: &[IssuerId]) -> anyhow::Result<()> {
        let legacy = self.store.keys.legacy_agents().await?;
        if legacy.is_empty() {
            return Ok(());
        }
        let [issuer] = issuers else {
            anyhow::bail!(
                "VAULT_JWT_ISSUER: {} agents were stored before caller identities named their issuer, and several issuers are configured; start once with only the issuer those agents belong to, so that it adopts them",
                legacy.len()
            );
        };
        let mut adopted = 0usize;
        for (agent, version, wrapped) in legacy {
            let key = self
                .keyring
                .root()
                .unwrap_legacy_agent_key(&agent, version, &wrapped)
                .map_err(|err| anyhow::anyhow!("the agent key of {agent}: {err}"))?;
            let rewrapped = self.keyring.root().wrap_agent_key(issuer, &agent, &key)?;
            if self
                .store
                .keys
                .adopt_agent(&agent, issuer, &rewrapped)
                .await?
            {
                adopted += 1;
            }
        }
        tracing::info!(adopted, %issuer, "agents from before issuer-bound identities now belong to the configured issuer");
        Ok(())
    }

    /// Spends one of `issuer`'s new-agent tokens, or refuses with when to retry.
    fn admit_new_agent(&self, issuer: &IssuerId) -> Result<(), VaultError> {
        let capacity = self.options.agent_creation_per_minute;
        let now = std::time::Instant::now();
        let mut buckets = self.creations.lock().unwrap_or_else(|p| p.into_inner());
        // Only configured issuers get here (their tokens verified), so this map stays small.
        let bucket = buckets.entry(issuer.clone()).or_insert(TokenBucket {
            tokens: f64::from(capacity),
            at: now,
        });
        bucket.take(capacity, now).map_err(|retry_after| {
            tracing::warn!(%issuer, "new agents from this issuer are arriving faster than VAULT_AGENT_CREATION_PER_MINUTE; refusing one");
            VaultError::RateLimited {
                message: format!(
                    "too many new agents from this issuer (VAULT_AGENT_CREATION_PER_MINUTE = {capacity}); retry later"
                ),
                retry_after,
            }
        })
    }

    /// Admits a call by `caller` about `tool` (or about no one tool): the policy first, then
    /// the tool's rate limits, then the global ones. Answers the policy in force, for the call's
    /// further checks. All in memory.
    pub(crate) fn admit(
        &self,
        caller: &Caller,
        tool: Option<&Tool>,
    ) -> Result<Option<Arc<Policy>>, VaultError> {
        let policy = self.options.policy.current();
        if let (Some(policy), Some(tool)) = (&policy, tool) {
            policy
                .check_use(&caller.agent, tool)
                .map_err(|denied| VaultError::PolicyDenied {
                    rule: denied.rule,
                    message: denied.message,
                })?;
            if let Some(limits) = policy.limits(tool) {
                limits.take(caller).map_err(limited)?;
            }
        }
        self.options.limits.take(caller).map_err(limited)?;
        Ok(policy)
    }

    /// [`Self::admit`] for GetToken and Refresh, which also need a step-up where the policy
    /// asks for one.
    fn admit_release(&self, caller: &Caller, tool: &Tool) -> Result<(), VaultError> {
        if let Some(policy) = self.admit(caller, Some(tool))? {
            policy
                .check_step_up(caller, tool, Utc::now().timestamp())
                .map_err(|denied| VaultError::PolicyDenied {
                    rule: denied.rule,
                    message: denied.message,
                })?;
        }
        Ok(())
    }

    /// Refuses to release a token whose scopes are over `tool`'s ceiling in the policy in force
    /// now: one stored before the ceiling was tightened, or widened by a provider at refresh.
    fn release_within_ceiling(&self, tool: &Tool, scopes: &[String]) -> Result<(), VaultError> {
        match self
            .options
            .policy
            .current()
            .map(|policy| policy.check_scopes(tool, scopes))
        {
            Some(Err(over)) => Err(VaultError::PolicyDenied {
                rule: over.rule,
                message: format!(
                    "the credential for tool {tool} holds scopes {}; store or authorize one within it",
                    over.problem
                ),
            }),
            _ => Ok(()),
        }
    }

    async fn agent_entry(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
        create: bool,
    ) -> Result<Option<Arc<AgentEntry>>, VaultError> {
        let (entry, owed) = self.agent_entry_owing(issuer, agent, create).await?;
        owed.record_now().await;
        Ok(entry)
    }

    /// As [`Self::agent_entry`], except that when this call registered the agent, the first
    /// record of its chain (its key's making) is returned owed: the caller's write commits it
    /// with its own record, one transaction where two were.
    async fn agent_entry_owing(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
        create: bool,
    ) -> Result<(Option<Arc<AgentEntry>>, OwedRecord), VaultError> {
        if let Some(entry) = self.keyring.cached(issuer, agent) {
            return Ok((Some(entry), OwedRecord::default()));
        }
        let mut owed = OwedRecord::default();
        let record = match self.store.keys.agent(issuer, agent).await? {
            Some(record) => record,
            None if create => {
                self.admit_new_agent(issuer)?;
                let (version, wrapped) = self
                    .keyring
                    .new_agent_key(issuer, agent)
                    .map_err(|err| self.root_failed(agent, err))?;
                // A concurrent creator may win; then its key is the agent's key.
                let mut attempt = self
                    .store
                    .keys
                    .create_agent(issuer, agent, &wrapped, version, &self.key_check.load())
                    .await;
                // The key check changed: if this root is still current (a rotation back to it
                // stored a new check), the refreshed check lets the registration through.
                if matches!(attempt, Err(StoreError::RootKeyChanged))
                    && self.root_is_current().await?
                {
                    attempt = self
                        .store
                        .keys
                        .create_agent(issuer, agent, &wrapped, version, &self.key_check.load())
                        .await;
                }
                let record = match attempt {
                    Err(StoreError::RootKeyChanged) => return Err(self.root_moved().await),
                    other => other?,
                };
                if record.wrapped_key == wrapped {
                    // This call made the agent's key: the first record of its chain says so.
                    let created = AuditRecord {
                        agent: Some(agent.as_str().into()),
                        caller_iss: Some(issuer.as_str().into()),
                        target: Some(format!("{{\"key_version\":{version}}}")),
                        ..crate::audit::event_without_user(AGENT_KEY_CREATED)
                    };
                    owed = OwedRecord::new(self, &record, created);
                }
                record
            }
            None => return Ok((None, owed)),
        };
        let version = record.key_version;
        let wrapped = record.wrapped_key.clone();
        let next = record.next_wrapped_key.clone();
        let retiring = record.retiring.clone();
        let wraps: Vec<&[u8]> = std::iter::once(wrapped.as_slice())
            .chain(next.as_deref())
            .collect();
        let retiring = retiring
            .as_ref()
            .map(|r| (r.version, r.wrapped_key.as_slice()));
        match self
            .keyring
            .unlock(issuer, agent, version, &wraps, retiring, record)
        {
            Ok(entry) => Ok((Some(entry), owed)),
            Err(RootError::DoesNotOpen) if self.root_is_current().await? => {
                Err(VaultError::Unexpected(anyhow::anyhow!(
                    "the agent key of {agent} does not open under the root key"
                )))
            }
            Err(RootError::DoesNotOpen) => Err(self.root_moved().await),
            Err(err) => Err(self.root_failed(agent, err)),
        }
    }

    /// The agent's entry read again from the registry, its keys unwrapped again: after a
    /// rotation of its key made the cached entry stale.
    async fn reload_entry(&self, stale: &AgentEntry) -> Result<Arc<AgentEntry>, VaultError> {
        let (issuer, agent) = (&stale.record.issuer, &stale.record.agent);
        self.keyring.forget(issuer, agent);
        self.agent_entry(issuer, agent, false)
            .await?
            .ok_or(VaultError::NotFound)
    }

    /// The entry to open a seal of agent key `version` with. A newer version than the cached
    /// entry knows means a rotation this replica has not seen: the registry is read again. A
    /// retiring version is used only while the registry still says it is retiring (the rotation
    /// may have destroyed it since, and a row restored under it must not open). Any other
    /// version is not held, and the open fails.
    async fn entry_for(
        &self,
        entry: Arc<AgentEntry>,
        version: u32,
    ) -> Result<Arc<AgentEntry>, VaultError> {
        if version == entry.key.version {
            return Ok(entry);
        }
        if version > entry.key.version {
            // Only when the registry holds that version: a row claiming one it does not (tampered,
            // or from elsewhere) must not make every read unwrap keys again (an HSM call each).
            let held = self
                .store
                .keys
                .agent(&entry.record.issuer, &entry.record.agent)
                .await?
                .is_some_and(|record| {
                    record.key_version == version
                        || record.retiring.is_some_and(|r| r.version == version)
                });
            if !held {
                return Ok(entry);
            }
            tracing::info!(agent = %entry.record.agent, version, "the agent key was rotated: reading it again");
            return self.reload_entry(&entry).await;
        }
        let Some(retiring) = entry.retiring.as_ref().filter(|k| k.version == version) else {
            return Ok(entry);
        };
        let still = self
            .store
            .keys
            .agent(&entry.record.issuer, &entry.record.agent)
            .await?
            .and_then(|record| record.retiring)
            .is_some_and(|r| r.version == retiring.version);
        if still {
            Ok(entry)
        } else {
            self.reload_entry(&entry).await
        }
    }

    /// Whether this process's root is still the vault's current root (no rotation moved the
    /// vault off it, and none is moving the vault onto it).
    async fn root_is_current(&self) -> Result<bool, VaultError> {
        let Some(record) = self.store.keys.root_key().await? else {
            return Ok(false);
        };
        if *record.key_check == **self.key_check.load() {
            return Ok(true);
        }
        // Another seal of the check constant: is it this root's?
        let current = self
            .keyring
            .root()
            .verifies(&record.key_check)
            .map_err(|err| VaultError::KeyUnavailable(err.to_string()))?;
        if current {
            self.key_check.store(std::sync::Arc::new(record.key_check));
        }
        Ok(current)
    }

    /// The answer when this process's root key is not the vault's current one: a rotation
    /// finished while it ran (it must restart with the new root), or a rotation to its root is
    /// still re-wrapping agents. Another replica may serve the call.
    async fn root_moved(&self) -> VaultError {
        let pending = match self.store.keys.root_key().await {
            Ok(Some(record)) => record
                .next
                .is_some_and(|next| self.keyring.root().verifies(&next.key_check) == Ok(true)),
            _ => false,
        };
        if pending {
            tracing::warn!(
                "an agent's key is not yet wrapped under this replica's root key (a rotation to it is in progress); refused the call"
            );
            VaultError::KeyUnavailable(
                "a root key rotation is in progress and this agent's key is not yet available on this replica; retry".into(),
            )
        } else {
            tracing::error!(
                "the vault's root key was rotated while this replica ran: it can serve only agents it has already unlocked; restart it with the new root key"
            );
            VaultError::KeyUnavailable(
                "this replica's root key was rotated away; retry (another replica will serve the call)".into(),
            )
        }
    }

    /// The root key's device failed.
    fn root_failed(&self, agent: &AgentId, err: RootError) -> VaultError {
        tracing::error!(%agent, error = %err, "the root key failed to wrap or unwrap an agent key");
        VaultError::KeyUnavailable("the vault's root key is unavailable; retry".into())
    }

    /// Upserts the caller's token set for `tool`. `ttl_seconds` of `None` means the default;
    /// a longer TTL than the default is shortened to it.
    #[tracing::instrument(skip(self, caller, tokens), fields(agent = %caller.agent, tool = %tool))]
    pub async fn store_token(
        &self,
        call: &Call,
        caller: &Caller,
        tool: &Tool,
        mut tokens: TokenSet,
        ttl_seconds: Option<u64>,
    ) -> Result<StoredToken, VaultError> {
        if !caller.store {
            return Err(VaultError::PermissionDenied(format!(
                "StoreToken needs the {} scope in the caller token; agents read, gateways store",
                self.options.store_scope
            )));
        }
        if tokens.refresh_token.is_some() && !self.options.store_refresh_tokens {
            return Err(VaultError::RefreshTokenDenied);
        }
        let policy = self.admit(caller, Some(tool))?;
        within_ceiling(policy.as_deref(), "token.scopes", tool, &tokens.scopes)?;
        // The credential remembers which authorization server it belongs to (DESIGN §6).
        tokens.provider = match self.providers.get(tool) {
            // An MCP tool's binding names the issuer discovery finds; when it cannot be found
            // now, the credential binds to no issuer and is never refreshed through one.
            Some(provider) => Some(
                provider
                    .binding()
                    .await
                    .unwrap_or_else(|_| provider.unresolved_binding()),
            ),
            None => None,
        };
        tokens.obtained_at = Some(Utc::now().timestamp());
        let max = ttl_cap(policy.as_deref(), tool, self.options.secrets_ttl_seconds);
        let ttl = ttl_seconds.map_or(max, |t| t.min(max));
        let (entry, owed) = self
            .agent_entry_owing(&caller.issuer, &caller.agent, true)
            .await?;
        let entry = entry.ok_or_else(|| {
            VaultError::Unexpected(anyhow::anyhow!("agent vanished after creation"))
        })?;
        call.on_agent(&entry.record);
        before(call.deadline(), "the write")?;
        let stored = self
            .write_credential(
                &entry,
                &caller.user,
                tool,
                &tokens,
                ttl,
                (owed, call.for_write()),
            )
            .await?;
        call.written();
        Ok(stored)
    }

    /// Seals `tokens` at the agent's next generation and writes them, unless a newer
    /// generation won meanwhile. `audit`'s record (stamped with the generation) commits with the
    /// write, after the owed one if any; the owed one is recorded on its own if the write fails.
    async fn write_credential(
        &self,
        entry: &AgentEntry,
        user: &UserId,
        tool: &Tool,
        tokens: &TokenSet,
        ttl: u64,
        (owed, audit): (OwedRecord, AuditRecord),
    ) -> Result<StoredToken, VaultError> {
        let records: Vec<AuditRecord> = owed.record().cloned().into_iter().chain([audit]).collect();
        let mut fresh: Option<Arc<AgentEntry>> = None;
        let mut attempts = 0;
        let (generation, outcome) = loop {
            let current = fresh.as_deref().unwrap_or(entry);
            let seal = |generation| {
                let binding = Binding {
                    agent: &current.record.agent,
                    user,
                    tool,
                    generation,
                };
                seal_credential(&current.key, binding, tokens)
            };
            let key = CredentialKey {
                agent: &current.record,
                user,
                tool,
            };
            let written = self
                .store
                .credentials
                .upsert_next(
                    key,
                    NextCredential {
                        key_version: current.key.version,
                        seal: &seal,
                        access_expires_at: tokens
                            .expires_at
                            .and_then(|s| DateTime::from_timestamp(s, 0)),
                        ttl_seconds: ttl,
                    },
                    records.clone(),
                )
                .await;
            match written {
                // A rotation made another key version current since this replica cached the
                // agent: seal again under it (at a new generation: none is ever reused).
                Err(StoreError::AgentKeyRotated) if attempts < RESEAL_ATTEMPTS => {
                    attempts += 1;
                    fresh = match self.reload_entry(current).await {
                        Ok(fresh) => Some(fresh),
                        Err(err) => {
                            owed.record_now().await;
                            return Err(err);
                        }
                    };
                }
                Err(err) => {
                    // The registration stands: its record goes in on its own, before this
                    // call's own record of its failure.
                    owed.record_now().await;
                    return Err(err.into());
                }
                Ok(written) => break written,
            }
        };
        owed.settled();
        self.recorder.changes().publish(&entry.record.namespace);
        let ttl_expires_at = match outcome {
            Upserted::Written { ttl_expires_at } => ttl_expires_at,
            Upserted::Superseded => {
                tracing::info!(%generation, "a concurrent, newer write won");
                Utc::now() + chrono::Duration::seconds(ttl as i64)
            }
        };
        tracing::info!(%generation, "stored credential");
        Ok(StoredToken {
            generation,
            ttl_expires_at,
        })
    }

    async fn open_current(
        &self,
        caller: &Caller,
        tool: &Tool,
        call: Option<&Call>,
        release_until: Option<i64>,
    ) -> Result<Opened, VaultError> {
        let entry = self
            .agent_entry(&caller.issuer, &caller.agent, false)
            .await?
            .ok_or(VaultError::NotFound)?;
        if let Some(call) = call {
            call.on_agent(&entry.record);
        }
        let key = CredentialKey {
            agent: &entry.record,
            user: &caller.user,
            tool,
        };
        let turn = release_until.and_then(|_| self.recorder.alone(&entry.record.namespace));
        let (stored, released) = match (call, release_until, &turn) {
            (Some(call), Some(valid_until), Some(_)) => {
                let release = Release {
                    record: call.for_write(),
                    valid_until,
                };
                self.store.credentials.load_releasing(key, &release).await?
            }
            _ => (self.store.credentials.load(key).await?, None),
        };
        drop(turn);
        let mut stored = stored.ok_or(VaultError::NotFound)?;
        if stored.state == CredentialState::ReauthRequired {
            return Err(VaultError::ReauthRequired(format!(
                "the provider rejected the grant for tool {tool}; the user must authorize again"
            )));
        }
        let entry = self.entry_for(entry, stored.sealed.key_version).await?;
        if entry.key_at(stored.sealed.key_version).is_none()
            && stored.sealed.key_version < entry.key.version
        {
            // Read under a version a rotation destroyed since, having re-sealed the row in the
            // meantime? Read it again: a re-seal keeps the generation (so the release recorded
            // with the first read stays true). Anything else is not served.
            let key = CredentialKey {
                agent: &entry.record,
                user: &caller.user,
                tool,
            };
            if let Some(again) = self.store.credentials.load(key).await?
                && again.generation == stored.generation
                && again.state == stored.state
            {
                stored = again;
            }
        }
        let binding = Binding {
            agent: &caller.agent,
            user: &caller.user,
            tool,
            generation: stored.generation,
        };
        let tokens = open_sealed(&entry, binding, &stored.sealed).map_err(|_| {
            // Either tampering or a row moved from elsewhere: never serve it, and say so loudly.
            tracing::error!(generation = %stored.generation, "stored credential does not open for its row");
            if let (Some(call), Some(sequence)) = (call, released) {
                // Its release was recorded with the read: the failure's record says it was not made.
                call.retracts(sequence);
            }
            VaultError::Unexpected(anyhow::anyhow!("credential ciphertext does not open for its binding"))
        })?;
        Ok(Opened {
            entry,
            tokens,
            generation: stored.generation,
            released,
        })
    }

    /// Whether a still-valid token was obtained so recently that another refresh now would only
    /// spend a provider call.
    fn cooling_down(&self, tokens: &TokenSet, now: i64) -> bool {
        let cooldown = i64::try_from(self.options.refresh_cooldown.as_secs()).unwrap_or(i64::MAX);
        !is_expired(tokens.expires_at, now)
            && tokens
                .obtained_at
                .is_some_and(|at| now.saturating_sub(at) < cooldown)
    }

    fn issue(tokens: TokenSet, generation: Generation, refreshed: bool) -> IssuedToken {
        IssuedToken {
            access_token: tokens.access_token,
            token_type: tokens.token_type,
            expires_at: tokens.expires_at,
            scopes: tokens.scopes,
            generation,
            refreshed,
        }
    }

    /// A usable access token for the caller and `tool`, refreshed first when it expires within
    /// `max(min_valid_seconds, 30)` and a refresh token and provider exist.
    #[tracing::instrument(skip(self, caller), fields(agent = %caller.agent, tool = %tool))]
    pub async fn get_token(
        self: &Arc<Self>,
        call: &Call,
        caller: &Caller,
        tool: &Tool,
        min_valid_seconds: u64,
    ) -> Result<IssuedToken, VaultError> {
        if min_valid_seconds > self.options.max_min_valid_seconds {
            return Err(VaultError::InvalidArgument {
                field: "min_valid_seconds",
                problem: format!(
                    "must be at most {} (VAULT_MAX_MIN_VALID_SECONDS)",
                    self.options.max_min_valid_seconds
                ),
            });
        }
        self.admit_release(caller, tool)?;
        let now = Utc::now().timestamp();
        let wanted_until = now.saturating_add(min_valid_seconds.max(30) as i64);
        let release_until = self.records_releases().then_some(wanted_until);
        let current = self
            .open_current(caller, tool, Some(call), release_until)
            .await?;
        if let Err(denied) = self.release_within_ceiling(tool, &current.tokens.scopes) {
            if let Some(sequence) = current.released {
                // Its release was recorded with the read: the refusal's record says it was not made.
                call.retracts(sequence);
            }
            return Err(denied);
        }
        if current.released.is_some() {
            // The store released it by the same rule as below (usable, and valid past
            // `wanted_until`) and wrote the call's record with the read.
            call.generation(current.generation);
            call.written();
            let mut record = call.for_write();
            record.generation = Some(current.generation.get());
            self.recorder.count(&record);
            self.recorder
                .changes()
                .publish(&current.entry.record.namespace);
            return Ok(Self::issue(current.tokens, current.generation, false));
        }
        if !is_expired(current.tokens.expires_at, wanted_until)
            || self.cooling_down(&current.tokens, now)
        {
            return Ok(Self::issue(current.tokens, current.generation, false));
        }
        let still_valid = !is_expired(current.tokens.expires_at, now);
        let provider = self.providers.get(tool);
        let Some(provider) = provider.filter(|_| current.tokens.refresh_token.is_some()) else {
            // Nothing can refresh it. A token that is still valid beats none; an expired one is
            // useless to the caller.
            if still_valid {
                return Ok(Self::issue(current.tokens, current.generation, false));
            }
            return Err(VaultError::ReauthRequired(format!(
                "the access token for tool {tool} has expired and {}; store a new token",
                if current.tokens.refresh_token.is_none() {
                    "there is no refresh token"
                } else {
                    "no OAuth provider is configured to refresh it"
                }
            )));
        };
        match self
            .refresh_fenced(caller, tool, current.generation, provider, call.deadline())
            .await
        {
            Err(VaultError::ProviderUnavailable(message)) if still_valid => {
                tracing::info!(%message, "provider unavailable; serving the still-valid token");
                Ok(Self::issue(current.tokens, current.generation, false))
            }
            Ok(issued) => {
                self.release_within_ceiling(tool, &issued.scopes)?;
                Ok(issued)
            }
            other => other,
        }
    }

    /// Refreshes now, unless `if_generation` is older than what is stored (then the stored
    /// token is returned without a provider call).
    #[tracing::instrument(skip(self, caller), fields(agent = %caller.agent, tool = %tool))]
    pub async fn refresh(
        self: &Arc<Self>,
        call: &Call,
        caller: &Caller,
        tool: &Tool,
        if_generation: Option<Generation>,
    ) -> Result<IssuedToken, VaultError> {
        self.admit_release(caller, tool)?;
        let current = self.open_current(caller, tool, Some(call), None).await?;
        self.release_within_ceiling(tool, &current.tokens.scopes)?;
        if if_generation.is_some_and(|seen| current.generation > seen) {
            return Ok(Self::issue(current.tokens, current.generation, false));
        }
        let Some(provider) = self.providers.get(tool) else {
            return Err(VaultError::ReauthRequired(format!(
                "no OAuth provider is configured for tool {tool}, so the vault cannot refresh it; store a new token"
            )));
        };
        if current.tokens.refresh_token.is_none() {
            return Err(VaultError::ReauthRequired(format!(
                "no refresh token is stored for tool {tool}; store a new token"
            )));
        }
        if self.cooling_down(&current.tokens, Utc::now().timestamp()) {
            tracing::info!(%tool, "forced refresh inside the cooldown; serving the current token");
            return Ok(Self::issue(current.tokens, current.generation, false));
        }
        let issued = self
            .refresh_fenced(caller, tool, current.generation, provider, call.deadline())
            .await?;
        self.release_within_ceiling(tool, &issued.scopes)?;
        Ok(issued)
    }

    /// Deletes credentials; with `at_provider`, also revokes their tokens at the provider
    /// (through the durable outbox). Another user's or agent's need the admin scope.
    #[tracing::instrument(skip(self, caller), fields(agent = %caller.agent))]
    pub async fn revoke(
        self: &Arc<Self>,
        call: &Call,
        caller: &Caller,
        target: RevokeTarget,
        at_provider: bool,
    ) -> Result<Revoked, VaultError> {
        self.admit(caller, None)?;
        let agent = target.agent.unwrap_or_else(|| caller.agent.clone());
        let user = target.user.unwrap_or_else(|| caller.user.clone());
        if (agent != caller.agent || user != caller.user) && !caller.admin {
            return Err(VaultError::PermissionDenied(
                "revoking another user's or agent's credentials needs the vault:admin scope".into(),
            ));
        }
        if agent != caller.agent || user != caller.user {
            call.acting_on(&agent, Some(&user));
        }
        if let Some(tool) = &target.tool {
            call.tool(tool);
        }
        // An admin reaches other agents and users of its own issuer only.
        let Some(entry) = self.agent_entry(&caller.issuer, &agent, false).await? else {
            return Ok(Revoked {
                revoked: 0,
                provider_revoked: 0,
            });
        };
        call.on_agent(&entry.record);
        before(call.deadline(), "the revocation")?;
        let revoked = if at_provider {
            self.revoke_at_provider(entry, &user, target.tool.as_ref(), call)
                .await?
        } else {
            let deleted = self
                .store
                .credentials
                .delete(
                    &entry.record,
                    &user,
                    target.tool.as_ref(),
                    vec![call.for_write()],
                )
                .await?;
            call.written();
            self.recorder.changes().publish(&entry.record.namespace);
            Revoked {
                revoked: u32::try_from(deleted).unwrap_or(u32::MAX),
                provider_revoked: 0,
            }
        };
        tracing::info!(revoked = revoked.revoked, provider_revoked = revoked.provider_revoked, target_agent = %agent, "revoked credentials");
        Ok(revoked)
    }

    /// Deletes credentials past their vault TTL (admin only).
    #[tracing::instrument(skip(self, caller), fields(agent = %caller.agent))]
    pub async fn sweep(
        &self,
        caller: &Caller,
        limit: u32,
        dry_run: bool,
    ) -> Result<SweepOutcome, VaultError> {
        self.admit(caller, None)?;
        if !caller.admin {
            return Err(VaultError::PermissionDenied(
                "Sweep needs the vault:admin scope".into(),
            ));
        }
        let outcome = self
            .store
            .credentials
            .sweep(limit, dry_run, self.options.sweep_revokes)
            .await?;
        if !dry_run {
            // The credentials are swept already: a flow expiry that cannot be recorded now is
            // left for the next pass, and old flows are swept regardless.
            let expired = self.expire_flows(limit).await.unwrap_or_else(|err| {
                tracing::warn!(error = %err, "ending expired consent flows failed");
                0
            });
            // Consent flows end with their credentials' sweep, kept a while after expiry so that
            // GetAuthorization can still say what became of them.
            let before =
                Utc::now() - chrono::Duration::from_std(FLOW_RETENTION).unwrap_or_default();
            let flows = self.store.flows.sweep_flows(before, limit).await?;
            tracing::info!(
                expired,
                flows,
                "ended expired consent flows and swept old ones"
            );
        }
        if outcome.swept > 0 && !dry_run {
            // Swept credentials' records went to many chains: wake every watcher.
            self.recorder.changes().publish("*");
        }
        tracing::info!(swept = outcome.swept, more = outcome.more, dry_run, "sweep");
        Ok(outcome)
    }
}

/// The first record of a new agent's chain (its key's making), owed by the call that registered
/// the agent. That call's write commits it with its own record, in one transaction, and then
/// [`settles`](Self::settled) it; dropped unsettled (the call failed before writing, or its
/// write failed), it is recorded on its own in a tracked background task, so that a chain never
/// lacks its first record.
#[derive(Default)]
pub(crate) struct OwedRecord(Option<Owed>);

struct Owed {
    agent: AgentRecord,
    record: AuditRecord,
    recorder: Arc<Recorder>,
    detached: crate::jobs::Detached,
}

impl OwedRecord {
    fn new(vault: &Vault, agent: &AgentRecord, record: AuditRecord) -> Self {
        Self(Some(Owed {
            agent: agent.clone(),
            record,
            recorder: Arc::clone(&vault.recorder),
            detached: vault.detached.clone(),
        }))
    }

    /// The record owed, if any.
    fn record(&self) -> Option<&AuditRecord> {
        self.0.as_ref().map(|owed| &owed.record)
    }

    /// A write committed the record.
    fn settled(mut self) {
        self.0 = None;
    }

    /// Records it now, on its own, and waits for it.
    async fn record_now(mut self) {
        if let Some(owed) = self.0.take() {
            owed.record().await;
        }
    }
}

impl Owed {
    async fn record(self) {
        let action = self.record.action.clone();
        if let Err(err) = self
            .recorder
            .record(Owner::Agent(Arc::new(self.agent)), self.record)
            .await
        {
            tracing::error!(%action, error = %crate::telemetry::error_chain(&err), "could not record a background event in the audit log");
        }
    }
}

impl Drop for OwedRecord {
    fn drop(&mut self) {
        if let Some(owed) = self.0.take() {
            let detached = owed.detached.clone();
            detached.spawn(owed.record());
        }
    }
}

/// The audit action of a new agent's key being made (its schema with it).
pub const AGENT_KEY_CREATED: &str = "key.agent_created";

/// Most audit records one ListAuditEvents page returns.
pub const MAX_AUDIT_PAGE: u32 = 1000;

/// What ListAuditEvents asks for.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Whose chain (of the caller's issuer); `None`: the control plane's.
    pub agent: Option<AgentId>,
    /// Only this user's records.
    pub user: Option<UserId>,
    /// Only this tool's records.
    pub tool: Option<Tool>,
    /// Records after this sequence.
    pub after: u64,
    /// At most this many (1..=[`MAX_AUDIT_PAGE`]).
    pub limit: u32,
}

/// One page of audit records.
#[derive(Debug, Clone)]
pub struct AuditPage {
    /// The records, in sequence order.
    pub records: Vec<crate::audit::Stored>,
    /// Where the next page starts; 0 when the chain's end was reached.
    pub next_after: u64,
}

impl Vault {
    /// Pages through an audit chain (admin only). Filters apply to the records read, so a page
    /// may hold fewer than `limit` records before the chain's end; at most ten pages' worth is
    /// read per call, and `next_after` says where to go on.
    pub async fn list_audit_events(
        &self,
        call: &Call,
        caller: &Caller,
        query: AuditQuery,
    ) -> Result<AuditPage, VaultError> {
        self.admit(caller, None)?;
        if !caller.admin {
            return Err(VaultError::PermissionDenied(
                "ListAuditEvents needs the vault:admin scope".into(),
            ));
        }
        let owner = match &query.agent {
            Some(agent) => {
                call.acting_on(agent, query.user.as_ref());
                match self.agent_entry(&caller.issuer, agent, false).await? {
                    Some(entry) => {
                        call.on_agent(&entry.record);
                        Owner::Agent(Arc::new(entry.record.clone()))
                    }
                    None => {
                        return Ok(AuditPage {
                            records: Vec::new(),
                            next_after: 0,
                        });
                    }
                }
            }
            None => Owner::Control,
        };
        let limit = query.limit.clamp(1, MAX_AUDIT_PAGE);
        let mut records = Vec::new();
        let mut after = query.after;
        for _ in 0..10 {
            let page = self
                .store
                .audit
                .records(owner.chain(), after, limit)
                .await?;
            let end = page.len() < limit as usize;
            for stored in page {
                after = stored.record.sequence;
                let wanted = query
                    .user
                    .as_ref()
                    .is_none_or(|u| stored.record.user.as_deref() == Some(u.as_str()))
                    && query
                        .tool
                        .as_ref()
                        .is_none_or(|t| stored.record.tool.as_deref() == Some(t.as_str()));
                if wanted {
                    records.push(stored);
                    if records.len() == limit as usize {
                        return Ok(AuditPage {
                            records,
                            next_after: after,
                        });
                    }
                }
            }
            if end {
                return Ok(AuditPage {
                    records,
                    next_after: 0,
                });
            }
        }
        Ok(AuditPage {
            records,
            next_after: after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_bucket_allows_a_burst_then_refills_at_its_rate() {
        let start = std::time::Instant::now();
        let mut bucket = TokenBucket {
            tokens: 2.0,
            at: start,
        };
        assert!(bucket.take(2, start).is_ok());
        assert!(bucket.take(2, start).is_ok());
        let wait = bucket.take(2, start).unwrap_err();
        assert!((29.0..=30.5).contains(&wait.as_secs_f64()), "{wait:?}");
        assert!(bucket.take(2, start + Duration::from_secs(31)).is_ok());
        assert!(bucket.take(2, start + Duration::from_secs(31)).is_err());
    }
}
