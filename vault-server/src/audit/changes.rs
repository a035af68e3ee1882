//! Wake-ups for audit watchers: which chains have new records. A wake-up carries no record, only
//! the chain's key; a watcher woken re-reads the chain from its last sequence, so the log stays
//! the only source of truth and a missed or duplicated wake-up only delays an event.

use std::sync::Arc;

use tokio::sync::broadcast;

/// How many wake-ups a slow subscriber may fall behind before it is told it lagged (and then
/// re-reads its chain, losing nothing).
const BACKLOG: usize = 1024;

/// A process-wide channel of "chain K has new records". Appends in this process publish to it
/// after they commit; on PostgreSQL, a listener publishes what other replicas' appends notify.
#[derive(Debug, Clone)]
pub struct Changes {
    sender: broadcast::Sender<Arc<str>>,
}

impl Default for Changes {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(BACKLOG).0,
        }
    }
}

impl Changes {
    /// Says that the chain keyed `chain` ([`crate::store::Chain::key`]) has new records.
    pub fn publish(&self, chain: &str) {
        // No subscriber is not an error: nobody is watching.
        let _ = self.sender.send(Arc::from(chain));
    }

    /// A receiver of every wake-up from now on. [`broadcast::error::RecvError::Lagged`] means
    /// some were missed: re-read every chain watched.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.sender.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_subscriber_hears_each_chain_published_after_it_subscribed() {
        let changes = Changes::default();
        changes.publish("before");
        let mut receiver = changes.subscribe();
        changes.publish("agent_1");
        changes.publish("control");
        assert_eq!(&*receiver.recv().await.unwrap(), "agent_1");
        assert_eq!(&*receiver.recv().await.unwrap(), "control");
    }
}
