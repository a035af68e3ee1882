//! The background sweeper: deletes credentials past their vault TTL in bounded batches, ends
//! consent flows that expired unfinished (recording each expiry) and deletes old ones. A
//! database lease makes one replica sweep at a time; the lease expires, so a replica that dies
//! holding it delays sweeping by at most one lease period.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::vault::Vault;

/// The lease's name in `vault.leases`.
pub const LEASE: &str = "sweeper";
/// Most batches in one sweep, so one run cannot monopolise the database.
const MAX_BATCHES_PER_RUN: u32 = 100;

/// Sweeps every `interval`.
#[derive(Debug)]
pub struct Sweeper {
    /// The vault whose store is swept (its recorder records flow expiries).
    pub vault: Arc<Vault>,
    /// Time between sweeps.
    pub interval: Duration,
    /// Most credentials deleted per statement.
    pub batch: u32,
    /// Swept credentials are queued for revocation at their provider.
    pub revoke: bool,
    /// Audit records older than this are deleted after each sweep (`VAULT_AUDIT_RETENTION_DAYS`).
    pub retention: Duration,
}

impl Sweeper {
    /// Sweeps until `shutdown` fires; a batch in progress completes first.
    pub async fn run(self, shutdown: CancellationToken) {
        let holder = uuid::Uuid::new_v4();
        // Held across two intervals so the holder renews it before anyone else may take it.
        let lease = (self.interval * 2).max(Duration::from_secs(10));
        super::every(self.interval, &shutdown, || async {
            match self
                .vault
                .store()
                .leases
                .try_lease(LEASE, holder, lease)
                .await
            {
                Ok(true) => {
                    self.sweep_once(&shutdown).await;
                    self.retain_audit(&shutdown).await;
                }
                Ok(false) => tracing::debug!("another replica holds the sweep lease"),
                Err(err) => tracing::warn!(error = %err, "could not take the sweep lease"),
            }
        })
        .await;
    }

    /// Audit retention, under the sweep lease so one replica trims at a time.
    async fn retain_audit(&self, shutdown: &CancellationToken) {
        match super::audit::retain(self.vault.store(), self.retention, self.batch, shutdown).await {
            Ok(0) => {}
            Ok(records) => tracing::info!(records, "deleted audit records past retention"),
            Err(err) => tracing::warn!(error = %err, "audit retention failed"),
        }
    }

    async fn sweep_once(&self, shutdown: &CancellationToken) {
        let mut total = 0;
        for _ in 0..MAX_BATCHES_PER_RUN {
            if shutdown.is_cancelled() {
                break;
            }
            match self
                .vault
                .store()
                .credentials
                .sweep(self.batch, false, self.revoke)
                .await
            {
                Ok(outcome) => {
                    total += outcome.swept;
                    if !outcome.more {
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "sweep batch failed");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(swept = total, "background sweep");
        }
        match self.vault.expire_flows(self.batch).await {
            Ok(0) => {}
            Ok(flows) => tracing::info!(flows, "ended consent flows that expired unfinished"),
            Err(err) => tracing::warn!(error = %err, "ending expired consent flows failed"),
        }
        let before = chrono::Utc::now()
            - chrono::Duration::from_std(crate::vault::FLOW_RETENTION).unwrap_or_default();
        match self
            .vault
            .store()
            .flows
            .sweep_flows(before, self.batch)
            .await
        {
            Ok(0) => {}
            Ok(flows) => tracing::info!(flows, "swept ended consent flows"),
            Err(err) => tracing::warn!(error = %err, "sweeping consent flows failed"),
        }
    }
}
