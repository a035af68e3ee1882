//! A real OAuth2 authorization server for the refresh and revocation tests: panva's
//! `oidc-provider` (tests/oidc/provider.mjs) over TLS, with a CA and leaf certificate made here
//! at test time. Its `/test/*` endpoints mint tokens through a real authorization-code + PKCE
//! flow, count the calls that reach it, and inject failures. Its login and consent pages are
//! real HTML forms, driven by `crate::browser::Browser`.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde::Deserialize;
use serde_json::{Value, json};

/// A test CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, as
/// PEM files.
pub struct TestPki {
    _dir: tempfile::TempDir,
    pub ca_path: PathBuf,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub ca_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

impl TestPki {
    pub fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "credential vault test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_params(&ca_params, &ca_key);

        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf_params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf_params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        client_params
            .distinguished_name
            .push(DnType::CommonName, "gateway");
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = client_params.signed_by(&client_key, &issuer).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let ca_pem = ca_cert.pem();
        Self {
            ca_path: write("ca.pem", &ca_pem),
            cert_path: write("leaf.pem", &leaf.pem()),
            key_path: write("leaf.key", &leaf_key.serialize_pem()),
            ca_pem,
            client_cert_pem: client.pem(),
            client_key_pem: client_key.serialize_pem(),
            _dir: dir,
        }
    }

    /// An HTTPS client trusting only this CA.
    pub fn client(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap();
        reqwest::Client::builder()
            .tls_certs_only([ca])
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }
}

fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/oidc")
}

/// Installs the provider's npm packages from the committed lockfile, once per test run, so
/// `cargo test` works on a fresh clone.
fn ensure_npm_packages() {
    static INSTALLED: OnceLock<Mutex<bool>> = OnceLock::new();
    let mut done = INSTALLED.get_or_init(|| Mutex::new(false)).lock().unwrap();
    if *done {
        return;
    }
    let dir = oidc_dir();
    if !dir.join("node_modules/oidc-provider/package.json").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .expect("npm is installed");
        assert!(status.success(), "npm ci in tests/oidc failed");
    }
    *done = true;
}

/// What the provider prints when it is ready.
#[derive(Debug, Clone, Deserialize)]
pub struct Ready {
    pub issuer: String,
    pub token_endpoint: String,
    pub revocation_endpoint: String,
    pub introspection_endpoint: String,
    pub authorization_endpoint: String,
    /// RFC 7591 dynamic registration; only with `--registration`.
    #[serde(default)]
    pub registration_endpoint: Option<String>,
    pub client_id: String,
    pub client_secret: String,
    /// The vault's caller clients; only with `--caller-tokens`.
    #[serde(default)]
    pub caller_tokens: Option<CallerTokens>,
    pub port: u16,
}

/// With `--caller-tokens`: the vault as a resource server of the provider, and the confidential
/// clients that get client-credentials JWT access tokens for it.
#[derive(Debug, Clone, Deserialize)]
pub struct CallerTokens {
    /// The RFC 8707 resource indicator that names the vault.
    pub resource: String,
    /// The `aud` of those tokens.
    pub audience: String,
    pub agent_claim: String,
    pub clients: Vec<CallerClient>,
}

/// A client-credentials client; `agent_id` is the agent claim its tokens carry, if any.
#[derive(Debug, Clone, Deserialize)]
pub struct CallerClient {
    pub client_id: String,
    pub client_secret: String,
    #[serde(default)]
    pub agent_id: Option<String>,
}

/// Calls that reached the provider, counted on its side.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct Stats {
    pub token_calls: u64,
    pub refresh_calls: u64,
    pub revocation_calls: u64,
    pub introspection_calls: u64,
    /// POSTs to the registration endpoint; always 0 without `--registration`.
    #[serde(default)]
    pub registration_calls: u64,
}

/// Tokens from a real authorization-code + PKCE flow.
#[derive(Debug, Clone, Deserialize)]
pub struct Grant {
    pub access_token: String,
    pub refresh_token: String,
}

