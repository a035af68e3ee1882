//! The background sweeper: deletes credentials past their vault TTL in bounded batches. A
//! database lease makes one replica sweep at a time; the lease expires, so a replica that dies
//! holding it delays sweeping by at most one lease period.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// The lease's name in `vault.leases`.
pub const LEASE: &str = "sweeper";
/// Most batches in one sweep, so one run cannot monopolise the database.
const MAX_BATCHES_PER_RUN: u32 = 100;

/// Runs `job` at once and then every `interval` until `cancel` fires. A run that overruns the
/// interval delays the next one rather than queueing more.
pub async fn every<F, Fut>(interval: Duration, cancel: &CancellationToken, mut job: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = ticker.tick() => job().await,
        }
    }
}

/// Sweeps every `interval` until `cancel` fires; with `revoke`, swept credentials are queued for
/// revocation at their provider.
pub async fn run(
    store: Store,
    interval: Duration,
    batch: u32,
    revoke: bool,
    cancel: CancellationToken,
) {
    let holder = uuid::Uuid::new_v4();
    // Held across two intervals so the holder renews it before anyone else may take it.
    let lease = (interval * 2).max(Duration::from_secs(10));
    every(interval, &cancel, || async {
        match store.leases.try_lease(LEASE, holder, lease).await {
            Ok(true) => sweep_once(&store, batch, revoke, &cancel).await,
            Ok(false) => tracing::debug!("another replica holds the sweep lease"),
            Err(err) => tracing::warn!(error = %err, "could not take the sweep lease"),
        }
    })
    .await;
}

async fn sweep_once(store: &Store, batch: u32, revoke: bool, cancel: &CancellationToken) {
    let mut total = 0;
    for _ in 0..MAX_BATCHES_PER_RUN {
        if cancel.is_cancelled() {
            break;
        }
        match store.credentials.sweep(batch, false, revoke).await {
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
}
