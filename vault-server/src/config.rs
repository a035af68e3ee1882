//! Settings: environment variables, optionally layered over a TOML file named by `VAULT_CONFIG`
//! whose keys are the same names (`VAULT_LISTEN = "..."`). The environment wins. A missing or
//! malformed setting stops startup with a message naming it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::crypto::RootKey;
use crate::ids::IssuerId;

/// Longest credential TTL the vault accepts: 30 days.
pub const MAX_SECRETS_TTL_SECONDS: u64 = 2_592_000;

/// A setting is missing or malformed. The message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {problem}")]
pub struct ConfigError {
    /// The variable, as spelled in the environment.
    pub name: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

fn problem(name: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        name,
        problem: problem.into(),
    }
}

/// Every setting name this service reads.
const NAMES: &[&str] = &[
    "VAULT_LISTEN",
    "VAULT_DATABASE_URL",
    "VAULT_DATABASE_MAX_CONNECTIONS",
    "VAULT_DATABASE_STATEMENT_CACHE",
    "VAULT_DATA_DIR",
    "VAULT_ROOT_KEY",
    "VAULT_ROOT_KEY_FILE",
    "VAULT_ROOT_PASSPHRASE",
    "VAULT_JWT_ISSUER",
    "VAULT_JWT_AUDIENCE",
    "VAULT_JWT_JWKS_FILE",
    "VAULT_JWT_JWKS_URL",
    "VAULT_JWT_AGENT_CLAIM",
    "VAULT_JWT_LEEWAY_SECONDS",
    "VAULT_JWT_MAX_TTL_SECONDS",
    "SECRETS_TTL_SECONDS",
    "VAULT_SWEEP_INTERVAL_SECONDS",
    "VAULT_SWEEP_BATCH",
    "VAULT_SHUTDOWN_GRACE_SECONDS",
    "VAULT_SHUTDOWN_DELAY_SECONDS",
    "VAULT_PROVIDERS_FILE",
    "VAULT_PROVIDER_CA_FILE",
    "VAULT_PROVIDER_CONNECT_TIMEOUT_SECONDS",
    "VAULT_PROVIDER_TIMEOUT_SECONDS",
    "VAULT_REFRESH_BACKOFF_BASE_SECONDS",
    "VAULT_REFRESH_BACKOFF_CAP_SECONDS",
    "VAULT_REVOCATION_RETRY_INTERVAL_SECONDS",
    "VAULT_REVOCATION_MAX_AGE_SECONDS",
    "VAULT_TLS_CERT_FILE",
    "VAULT_TLS_KEY_FILE",
    "VAULT_TLS_CLIENT_CA_FILE",
    "VAULT_STORE_SCOPE",
    "VAULT_STORE_REFRESH_TOKENS",
    "VAULT_JWKS_REFRESH_SECONDS",
    "VAULT_JWKS_MAX_STALE_SECONDS",
    "VAULT_MAX_MIN_VALID_SECONDS",
    "VAULT_REFRESH_COOLDOWN_SECONDS",
    "VAULT_ALLOW_PLAINTEXT",
    "VAULT_DATABASE_REQUIRE_TLS",
    "VAULT_DATABASE_AGENT_ROLES",
    "VAULT_DATABASE_MIGRATE_URL",
    "VAULT_DATABASE_SERVING_ROLE",
    "VAULT_SWEEP_REVOKE_AT_PROVIDER",
    "VAULT_AGENT_CREATION_PER_MINUTE",
];

