//! Telling other replicas which audit chains have new records, off the writers' commits.
//!
//! `NOTIFY` inside a writing transaction costs every writer of the database its group commit:
//! PostgreSQL serializes notifying transactions on one database-wide lock, held from before
//! their commit record is written until it is flushed, so concurrent audited writes (each
//! appends to a chain) commit one flush after another instead of sharing flushes. With
//! `pgbench`, 16 clients each committing an insert and a notification reached half the
//! transactions per second of the same inserts without one.
//!
//! So a write commits without notifying, then, if it recorded an event that watchers stream (a
//! release is none), hands its chain's key to [`PeerWakeups`], and one
//! task per process sends what is pending from a connection of its own with
//! `synchronous_commit = off`: the lock is then held for no flush, and one statement carries
//! every key that arrived while the last one was sent. A wake-up is only a hint (DESIGN §10):
//! it is sent after the record is durable, and a watcher that misses one re-reads its chain at
//! its next recheck, so a wake-up lost in a crash or an outage only delays an event.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgConnection};

use super::listen::AUDIT_CHANNEL;
use crate::audit::events::EVERY_CHAIN;

/// Most distinct chains kept pending; past it, one wake-up for every chain replaces them.
const MOST_PENDING: usize = 4096;
/// First wait before reconnecting, doubled after each failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Chains with new records that other replicas have not been told of yet.
#[derive(Debug, Default)]
struct Pending {
    chains: HashSet<String>,
    /// Too many to name: wake every watcher.
    every: bool,
}

impl Pending {
    fn add(&mut self, chain: &str) {
        if self.every || self.chains.contains(chain) {
            return;
        }
        if self.chains.len() >= MOST_PENDING {
            self.chains.clear();
            self.every = true;
        } else {
            self.chains.insert(chain.to_string());
        }
    }

    /// What to send: the chains' keys, or [`EVERY_CHAIN`] alone.
    fn take(&mut self) -> Vec<String> {
        if std::mem::take(&mut self.every) {
            self.chains.clear();
            return vec![EVERY_CHAIN.to_string()];
        }
        self.chains.drain().collect()
    }
}

#[derive(Debug)]
struct Shared {
    options: PgConnectOptions,
    pending: Mutex<Pending>,
    ready: tokio::sync::Notify,
    started: std::sync::atomic::AtomicBool,
}

/// Wake-ups owed to other replicas, and the task that sends them (started by the first).
#[derive(Debug, Clone)]
pub(super) struct PeerWakeups(Arc<Shared>);

impl PeerWakeups {
    /// Wake-ups sent through a connection made with `options`.
    pub(super) fn new(options: PgConnectOptions) -> Self {
        Self(Arc::new(Shared {
            options: options
                .application_name("vault-server wake-ups")
                .options([("synchronous_commit", "off")]),
            pending: Mutex::new(Pending::default()),
            ready: tokio::sync::Notify::new(),
            started: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Tells other replicas, soon, that `chain` has new records. Call it after they committed.
    pub(super) fn wake(&self, chain: &str) {
        self.0
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add(chain);
        if !self
            .0
            .started
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            tokio::spawn(send(Arc::clone(&self.0)));
        }
        self.0.ready.notify_one();
    }
}

/// Sends pending wake-ups as they come, for as long as the runtime runs.
async fn send(shared: Arc<Shared>) {
    let mut conn: Option<PgConnection> = None;
    let mut backoff = MIN_BACKOFF;
    loop {
        shared.ready.notified().await;
        loop {
            let chains = shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if chains.is_empty() {
                break;
            }
            match notify(&mut conn, &shared.options, &chains).await {
                Ok(()) => backoff = MIN_BACKOFF,
                Err(err) => {
                    conn = None;
                    tracing::warn!(error = %crate::telemetry::error_chain(&err), retry_in = ?backoff, "cannot wake other replicas' audit watchers; their events wait for their next recheck");
                    {
                        let mut pending = shared
                            .pending
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner);
                        for chain in &chains {
                            pending.add(chain);
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// One statement notifying each of `chains` on the audit channel, from the connection in `slot`
/// (made first if there is none). The connection is kept only if the statement worked.
async fn notify(
    slot: &mut Option<PgConnection>,
    options: &PgConnectOptions,
    chains: &[String],
) -> Result<(), sqlx::Error> {
    let mut conn = match slot.take() {
        Some(conn) => conn,
        None => PgConnection::connect_with(options).await?,
    };
    sqlx::query("SELECT pg_notify($1, chain) FROM unnest($2::text[]) AS chain")
        .bind(AUDIT_CHANNEL)
        .bind(chains)
        .execute(&mut conn)
        .await?;
    *slot = Some(conn);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_chains_are_named_once_and_too_many_become_one_wake_up_for_all() {
        let mut pending = Pending::default();
        pending.add("agent_a");
        pending.add("agent_a");
        pending.add("control");
        let mut taken = pending.take();
        taken.sort();
        assert_eq!(taken, ["agent_a", "control"]);
        assert!(pending.take().is_empty());

        for n in 0..=MOST_PENDING {
            pending.add(&format!("agent_{n}"));
        }
        assert_eq!(pending.take(), [EVERY_CHAIN]);
        assert!(pending.take().is_empty(), "nothing is owed after it");
    }
}
