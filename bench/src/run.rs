//! One bench run from start to finish: a fresh database, a generated root key and issuer, the
//! vault server and the echo server as children, seeding, the fifteen measured cells, the agents
//! workload, and a teardown that runs whatever happened before it (error or Ctrl-C included).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::{Duration, Instant};

use base64::Engine as _;
use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::process::Command;
use tonic::transport::Channel;

use vault_server::config::DatabaseSettings;
use vault_server::crypto::RootKey;

use crate::agents;
use crate::database::BenchDb;
use crate::issuer::Issuer;
use crate::load::Phases;
use crate::process::{self, ChildProcess, Launch};
use crate::report::{AuditReleases, CONCURRENCY, Results, RunConfig, WORKLOADS};
use crate::workloads::{self, EchoShape, Population};

/// The log filter for the server: the one it runs with by default, so the bench pays for the
/// spans a deployment has (the vault logs nothing per successful call at this level).
pub const DEFAULT_SERVER_LOG: &str = vault_server::telemetry::DEFAULT_FILTER;
/// The line `vault-server` logs once it is bound.
const SERVER_MARKER: &str = "credential vault listening";
/// The line `vault-bench-echo` prints once it is bound.
pub const ECHO_MARKER: &str = "vault-bench-echo listening";

/// What the command line chose.
#[derive(Debug, Clone)]
pub struct Options {
    /// Short cells and a smaller population, for a run under a minute.
    pub quick: bool,
    /// The `vault-server` binary; default: next to this executable.
    pub server: Option<PathBuf>,
    /// The `vault-bench-echo` binary; default: next to this executable.
    pub echo: Option<PathBuf>,
    /// Any database on the PostgreSQL server to use; the run creates its own beside it.
    pub database_url: String,
    /// `RUST_LOG` for the server.
    pub server_log: String,
    /// Run the echo server with Nagle's algorithm on, as the vault server's sockets are, to see
    /// how much of the gap that explains.
    pub echo_nagle: bool,
    /// Let the SELECT pool ping each connection before handing it out, as the server's pool
    /// does (sqlx's default), to see what that round trip costs.
    pub select_ping: bool,
    /// Seed this many agents instead of the scale's.
    pub agents: Option<usize>,
    /// Onboard this many agents in the agents workload instead of the scale's; 0 skips it.
    pub agents_workload: Option<usize>,
    /// Seed this many users per agent instead of the scale's.
    pub users: Option<usize>,
    /// Extra settings for the server (`--server-env`), applied after the bench's own.
    pub server_env: Vec<(String, String)>,
    /// `VAULT_AUDIT_RELEASES` for the server (`--audit-releases`); not settable through
    /// `server_env`, so the value the report records is the one the server ran with.
    pub audit_releases: AuditReleases,
    /// Run the server without the policy every run loads otherwise (`--no-policy`), to see
    /// what evaluating it costs.
    pub no_policy: bool,
}

/// The server setting `--audit-releases` owns.
const AUDIT_RELEASES_ENV: &str = "VAULT_AUDIT_RELEASES";

/// How big and how long a run is.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Seeded agents.
    pub agents: usize,
    /// Seeded users per agent.
    pub users: usize,
    /// Warm-up and measured window of every cell.
    pub phases: Phases,
    /// Agents the agents workload onboards, one credential each; 0 skips it.
    pub agents_workload: usize,
}

impl Scale {
    /// The full run: 100 × 100 credentials, 2 s warm-up + 10 s per cell, and 10,000 agents in
    /// the agents workload. Issue 18's full form, 100,000 agents, is `--agents 100000`: it
    /// takes longer than a run should by default.
    pub const FULL: Self = Self {
        agents: 100,
        users: 100,
        phases: Phases {
            warmup: Duration::from_secs(2),
            measure: Duration::from_secs(10),
        },
        agents_workload: 10_000,
    };
    /// `--quick`: 20 × 50 credentials, 0.5 s + 1.5 s per cell, and 2,000 agents in the agents
    /// workload.
    pub const QUICK: Self = Self {
        agents: 20,
        users: 50,
        phases: Phases {
            warmup: Duration::from_millis(500),
            measure: Duration::from_millis(1500),
        },
        agents_workload: 2_000,
    };
}

