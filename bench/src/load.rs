//! The closed-loop load driver: `concurrency` tasks each issue one call after another for a
//! warm-up and then a measured window, recording every measured call's latency.
//!
//! Closed loop means throughput and latency are two views of one run (rps ≈ concurrency /
//! mean latency); that is what the ratios compare, not an open-loop arrival rate.
//!
//! [`drive_each`] is the same loop over a fixed list of calls instead of a window, for work that
//! happens once per target (an agent's first store); [`drive_while`] runs until told to stop,
//! beside another workload.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    // Every task shares one clock, so the measured window is the same for all of them.
    let measure_from = Instant::now() + phases.warmup;
    let until = measure_from + phases.measure;
    drive_window(concurrency, measure_from, move |now| now >= until, call).await
}

/// Runs `call` as [`drive`] does, from now until `running` turns false, recording every call:
/// the load beside another workload (reads while agents onboard), which lasts as long as it.
pub async fn drive_while<F, Fut>(concurrency: usize, running: Arc<AtomicBool>, call: F) -> Sample
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    drive_window(
        concurrency,
        Instant::now(),
        move |_| !running.load(Ordering::Relaxed),
        call,
    )
    .await
}

/// The closed loop of [`drive`] and [`drive_while`]: calls that start before `measure_from` are
/// not recorded, and no call starts once `over(now)` holds.
async fn drive_window<O, F, Fut>(
    concurrency: usize,
    measure_from: Instant,
    over: O,
    call: F,
) -> Sample
where
    O: Fn(Instant) -> bool + Send + Sync + 'static,
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let call = Arc::new(call);
    let over = Arc::new(over);
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..concurrency {
        let call = Arc::clone(&call);
        let over = Arc::clone(&over);
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
                if over(begin) {
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
    let merged = merge(tasks).await;
    let calls = merged.latencies.len();
    // The window ends when the last measured call returned, which is a little after its end.
    let last_end = merged
        .last_end
        .map_or(measure_from, |end| end.max(measure_from));
    let window = (last_end - measure_from).as_secs_f64();
    Sample {
        p50_us: merged.latencies.value_at_quantile(0.50) as f64 / 1_000.0,
        p99_us: merged.latencies.value_at_quantile(0.99) as f64 / 1_000.0,
        rps: if window > 0.0 {
            calls as f64 / window
        } else {
            0.0
        },
        calls,
        errors: merged.errors,
        first_error: merged.first_error,
    }
}

/// What the tasks of one cell add up to.
struct Merged {
    latencies: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
    /// When the last recorded call returned, if any was recorded.
    last_end: Option<Instant>,
}

/// Waits for every task and adds up what they recorded; a task that panicked counts as one
/// failure.
async fn merge(mut tasks: tokio::task::JoinSet<TaskResult>) -> Merged {
    let mut merged = Merged {
        latencies: histogram(),
        errors: 0,
        first_error: None,
        last_end: None,
    };
    while let Some(joined) = tasks.join_next().await {
        let result = match joined {
            Ok(result) => result,
            Err(err) => {
                merged.errors += 1;
                merged
                    .first_error
                    .get_or_insert_with(|| format!("load task failed: {err}"));
                continue;
            }
        };
        // Same bounds on both sides, so adding cannot fail.
        merged
            .latencies
            .add(&result.latencies)
            .expect("histograms with equal bounds add");
        merged.errors += result.errors;
        if merged.first_error.is_none() {
            merged.first_error = result.first_error;
        }
        merged.last_end = merged.last_end.max(result.last_end);
    }
    merged
}

/// Runs `call(task, index)` exactly once for every index in `0..count`, from `concurrency`
/// tasks that each take the next index when their last call returns. Every call is recorded:
/// this measures work that happens once (an agent's first store), so there is no warm-up to
/// discard. `rps` is `count` over the wall time of the whole batch.
pub async fn drive_each<F, Fut>(concurrency: usize, count: usize, call: F) -> Sample
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let call = Arc::new(call);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..concurrency.max(1) {
        let call = Arc::clone(&call);
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            let mut result = TaskResult {
                latencies: histogram(),
                errors: 0,
                first_error: None,
                last_end: None,
            };
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count {
                    break;
                }
                let begin = Instant::now();
                let outcome = call(task, index).await;
                let end = Instant::now();
                match outcome {
                    Ok(()) => {
                        let nanos = u64::try_from((end - begin).as_nanos()).unwrap_or(u64::MAX);
                        result.latencies.saturating_record(nanos);
                    }
                    Err(message) => {
                        result.errors += 1;
                        result.first_error.get_or_insert(message);
                    }
                }
            }
            result
        });
    }
    let merged = merge(tasks).await;
    let wall = start.elapsed().as_secs_f64();
    Sample {
        p50_us: merged.latencies.value_at_quantile(0.50) as f64 / 1_000.0,
        p99_us: merged.latencies.value_at_quantile(0.99) as f64 / 1_000.0,
        rps: if wall > 0.0 { count as f64 / wall } else { 0.0 },
        calls: merged.latencies.len(),
        errors: merged.errors,
        first_error: merged.first_error,
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

    #[tokio::test]
    async fn a_load_beside_another_runs_until_told_to_stop_and_records_every_call() {
        let running = Arc::new(AtomicBool::new(true));
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let stop = Arc::clone(&running);
        let load = tokio::spawn(drive_while(2, Arc::clone(&running), move |_, _| {
            let counted = Arc::clone(&counted);
            let stop = Arc::clone(&stop);
            async move {
                tokio::time::sleep(Duration::from_micros(200)).await;
                // The workload beside it ends after the 40th call.
                if counted.fetch_add(1, Ordering::Relaxed) + 1 == 40 {
                    stop.store(false, Ordering::Relaxed);
                }
                Ok(())
            }
        }));
        // Joined within a deadline: a loop that ignored the flag would never end.
        let sample = tokio::time::timeout(Duration::from_secs(30), load)
            .await
            .expect("the load stops once told to")
            .expect("the load task does not panic");
        let made = calls.load(Ordering::Relaxed) as u64;
        // The two tasks may each have one call in flight when the flag turns; every call counts.
        assert!((40..=41).contains(&made), "{made}");
        assert_eq!((sample.calls, sample.errors), (made, 0));
        assert!(sample.rps > 0.0, "{sample:?}");
    }

    #[tokio::test]
    async fn each_index_is_called_exactly_once_and_every_call_is_recorded() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let sample = drive_each(3, 50, move |_, index| {
            let record = Arc::clone(&record);
            async move {
                tokio::time::sleep(Duration::from_micros(100)).await;
                // Only this test's tasks hold the lock, each for one push.
                record
                    .lock()
                    .expect("the list is never poisoned")
                    .push(index);
                Ok(())
            }
        })
        .await;
        let mut seen = seen.lock().expect("the list is never poisoned").clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
        assert_eq!((sample.calls, sample.errors), (50, 0));
        assert!(sample.rps > 0.0 && sample.p50_us >= 100.0, "{sample:?}");
    }
}
