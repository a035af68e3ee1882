//! The vault's settings: one typed struct, [`Config`], that figment reads from the TOML file
//! named by `VAULT_CONFIG` and from the environment, which wins. Each setting is declared once
//! below with its default, the values it accepts and its meaning; `vault-server config --docs`
//! prints that list, and the README's settings table is its output. [`Config::validate`] reports
//! every problem at once, and a name that is not a setting stops startup naming the closest one.
//!
//! Configuration is data. [`Settings`] is the same data in the shape the server uses (durations,
//! one issuer bound to its keys); the root key, the provider registry and TLS are built from it
//! by [`crate::startup`].

mod docs;
mod rules;
mod settings;
mod source;
pub(crate) mod value;

use std::net::SocketAddr;
use std::path::PathBuf;

use secrecy::SecretString;

pub use docs::{docs_table, effective};
pub use rules::{check_jwks_url, check_web_url, database_transport_risk, decode_root_key};
pub use settings::{
    AuditSettings, CallbackSettings, DataSettings, Database, DatabaseSettings, JwksSource,
    JwtSettings, LimitSettings, PinSetting, Pkcs11Location, PolicySettings, RootKeySetting,
    Settings, TlsSettings, TrustedIssuer, data_dir,
};
pub use source::Source;
pub use value::{Accepts, Described, List};

/// Longest credential TTL the vault accepts: 30 days.
pub const MAX_SECRETS_TTL_SECONDS: u64 = 2_592_000;

/// One setting is missing or malformed. The message names the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}: {problem}")]
pub struct ConfigError {
    /// The setting, as spelled in the environment.
    pub name: String,
    /// What is wrong with it, and what it accepts.
    pub problem: String,
}

impl ConfigError {
    /// A problem with the setting `name`.
    pub fn new(name: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            problem: problem.into(),
        }
    }
}

/// Every problem found in the settings, one line each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<ConfigError>);

impl Problems {
    /// The settings named, in order.
    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|p| p.name.as_str()).collect()
    }
}

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl std::error::Error for Problems {}

impl From<ConfigError> for Problems {
    fn from(problem: ConfigError) -> Self {
        Self(vec![problem])
    }
}

