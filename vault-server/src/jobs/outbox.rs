//! Delivers the provider revocations still owed, on whichever replica gets to them first.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::vault::Vault;

/// Looks for due revocations every `interval`.
#[derive(Debug)]
pub struct OutboxDelivery {
    /// The use cases that deliver them.
    pub vault: Arc<Vault>,
    /// Time between looks.
    pub interval: Duration,
}

impl OutboxDelivery {
    /// Delivers until `shutdown` fires; an entry being delivered is settled first.
    pub async fn run(self, shutdown: CancellationToken) {
        super::every(self.interval, &shutdown, || {
            self.vault.deliver_due_revocations(&shutdown)
        })
        .await;
    }
}