/// Settings as strings, before validation. Figment lowercases environment keys. Holds secrets
/// in clear (the root key, the passphrase, database URLs), so its `Debug` shows nothing.
#[derive(Default, Deserialize)]
struct Raw {
    vault_listen: Option<String>,
    vault_database_url: Option<String>,
    vault_database_max_connections: Option<String>,
    vault_database_statement_cache: Option<String>,
    vault_data_dir: Option<String>,
    vault_root_key: Option<String>,
    vault_root_key_file: Option<String>,
    vault_root_passphrase: Option<String>,
    vault_jwt_issuer: Option<String>,
    vault_jwt_audience: Option<String>,
    vault_jwt_jwks_file: Option<String>,
    vault_jwt_jwks_url: Option<String>,
    vault_jwt_agent_claim: Option<String>,
    vault_jwt_leeway_seconds: Option<String>,
    vault_jwt_max_ttl_seconds: Option<String>,
    secrets_ttl_seconds: Option<String>,
    vault_sweep_interval_seconds: Option<String>,
    vault_sweep_batch: Option<String>,
    vault_shutdown_grace_seconds: Option<String>,
    vault_shutdown_delay_seconds: Option<String>,
    vault_providers_file: Option<String>,
    vault_provider_ca_file: Option<String>,
    vault_provider_connect_timeout_seconds: Option<String>,
    vault_provider_timeout_seconds: Option<String>,
    vault_refresh_backoff_base_seconds: Option<String>,
    vault_refresh_backoff_cap_seconds: Option<String>,
    vault_revocation_retry_interval_seconds: Option<String>,
    vault_revocation_max_age_seconds: Option<String>,
    vault_tls_cert_file: Option<String>,
    vault_tls_key_file: Option<String>,
    vault_tls_client_ca_file: Option<String>,
    vault_store_scope: Option<String>,
    vault_store_refresh_tokens: Option<String>,
    vault_jwks_refresh_seconds: Option<String>,
    vault_jwks_max_stale_seconds: Option<String>,
    vault_max_min_valid_seconds: Option<String>,
    vault_refresh_cooldown_seconds: Option<String>,
    vault_allow_plaintext: Option<String>,
    vault_database_require_tls: Option<String>,
    vault_database_agent_roles: Option<String>,
    vault_database_migrate_url: Option<String>,
    vault_database_serving_role: Option<String>,
    vault_sweep_revoke_at_provider: Option<String>,
    vault_agent_creation_per_minute: Option<String>,
}

impl std::fmt::Debug for Raw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Raw([redacted])")
    }
}

/// Where the settings come from. Its values include secrets, so `Debug` shows none of them.
#[derive(Clone)]
pub struct Source(Figment);

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Source([redacted])")
    }
}

impl Source {
    /// The process environment, over `VAULT_CONFIG`'s TOML file when that is set.
    pub fn from_env() -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Ok(path) = std::env::var("VAULT_CONFIG") {
            if !Path::new(&path).is_file() {
                return Err(problem("VAULT_CONFIG", format!("no such file: {path}")));
            }
            figment = figment.merge(Toml::file(path));
        }
        let env = Env::raw().filter(|key| {
            NAMES
                .iter()
                .any(|name| name.eq_ignore_ascii_case(key.as_str()))
        });
        Ok(Self(figment.merge(env)))
    }

    /// These pairs win over everything already in the source.
    pub fn with_overrides<'a>(self, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut figment = self.0;
        for (key, value) in pairs {
            figment = figment.merge((key.to_ascii_lowercase(), value.to_string()));
        }
        Self(figment)
    }

    /// Explicit pairs, for tests and embedding: `[("VAULT_LISTEN", "127.0.0.1:0"), ...]`.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut figment = Figment::new();
        for (key, value) in pairs {
            figment = figment.merge((key.to_ascii_lowercase(), value.to_string()));
        }
        Self(figment)
    }

    fn raw(&self) -> Result<Raw, ConfigError> {
        let values: figment::value::Dict = self
            .0
            .extract()
            .map_err(|e| problem("VAULT_CONFIG", e.to_string()))?;
        // Figment types what it reads ("8" becomes a number); every setting is validated from
        // its text here, with names matched case-insensitively so a file may spell them either way.
        let mut strings = serde_json::Map::new();
        for (key, value) in values {
            let text = match value {
                figment::value::Value::String(_, s) => s,
                figment::value::Value::Num(_, n) => n
                    .to_u128()
                    .map(|n| n.to_string())
                    .or_else(|| n.to_i128().map(|n| n.to_string()))
                    .or_else(|| n.to_f64().map(|n| n.to_string()))
                    .unwrap_or_default(),
                figment::value::Value::Bool(_, b) => b.to_string(),
                _ => {
                    let name = NAMES
                        .iter()
                        .find(|n| n.eq_ignore_ascii_case(&key))
                        .copied()
                        .unwrap_or("VAULT_CONFIG");
                    return Err(problem(name, "must be a single value"));
                }
            };
            strings.insert(key.to_ascii_lowercase(), serde_json::Value::String(text));
        }
        serde_json::from_value(serde_json::Value::Object(strings))
            .map_err(|e| problem("VAULT_CONFIG", e.to_string()))
    }
}

/// How the root key is obtained.
pub enum RootKeySource {
    /// `VAULT_ROOT_KEY` or `VAULT_ROOT_KEY_FILE`: the key itself.
    Key(RootKey),
    /// `VAULT_ROOT_PASSPHRASE`: derived with Argon2id and the salt kept in the control schema.
    Passphrase(SecretString),
}

impl std::fmt::Debug for RootKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Key(_) => f.write_str("Key([REDACTED])"),
            Self::Passphrase(_) => f.write_str("Passphrase([REDACTED])"),
        }
    }
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