value::settings! {
    /// Every setting, as the operator wrote it (or its default), after each value was read.
    pub struct Config {
        /// gRPC listen address; port 0 picks a free port. Without TLS it must be a loopback
        /// address (see `VAULT_ALLOW_PLAINTEXT`).
        vault_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 50051)), "host:port";
        /// Unset: the embedded file `vault.db` in `VAULT_DATA_DIR`. `postgres://…` is the
        /// production store; `sqlite::memory:` loses everything on exit.
        vault_database_url: Option<SecretString> = None,
            "postgres://…, sqlite://PATH, sqlite::memory:";
        /// The owner role that runs `vault-server migrate`; when set, `serve` never migrates (its
        /// role has no DDL right) and refuses a database not at its version. See
        /// [docs/database-roles.md](docs/database-roles.md) for the SQL that creates the two roles.
        vault_database_migrate_url: Option<SecretString> = None, "postgres://…";
        /// The login role `migrate` makes a member of the serving group.
        vault_database_serving_role: Option<String> = None, "letters, digits and _, at most 63";
        /// Each statement on an agent's tables runs under that agent's own `NOLOGIN` role (`SET
        /// LOCAL ROLE` in write transactions, `SET ROLE` on the read connection), so no request's
        /// SQL can reach another agent's rows; needs `CREATEROLE` for the migrating role.
        vault_database_agent_roles: bool = true, "true, false";
        /// The embedded store and `dev`'s generated keys; the store file and its WAL are created
        /// 0600 in directories created 0700.
        vault_data_dir: PathBuf = PathBuf::from("vault-data"), "a directory";
        /// PostgreSQL connections in all (unset: 8 × cores, between 16 and 32): half serve the hot
        /// read behind GetToken, the rest writes, leases and the sweeper.
        vault_database_max_connections: Option<u64> = None, 1..=1000;
        /// Prepared statements kept per PostgreSQL connection; each agent schema has its own SQL,
        /// so size it to about 3 × the agents that are busy at once.
        vault_database_statement_cache: u64 = DatabaseSettings::DEFAULT_STATEMENT_CACHE as u64,
            16..=65536;
        /// Agent schemas a hot-read PostgreSQL connection may touch before it is replaced: a
        /// backend caches catalog entries for every schema it touched, so this bounds its memory
        /// (about 50 KiB per schema) whatever the number of agents.
        vault_database_schemas_per_connection: u64 = 500, 16..=1_000_000;
        /// Agent schemas the replicas keep made ahead (PostgreSQL), with their tables and role,
        /// so that registering an agent writes a row instead of running DDL; 0 makes none.
        vault_database_spare_schemas: u64 = 32, 0..=10000;
        /// A `postgres://` URL to a non-local host without `sslmode=verify-full` (or `verify-ca`)
        /// logs a warning naming this setting; `true` refuses to start instead.
        vault_database_require_tls: bool = false, "true, false";
        /// The root key, base64 of 32 bytes. Exactly one kind of root key is set: this, a key file, a
        /// passphrase or a PKCS#11 key.
        vault_root_key: Option<SecretString> = None, "base64 of 32 bytes";
        /// A file holding the root key (from `vault-server keygen`).
        vault_root_key_file: Option<PathBuf> = None, "a file: base64 text or 32 raw bytes";
        /// A passphrase stretched into the root key with Argon2id, its salt kept in the database.
        vault_root_passphrase: Option<SecretString> = None, "at least 16 characters";
        /// The PKCS#11 library of an HSM or cloud KMS that holds the root key, which then never
        /// enters this process (`keygen --pkcs11` creates it). The fourth kind of root key.
        vault_root_pkcs11_module: Option<PathBuf> = None, "the path of a PKCS#11 library";
        /// The label of the token holding the root key.
        vault_root_pkcs11_token_label: Option<String> = None, "a token label";
        /// The label of the AES-256 root key inside the token.
        vault_root_pkcs11_key_label: String = "vault-root".into(), "a key label";
        /// The token's user PIN; or `VAULT_ROOT_PKCS11_PIN_FILE`.
        vault_root_pkcs11_pin: Option<SecretString> = None, "the user PIN";
        /// A file holding the token's user PIN (a trailing newline is ignored).
        vault_root_pkcs11_pin_file: Option<PathBuf> = None, "a file";
        /// Required: the allowed `iss` values, comma-separated.
        vault_jwt_issuer: List = List::default(), "comma-separated issuers";
        /// Must be in the caller token's `aud`, exactly.
        vault_jwt_audience: String = "credential-vault".into(), "text";
        /// Issuer public keys, one JWKS file per issuer, comma-separated in the order of
        /// `VAULT_JWT_ISSUER` (a token verifies only under its own issuer's keys). Exactly one of
        /// this and `VAULT_JWT_JWKS_URL` is set. An unknown `kid` re-loads them (at most every
        /// 30 s).
        vault_jwt_jwks_file: List = List::default(), "comma-separated paths";
        /// Like `VAULT_JWT_JWKS_FILE`, from URLs: `https://`, or `http://` to a loopback host.
        vault_jwt_jwks_url: List = List::default(), "comma-separated URLs";
        /// Re-load every issuer's keys this often (sooner if the JWKS response's `Cache-Control:
        /// max-age` says so, never more often than every 10 s); a key removed from the JWKS stops
        /// verifying, and tokens it verified are forgotten, within this period.
        vault_jwks_refresh_seconds: u64 = 300, 1..=86_400;
        /// If re-loading keeps failing, the old keys are trusted this long (a warning each time),
        /// then the issuer's tokens are refused until its keys load again.
        vault_jwks_max_stale_seconds: u64 = 86_400, 1..=30 * 86_400;
        /// The scope StoreToken needs.
        vault_store_scope: String = crate::auth::STORE_SCOPE.into(), "one scope name";
        /// `deny` refuses a StoreToken that carries a refresh token (PERMISSION_DENIED, reason
        /// `STORE_REFRESH_TOKEN_DENIED`), so only the vault's own code exchange creates
        /// refreshable credentials; set it once the vault's consent flow is in use.
        vault_store_refresh_tokens: String = "allow".into(), "allow, deny";
        /// The claim naming the agent.
        vault_jwt_agent_claim: String = "agent_id".into(), "a claim name";
        /// Clock skew allowed on `exp`, `nbf`, `iat`.
        vault_jwt_leeway_seconds: u64 = 300, 0..=3600;
        /// Longest caller-token lifetime (`exp - iat`) accepted.
        vault_jwt_max_ttl_seconds: u64 = 86_400, 60..=604_800;
        /// Default and maximum vault TTL of a credential (larger is refused).
        secrets_ttl_seconds: u64 = MAX_SECRETS_TTL_SECONDS, 1..=MAX_SECRETS_TTL_SECONDS;
        /// Background sweep period.
        vault_sweep_interval_seconds: u64 = 300, 1..=86_400;
        /// Rows per sweep batch; on PostgreSQL also the most agent schemas one batch visits
        /// (those with a credential past its TTL, and each at least once a day).
        vault_sweep_batch: u64 = 1000, 1..=100_000;
        /// The background sweep (and the Sweep RPC) queues what it deletes for RFC 7009
        /// revocation at the provider, through the same outbox as `Revoke(at_provider)`; `false`
        /// only deletes. The `sweep` command only deletes.
        vault_sweep_revoke_at_provider: bool = true, "true, false";
        /// New agents (each a schema, a role and a key) one issuer may cause per minute, in
        /// bursts of as many; beyond it StoreToken for a new agent answers RESOURCE_EXHAUSTED
        /// (reason `AGENT_CREATION_RATE_LIMITED`, with `RetryInfo`) and the refusal is logged.
        vault_agent_creation_per_minute: u64 = 600, 1..=1_000_000;
        /// `off` stops recording successful GetToken releases in the audit log (the only records
        /// that may be turned off: writes, refusals, failures and admin calls are always
        /// recorded, and a call whose record cannot be written fails with `AUDIT_UNAVAILABLE`).
        vault_audit_releases: String = "on".into(), "on, off";
        /// Audit records older than this many days are deleted, oldest first and in batches, by
        /// the replica holding the sweeper's lease; each chain stays verifiable from the anchor
        /// kept where the deleted prefix ended. On PostgreSQL, `migrate` records it as the floor:
        /// the serving login cannot delete a younger record, whatever it asks for.
        vault_audit_retention_days: u64 = 400, 1..=36_500;
        /// How often each audit chain's head is signed (HMAC under a key derived from the root
        /// key), so that `audit verify` detects a tail cut from the log after a signing.
        vault_audit_sign_interval_seconds: u64 = 60, 1..=86_400;
        /// On SIGTERM, report NOT_SERVING this long before closing the listener, so load
        /// balancers stop routing here before connections are refused.
        vault_shutdown_delay_seconds: u64 = 0, 0..=600;
        /// Then wait this long for in-flight calls.
        vault_shutdown_grace_seconds: u64 = 25, 0..=3600;
        /// The OAuth provider registry (below); without it the vault cannot refresh or revoke at
        /// providers.
        vault_providers_file: Option<PathBuf> = None, "a TOML file";
        /// Extra PEM roots trusted for provider TLS.
        vault_provider_ca_file: Option<PathBuf> = None, "a PEM file";
        /// Provider connection limit (no redirects are followed).
        vault_provider_connect_timeout_seconds: u64 = 5, 1..=60;
        /// Provider call limit, the whole exchange.
        vault_provider_timeout_seconds: u64 = 15, 1..=120;
        /// Calls in flight to one provider (a tool's authorization server); one more fails at
        /// once as PROVIDER_UNAVAILABLE (GetToken then serves a still-valid token), so a hung
        /// provider holds a bounded share of the vault.
        vault_provider_max_concurrent_calls: u64 = 32, 1..=10_000;
        /// A provider's calls that fail as unavailable in a row before its circuit breaker
        /// opens: calls to it then fail at once, without a connection.
        vault_provider_breaker_failures: u64 = 5, 1..=1000;
        /// How long an open breaker pauses calls to its provider before one trial call.
        vault_provider_breaker_open_seconds: u64 = 30, 1..=3600;
        /// URLs the vault learns from a response (a discovery document's endpoints; an MCP
        /// server's challenge, its authorization servers, their metadata and registration
        /// endpoints) are fetched only over `https` and only when every address their host
        /// resolves to is public; loopback, private, link-local, CGNAT, unique-local, multicast,
        /// documentation and other special ranges (and their IPv4-mapped and NAT64 forms) are
        /// refused unless inside one of these CIDRs. URLs in settings and the providers file are
        /// trusted. `dev` sets `127.0.0.0/8,::1/128`.
        vault_egress_allow_cidrs: List = List::default(), "comma-separated CIDRs";
        /// Fixed answers for host names in those derived URLs, used instead of DNS and still
        /// held to the rule above (for pinned names, and tests).
        vault_egress_hosts: List = List::default(), "comma-separated name=address";
        /// How long discovered metadata is trusted before it is fetched again: an issuer's
        /// (RFC 8414) and an MCP server's protected-resource and authorization-server metadata
        /// (RFC 9728). A failed call through discovered endpoints fetches them again at once.
        vault_discovery_ttl_seconds: u64 = 3600, 0..=86_400;
        /// First per-credential backoff after a transient provider failure (doubling;
        /// `Retry-After` honoured).
        vault_refresh_backoff_base_seconds: u64 = 1, 1..=3600;
        /// Longest per-credential backoff.
        vault_refresh_backoff_cap_seconds: u64 = 300, 1..=86_400;
        /// Largest `min_valid_seconds` GetToken accepts (larger: INVALID_ARGUMENT naming the
        /// field and the cap).
        vault_max_min_valid_seconds: u64 = 3600, 30..=86_400;
        /// After an access token is obtained (stored or refreshed), a refresh that its expiry
        /// does not force (Refresh, or GetToken with a long `min_valid_seconds`) returns it with
        /// `refreshed = false` for this long, so callers cannot turn each request into a provider
        /// call; an expired token is always refreshed.
        vault_refresh_cooldown_seconds: u64 = 10, 0..=3600;
        /// How often queued provider revocations are retried.
        vault_revocation_retry_interval_seconds: u64 = 10, 1..=3600;
        /// How long an undeliverable provider revocation is retried before it is dropped.
        vault_revocation_max_age_seconds: u64 = 7 * 86_400, 60..=90 * 86_400;
        /// With `VAULT_TLS_KEY_FILE`: serve gRPC over TLS with this PEM certificate chain.
        vault_tls_cert_file: Option<PathBuf> = None, "a PEM file";
        /// The PEM private key of `VAULT_TLS_CERT_FILE`.
        vault_tls_key_file: Option<PathBuf> = None, "a PEM file";
        /// Require client certificates from this CA (mutual TLS).
        vault_tls_client_ca_file: Option<PathBuf> = None, "a PEM file";
        /// The consent flow's callback, served over HTTP apart from gRPC because browsers reach
        /// it and agents do not: `GET /api/v1/auth/tool/callback`, `GET /healthz` and the
        /// vault's client metadata document (`GET /api/v1/auth/tool/client-metadata`). Unset: no
        /// callback listener (BeginAuthorization still works when another replica serves it).
        /// With `VAULT_TLS_CERT_FILE` it serves HTTPS with the same certificate; without TLS it
        /// must be a loopback address unless `VAULT_ALLOW_PLAINTEXT=true`.
        vault_callback_listen: Option<SocketAddr> = None, "host:port";
        /// The public URL of the callback, as the browser reaches it (through any proxy), sent to
        /// providers as `redirect_uri`; a tool's `redirect_uri` overrides it. `https://`, or
        /// `http://` to a loopback host.
        oauth_tool_redirect_uri: Option<String> = None, "a URL";
        /// Prefixes a BeginAuthorization `return_url` must start with (scheme, host and port
        /// equal, path on a `/` boundary), comma-separated. Empty: every `return_url` is refused.
        vault_oauth_return_urls: List = List::default(), "comma-separated URLs";
        /// `allow` lets a flow begun without `return_url` complete at the callback itself, for
        /// whoever holds the browser: it turns session binding off for such flows (anyone who
        /// begins one and sends its URL to a victim gets the victim's account under their own
        /// identity), so startup warns unless the redirect URI is on loopback. `dev` allows it.
        vault_oauth_unbound_callback: String = "deny".into(), "deny, allow";
        /// How long a consent flow may take from BeginAuthorization to CompleteAuthorization.
        vault_oauth_flow_ttl_seconds: u64 = 600, 60..=3600;
        /// The policy file (TOML): which tools each agent may use, and for each tool its scope
        /// ceiling, TTL maximum, rate limits and step-up requirement; see
        /// [docs/policy.md](docs/policy.md). Unset: every agent may use every tool. Reloaded on
        /// SIGHUP and when its contents change; a file that does not load stops startup, and on
        /// reload keeps the previous policy with one error line.
        vault_policy_file: Option<PathBuf> = None, "a TOML file";
        /// How often the policy file is checked for changes.
        vault_policy_reload_seconds: u64 = 5, 1..=3600;
        /// Calls each agent may make per second, across its users (0: no limit); beyond it a call
        /// answers RESOURCE_EXHAUSTED (reason `RATE_LIMITED`, with `RetryInfo`). The policy file
        /// adds per-tool limits on top.
        vault_limit_agent_per_second: u64 = 0, 0..=1_000_000;
        /// Calls an agent may make at once before its rate applies (0: one second's worth).
        vault_limit_agent_burst: u64 = 0, 0..=1_000_000;
        /// Calls each (agent, user) may make per second (0: no limit).
        vault_limit_user_per_second: u64 = 0, 0..=1_000_000;
        /// Calls an (agent, user) may make at once before its rate applies (0: one second's worth).
        vault_limit_user_burst: u64 = 0, 0..=1_000_000;
        /// Calls served at once by this replica, over all connections; one more is shed at once
        /// with RESOURCE_EXHAUSTED (reason `OVERLOADED`) rather than queued. Health checks are
        /// never shed.
        vault_max_concurrent_calls: u64 = 1024, 1..=1_000_000;
        /// Bytes of request messages that have not arrived whole, held at once over all
        /// connections; one agent may hold a quarter. A message past it is refused at once with
        /// RESOURCE_EXHAUSTED (reason `OVERLOADED`). Ordinary calls arrive whole and take none.
        vault_max_buffered_request_bytes: u64 = 64 * 1024 * 1024, 8 * 1024 * 1024..=16 * 1024 * 1024 * 1024;
        /// Concurrent HTTP/2 streams (calls) one connection may open.
        vault_http2_max_concurrent_streams: u64 = 256, 1..=10_000;
        /// HTTP/2 PING sent on a connection this often; a peer that does not answer within
        /// `VAULT_HTTP2_KEEPALIVE_TIMEOUT_SECONDS` is disconnected.
        vault_http2_keepalive_seconds: u64 = 30, 1..=3600;
        /// How long a keepalive PING may go unanswered.
        vault_http2_keepalive_timeout_seconds: u64 = 10, 1..=600;
        /// A connection is closed this long after it opened (with a grace period for its calls),
        /// so clients spread over replicas again and no connection lives forever.
        vault_max_connection_age_seconds: u64 = 3600, 10..=86_400 * 7;
        /// `true` lets gRPC listen without TLS on a network address, with one warning at startup.
        /// Only for a deployment behind a mesh sidecar (Istio, Linkerd) that terminates mTLS in
        /// front of the vault: caller JWTs and access tokens cross that hop.
        vault_allow_plaintext: bool = false, "true, false";
    }
}

