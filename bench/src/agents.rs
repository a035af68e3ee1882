//! The agents workload (issue 18): what giving every agent its own PostgreSQL schema costs as
//! the number of agents grows.
//!
//! It onboards N agents, one credential each: each agent's first StoreToken creates its schema,
//! role and key. GetToken then runs against one agent, at c16 and c64. Next every agent is read
//! once, in random order ("first reads"), so that the cells spread over the agents that follow
//! measure a vault that has met every agent, not a vault meeting them for the first time
//! (a 2-second cell at N = 2,000 would otherwise be mostly first reads, and its figure would
//! depend on the cell's length). Then GetToken runs spread uniformly over all N, and
//! Zipf-skewed over them, at c16 and c64. The private memory of the PostgreSQL backends serving
//! the vault ([`backend_memory`](crate::backend_memory)) is read after onboarding and after the
//! uniform spread. Last, the server is restarted and timed until it reports SERVING with the N
//! agents present.
//!
//! The agents are `team-000000-bot`…: the policy every run loads admits them through its one
//! `team-*-bot` glob grant, as a fleet would be admitted, rather than through N grants.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tonic::transport::Channel;
use vault_client::proto::{OAuthToken, StoreTokenRequest};

use crate::backend_memory::{self, BackendMemory};
use crate::health::{self, VAULT_SERVICE};
use crate::issuer::Issuer;
use crate::load::{Phases, Sample, drive_each};
use crate::process::{ChildProcess, Launch};
use crate::report::round;
use crate::workloads::{self, Population, TOOL};
use crate::zipf::Zipf;

/// Concurrent first StoreTokens while onboarding.
pub const ONBOARDING_CONCURRENCY: usize = 16;
/// Concurrent first reads.
pub const FIRST_READ_CONCURRENCY: usize = 64;
/// Concurrent GetTokens of the agents that existed before onboarding, idle and while it runs.
pub const EXISTING_READ_CONCURRENCY: usize = 4;
/// The concurrency levels of the GetToken cells.
pub const LEVELS: [usize; 2] = [16, 64];
/// The Zipf exponent of the skewed cells.
pub const ZIPF_S: f64 = 1.1;
/// How long the restarted server may take to report SERVING: generous, because how long it
/// takes is the measurement.
const RESTART_TIMEOUT: Duration = Duration::from_secs(600);
/// How often onboarding reports its progress, when it takes that long.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// The id of the agent at `index`.
pub fn agent_id(index: usize) -> String {
    format!("team-{index:06}-bot")
}

/// How the GetToken calls of a cell spread over the agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Spread {
    /// Every call reads the first agent's credential: the baseline, a working set of one.
    Single,
    /// Each call reads a uniformly random agent's credential.
    Uniform,
    /// Each call reads the credential of agent `k` with probability ∝ `(k + 1)^-ZIPF_S`.
    Zipf,
}

impl Spread {
    /// In run and report order.
    pub const ALL: [Self; 3] = [Self::Single, Self::Uniform, Self::Zipf];

    /// The key in the JSON's `results.agents`.
    pub fn key(self) -> &'static str {
        match self {
            Self::Single => "single",
            Self::Uniform => "spread",
            Self::Zipf => "zipf",
        }
    }

    /// The name in the list of failed cells.
    fn cell_name(self) -> &'static str {
        match self {
            Self::Single => "agents_single",
            Self::Uniform => "agents_spread",
            Self::Zipf => "agents_zipf",
        }
    }
}

/// The restart at the end of the workload.
#[derive(Debug, Clone, Copy)]
pub struct Restart {
    /// From SIGTERM to the old process's exit, in milliseconds.
    pub stop_ms: f64,
    /// From starting the new process to its health service reporting the vault SERVING, in
    /// milliseconds.
    pub to_serving_ms: f64,
    /// The first GetToken after that, against cold caches, in milliseconds.
    pub first_get_ms: f64,
}

