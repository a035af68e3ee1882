//! The settings in the shape the server uses them: durations instead of seconds, the store chosen
//! from its URL, each trusted issuer bound to its own keys. Each piece is derived from
//! [`Config`] by one function; [`Config::validate`] runs the same functions, so what validation
//! accepts is exactly what the server can build.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::rules::database_transport_risk;
use super::{Config, ConfigError, Problems, Source};
use crate::ids::IssuerId;

/// Where the root key comes from. Only located here; `startup` reads and decodes it.
#[derive(Debug, Clone)]
pub enum RootKeySetting {
    /// `VAULT_ROOT_KEY`: base64 of the key.
    Key(SecretString),
    /// `VAULT_ROOT_KEY_FILE`: a file holding it.
    File(PathBuf),
    /// `VAULT_ROOT_PASSPHRASE`: derived with Argon2id and the salt kept in the control schema.
    Passphrase(SecretString),
    /// `VAULT_ROOT_PKCS11_*`: an AES-256 key that never leaves its PKCS#11 token.
    Pkcs11(Pkcs11Location),
}

/// `VAULT_ROOT_PKCS11_*`: where the root key lives in a PKCS#11 token. The PIN is read by
/// `startup`, like a key file.
#[derive(Debug, Clone)]
pub struct Pkcs11Location {
    /// `VAULT_ROOT_PKCS11_MODULE`.
    pub module: PathBuf,
    /// `VAULT_ROOT_PKCS11_TOKEN_LABEL`.
    pub token_label: String,
    /// `VAULT_ROOT_PKCS11_KEY_LABEL`.
    pub key_label: String,
    /// `VAULT_ROOT_PKCS11_PIN` or `VAULT_ROOT_PKCS11_PIN_FILE`.
    pub pin: PinSetting,
}

/// The user PIN of a PKCS#11 token.
#[derive(Debug, Clone)]
pub enum PinSetting {
    /// `VAULT_ROOT_PKCS11_PIN`.
    Pin(SecretString),
    /// `VAULT_ROOT_PKCS11_PIN_FILE`.
    File(PathBuf),
}

/// Where issuer public keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// A JWKS document on disk, re-read periodically and when an unknown `kid` arrives.
    File(PathBuf),
    /// A JWKS URL, re-fetched periodically and when an unknown `kid` arrives.
    Url(url::Url),
}

/// An issuer the vault trusts, bound to its own keys: a token naming this issuer verifies only
/// under these keys, so one issuer can never sign for another.
#[derive(Debug, Clone)]
pub struct TrustedIssuer {
    /// The exact `iss`.
    pub issuer: IssuerId,
    /// Its public keys.
    pub jwks: JwksSource,
}

/// Caller-token verification settings (DESIGN §3).
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// Accepted issuers, each with its keys.
    pub issuers: Vec<TrustedIssuer>,
    /// The audience that must be in `aud`.
    pub audience: String,
    /// The claim naming the agent.
    pub agent_claim: String,
    /// Clock skew allowed on `exp`, `nbf`, `iat`.
    pub leeway_seconds: u64,
    /// Longest caller-token lifetime accepted.
    pub max_ttl_seconds: u64,
    /// Least time between two key re-fetches triggered by unknown `kid`s.
    pub jwks_refetch_interval: Duration,
    /// The scope a caller needs to write credentials with StoreToken.
    pub store_scope: String,
    /// Longest time between two periodic re-fetches of each issuer's keys; a shorter
    /// `Cache-Control: max-age` on the JWKS response shortens it.
    pub jwks_refresh: Duration,
    /// How long keys whose re-fetch keeps failing are still trusted before tokens of that issuer
    /// are refused (fail closed).
    pub jwks_max_stale: Duration,
}

