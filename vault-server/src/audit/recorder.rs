//! Writing audit records that are not part of a credential write: the end of every RPC that
//! wrote nothing (reads, refusals, failures), and background events. Concurrent records share
//! commits (group commit): the first waiting record starts a flush, and every record that
//! arrives while a flush commits goes into the next one, so under load a flush carries many
//! records and at one caller it carries one. A flush appends each chain's records in one
//! statement, the chains at once, so their commits share the database's flush of its log; no
//! transaction spans two chains. Each caller waits for its own record to be durable; a record
//! that cannot be written fails its caller.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use tokio::sync::oneshot;

use super::{AuditRecord, Changes, Outcome};
use crate::store::{AgentRecord, Chain, Store, StoreError};

/// Most records one group commit carries.
const MAX_BATCH: usize = 512;

/// The audit record could not be written; the call it records must fail.
#[derive(Debug, thiserror::Error)]
#[error("the audit record could not be written")]
pub struct AuditError(#[source] pub Option<StoreError>);

/// A chain, owned: what a queued record needs to reach its chain later.
#[derive(Debug, Clone)]
pub enum Owner {
    /// The control plane's chain.
    Control,
    /// An agent's chain.
    Agent(Arc<AgentRecord>),
}

impl Owner {
    /// The chain, borrowed.
    pub fn chain(&self) -> Chain<'_> {
        match self {
            Self::Control => Chain::Control,
            Self::Agent(agent) => Chain::Agent(agent),
        }
    }
}

/// A turn granted by [`Recorder::alone`], given back when dropped.
#[derive(Debug)]
pub struct Alone<'a>(&'a AtomicBool);

impl Drop for Alone<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

type Waiter = oneshot::Sender<Result<(), Arc<StoreError>>>;

/// Records waiting for the next commit, of every chain, in arrival order.
#[derive(Default)]
struct Queue {
    pending: Vec<(Owner, AuditRecord, Waiter)>,
    flushing: bool,
}

/// Group-committed audit appends, and the wake-ups they cause.
pub struct Recorder {
    store: Store,
    changes: Changes,
    queue: Mutex<Queue>,
    /// A call is writing its record alongside its read ([`Recorder::alone`]).
    solo: AtomicBool,
    denied: Counter<u64>,
    released: Counter<u64>,
}

/// Reasons that mean the caller was refused (rather than that something failed): what the
/// denial counter counts.
const DENIALS: &[&str] = &[
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "STORE_REFRESH_TOKEN_DENIED",
    "AUTHORIZATION_MISMATCH",
    "AGENT_CREATION_RATE_LIMITED",
    "REQUEST_TOO_LARGE",
    "POLICY_DENIED",
    "RATE_LIMITED",
];

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Recorder {
    /// A recorder appending to `store`'s chains and publishing to `changes`.
    pub fn new(store: Store, changes: Changes) -> Arc<Self> {
        Arc::new(Self {
            store,
            changes,
            queue: Mutex::new(Queue::default()),
            solo: AtomicBool::new(false),
            denied: opentelemetry::global::meter(crate::telemetry::SCOPE)
                .u64_counter("vault.audit.denials")
                .with_description("Calls refused, by reason and action")
                .build(),
            released: opentelemetry::global::meter(crate::telemetry::SCOPE)
                .u64_counter("vault.audit.releases")
                .with_description(
                    "Access tokens released by GetToken and Refresh, by agent and tool",
                )
                .build(),
        })
    }

    /// Counts a finished call, so that anomalies can be alerted on without reading the log:
    /// denials by reason and action (`vault.audit.denials`), and successful token releases by
    /// agent and tool (`vault.audit.releases`, whether or not releases are recorded).
    pub fn count(&self, record: &AuditRecord) {
        match &record.outcome {
            Outcome::Failed(reason) if DENIALS.contains(&reason.as_str()) => self.denied.add(
                1,
                &[
                    KeyValue::new("reason", reason.clone()),
                    KeyValue::new("action", record.action.clone()),
                ],
            ),
            Outcome::Ok if matches!(record.action.as_str(), "GetToken" | "Refresh") => {
                self.released.add(
                    1,
                    &[
                        KeyValue::new("agent", record.agent.clone().unwrap_or_default()),
                        KeyValue::new("tool", record.tool.clone().unwrap_or_default()),
                    ],
                );
            }
            _ => {}
        }
    }

    /// A turn for a call to write its own record in the statement that reads its credential
    /// (one round trip and one commit instead of two), granted only while no other record is
    /// waiting, being written, or written that way: at one caller a call gains a round trip; under
    /// load it would contend with the group commit for the chain's head, so calls queue as usual.
    pub fn alone(&self) -> Option<Alone<'_>> {
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.flushing || !queue.pending.is_empty() {
            return None;
        }
        self.solo
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| Alone(&self.solo))
    }

    /// The wake-up channel, for watchers and for writers that appended in their own
    /// transaction.
    pub fn changes(&self) -> &Changes {
        &self.changes
    }

    /// Appends `record` to `owner`'s chain, sharing a commit with the records of every other
    /// call waiting at the same time, whatever their chains (a commit's cost is its flush to
    /// disk, so sharing it is what makes auditing every release affordable);
    /// returns once it is durable. The append runs in its own task, so a caller that gives up
    /// waiting never stalls the others.
    pub async fn record(
        self: &Arc<Self>,
        owner: Owner,
        record: AuditRecord,
    ) -> Result<(), AuditError> {
        let (sender, receiver) = oneshot::channel();
        let start = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.pending.push((owner, record, sender));
            !std::mem::replace(&mut queue.flushing, true)
        };
        if start {
            tokio::spawn(Arc::clone(self).flush());
        }
        match receiver.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(AuditError(Arc::into_inner(err))),
            // The flush task panicked or was cancelled at runtime shutdown.
            Err(_) => Err(AuditError(None)),
        }
    }

    /// Appends what is queued, batch after batch, until nothing is.
    async fn flush(self: Arc<Self>) {
        loop {
            let batch: Vec<_> = {
                let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if queue.pending.is_empty() {
                    queue.flushing = false;
                    return;
                }
                let take = queue.pending.len().min(MAX_BATCH);
                queue.pending.drain(..take).collect()
            };
            // Grouped by chain, each chain's records in arrival order.
            let mut chains: Vec<(String, Owner, Vec<AuditRecord>, Vec<Waiter>)> = Vec::new();
            for (owner, record, waiter) in batch {
                let key = owner.chain().key().to_string();
                match chains.iter_mut().find(|(k, ..)| *k == key) {
                    Some((_, _, records, waiters)) => {
                        records.push(record);
                        waiters.push(waiter);
                    }
                    None => chains.push((key, owner, vec![record], vec![waiter])),
                }
            }
            let results = self
                .store
                .audit
                .append_batches(
                    chains
                        .iter()
                        .map(|(_, owner, records, _)| (owner.chain(), records.clone()))
                        .collect(),
                )
                .await;
            for ((key, _, records, waiters), result) in chains.into_iter().zip(results) {
                let result = match result {
                    Ok(()) => {
                        self.changes.publish(&key);
                        Ok(())
                    }
                    Err(err) => {
                        tracing::error!(chain = %key, records = records.len(), error = %crate::telemetry::error_chain(&err), "audit records could not be written; their calls fail");
                        Err(Arc::new(err))
                    }
                };
                for waiter in waiters {
                    // A caller that stopped waiting needs no answer.
                    let _ = waiter.send(result.clone());
                }
            }
        }
    }
}
