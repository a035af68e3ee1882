//! Root key rotation (`rotate-root`), online: every agent key is re-wrapped under the next root
//! in batches while replicas keep serving on the current one, then one transaction makes the
//! next root current (DESIGN §5: rotating the root re-wraps agent keys and the control key,
//! never a credential).
//!
//! Every step is idempotent and the database holds the whole state, so a run killed at any
//! point is finished by running it again with the same keys: before the switch every agent's key
//! is still wrapped by the current root (the next wraps are extra), and the switch is one
//! transaction.

use std::sync::Arc;

use crate::audit::{AuditRecord, Changes, Owner, Recorder};
use crate::crypto::{RootError, RootKey};
use crate::store::{AgentRecord, NextRoot, RotationSwitch, Store, StoreError};

use super::UnlockedRoot;

/// The audit action of a root rotation starting (the next root recorded).
pub const ROOT_ROTATION_STARTED: &str = "key.root_rotation_started";
/// The audit action of the next root becoming the root.
pub const ROOT_ROTATED: &str = "key.root_rotated";
/// The audit action of a rotation in progress being abandoned.
pub const ROOT_ROTATION_ABORTED: &str = "key.root_rotation_aborted";

/// How many times the switch re-wraps agents registered meanwhile before it gives up.
const SWITCH_ATTEMPTS: usize = 20;

/// Where a rotation stands, after each batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationProgress {
    /// Agent keys wrapped under the next root so far.
    pub done: u64,
    /// Registered agents.
    pub total: u64,
}

/// A rotation failed; nothing is lost, and running it again continues it.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A root key failed (a device), or an agent key did not open under the current root.
    #[error("{0}")]
    Key(String),
    /// The rotation cannot go on as asked; the message says what to do.
    #[error("{0}")]
    Refused(String),
    /// The audit log could not record the rotation.
    #[error("the audit log could not record the rotation: {0}")]
    Audit(String),
}

impl From<RootError> for RotationError {
    fn from(err: RootError) -> Self {
        Self::Key(err.to_string())
    }
}

/// What a finished rotation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationOutcome {
    /// The new root is now the vault's root; this many agent keys moved.
    Rotated {
        /// Agent keys now wrapped by the new root.
        agents: u64,
    },
    /// An earlier run had already made the new root current.
    AlreadyDone,
}

/// One root rotation: from the vault's current root to `next`.
pub struct RootRotation {
    store: Store,
    current: UnlockedRoot,
    next: RootKey,
    /// The Argon2id salt and costs of `next`, when it comes from a passphrase.
    next_kdf: Option<(Vec<u8>, crate::crypto::KdfParams)>,
    batch: u32,
    recorder: Arc<Recorder>,
}

