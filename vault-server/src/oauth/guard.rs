//! Each provider's guard: a cap on its calls in flight and a circuit breaker, so a provider that
//! hangs or fails holds a bounded share of the vault (tasks, sockets, database leases) and the
//! refreshes of every other provider go on.
//!
//! - **Cap.** At most `max_concurrent` calls to one provider at once; one more fails at once
//!   with [`ProviderError::Paused`] rather than waiting, so GetToken answers with the
//!   still-valid token or PROVIDER_UNAVAILABLE instead of queueing behind a hung provider.
//! - **Breaker.** After `failures` calls in a row fail as unavailable (timeouts, connection
//!   errors, 5xx, 429), the breaker opens: for `open_for` every call fails at once without
//!   touching the network. Then one trial call is let through (half-open); its success closes
//!   the breaker, its failure opens it again. An answer that refuses the grant is the provider
//!   working, and closes it too.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::ProviderError;

/// The guard's limits, from the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardSettings {
    /// Calls in flight to one provider (`VAULT_PROVIDER_MAX_CONCURRENT_CALLS`).
    pub max_concurrent: usize,
    /// Unavailable answers in a row that open the breaker (`VAULT_PROVIDER_BREAKER_FAILURES`).
    pub failures: u32,
    /// How long the breaker stays open (`VAULT_PROVIDER_BREAKER_OPEN_SECONDS`).
    pub open_for: Duration,
}