/// A running authorization server; killed on drop. State survives restarts in `state_dir`.
pub struct OidcProvider {
    child: Option<Child>,
    pub ready: Ready,
    pub state_dir: PathBuf,
    http: reqwest::Client,
}

impl OidcProvider {
    /// Starts a provider on `port` (0 = any) keeping its state in `state_dir`.
    pub fn start(pki: &TestPki, state_dir: &Path, port: u16, access_ttl: u64) -> Self {
        Self::start_with(pki, state_dir, port, access_ttl, &[])
    }

    /// [`start`](Self::start), also registering `redirect_uris` (e.g. a vault's
    /// `http://127.0.0.1:PORT/api/v1/auth/tool/callback`) for both clients. The provider matches
    /// them exactly, port included.
    pub fn start_with(
        pki: &TestPki,
        state_dir: &Path,
        port: u16,
        access_ttl: u64,
        redirect_uris: &[&str],
    ) -> Self {
        Self::start_with_flags(pki, state_dir, port, access_ttl, redirect_uris, &[])
    }

    /// [`start_with`](Self::start_with), passing `flags` to `provider.mjs` as well: e.g.
    /// `--registration` (RFC 7591) and `--resource` (RFC 8707), as an MCP server's
    /// authorization server needs. See `tests/oidc/README.md`.
    pub fn start_with_flags(
        pki: &TestPki,
        state_dir: &Path,
        port: u16,
        access_ttl: u64,
        redirect_uris: &[&str],
        flags: &[&str],
    ) -> Self {
        ensure_npm_packages();
        let mut command = Command::new("node");
        command
            .arg(oidc_dir().join("provider.mjs"))
            .args(["--port", &port.to_string()]);
        for uri in redirect_uris {
            command.args(["--redirect-uri", uri]);
        }
        command.args(flags);
        command
            // Node trusts the test CA for what the provider fetches itself (a client ID
            // metadata document served by the vault over TLS).
            .env("NODE_EXTRA_CA_CERTS", &pki.ca_path)
            .arg("--cert")
            .arg(&pki.cert_path)
            .arg("--key")
            .arg(&pki.key_path)
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--access-ttl", &access_ttl.to_string()]);
        let (child, ready) = spawn_ready::<Ready>(&mut command, "the provider");
        Self {
            child: Some(child),
            ready,
            state_dir: state_dir.to_path_buf(),
            http: pki.client(),
        }
    }

    pub fn port(&self) -> u16 {
        self.ready.port
    }

