//! The egress guard, end to end: a discovered endpoint on loopback is refused without a
//! connection unless `VAULT_EGRESS_ALLOW_CIDRS` allows it, redirects are never followed, and
//! responses are bounded in size and time. Every server here listens on 127.0.0.1.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vault_client::Error;

use crate::helpers::*;
use crate::provider::*;

/// What the test server answers on one path.
#[derive(Clone)]
enum Reply {
    /// A whole response, written at once.
    Full(Arc<Vec<u8>>),
    /// Headers promising a large body, then one byte every 100 ms until the peer leaves.
    Dribble,
}

fn response(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    Reply::Full(Arc::new(bytes))
}

/// A tiny HTTP/1.1 server on 127.0.0.1 that counts requests per path and answers from a table
/// the test may change; counts how many dribbled connections the client cut off.
struct TinyServer {
    port: u16,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    routes: Arc<Mutex<HashMap<String, Reply>>>,
    cut_off: Arc<AtomicUsize>,
}

impl TinyServer {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Self {
            port: listener.local_addr().unwrap().port(),
            hits: Arc::default(),
            routes: Arc::default(),
            cut_off: Arc::default(),
        };
        let (hits, routes, cut_off) = (
            server.hits.clone(),
            server.routes.clone(),
            server.cut_off.clone(),
        );
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (hits, routes, cut_off) = (hits.clone(), routes.clone(), cut_off.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head);
                    let path = text.split(' ').nth(1).unwrap_or("").to_string();
                    *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
                    let reply = routes.lock().unwrap().get(&path).cloned();
                    match reply {
                        Some(Reply::Full(bytes)) => {
                            let _ = stream.write_all(&bytes).await;
                        }
                        Some(Reply::Dribble) => {
                            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{";
                            if stream.write_all(head.as_bytes()).await.is_err() {
                                return;
                            }
                            // The server's pace, not the test's synchronisation.
                            loop {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                if stream.write_all(b" ").await.is_err() {
                                    cut_off.fetch_add(1, Ordering::SeqCst);
                                    return;
                                }
                            }
                        }
                        None => {
                            let _ = stream
                                .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                                .await;
                        }
                    }
                });
            }
        });
        server
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn route(&self, path: &str, reply: Reply) {
        self.routes.lock().unwrap().insert(path.into(), reply);
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// A discovery document for this server as issuer, padded to `size` bytes.
    fn discovery(&self, size: usize) -> Reply {
        let head = format!(
            r#"{{"issuer":"{}","token_endpoint":"https://127.0.0.1:{}/token","padding":""#,
            self.url(),
            self.port
        );
        let mut body = head.into_bytes();
        body.resize(size.saturating_sub(2).max(body.len()), b'x');
        body.extend_from_slice(b"\"}");
        response("200 OK", &[("Content-Type", "application/json")], &body)
    }
}

