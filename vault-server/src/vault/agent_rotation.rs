//! Agent key rotation (`rotate-agent-key` and the RotateAgentKey RPC), online: a new version of
//! one agent's key becomes current at once, every row of the agent sealed under the old version
//! is re-sealed under the new one in batches while replicas keep serving, and then the old
//! version is destroyed (DESIGN §5).
//!
//! A row is re-sealed whole, under a fresh data key: re-wrapping only its data key would leave
//! the payload under a data key that whoever held the old agent key (and an old copy of the
//! row) can still unwrap. Writes meanwhile pass the store's fence, so none seals under the old
//! version once the new one is current, and reads open either version until the end. Every step
//! is idempotent and the database holds the whole state: a run killed at any point is finished
//! by running it again.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::Instrument as _;

use crate::audit::{AuditRecord, Call};
use crate::auth::Caller;
use crate::crypto::{
    AgentKey, Binding, FlowBinding, FlowSecret, RootKey, flow_secret_version, open_credential,
    open_flow_secret, seal_credential, seal_flow_secret,
};
use crate::ids::{AgentId, IssuerId};
use crate::store::{AgentRecord, SealedRow, Store, StoreError};

use super::rotation::RotationError;
use super::{Vault, VaultError};

/// The audit action of a new agent key version becoming current (the old one retiring).
pub const AGENT_KEY_ROTATION_STARTED: &str = "key.agent_key_rotation_started";
/// The audit action of a retiring agent key version being destroyed, every row re-sealed.
pub const AGENT_KEY_DESTROYED: &str = "key.agent_key_destroyed";

/// How many batches in a row may re-seal nothing (every row changed under the rotation) before
/// it gives up: writes that fast mean something is wrong, and a re-run continues.
const IDLE_BATCHES: u32 = 50;

/// Where one agent's rotation stands, after each batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AgentRotationProgress {
    /// The version being retired.
    pub from_version: u32,
    /// The version now current.
    pub to_version: u32,
    /// Rows re-sealed by this run so far.
    pub resealed: u64,
    /// Rows sealed under the retiring version when this run counted them.
    pub total: u64,
    /// The retiring version is destroyed: the rotation is over.
    pub done: bool,
}

/// Rotates the key of `agent` of `issuer` in `store` under the vault's current root `root`:
/// starts a rotation unless one is in progress (then continues it), re-seals `batch` rows per
/// step, and destroys the old version; calls `progress` after each step.
pub async fn rotate_agent_key(
    store: &Store,
    root: &RootKey,
    issuer: &IssuerId,
    agent: &AgentId,
    batch: u32,
    progress: &mut (dyn FnMut(AgentRotationProgress) + Send),
) -> Result<AgentRotationProgress, RotationError> {
    let record = begin_agent_key_rotation(store, root, issuer, agent).await?;
    finish_agent_key_rotation(store, root, record, batch, progress).await
}

/// The second half of [`rotate_agent_key`]: re-seals the rows of the agent `record` (a
/// rotation in progress) and destroys the retiring version.
pub async fn finish_agent_key_rotation(
    store: &Store,
    root: &RootKey,
    record: AgentRecord,
    batch: u32,
    progress: &mut (dyn FnMut(AgentRotationProgress) + Send),
) -> Result<AgentRotationProgress, RotationError> {
    let (issuer, agent) = (&record.issuer, &record.agent);
    let Some(retiring) = record.retiring.clone() else {
        return Err(RotationError::Refused(format!(
            "the key of agent {agent} has no version retiring"
        )));
    };
    let old = root.unwrap_agent_key(issuer, agent, retiring.version, &retiring.wrapped_key)?;
    let new = root.unwrap_agent_key(issuer, agent, record.key_version, &record.wrapped_key)?;
    let mut state = AgentRotationProgress {
        from_version: old.version,
        to_version: new.version,
        resealed: 0,
        total: store
            .agent_keys
            .count_sealed_under(&record, old.version)
            .await?,
        done: false,
    };
    progress(state);
    let mut idle = 0;
    loop {
        let rows = store
            .agent_keys
            .sealed_under(&record, old.version, batch.max(1))
            .await?;
        if rows.is_empty() {
            let destroyed = agent_event(
                &record,
                AGENT_KEY_DESTROYED,
                serde_json::json!({
                    "destroyed_version": old.version,
                    "key_version": new.version,
                    "resealed": state.resealed,
                }),
            );
            match store
                .agent_keys
                .finish_agent_key_rotation(&record, old.version, vec![destroyed])
                .await?
            {
                // Rows under the old version appeared since the read (a revocation queued from
                // a credential this run had not reached yet): another round.
                Some(left) if left > 0 => {
                    idle += 1;
                    if idle >= IDLE_BATCHES {
                        return Err(changing(agent));
                    }
                    continue;
                }
                Some(_) => {
                    tracing::info!(%agent, destroyed = old.version, current = new.version, resealed = state.resealed, "agent key rotated; the old version is destroyed");
                }
                None => {
                    tracing::info!(%agent, "another run finished this agent key rotation");
                }
            }
            state.done = true;
            progress(state);
            return Ok(state);
        }
        let mut resealed = 0;
        for row in &rows {
            let again = reseal(&record, &old, &new, row)?;
            if store.agent_keys.reseal(&record, row, &again).await? {
                resealed += 1;
            }
        }
        state.resealed += resealed;
        state.total = state.total.max(state.resealed);
        progress(state);
        idle = if resealed == 0 { idle + 1 } else { 0 };
        if idle >= IDLE_BATCHES {
            return Err(changing(agent));
        }
    }
}