/// GetToken for the agents that existed before onboarding began (the run's seeded ones), on a
/// connection onboarding does not use: first alone, then for as long as onboarding runs.
#[derive(Debug)]
pub struct ExistingReads {
    /// A cell of the usual length just before onboarding.
    pub idle: Sample,
    /// Every call made while the N agents onboarded.
    pub during_onboarding: Sample,
}

impl ExistingReads {
    /// p99 while onboarding over p99 idle: whether onboarding stalls other agents' reads (issue
    /// 18's bound is 2).
    pub fn p99_over_idle(&self) -> Option<f64> {
        (self.idle.p99_us > 0.0).then(|| self.during_onboarding.p99_us / self.idle.p99_us)
    }
}

/// Everything the workload measured.
#[derive(Debug)]
pub struct AgentsResults {
    /// Agents onboarded.
    pub n: usize,
    /// Spare agent schemas ready when onboarding began.
    pub spares_at_onboarding: usize,
    /// Every agent's first StoreToken; `rps` is agents onboarded per second.
    pub onboarding: Sample,
    /// The existing agents' reads, idle and while onboarding ran.
    pub existing_reads: ExistingReads,
    /// Every agent's first GetToken, in random order, after the single-agent cells.
    pub first_reads: Sample,
    /// The GetToken cells.
    pub cells: BTreeMap<(Spread, usize), Sample>,
    /// The vault's backends after onboarding, or why they could not be read.
    pub memory_after_onboarding: Result<BackendMemory, String>,
    /// The vault's backends after the uniform spread, or why they could not be read.
    pub memory: Result<BackendMemory, String>,
    /// The vault-server process's own private memory after the uniform spread, in MiB.
    pub server_private_mib: Option<f64>,
    /// The restart.
    pub restart: Restart,
}

impl AgentsResults {
    /// Calls that failed, over every cell.
    pub fn errors(&self) -> u64 {
        self.onboarding.errors
            + self.existing_reads.idle.errors
            + self.existing_reads.during_onboarding.errors
            + self.first_reads.errors
            + self.cells.values().map(|s| s.errors).sum::<u64>()
    }

    /// `(cell, concurrency, errors, first error)` for every cell with failures.
    pub fn failures(&self) -> Vec<(&'static str, usize, u64, String)> {
        [
            (
                "agents_onboarding",
                ONBOARDING_CONCURRENCY,
                &self.onboarding,
            ),
            (
                "agents_existing_idle",
                EXISTING_READ_CONCURRENCY,
                &self.existing_reads.idle,
            ),
            (
                "agents_existing_during_onboarding",
                EXISTING_READ_CONCURRENCY,
                &self.existing_reads.during_onboarding,
            ),
            (
                "agents_first_reads",
                FIRST_READ_CONCURRENCY,
                &self.first_reads,
            ),
        ]
        .into_iter()
        .chain(
            self.cells
                .iter()
                .map(|((spread, c), s)| (spread.cell_name(), *c, s)),
        )
        .filter(|(_, _, s)| s.errors > 0)
        .map(|(name, c, s)| (name, c, s.errors, s.first_error.clone().unwrap_or_default()))
        .collect()
    }

    /// GetToken throughput at c64 spread as `spread` over the single-agent throughput at c64.
    pub fn over_single_c64(&self, spread: Spread) -> Option<f64> {
        let single = self.cells.get(&(Spread::Single, 64))?.rps;
        let other = self.cells.get(&(spread, 64))?.rps;
        (single > 0.0).then(|| other / single)
    }

