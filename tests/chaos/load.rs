//! A small load generator: callers in closed loops for a while, every outcome and latency
//! tallied, with percentiles.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vault_client::Error;

/// What a run of calls came to.
#[derive(Debug, Default)]
pub struct Tally {
    /// Latency of each call that succeeded.
    pub ok: Vec<Duration>,
    /// Failures by kind (`UNAVAILABLE/STORE_UNAVAILABLE`, …), with their latencies.
    pub failed: BTreeMap<String, Vec<Duration>>,
}

impl Tally {
    /// Counts one outcome.
    pub fn add<T>(&mut self, result: &Result<T, Error>, took: Duration) {
        match result {
            Ok(_) => self.ok.push(took),
            Err(error) => self.failed.entry(kind(error)).or_default().push(took),
        }
    }

    /// Adds another tally's outcomes.
    pub fn merge(&mut self, other: Tally) {
        self.ok.extend(other.ok);
        for (kind, latencies) in other.failed {
            self.failed.entry(kind).or_default().extend(latencies);
        }
    }

    /// Calls that failed.
    pub fn failures(&self) -> usize {
        self.failed.values().map(Vec::len).sum()
    }

    /// Failures by kind, as `kind × count` lines.
    pub fn failure_summary(&self) -> String {
        if self.failed.is_empty() {
            return "none".into();
        }
        self.failed
            .iter()
            .map(|(kind, l)| format!("{kind} × {}", l.len()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A failure's kind: the status class and the vault's reason.
pub fn kind(error: &Error) -> String {
    let class = match error {
        Error::Unavailable { .. } | Error::ProviderUnavailable(_) => "UNAVAILABLE",
        Error::ResourceExhausted { .. } => "RESOURCE_EXHAUSTED",
        Error::DeadlineExceeded(_) => "DEADLINE_EXCEEDED",
        Error::CredentialNotFound => "NOT_FOUND",
        Error::PermissionDenied { .. } => "PERMISSION_DENIED",
        Error::InvalidArgument { .. } => "INVALID_ARGUMENT",
        _ => "OTHER",
    };
    format!("{class}/{}", error.reason().as_str_name())
}

/// The `p`-th percentile (0..=100) of `latencies`, or zero when there are none.
pub fn percentile(latencies: &[Duration], p: f64) -> Duration {
    if latencies.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Milliseconds, for reports.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Runs `callers` closed loops of `call(caller index, iteration)` until `stop` is set, and
/// tallies them.
pub async fn closed_loops<F, Fut, T>(
    callers: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
    call: F,
) -> Tally
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<T, Error>> + Send + 'static,
    T: Send + 'static,
{
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tasks = Vec::new();
    for caller in 0..callers {
        let (call, stop, tally) = (call.clone(), Arc::clone(&stop), Arc::clone(&tally));
        tasks.push(tokio::spawn(async move {
            let mut own = Tally::default();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let result = call(caller, n).await;
                own.add(&result, started.elapsed());
                n += 1;
            }
            tally.lock().unwrap().merge(own);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    Arc::try_unwrap(tally)
        .expect("every caller finished")
        .into_inner()
        .unwrap()
}

/// Runs `closed_loops` for `duration`.
pub async fn for_a_while<F, Fut, T>(callers: usize, duration: Duration, call: F) -> Tally
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<T, Error>> + Send + 'static,
    T: Send + 'static,
{
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let run = tokio::spawn(closed_loops(callers, Arc::clone(&stop), call));
    tokio::time::sleep(duration).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    run.await.unwrap()
}
