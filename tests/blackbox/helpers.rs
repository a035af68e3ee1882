//! Test harness: databases, a test issuer, and servers.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vault_server::config::{Settings, Source};
use vault_server::startup::Application;

pub const AUDIENCE: &str = "credential-vault";
/// The `iss` of [`Issuer::new`].
pub const ISS: &str = "https://issuer.test";

/// The schema of `agent` vouched for by the test issuer.
pub fn schema_of(agent: &str) -> String {
    vault_server::store::namespace_for(
        &vault_server::ids::IssuerId::parse(ISS).unwrap(),
        &vault_server::ids::AgentId::parse(agent).unwrap(),
    )
}
pub const ROOT_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
pub const OTHER_ROOT_KEY: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";

pub fn now() -> i64 {
    unix(SystemTime::now())
}

/// `at` in unix seconds, to compare with [`now`].
pub fn unix(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Everything the vault logs during the test run, for the test that no secret is logged.
pub fn captured_logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buffer);
        let echo = std::env::var_os("TEST_LOG").is_some();
        // Tests never set an OTLP endpoint, so this cannot fail and has nothing to flush.
        let _ = vault_server::telemetry::init(
            move || CaptureWriter {
                buffer: Arc::clone(&sink),
                echo,
            },
            "debug,h2=info,hyper=info,tower=info,sqlx=info",
            false,
        );
        buffer
    })
}

struct CaptureWriter {
    buffer: Arc<Mutex<Vec<u8>>>,
    echo: bool,
}

impl Write for CaptureWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.lock().unwrap().extend_from_slice(bytes);
        if self.echo {
            std::io::stderr().write_all(bytes)?;
        }
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A database of its own, dropped (forcibly) when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

impl TestDb {
    pub async fn new() -> Self {
        captured_logs();
        let admin_url = admin_url();
        let name = format!("vault_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("PostgreSQL reachable at DATABASE_URL");
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let (base, query) = match admin_url.split_once('?') {
            Some((b, q)) => (b.to_string(), format!("?{q}")),
            None => (admin_url.clone(), String::new()),
        };
        let (server, _) = base
            .rsplit_once('/')
            .expect("DATABASE_URL has a database path");
        let url = format!("{server}/{name}{query}");
        Self {
            name,
            url,
            admin_url,
        }
    }

    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        drop_database(&self.admin_url, &self.url, &self.name, None);
    }
}

/// Drops the vault database `name` at `url` and the roles it made, then runs `then_sql` if any,
/// through `admin_url`. Drop cannot await, so a short-lived runtime on its own thread does it.
pub fn drop_database(admin_url: &str, url: &str, name: &str, then_sql: Option<String>) {
    let (admin_url, url, name) = (admin_url.to_owned(), url.to_owned(), name.to_owned());
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                let _ = vault_server::store::drop_database_and_roles(&mut admin, &url, &name).await;
                if let Some(sql) = then_sql {
                    let _ = sqlx::raw_sql(&sql).execute(&mut admin).await;
                }
            }
        });
    })
    .join();
}