impl Config {
    /// The root key the settings name (for `keygen --pkcs11`, which needs nothing else).
    pub fn root_key_setting(&self) -> Result<RootKeySetting, ConfigError> {
        self.root_key()
    }

    /// Every problem with these settings, each naming its setting and what it accepts.
    pub fn validate(&self) -> Vec<ConfigError> {
        let checks = [
            self.database().err(),
            self.transport_warning().err(),
            self.migrate_url().err(),
            self.serving_role().err(),
            self.root_key().err(),
            self.issuers().err(),
            self.store_scope().err(),
            self.store_refresh_tokens().err(),
            self.tls().err(),
            self.plaintext_problem(),
            self.callback().err(),
            self.egress().err(),
        ];
        let mut problems = self.out_of_range();
        problems.extend(checks.into_iter().flatten());
        problems
    }

    /// Whether `name` is one of the settings `migrate` and `sweep` read, whose problems alone
    /// stop them.
    fn is_database_setting(name: &str) -> bool {
        // VAULT_DATABASE_* and VAULT_DATA_DIR, which places the embedded store, and the audit
        // retention, which `migrate` records as the floor of what retention may delete.
        name.starts_with("VAULT_DATA") || name == "VAULT_AUDIT_RETENTION_DAYS"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_reports_every_problem_at_once_with_its_setting_and_range() {
        let (config, unreadable) = Source::from_pairs([
            ("SECRETS_TTL_SECONDS", "0"),
            ("VAULT_SWEEP_BATCH", "100001"),
            ("VAULT_STORE_REFRESH_TOKENS", "sometimes"),
            ("VAULT_TLS_CERT_FILE", "/etc/vault/cert.pem"),
        ])
        .read()
        .unwrap();
        assert!(unreadable.is_empty());
        let problems = Problems(config.validate());
        assert_eq!(
            problems.names(),
            [
                "SECRETS_TTL_SECONDS",
                "VAULT_SWEEP_BATCH",
                "VAULT_ROOT_KEY",
                "VAULT_JWT_ISSUER",
                "VAULT_STORE_REFRESH_TOKENS",
                "VAULT_TLS_KEY_FILE",
            ]
        );
        let shown = problems.to_string();
        assert!(shown.contains("SECRETS_TTL_SECONDS: must be between 1 and 2592000, got 0"));
        assert!(shown.contains("VAULT_SWEEP_BATCH: must be between 1 and 100000, got 100001"));
        assert_eq!(shown.lines().count(), 6, "{shown}");
    }

    #[test]
    fn the_defaults_alone_lack_only_the_root_key_and_the_issuers() {
        let problems = Problems(Config::default().validate());
        assert_eq!(problems.names(), ["VAULT_ROOT_KEY", "VAULT_JWT_ISSUER"]);
    }
}