/// What a run produced.
#[derive(Debug)]
pub struct Outcome {
    /// Every cell.
    pub results: Results,
    /// What was measured, for the reader: scale, sizes, binaries.
    pub notes: Vec<String>,
    /// The settings the numbers depend on, for the JSON.
    pub config: RunConfig,
}

/// The vault server's default pool size (`VAULT_DATABASE_MAX_CONNECTIONS`: 8 × cores, 16..32).
/// The bench sets it explicitly on the server and uses it for its own SELECT pool, so both
/// sides of the comparison have the same number of connections.
pub fn pool_size() -> u32 {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
    (cores * 8).clamp(16, 32)
}

fn sibling(explicit: Option<&Path>, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no directory", exe.display()))?
        .join(name);
    if !path.is_file() {
        anyhow::bail!(
            "{name} not found next to {}; build it with \
             `cargo build --release -p vault-bench -p vault-server` or pass its path",
            exe.display()
        );
    }
    Ok(path)
}

/// The children of a run, kept outside the measuring future so teardown can reach them even
/// when that future failed or was cancelled.
#[derive(Default)]
struct Children {
    server: Option<ChildProcess>,
    echo: Option<ChildProcess>,
}

/// Runs everything and always tears down: SIGTERM to both children, then the database dropped.
pub async fn run(options: &Options) -> anyhow::Result<Outcome> {
    let mut scale = if options.quick {
        Scale::QUICK
    } else {
        Scale::FULL
    };
    scale.agents = options.agents.unwrap_or(scale.agents).max(1);
    scale.users = options.users.unwrap_or(scale.users).max(1);
    scale.agents_workload = options.agents_workload.unwrap_or(scale.agents_workload);
    if options
        .server_env
        .iter()
        .any(|(k, _)| k == AUDIT_RELEASES_ENV)
    {
        anyhow::bail!("set {AUDIT_RELEASES_ENV} with --audit-releases, not --server-env");
    }
    let server_bin = sibling(options.server.as_deref(), "vault-server")?;
    let echo_bin = sibling(options.echo.as_deref(), "vault-bench-echo")?;
    let db = BenchDb::create(&options.database_url).await?;
    eprintln!("database {} created", db.name);
    let mut children = Children::default();
    let measured = tokio::select! {
        result = measure(options, scale, &server_bin, &echo_bin, &db, &mut children) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let mut teardown = Vec::new();
    for child in [children.server.take(), children.echo.take()]
        .into_iter()
        .flatten()
    {
        if let Err(err) = child.stop().await {
            teardown.push(format!("{err:#}"));
        }
    }
    let name = db.name.clone();
    match db.drop_database().await {
        Ok(()) => eprintln!("database {name} dropped"),
        Err(err) => teardown.push(format!("dropping database {name}: {err:#}")),
    }
    let mut outcome = measured?;
    if !teardown.is_empty() {
        // The numbers stand, but a server that did not stop cleanly is worth a loud note.
        outcome
            .notes
            .extend(teardown.into_iter().map(|t| format!("teardown: {t}")));
    }
    Ok(outcome)
}

/// The new agents one issuer may cause per minute (`VAULT_AGENT_CREATION_PER_MINUTE`): the
/// server's most, so the agents workload measures how fast agents can be onboarded, not the
/// default limit of 600 a minute. It changes nothing else the run measures.
const AGENT_CREATION_PER_MINUTE: &str = "1000000";

/// Grants in the policy every run loads: issue 16 asks for its cost with 1,000 agents.
const POLICY_AGENTS: usize = 1000;

/// A policy granting `agents` agents (`agent-000`…, as the population names them) the bench's
/// tool one grant each, and a glob grant besides.
fn policy_text(agents: usize) -> String {
    let mut text = String::new();
    for agent in 0..agents {
        text.push_str(&format!(
            "[[grants]]\nagents = [\"agent-{agent:03}\"]\ntools = [\"{}\"]\n",
            workloads::TOOL
        ));
    }
    text.push_str("[[grants]]\nname = \"teams\"\nagents = [\"team-*-bot\"]\ntools = [\"*\"]\n");
    text
}

fn subset(channels: &Arc<[Channel]>, count: usize) -> Arc<[Channel]> {
    channels.iter().take(count).cloned().collect()
}

async fn measure(
    options: &Options,
    scale: Scale,
    server_bin: &Path,
    echo_bin: &Path,
    db: &BenchDb,
    children: &mut Children,
) -> anyhow::Result<Outcome> {
    let mut notes = Vec::new();
    let issuer = Issuer::generate()?;
    // What `vault-server keygen` writes: base64 of 32 bytes from the OS RNG.
    let root_key = base64::engine::general_purpose::STANDARD.encode(
        RootKey::generate()
            .software_bytes()
            // A generated key is held in this process.
            .expect("a generated key has its bytes"),
    );
    let pool_size = pool_size();
    let path = std::env::var("PATH").unwrap_or_default();

    // Every run carries a policy of POLICY_AGENTS grants (the seeded agents among them), so the
    // figures include its evaluation on every call.
    let policy_dir = tempfile::tempdir()?;
    let policy_path = policy_dir.path().join("policy.toml");
    std::fs::write(&policy_path, policy_text(POLICY_AGENTS.max(scale.agents)))?;
    // Only what is set here: a VAULT_CONFIG or VAULT_* in the caller's shell must not change
    // what is measured. Kept whole, so the agents workload's restart starts the same server.
    let mut env: Vec<(OsString, OsString)> = [
        ("PATH", path.as_str()),
        ("RUST_LOG", options.server_log.as_str()),
        ("VAULT_LISTEN", "127.0.0.1:0"),
        ("VAULT_DATABASE_URL", db.url.as_str()),
        ("VAULT_DATABASE_MAX_CONNECTIONS", &pool_size.to_string()),
        ("VAULT_ROOT_KEY", root_key.as_str()),
        ("VAULT_JWT_ISSUER", issuer.iss.as_str()),
        // The background sweeper is not the hot path; keep its scans out of the tail.
        ("VAULT_SWEEP_INTERVAL_SECONDS", "86400"),
        ("VAULT_SHUTDOWN_GRACE_SECONDS", "5"),
        ("VAULT_AGENT_CREATION_PER_MINUTE", AGENT_CREATION_PER_MINUTE),
        (AUDIT_RELEASES_ENV, options.audit_releases.as_str()),
    ]
    .into_iter()
    .map(|(name, value)| (name.into(), value.into()))
    .collect();
    env.push((
        "VAULT_JWT_JWKS_FILE".into(),
        issuer.jwks_path.clone().into_os_string(),
    ));
    if !options.no_policy {
        env.push((
            "VAULT_POLICY_FILE".into(),
            policy_path.clone().into_os_string(),
        ));
    }
    env.extend(
        options
            .server_env
            .iter()
            .map(|(name, value)| (name.into(), value.into())),
    );
    let server_launch = Launch {
        name: "vault-server",
        program: server_bin.to_owned(),
        args: vec!["serve".into()],
        env,
        marker: SERVER_MARKER,
        start_timeout: process::START_TIMEOUT,
    };
    children.server = Some(ChildProcess::launch(&server_launch).await?);
    let mut echo = Command::new(echo_bin);
    echo.env_clear().env("PATH", &path);
    if options.echo_nagle {
        echo.arg("--nagle");
    }
    children.echo = Some(ChildProcess::spawn("vault-bench-echo", echo, ECHO_MARKER).await?);
    let (server_endpoint, echo_endpoint) = match (&children.server, &children.echo) {
        (Some(server), Some(echo)) => (server.endpoint(), echo.endpoint()),
        _ => unreachable!("both children were just started"),
    };
    eprintln!("vault-server at {server_endpoint}, echo at {echo_endpoint}");

    let max_channels = workloads::channels_for(CONCURRENCY[CONCURRENCY.len() - 1]);
    let vault_channels = workloads::connect(&server_endpoint, max_channels).await?;
    let echo_channels = workloads::connect(&echo_endpoint, max_channels).await?;

    // Spares asked for are made by the server's job as it starts: the cells below wait for
    // them, so that they measure a vault at rest, not one making schemas beside them.
    let spares = options
        .server_env
        .iter()
        .rev()
        .find(|(name, _)| name == "VAULT_DATABASE_SPARE_SCHEMAS")
        .and_then(|(_, value)| value.parse::<usize>().ok());
    if let Some(wanted) = spares.filter(|_| scale.agents_workload > 0) {
        let mut conn = sqlx::PgConnection::connect(&db.url).await?;
        agents::wait_for_spares(&mut conn, wanted, "before the cells").await?;
        conn.close().await?;
    }

    let population = Population::new(&issuer, scale.agents, scale.users)?;
    let seeding = Instant::now();
    workloads::seed(Arc::clone(&vault_channels), &population, scale.users, 64).await?;
    let seeded = population.credentials.len();
    eprintln!(
        "seeded {seeded} credentials in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    notes.push(format!(
        "seeded {} agents × {} users = {seeded} credentials (tool {:?}){}",
        scale.agents,
        scale.users,
        workloads::TOOL,
        if (scale.agents, scale.users) != (Scale::FULL.agents, Scale::FULL.users) {
            "; fewer or more than the full run's 100 × 100, so not comparable with it"
        } else {
            ""
        }
    ));
    notes.push(format!(
        "each cell: {:.1} s warm-up, {:.1} s measured; {} tasks per HTTP/2 connection; \
         server and SELECT pools: {pool_size} connections",
        scale.phases.warmup.as_secs_f64(),
        scale.phases.measure.as_secs_f64(),
        workloads::TASKS_PER_CHANNEL,
    ));
    let shape = EchoShape::like_get_token(scale.users as u64);
    notes.push(format!(
        "echo: request {} B, response {} B (GetToken's encoded sizes; echo sends no JWT)",
        shape.request_len, shape.response_len
    ));
    if options.echo_nagle {
        notes.push("echo runs with Nagle's algorithm on (--echo-nagle)".into());
    }
    notes.push(if options.no_policy {
        "policy: none (--no-policy)".to_string()
    } else {
        format!(
            "policy: {} exact grants and one glob grant loaded (VAULT_POLICY_FILE), checked on every call",
            POLICY_AGENTS.max(scale.agents)
        )
    });
    notes.push(format!(
        "server: {} (RUST_LOG={}, {AUDIT_RELEASES_ENV}={})",
        server_bin.display(),
        options.server_log,
        options.audit_releases.as_str()
    ));

    // The floor is one SELECT: one round trip, on connections set up like the server's (no
    // ping before acquire, the same statement cache). `--select-ping` adds sqlx's default
    // ping round trip, to show what it would cost.
    let connect: PgConnectOptions = db.url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .min_connections(pool_size)
        .test_before_acquire(options.select_ping)
        .connect_with(connect.statement_cache_capacity(DatabaseSettings::DEFAULT_STATEMENT_CACHE))
        .await?;
    notes.push(format!(
        "select pool: {}",
        if options.select_ping {
            "pings before every acquire (--select-ping)"
        } else {
            "no ping before acquire (one round trip per SELECT)"
        }
    ));
    let statements = workloads::select_statements(&pool, &issuer, &population).await?;
    // The insert floor runs on the same pool, so it has the SELECT's connections and settings;
    // commit durability is the database's, and the report says what that was.
    let (synchronous_commit, fsync) = workloads::commit_durability(&pool).await?;
    let iss: Arc<str> = issuer.iss.as_str().into();
    let sequence = Arc::new(AtomicI64::new(1));

    let mut results = Results::default();
    for workload in WORKLOADS {
        if workload == "insert" {
            workloads::create_audit_floor(&pool).await?;
        }
        for concurrency in CONCURRENCY {
            let channels = workloads::channels_for(concurrency);
            let phases = scale.phases;
            let sample = match workload {
                "echo" => {
                    workloads::echo(
                        subset(&echo_channels, channels),
                        &shape,
                        concurrency,
                        phases,
                    )
                    .await
                }
                "select" => {
                    workloads::select(
                        pool.clone(),
                        Arc::clone(&statements),
                        population.clone(),
                        concurrency,
                        phases,
                    )
                    .await
                }
                "insert" => {
                    workloads::insert(
                        pool.clone(),
                        population.clone(),
                        Arc::clone(&iss),
                        Arc::clone(&sequence),
                        concurrency,
                        phases,
                    )
                    .await
                }
                "get_token" => {
                    workloads::get_token(
                        subset(&vault_channels, channels),
                        population.clone(),
                        concurrency,
                        phases,
                    )
                    .await
                }
                "store_token" => {
                    workloads::store_token(
                        subset(&vault_channels, channels),
                        population.clone(),
                        concurrency,
                        phases,
                    )
                    .await
                }
                other => unreachable!("unknown workload {other}"),
            };
            eprintln!(
                "{workload:>11} c{concurrency:<2}  p50 {:>8.1} µs  p99 {:>8.1} µs  {:>8.0} rps  {} calls, {} errors",
                sample.p50_us, sample.p99_us, sample.rps, sample.calls, sample.errors
            );
            results.insert(workload, concurrency, sample);
        }
        if workload == "insert" {
            let row_bytes = workloads::audit_floor_row_bytes(&pool).await?;
            workloads::drop_audit_floor(&pool).await?;
            notes.push(format!(
                "insert: one auto-commit INSERT per call of a {row_bytes:.0}-byte row \
                 (audit-record sized) into a table of the bench's own, dropped after its cells; \
                 synchronous_commit={synchronous_commit}, fsync={fsync} (the database's own)"
            ));
        }
    }
    pool.close().await;
    if let Some(server) = children.server.as_mut()
        && !server.is_running()
    {
        anyhow::bail!("vault-server died during the run:\n{}", server.recent_log());
    }

    // Last, because it adds thousands of agent schemas to the database and restarts the
    // server: nothing above may see either.
    if scale.agents_workload > 0 {
        // Spares asked for are waited for, so onboarding measures taking them, not making them.
        let measured = agents::run(
            agents::Size {
                agents: scale.agents_workload,
                spares,
                existing: population.clone(),
            },
            &issuer,
            // Moved: the restart at its end goes faster with no connections left to drain.
            vault_channels,
            &db.url,
            scale.phases,
            &mut children.server,
            &server_launch,
        )
        .await?;
        // `--server-env` comes last in the server's environment, so its value is the one that
        // held.
        let creation_limit = options
            .server_env
            .iter()
            .rev()
            .find(|(name, _)| name == "VAULT_AGENT_CREATION_PER_MINUTE")
            .map_or(AGENT_CREATION_PER_MINUTE, |(_, value)| value.as_str());
        notes.push(format!(
            "agents workload: {} agents (team-000000-bot…), one credential each; onboarding at \
             c{} with VAULT_AGENT_CREATION_PER_MINUTE={creation_limit}, then GetToken cells of \
             the same length as above; Zipf s = {}",
            measured.n,
            agents::ONBOARDING_CONCURRENCY,
            agents::ZIPF_S
        ));
        results.set_agents(measured);
    } else {
        notes.push("agents workload: skipped (--agents 0)".into());
    }
    Ok(Outcome {
        results,
        notes,
        config: RunConfig {
            audit_releases: options.audit_releases,
        },
    })
}