/// Everything `serve` needs.
#[derive(Debug)]
pub struct Settings {
    /// gRPC listen address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The database.
    pub database: DatabaseSettings,
    /// Where the root of the key hierarchy comes from.
    pub root_key: RootKeySetting,
    /// Caller tokens.
    pub jwt: JwtSettings,
    /// Default and longest vault TTL of a stored credential.
    pub secrets_ttl_seconds: u64,
    /// How often the background sweeper runs.
    pub sweep_interval: Duration,
    /// Most rows one sweep batch deletes.
    pub sweep_batch: u32,
    /// How long SIGTERM waits for in-flight calls.
    pub shutdown_grace: Duration,
    /// How long health reports NOT_SERVING before the listener closes.
    pub shutdown_delay: Duration,
    /// Where the OAuth provider registry and its HTTP client's limits come from.
    pub providers: crate::oauth::ProviderSettings,
    /// First backoff after a transient provider failure (doubles per failure).
    pub backoff_base: Duration,
    /// Longest backoff.
    pub backoff_cap: Duration,
    /// How often queued provider revocations are retried.
    pub revocation_retry_interval: Duration,
    /// How long an undeliverable provider revocation is retried before it is dropped.
    pub revocation_max_age: Duration,
    /// gRPC over TLS, when configured.
    pub tls: Option<TlsSettings>,
    /// Whether StoreToken may bring a refresh token.
    pub store_refresh_tokens: bool,
    /// gRPC without TLS on a non-loopback address was asked for (behind a mesh sidecar that
    /// terminates mTLS); startup logs a warning.
    pub allow_plaintext: bool,
    /// Largest `min_valid_seconds` GetToken accepts.
    pub max_min_valid_seconds: u64,
    /// The TTL sweep revokes what it deletes at the provider.
    pub sweep_revokes: bool,
    /// New agents one issuer may cause per minute, with bursts up to the same number.
    pub agent_creation_per_minute: u32,
    /// Least time between two refreshes of a still-valid credential.
    pub refresh_cooldown: Duration,
    /// The consent flow: its callback listener and URLs.
    pub callback: CallbackSettings,
    /// The audit log.
    pub audit: AuditSettings,
    /// The policy file.
    pub policy: PolicySettings,
    /// Rate, concurrency and connection limits.
    pub limits: LimitSettings,
}

/// The policy file's settings.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    /// `VAULT_POLICY_FILE`.
    pub file: Option<PathBuf>,
    /// How often it is checked for changes.
    pub reload: Duration,
}

/// Limits on what callers and connections may cost.
#[derive(Debug, Clone)]
pub struct LimitSettings {
    /// Per agent.
    pub agent: Option<crate::policy::Quota>,
    /// Per (agent, user).
    pub user: Option<crate::policy::Quota>,
    /// Calls served at once, over all connections.
    pub max_concurrent_calls: usize,
    /// Bytes of unfinished request messages held at once.
    pub max_buffered_request_bytes: usize,
    /// Streams one HTTP/2 connection may open.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keepalive PING period.
    pub keepalive: Duration,
    /// How long a PING may go unanswered.
    pub keepalive_timeout: Duration,
    /// Longest life of a connection.
    pub max_connection_age: Duration,
}

/// The audit log's settings.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// Successful GetToken releases are recorded (`VAULT_AUDIT_RELEASES=on`).
    pub releases: bool,
    /// Records older than this are deleted by retention.
    pub retention: Duration,
    /// How often chain heads are signed.
    pub sign_interval: Duration,
}

/// The consent flow's settings.
#[derive(Debug, Clone)]
pub struct CallbackSettings {
    /// Where the callback listens, when this replica serves it.
    pub listen: Option<SocketAddr>,
    /// `OAUTH_TOOL_REDIRECT_URI`: the callback's public URL.
    pub redirect_uri: Option<url::Url>,
    /// Allowed `return_url` prefixes.
    pub return_urls: Vec<url::Url>,
    /// A flow without `return_url` may complete at the callback.
    pub unbound: bool,
    /// How long a flow lives.
    pub flow_ttl: Duration,
}

/// Server TLS: a certificate chain and key, and optionally a CA that client certificates must
/// chain to (mutual TLS).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// PEM CA bundle; when set, every client must present a certificate it issued.
    pub client_ca_file: Option<PathBuf>,
}

/// Which store, and where.
#[derive(Debug, Clone)]
pub enum Database {
    /// `postgres://…`: the production store. The URL may contain a password.
    Postgres(SecretString),
    /// The embedded store in one SQLite file.
    SqliteFile(PathBuf),
    /// The embedded store in memory (lost on exit): tests and demos.
    SqliteMemory,
}

