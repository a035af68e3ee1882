//! `vault-server`: the command line. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vault_server::config::{DatabaseSettings, Settings, Source};
use vault_server::startup::Application;

/// Credential vault for AI agents: delegated OAuth2 credentials over gRPC.
#[derive(Parser)]
#[command(
    version,
    about,
    // Our own `help`, so that `help settings` can list the settings.
    disable_help_subcommand = true,
    after_help = "Settings come from VAULT_* variables and the VAULT_CONFIG file; \
                  `vault-server help settings` lists every one with its default and range."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC (the default). Settings come from VAULT_* variables and VAULT_CONFIG.
    Serve,
    /// Apply database migrations, then upgrade every agent schema still behind, in batches,
    /// while replicas keep serving (each also upgrades an agent it uses first); then exit.
    /// Stopped half-way, it keeps what it did: run it again to finish.
    Migrate {
        /// Agent schemas looked up per batch (each is upgraded in its own transaction).
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch: u32,
    },
    /// Delete credentials past their vault TTL once, then exit.
    Sweep {
        /// Most credentials to delete.
        #[arg(long, default_value_t = 10_000)]
        limit: u32,
        /// Count only.
        #[arg(long)]
        dry_run: bool,
    },
    /// Development mode: embedded store and generated keys in VAULT_DATA_DIR (./vault-data);
    /// prints a caller token and ready-to-paste commands. Never for real credentials.
    Dev,
    /// Mint a development caller token with the key `dev` generated (refuses without one).
    Token {
        /// The agent claim.
        #[arg(long, default_value = "demo-agent")]
        agent: String,
        /// The user (`sub`).
        #[arg(long, default_value = "demo-user")]
        user: String,
        /// Add the vault:admin scope.
        #[arg(long)]
        admin: bool,
        /// Add the vault:store scope (StoreToken: what a gateway has, not an agent).
        #[arg(long)]
        store: bool,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Print the effective settings (secrets redacted), then any problem with them.
    Config {
        /// Instead, print every setting with its default, accepted values and meaning.
        #[arg(long)]
        docs: bool,
    },
    /// Discover an MCP server's authorization as the MCP specification's clients do (its 401
    /// challenge, RFC 9728 protected-resource metadata, then RFC 8414 or OpenID metadata of its
    /// authorization server), print what was found, and exit non-zero with the first violation.
    /// Reads VAULT_PROVIDER_CA_FILE, VAULT_PROVIDER_CONNECT_TIMEOUT_SECONDS,
    /// VAULT_PROVIDER_TIMEOUT_SECONDS and VAULT_EGRESS_ALLOW_CIDRS (URLs the server names must
    /// pass it). Makes no registration.
    McpProbe {
        /// The MCP server's URL: https://, or http:// to a loopback host.
        url: String,
        /// The tool name errors mention.
        #[arg(long, default_value = "probe")]
        tool: String,
        /// Also register a client by dynamic client registration (RFC 7591) with redirect URI
        /// OAUTH_TOOL_REDIRECT_URI, and print its client_id (never its secret). The
        /// registration is not saved: the vault registers itself at first use.
        #[arg(long)]
        register: bool,
    },
    /// Print this help, a command's help (`help sweep`), or `help settings`: every setting with
    /// its default, accepted values and meaning (as `config --docs`).
    Help {
        /// `settings`, or a command.
        topic: Vec<String>,
    },
    /// The audit log: verify its hash chains, or export its records. Reads VAULT_DATABASE_URL
    /// (and, for `verify`, the root key as `serve` does).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Rotate the root key online: re-wrap every agent key (and the control key) under a new
    /// root in batches while replicas keep serving, then make it the vault's root in one
    /// transaction. The current root comes from the settings, as `serve` reads it. Interrupted,
    /// run it again with the same keys to finish. Afterwards, restart every replica with the
    /// new root; a replica still on the old one serves only agents it has already unlocked.
    /// Uses VAULT_DATABASE_MIGRATE_URL when set (the owner may rewrite the registry).
    RotateRoot {
        /// The new root key file (as `keygen` writes it).
        #[arg(long, conflicts_with_all = ["new_passphrase_env", "new_pkcs11_module", "abort"], required_unless_present_any = ["new_passphrase_env", "new_pkcs11_module", "abort"])]
        new_key_file: Option<PathBuf>,
        /// The name of the environment variable holding the new root passphrase.
        #[arg(long, conflicts_with_all = ["new_pkcs11_module", "abort"])]
        new_passphrase_env: Option<String>,
        /// The new root is a key in a PKCS#11 token (made by `keygen --pkcs11`): the module's
        /// path. Restart the replicas with VAULT_ROOT_PKCS11_* naming the same key.
        #[arg(long, conflicts_with = "abort", requires = "new_pkcs11_token")]
        new_pkcs11_module: Option<PathBuf>,
        /// The label of the token holding the new root key.
        #[arg(long, requires = "new_pkcs11_module")]
        new_pkcs11_token: Option<String>,
        /// The label of the new root key in the token.
        #[arg(long, default_value = "vault-root")]
        new_pkcs11_key: String,
        /// A file holding the token's user PIN.
        #[arg(long, requires = "new_pkcs11_module", conflicts_with = "new_pkcs11_pin_env", required_unless_present_any = ["new_pkcs11_pin_env", "new_key_file", "new_passphrase_env", "abort"])]
        new_pkcs11_pin_file: Option<PathBuf>,
        /// The name of the environment variable holding the token's user PIN.
        #[arg(long, requires = "new_pkcs11_module")]
        new_pkcs11_pin_env: Option<String>,
        /// Agents re-wrapped per batch (each batch is one round of small updates).
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch: u32,
        /// Abandon the rotation in progress: forget the new root's key check and every wrap
        /// under it. The current root stays the root.
        #[arg(long)]
        abort: bool,
    },
    /// Rotate agent keys online: a new key version of the agent (or of every agent) becomes
    /// current at once, every credential, queued revocation and consent-flow secret sealed under
    /// the old version is re-sealed under the new one in batches while replicas keep serving,
    /// and the old version is then destroyed (and recorded in the agent's audit log). The root
    /// key comes from the settings, as `serve` reads it. Interrupted, run it again to finish.
    /// Uses VAULT_DATABASE_MIGRATE_URL when set.
    RotateAgentKey {
        /// The agent id.
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        agent: Option<String>,
        /// The issuer it is registered under; needed only when several have such an agent.
        #[arg(long, requires = "agent")]
        issuer: Option<String>,
        /// Every registered agent, one after the other.
        #[arg(long)]
        all: bool,
        /// Rows re-sealed per batch.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch: u32,
    },
    /// Crypto-shred an agent: destroy its key, then its credentials, queued revocations, consent
    /// flows and audit chain (on PostgreSQL, its schema and role); its identity can never be
    /// registered again. Without --yes, prints what it would destroy and does nothing. Uses
    /// VAULT_DATABASE_MIGRATE_URL when set (dropping a schema is the owner's right).
    ShredAgent {
        /// The agent id.
        #[arg(long)]
        agent: String,
        /// The issuer it is registered under; needed only when several have such an agent.
        #[arg(long)]
        issuer: Option<String>,
        /// Destroy, rather than print what would be destroyed.
        #[arg(long)]
        yes: bool,
        /// Shred even while provider revocations are queued for the agent (they are abandoned,
        /// and counted in the log and the audit record); without it the shred waits for the
        /// replicas to deliver them.
        #[arg(long)]
        skip_provider_revocation: bool,
    },
    /// Write a new random root key file (mode 0600) for VAULT_ROOT_KEY_FILE, or with --pkcs11
    /// create the root key inside the PKCS#11 token that VAULT_ROOT_PKCS11_* names.
    Keygen {
        /// Where to write it; refuses to overwrite.
        #[arg(long, default_value = "vault-root.key", conflicts_with = "pkcs11")]
        out: PathBuf,
        /// Create an AES-256 key in the token instead (sensitive, never extractable); refuses a
        /// label in use.
        #[arg(long)]
        pkcs11: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Walk the control chain and every agent's chain (or the agent named) from its anchor,
    /// checking every record's hash and sequence and the head signed under the root key. Prints
    /// each broken chain with its first broken record, then a summary; exits 1 if any is broken.
    Verify {
        /// Only this agent's chain (under every issuer that has such an agent, unless --issuer).
        #[arg(long)]
        agent: Option<String>,
        /// Only agents of this issuer (the exact `iss`).
        #[arg(long)]
        issuer: Option<String>,
    },
    /// Write the records stamped at or after --since to stdout as JSON lines, chain by chain
    /// (every chain, or the agent named). Shows a progress bar on stderr at a terminal.
    Export {
        /// An RFC 3339 time (2026-01-31T00:00:00Z) or a span back from now (30m, 24h, 7d, 2w).
        #[arg(long)]
        since: String,
        /// Only this agent's chain (under every issuer that has such an agent, unless --issuer).
        #[arg(long)]
        agent: Option<String>,
        /// Only agents of this issuer (the exact `iss`).
        #[arg(long)]
        issuer: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // The span exporter's channel runs on this runtime.
    let telemetry = {
        let _entered = runtime.enter();
        vault_server::telemetry::init(
            std::io::stderr,
            vault_server::telemetry::DEFAULT_FILTER,
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
        )
    };
    let telemetry = match telemetry {
        Ok(telemetry) => telemetry,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli.command.unwrap_or(Command::Serve)));
    telemetry.shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            match err.downcast_ref::<ExitWith>() {
                Some(exit) => ExitCode::from(exit.0),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// A failure that asks for its own exit status instead of 1.
#[derive(Debug, thiserror::Error)]
#[error("{1}")]
struct ExitWith(u8, String);

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            let settings = Settings::load(&Source::from_env()?)?;
            let app = Application::build(settings).await?;
            app.run_until_stopped(shutdown_signal()).await
        }
        Command::Migrate { batch } => {
            let source = Source::from_env()?;
            let settings = DatabaseSettings::load(&source)?;
            require_database(&source, "migrate")?;
            let store = vault_server::store::open(&settings.for_migration()).await?;
            store.schema.migrate().await?;
            println!("migrations applied");
            upgrade_agents(&store, batch).await
        }
        Command::Sweep { limit, dry_run } => {
            let source = Source::from_env()?;
            let settings = DatabaseSettings::load(&source)?;
            require_database(&source, "sweep")?;
            let store = vault_server::store::open(&settings).await?;
            if settings.migrate_url.is_some() {
                store.schema.ready().await?;
            } else {
                store.schema.migrate().await?;
            }
            // The command only deletes: it has no provider registry, and the server's outbox
            // delivers what the background sweeper queues.
            let outcome = store.credentials.sweep(limit, dry_run, false).await?;
            let verb = if dry_run { "would sweep" } else { "swept" };
            println!(
                "{verb} {} credential(s){}",
                outcome.swept,
                if outcome.more { "; more remain" } else { "" }
            );
            Ok(())
        }
        Command::Dev => dev().await,
        Command::Token {
            agent,
            user,
            admin,
            store,
            ttl,
        } => {
            let source = Source::from_env()?;
            let dir = vault_server::config::data_dir(&source)?;
            if !(60..=86_400).contains(&ttl) {
                anyhow::bail!("--ttl must be between 60 and 86400 seconds");
            }
            let scopes: Vec<&str> = [
                (store, vault_server::auth::STORE_SCOPE),
                (admin, vault_server::auth::ADMIN_SCOPE),
            ]
            .into_iter()
            .filter_map(|(wanted, scope)| wanted.then_some(scope))
            .collect();
            println!(
                "{}",
                vault_server::dev::mint(&dir, &agent, &user, &scopes, ttl, "credential-vault")?
            );
            Ok(())
        }
        Command::Help { topic } => help(&topic),
        Command::Config { docs: true } => {
            print!("{}", vault_server::config::docs_table());
            Ok(())
        }
        Command::Config { docs: false } => {
            let (config, mut problems) = Source::from_env()?.read()?;
            print!("{}", vault_server::config::effective(&config));
            problems.extend(config.validate());
            if problems.is_empty() {
                return Ok(());
            }
            Err(vault_server::config::Problems(problems).into())
        }
        Command::McpProbe {
            url,
            tool,
            register,
        } => mcp_probe(&url, &tool, register).await,
        Command::Audit { command } => audit(command).await,
        Command::RotateRoot {
            new_key_file,
            new_passphrase_env,
            new_pkcs11_module,
            new_pkcs11_token,
            new_pkcs11_key,
            new_pkcs11_pin_file,
            new_pkcs11_pin_env,
            batch,
            abort,
        } => {
            let next = match (new_key_file, new_passphrase_env, new_pkcs11_module) {
                (Some(path), _, _) => NewRoot::File(path),
                (_, Some(var), _) => NewRoot::PassphraseEnv(var),
                (_, _, Some(module)) => {
                    let pin = match (new_pkcs11_pin_file, new_pkcs11_pin_env) {
                        (Some(file), _) => vault_server::config::PinSetting::File(file),
                        (None, Some(var)) => vault_server::config::PinSetting::Pin(
                            std::env::var(&var)
                                .ok()
                                .filter(|p| !p.is_empty())
                                .map(secrecy::SecretString::from)
                                .ok_or_else(|| {
                                    anyhow::anyhow!("--new-pkcs11-pin-env: {var} is not set")
                                })?,
                        ),
                        (None, None) => anyhow::bail!(
                            "give the token's PIN with --new-pkcs11-pin-file or --new-pkcs11-pin-env"
                        ),
                    };
                    NewRoot::Pkcs11(vault_server::config::Pkcs11Location {
                        module,
                        // clap requires the token with the module.
                        token_label: new_pkcs11_token.unwrap_or_default(),
                        key_label: new_pkcs11_key,
                        pin,
                    })
                }
                (None, None, None) if abort => NewRoot::Abort,
                (None, None, None) => anyhow::bail!(
                    "give the new root key with --new-key-file, --new-passphrase-env or --new-pkcs11-module"
                ),
            };
            rotate_root(next, batch).await
        }
        Command::RotateAgentKey {
            agent,
            issuer,
            all,
            batch,
        } => rotate_agent_keys(agent.as_deref(), issuer.as_deref(), all, batch).await,
        Command::ShredAgent {
            agent,
            issuer,
            yes,
            skip_provider_revocation,
        } => shred_agent(&agent, issuer.as_deref(), yes, skip_provider_revocation).await,
        Command::Keygen { pkcs11: true, .. } => {
            let (config, _) = Source::from_env()?.read()?;
            let vault_server::config::RootKeySetting::Pkcs11(location) =
                config.root_key_setting()?
            else {
                anyhow::bail!(
                    "keygen --pkcs11 creates the key VAULT_ROOT_PKCS11_MODULE, _TOKEN_LABEL, _KEY_LABEL and _PIN (or _PIN_FILE) name; set them"
                );
            };
            vault_server::startup::generate_pkcs11_root(&location)?;
            println!(
                "created the root key {:?} in token {:?}; it cannot leave the token",
                location.key_label, location.token_label
            );
            println!(
                "serve with the same VAULT_ROOT_PKCS11_* settings; losing the token loses every credential"
            );
            Ok(())
        }
        Command::Keygen { out, .. } => {
            vault_server::dev::write_root_key(&out)?;
            println!("wrote a new root key to {}", out.display());
            println!(
                "use it with VAULT_ROOT_KEY_FILE={}; losing it loses every credential",
                out.display()
            );
            Ok(())
        }
    }
}

