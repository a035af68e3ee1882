//! Writing audit records that are not part of a credential write: the end of every RPC that
//! wrote nothing (reads, refusals, failures), and background events. Concurrent records share
//! commits (group commit): the first waiting record starts a flush, and every record that
//! arrives while a flush commits goes into the next one, so under load a flush carries many
//! records and at one caller it carries one. A flush appends each chain's records in one
//! statement, the chains at once, so their commits share the database's flush of its log; no
//! transaction spans two chains. Each caller waits for its own record to be durable; a record
//! that cannot be written fails its caller.

use std::collections::{HashMap, HashSet};
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

/// A turn on one chain granted by [`Recorder::alone`], given back when dropped.
#[derive(Debug)]
pub struct Alone<'a> {
    recorder: &'a Recorder,
    chain: String,
}

impl Drop for Alone<'_> {
    fn drop(&mut self) {
        self.recorder.queue().solo.remove(&self.chain);
    }
}

type Waiter = oneshot::Sender<Result<(), Arc<StoreError>>>;

/// Records waiting for the next commit, of every chain, in arrival order.
#[derive(Default)]
struct Queue {
    pending: Vec<(Owner, AuditRecord, Waiter)>,
    flushing: bool,
    /// How many records of each chain are waiting or being written by the group commit.
    queued: HashMap<String, usize>,
    /// The chains on which a call is writing its record alongside its read
    /// ([`Recorder::alone`]).
    solo: HashSet<String>,
}

/// Group-committed audit appends, and the wake-ups they cause.
pub struct Recorder {
    store: Store,
    changes: Changes,
    queue: Mutex<Queue>,
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

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Only inserts, removals and counts happen under the lock.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A turn for a call to write its own record on `chain` in the statement that reads its
    /// credential (one round trip and one commit instead of a read and a share of a group
    /// commit), granted only while no other record of that chain is waiting, being written, or
    /// written that way: two writers of one chain would contend for its head, so under load on
    /// one agent calls queue as usual, while calls on different agents (whose records would
    /// each need a commit of their own anyway) each take their turn at once.
    pub fn alone(&self, chain: &str) -> Option<Alone<'_>> {
        let mut queue = self.queue();
        if queue.queued.contains_key(chain) || !queue.solo.insert(chain.to_string()) {
            return None;
        }
        Some(Alone {
            recorder: self,
            chain: chain.to_string(),
        })
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
            let mut queue = self.queue();
            *queue
                .queued
                .entry(owner.chain().key().to_string())
                .or_default() += 1;
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
                let mut queue = self.queue();
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
            {
                let mut queue = self.queue();
                for (key, _, records, _) in &chains {
                    if let Some(count) = queue.queued.get_mut(key) {
                        *count = count.saturating_sub(records.len());
                        if *count == 0 {
                            queue.queued.remove(key);
                        }
                    }
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn recorder() -> Arc<Recorder> {
        let store = crate::store::open_memory_for_tests().await;
        Recorder::new(store, Changes::default())
    }

    #[tokio::test]
    async fn calls_on_different_chains_take_their_turns_at_once_and_one_chain_has_one() {
        let recorder = recorder().await;
        let a = recorder.alone("agent_a").expect("a chain's first turn");
        assert!(recorder.alone("agent_a").is_none(), "one turn per chain");
        let b = recorder
            .alone("agent_b")
            .expect("another chain's turn meanwhile");
        drop(a);
        assert!(recorder.alone("agent_a").is_some(), "a turn is given back");
        drop(b);
    }

    #[tokio::test]
    async fn a_chain_with_records_in_the_group_commit_gives_no_turn_until_they_are_written() {
        let recorder = recorder().await;
        recorder.queue().queued.insert("control".into(), 1);
        assert!(recorder.alone("control").is_none());
        assert!(recorder.alone("agent_a").is_some(), "other chains still do");
        recorder.queue().queued.clear();
        // A record through the group commit is counted while it waits and uncounted once
        // written.
        recorder
            .record(Owner::Control, crate::audit::event_without_user("startup"))
            .await
            .unwrap();
        assert!(recorder.queue().queued.is_empty());
        assert!(recorder.alone("control").is_some());
    }
}