impl Default for GuardSettings {
    fn default() -> Self {
        Self {
            max_concurrent: 32,
            failures: 5,
            open_for: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breaker {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One trial call is in flight.
    HalfOpen,
}

/// One provider's cap and breaker.
#[derive(Debug)]
pub struct Guard {
    settings: GuardSettings,
    permits: Semaphore,
    breaker: Mutex<Breaker>,
}

impl Guard {
    /// A closed breaker and a full cap.
    pub fn new(settings: GuardSettings) -> Self {
        Self {
            settings,
            permits: Semaphore::new(settings.max_concurrent),
            breaker: Mutex::new(Breaker::Closed { failures: 0 }),
        }
    }

    /// Runs `call` if the breaker and the cap let it, and learns from its outcome.
    pub async fn run<T>(
        &self,
        tool: &str,
        call: impl Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        self.admit(tool, Instant::now())?;
        // Settles the call as not run if it is dropped (cancelled, or a panic) before its
        // outcome is known, so a half-open trial slot is never left taken for good.
        let mut pending = Pending {
            guard: self,
            settled: false,
        };
        let Ok(_permit) = self.permits.try_acquire() else {
            // Admitted by the breaker but not run: a trial slot must not stay taken.
            pending.settled = true;
            self.settle(false, true, Instant::now());
            tracing::warn!(
                %tool,
                limit = self.settings.max_concurrent,
                "provider calls in flight at the cap; failing this one at once"
            );
            return Err(ProviderError::Paused {
                message: format!(
                    "the provider of tool {tool} already has {} calls in flight; retry later",
                    self.settings.max_concurrent
                ),
                retry_after: None,
            });
        };
        let result = call.await;
        let failed = matches!(result, Err(ProviderError::Unavailable { .. }));
        pending.settled = true;
        self.settle(failed, false, Instant::now());
        result
    }

    /// Whether the breaker lets a call through at `now`.
    fn admit(&self, tool: &str, now: Instant) -> Result<(), ProviderError> {
        let mut breaker = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        match *breaker {
            Breaker::Closed { .. } => Ok(()),
            Breaker::Open { until } if now >= until => {
                *breaker = Breaker::HalfOpen;
                tracing::info!(%tool, "provider breaker half-open: one trial call");
                Ok(())
            }
            Breaker::Open { until } => Err(ProviderError::Paused {
                message: format!(
                    "the provider of tool {tool} failed {} times in a row; calls to it are paused",
                    self.settings.failures
                ),
                retry_after: Some(until.saturating_duration_since(now)),
            }),
            Breaker::HalfOpen => Err(ProviderError::Paused {
                message: format!(
                    "the provider of tool {tool} is being retried after failing; retry shortly"
                ),
                retry_after: Some(Duration::from_secs(1)),
            }),
        }
    }

    /// Records an outcome: `failed` (unavailable) or not; `skipped` when the call never ran.
    fn settle(&self, failed: bool, skipped: bool, now: Instant) {
        let mut breaker = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        *breaker = match (*breaker, failed, skipped) {
            // A trial that did not run leaves the breaker for the next one.
            (Breaker::HalfOpen, _, true) => Breaker::Open { until: now },
            (state, _, true) => state,
            (_, false, false) => Breaker::Closed { failures: 0 },
            (Breaker::HalfOpen, true, false) => Breaker::Open {
                until: now + self.settings.open_for,
            },
            (Breaker::Closed { failures }, true, false) => {
                let failures = failures + 1;
                if failures >= self.settings.failures {
                    tracing::warn!(
                        failures,
                        open_for = ?self.settings.open_for,
                        "provider failing; its breaker opens"
                    );
                    Breaker::Open {
                        until: now + self.settings.open_for,
                    }
                } else {
                    Breaker::Closed { failures }
                }
            }
            // Calls admitted before the breaker opened finish while it is open.
            (Breaker::Open { until }, true, false) => Breaker::Open { until },
        };
    }
}

/// A call admitted by the breaker whose outcome is not yet recorded.
struct Pending<'a> {
    guard: &'a Guard,
    settled: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.guard.settle(false, true, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(max_concurrent: usize) -> Guard {
        Guard::new(GuardSettings {
            max_concurrent,
            failures: 3,
            open_for: Duration::from_secs(30),
        })
    }

    fn unavailable() -> Result<(), ProviderError> {
        Err(ProviderError::Unavailable {
            message: "down".into(),
            retry_after: None,
        })
    }

    #[tokio::test]
    async fn failures_in_a_row_open_the_breaker_and_a_trial_after_the_pause_closes_it() {
        let guard = guard(4);
        for _ in 0..3 {
            assert!(guard.run("t", async { unavailable() }).await.is_err());
        }
        // Open: the call is not even made.
        let made = std::sync::atomic::AtomicBool::new(false);
        let refused = guard
            .run("t", async {
                made.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            })
            .await;
        assert!(matches!(
            refused,
            Err(ProviderError::Paused {
                retry_after: Some(_),
                ..
            })
        ));
        assert!(!made.load(std::sync::atomic::Ordering::SeqCst));

        // Past the pause, one trial goes through: a failure opens it again, a success closes it.
        let later = Instant::now() + Duration::from_secs(31);
        assert!(guard.admit("t", later).is_ok());
        assert!(guard.admit("t", later).is_err(), "one trial at a time");
        guard.settle(true, false, later);
        assert!(guard.admit("t", later + Duration::from_secs(1)).is_err());
        let after = later + Duration::from_secs(31);
        assert!(guard.admit("t", after).is_ok());
        guard.settle(false, false, after);
        assert!(guard.admit("t", after).is_ok(), "closed");
    }

    #[tokio::test]
    async fn a_refused_grant_is_the_provider_working_and_resets_the_count() {
        let guard = guard(4);
        for _ in 0..2 {
            let _ = guard.run("t", async { unavailable() }).await;
        }
        let _ = guard
            .run("t", async {
                Err::<(), _>(ProviderError::GrantRejected("invalid_grant".into()))
            })
            .await;
        for _ in 0..2 {
            let _ = guard.run("t", async { unavailable() }).await;
        }
        assert!(
            guard.admit("t", Instant::now()).is_ok(),
            "2 in a row, not 4"
        );
    }

    #[tokio::test]
    async fn a_trial_dropped_before_it_ends_frees_the_slot_for_the_next() {
        let guard = guard(4);
        for _ in 0..3 {
            let _ = guard.run("t", async { unavailable() }).await;
        }
        *guard.breaker.lock().unwrap() = Breaker::Open {
            until: Instant::now(),
        };
        // The trial is admitted, then cancelled mid-call.
        let trial = guard.run("t", std::future::pending::<Result<(), ProviderError>>());
        assert!(
            tokio::time::timeout(Duration::from_millis(1), trial)
                .await
                .is_err()
        );
        assert!(
            guard.admit("t", Instant::now()).is_ok(),
            "not stuck half-open"
        );
    }

    #[tokio::test]
    async fn past_the_cap_a_call_fails_at_once() {
        let guard = std::sync::Arc::new(guard(1));
        let (entered_tx, entered_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let holder = tokio::spawn({
            let guard = std::sync::Arc::clone(&guard);
            async move {
                guard
                    .run("t", async {
                        let _ = entered_tx.send(());
                        let _ = release_rx.await;
                        Ok(())
                    })
                    .await
            }
        });
        entered_rx.await.unwrap();
        let refused = guard.run("t", async { Ok(()) }).await;
        assert!(matches!(refused, Err(ProviderError::Paused { .. })));
        release_tx.send(()).unwrap();
        holder.await.unwrap().unwrap();
        assert!(guard.run("t", async { Ok(()) }).await.is_ok());
    }
}