/// The refusal when an agent's rows keep changing faster than a rotation re-seals them.
fn changing(agent: &AgentId) -> RotationError {
    RotationError::Refused(format!(
        "the rows of agent {agent} kept changing under the rotation; run it again"
    ))
}

/// The first half of [`rotate_agent_key`]: the agent's registry entry with a rotation in
/// progress, the one found or one this call starts (a new version, wrapped by `root`, made
/// current).
pub async fn begin_agent_key_rotation(
    store: &Store,
    root: &RootKey,
    issuer: &IssuerId,
    agent: &AgentId,
) -> Result<AgentRecord, RotationError> {
    for _ in 0..5 {
        let record = store.keys.agent(issuer, agent).await?.ok_or_else(|| {
            RotationError::Refused(format!("no agent {agent} of {issuer} is registered"))
        })?;
        if record.retiring.is_some() {
            tracing::info!(%agent, version = record.key_version, "continuing the agent key rotation in progress");
            return Ok(record);
        }
        let version = record.key_version.checked_add(1).ok_or_else(|| {
            RotationError::Refused(format!("the key of agent {agent} has no next version"))
        })?;
        // The current key must open under this root before anything changes: a run with the
        // wrong root must not make a version current that no replica can unwrap.
        root.unwrap_agent_key(issuer, agent, record.key_version, &record.wrapped_key)
            .map_err(|err| {
                RotationError::Key(format!(
                    "the key of agent {agent} does not open under the configured root key: {err}"
                ))
            })?;
        let next = AgentKey::generate(version);
        let wrapped = root.wrap_agent_key(issuer, agent, &next)?;
        // Recorded in the transaction that starts it: no record, no rotation, and no record of
        // a start that lost a race.
        let started = agent_event(
            &record,
            AGENT_KEY_ROTATION_STARTED,
            serde_json::json!({
                "retiring_version": record.key_version,
                "key_version": version,
            }),
        );
        if store
            .agent_keys
            .begin_agent_key_rotation(&record, &wrapped, version, vec![started])
            .await?
        {
            tracing::info!(%agent, retiring = record.key_version, current = version, "agent key rotation started");
        }
        // Started, or another run (or a registration race) changed the entry: read it again.
    }
    Err(RotationError::Refused(format!(
        "the key of agent {agent} kept changing while the rotation began; run it again"
    )))
}

/// `row` sealed again under `new`, from `old`.
fn reseal(
    record: &AgentRecord,
    old: &AgentKey,
    new: &AgentKey,
    row: &SealedRow,
) -> Result<SealedRow, RotationError> {
    let broken = |what: String| {
        RotationError::Refused(format!(
            "{what} of agent {} does not open under its key, so it cannot be re-sealed and the old version cannot be destroyed; it is unreadable already: delete it, then run the rotation again",
            record.agent
        ))
    };
    let again = |user, tool, generation, sealed| {
        let binding = Binding {
            agent: &record.agent,
            user,
            tool,
            generation,
        };
        let tokens = open_credential(old, binding, sealed).map_err(|_| {
            broken(format!(
                "the credential of user {user} for tool {tool} (generation {generation})"
            ))
        })?;
        Ok::<_, RotationError>(seal_credential(new, binding, &tokens))
    };
    Ok(match row {
        SealedRow::Credential {
            user,
            tool,
            generation,
            sealed,
        } => SealedRow::Credential {
            user: user.clone(),
            tool: tool.clone(),
            generation: *generation,
            sealed: again(user, tool, *generation, sealed)?,
        },
        SealedRow::Revocation {
            id,
            user,
            tool,
            generation,
            sealed,
        } => SealedRow::Revocation {
            id: *id,
            user: user.clone(),
            tool: tool.clone(),
            generation: *generation,
            sealed: again(user, tool, *generation, sealed)?,
        },
        SealedRow::Flow {
            id,
            user,
            tool,
            verifier,
            code,
        } => {
            let binding = FlowBinding {
                agent: &record.agent,
                user,
                tool,
                flow: id,
            };
            let again =
                |kind, sealed: &Option<Vec<u8>>| -> Result<Option<Vec<u8>>, RotationError> {
                    let Some(sealed) = sealed else {
                        return Ok(None);
                    };
                    if flow_secret_version(sealed) != Some(old.version) {
                        return Ok(Some(sealed.clone()));
                    }
                    let clear = open_flow_secret(old, binding, kind, sealed)
                        .map_err(|_| broken(format!("the {kind:?} of consent flow {id}")))?;
                    Ok(Some(seal_flow_secret(new, binding, kind, &clear)))
                };
            SealedRow::Flow {
                id: id.clone(),
                user: user.clone(),
                tool: tool.clone(),
                verifier: again(FlowSecret::Verifier, verifier)?,
                code: again(FlowSecret::Code, code)?,
            }
        }
    })
}