/// A signing key of the test issuer.
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    pub encoding: EncodingKey,
    pub jwk: Value,
    /// The raw public key bytes (for the HS256-with-public-key attack).
    pub public_raw: Vec<u8>,
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl SigningKey {
    pub fn ed25519(kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let public_raw = pair.public_key_raw().to_vec();
        Self {
            kid: kid.into(),
            alg: Algorithm::EdDSA,
            encoding: EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": b64url(&public_raw), "kid": kid, "use": "sig", "alg": "EdDSA"}),
            public_raw,
        }
    }

    pub fn es256(kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let public_raw = pair.public_key_raw().to_vec();
        assert_eq!(public_raw.len(), 65, "uncompressed P-256 point");
        Self {
            kid: kid.into(),
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
            jwk: json!({"kty": "EC", "crv": "P-256", "x": b64url(&public_raw[1..33]), "y": b64url(&public_raw[33..]), "kid": kid, "use": "sig"}),
            public_raw,
        }
    }

    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

/// The trusted issuer: its keys, published as a JWKS file the vault reads.
pub struct Issuer {
    pub iss: String,
    pub keys: Vec<SigningKey>,
    pub jwks_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Issuer {
    pub fn new() -> Self {
        Self::named(ISS)
    }

    /// An issuer with `iss` and keys of its own.
    pub fn named(iss: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let issuer = Self {
            iss: iss.into(),
            keys: if iss == ISS {
                vec![SigningKey::ed25519("ed-1"), SigningKey::es256("es-1")]
            } else {
                // Another issuer's kids differ too, so that a test of issuer binding cannot pass
                // on a kid lookup alone.
                vec![
                    SigningKey::ed25519(&format!("{iss}#ed-1")),
                    SigningKey::es256(&format!("{iss}#es-1")),
                ]
            },
            jwks_path: dir.path().join("jwks.json"),
            _dir: dir,
        };
        issuer.publish();
        issuer
    }

    /// Writes the JWKS with every key in `keys`.
    pub fn publish(&self) {
        let set = json!({"keys": self.keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
        let tmp = self.jwks_path.with_extension("tmp");
        std::fs::write(&tmp, set.to_string()).unwrap();
        std::fs::rename(tmp, &self.jwks_path).unwrap();
    }

    /// Standard claims for `agent` acting for `user`, valid for ten minutes.
    pub fn claims(&self, agent: &str, user: &str) -> Value {
        let now = now();
        json!({"iss": self.iss, "aud": AUDIENCE, "sub": user, "agent_id": agent, "iat": now, "exp": now + 600})
    }

    /// A token with the `vault:store` scope: most tests play the gateway that stores and the
    /// agent that reads with one token.
    pub fn token(&self, agent: &str, user: &str) -> String {
        self.scoped_token(agent, user, "openid vault:store")
    }

    /// An agent's ordinary token: it may read, refresh and revoke its own credentials, not store.
    pub fn agent_token(&self, agent: &str, user: &str) -> String {
        self.keys[0].sign(&self.claims(agent, user))
    }

    pub fn admin_token(&self, agent: &str, user: &str) -> String {
        self.scoped_token(agent, user, "openid vault:admin")
    }

    pub fn scoped_token(&self, agent: &str, user: &str, scope: &str) -> String {
        let mut claims = self.claims(agent, user);
        claims["scope"] = json!(scope);
        self.keys[0].sign(&claims)
    }
}

/// A vault server running in this process.
pub struct TestApp {
    pub addr: SocketAddr,
    /// The consent callback's address, when it serves one.
    pub callback: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Settings pairs for a server on `db` trusting `issuer`, with `extra` overriding.
pub fn settings_pairs<'a>(
    db: &'a TestDb,
    issuer: &'a Issuer,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut pairs = vec![
        ("VAULT_LISTEN", "127.0.0.1:0"),
        ("VAULT_DATABASE_URL", db.url.as_str()),
        ("VAULT_DATABASE_MAX_CONNECTIONS", "8"),
        ("VAULT_ROOT_KEY", ROOT_KEY),
        ("VAULT_JWT_ISSUER", issuer.iss.as_str()),
        ("VAULT_JWT_JWKS_FILE", issuer.jwks_path.to_str().unwrap()),
        ("VAULT_SHUTDOWN_GRACE_SECONDS", "5"),
        // The test providers run on loopback and their discovery documents name it; a test of
        // the egress guard sets this to empty.
        ("VAULT_EGRESS_ALLOW_CIDRS", "127.0.0.0/8,::1/128"),
        // Spare agent schemas are DDL in the background, tens of milliseconds each: hundreds of
        // test databases would pay for them. The tests of spares ask for them.
        ("VAULT_DATABASE_SPARE_SCHEMAS", "0"),
    ];
    for (key, value) in extra {
        pairs.retain(|(k, _)| k != key);
        pairs.push((key, value));
    }
    pairs
}

pub async fn try_spawn(
    db: &TestDb,
    issuer: &Issuer,
    extra: &[(&str, &str)],
) -> anyhow::Result<TestApp> {
    try_spawn_on(db, issuer, extra, None).await
}

/// Starts a vault on `listener` (bound by the test, which never lets go of its port), or on a
/// port of its own when `None`.
pub async fn try_spawn_on(
    db: &TestDb,
    issuer: &Issuer,
    extra: &[(&str, &str)],
    listener: Option<tokio::net::TcpListener>,
) -> anyhow::Result<TestApp> {
    try_spawn_listeners(db, issuer, extra, listener, None).await
}

/// Starts a vault on the given gRPC and consent-callback listeners (each bound by the test), or
/// on ports of its own when `None`.
pub async fn try_spawn_listeners(
    db: &TestDb,
    issuer: &Issuer,
    extra: &[(&str, &str)],
    listener: Option<tokio::net::TcpListener>,
    callback: Option<tokio::net::TcpListener>,
) -> anyhow::Result<TestApp> {
    let settings = Settings::load(&Source::from_pairs(settings_pairs(db, issuer, extra)))?;
    let app = Application::build_on_listeners(settings, listener, callback).await?;
    let addr = app.local_addr();
    let callback = app.callback_addr();
    let (tx, rx) = oneshot::channel();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    Ok(TestApp {
        addr,
        callback,
        shutdown: Some(tx),
        handle: Some(handle),
    })
}

pub async fn spawn(db: &TestDb, issuer: &Issuer) -> TestApp {
    spawn_with(db, issuer, &[]).await
}

pub async fn spawn_with(db: &TestDb, issuer: &Issuer, extra: &[(&str, &str)]) -> TestApp {
    try_spawn(db, issuer, extra).await.expect("vault starts")
}

/// A client for the vault at `endpoint`, calling with `token`.
pub async fn client_at(endpoint: String, token: &str) -> vault_client::Client {
    vault_client::Client::connect(endpoint)
        .await
        .unwrap()
        .with_bearer(token)
        .unwrap()
}

impl TestApp {
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client calling with `token`.
    pub async fn client_with(&self, token: &str) -> vault_client::Client {
        client_at(self.endpoint(), token).await
    }

    /// A client for `agent` acting for `user`, allowed to store ([`Issuer::token`]).
    pub async fn client(&self, issuer: &Issuer, agent: &str, user: &str) -> vault_client::Client {
        self.client_with(&issuer.token(agent, user)).await
    }

    pub async fn admin(&self, issuer: &Issuer, agent: &str, user: &str) -> vault_client::Client {
        self.client_with(&issuer.admin_token(agent, user)).await
    }

    /// Stops the server and waits for it to finish draining.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A plain channel, for the health and reflection clients.
pub async fn channel(endpoint: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Another agent's user, for an admin's revoke.
pub fn owner(agent: &str, user: &str) -> vault_client::Owner {
    vault_client::Owner {
        agent_id: Some(agent.into()),
        user_id: Some(user.into()),
    }
}

/// A token set as a gateway would store it.
pub fn oauth_token(access: &str, refresh: &str, expires_in: i64) -> vault_client::TokenSet {
    vault_client::TokenSet {
        access_token: access.into(),
        refresh_token: (!refresh.is_empty()).then(|| refresh.into()),
        token_type: "Bearer".into(),
        expires_at: Some(UNIX_EPOCH + Duration::from_secs((now() + expires_in) as u64)),
        scopes: vec!["read:jira-work".into(), "offline_access".into()],
    }
}

/// The vault-server binary as a child process.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr_lines: Arc<Mutex<Vec<String>>>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_vault-server")
}

/// Runs `vault-server serve` with exactly `pairs` as its environment (plus PATH), learns the
/// port it bound from its first log line, and waits until its health check reports SERVING.
pub async fn start_binary(pairs: &[(&str, &str)]) -> ServerProcess {
    let mut command = Command::new(binary());
    command
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in pairs {
        command.env(k, v);
    }
    let mut child = command.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = oneshot::channel();
    let sink = Arc::clone(&lines);
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("credential vault listening") {
                let addr = line
                    .split("local_addr=")
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .map(str::to_owned);
                if let (Some(tx), Some(addr)) = (tx.take(), addr) {
                    let _ = tx.send(addr);
                }
            }
            sink.lock().unwrap().push(line);
        }
    });
    let addr = match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(addr)) => addr,
        _ => panic!("server did not start: {:?}", lines.lock().unwrap()),
    };
    let server = ServerProcess {
        child,
        addr: addr.parse().unwrap(),
        stderr_lines: lines,
    };
    let endpoint = server.endpoint();
    eventually("vault-server reports SERVING", || is_serving(&endpoint)).await;
    server
}