impl std::fmt::Debug for RootRotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootRotation")
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl RootRotation {
    /// A rotation of the vault in `store`, whose current root `current` unlocked, to `next`
    /// (with its passphrase salt and costs, if any), re-wrapping `batch` agents per step.
    pub fn new(
        store: Store,
        current: UnlockedRoot,
        next: RootKey,
        next_kdf: Option<(Vec<u8>, crate::crypto::KdfParams)>,
        batch: u32,
    ) -> Result<Self, RotationError> {
        if current.pending {
            return Err(RotationError::Refused(
                "the configured root key is the one the rotation in progress moves to; configure the current root key, and give this one as the new key".into(),
            ));
        }
        Ok(Self {
            recorder: Recorder::new(store.clone(), Changes::default()),
            store,
            current,
            next,
            next_kdf,
            batch: batch.max(1),
        })
    }

    /// Runs the rotation to its end, calling `progress` after each batch.
    pub async fn run(
        &self,
        progress: &mut (dyn FnMut(RotationProgress) + Send),
    ) -> Result<RotationOutcome, RotationError> {
        let keys = self.store.keys.as_ref();
        let legacy = keys.legacy_agents().await?;
        if !legacy.is_empty() {
            return Err(RotationError::Refused(format!(
                "{} agents were stored before caller identities named their issuer; start the server once so that it adopts them, then rotate",
                legacy.len()
            )));
        }
        let pending = self.begin().await?;
        loop {
            let page = keys.agents_to_rewrap(self.batch).await?;
            if page.is_empty() {
                break;
            }
            self.rewrap(&page, &pending).await?;
            let (done, total) = keys.rewrap_progress().await?;
            progress(RotationProgress { done, total });
        }
        for _ in 0..SWITCH_ATTEMPTS {
            match keys.finish_root_rotation(&pending).await? {
                RotationSwitch::Done { agents } => {
                    self.audit(ROOT_ROTATED, serde_json::json!({ "agents": agents }))
                        .await?;
                    progress(RotationProgress {
                        done: agents,
                        total: agents,
                    });
                    return Ok(RotationOutcome::Rotated { agents });
                }
                // Registered since the last batch, under the current root: wrap them too.
                RotationSwitch::Missing(agents) => self.rewrap(&agents, &pending).await?,
                RotationSwitch::NotPending => {
                    let outcome = self.finished_elsewhere().await?;
                    record_switch_if_missing(&self.store).await?;
                    return Ok(outcome);
                }
            }
        }
        Err(RotationError::Refused(
            "agents keep being registered faster than the switch can re-wrap them; run rotate-root again".into(),
        ))
    }

    /// Records the next root, unless this rotation was begun already (by an earlier run).
    /// Returns the next root's stored key check, which names this rotation: every re-wrap and
    /// the switch apply only while it is still the one in progress.
    async fn begin(&self) -> Result<Vec<u8>, RotationError> {
        let keys = self.store.keys.as_ref();
        let record = keys
            .root_key()
            .await?
            .ok_or_else(|| RotationError::Refused("this database holds no vault yet".into()))?;
        if let Some(next) = record.next {
            self.check_pending(&next)?;
            return Ok(next.key_check);
        }
        let next = NextRoot {
            key_check: self.next.key_check()?,
            kdf: self.next_kdf.clone(),
            wrapped_control_key: self.next.wrap_control_key(&self.current.control)?,
        };
        // Fail closed: a rotation that cannot be recorded does not begin.
        self.audit(ROOT_ROTATION_STARTED, serde_json::json!({}))
            .await?;
        let stored = keys.begin_root_rotation(&next).await?;
        match stored.next {
            Some(pending) => {
                self.check_pending(&pending)?;
                Ok(pending.key_check)
            }
            None => Err(RotationError::Refused(
                "the rotation could not be recorded; run rotate-root again".into(),
            )),
        }
    }

    /// A rotation in progress may only be continued with the root it moves to.
    fn check_pending(&self, pending: &NextRoot) -> Result<(), RotationError> {
        if self.next.verifies(&pending.key_check)? {
            Ok(())
        } else {
            Err(RotationError::Refused(
                "a rotation to another root key is in progress: finish it by giving that key as the new key, or abandon it with `rotate-root --abort`".into(),
            ))
        }
    }

    /// Wraps each agent's key under the next root, unless its key changed meanwhile (then a
    /// later batch finds it again). Stops when the rotation it belongs to (`pending`) is no
    /// longer the one in progress: abandoned, or replaced by another.
    async fn rewrap(&self, agents: &[AgentRecord], pending: &[u8]) -> Result<(), RotationError> {
        for record in agents {
            let key = self
                .current
                .root
                .unwrap_agent_key(
                    &record.issuer,
                    &record.agent,
                    record.key_version,
                    &record.wrapped_key,
                )
                .map_err(|err| {
                    RotationError::Key(format!(
                        "the key of agent {} ({}) does not open under the current root key: {err}",
                        record.agent, record.namespace
                    ))
                })?;
            let wrapped = self
                .next
                .wrap_agent_key(&record.issuer, &record.agent, &key)?;
            if !self
                .store
                .keys
                .set_next_wrap(record, &wrapped, pending)
                .await?
            {
                let still = self
                    .store
                    .keys
                    .root_key()
                    .await?
                    .and_then(|root| root.next)
                    .is_some_and(|next| next.key_check == pending);
                if !still {
                    return Err(RotationError::Refused(
                        "the rotation was abandoned (rotate-root --abort) or replaced while this run went on; nothing was switched".into(),
                    ));
                }
                // Else the agent's key changed meanwhile: a later batch finds it again.
            }
        }
        Ok(())
    }

    /// No rotation is pending: done already when the new root is the vault's.
    async fn finished_elsewhere(&self) -> Result<RotationOutcome, RotationError> {
        let record = self.store.keys.root_key().await?;
        match record {
            Some(record) if self.next.verifies(&record.key_check)? => {
                Ok(RotationOutcome::AlreadyDone)
            }
            _ => Err(RotationError::Refused(
                "the rotation was abandoned (rotate-root --abort) while this run went on".into(),
            )),
        }
    }

    async fn audit(&self, action: &str, target: serde_json::Value) -> Result<(), RotationError> {
        record_key_event(&self.recorder, action, target).await
    }
}

