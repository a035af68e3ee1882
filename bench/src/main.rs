//! `vault-bench`: the command line. The run lives in [`vault_bench::run`]; this prints it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use vault_bench::report::AuditReleases;
use vault_bench::run::{DEFAULT_SERVER_LOG, Options, run};

/// Measures GetToken against its floors (a bare gRPC echo, its one SELECT, and one durable
/// INSERT the size of an audit record) and prints the ratios; then onboards many agents and
/// measures what they cost. Needs PostgreSQL and a release-built vault-server.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Short cells (0.5 s warm-up + 1.5 s), 20 × 50 seeded credentials and 2,000 agents in the
    /// agents workload.
    #[arg(long)]
    quick: bool,
    /// The agents workload onboards this many agents, one credential each, and measures
    /// onboarding, GetToken spread over them, the PostgreSQL backends' memory and a restart
    /// [default: 10,000, or 2,000 with --quick; 0 skips it]. Its full form is 100,000.
    #[arg(long, value_name = "N")]
    agents: Option<usize>,
    /// Also write the results as JSON here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// The vault-server binary [default: next to this executable].
    #[arg(long, value_name = "PATH")]
    server: Option<PathBuf>,
    /// The vault-bench-echo binary [default: next to this executable].
    #[arg(long, value_name = "PATH")]
    echo: Option<PathBuf>,
    /// PostgreSQL to run on; a fresh `vault_bench_*` database is created beside this one and
    /// dropped at the end.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// RUST_LOG for the server (it must still log its `credential vault listening` line).
    #[arg(long, value_name = "FILTER", default_value = DEFAULT_SERVER_LOG)]
    server_log: String,
    /// Diagnosis: leave Nagle's algorithm on in the echo server, to see what it costs.
    #[arg(long, hide = true)]
    echo_nagle: bool,
    /// Diagnosis: ping before every SELECT-pool acquire (sqlx's default), to see what it costs.
    #[arg(long, hide = true)]
    select_ping: bool,
    /// Seed this many agents for the five workloads (default: 100, or 20 with --quick).
    #[arg(long, value_name = "N")]
    seed_agents: Option<usize>,
    /// Seed this many users per agent (default: 100, or 50 with --quick).
    #[arg(long, value_name = "N")]
    users: Option<usize>,
    /// Pass a setting to the server, such as `VAULT_DATABASE_AGENT_ROLES=false` (repeatable).
    /// Nothing else from this shell reaches it.
    #[arg(long = "server-env", value_name = "NAME=VALUE", value_parser = parse_pair)]
    server_env: Vec<(String, String)>,
    /// Start the server with VAULT_AUDIT_RELEASES set to this: `on` records every successful
    /// GetToken in the audit log, `off` does not. Recorded in the JSON's `config`.
    #[arg(long, value_enum, value_name = "off|on", default_value = "on")]
    audit_releases: AuditReleases,
    /// Start the server without the policy of 1,000 grants every run loads otherwise.
    #[arg(long)]
    no_policy: bool,
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got {text:?}"))?;
    if !name.starts_with("VAULT_") && !name.starts_with("OTEL_") {
        return Err(format!("{name}: only VAULT_* and OTEL_* settings"));
    }
    Ok((name.to_string(), value.to_string()))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let options = Options {
        quick: cli.quick,
        server: cli.server,
        echo: cli.echo,
        database_url: cli.database_url,
        server_log: cli.server_log,
        echo_nagle: cli.echo_nagle,
        select_ping: cli.select_ping,
        agents: cli.seed_agents,
        agents_workload: cli.agents,
        users: cli.users,
        server_env: cli.server_env,
        audit_releases: cli.audit_releases,
        no_policy: cli.no_policy,
    };
    let started = Instant::now();
    let outcome = match run(&options).await {
        Ok(outcome) => outcome,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let machine = vault_bench::report::machine();
    println!("# vault-bench{}\n", if cli.quick { " --quick" } else { "" });
    println!("machine: {machine}");
    for note in &outcome.notes {
        println!("- {note}");
    }
    println!("\n{}", outcome.results.markdown());
    let failures = outcome.results.failures();
    if !failures.is_empty() {
        println!("FAILED: {} call(s) failed", outcome.results.errors());
        for (workload, concurrency, errors, first) in failures {
            println!("- {workload} c{concurrency}: {errors} failed; first: {first}");
        }
        // A run with failed calls has no trustworthy numbers: no JSON, non-zero exit.
        return ExitCode::FAILURE;
    }
    let ratios = match outcome.results.ratios() {
        Ok(ratios) => ratios,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", ratios.markdown());
    println!("wall time: {:.1} s", started.elapsed().as_secs_f64());
    if let Some(path) = cli.json {
        let written = outcome
            .results
            .json(&machine, &outcome.config)
            .and_then(|doc| Ok(serde_json::to_string_pretty(&doc)?))
            .and_then(|text| Ok(std::fs::write(&path, text + "\n")?));
        if let Err(err) = written {
            eprintln!("error: writing {}: {err:#}", path.display());
            return ExitCode::FAILURE;
        }
        println!("JSON written to {}", path.display());
    }
    ExitCode::SUCCESS
}