    /// `results.agents` of the JSON.
    pub fn json(&self) -> Value {
        let memory = |m: &Result<BackendMemory, String>| match m {
            Ok(m) => json!({
                "backends": m.backends.len(),
                "total_mib": round(m.total_mib(), 1),
                "max_mib": round(m.max_mib(), 1),
                "mean_mib": round(m.mean_mib(), 1),
            }),
            Err(_) => Value::Null,
        };
        let latencies = |s: &Sample| {
            json!({
                "calls_per_s": round(s.rps, 1),
                "p50_us": round(s.p50_us, 1),
                "p99_us": round(s.p99_us, 1),
            })
        };
        let mut doc = json!({
            "n": self.n,
            "onboarding": {
                "concurrency": ONBOARDING_CONCURRENCY,
                "spares_ready": self.spares_at_onboarding,
                "rate": round(self.onboarding.rps, 1),
                "p50_ms": round(self.onboarding.p50_us / 1_000.0, 2),
                "p99_ms": round(self.onboarding.p99_us / 1_000.0, 2),
            },
            "existing_reads": {
                "concurrency": EXISTING_READ_CONCURRENCY,
                "idle": latencies(&self.existing_reads.idle),
                "during_onboarding": latencies(&self.existing_reads.during_onboarding),
                "p99_over_idle": self.existing_reads.p99_over_idle().map(|r| round(r, 3)),
            },
            "first_read": {
                "concurrency": FIRST_READ_CONCURRENCY,
                "calls_per_s": round(self.first_reads.rps, 1),
                "p50_us": round(self.first_reads.p50_us, 1),
                "p99_us": round(self.first_reads.p99_us, 1),
            },
            "zipf_s": ZIPF_S,
            "backend_memory": memory(&self.memory),
            "backend_memory_after_onboarding": memory(&self.memory_after_onboarding),
            "server_private_mib": self.server_private_mib.map(|m| round(m, 1)),
            "restart_stop_ms": round(self.restart.stop_ms, 1),
            "restart_to_serving_ms": round(self.restart.to_serving_ms, 1),
            "first_get_after_restart_ms": round(self.restart.first_get_ms, 2),
        });
        for spread in Spread::ALL {
            let mut levels = serde_json::Map::new();
            for concurrency in LEVELS {
                if let Some(s) = self.cells.get(&(spread, concurrency)) {
                    levels.insert(format!("c{concurrency}"), latencies(s));
                }
            }
            doc[spread.key()] = Value::Object(levels);
        }
        doc
    }

    /// The readable summary.
    pub fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let o = &self.onboarding;
        let mut out = format!(
            "agents workload: N = {}, one credential each\n\n\
             onboarding (each agent's first StoreToken, c{ONBOARDING_CONCURRENCY}): \
             {:.0} agents/s, p50 {:.1} ms, p99 {:.1} ms\n\
             existing agents' GetToken (c{EXISTING_READ_CONCURRENCY}): idle p50 {:.0} µs, \
             p99 {:.0} µs; while onboarding p50 {:.0} µs, p99 {:.0} µs ({:.2} × idle p99)\n\
             first reads (each agent's first GetToken, random order, c{FIRST_READ_CONCURRENCY}): \
             {:.0} calls/s, p50 {:.1} ms, p99 {:.1} ms\n\n\
             | GetToken over the agents | concurrency | p50 µs | p99 µs | calls/s | ÷ single |\n\
             |---|---:|---:|---:|---:|---:|\n",
            self.n,
            o.rps,
            o.p50_us / 1_000.0,
            o.p99_us / 1_000.0,
            self.existing_reads.idle.p50_us,
            self.existing_reads.idle.p99_us,
            self.existing_reads.during_onboarding.p50_us,
            self.existing_reads.during_onboarding.p99_us,
            self.existing_reads.p99_over_idle().unwrap_or(f64::NAN),
            self.first_reads.rps,
            self.first_reads.p50_us / 1_000.0,
            self.first_reads.p99_us / 1_000.0,
        );
        for ((spread, concurrency), s) in &self.cells {
            let label = match spread {
                Spread::Single => "one agent".to_string(),
                Spread::Uniform => "uniform over all".to_string(),
                Spread::Zipf => format!("Zipf s = {ZIPF_S}"),
            };
            let single = self
                .cells
                .get(&(Spread::Single, *concurrency))
                .map_or(f64::NAN, |single| s.rps / single.rps);
            let _ = writeln!(
                out,
                "| {label} | {concurrency} | {:.0} | {:.0} | {:.0} | {single:.2} |",
                s.p50_us, s.p99_us, s.rps
            );
        }
        out.push_str(
            "\nprivate memory (Private_Clean + Private_Dirty) of the PostgreSQL backends \
             serving the vault:\n\n\
             | after | backends | total MiB | max MiB | mean MiB | each, MiB |\n\
             |---|---:|---:|---:|---:|---|\n",
        );
        for (when, memory) in [
            ("onboarding", &self.memory_after_onboarding),
            ("the uniform spread", &self.memory),
        ] {
            let _ = match memory {
                Ok(m) => writeln!(
                    out,
                    "| {when} | {} | {:.1} | {:.1} | {:.1} | {} |",
                    m.backends.len(),
                    m.total_mib(),
                    m.max_mib(),
                    m.mean_mib(),
                    m.backends
                        .iter()
                        .map(|b| format!("{:.0}", b.private_kib as f64 / 1024.0))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Err(why) => writeln!(out, "| {when} | not measured: {why} | | | | |"),
            };
        }
        if let Some(mib) = self.server_private_mib {
            let _ = writeln!(
                out,
                "\nvault-server's own private memory after the spread: {mib:.1} MiB"
            );
        }
        let r = &self.restart;
        let _ = writeln!(
            out,
            "\nrestart with {} agents: stopped in {:.0} ms; SERVING {:.0} ms after the new \
             process started; its first GetToken took {:.1} ms",
            self.n, r.stop_ms, r.to_serving_ms, r.first_get_ms
        );
        out
    }
}

