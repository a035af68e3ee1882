//! A real MCP server (the official TypeScript SDK, `tests/mcp/server.mjs`) protected by the test
//! oidc-provider, as the remote tool of issue 13: RFC 9728 metadata naming the provider, `401`
//! challenges pointing at it, and bearer tokens checked by introspection with their audience.
//! Also the self-tests proving the harness (and the provider's `--registration` and
//! `--resource`) behave as the vault's MCP tests will assume.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::provider::{OidcProvider, Ready, TestPki, spawn_ready};

fn mcp_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/mcp")
}

/// Installs the MCP server's npm packages from the committed lockfile, once per test run, so
/// `cargo test` works on a fresh clone.
fn ensure_npm_packages() {
    static INSTALLED: OnceLock<Mutex<bool>> = OnceLock::new();
    let mut done = INSTALLED.get_or_init(|| Mutex::new(false)).lock().unwrap();
    if *done {
        return;
    }
    let dir = mcp_dir();
    if !dir
        .join("node_modules/@modelcontextprotocol/sdk/package.json")
        .exists()
    {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .expect("npm is installed");
        assert!(status.success(), "npm ci in tests/mcp failed");
    }
    *done = true;
}

/// What the MCP server prints when it is ready.
#[derive(Debug, Clone, Deserialize)]
pub struct McpReady {
    /// The MCP endpoint, which is also the resource (RFC 8707) its tokens must be for.
    pub url: String,
    pub port: u16,
    /// Its RFC 9728 metadata URL, as named in its `401` challenges.
    pub resource_metadata: String,
}

/// A running MCP server; killed on drop.
pub struct McpServer {
    child: Option<Child>,
    pub ready: McpReady,
    http: reqwest::Client,
}

impl McpServer {
    /// Starts the server on a free port with `issuer` as its authorization server, checking
    /// tokens by introspection as `issuer`'s client `vault-test`. `extra_args` go to
    /// `server.mjs` as they are (e.g. `["--as-override", URL]`; see `tests/mcp/README.md`).
    pub fn start(pki: &TestPki, issuer: &Ready, extra_args: &[&str]) -> Self {
        Self::start_on(pki, issuer, 0, extra_args)
    }

    /// [`start`](Self::start) on `port` (0: a free one), e.g. to replace a server at the same
    /// URL.
    pub fn start_on(pki: &TestPki, issuer: &Ready, port: u16, extra_args: &[&str]) -> Self {
        ensure_npm_packages();
        let port = port.to_string();
        let mut command = Command::new("node");
        command
            .arg(mcp_dir().join("server.mjs"))
            .args(["--port", &port, "--issuer", &issuer.issuer])
            .args(["--introspection-client-id", &issuer.client_id])
            .args(["--introspection-client-secret", &issuer.client_secret])
            .arg("--cert")
            .arg(&pki.cert_path)
            .arg("--key")
            .arg(&pki.key_path)
            .arg("--ca")
            .arg(&pki.ca_path)
            .args(extra_args);
        let (child, ready) = spawn_ready::<McpReady>(&mut command, "the MCP server");
        Self {
            child: Some(child),
            ready,
            http: pki.client(),
        }
    }

    /// `https://127.0.0.1:PORT` + `path`.
    pub fn origin_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.ready.port)
    }

    /// Requests received per path (`/mcp`, the metadata paths, ...) and `refused` (tokens
    /// refused after introspection). A path never requested is absent.
    pub async fn stats(&self) -> Value {
        let response = self
            .http
            .get(self.origin_url("/test/stats"))
            .send()
            .await
            .unwrap();
        response.json().await.unwrap()
    }

    /// `tools/call whoami` as plain JSON-RPC over Streamable HTTP with `access_token` as the
    /// bearer: the tool's answer `{sub, scope, aud}`, or the HTTP status and body of a
    /// refusal (a JSON-RPC error is reported with status 200).
    pub async fn call_whoami(&self, access_token: &str) -> Result<Value, (u16, String)> {
        // The server is stateless, so a tools/call needs no initialize first.
        let response = self
            .http
            .post(&self.ready.url)
            .bearer_auth(access_token)
            .header("accept", "application/json, text/event-stream")
            .json(&json!({
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": "whoami", "arguments": {}},
            }))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let event_stream = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let text = response.text().await.unwrap();
        if status != 200 {
            return Err((status, text));
        }
        let message = if event_stream {
            // One response event; its data lines joined (SSE may split a payload).
            text.lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(str::trim_start)
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            text.clone()
        };
        let message: Value = serde_json::from_str(&message)
            .unwrap_or_else(|e| panic!("not JSON-RPC: {text:?}: {e}"));
        if message.get("error").is_some() || message["result"]["isError"] == true {
            return Err((status, text));
        }
        let answer = message["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_else(|| panic!("no text content: {text}"));
        Ok(serde_json::from_str(answer).unwrap())
    }
}