/// A key event of the agent's own chain.
fn agent_event(record: &AgentRecord, action: &str, target: serde_json::Value) -> AuditRecord {
    AuditRecord {
        agent: Some(record.agent.as_str().into()),
        caller_iss: Some(record.issuer.as_str().into()),
        target: Some(target.to_string()),
        ..crate::audit::event_without_user(action)
    }
}

/// The prefix of the wake-up (on the audit channel) that a rotation of an agent's key started
/// or ended; the agent's schema follows. Watch streams ignore it.
pub const KEY_CHANGED: &str = "key:";

/// Rows re-sealed per batch by a rotation the RotateAgentKey RPC runs.
const RPC_BATCH: u32 = 500;

/// This replica's run of an agent key rotation, as RotateAgentKey reports it.
#[derive(Debug, Clone, Default)]
pub(super) struct Run {
    progress: AgentRotationProgress,
    error: Option<String>,
    running: bool,
}

/// Marks a run as stopped if its task ends without saying so (a panic).
struct RunGuard(watch::Sender<Run>);

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.0.send_if_modified(|run| {
            if !run.running {
                return false;
            }
            run.running = false;
            run.error = Some("the rotation stopped unexpectedly; call again to continue it".into());
            true
        });
    }
}

/// This replica's runs, by agent schema (the last run of each agent).
pub(super) type Runs = std::sync::Mutex<std::collections::HashMap<String, watch::Receiver<Run>>>;

/// Where an agent's key rotation stands, as RotateAgentKey answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentKeyRotation {
    /// The version every new seal is made under.
    pub key_version: u32,
    /// The version a rotation in progress retires.
    pub retiring_version: Option<u32>,
    /// Rows still sealed under it.
    pub remaining: u64,
    /// Rows this replica's run re-sealed.
    pub resealed: u64,
    /// Why this replica's run failed, if it did.
    pub error: Option<String>,
    /// This replica is running the rotation now.
    pub running: bool,
}

impl From<RotationError> for VaultError {
    fn from(err: RotationError) -> Self {
        match err {
            RotationError::Store(StoreError::KeyRotationInProgress(message))
            | RotationError::Refused(message) => Self::KeyRotationRefused(message),
            RotationError::Store(other) => other.into(),
            RotationError::Key(message) => {
                tracing::error!(error = %message, "an agent key rotation could not use a key");
                Self::KeyUnavailable(
                    "the vault's root key could not wrap or unwrap the agent key; retry".into(),
                )
            }
            RotationError::Audit(message) => Self::Unexpected(anyhow::anyhow!(
                "the audit log could not record the rotation: {message}"
            )),
        }
    }
}

impl Vault {
    /// RotateAgentKey: starts (or continues) a rotation of the key of `agent` of the caller's
    /// issuer, running its re-seal in the background on this replica, unless `status_only`;
    /// then answers where it stands. Admin only.
    pub async fn rotate_agent_key(
        self: &Arc<Self>,
        call: &Call,
        caller: &Caller,
        agent: &AgentId,
        status_only: bool,
        from_version: Option<u32>,
    ) -> Result<AgentKeyRotation, VaultError> {
        self.admit(caller, None)?;
        if !caller.admin {
            return Err(VaultError::PermissionDenied(
                "RotateAgentKey needs the vault:admin scope".into(),
            ));
        }
        call.acting_on(agent, None);
        let record = self
            .store
            .keys
            .agent(&caller.issuer, agent)
            .await?
            .ok_or(VaultError::AgentNotFound)?;
        call.on_agent(&record);
        // A retried call names the version it meant to rotate away from: once that is done, it
        // starts nothing (a rotation in progress is still continued).
        let wanted = record.retiring.is_some()
            || from_version.is_none_or(|version| version == record.key_version);
        if !status_only && wanted && !self.rotating_here(&record.namespace) {
            // The start is part of the call (its refusal is the caller's answer, and its own
            // audit record, key.agent_key_rotation_started, is written before it); the re-seal
            // is not.
            let record =
                begin_agent_key_rotation(&self.store, self.keyring.root(), &record.issuer, agent)
                    .await?;
            self.spawn_rotation(record);
        }
        self.rotation_status(&caller.issuer, agent).await
    }