/// Runs the binary and waits for it to exit on its own; returns (success, stderr).
pub fn run_binary_to_exit(args: &[&str], pairs: &[(&str, &str)]) -> (bool, String) {
    let mut command = Command::new(binary());
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in pairs {
        command.env(k, v);
    }
    let output = command.output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

impl ServerProcess {
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client calling this process with `token`.
    pub async fn client_with(&self, token: &str) -> vault_client::Client {
        client_at(self.endpoint(), token).await
    }

    /// SIGTERM, then the exit status. The wait runs on a blocking thread, so the calling
    /// runtime keeps serving whatever the server talks to while it drains (a collector, say).
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        tokio::task::spawn_blocking(move || self.wait_exit(Duration::from_secs(20)))
            .await
            .unwrap()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `limit` for exit.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "server did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it holds, and fails the test naming `what` after 20 s. Tests wait for a
/// condition, never for a guessed time.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Moves the times the vault keeps in its agent schemas in `db` (vault TTLs, refresh backoffs
/// and leases, the outbox's schedule and ages), the agents' next sweeps, and its consent flows'
/// expiries and ages `by` into the past: what the passing of that much time does to them,
/// without waiting for it. The vault reads these against the database clock, so it sees the
/// same as if the time had passed. Not moved: `vault.leases` and the access token's own
/// expiry, which is sealed inside the credential.
pub async fn fast_forward(db: &TestDb, by: Duration) {
    let mut conn = db.connect().await;
    let schemas: Vec<String> = sqlx::query_scalar("SELECT schema_name FROM vault.agents")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let by = format!("{} milliseconds", by.as_millis());
    sqlx::raw_sql(&format!(
        "UPDATE vault.authorization_flows SET
             expires_at = expires_at - interval '{by}',
             created_at = created_at - interval '{by}'"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    // The sweep's schedule moves with the TTLs it follows.
    sqlx::raw_sql(&format!(
        "UPDATE vault.agents SET sweep_due = sweep_due - interval '{by}'"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    for schema in schemas {
        sqlx::raw_sql(&format!(
            "UPDATE \"{schema}\".credentials SET
                 ttl_expires_at = ttl_expires_at - interval '{by}',
                 refresh_not_before = refresh_not_before - interval '{by}',
                 refresh_lease_until = refresh_lease_until - interval '{by}';
             UPDATE \"{schema}\".revocation_outbox SET
                 next_attempt_at = next_attempt_at - interval '{by}',
                 lease_until = lease_until - interval '{by}',
                 created_at = created_at - interval '{by}'"
        ))
        .execute(&mut conn)
        .await
        .unwrap();
    }
}

/// Whether the vault at `endpoint` answers its health check with SERVING for the vault service.
pub async fn is_serving(endpoint: &str) -> bool {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let Ok(channel) = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .connect()
        .await
    else {
        return false;
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "vault.v1.CredentialVault".into(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
}

/// Stores `access` for `tool` through `vault` (with refresh token `rt`, expiring in an hour,
/// at the default vault TTL).
pub async fn store(vault: &vault_client::Client, tool: &str, access: &str) -> vault_client::Stored {
    vault
        .store_token(tool, oauth_token(access, "rt", 3600), None)
        .await
        .unwrap()
}

/// Stores `access` for `tool` through `vault`, then checks that GetToken hands it back.
pub async fn store_and_read_back(vault: &vault_client::Client, tool: &str, access: &str) {
    store(vault, tool, access).await;
    assert_eq!(access_token(vault, tool).await, access);
}

/// The access token GetToken hands `vault` for `tool` now (the call must succeed).
pub async fn access_token(vault: &vault_client::Client, tool: &str) -> String {
    vault
        .get_token(tool, Duration::ZERO)
        .await
        .unwrap()
        .access_token
}
