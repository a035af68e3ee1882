//! Writing audit records that are not part of a credential write: the end of every RPC that
//! wrote nothing (reads, refusals, failures), and background events. Concurrent records of one
//! chain share a transaction (group commit): the first waiting record starts a flush, and every
//! record that arrives while a flush commits goes into the next one, so under load a commit
//! carries many records and at one caller it carries one. Each caller waits for its own record
//! to be durable; a record that cannot be written fails its caller.

use std::collections::HashMap;
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

type Waiter = oneshot::Sender<Result<(), Arc<StoreError>>>;

struct Queue {
    owner: Owner,
    pending: Vec<(AuditRecord, Waiter)>,
    flushing: bool,
}

/// Group-committed audit appends, and the wake-ups they cause.
pub struct Recorder {
    store: Store,
    changes: Changes,
    queues: Mutex<HashMap<String, Queue>>,
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
            queues: Mutex::new(HashMap::new()),
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

    /// The wake-up channel, for watchers and for writers that appended in their own
    /// transaction.
    pub fn changes(&self) -> &Changes {
        &self.changes
    }

    /// Appends `record` to `owner`'s chain, sharing a transaction with the records of other
    /// calls waiting at the same time; returns once it is durable. The append itself runs in
    /// its own task, so a caller that gives up waiting never stalls the others.
    pub async fn record(
        self: &Arc<Self>,
        owner: Owner,
        record: AuditRecord,
    ) -> Result<(), AuditError> {
        let (sender, receiver) = oneshot::channel();
        let key = owner.chain().key().to_string();
        let start = {
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            let queue = queues.entry(key.clone()).or_insert_with(|| Queue {
                owner,
                pending: Vec::new(),
                flushing: false,
            });
            queue.pending.push((record, sender));
            !std::mem::replace(&mut queue.flushing, true)
        };
        if start {
            tokio::spawn(Arc::clone(self).flush(key));
        }
        match receiver.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(AuditError(Arc::into_inner(err))),
            // The flush task panicked or was cancelled at runtime shutdown.
            Err(_) => Err(AuditError(None)),
        }
    }

    /// Appends what is queued for `key`, batch after batch, until nothing is.
    async fn flush(self: Arc<Self>, key: String) {
        loop {
            let (owner, batch) = {
                let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                let Some(queue) = queues.get_mut(&key) else {
                    return;
                };
                if queue.pending.is_empty() {
                    queues.remove(&key);
                    return;
                }
                let take = queue.pending.len().min(MAX_BATCH);
                let batch: Vec<_> = queue.pending.drain(..take).collect();
                (queue.owner.clone(), batch)
            };
            let (records, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let count = records.len();
            let result = self.store.audit.append(owner.chain(), records).await;
            let result = match result {
                Ok(_) => {
                    self.changes.publish(&key);
                    Ok(())
                }
                Err(err) => {
                    tracing::error!(chain = %key, records = count, error = %crate::telemetry::error_chain(&err), "audit records could not be written; their calls fail");
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