/// `audit verify` and `audit export`; the work is in `vault_server::audit::cli`.
async fn audit(command: AuditCommand) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    use vault_server::audit::cli;
    let source = Source::from_env()?;
    require_database(&source, "audit")?;
    match command {
        AuditCommand::Verify { agent, issuer } => {
            let which = cli::Which::parse(agent.as_deref(), issuer.as_deref())?;
            let (store, root) =
                cli::open(&vault_server::config::DataSettings::load(&source)?).await?;
            let key = vault_server::audit::HeadKey::derive(&root.control);
            drop(root);
            let report = cli::verify_chains(&store, &key, &which, &mut std::io::stdout()).await?;
            if report.broken > 0 {
                return Err(ExitWith(1, format!("{} audit chain(s) broken", report.broken)).into());
            }
            Ok(())
        }
        AuditCommand::Export {
            since,
            agent,
            issuer,
        } => {
            let which = cli::Which::parse(agent.as_deref(), issuer.as_deref())?;
            let since = cli::parse_since(&since, chrono::Utc::now()).map_err(anyhow::Error::msg)?;
            let store = cli::open_for_export(&DatabaseSettings::load(&source)?).await?;
            let progress = std::io::stdout().is_terminal() || std::io::stderr().is_terminal();
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            cli::export(&store, &which, since, progress, &mut out).await?;
            Ok(())
        }
    }
}