/// The database connection, which `migrate` and `sweep` need without the rest.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// Which store.
    pub database: Database,
    /// Pool size.
    pub max_connections: u32,
    /// Prepared statements kept per connection (least recently used evicted). Each agent has
    /// its own schema and so its own SQL text; the cache must hold the hot agents' statements.
    pub statement_cache: usize,
    /// Why the PostgreSQL connection may travel unauthenticated or in clear over a network,
    /// when it may (`VAULT_DATABASE_REQUIRE_TLS=false`): startup logs it as a warning.
    pub transport_warning: Option<String>,
    /// Run each statement on an agent schema under that agent's own role (PostgreSQL only).
    pub agent_roles: bool,
    /// The owner role that runs migrations, when the server itself connects as a serving role
    /// without DDL rights.
    pub migrate_url: Option<SecretString>,
    /// The login role `migrate` makes a member of the serving group.
    pub serving_role: Option<String>,
    /// Agent schemas a hot-read connection touches before it is replaced (PostgreSQL only).
    pub schemas_per_connection: usize,
    /// Agent schemas kept made ahead of need (PostgreSQL only).
    pub spare_schemas: u32,
    /// `VAULT_AUDIT_RETENTION_DAYS`, which `migrate` records in the database as the floor below
    /// which nobody but the owner may delete an audit record (PostgreSQL only).
    pub audit_retention_days: u32,
}

impl Settings {
    /// Reads and validates every setting `serve` needs; on failure, every problem found.
    pub fn load(source: &Source) -> Result<Self, Problems> {
        let (config, mut problems) = source.read()?;
        problems.extend(config.validate());
        if !problems.is_empty() {
            return Err(Problems(problems));
        }
        Ok(Self::from_config(&config)?)
    }

    fn from_config(c: &Config) -> Result<Self, ConfigError> {
        let seconds = Duration::from_secs;
        let jwt = JwtSettings {
            issuers: c.issuers()?,
            audience: c.vault_jwt_audience.clone(),
            agent_claim: c.vault_jwt_agent_claim.clone(),
            leeway_seconds: c.vault_jwt_leeway_seconds,
            max_ttl_seconds: c.vault_jwt_max_ttl_seconds,
            jwks_refetch_interval: seconds(30),
            store_scope: c.store_scope()?,
            jwks_refresh: seconds(c.vault_jwks_refresh_seconds),
            jwks_max_stale: seconds(c.vault_jwks_max_stale_seconds),
        };
        let providers = crate::oauth::ProviderSettings {
            file: c.vault_providers_file.clone(),
            ca_file: c.vault_provider_ca_file.clone(),
            connect_timeout: seconds(c.vault_provider_connect_timeout_seconds),
            timeout: seconds(c.vault_provider_timeout_seconds),
            egress: c.egress()?,
            discovery_ttl: seconds(c.vault_discovery_ttl_seconds),
            guard: crate::oauth::GuardSettings {
                max_concurrent: c.vault_provider_max_concurrent_calls as usize,
                failures: c.vault_provider_breaker_failures as u32,
                open_for: seconds(c.vault_provider_breaker_open_seconds),
            },
        };
        // The casts below are within range: validation bounds both far below u32::MAX.
        Ok(Self {
            listen: c.vault_listen,
            database: DatabaseSettings::from_config(c)?,
            root_key: c.root_key()?,
            jwt,
            secrets_ttl_seconds: c.secrets_ttl_seconds,
            sweep_interval: seconds(c.vault_sweep_interval_seconds),
            sweep_batch: c.vault_sweep_batch as u32,
            shutdown_grace: seconds(c.vault_shutdown_grace_seconds),
            shutdown_delay: seconds(c.vault_shutdown_delay_seconds),
            providers,
            backoff_base: seconds(c.vault_refresh_backoff_base_seconds),
            backoff_cap: seconds(c.vault_refresh_backoff_cap_seconds),
            revocation_retry_interval: seconds(c.vault_revocation_retry_interval_seconds),
            revocation_max_age: seconds(c.vault_revocation_max_age_seconds),
            tls: c.tls()?,
            store_refresh_tokens: c.store_refresh_tokens()?,
            allow_plaintext: c.vault_allow_plaintext,
            max_min_valid_seconds: c.vault_max_min_valid_seconds,
            sweep_revokes: c.vault_sweep_revoke_at_provider,
            agent_creation_per_minute: c.vault_agent_creation_per_minute as u32,
            refresh_cooldown: seconds(c.vault_refresh_cooldown_seconds),
            callback: c.callback()?,
            audit: AuditSettings {
                releases: c.audit_releases()?,
                retention: seconds(c.vault_audit_retention_days * 86_400),
                sign_interval: seconds(c.vault_audit_sign_interval_seconds),
            },
            policy: PolicySettings {
                file: c.vault_policy_file.clone(),
                reload: seconds(c.vault_policy_reload_seconds),
            },
            limits: LimitSettings {
                agent: quota(c.vault_limit_agent_per_second, c.vault_limit_agent_burst),
                user: quota(c.vault_limit_user_per_second, c.vault_limit_user_burst),
                max_concurrent_calls: c.vault_max_concurrent_calls as usize,
                max_buffered_request_bytes: usize::try_from(c.vault_max_buffered_request_bytes)
                    .unwrap_or(usize::MAX),
                max_concurrent_streams: c.vault_http2_max_concurrent_streams as u32,
                keepalive: seconds(c.vault_http2_keepalive_seconds),
                keepalive_timeout: seconds(c.vault_http2_keepalive_timeout_seconds),
                max_connection_age: seconds(c.vault_max_connection_age_seconds),
            },
        })
    }
}

