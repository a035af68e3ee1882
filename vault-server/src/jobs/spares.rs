//! Spare agent schemas (issue 18): a replica keeps `target` agent schemas made ahead of need, so
//! that registering an agent costs a registry row rather than the DDL of a schema, a role and
//! their grants. One replica makes spares at a time (the database function's try-lock); the
//! others find it busy and wait for their next look.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

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
    /// Refills at once, then after every registration here and every `interval`, until
    /// `shutdown` fires; a schema being made is finished first (it is one transaction).
    pub async fn run(self, shutdown: CancellationToken) {
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