impl McpServer {
    /// Kills the server now (its port is free when this returns).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for McpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A provider with registration and resource indicators, and an MCP server it protects.
struct World {
    pki: TestPki,
    _dir: tempfile::TempDir,
    provider: OidcProvider,
    mcp: McpServer,
}

impl World {
    fn new() -> Self {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().unwrap();
        let provider = OidcProvider::start_with_flags(
            &pki,
            dir.path(),
            0,
            3600,
            &[],
            &["--registration", "--resource"],
        );
        let mcp = McpServer::start(&pki, &provider.ready, &[]);
        Self {
            pki,
            _dir: dir,
            provider,
            mcp,
        }
    }
}

#[tokio::test]
async fn mcp_without_a_token_is_challenged_with_metadata_naming_the_provider() {
    let w = World::new();
    let http = w.pki.client();

    let response = http
        .post(&w.mcp.ready.url)
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status().as_u16(), 401);
    let challenge = response.headers()["www-authenticate"].to_str().unwrap();
    assert_eq!(
        challenge,
        format!(
            r#"Bearer resource_metadata="{}""#,
            w.mcp.ready.resource_metadata
        )
    );
    assert_eq!(
        w.mcp.ready.resource_metadata,
        w.mcp
            .origin_url("/.well-known/oauth-protected-resource/mcp")
    );
    for url in [
        w.mcp.ready.resource_metadata.clone(),
        w.mcp.origin_url("/.well-known/oauth-protected-resource"),
    ] {
        let metadata: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
        assert_eq!(metadata["resource"], w.mcp.ready.url.as_str(), "{url}");
        assert_eq!(
            metadata["authorization_servers"],
            json!([w.provider.ready.issuer]),
            "{url}"
        );
        assert_eq!(metadata["bearer_methods_supported"], json!(["header"]));
    }
    let stats = w.mcp.stats().await;
    assert_eq!(stats["/mcp"], 1, "{stats}");
    assert_eq!(
        w.provider.stats().await.introspection_calls,
        0,
        "no token, no introspection"
    );
}

#[tokio::test]
async fn mcp_whoami_answers_with_the_user_of_a_token_for_its_resource() {
    let w = World::new();
    let grant = w.provider.authorize_for("alice", &w.mcp.ready.url).await;

    let answer = w.mcp.call_whoami(&grant.access_token).await.unwrap();

    assert_eq!(answer["sub"], "alice", "{answer}");
    assert_eq!(answer["aud"], w.mcp.ready.url.as_str(), "{answer}");
    let scope = answer["scope"].as_str().unwrap();
    assert!(scope.split(' ').any(|s| s == "read:jira-work"), "{answer}");
    // Refreshed tokens keep the resource (useGrantedResource).
    let (status, refreshed) = w.provider.refresh_directly(&grant.refresh_token).await;
    assert_eq!(status, 200, "{refreshed}");
    let answer = w
        .mcp
        .call_whoami(refreshed["access_token"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(answer["sub"], "alice", "{answer}");
}

#[tokio::test]
async fn mcp_refuses_a_token_minted_without_its_resource() {
    let w = World::new();
    let grant = w.provider.authorize("alice").await;

    let (status, body) = w.mcp.call_whoami(&grant.access_token).await.unwrap_err();

    assert_eq!(status, 401, "{body}");
    assert_eq!(w.mcp.stats().await["refused"], 1);
    let other = w
        .provider
        .authorize_for("alice", "https://127.0.0.1:9/other")
        .await;
    let (status, body) = w.mcp.call_whoami(&other.access_token).await.unwrap_err();
    assert_eq!(status, 401, "a token for another resource: {body}");
}

#[tokio::test]
async fn provider_registers_clients_dynamically_and_counts_them() {
    let w = World::new();
    let discovery: Value = w
        .pki
        .client()
        .get(format!(
            "{}/.well-known/openid-configuration",
            w.provider.ready.issuer
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        discovery["registration_endpoint"].as_str(),
        w.provider.ready.registration_endpoint.as_deref()
    );

    let (status, client) = w
        .provider
        .register_client(json!({
            "redirect_uris": ["http://127.0.0.1:9/api/v1/auth/tool/callback"],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "client_secret_basic",
            "client_name": "credential vault",
        }))
        .await;

    assert_eq!(status, 201, "{client}");
    assert!(
        client["client_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{client}"
    );
    assert!(client["client_secret"].is_string(), "{client}");
    assert_eq!(w.provider.stats().await.registration_calls, 1);
    assert_eq!(
        w.mcp.stats().await.get("/mcp"),
        None,
        "registration touches only the provider"
    );
}