/// How far back the control chain is searched for a rotation's records: key events, startups,
/// shutdowns and admin calls are few.
const RECENT_CONTROL_RECORDS: u64 = 1000;

/// Records the switch now if it committed without its audit record (the run was killed, or the
/// audit write failed, between the two): for a re-run that finds the rotation done. The last
/// root event on the control chain tells: `started` with no `rotated` after it.
pub async fn record_switch_if_missing(store: &Store) -> Result<(), RotationError> {
    let head = store.audit.head(crate::store::Chain::Control).await?;
    let after = head.sequence.saturating_sub(RECENT_CONTROL_RECORDS);
    let recent = store
        .audit
        .records(
            crate::store::Chain::Control,
            after,
            RECENT_CONTROL_RECORDS as u32,
        )
        .await?;
    let last = recent
        .iter()
        .rev()
        .find(|stored| stored.record.action.starts_with("key.root_"));
    if last.is_some_and(|stored| stored.record.action == ROOT_ROTATION_STARTED) {
        let recorder = Recorder::new(store.clone(), Changes::default());
        record_key_event(
            &recorder,
            ROOT_ROTATED,
            serde_json::json!({ "recorded_after_the_switch": true }),
        )
        .await?;
    }
    Ok(())
}

/// Whether `next` is already the vault's root: a rotation to it finished (for a re-run of
/// `rotate-root` whose configured root was rotated away).
pub async fn rotated_to(store: &Store, next: &RootKey) -> Result<bool, RotationError> {
    Ok(match store.keys.root_key().await? {
        Some(record) => record.next.is_none() && next.verifies(&record.key_check)?,
        None => false,
    })
}

/// The new root from a passphrase: derived with the salt of the rotation in progress when there
/// is one (a re-run must arrive at the same key), else with a new salt.
pub async fn root_from_passphrase(
    store: &Store,
    phrase: &secrecy::SecretString,
) -> Result<(RootKey, (Vec<u8>, crate::crypto::KdfParams)), RotationError> {
    let pending = store
        .keys
        .root_key()
        .await?
        .and_then(|record| record.next)
        .and_then(|next| next.kdf);
    let kdf = pending.unwrap_or_else(|| {
        let mut salt = vec![0u8; 16];
        crate::crypto::random_bytes(&mut salt);
        (salt, crate::crypto::KdfParams::default())
    });
    let key = super::keys::derive(phrase, &kdf.0, kdf.1)
        .map_err(|err| RotationError::Key(err.to_string()))?;
    Ok((key, kdf))
}

/// `rotate-root --abort`: forgets the rotation in progress and every wrap under its root.
pub async fn abort_rotation(store: &Store) -> Result<bool, RotationError> {
    let aborted = store.keys.abort_root_rotation().await?;
    if aborted {
        let recorder = Recorder::new(store.clone(), Changes::default());
        record_key_event(&recorder, ROOT_ROTATION_ABORTED, serde_json::json!({})).await?;
    }
    Ok(aborted)
}

pub(super) async fn record_key_event(
    recorder: &Arc<Recorder>,
    action: &str,
    target: serde_json::Value,
) -> Result<(), RotationError> {
    let record = AuditRecord {
        target: Some(target.to_string()),
        ..crate::audit::event_without_user(action)
    };
    recorder
        .record(Owner::Control, record)
        .await
        .map_err(|err| RotationError::Audit(crate::telemetry::error_chain(&err)))
}