/// Whether a JWKS URL may be used: `https://`, or `http://` to a loopback host only, never with
/// user info (which hides the real host: `http://localhost@evil.example/`). Checked on the
/// parsed URL, not its spelling.
pub fn check_jwks_url(text: &str) -> Result<url::Url, &'static str> {
    let url = url::Url::parse(text.trim()).map_err(|_| "is not a URL")?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain user info");
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err("has no host"),
    };
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err("must be https:// (plain http only for a loopback host)"),
    }
}

/// Everything `serve` needs.
#[derive(Debug)]
pub struct Settings {
    /// gRPC listen address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The database.
    pub database: DatabaseSettings,
    /// The root of the key hierarchy.
    pub root_key: RootKeySource,
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
    /// How long health reports NOT_SERVING before the listener closes, so load balancers stop
    /// routing here before connections are refused.
    pub shutdown_delay: Duration,
    /// The OAuth provider registry and its HTTP client.
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
    /// Whether StoreToken may bring a refresh token (`VAULT_STORE_REFRESH_TOKENS`).
    pub store_refresh_tokens: bool,
    /// `VAULT_ALLOW_PLAINTEXT`: gRPC without TLS on a non-loopback address was asked for
    /// (behind a mesh sidecar that terminates mTLS); startup logs a warning.
    pub allow_plaintext: bool,
    /// Largest `min_valid_seconds` GetToken accepts (`VAULT_MAX_MIN_VALID_SECONDS`).
    pub max_min_valid_seconds: u64,
    /// `VAULT_SWEEP_REVOKE_AT_PROVIDER`: the TTL sweep revokes what it deletes at the provider.
    pub sweep_revokes: bool,
    /// `VAULT_AGENT_CREATION_PER_MINUTE`: new agents (each a schema, a role and a key) one
    /// issuer may cause per minute, with bursts up to the same number.
    pub agent_creation_per_minute: u32,
    /// Least time between two refreshes of a still-valid credential
    /// (`VAULT_REFRESH_COOLDOWN_SECONDS`).
    pub refresh_cooldown: Duration,
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
    /// `VAULT_DATABASE_AGENT_ROLES`: run each statement on an agent schema under that agent's
    /// own role (PostgreSQL only).
    pub agent_roles: bool,
    /// `VAULT_DATABASE_MIGRATE_URL`: the owner role that runs migrations, when the server
    /// itself connects as a serving role without DDL rights.
    pub migrate_url: Option<SecretString>,
    /// `VAULT_DATABASE_SERVING_ROLE`: the login role `migrate` makes a member of the serving
    /// group.
    pub serving_role: Option<String>,
}

/// Why a PostgreSQL URL may reach a non-local server without a verified TLS connection, or
/// `None` when it cannot: the host is local (loopback or a Unix socket), or `sslmode` is
/// `verify-full` or `verify-ca`. `prefer` and `require` encrypt without checking who answers.
pub fn database_transport_risk(url: &str) -> Option<String> {
    let Ok(parsed) = url::Url::parse(url) else {
        return Some("VAULT_DATABASE_URL could not be checked for TLS".into());
    };
    let query = |name: &str| {
        parsed
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    let sslmode = query("sslmode").unwrap_or_else(|| "prefer".into());
    if matches!(sslmode.as_str(), "verify-full" | "verify-ca") {
        return None;
    }
    // A `host` parameter overrides the authority (and may be a socket directory).
    let local = match query("host") {
        Some(host) => host.starts_with('/') || is_local_host(&host),
        None => match parsed.host() {
            None => true,
            Some(url::Host::Domain(name)) => is_local_host(name),
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        },
    };
    (!local).then(|| {
        format!(
            "VAULT_DATABASE_URL reaches a non-local PostgreSQL with sslmode={sslmode}: the connection is not verified against a CA, so a network attacker can read or change credential rows in transit; use sslmode=verify-full (and set VAULT_DATABASE_REQUIRE_TLS=true to refuse anything less)"
        )
    })
}

fn is_local_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn parse_bool(name: &'static str, value: Option<&str>) -> Result<bool, ConfigError> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("false") | Some("0") | Some("no") => Ok(false),
        Some("true") | Some("1") | Some("yes") => Ok(true),
        Some(other) => Err(problem(
            name,
            format!("must be true or false, got {:?}", truncate(other)),
        )),
    }
}

impl DatabaseSettings {
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

    /// Default for [`DatabaseSettings::statement_cache`]: three hot statements (load, upsert,
    /// next generation) for about 340 agents per connection.
    pub const DEFAULT_STATEMENT_CACHE: usize = 1024;

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
        }
    }
}

