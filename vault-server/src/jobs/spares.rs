//! Agent schemas in the background (issue 18): a replica keeps `target` agent schemas made ahead
//! of need, so that registering an agent costs a registry row rather than the DDL of a schema, a
//! role and their grants, and upgrades agent schemas left behind by a new version's per-agent
//! migrations. One replica makes spares at a time (the database function's try-lock); the others
//! find it busy and wait for their next look.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// Agent schemas looked up per batch of the background upgrade.
const UPGRADE_BATCH: u32 = 100;

/// Keeps spare agent schemas ready.
#[derive(Debug)]
pub struct SpareSchemas {
    /// The store that makes them.
    pub store: Store,
    /// How many to keep ready.
    pub target: u32,
    /// How often to look when no registration on this replica said one was taken (another
    /// replica's registrations take spares too).
    pub interval: Duration,
}

impl SpareSchemas {
    /// Upgrades agent schemas behind this version's per-agent migrations, a batch at a time,
    /// until none is (`vault-server migrate` does the same; the two share the work).
    async fn upgrade_agents(&self, shutdown: &CancellationToken) {
        while !shutdown.is_cancelled() {
            match self.store.schema.upgrade_agents(UPGRADE_BATCH).await {
                Ok(done) if done.upgraded > 0 && done.left > 0 => {
                    tracing::info!(done.upgraded, done.left, "upgraded agent schemas")
                }
                Ok(done) => {
                    if done.upgraded > 0 {
                        tracing::info!(done.upgraded, "agent schemas at the latest version");
                    }
                    return;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "could not upgrade agent schemas");
                    return;
                }
            }
        }
    }

    /// Upgrades the agent schemas behind, then refills at once, after every registration here
    /// and every `interval`, until `shutdown` fires; a schema being made is finished first (it is
    /// one transaction).
    pub async fn run(self, shutdown: CancellationToken) {
        // New per-agent migrations come with a new version of this binary: one pass at start.
        self.upgrade_agents(&shutdown).await;
        if self.target == 0 {
            return;
        }
        loop {
            let mut made = 0_u32;
            while !shutdown.is_cancelled() {
                match self.store.schema.make_spare_schema(self.target).await {
                    Ok(true) => made += 1,
                    Ok(false) => break,
                    Err(err) => {
                        tracing::warn!(error = %err, "could not make a spare agent schema");
                        break;
                    }
                }
            }
            if made > 0 {
                tracing::debug!(made, "made spare agent schemas");
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                () = self.store.schema.spare_taken() => {}
                () = tokio::time::sleep(self.interval) => {}
            }
        }
    }
}