/// `shred-agent`; the work is in `vault_server::vault::shred_agent`.
async fn shred_agent(
    agent: &str,
    issuer: Option<&str>,
    yes: bool,
    skip_provider_revocation: bool,
) -> anyhow::Result<()> {
    use vault_server::ids::AgentId;
    use vault_server::store::{Shred, ShredPlan};
    let source = Source::from_env()?;
    require_database(&source, "shred-agent")?;
    let agent = AgentId::parse(agent).map_err(|e| anyhow::anyhow!("--agent: {e}"))?;
    let settings = DatabaseSettings::load(&source)?;
    let store = vault_server::store::open(&settings.for_migration()).await?;
    store.schema.ready().await.map_err(|e| {
        anyhow::anyhow!("the database is not ready (run `vault-server migrate`): {e}")
    })?;
    let issuer = issuer_of(&store, &agent, issuer).await?;
    let plan = ShredPlan {
        abandon_revocations: skip_provider_revocation,
        dry_run: !yes,
    };
    let what = |c: &vault_server::store::ShredCounts| {
        format!(
            "{} credentials, {} queued provider revocations, {} consent flows, {} audit records",
            c.credentials, c.revocations, c.flows, c.audit_records
        )
    };
    match vault_server::vault::shred_agent(&store, &issuer, &agent, plan).await? {
        Shred::WouldShred(counts) => println!(
            "would shred agent {agent} of {issuer}: its key, and {}; nothing was done (give --yes to shred)",
            what(&counts)
        ),
        Shred::Shredded(counts) => println!(
            "shredded agent {agent} of {issuer}: its key is destroyed, with {}{}",
            what(&counts),
            if counts.revocations > 0 {
                format!(" ({} provider revocations abandoned)", counts.revocations)
            } else {
                String::new()
            }
        ),
        Shred::RevocationsPending(counts) => {
            return Err(ExitWith(
                1,
                format!(
                    "agent {agent} of {issuer} still has {} provider revocations queued; the replicas deliver them (every VAULT_REVOCATION_RETRY_INTERVAL_SECONDS): run again once they are, or give --skip-provider-revocation to abandon them",
                    counts.revocations
                ),
            )
            .into());
        }
        Shred::NotRegistered => anyhow::bail!("no agent {agent} of {issuer} is registered"),
    }
    Ok(())
}