/// `VAULT_DATABASE_MAX_CONNECTIONS` when unset: 4 × cores, 4..32.
fn default_pool_size() -> u32 {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
    (cores * 4).clamp(4, 32)
}

/// `VAULT_DATA_DIR`: where the embedded store and `dev`'s generated keys live.
pub fn data_dir(source: &Source) -> Result<PathBuf, ConfigError> {
    Ok(non_empty(source.raw()?.vault_data_dir)
        .map_or_else(|| PathBuf::from("vault-data"), PathBuf::from))
}

fn parse_u64(
    name: &'static str,
    value: Option<&str>,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ConfigError> {
    let Some(value) = value else {
        return Ok(default);
    };
    let parsed: u64 = value.trim().parse().map_err(|_| {
        problem(
            name,
            format!("must be a whole number, got {:?}", truncate(value)),
        )
    })?;
    if !range.contains(&parsed) {
        return Err(problem(
            name,
            format!(
                "must be between {} and {}, got {parsed}",
                range.start(),
                range.end()
            ),
        ));
    }
    Ok(parsed)
}

fn truncate(value: &str) -> String {
    value.chars().take(40).collect()
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

impl DatabaseSettings {
    /// Reads `VAULT_DATABASE_URL` (unset: the embedded file `vault.db` in `VAULT_DATA_DIR`) and
    /// `VAULT_DATABASE_MAX_CONNECTIONS`.
    pub fn load(source: &Source) -> Result<Self, ConfigError> {
        Self::from_raw(&source.raw()?)
    }

    fn from_raw(raw: &Raw) -> Result<Self, ConfigError> {
        let data_dir = non_empty(raw.vault_data_dir.clone())
            .map_or_else(|| PathBuf::from("vault-data"), PathBuf::from);
        let database = match non_empty(raw.vault_database_url.clone()) {
            None => Database::SqliteFile(data_dir.join("vault.db")),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Database::Postgres(SecretString::from(url))
            }
            Some(url) if url == "sqlite::memory:" => Database::SqliteMemory,
            Some(url) if url.starts_with("sqlite:") => {
                let path = url.trim_start_matches("sqlite:").trim_start_matches("//");
                if path.is_empty() {
                    return Err(problem("VAULT_DATABASE_URL", "sqlite:// needs a file path"));
                }
                Database::SqliteFile(PathBuf::from(path))
            }
            Some(_) => {
                return Err(problem(
                    "VAULT_DATABASE_URL",
                    "must be postgres://…, sqlite://PATH or sqlite::memory: (unset: the embedded file in VAULT_DATA_DIR)",
                ));
            }
        };
        let max_connections = parse_u64(
            "VAULT_DATABASE_MAX_CONNECTIONS",
            raw.vault_database_max_connections.as_deref(),
            u64::from(default_pool_size()),
            1..=1000,
        )? as u32;
        let statement_cache = parse_u64(
            "VAULT_DATABASE_STATEMENT_CACHE",
            raw.vault_database_statement_cache.as_deref(),
            Self::DEFAULT_STATEMENT_CACHE as u64,
            16..=65536,
        )? as usize;
        let transport_warning = match &database {
            Database::Postgres(url) => database_transport_risk(url.expose_secret()),
            _ => None,
        };
        if let Some(risk) = &transport_warning
            && parse_bool(
                "VAULT_DATABASE_REQUIRE_TLS",
                raw.vault_database_require_tls.as_deref(),
            )?
        {
            return Err(problem("VAULT_DATABASE_REQUIRE_TLS", risk.clone()));
        }
        let agent_roles = match raw.vault_database_agent_roles.as_deref() {
            None => true,
            Some(value) => parse_bool("VAULT_DATABASE_AGENT_ROLES", Some(value))?,
        };
        let migrate_url = match non_empty(raw.vault_database_migrate_url.clone()) {
            None => None,
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                if !matches!(database, Database::Postgres(_)) {
                    return Err(problem(
                        "VAULT_DATABASE_MIGRATE_URL",
                        "is only for a postgres:// VAULT_DATABASE_URL",
                    ));
                }
                Some(SecretString::from(url))
            }
            Some(_) => {
                return Err(problem(
                    "VAULT_DATABASE_MIGRATE_URL",
                    "must be a postgres:// URL (the owner role)",
                ));
            }
        };
        let serving_role = non_empty(raw.vault_database_serving_role.clone());
        if let Some(role) = &serving_role
            && (role.len() > 63 || !role.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        {
            return Err(problem(
                "VAULT_DATABASE_SERVING_ROLE",
                "must be a plain role name: letters, digits and _, at most 63",
            ));
        }
        Ok(Self {
            database,
            max_connections,
            statement_cache,
            transport_warning,
            agent_roles,
            migrate_url,
            serving_role,
        })
    }
}

fn decode_root_key(name: &'static str, text: &str) -> Result<RootKey, ConfigError> {
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| problem(name, "must be base64 of 32 bytes"))?,
    );
    let key: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| problem(name, format!("must be 32 bytes, got {}", bytes.len())))?;
    Ok(RootKey::from_bytes(key))
}