fn write_providers(dir: &Path, tool_lines: &str) -> String {
    let path = dir.join(format!("providers-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(
        &path,
        format!("[tools.jira]\n{tool_lines}\nclient_id = \"vault\"\nclient_secret = \"s3cret\"\n"),
    )
    .unwrap();
    path.display().to_string()
}

const TOKEN_RESPONSE: &[u8] =
    br#"{"access_token":"fresh-at","token_type":"Bearer","expires_in":3600}"#;

#[tokio::test]
async fn a_discovered_token_endpoint_on_loopback_is_refused_unless_allowed() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("provider-state");
    std::fs::create_dir_all(&state).unwrap();
    let provider = OidcProvider::start(&pki, &state, 0, 3600);
    // Configured by issuer: the token endpoint comes from the discovery document, and it names
    // https://127.0.0.1:PORT/token.
    let providers = dir.path().join("providers.toml").display().to_string();
    std::fs::write(
        &providers,
        format!(
            "[tools.jira]\nissuer = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\n",
            provider.ready.issuer, provider.ready.client_id, provider.ready.client_secret
        ),
    )
    .unwrap();
    let ca = pki.ca_path.display().to_string();
    let settings = |allow: &'static str| {
        vec![
            ("VAULT_PROVIDERS_FILE", providers.clone()),
            ("VAULT_PROVIDER_CA_FILE", ca.clone()),
            ("VAULT_REFRESH_COOLDOWN_SECONDS", "0".into()),
            ("VAULT_EGRESS_ALLOW_CIDRS", allow.into()),
        ]
    };

    // Unset: loopback is refused for derived URLs. The server runs as its own process, so
    // that its refusal counter reaches a collector.
    let (collector, otlp) = crate::telemetry::Collector::start().await;
    let mut refusing = settings("");
    refusing.push(("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.clone()));
    let refusing: Vec<(&str, &str)> = refusing.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = start_binary(&settings_pairs(&db, &issuer, &refusing)).await;
    let grant = provider.authorize("alice").await;
    let vault = app.client_with(&issuer.token("agent-a", "alice")).await;
    store_grant(&vault, "jira", &grant, -60).await;
    provider.reset_stats().await;

    let refused = vault.refresh("jira", None).await;
    let Err(Error::ProviderUnavailable(message)) = refused else {
        panic!("expected PROVIDER_UNAVAILABLE, got {refused:?}");
    };
    assert!(message.contains("jira"), "{message}");
    assert!(
        message.contains("address 127.0.0.1 is loopback"),
        "{message}"
    );
    let stats = provider.stats().await;
    assert_eq!(
        (stats.token_calls, stats.refresh_calls),
        (0, 0),
        "no token call reached the provider"
    );
    drop(vault);
    // SIGTERM flushes the last metric points.
    assert!(app.terminate().await.success());
    let refusals = collector.counter("vault.egress.refusals", "rule");
    assert!(
        refusals.get("loopback").is_some_and(|n| *n >= 1),
        "{refusals:?}"
    );
    assert_eq!(refusals.len(), 1, "{refusals:?}");

    // Allowed: the same flow succeeds (bob: alice's credential is in backoff now).
    let allowing = settings("127.0.0.0/8");
    let allowing: Vec<(&str, &str)> = allowing.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_with(&db, &issuer, &allowing).await;
    let grant = provider.authorize("bob").await;
    let vault = app.client(&issuer, "agent-a", "bob").await;
    store_grant(&vault, "jira", &grant, -60).await;
    let refreshed = vault.refresh("jira", None).await.unwrap();
    assert!(refreshed.refreshed);
    assert_eq!(provider.stats().await.refresh_calls, 1);
}

/// A vault whose `jira` tool is `tool_lines` on a tiny server, with a short total timeout.
async fn tiny_vault(db: &TestDb, issuer: &Issuer, providers: &str) -> TestApp {
    spawn_with(
        db,
        issuer,
        &[
            ("VAULT_PROVIDERS_FILE", providers),
            ("VAULT_PROVIDER_TIMEOUT_SECONDS", "1"),
            ("VAULT_PROVIDER_CONNECT_TIMEOUT_SECONDS", "1"),
            ("VAULT_REFRESH_COOLDOWN_SECONDS", "0"),
        ],
    )
    .await
}

async fn stored(app: &TestApp, issuer: &Issuer, user: &str) -> vault_client::Client {
    let vault = app.client(issuer, "agent-a", user).await;
    vault
        .store_token("jira", oauth_token("old-at", "old-rt", -60), None)
        .await
        .unwrap();
    vault
}

#[tokio::test]
async fn a_discovery_endpoint_answering_a_redirect_is_not_followed() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let dir = tempfile::tempdir().unwrap();
    let server = TinyServer::start().await;
    let moved = format!("{}/moved", server.url());
    for path in [
        "/.well-known/oauth-authorization-server",
        "/.well-known/openid-configuration",
    ] {
        server.route(path, response("302 Found", &[("Location", &moved)], b""));
    }
    server.route("/moved", server.discovery(100));
    let providers = write_providers(dir.path(), &format!("issuer = \"{}\"", server.url()));
    let app = tiny_vault(&db, &issuer, &providers).await;
    let vault = stored(&app, &issuer, "alice").await;

    let refused = vault.refresh("jira", None).await;

    assert!(
        matches!(refused, Err(Error::ProviderUnavailable(_))),
        "{refused:?}"
    );
    assert!(server.hits("/.well-known/oauth-authorization-server") >= 1);
    assert_eq!(server.hits("/moved"), 0, "the redirect was followed");
}