    /// Drops the cached keys of agents whose key a rotation (on any replica, or `rotate-agent-key`)
    /// started or ended, as the wake-ups in `changes` say, until `shutdown`. A missed wake-up
    /// only delays it: the replica reads the registry again when it meets a row under a newer
    /// version, a write is fenced, or a retiring version it holds is no longer retiring.
    pub async fn forget_rotated_keys(
        self: Arc<Self>,
        changes: crate::audit::Changes,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut wakeups = changes.subscribe();
        loop {
            let woken = tokio::select! {
                () = shutdown.cancelled() => return,
                woken = wakeups.recv() => woken,
            };
            match woken {
                Ok(payload) => {
                    if let Some(namespace) = payload.strip_prefix(KEY_CHANGED) {
                        let dropped = self
                            .keyring
                            .forget_matching(|record| record.namespace == namespace);
                        if dropped > 0 {
                            tracing::info!(schema = %namespace, "an agent key rotation started or ended: dropped the cached keys");
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Whether this replica is running a rotation of the agent in `namespace`.
    fn rotating_here(&self, namespace: &str) -> bool {
        self.rotations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(namespace)
            .is_some_and(|run| run.borrow().running)
    }

    /// Runs the re-seal of a rotation in progress in the background.
    fn spawn_rotation(self: &Arc<Self>, record: AgentRecord) {
        let (sender, receiver) = watch::channel(Run {
            running: true,
            ..Run::default()
        });
        {
            let mut runs = self.rotations.lock().unwrap_or_else(|p| p.into_inner());
            if runs
                .get(&record.namespace)
                .is_some_and(|run| run.borrow().running)
            {
                return;
            }
            runs.insert(record.namespace.clone(), receiver);
        }
        let this = Arc::clone(self);
        // Not a shutdown-drained job: a rotation cut short by shutdown is continued by the next
        // call (every step is idempotent).
        tokio::spawn(
            async move {
                let run = RunGuard(sender);
                let (issuer, agent) = (record.issuer.clone(), record.agent.clone());
                let mut report = |progress| run.0.send_modify(|run| run.progress = progress);
                let outcome = finish_agent_key_rotation(
                    &this.store,
                    this.keyring.root(),
                    record,
                    RPC_BATCH,
                    &mut report,
                )
                .await;
                // This replica's cached entry holds the old version: read it again on next use.
                this.keyring.forget(&issuer, &agent);
                let error = outcome.err().map(|err| {
                    tracing::error!(%agent, error = %crate::telemetry::error_chain(&err), "an agent key rotation stopped; RotateAgentKey continues it");
                    match err {
                        // The root key's own errors (an HSM's) stay in the log.
                        RotationError::Key(_) => {
                            "the vault's root key could not wrap or unwrap the agent key".to_string()
                        }
                        other => other.to_string(),
                    }
                });
                run.0.send_modify(|run| {
                    run.running = false;
                    run.error = error;
                });
            }
            .instrument(tracing::Span::current()),
        );
    }

    /// Where the rotation of `agent` stands: the registry's versions, the rows left, and this
    /// replica's run.
    async fn rotation_status(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
    ) -> Result<AgentKeyRotation, VaultError> {
        let record = self
            .store
            .keys
            .agent(issuer, agent)
            .await?
            .ok_or(VaultError::AgentNotFound)?;
        let remaining = match &record.retiring {
            Some(retiring) => {
                self.store
                    .agent_keys
                    .count_sealed_under(&record, retiring.version)
                    .await?
            }
            None => 0,
        };
        let run = self
            .rotations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&record.namespace)
            .map(|run| run.borrow().clone())
            .unwrap_or_default();
        Ok(AgentKeyRotation {
            key_version: record.key_version,
            retiring_version: record.retiring.map(|r| r.version),
            remaining,
            resealed: run.progress.resealed,
            error: run.error,
            running: run.running,
        })
    }
}