/// Reads a root key file: base64 text of 32 bytes (what `keygen` writes) or 32 raw bytes.
pub fn read_root_key_file(path: &Path) -> Result<RootKey, ConfigError> {
    const NAME: &str = "VAULT_ROOT_KEY_FILE";
    let bytes = Zeroizing::new(
        std::fs::read(path)
            .map_err(|e| problem(NAME, format!("cannot read {}: {e}", path.display())))?,
    );
    if let Ok(raw) = <[u8; 32]>::try_from(bytes.as_slice()) {
        return Ok(RootKey::from_bytes(raw));
    }
    let text =
        std::str::from_utf8(&bytes).map_err(|_| problem(NAME, "must be base64 of 32 bytes"))?;
    decode_root_key(NAME, text)
}

impl Settings {
    /// Reads and validates every setting `serve` needs.
    pub fn load(source: &Source) -> Result<Self, ConfigError> {
        let raw = source.raw()?;
        let listen_text =
            non_empty(raw.vault_listen.clone()).unwrap_or_else(|| "127.0.0.1:50051".into());
        let listen: SocketAddr = listen_text.trim().parse().map_err(|_| {
            problem(
                "VAULT_LISTEN",
                format!(
                    "must be host:port such as 127.0.0.1:50051, got {:?}",
                    truncate(&listen_text)
                ),
            )
        })?;
        let database = DatabaseSettings::from_raw(&raw)?;

        let key = non_empty(raw.vault_root_key.clone());
        let key_file = non_empty(raw.vault_root_key_file.clone());
        let passphrase = non_empty(raw.vault_root_passphrase.clone());
        let root_key = match (key, key_file, passphrase) {
            (Some(k), None, None) => {
                RootKeySource::Key(decode_root_key("VAULT_ROOT_KEY", &Zeroizing::new(k))?)
            }
            (None, Some(f), None) => RootKeySource::Key(read_root_key_file(Path::new(&f))?),
            (None, None, Some(p)) => {
                if p.len() < 16 {
                    return Err(problem(
                        "VAULT_ROOT_PASSPHRASE",
                        "must be at least 16 characters",
                    ));
                }
                RootKeySource::Passphrase(SecretString::from(p))
            }
            (None, None, None) => {
                return Err(problem(
                    "VAULT_ROOT_KEY",
                    "no root key: set one of VAULT_ROOT_KEY, VAULT_ROOT_KEY_FILE, VAULT_ROOT_PASSPHRASE (`vault-server keygen` makes a key file)",
                ));
            }
            _ => {
                return Err(problem(
                    "VAULT_ROOT_KEY",
                    "set only one of VAULT_ROOT_KEY, VAULT_ROOT_KEY_FILE, VAULT_ROOT_PASSPHRASE",
                ));
            }
        };

        let list = |value: &Option<String>| -> Vec<String> {
            value
                .as_deref()
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        };
        let issuer_names = list(&raw.vault_jwt_issuer);
        if issuer_names.is_empty() {
            return Err(problem(
                "VAULT_JWT_ISSUER",
                "is not set (comma-separated allowed issuers)",
            ));
        }
        let jwks_sources: Vec<JwksSource> = match (
            list(&raw.vault_jwt_jwks_file),
            list(&raw.vault_jwt_jwks_url),
        ) {
            (files, urls) if !files.is_empty() && urls.is_empty() => files
                .into_iter()
                .map(|f| JwksSource::File(PathBuf::from(f)))
                .collect(),
            (files, urls) if files.is_empty() && !urls.is_empty() => urls
                .iter()
                .map(|u| {
                    check_jwks_url(u)
                        .map(JwksSource::Url)
                        .map_err(|why| problem("VAULT_JWT_JWKS_URL", why))
                })
                .collect::<Result<_, _>>()?,
            (files, _) if files.is_empty() => {
                return Err(problem(
                    "VAULT_JWT_JWKS_FILE",
                    "is not set: set VAULT_JWT_JWKS_FILE or VAULT_JWT_JWKS_URL",
                ));
            }
            _ => {
                return Err(problem(
                    "VAULT_JWT_JWKS_FILE",
                    "set only one of VAULT_JWT_JWKS_FILE, VAULT_JWT_JWKS_URL",
                ));
            }
        };
        if jwks_sources.len() != issuer_names.len() {
            // One key set shared by several issuers would let each sign for the others.
            return Err(problem(
                "VAULT_JWT_ISSUER",
                format!(
                    "names {} issuers but {} key sets are configured; give each issuer its own JWKS, comma-separated in the same order",
                    issuer_names.len(),
                    jwks_sources.len()
                ),
            ));
        }
        let mut issuers = Vec::with_capacity(issuer_names.len());
        for (name, jwks) in issuer_names.into_iter().zip(jwks_sources) {
            let issuer = IssuerId::parse(name)
                .map_err(|e| problem("VAULT_JWT_ISSUER", format!("an issuer {e}")))?;
            if issuers.iter().any(|t: &TrustedIssuer| t.issuer == issuer) {
                return Err(problem(
                    "VAULT_JWT_ISSUER",
                    format!("{issuer} is named twice"),
                ));
            }
            issuers.push(TrustedIssuer { issuer, jwks });
        }
        let agent_claim =
            non_empty(raw.vault_jwt_agent_claim.clone()).unwrap_or_else(|| "agent_id".into());
        let jwt = JwtSettings {
            issuers,
            audience: non_empty(raw.vault_jwt_audience.clone())
                .unwrap_or_else(|| "credential-vault".into()),
            agent_claim,
            leeway_seconds: parse_u64(
                "VAULT_JWT_LEEWAY_SECONDS",
                raw.vault_jwt_leeway_seconds.as_deref(),
                300,
                0..=3600,
            )?,
            max_ttl_seconds: parse_u64(
                "VAULT_JWT_MAX_TTL_SECONDS",
                raw.vault_jwt_max_ttl_seconds.as_deref(),
                86_400,
                60..=604_800,
            )?,
            jwks_refetch_interval: Duration::from_secs(30),
            jwks_refresh: Duration::from_secs(parse_u64(
                "VAULT_JWKS_REFRESH_SECONDS",
                raw.vault_jwks_refresh_seconds.as_deref(),
                300,
                1..=86_400,
            )?),
            jwks_max_stale: Duration::from_secs(parse_u64(
                "VAULT_JWKS_MAX_STALE_SECONDS",
                raw.vault_jwks_max_stale_seconds.as_deref(),
                86_400,
                1..=30 * 86_400,
            )?),
            store_scope: match non_empty(raw.vault_store_scope.clone()) {
                None => crate::auth::STORE_SCOPE.to_string(),
                Some(scope) if scope.trim().contains(char::is_whitespace) => {
                    return Err(problem(
                        "VAULT_STORE_SCOPE",
                        "must be one scope name, without spaces",
                    ));
                }
                Some(scope) => scope.trim().to_string(),
            },
        };
        let store_refresh_tokens = match non_empty(raw.vault_store_refresh_tokens.clone())
            .as_deref()
            .map(str::trim)
        {
            None | Some("allow") => true,
            Some("deny") => false,
            Some(other) => {
                return Err(problem(
                    "VAULT_STORE_REFRESH_TOKENS",
                    format!("must be allow or deny, got {:?}", truncate(other)),
                ));
            }
        };
        let secrets_ttl_seconds = parse_u64(
            "SECRETS_TTL_SECONDS",
            raw.secrets_ttl_seconds.as_deref(),
            MAX_SECRETS_TTL_SECONDS,
            1..=MAX_SECRETS_TTL_SECONDS,
        )?;
        let sweep_interval = Duration::from_secs(parse_u64(
            "VAULT_SWEEP_INTERVAL_SECONDS",
            raw.vault_sweep_interval_seconds.as_deref(),
            300,
            1..=86_400,
        )?);
        let sweep_batch = parse_u64(
            "VAULT_SWEEP_BATCH",
            raw.vault_sweep_batch.as_deref(),
            1000,
            1..=100_000,
        )? as u32;
        let shutdown_grace = Duration::from_secs(parse_u64(
            "VAULT_SHUTDOWN_GRACE_SECONDS",
            raw.vault_shutdown_grace_seconds.as_deref(),
            25,
            0..=3600,
        )?);
        let shutdown_delay = Duration::from_secs(parse_u64(
            "VAULT_SHUTDOWN_DELAY_SECONDS",
            raw.vault_shutdown_delay_seconds.as_deref(),
            0,
            0..=600,
        )?);
        let seconds = |name: &'static str,
                       value: &Option<String>,
                       default: u64,
                       range: std::ops::RangeInclusive<u64>| {
            parse_u64(name, value.as_deref(), default, range).map(Duration::from_secs)
        };
        let path = |value: &Option<String>| non_empty(value.clone()).map(PathBuf::from);
        let providers = crate::oauth::ProviderSettings {
            file: path(&raw.vault_providers_file),
            ca_file: path(&raw.vault_provider_ca_file),
            connect_timeout: seconds(
                "VAULT_PROVIDER_CONNECT_TIMEOUT_SECONDS",
                &raw.vault_provider_connect_timeout_seconds,
                5,
                1..=60,
            )?,
            timeout: seconds(
                "VAULT_PROVIDER_TIMEOUT_SECONDS",
                &raw.vault_provider_timeout_seconds,
                15,
                1..=120,
            )?,
        };
        let backoff_base = seconds(
            "VAULT_REFRESH_BACKOFF_BASE_SECONDS",
            &raw.vault_refresh_backoff_base_seconds,
            1,
            1..=3600,
        )?;
        let backoff_cap = seconds(
            "VAULT_REFRESH_BACKOFF_CAP_SECONDS",
            &raw.vault_refresh_backoff_cap_seconds,
            300,
            1..=86_400,
        )?;
        let revocation_retry_interval = seconds(
            "VAULT_REVOCATION_RETRY_INTERVAL_SECONDS",
            &raw.vault_revocation_retry_interval_seconds,
            10,
            1..=3600,
        )?;
        let revocation_max_age = seconds(
            "VAULT_REVOCATION_MAX_AGE_SECONDS",
            &raw.vault_revocation_max_age_seconds,
            7 * 86_400,
            60..=90 * 86_400,
        )?;
        let tls = match (
            path(&raw.vault_tls_cert_file),
            path(&raw.vault_tls_key_file),
        ) {
            (Some(cert_file), Some(key_file)) => Some(TlsSettings {
                cert_file,
                key_file,
                client_ca_file: path(&raw.vault_tls_client_ca_file),
            }),
            (None, None)
                if raw
                    .vault_tls_client_ca_file
                    .as_deref()
                    .is_some_and(|v| !v.is_empty()) =>
            {
                return Err(problem(
                    "VAULT_TLS_CLIENT_CA_FILE",
                    "needs VAULT_TLS_CERT_FILE and VAULT_TLS_KEY_FILE",
                ));
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(problem(
                    "VAULT_TLS_KEY_FILE",
                    "is needed with VAULT_TLS_CERT_FILE",
                ));
            }
            (None, Some(_)) => {
                return Err(problem(
                    "VAULT_TLS_CERT_FILE",
                    "is needed with VAULT_TLS_KEY_FILE",
                ));
            }
        };
        let allow_plaintext = parse_bool(
            "VAULT_ALLOW_PLAINTEXT",
            raw.vault_allow_plaintext.as_deref(),
        )?;
        if tls.is_none() && !listen.ip().is_loopback() && !allow_plaintext {
            return Err(problem(
                "VAULT_LISTEN",
                format!(
                    "{listen} is reachable from the network but no TLS is configured (VAULT_TLS_CERT_FILE, VAULT_TLS_KEY_FILE); caller tokens and access tokens would cross it in clear. Set VAULT_ALLOW_PLAINTEXT=true only behind a sidecar that terminates mTLS"
                ),
            ));
        }
        Ok(Self {
            listen,
            database,
            root_key,
            jwt,
            secrets_ttl_seconds,
            sweep_interval,
            sweep_batch,
            shutdown_grace,
            shutdown_delay,
            providers,
            backoff_base,
            backoff_cap,
            revocation_retry_interval,
            revocation_max_age,
            tls,
            store_refresh_tokens,
            allow_plaintext,
            sweep_revokes: match raw.vault_sweep_revoke_at_provider.as_deref() {
                None => true,
                Some(value) => parse_bool("VAULT_SWEEP_REVOKE_AT_PROVIDER", Some(value))?,
            },
            agent_creation_per_minute: parse_u64(
                "VAULT_AGENT_CREATION_PER_MINUTE",
                raw.vault_agent_creation_per_minute.as_deref(),
                600,
                1..=1_000_000,
            )? as u32,
            max_min_valid_seconds: parse_u64(
                "VAULT_MAX_MIN_VALID_SECONDS",
                raw.vault_max_min_valid_seconds.as_deref(),
                3600,
                30..=86_400,
            )?,
            refresh_cooldown: seconds(
                "VAULT_REFRESH_COOLDOWN_SECONDS",
                &raw.vault_refresh_cooldown_seconds,
                10,
                0..=3600,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn load(extra: &[(&'static str, &'static str)]) -> Result<Settings, ConfigError> {
        let mut pairs = base();
        pairs.extend_from_slice(extra);
        Settings::load(&Source::from_pairs(pairs))
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
        let err = load(&[("SECRETS_TTL_SECONDS", "2592001")]).unwrap_err();
        assert_eq!(err.name, "SECRETS_TTL_SECONDS");
        let err = load(&[("SECRETS_TTL_SECONDS", "ten")]).unwrap_err();
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
        assert_eq!(db("mysql://x").unwrap_err().name, "VAULT_DATABASE_URL");
    }

    #[test]
    fn pool_settings_have_defaults_and_bounds() {
        let db = |pairs: &[(&'static str, &'static str)]| {
            DatabaseSettings::load(&Source::from_pairs(pairs.to_vec()))
        };
        let defaults = db(&[]).unwrap();
        assert_eq!(defaults.statement_cache, 1024);
        assert!((4..=32).contains(&defaults.max_connections));
        let set = db(&[
            ("VAULT_DATABASE_STATEMENT_CACHE", "4096"),
            ("VAULT_DATABASE_MAX_CONNECTIONS", "3"),
        ])
        .unwrap();
        assert_eq!((set.statement_cache, set.max_connections), (4096, 3));
        for bad in ["0", "8", "many", "100000"] {
            let err = db(&[("VAULT_DATABASE_STATEMENT_CACHE", bad)]).unwrap_err();
            assert_eq!(err.name, "VAULT_DATABASE_STATEMENT_CACHE", "{bad}");
        }
        let err = db(&[("VAULT_DATABASE_MAX_CONNECTIONS", "0")]).unwrap_err();
        assert_eq!(err.name, "VAULT_DATABASE_MAX_CONNECTIONS");
    }

    #[test]
    fn missing_settings_are_named() {
        let err = Settings::load(&Source::from_pairs([("VAULT_ROOT_KEY", KEY)])).unwrap_err();
        assert_eq!(err.name, "VAULT_JWT_ISSUER");
        let err = load(&[("VAULT_ROOT_PASSPHRASE", "a long enough passphrase")]).unwrap_err();
        assert_eq!(err.name, "VAULT_ROOT_KEY", "two root key sources");
        let err = load(&[("VAULT_LISTEN", "nowhere")]).unwrap_err();
        assert_eq!(err.name, "VAULT_LISTEN");
    }

    #[test]
    fn plaintext_grpc_on_a_network_address_needs_an_explicit_opt_in() {
        for listen in ["0.0.0.0:50051", "10.1.2.3:50051", "[::]:50051"] {
            let err = load(&[("VAULT_LISTEN", listen)]).unwrap_err();
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
        let err = load(&[("VAULT_ALLOW_PLAINTEXT", "maybe")]).unwrap_err();
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
        assert_eq!(refused.name, "VAULT_DATABASE_REQUIRE_TLS");
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
            format!("{:?}", source.raw().unwrap()),
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
        let err = load(&[("VAULT_JWT_JWKS_FILE", "/tmp/shared-jwks.json")]).unwrap_err();
        assert_eq!(err.name, "VAULT_JWT_ISSUER");
        assert!(err.problem.contains("own JWKS"), "{err}");
    }

    #[test]
    fn a_jwks_url_is_checked_on_its_parsed_host_and_scheme() {
        for good in [
            "https://issuer.example/jwks.json",
            "http://127.0.0.1:8080/jwks",
            "http://127.8.9.1/jwks",
            "http://localhost:3000/jwks",
            "http://[::1]:3000/jwks",
        ] {
            assert!(check_jwks_url(good).is_ok(), "{good}");
        }
        for bad in [
            "http://localhost@evil.example/",
            "http://127.0.0.1@evil.example/jwks",
            "http://localhost.evil.example/jwks",
            "http://127.0.0.1.evil.example/jwks",
            "https://user:pass@issuer.example/jwks",
            "http://issuer.example/jwks",
            "ftp://localhost/jwks",
            "file:///etc/jwks.json",
            "not a url",
        ] {
            assert!(check_jwks_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_short_or_malformed_root_key_is_refused() {
        let mut pairs = base();
        pairs[1] = ("VAULT_ROOT_KEY", "AAAA");
        let err = Settings::load(&Source::from_pairs(pairs)).unwrap_err();
        assert_eq!(err.name, "VAULT_ROOT_KEY");
        assert!(err.problem.contains("32 bytes"), "{err}");
    }
}