/// A rate setting and its burst (0: one second's worth), or no limit when the rate is 0.
fn quota(per_second: u64, burst: u64) -> Option<crate::policy::Quota> {
    // Validation bounds both to 1,000,000, which Quota accepts.
    (per_second > 0).then(|| {
        crate::policy::Quota::new(per_second as f64, (burst > 0).then_some(burst as u32))
            .expect("validated rate and burst")
    })
}

impl DatabaseSettings {
    /// Default for [`DatabaseSettings::statement_cache`]: three hot statements (load, upsert,
    /// next generation) for about 340 agents per connection.
    pub const DEFAULT_STATEMENT_CACHE: usize = 1024;

    /// Reads and validates the database settings alone; other settings are not checked.
    pub fn load(source: &Source) -> Result<Self, Problems> {
        let (config, mut problems) = source.read()?;
        problems.extend(config.validate());
        problems.retain(|p| Config::is_database_setting(&p.name));
        if !problems.is_empty() {
            return Err(Problems(problems));
        }
        Ok(Self::from_config(&config)?)
    }

    fn from_config(c: &Config) -> Result<Self, ConfigError> {
        let max_connections = c
            .vault_database_max_connections
            .map_or_else(default_pool_size, |n| n as u32);
        Ok(Self {
            database: c.database()?,
            max_connections,
            statement_cache: c.vault_database_statement_cache as usize,
            transport_warning: c.transport_warning()?,
            agent_roles: c.vault_database_agent_roles,
            migrate_url: c.migrate_url()?,
            serving_role: c.serving_role()?,
            schemas_per_connection: usize::try_from(c.vault_database_schemas_per_connection)
                .unwrap_or(usize::MAX),
            spare_schemas: u32::try_from(c.vault_database_spare_schemas).unwrap_or(u32::MAX),
            audit_retention_days: u32::try_from(c.vault_audit_retention_days).unwrap_or(u32::MAX),
        })
    }

    /// The settings `migrate` connects with: the owner role's URL when one is configured.
    pub fn for_migration(&self) -> Self {
        let mut owner = self.clone();
        if let Some(url) = &self.migrate_url {
            owner.database = Database::Postgres(url.clone());
            owner.max_connections = 2;
            owner.transport_warning = database_transport_risk(url.expose_secret());
        }
        owner
    }