/// The issuer of `agent` for a command given `--agent` and maybe `--issuer`: the one named, or
/// the only one that has such an agent.
async fn issuer_of(
    store: &vault_server::store::Store,
    agent: &vault_server::ids::AgentId,
    issuer: Option<&str>,
) -> anyhow::Result<vault_server::ids::IssuerId> {
    if let Some(issuer) = issuer {
        return vault_server::ids::IssuerId::parse(issuer)
            .map_err(|e| anyhow::anyhow!("--issuer: {e}"));
    }
    let mut found = vault_server::vault::issuers_of(store, agent).await?;
    match found.len() {
        0 => anyhow::bail!("no agent {agent} is registered"),
        1 => Ok(found.remove(0)),
        n => anyhow::bail!(
            "{n} issuers have an agent {agent}: name one with --issuer ({})",
            found
                .iter()
                .map(|i| i.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// `rotate-agent-key`; the work is in `vault_server::vault::rotate_agent_key`.
async fn rotate_agent_keys(
    agent: Option<&str>,
    issuer: Option<&str>,
    all: bool,
    batch: u32,
) -> anyhow::Result<()> {
    use vault_server::ids::{AgentId, IssuerId};
    use vault_server::vault::{self, AgentRotationProgress};
    let source = Source::from_env()?;
    require_database(&source, "rotate-agent-key")?;
    let settings = vault_server::config::DataSettings::load(&source)?;
    let store = vault_server::store::open(&settings.database.for_migration()).await?;
    store.schema.ready().await.map_err(|e| {
        anyhow::anyhow!("the database is not ready (run `vault-server migrate`): {e}")
    })?;
    let root_source = vault_server::startup::root_key_source(&settings.root_key)?;
    let root = vault::unlock_root_key(&store, root_source).await?;
    if root.pending {
        anyhow::bail!(
            "the configured root key is the one a root rotation in progress moves to; finish that rotation (rotate-root) first"
        );
    }
    let agents: Vec<(IssuerId, AgentId)> = match agent {
        Some(agent) => {
            let agent = AgentId::parse(agent).map_err(|e| anyhow::anyhow!("--agent: {e}"))?;
            let issuer = issuer_of(&store, &agent, issuer).await?;
            vec![(issuer, agent)]
        }
        None if all => {
            let mut pages = vault_server::store::AgentPages::new(store.keys.as_ref(), 1000);
            let mut every = Vec::new();
            while let Some(page) = pages.next().await? {
                every.extend(page.into_iter().map(|r| (r.issuer, r.agent)));
            }
            every
        }
        None => anyhow::bail!("name the agent with --agent, or give --all"),
    };
    let (bar, terminal) = progress_bar(agents.len() as u64, "{bar:40} {pos}/{len} agents  {msg}")?;
    let total = agents.len();
    for (done, (issuer, agent)) in agents.into_iter().enumerate() {
        let mut report = |p: AgentRotationProgress| {
            let line = format!(
                "agent {agent}: key version {} → {}, re-sealed {}/{} rows{}",
                p.from_version,
                p.to_version,
                p.resealed,
                p.total,
                if p.done {
                    ", old version destroyed"
                } else {
                    ""
                }
            );
            if terminal {
                bar.set_message(line);
            } else {
                println!("{line}");
            }
        };
        let outcome =
            vault::rotate_agent_key(&store, &root.root, &issuer, &agent, batch, &mut report).await;
        let finished = outcome.map_err(|err| {
            bar.abandon();
            anyhow::anyhow!(
                "agent {agent} of {issuer}: {err} (nothing is lost; run rotate-agent-key again to finish)"
            )
        })?;
        bar.set_position(done as u64 + 1);
        if !terminal && total > 1 {
            println!("rotated {}/{total} agents", done + 1);
        }
        if terminal {
            bar.println(format!(
                "agent {agent}: key version {} is current, version {} destroyed ({} rows re-sealed)",
                finished.to_version, finished.from_version, finished.resealed
            ));
        }
    }
    bar.finish_and_clear();
    println!("rotated the keys of {total} agents; every old version is destroyed");
    Ok(())
}

/// Where `rotate-root` takes the new root from.
enum NewRoot {
    /// `--abort`: none; the rotation in progress is abandoned.
    Abort,
    File(PathBuf),
    PassphraseEnv(String),
    Pkcs11(vault_server::config::Pkcs11Location),
}

/// `rotate-root`; the work is in `vault_server::vault::RootRotation`.
async fn rotate_root(next: NewRoot, batch: u32) -> anyhow::Result<()> {
    use vault_server::vault::{self, RootRotation, RotationOutcome};
    let source = Source::from_env()?;
    require_database(&source, "rotate-root")?;
    let settings = vault_server::config::DataSettings::load(&source)?;
    let store = vault_server::store::open(&settings.database.for_migration()).await?;
    store.schema.ready().await.map_err(|e| {
        anyhow::anyhow!("the database is not ready (run `vault-server migrate`): {e}")
    })?;
    if store.keys.root_key().await?.is_none() {
        anyhow::bail!("this database holds no vault yet: it has no root key record");
    }
    let (next, next_kdf) = match next {
        NewRoot::Abort => {
            if vault::abort_rotation(&store).await? {
                println!("the root rotation in progress was abandoned; the current root key stays");
            } else {
                println!("no root rotation is in progress");
            }
            return Ok(());
        }
        NewRoot::File(path) => (vault_server::startup::read_root_key(&path)?, None),
        NewRoot::Pkcs11(location) => (vault_server::startup::open_pkcs11_root(&location)?, None),
        NewRoot::PassphraseEnv(var) => {
            let phrase = std::env::var(&var)
                .ok()
                .filter(|p| !p.is_empty())
                .ok_or_else(|| anyhow::anyhow!("--new-passphrase-env: {var} is not set"))?;
            let (key, kdf) =
                vault::root_from_passphrase(&store, &secrecy::SecretString::from(phrase)).await?;
            (key, Some(kdf))
        }
    };
    let root_source = vault_server::startup::root_key_source(&settings.root_key)?;
    let current = match vault::unlock_root_key(&store, root_source).await {
        Ok(current) => current,
        // A re-run after the switch: the configured root was rotated away, to this new one.
        Err(vault::UnlockError::WrongRootKey | vault::UnlockError::WrongKind { .. })
            if vault::rotated_to(&store, &next).await? =>
        {
            vault::record_switch_if_missing(&store).await?;
            println!("the rotation is already complete: the new key is the vault's root key");
            return Ok(());
        }
        Err(err) => return Err(err.into()),
    };
    let rotation = RootRotation::new(store, current, next, next_kdf, batch)?;
    let (bar, terminal) = progress_bar(0, "{bar:40} {pos}/{len} agent keys re-wrapped")?;
    let mut report = |p: vault::RotationProgress| {
        if terminal {
            bar.set_length(p.total);
            bar.set_position(p.done);
        } else {
            println!("re-wrapped {}/{} agent keys", p.done, p.total);
        }
    };
    let outcome = rotation.run(&mut report).await;
    bar.finish_and_clear();
    match outcome? {
        RotationOutcome::Rotated { agents } => println!(
            "the new root key is now the vault's root ({agents} agent keys re-wrapped); restart every replica with it"
        ),
        RotationOutcome::AlreadyDone => {
            println!("the rotation is already complete: the new key is the vault's root key")
        }
    }
    Ok(())
}

/// `help [TOPIC...]`: the settings table for `settings`, else the help of the command named.
fn help(topic: &[String]) -> anyhow::Result<()> {
    if topic == ["settings"] {
        print!("{}", vault_server::config::docs_table());
        return Ok(());
    }
    let mut command = <Cli as clap::CommandFactory>::command();
    command.build();
    let mut current = &mut command;
    for name in topic {
        current = current.find_subcommand_mut(name).ok_or_else(|| {
            anyhow::anyhow!("no such command or topic: {name} (try `vault-server help`)")
        })?;
    }
    current.print_help()?;
    Ok(())
}

/// A progress bar of `len` steps drawn with `template` on a terminal (stderr), and whether there
/// is one: piped output gets no bar (the caller prints lines instead).
fn progress_bar(len: u64, template: &str) -> anyhow::Result<(indicatif::ProgressBar, bool)> {
    use std::io::IsTerminal as _;
    if !std::io::stderr().is_terminal() {
        return Ok((indicatif::ProgressBar::hidden(), false));
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .map_err(|e| anyhow::anyhow!("the progress template: {e}"))?,
    );
    Ok((bar, true))
}

/// Upgrades every agent schema behind this version, a batch at a time, with a progress bar on a
/// terminal and a line per batch otherwise.
async fn upgrade_agents(store: &vault_server::store::Store, batch: u32) -> anyhow::Result<()> {
    let (bar, terminal) = progress_bar(0, "{bar:40} {pos}/{len} agent schemas upgraded")?;
    let mut upgraded = 0;
    loop {
        let done = store.schema.upgrade_agents(batch).await?;
        upgraded += done.upgraded;
        bar.set_length(upgraded + done.left);
        bar.set_position(upgraded);
        if !terminal && (done.upgraded > 0 || done.left > 0) {
            println!("agent schemas: {upgraded} upgraded, {} left", done.left);
        }
        if done.left == 0 || done.upgraded == 0 {
            bar.finish_and_clear();
            if done.left > 0 {
                anyhow::bail!("{} agent schema(s) could not be upgraded", done.left);
            }
            println!("agent schemas at the latest version ({upgraded} upgraded)");
            return Ok(());
        }
    }
}

/// `migrate` and `sweep` act on a deployment's database. Without one configured they refuse:
/// defaulting to the embedded file would migrate or sweep a fresh `./vault-data` store that no
/// server reads, and report success. Only `dev` uses the embedded store unasked.
fn require_database(source: &Source, command: &str) -> anyhow::Result<()> {
    if source.is_set("VAULT_DATABASE_URL") {
        return Ok(());
    }
    anyhow::bail!(
        "VAULT_DATABASE_URL is not set: `{command}` works on the database a deployment serves \
         from, so set VAULT_DATABASE_URL to it (postgres://…, or sqlite://PATH for an embedded \
         store); only `vault-server dev` defaults to the embedded store in VAULT_DATA_DIR"
    )
}

async fn dev() -> anyhow::Result<()> {
    let source = Source::from_env()?;
    let dir = vault_server::config::data_dir(&source)?;
    let files = vault_server::dev::DevFiles::ensure(&dir)?;
    let root_key = files.root_key.display().to_string();
    let jwks = files.jwks.display().to_string();
    // dev never touches a configured database: a VAULT_DATABASE_URL left in the environment
    // may name production, and dev's keys are unprotected.
    if std::env::var("VAULT_DATABASE_URL").is_ok_and(|url| !url.trim().is_empty()) {
        println!(
            "note: dev ignores VAULT_DATABASE_URL and uses its own embedded store in {}",
            dir.display()
        );
    }
    // The generated keys replace any configured ones: dev must never mix with real keys.
    let source = source.with_overrides([
        ("VAULT_DATABASE_URL", ""),
        ("VAULT_ROOT_KEY", ""),
        ("VAULT_ROOT_PASSPHRASE", ""),
        ("VAULT_ROOT_KEY_FILE", root_key.as_str()),
        ("VAULT_JWT_ISSUER", vault_server::dev::DEV_ISSUER),
        ("VAULT_JWT_JWKS_URL", ""),
        ("VAULT_JWT_JWKS_FILE", jwks.as_str()),
    ]);
    // The consent flow works out of the box: a callback on loopback, which completes flows
    // begun without a return_url, so one browser is enough to try it.
    let callback = if source.is_set("VAULT_CALLBACK_LISTEN") {
        match source.read()?.0.vault_callback_listen {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                anyhow::anyhow!("cannot listen on VAULT_CALLBACK_LISTEN={addr}: {e}")
            })?),
            None => None,
        }
    } else {
        // The usual port when it is free; any free port otherwise (the banner names it).
        match tokio::net::TcpListener::bind(DEV_CALLBACK).await {
            Ok(listener) => Some(listener),
            Err(_) => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await?),
        }
    };
    let mut defaults = Vec::new();
    if let Some(listener) = &callback
        && !source.is_set("OAUTH_TOOL_REDIRECT_URI")
    {
        defaults.push((
            "OAUTH_TOOL_REDIRECT_URI",
            format!(
                "http://{}{}",
                listener.local_addr()?,
                vault_server::callback::CALLBACK_PATH
            ),
        ));
    }
    if !source.is_set("VAULT_OAUTH_UNBOUND_CALLBACK") {
        defaults.push(("VAULT_OAUTH_UNBOUND_CALLBACK", "allow".to_string()));
    }
    // Local development runs its authorization servers on loopback, discovered endpoints too.
    if !source.is_set("VAULT_EGRESS_ALLOW_CIDRS") {
        defaults.push((
            "VAULT_EGRESS_ALLOW_CIDRS",
            "127.0.0.0/8,::1/128".to_string(),
        ));
    }
    let source = source.with_overrides(defaults.iter().map(|(k, v)| (*k, v.as_str())));
    let settings = Settings::load(&source)?;
    let store = match &settings.database.database {
        vault_server::config::Database::Postgres(_) => {
            "PostgreSQL (VAULT_DATABASE_URL)".to_string()
        }
        vault_server::config::Database::SqliteFile(path) => path.display().to_string(),
        vault_server::config::Database::SqliteMemory => "in memory".to_string(),
    };
    let audience = settings.jwt.audience.clone();
    let store_scope = settings.jwt.store_scope.clone();
    let app = Application::build_on_listeners(settings, None, callback).await?;
    // The walkthrough stores a token as a gateway would, so the printed token may write.
    let token = vault_server::dev::mint(
        &dir,
        "demo-agent",
        "demo-user",
        &[store_scope.as_str()],
        3600,
        &audience,
    )?;
    println!(
        "{}",
        vault_server::dev::banner(
            app.local_addr(),
            app.callback_addr(),
            &files,
            &store,
            &token
        )
    );
    app.run_until_stopped(shutdown_signal()).await
}