/// The first `count` of `channels`.
fn first(channels: &Arc<[Channel]>, count: usize) -> Arc<[Channel]> {
    channels.iter().take(count).cloned().collect()
}

/// How many agents the workload onboards, how many spare schemas it waits for first (the
/// server's `VAULT_DATABASE_SPARE_SCHEMAS` when the run sets it), and the agents already there.
#[derive(Clone)]
pub struct Size {
    /// Agents onboarded.
    pub agents: usize,
    /// Spare schemas to wait for before onboarding (at most `agents`).
    pub spares: Option<usize>,
    /// The run's seeded agents, read before and while onboarding.
    pub existing: Population,
}

/// Runs the workload with `size.agents` agents against the server in `server`, reached through
/// `channels` (at least enough for c64), whose database is `database_url`. The restart at the
/// end replaces `server` with a new process started from `launch`.
pub async fn run(
    size: Size,
    issuer: &Issuer,
    channels: Arc<[Channel]>,
    database_url: &str,
    phases: Phases,
    server: &mut Option<ChildProcess>,
    launch: &Launch,
) -> anyhow::Result<AgentsResults> {
    let (n, spares, existing) = (size.agents.max(1), size.spares, size.existing);
    let minting = Instant::now();
    let population = Population::with_agents(issuer, (0..n).map(agent_id).collect(), 1)?;
    eprintln!(
        "agents: {n} caller tokens signed in {:.1} s",
        minting.elapsed().as_secs_f64()
    );
    // Its own name, so it is never counted among the vault's backends.
    let options: PgConnectOptions = database_url.parse()?;
    let mut conn = PgConnection::connect_with(&options.application_name("vault-bench")).await?;

    let wanted = spares.map(|k| k.min(n)).unwrap_or(0);
    wait_for_spares(&mut conn, wanted, "before onboarding").await?;
    let spares_at_onboarding = spares_ready(&mut conn).await?;
    // The existing agents' reads go over the last connection; onboarding uses the first.
    let readers: Arc<[Channel]> = channels.iter().last().cloned().into_iter().collect();
    let idle = workloads::get_token(
        Arc::clone(&readers),
        existing.clone(),
        EXISTING_READ_CONCURRENCY,
        phases,
    )
    .await;
    report_line("existing idle", EXISTING_READ_CONCURRENCY, &idle, "calls/s");
    let onboarding_runs = Arc::new(AtomicBool::new(true));
    let beside = tokio::spawn(workloads::get_token_while(
        readers,
        existing,
        EXISTING_READ_CONCURRENCY,
        Arc::clone(&onboarding_runs),
    ));
    let onboarding = onboard(first(&channels, 1), population.clone()).await;
    onboarding_runs.store(false, Ordering::Relaxed);
    let existing_reads = ExistingReads {
        idle,
        during_onboarding: beside.await?,
    };
    report_line(
        "existing during onboarding",
        EXISTING_READ_CONCURRENCY,
        &existing_reads.during_onboarding,
        "calls/s",
    );
    report_line(
        "onboarding",
        ONBOARDING_CONCURRENCY,
        &onboarding,
        "agents/s",
    );
    if onboarding.errors > 0 {
        // An agent that was not onboarded fails every read below; nothing after this counts.
        anyhow::bail!(
            "agents: {} of {n} first StoreTokens failed; first: {}",
            onboarding.errors,
            onboarding.first_error.unwrap_or_default()
        );
    }
    let memory_after_onboarding = backend_memory::measure(&mut conn)
        .await
        .map_err(|e| format!("{e:#}"));
    // The job refills what onboarding took: the read cells measure a vault at rest, not one
    // making schemas beside them.
    wait_for_spares(&mut conn, spares.unwrap_or(0), "after onboarding").await?;

    let reads = Reads {
        channels: Arc::clone(&channels),
        population: population.clone(),
        zipf: Arc::new(Zipf::new(n, ZIPF_S)?),
        phases,
    };
    let mut cells = BTreeMap::new();
    for concurrency in LEVELS {
        cells.insert(
            (Spread::Single, concurrency),
            reads.cell(Spread::Single, concurrency).await,
        );
    }
    let first_reads = first_read_each(Arc::clone(&channels), &population).await;
    report_line(
        "first reads",
        FIRST_READ_CONCURRENCY,
        &first_reads,
        "calls/s",
    );
    for concurrency in LEVELS {
        cells.insert(
            (Spread::Uniform, concurrency),
            reads.cell(Spread::Uniform, concurrency).await,
        );
    }
    let memory = backend_memory::measure(&mut conn)
        .await
        .map_err(|e| format!("{e:#}"));
    let server_private_mib = server
        .as_ref()
        .and_then(ChildProcess::pid)
        .and_then(|pid| backend_memory::private_kib_of(pid).ok())
        .map(|kib| kib as f64 / 1024.0);
    for concurrency in LEVELS {
        cells.insert(
            (Spread::Zipf, concurrency),
            reads.cell(Spread::Zipf, concurrency).await,
        );
    }
    drop(reads);
    conn.close().await?;
    // Closed before the restart, so the old server has no connections left to drain.
    drop(channels);

    let restart = restart(server, launch, &population).await?;
    eprintln!(
        "restart: stopped in {:.0} ms, SERVING after {:.0} ms, first GetToken {:.1} ms",
        restart.stop_ms, restart.to_serving_ms, restart.first_get_ms
    );
    Ok(AgentsResults {
        n,
        spares_at_onboarding,
        onboarding,
        existing_reads,
        first_reads,
        cells,
        memory_after_onboarding,
        memory,
        server_private_mib,
        restart,
    })
}