    /// Settings for `database` with the default pool size and statement cache.
    pub fn new(database: Database) -> Self {
        Self {
            database,
            max_connections: default_pool_size(),
            statement_cache: Self::DEFAULT_STATEMENT_CACHE,
            transport_warning: None,
            agent_roles: true,
            migrate_url: None,
            serving_role: None,
            schemas_per_connection: 500,
            spare_schemas: 32,
            audit_retention_days: 400,
        }
    }
}

/// What commands that read a deployment's data offline need (`audit verify`, `audit export`):
/// its database and its root key. Other settings are not checked.
#[derive(Debug, Clone)]
pub struct DataSettings {
    /// The database.
    pub database: DatabaseSettings,
    /// Where the root key comes from.
    pub root_key: RootKeySetting,
}

impl DataSettings {
    /// Reads and validates the database and root key settings alone.
    pub fn load(source: &Source) -> Result<Self, Problems> {
        let (config, mut problems) = source.read()?;
        problems.extend(config.validate());
        problems
            .retain(|p| Config::is_database_setting(&p.name) || p.name.starts_with("VAULT_ROOT_"));
        if !problems.is_empty() {
            return Err(Problems(problems));
        }
        Ok(Self {
            database: DatabaseSettings::from_config(&config)?,
            root_key: config.root_key()?,
        })
    }
}

/// `VAULT_DATABASE_MAX_CONNECTIONS` when unset: 8 × cores, 16..32. Half are read lanes, and a
/// read lane spends most of a GetToken waiting for its release record's flush, not on a core;
/// each lane also keeps its agents' schemas warm (docs/scaling.md), so more lanes than cores pay.
fn default_pool_size() -> u32 {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
    (cores * 8).clamp(16, 32)
}