    /// Kills the provider (SIGKILL: an outage, not a goodbye).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.ready.issuer)
    }

    async fn post_json(&self, path: &str, body: Value) -> Value {
        let response = self
            .http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        }
    }

    /// Runs a headless authorization-code + PKCE flow for `user`.
    pub async fn authorize(&self, user: &str) -> Grant {
        let value = self
            .post_json("/test/authorize", json!({"user": user, "scope": "openid offline_access read:jira-work", "client_id": self.ready.client_id}))
            .await;
        serde_json::from_value(value).unwrap()
    }

    /// [`authorize`](Self::authorize) with an RFC 8707 `resource`: the access token's audience
    /// is `resource` (the provider must run with `--resource`).
    pub async fn authorize_for(&self, user: &str, resource: &str) -> Grant {
        let value = self
            .post_json(
                "/test/authorize",
                json!({"user": user, "scope": "openid offline_access read:jira-work",
                       "client_id": self.ready.client_id, "resource": resource}),
            )
            .await;
        serde_json::from_value(value).unwrap()
    }

    /// RFC 7591 dynamic registration of `metadata` at the provider's registration endpoint
    /// (the provider must run with `--registration`); returns the HTTP status and body.
    pub async fn register_client(&self, metadata: Value) -> (u16, Value) {
        let endpoint = self
            .ready
            .registration_endpoint
            .as_deref()
            .expect("the provider runs with --registration");
        let response = self
            .http
            .post(endpoint)
            .json(&metadata)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn stats(&self) -> Stats {
        let response = self.http.get(self.url("/test/stats")).send().await.unwrap();
        response.json().await.unwrap()
    }

    pub async fn reset_stats(&self) {
        self.post_json("/test/reset-stats", json!({})).await;
    }

    /// Deletes the dynamically registered client `client_id`: the provider answers
    /// `invalid_client` to it from then on.
    pub async fn delete_client(&self, client_id: &str) {
        self.post_json("/test/clients/delete", json!({ "client_id": client_id }))
            .await;
    }

    /// The next `count` token-endpoint calls fail with `mode` (`500`, `429`, `timeout`).
    pub async fn fail_next(&self, mode: &str, count: u32) {
        self.post_json("/test/fail", json!({"mode": mode, "count": count}))
            .await;
    }

    fn form(pairs: &[(&str, &str)]) -> String {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs {
            form.append_pair(k, v);
        }
        form.finish()
    }

    async fn client_post(&self, url: &str, pairs: &[(&str, &str)]) -> reqwest::Response {
        self.http
            .post(url)
            .basic_auth(&self.ready.client_id, Some(&self.ready.client_secret))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Self::form(pairs))
            .send()
            .await
            .unwrap()
    }

    /// RFC 7662 introspection of `token` as client `vault-test`: the provider's JSON answer
    /// (`active`, and for an active token `sub`, `client_id`, `scope`, `exp`, ...). Counted in
    /// [`stats`](Self::stats) like any introspection.
    pub async fn introspect(&self, token: &str) -> Value {
        let response = self
            .client_post(&self.ready.introspection_endpoint, &[("token", token)])
            .await;
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(status.is_success(), "introspection: {status} {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("introspection {text:?}: {e}"))
    }

    /// RFC 7662 introspection: is `token` active?
    pub async fn is_active(&self, token: &str) -> bool {
        self.introspect(token).await["active"]
            .as_bool()
            .unwrap_or(false)
    }

    /// Revokes `token` directly at the provider, as a user or admin would.
    pub async fn revoke_directly(&self, token: &str, hint: &str) {
        let response = self
            .client_post(
                &self.ready.revocation_endpoint,
                &[("token", token), ("token_type_hint", hint)],
            )
            .await;
        assert!(response.status().is_success(), "{}", response.status());
    }

    /// An authorization-code grant made directly as client `vault-test`, as the vault would
    /// after its callback; returns the HTTP status and body.
    pub async fn exchange_code(
        &self,
        code: &str,
        redirect_uri: &str,
        code_verifier: &str,
    ) -> (u16, Value) {
        let response = self
            .client_post(
                &self.ready.token_endpoint,
                &[
                    ("grant_type", "authorization_code"),
                    ("code", code),
                    ("redirect_uri", redirect_uri),
                    ("code_verifier", code_verifier),
                ],
            )
            .await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A refresh grant made directly; returns the HTTP status and body.
    pub async fn refresh_directly(&self, refresh_token: &str) -> (u16, Value) {
        let response = self
            .client_post(
                &self.ready.token_endpoint,
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh_token),
                ],
            )
            .await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A providers file for the vault naming this provider: `jira` through RFC 8414/OIDC discovery
/// with basic auth, `confluence` through explicit URLs.
pub fn providers_file(dir: &Path, ready: &Ready) -> PathBuf {
    let secret = dir.join("client-secret");
    std::fs::write(&secret, format!("{}\n", ready.client_secret)).unwrap();
    let toml = format!(
        r#"
[tools.jira]
issuer = "{issuer}"
client_id = "{client_id}"
client_secret_file = "{secret}"
auth_style = "basic"
scopes = ["openid", "offline_access", "read:jira-work"]

[tools.confluence]
token_url = "{token}"
revocation_url = "{revocation}"
client_id = "{client_id}"
client_secret_file = "{secret}"
"#,
        issuer = ready.issuer,
        client_id = ready.client_id,
        secret = secret.display(),
        token = ready.token_endpoint,
        revocation = ready.revocation_endpoint,
    );
    let path = dir.join("providers.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// A providers file whose `jira` tool is this provider, by its issuer, as the consent flow
/// uses it: default scopes with `offline_access`, and `prompt=consent`, without which
/// oidc-provider grants no refresh token.
pub fn consent_providers_file(dir: &Path, ready: &Ready) -> PathBuf {
    let secret = dir.join("consent-client-secret");
    std::fs::write(&secret, &ready.client_secret).unwrap();
    let path = dir.join("consent-providers.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[tools.jira]
issuer = "{issuer}"
client_id = "{client_id}"
client_secret_file = "{secret}"
scopes = ["openid", "offline_access", "read:jira-work"]
extra_authorize_params = {{ prompt = "consent" }}
"#,
            issuer = ready.issuer,
            client_id = ready.client_id,
            secret = secret.display(),
        ),
    )
    .unwrap();
    path
}

/// Stores `grant` for `tool` as a gateway would, its access token expiring in `expires_in`
/// seconds (negative: already expired).
pub async fn store_grant(
    vault: &vault_client::Client,
    tool: &str,
    grant: &Grant,
    expires_in: i64,
) -> vault_client::Stored {
    vault
        .store_token(
            tool,
            crate::helpers::oauth_token(&grant.access_token, &grant.refresh_token, expires_in),
            None,
        )
        .await
        .unwrap()
}

/// Spawns a Node test server (`command`, its stderr shown only with `TEST_LOG`) and waits up
/// to a minute for the one JSON line it prints when ready: the child and that line, read.
///
/// A server that has not printed it by then is killed and started once more, and what it wrote
/// to stderr is shown: on a loaded machine a Node start has been seen to stall, and a test peer
/// that did not start is not a finding about the vault. A second miss fails the test with that
/// stderr and the exit status.
pub fn spawn_ready<T: serde::de::DeserializeOwned>(
    command: &mut Command,
    what: &str,
) -> (Child, T) {
    let first = match try_spawn_ready(command, what) {
        Ok(ready) => return ready,
        Err(diagnostics) => diagnostics,
    };
    eprintln!("{what} did not become ready; starting it once more.\n{first}");
    try_spawn_ready(command, what).unwrap_or_else(|second| {
        panic!("{what} did not become ready, twice.\nfirst try: {first}\nsecond try: {second}")
    })
}

/// One start of [`spawn_ready`]: the child and its ready line, or (the child killed) what it
/// said on stderr and how it ended.
fn try_spawn_ready<T: serde::de::DeserializeOwned>(
    command: &mut Command,
    what: &str,
) -> Result<(Child, T), String> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node is installed");
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    // The last lines of stderr, kept for a failure message; echoed when TEST_LOG is set. The
    // thread drains the pipe until the child exits, so the child never blocks on a full pipe.
    let said = std::sync::Arc::new(Mutex::new(std::collections::VecDeque::<String>::new()));
    let echo = std::env::var_os("TEST_LOG").is_some();
    let tail = said.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if echo {
                eprintln!("{line}");
            }
            // A poisoned lock only loses diagnostics.
            if let Ok(mut tail) = tail.lock() {
                if tail.len() == 20 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let outcome = rx.recv_timeout(Duration::from_secs(60));
    let line = match outcome {
        Ok(line) if !line.trim().is_empty() => line,
        _ => {
            let waited = match outcome {
                Ok(_) => "it closed stdout",
                Err(_) => "a minute passed",
            };
            let status = match child.try_wait() {
                Ok(Some(status)) => format!("it exited: {status}"),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    "it was still running and was killed".to_owned()
                }
            };
            let tail = said
                .lock()
                .map(|tail| tail.iter().cloned().collect::<Vec<_>>().join("\n"))
                .unwrap_or_default();
            return Err(format!("{waited}; {status}; stderr:\n{tail}"));
        }
    };
    let ready = serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("bad ready line from {what} {line:?}: {e}"));
    Ok((child, ready))
}