/// Waits until `wanted` spare schemas are ready in the vault's database (the server's job makes
/// them), saying how long that took; returns at once when `wanted` is 0.
pub async fn wait_for_spares(
    conn: &mut PgConnection,
    wanted: usize,
    when: &str,
) -> anyhow::Result<()> {
    if wanted == 0 {
        return Ok(());
    }
    let waiting = Instant::now();
    // Generous: a spare is about 15 ms of DDL on an idle 2-core machine, more under load.
    let deadline = waiting + Duration::from_secs(60 + wanted as u64 / 5);
    loop {
        let ready = spares_ready(conn).await?;
        if ready >= wanted {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "agents: {ready} of {wanted} spare schemas ready {when} after {:.0} s",
            waiting.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "agents: {wanted} spare schemas ready {when} after {:.1} s",
        waiting.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The spare agent schemas ready in the vault's database.
async fn spares_ready(conn: &mut PgConnection) -> anyhow::Result<usize> {
    let ready: i64 = sqlx::query_scalar("SELECT count(*) FROM vault.spare_schemas")
        .fetch_one(conn)
        .await?;
    Ok(usize::try_from(ready).unwrap_or(0))
}

/// What the GetToken cells share.
struct Reads {
    /// Enough connections for the highest level.
    channels: Arc<[Channel]>,
    /// One credential per agent, agent `k` at index `k`.
    population: Population,
    /// Ranks over the agents for [`Spread::Zipf`].
    zipf: Arc<Zipf>,
    /// Warm-up and measured window of each cell.
    phases: Phases,
}

impl Reads {
    /// One GetToken cell, its calls spread over the agents as `spread` says.
    async fn cell(&self, spread: Spread, concurrency: usize) -> Sample {
        let channels = first(&self.channels, workloads::channels_for(concurrency));
        let population = self.population.clone();
        let n = population.credentials.len() as u64;
        let phases = self.phases;
        let sample = match spread {
            Spread::Single => {
                workloads::get_token_picking(channels, population, concurrency, phases, |_| 0).await
            }
            Spread::Uniform => {
                workloads::get_token_picking(
                    channels,
                    population,
                    concurrency,
                    phases,
                    move |pick| (pick % n) as usize,
                )
                .await
            }
            Spread::Zipf => {
                let zipf = Arc::clone(&self.zipf);
                workloads::get_token_picking(
                    channels,
                    population,
                    concurrency,
                    phases,
                    move |pick| zipf.rank_of_bits(pick),
                )
                .await
            }
        };
        report_line(spread.cell_name(), concurrency, &sample, "rps");
        sample
    }
}

/// One progress line on stderr, in the layout of the other cells'.
fn report_line(name: &str, concurrency: usize, sample: &Sample, unit: &str) {
    eprintln!(
        "{name:>11} c{concurrency:<2}  p50 {:>8.1} µs  p99 {:>8.1} µs  {:>8.0} {unit}  {} calls, {} errors",
        sample.p50_us, sample.p99_us, sample.rps, sample.calls, sample.errors
    );
}

/// Every agent's first GetToken, [`FIRST_READ_CONCURRENCY`] at a time, in a random order: the
/// order agents created one after another would otherwise be read in could favour caches.
async fn first_read_each(channels: Arc<[Channel]>, population: &Population) -> Sample {
    let mut order: Vec<usize> = (0..population.credentials.len()).collect();
    fastrand::shuffle(&mut order);
    let order: Arc<[usize]> = order.into();
    let credentials = Arc::clone(&population.credentials);
    drive_each(FIRST_READ_CONCURRENCY, order.len(), move |task, index| {
        let credential = &credentials[order[index]];
        workloads::checked_get_token(
            workloads::channel_of(&channels, task),
            Arc::clone(&credential.jwt),
        )
    })
    .await
}

/// Every agent's first StoreToken, [`ONBOARDING_CONCURRENCY`] at a time over `channels`, with a
/// progress line every [`PROGRESS_INTERVAL`] for long runs.
async fn onboard(channels: Arc<[Channel]>, population: Population) -> Sample {
    // Converted once, outside the timed calls.
    let token = OAuthToken::from(workloads::oauth_token());
    let done = Arc::new(AtomicUsize::new(0));
    let total = population.credentials.len();
    let progress = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(PROGRESS_INTERVAL);
            ticks.tick().await;
            let mut before = 0;
            loop {
                ticks.tick().await;
                let now = done.load(Ordering::Relaxed);
                // The rate of the last interval, not the mean so far: whether onboarding slows
                // down as agents accumulate is part of what this measures.
                eprintln!(
                    "onboarding: {now} of {total} agents; {:.0} agents/s over the last {} s",
                    (now - before) as f64 / PROGRESS_INTERVAL.as_secs_f64(),
                    PROGRESS_INTERVAL.as_secs()
                );
                before = now;
            }
        })
    };
    let calls = Arc::clone(&done);
    let sample = drive_each(ONBOARDING_CONCURRENCY, total, move |task, index| {
        let credential = &population.credentials[index];
        let client = workloads::raw_client(workloads::channel_of(&channels, task), &credential.jwt);
        let request = StoreTokenRequest {
            tool: TOOL.into(),
            token: Some(token.clone()),
            ttl_seconds: 0,
        };
        let done = Arc::clone(&calls);
        async move {
            let response = client?
                .store_token(request)
                .await
                .map_err(|s| format!("first StoreToken: {}", vault_client::Error::from(s)))?
                .into_inner();
            done.fetch_add(1, Ordering::Relaxed);
            if response.generation == 0 {
                return Err("first StoreToken returned generation 0".into());
            }
            Ok(())
        }
    })
    .await;
    progress.abort();
    sample
}