/// `mcp-probe`: only the outbound-HTTP settings are read, so a probe needs no database or keys.
async fn mcp_probe(url: &str, tool: &str, register: bool) -> anyhow::Result<()> {
    let (config, mut problems) = Source::from_env()?.read()?;
    problems.extend(config.validate());
    problems.retain(|p| {
        p.name.starts_with("VAULT_PROVIDER_")
            || p.name.starts_with("VAULT_EGRESS_")
            || (register && p.name == "OAUTH_TOOL_REDIRECT_URI")
    });
    if !problems.is_empty() {
        return Err(vault_server::config::Problems(problems).into());
    }
    let egress =
        vault_server::egress::EgressPolicy::parse(&config.vault_egress_allow_cidrs.0.join(","))
            .map_err(|e| anyhow::anyhow!("VAULT_EGRESS_ALLOW_CIDRS: {e}"))?
            .with_hosts(&config.vault_egress_hosts.0.join(","))
            .map_err(|e| anyhow::anyhow!("VAULT_EGRESS_HOSTS: {e}"))?;
    let outbound = vault_server::http::Outbound::new(&vault_server::http::HttpSettings {
        ca_file: config.vault_provider_ca_file.clone(),
        connect_timeout: std::time::Duration::from_secs(
            config.vault_provider_connect_timeout_seconds,
        ),
        timeout: std::time::Duration::from_secs(config.vault_provider_timeout_seconds),
        egress,
    })?;
    let server = vault_server::http::check_configured(url)
        .map_err(|problem| anyhow::anyhow!("{url}: {problem}"))?;
    let found = vault_server::oauth::mcp::discover(&outbound, tool, &server).await?;
    let none = || "none".to_string();
    let joined = |items: &[String]| {
        if items.is_empty() {
            none()
        } else {
            items.join(" ")
        }
    };
    let optional = |url: &Option<url::Url>| url.as_ref().map_or_else(none, |u| u.to_string());
    let server_meta = &found.authorization_server;
    println!("mcp server: {server}");
    println!("resource: {}", found.resource);
    match &found.challenge {
        Some(challenge) => println!(
            "challenge: Bearer resource_metadata={} scope={} error={}",
            challenge.resource_metadata.clone().unwrap_or_else(none),
            challenge.scope.clone().unwrap_or_else(none),
            challenge.error.clone().unwrap_or_else(none),
        ),
        None => println!("challenge: none (no Bearer WWW-Authenticate; well-known URIs used)"),
    }
    println!(
        "protected resource metadata: {}",
        found.resource_metadata_url
    );
    println!(
        "authorization servers: {}",
        found.authorization_servers.join(" ")
    );
    println!(
        "resource scopes_supported: {}",
        joined(&found.scopes_supported)
    );
    println!("authorization server: {}", server_meta.issuer);
    println!(
        "authorization server metadata: {}",
        server_meta.metadata_url
    );
    println!(
        "authorization_endpoint: {}",
        server_meta.authorization_endpoint
    );
    println!("token_endpoint: {}", server_meta.token_endpoint);
    println!(
        "revocation_endpoint: {}",
        optional(&server_meta.revocation_endpoint)
    );
    println!(
        "registration_endpoint: {}",
        optional(&server_meta.registration_endpoint)
    );
    println!(
        "code_challenge_methods_supported: {} (S256 supported)",
        server_meta.code_challenge_methods_supported.join(" ")
    );
    println!(
        "token_endpoint_auth_methods_supported: {}",
        joined(&server_meta.token_endpoint_auth_methods_supported)
    );
    println!(
        "client_id_metadata_document_supported: {}",
        server_meta.client_id_metadata_document_supported
    );
    println!(
        "authorization_response_iss_parameter_supported: {}",
        server_meta.authorization_response_iss_parameter_supported
    );
    println!(
        "server scopes_supported: {}",
        joined(&server_meta.scopes_supported)
    );
    let registration = match (
        server_meta.client_id_metadata_document_supported,
        &server_meta.registration_endpoint,
    ) {
        (true, _) => "client ID metadata document (preferred by MCP 2025-11-25)",
        (false, Some(_)) => "dynamic client registration (RFC 7591)",
        (false, None) => "none advertised: a pre-registered client_id is needed",
    };
    println!("registration: {registration}");
    if register {
        probe_registration(&outbound, tool, server_meta, &config).await?;
    }
    Ok(())
}

