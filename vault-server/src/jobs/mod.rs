//! Background work with a lifecycle: the sweeper, the revocation outbox, the JWKS refresher,
//! the audit head signer, the spare agent schemas, and the detached tasks that finish a refresh
//! or a revocation for a caller who hung up.
//!
//! Every job is a small type with `run(self, shutdown)`. [`Jobs`] spawns them into one
//! `JoinSet` under one `CancellationToken`; shutdown cancels the token and waits, for a bounded
//! time, until each job has returned, so none is cut off in the middle of a write.

mod audit;
mod detached;
mod jwks;
mod outbox;
mod spares;
mod sweeper;

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use audit::{HeadSigner, LEASE as AUDIT_SIGN_LEASE, retain, sign_heads};
pub use detached::Detached;
pub use jwks::JwksRefresh;
pub use outbox::OutboxDelivery;
pub use spares::SpareSchemas;
pub use sweeper::{LEASE as SWEEP_LEASE, Sweeper};

/// The running background jobs.
#[derive(Debug, Default)]
pub struct Jobs {
    set: JoinSet<&'static str>,
    shutdown: CancellationToken,
}

impl Jobs {
    /// No jobs yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts `job`, named for the log, with the shared shutdown signal.
    pub fn spawn<F, Fut>(&mut self, name: &'static str, job: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let run = job(self.shutdown.clone());
        self.set.spawn(async move {
            run.await;
            name
        });
    }

    /// The signal every job watches: cancelling it asks them all to stop, as [`Jobs::shutdown`]
    /// does, without waiting.
    pub fn stop_signal(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Asks every job to stop and waits up to `within` for them to return; a job still
    /// running then is aborted, and said so in the log.
    pub async fn shutdown(mut self, within: Duration) {
        self.shutdown.cancel();
        let all_done = async {
            while let Some(done) = self.set.join_next().await {
                match done {
                    Ok(name) => tracing::debug!(job = name, "background job stopped"),
                    Err(err) if err.is_panic() => {
                        tracing::error!(error = %err, "a background job panicked")
                    }
                    Err(_) => {}
                }
            }
        };
        if tokio::time::timeout(within, all_done).await.is_err() {
            tracing::warn!(
                ?within,
                remaining = self.set.len(),
                "background jobs did not stop in time; aborting them"
            );
            self.set.shutdown().await;
        }
    }
}

/// Runs `job` at once and then every `interval` until `shutdown` fires. A run that overruns
/// the interval delays the next one rather than queueing more; a run in progress is never
/// interrupted (each run checks `shutdown` between its own steps).
pub async fn every<F, Fut>(interval: Duration, shutdown: &CancellationToken, mut job: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => job().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_job_runs_at_once_then_every_interval_until_shutdown() {
        let runs = Arc::new(AtomicU32::new(0));
        let mut jobs = Jobs::new();
        let counted = Arc::clone(&runs);
        jobs.spawn("count", move |shutdown| async move {
            every(Duration::from_secs(10), &shutdown, || async {
                counted.fetch_add(1, Ordering::SeqCst);
            })
            .await;
        });
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3, "at 0 s, 10 s and 20 s");
        jobs.shutdown(Duration::from_secs(1)).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "nothing runs after shutdown"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_a_job_to_finish_its_write() {
        let finished = Arc::new(AtomicBool::new(false));
        let mut jobs = Jobs::new();
        let flag = Arc::clone(&finished);
        jobs.spawn("slow", move |shutdown| async move {
            shutdown.cancelled().await;
            // The write it was doing when asked to stop.
            tokio::time::sleep(Duration::from_secs(2)).await;
            flag.store(true, Ordering::SeqCst);
        });
        jobs.shutdown(Duration::from_secs(5)).await;
        assert!(finished.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_that_ignores_shutdown_is_aborted_after_the_bound() {
        let mut jobs = Jobs::new();
        jobs.spawn("stuck", |_shutdown| std::future::pending::<()>());
        let started = tokio::time::Instant::now();
        jobs.shutdown(Duration::from_secs(3)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