/// Stops the server, starts it again from `launch`, waits until it reports the vault SERVING,
/// and reads one agent's credential through it.
async fn restart(
    server: &mut Option<ChildProcess>,
    launch: &Launch,
    population: &Population,
) -> anyhow::Result<Restart> {
    let old = server
        .take()
        .ok_or_else(|| anyhow::anyhow!("no vault-server to restart"))?;
    let stopping = Instant::now();
    old.stop().await?;
    let stop_ms = stopping.elapsed().as_secs_f64() * 1_000.0;

    let launch = Launch {
        start_timeout: RESTART_TIMEOUT,
        ..launch.clone()
    };
    let starting = Instant::now();
    let started = ChildProcess::launch(&launch).await?;
    let endpoint = started.endpoint();
    // Kept where teardown finds it before anything below can fail.
    *server = Some(started);
    health::wait_serving(&endpoint, VAULT_SERVICE, starting + RESTART_TIMEOUT).await?;
    let to_serving_ms = starting.elapsed().as_secs_f64() * 1_000.0;

    // The last agent onboarded: the restarted server must serve every agent it found, and this
    // is the first call to meet its cold caches.
    let credential = population
        .credentials
        .last()
        .ok_or_else(|| anyhow::anyhow!("no agents"))?;
    let channels = workloads::connect(&endpoint, 1).await?;
    let reading = Instant::now();
    workloads::checked_get_token(channels[0].clone(), Arc::clone(&credential.jwt))
        .await
        .map_err(|e| anyhow::anyhow!("after the restart: {e}"))?;
    let first_get_ms = reading.elapsed().as_secs_f64() * 1_000.0;
    Ok(Restart {
        stop_ms,
        to_serving_ms,
        first_get_ms,
    })
}

