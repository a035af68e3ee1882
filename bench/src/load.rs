//! The closed-loop load driver: `concurrency` tasks each issue one call after another for a
//! warm-up and then a measured window, recording every measured call's latency.
//!
//! Closed loop means throughput and latency are two views of one run (rps ≈ concurrency /
//! mean latency); that is what the ratios compare, not an open-loop arrival rate.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// How long one cell runs.
#[derive(Debug, Clone, Copy)]
pub struct Phases {
    /// Calls before this are not recorded: statement preparation, cold caches, pool growth.
    pub warmup: Duration,
    /// Calls that start within this window after the warm-up are recorded.
    pub measure: Duration,
}

/// The outcome of one cell.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Median latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile latency, microseconds.
    pub p99_us: f64,
    /// Measured calls per second.
    pub rps: f64,
    /// Measured calls that succeeded.
    pub calls: u64,
    /// Calls that failed, warm-up included: any failure makes the run fail.
    pub errors: u64,
    /// What the first failure said.
    pub first_error: Option<String>,
}

/// Latencies in nanoseconds from 1 ns to 60 s at 3 significant digits (0.1% resolution).
fn histogram() -> Histogram<u64> {
    // Constant, valid bounds: low ≥ 1, high ≥ 2 × low, sigfig ≤ 5.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

struct TaskResult {
    latencies: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
    last_end: Option<Instant>,
}

/// Runs `call` from `concurrency` tasks for `phases`. `call(task, pick)` gets the task's index
/// (to choose its channel) and a fresh random number (to choose its target).
pub async fn drive<F, Fut>(concurrency: usize, phases: Phases, call: F) -> Sample
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let call = Arc::new(call);
    // Every task shares one clock, so the measured window is the same for all of them.
    let start = Instant::now();
    let measure_from = start + phases.warmup;
    let until = measure_from + phases.measure;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..concurrency {
        let call = Arc::clone(&call);
        tasks.spawn(async move {
            let mut rng = fastrand::Rng::new();
            let mut result = TaskResult {
                latencies: histogram(),
                errors: 0,
                first_error: None,
                last_end: None,
            };
            loop {
                let begin = Instant::now();
                if begin >= until {
                    break;
                }
                let outcome = call(task, rng.u64(..)).await;
                let end = Instant::now();
                match outcome {
                    Ok(()) if begin >= measure_from => {
                        let nanos = u64::try_from((end - begin).as_nanos()).unwrap_or(u64::MAX);
                        result.latencies.saturating_record(nanos);
                        result.last_end = Some(end);
                    }
                    Ok(()) => {}
                    Err(message) => {
                        result.errors += 1;
                        result.first_error.get_or_insert(message);
                    }
                }
            }
            result
        });
    }
    let mut latencies = histogram();
    let mut errors = 0;
    let mut first_error = None;
    let mut last_end = measure_from;
    while let Some(joined) = tasks.join_next().await {
        let result = match joined {
            Ok(result) => result,
            Err(err) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("load task failed: {err}"));
                continue;
            }
        };
        // Same bounds on both sides, so adding cannot fail.
        latencies
            .add(&result.latencies)
            .expect("histograms with equal bounds add");
        errors += result.errors;
        if first_error.is_none() {
            first_error = result.first_error;
        }
        if let Some(end) = result.last_end {
            last_end = last_end.max(end);
        }
    }
    let calls = latencies.len();
    // The window ends when the last measured call returned, which is a little after `until`.
    let window = (last_end - measure_from).as_secs_f64();
    Sample {
        p50_us: latencies.value_at_quantile(0.50) as f64 / 1_000.0,
        p99_us: latencies.value_at_quantile(0.99) as f64 / 1_000.0,
        rps: if window > 0.0 {
            calls as f64 / window
        } else {
            0.0
        },
        calls,
        errors,
        first_error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn latencies_and_throughput_of_a_known_delay_are_reported() {
        let phases = Phases {
            warmup: Duration::from_millis(20),
            measure: Duration::from_millis(200),
        };
        let sample = drive(4, phases, |_, _| async {
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok(())
        })
        .await;
        assert_eq!(sample.errors, 0);
        assert!(sample.p50_us >= 2_000.0, "{sample:?}");
        assert!(sample.rps > 100.0 && sample.rps < 2_100.0, "{sample:?}");
    }

    #[tokio::test]
    async fn failures_are_counted_and_the_first_is_kept() {
        let phases = Phases {
            warmup: Duration::ZERO,
            measure: Duration::from_millis(20),
        };
        let sample = drive(2, phases, |task, _| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            if task == 1 {
                Err("boom".into())
            } else {
                Ok(())
            }
        })
        .await;
        assert!(sample.errors > 0);
        assert_eq!(sample.first_error.as_deref(), Some("boom"));
        assert!(sample.calls > 0);
    }
}