#[tokio::test]
async fn a_discovery_document_over_one_mebibyte_is_refused() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let dir = tempfile::tempdir().unwrap();
    let server = TinyServer::start().await;
    let discovery = "/.well-known/oauth-authorization-server";
    server.route(discovery, server.discovery(2 * 1024 * 1024));
    server.route(
        "/token",
        response(
            "200 OK",
            &[("Content-Type", "application/json")],
            TOKEN_RESPONSE,
        ),
    );
    // The token endpoint is configured, so only the document's size decides.
    let providers = write_providers(
        dir.path(),
        &format!("issuer = \"{0}\"\ntoken_url = \"{0}/token\"", server.url()),
    );
    let app = tiny_vault(&db, &issuer, &providers).await;
    let alice = stored(&app, &issuer, "alice").await;

    let refused = alice.refresh("jira", None).await;
    assert!(
        matches!(refused, Err(Error::ProviderUnavailable(_))),
        "{refused:?}"
    );
    assert!(server.hits(discovery) >= 1);
    assert_eq!(server.hits("/token"), 0);

    // The control: the same document at half a mebibyte is read and the refresh goes through
    // (bob: alice's credential is in backoff).
    server.route(discovery, server.discovery(512 * 1024));
    let bob = stored(&app, &issuer, "bob").await;
    let refreshed = bob.refresh("jira", None).await.unwrap();
    assert!(refreshed.refreshed);
    assert_eq!(server.hits("/token"), 1);
}

#[tokio::test]
async fn a_token_endpoint_dribbling_its_body_is_cut_off_at_the_total_timeout() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let dir = tempfile::tempdir().unwrap();
    let server = TinyServer::start().await;
    server.route("/token", Reply::Dribble);
    let providers = write_providers(
        dir.path(),
        &format!("token_url = \"{}/token\"", server.url()),
    );
    let app = tiny_vault(&db, &issuer, &providers).await;
    let vault = stored(&app, &issuer, "alice").await;

    let started = Instant::now();
    let refused = vault.refresh("jira", None).await;

    let Err(Error::ProviderUnavailable(message)) = refused else {
        panic!("expected PROVIDER_UNAVAILABLE, got {refused:?}");
    };
    assert!(message.contains("did not answer in time"), "{message}");
    // The body would take 10 000 s at the server's pace; the total timeout is 1 s.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let cut_off = &server.cut_off;
    eventually("the vault closes the dribbling connection", || async {
        cut_off.load(Ordering::SeqCst) > 0
    })
    .await;
}

/// No module but the HTTP client builds a `reqwest::Client`, so none can skip its policy.
#[test]
fn only_the_http_module_builds_a_reqwest_client() {
    fn walk(dir: &Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for needle in [
                    "reqwest::Client::builder",
                    "reqwest::Client::new",
                    "ClientBuilder",
                ] {
                    if text.contains(needle) {
                        found.push(format!("{} ({needle})", path.display()));
                    }
                }
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    walk(&src, &mut found);
    let http = src.join("http.rs").display().to_string();
    let elsewhere: Vec<_> = found.iter().filter(|f| !f.starts_with(&http)).collect();
    assert!(elsewhere.is_empty(), "built outside http.rs: {elsewhere:?}");
    assert!(
        found.iter().any(|f| f.starts_with(&http)),
        "the scan did not find http.rs's own client"
    );
}