/// A cell of `rps` calls per second, for tests.
#[cfg(test)]
fn example_sample(rps: f64) -> Sample {
    Sample {
        p50_us: 500.0,
        p99_us: 2_000.0,
        rps,
        calls: 100,
        errors: 0,
        first_error: None,
    }
}

/// A complete result where spreading halves throughput and Zipf costs a quarter, for tests.
#[cfg(test)]
pub(crate) fn example() -> AgentsResults {
    let mut cells = BTreeMap::new();
    for (spread, rps) in [
        (Spread::Single, 4_000.0),
        (Spread::Uniform, 2_000.0),
        (Spread::Zipf, 3_000.0),
    ] {
        for concurrency in LEVELS {
            cells.insert((spread, concurrency), example_sample(rps));
        }
    }
    AgentsResults {
        spares_at_onboarding: 0,
        n: 2_000,
        onboarding: example_sample(150.0),
        existing_reads: ExistingReads {
            idle: example_sample(1_000.0),
            during_onboarding: Sample {
                p99_us: 3_000.0,
                ..example_sample(900.0)
            },
        },
        first_reads: example_sample(800.0),
        cells,
        memory_after_onboarding: Err("no /proc".into()),
        memory: Ok(BackendMemory {
            backends: vec![backend_memory::Backend {
                pid: 7,
                application_name: "vault-server".into(),
                private_kib: 10 * 1024,
            }],
        }),
        server_private_mib: Some(40.0),
        restart: Restart {
            stop_ms: 20.0,
            to_serving_ms: 200.0,
            first_get_ms: 3.0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_match_the_policys_glob_and_are_valid_ids() {
        for index in [0, 1_999, 99_999, 1_000_000] {
            let id = agent_id(index);
            assert!(id.starts_with("team-") && id.ends_with("-bot"), "{id}");
            vault_server::ids::AgentId::parse(id.as_str()).unwrap();
        }
        assert_eq!(agent_id(42), "team-000042-bot");
    }

    #[test]
    fn the_spread_ratios_divide_c64_throughputs_by_the_single_agents() {
        let results = example();
        assert_eq!(results.over_single_c64(Spread::Uniform), Some(0.5));
        assert_eq!(results.over_single_c64(Spread::Zipf), Some(0.75));
    }

    #[test]
    fn the_json_has_the_pinned_shape() {
        let doc = example().json();
        assert_eq!(doc["n"], 2_000);
        for field in ["rate", "p50_ms", "p99_ms"] {
            assert!(doc["onboarding"][field].is_number(), "onboarding.{field}");
        }
        for field in ["calls_per_s", "p50_us", "p99_us"] {
            assert!(doc["first_read"][field].is_number(), "first_read.{field}");
        }
        for spread in ["single", "spread", "zipf"] {
            for level in ["c16", "c64"] {
                for field in ["calls_per_s", "p50_us", "p99_us"] {
                    assert!(
                        doc[spread][level][field].is_number(),
                        "{spread}.{level}.{field}"
                    );
                }
            }
        }
        assert_eq!(doc["backend_memory"]["backends"], 1);
        assert_eq!(doc["backend_memory"]["total_mib"], 10.0);
        assert!(doc["backend_memory_after_onboarding"].is_null());
        assert_eq!(doc["restart_to_serving_ms"], 200.0);
        for when in ["idle", "during_onboarding"] {
            for field in ["calls_per_s", "p50_us", "p99_us"] {
                assert!(
                    doc["existing_reads"][when][field].is_number(),
                    "existing_reads.{when}.{field}"
                );
            }
        }
        assert_eq!(doc["existing_reads"]["p99_over_idle"], 1.5);
    }

    #[test]
    fn a_read_that_failed_while_agents_onboarded_fails_the_run() {
        let mut results = example();
        results.existing_reads.during_onboarding.errors = 1;
        results.existing_reads.during_onboarding.first_error = Some("GetToken: stalled".into());
        assert_eq!(results.errors(), 1);
        assert_eq!(
            results.failures(),
            vec![(
                "agents_existing_during_onboarding",
                EXISTING_READ_CONCURRENCY,
                1,
                "GetToken: stalled".to_string()
            )]
        );
    }

    #[test]
    fn a_failed_read_is_listed_under_its_cell() {
        let mut results = example();
        let cell = results
            .cells
            .get_mut(&(Spread::Zipf, 64))
            .expect("the fixture has every cell");
        cell.errors = 2;
        cell.first_error = Some("GetToken: boom".into());
        assert_eq!(results.errors(), 2);
        assert_eq!(
            results.failures(),
            vec![("agents_zipf", 64, 2, "GetToken: boom".to_string())]
        );
    }
}