/// `VAULT_DATA_DIR`: where the embedded store and `dev`'s generated keys live.
pub fn data_dir(source: &Source) -> Result<PathBuf, Problems> {
    Ok(source.read()?.0.vault_data_dir)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::ConfigError;

    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            ("VAULT_DATABASE_URL", "postgres://postgres@127.0.0.1/x"),
            ("VAULT_ROOT_KEY", KEY),
            (
                "VAULT_JWT_ISSUER",
                "https://issuer.example, https://other.example",
            ),
            ("VAULT_JWT_JWKS_FILE", "/tmp/jwks.json,/tmp/other-jwks.json"),
        ]
    }

    fn load(extra: &[(&'static str, &'static str)]) -> Result<Settings, Problems> {
        let mut pairs = base();
        pairs.extend_from_slice(extra);
        Settings::load(&Source::from_pairs(pairs))
    }

    /// The one problem reported.
    fn one(problems: Problems) -> ConfigError {
        assert_eq!(problems.0.len(), 1, "{problems}");
        problems.0.into_iter().next().unwrap()
    }

    #[test]
    fn defaults_fill_what_is_not_set() {
        let s = load(&[]).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:50051");
        let issuers: Vec<&str> = s.jwt.issuers.iter().map(|t| t.issuer.as_str()).collect();
        assert_eq!(
            issuers,
            vec!["https://issuer.example", "https://other.example"]
        );
        assert!(
            matches!(&s.jwt.issuers[1].jwks, JwksSource::File(p) if p == Path::new("/tmp/other-jwks.json"))
        );
        assert_eq!(s.jwt.jwks_refresh, Duration::from_secs(300));
        assert_eq!(s.jwt.jwks_max_stale, Duration::from_secs(86_400));
        assert_eq!(s.jwt.audience, "credential-vault");
        assert_eq!(s.jwt.agent_claim, "agent_id");
        assert_eq!(s.jwt.leeway_seconds, 300);
        assert_eq!(s.jwt.max_ttl_seconds, 86_400);
        assert_eq!(s.secrets_ttl_seconds, 2_592_000);
        assert_eq!(s.sweep_interval, Duration::from_secs(300));
    }

    #[test]
    fn a_ttl_over_thirty_days_is_refused_by_name() {
        let err = one(load(&[("SECRETS_TTL_SECONDS", "2592001")]).unwrap_err());
        assert_eq!(err.name, "SECRETS_TTL_SECONDS");
        let err = one(load(&[("SECRETS_TTL_SECONDS", "ten")]).unwrap_err());
        assert_eq!(err.name, "SECRETS_TTL_SECONDS");
    }

    #[test]
    fn the_database_url_picks_the_store() {
        let db = |url: &'static str| {
            let pairs: Vec<(&str, &str)> = if url.is_empty() {
                vec![]
            } else {
                vec![("VAULT_DATABASE_URL", url)]
            };
            DatabaseSettings::load(&Source::from_pairs(pairs)).map(|s| s.database)
        };
        assert!(
            matches!(db(""), Ok(Database::SqliteFile(p)) if p == Path::new("vault-data/vault.db"))
        );
        assert!(
            matches!(db("sqlite:///tmp/v.db"), Ok(Database::SqliteFile(p)) if p == Path::new("/tmp/v.db"))
        );
        assert!(matches!(db("sqlite::memory:"), Ok(Database::SqliteMemory)));
        assert!(matches!(db("postgres://x@y/z"), Ok(Database::Postgres(_))));
        assert_eq!(one(db("mysql://x").unwrap_err()).name, "VAULT_DATABASE_URL");
    }

    #[test]
    fn pool_settings_have_defaults_and_bounds() {
        let db = |pairs: &[(&'static str, &'static str)]| {
            DatabaseSettings::load(&Source::from_pairs(pairs.to_vec()))
        };
        let defaults = db(&[]).unwrap();
        assert_eq!(defaults.statement_cache, 1024);
        assert!((16..=32).contains(&defaults.max_connections));
        let set = db(&[
            ("VAULT_DATABASE_STATEMENT_CACHE", "4096"),
            ("VAULT_DATABASE_MAX_CONNECTIONS", "3"),
        ])
        .unwrap();
        assert_eq!((set.statement_cache, set.max_connections), (4096, 3));
        for bad in ["0", "8", "many", "100000"] {
            let err = one(db(&[("VAULT_DATABASE_STATEMENT_CACHE", bad)]).unwrap_err());
            assert_eq!(err.name, "VAULT_DATABASE_STATEMENT_CACHE", "{bad}");
        }
        let err = one(db(&[("VAULT_DATABASE_MAX_CONNECTIONS", "0")]).unwrap_err());
        assert_eq!(err.name, "VAULT_DATABASE_MAX_CONNECTIONS");
    }

    #[test]
    fn missing_settings_are_named() {
        let err = Settings::load(&Source::from_pairs([("VAULT_ROOT_KEY", KEY)])).unwrap_err();
        assert!(err.names().contains(&"VAULT_JWT_ISSUER"), "{err}");
        let err = load(&[("VAULT_ROOT_PASSPHRASE", "a long enough passphrase")]).unwrap_err();
        assert_eq!(one(err).name, "VAULT_ROOT_KEY", "two root key sources");
        let err = load(&[("VAULT_LISTEN", "nowhere")]).unwrap_err();
        assert_eq!(one(err).name, "VAULT_LISTEN");
    }

    #[test]
    fn plaintext_grpc_on_a_network_address_needs_an_explicit_opt_in() {
        for listen in ["0.0.0.0:50051", "10.1.2.3:50051", "[::]:50051"] {
            let err = one(load(&[("VAULT_LISTEN", listen)]).unwrap_err());
            assert_eq!(err.name, "VAULT_LISTEN", "{listen}");
            assert!(err.problem.contains("VAULT_ALLOW_PLAINTEXT"), "{err}");
            let allowed = load(&[("VAULT_LISTEN", listen), ("VAULT_ALLOW_PLAINTEXT", "true")]);
            assert!(allowed.unwrap().allow_plaintext, "{listen}");
        }
        for listen in ["127.0.0.1:50051", "127.9.9.9:1", "[::1]:50051"] {
            assert!(load(&[("VAULT_LISTEN", listen)]).is_ok(), "{listen}");
        }
        let with_tls = load(&[
            ("VAULT_LISTEN", "0.0.0.0:50051"),
            ("VAULT_TLS_CERT_FILE", "/etc/vault/cert.pem"),
            ("VAULT_TLS_KEY_FILE", "/etc/vault/key.pem"),
        ]);
        assert!(!with_tls.unwrap().allow_plaintext);
        let err = one(load(&[("VAULT_ALLOW_PLAINTEXT", "maybe")]).unwrap_err());
        assert_eq!(err.name, "VAULT_ALLOW_PLAINTEXT");
    }

    #[test]
    fn a_database_reached_without_verified_tls_is_named() {
        for local in [
            "postgres://vault@127.0.0.1/vault",
            "postgres://vault@localhost:5432/vault?sslmode=disable",
            "postgres://vault@[::1]/vault",
            "postgres:///vault?host=/var/run/postgresql",
            "postgres://vault@db.internal/vault?sslmode=verify-full",
            "postgresql://vault@db.internal/vault?sslmode=verify-ca",
        ] {
            assert_eq!(database_transport_risk(local), None, "{local}");
        }
        for risky in [
            "postgres://vault@db.internal/vault",
            "postgres://vault@10.0.0.5/vault?sslmode=require",
            "postgres://vault@db.internal/vault?sslmode=prefer",
            "postgres://vault@127.0.0.1/vault?host=db.internal",
        ] {
            let risk = database_transport_risk(risky).unwrap_or_default();
            assert!(risk.contains("verify-full"), "{risky}: {risk}");
        }
        let db = |pairs: Vec<(&'static str, &'static str)>| {
            DatabaseSettings::load(&Source::from_pairs(pairs))
        };
        let warned = db(vec![(
            "VAULT_DATABASE_URL",
            "postgres://vault@db.internal/vault",
        )]);
        assert!(warned.unwrap().transport_warning.is_some());
        let refused = db(vec![
            ("VAULT_DATABASE_URL", "postgres://vault@db.internal/vault"),
            ("VAULT_DATABASE_REQUIRE_TLS", "true"),
        ])
        .unwrap_err();
        assert_eq!(one(refused).name, "VAULT_DATABASE_REQUIRE_TLS");
        let verified = db(vec![
            (
                "VAULT_DATABASE_URL",
                "postgres://vault@db.internal/vault?sslmode=verify-full",
            ),
            ("VAULT_DATABASE_REQUIRE_TLS", "true"),
        ]);
        assert!(verified.unwrap().transport_warning.is_none());
    }

    #[test]
    fn settings_that_hold_secrets_print_redacted() {
        let source = Source::from_pairs([
            (
                "VAULT_DATABASE_URL",
                "postgres://vault:db-password-123@127.0.0.1/x",
            ),
            (
                "VAULT_DATABASE_MIGRATE_URL",
                "postgres://owner:owner-password-456@127.0.0.1/x",
            ),
            ("VAULT_ROOT_PASSPHRASE", "correct horse battery staple"),
            ("VAULT_JWT_ISSUER", "https://issuer.example"),
            ("VAULT_JWT_JWKS_FILE", "/tmp/jwks.json"),
        ]);
        let settings = Settings::load(&source).unwrap();
        let keyed = load(&[]).unwrap();
        for shown in [
            format!("{settings:?}"),
            format!("{keyed:?}"),
            format!("{source:?}"),
            format!("{:?}", source.read().unwrap().0),
            format!("{:?}", settings.database),
        ] {
            for secret in [
                "db-password-123",
                "owner-password-456",
                "correct horse",
                KEY,
            ] {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
            assert!(shown.to_ascii_lowercase().contains("redacted"), "{shown}");
        }
    }

    #[test]
    fn each_issuer_needs_its_own_key_set() {
        let err = one(load(&[("VAULT_JWT_JWKS_FILE", "/tmp/shared-jwks.json")]).unwrap_err());
        assert_eq!(err.name, "VAULT_JWT_ISSUER");
        assert!(err.problem.contains("own JWKS"), "{err}");
    }

    #[test]
    fn a_short_or_malformed_root_key_is_refused() {
        let mut pairs = base();
        pairs[1] = ("VAULT_ROOT_KEY", "AAAA");
        let err = one(Settings::load(&Source::from_pairs(pairs)).unwrap_err());
        assert_eq!(err.name, "VAULT_ROOT_KEY");
        assert!(err.problem.contains("32 bytes"), "{err}");
    }
}