/// `mcp-probe --register`: one dynamic client registration, printed and not saved.
async fn probe_registration(
    outbound: &vault_server::http::Outbound,
    tool: &str,
    server: &vault_server::oauth::mcp::AuthorizationServer,
    config: &vault_server::config::Config,
) -> anyhow::Result<()> {
    use vault_server::oauth::registration::{ClientMetadata, choose_auth_method, register};
    let Some(redirect) = config.oauth_tool_redirect_uri.clone() else {
        return Err(ExitWith(
            2,
            "--register needs OAUTH_TOOL_REDIRECT_URI, the redirect URI to register".into(),
        )
        .into());
    };
    let Some(endpoint) = &server.registration_endpoint else {
        return Err(ExitWith(
            1,
            "registration_endpoint: the authorization server offers no dynamic client registration"
                .into(),
        )
        .into());
    };
    let method = choose_auth_method(&server.token_endpoint_auth_methods_supported)
        .map_err(|rule| ExitWith(1, rule))?;
    let redirect_uris = [redirect];
    let registered = register(
        outbound,
        tool,
        vault_server::http::Origin::Derived,
        endpoint,
        &ClientMetadata {
            client_name: "credential-vault (mcp-probe)",
            redirect_uris: &redirect_uris,
            auth_method: method,
            scope: None,
        },
    )
    .await?;
    println!(
        "registered: client_id={} token_endpoint_auth_method={} client_secret={} expires={}",
        registered.client_id,
        registered.auth_method.as_str(),
        if registered.client_secret.is_some() {
            "issued (not shown)"
        } else {
            "none"
        },
        registered
            .secret_expires_at
            .map_or_else(|| "never".to_string(), |at| at.to_rfc3339()),
    );
    println!("not saved: the vault registers itself at first use");
    Ok(())
}

/// Where `dev` serves the consent callback unless told otherwise.
const DEV_CALLBACK: &str = "127.0.0.1:8250";

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
