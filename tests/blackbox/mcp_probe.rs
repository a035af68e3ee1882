//! MCP authorization discovery against canned peers over TLS: an MCP server's `401`, its
//! protected-resource metadata and its authorization server's metadata, served by a tiny HTTPS
//! server on 127.0.0.1 with the test CA. `discover` runs through a real `Outbound`, and
//! `vault-server mcp-probe` as the built binary. Every request goes to 127.0.0.1.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vault_server::egress::EgressPolicy;
use vault_server::http::{HttpSettings, Outbound};
use vault_server::oauth::mcp::{DiscoveryError, discover};

use crate::helpers::binary;
use crate::provider::TestPki;

fn response(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Arc<Vec<u8>> {
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    Arc::new(bytes)
}

fn json_response(document: &Value) -> Arc<Vec<u8>> {
    response(
        "200 OK",
        &[("Content-Type", "application/json")],
        document.to_string().as_bytes(),
    )
}

/// An HTTPS server on 127.0.0.1 answering each path from a table (404 otherwise) and counting
/// the requests per path.
struct CannedServer {
    port: u16,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    routes: Arc<Mutex<HashMap<String, Arc<Vec<u8>>>>>,
}

impl CannedServer {
    async fn start(pki: &TestPki) -> Self {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(&pki.cert_path)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&pki.key_path).unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Self {
            port: listener.local_addr().unwrap().port(),
            hits: Arc::default(),
            routes: Arc::default(),
        };
        let (hits, routes) = (server.hits.clone(), server.routes.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (hits, routes, acceptor) = (hits.clone(), routes.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let Ok(mut stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    let end = loop {
                        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    };
                    let text = String::from_utf8_lossy(&head[..end]).to_string();
                    // Read the body too, so closing does not reset the connection under the
                    // client before it has read the answer.
                    let length: usize = text
                        .lines()
                        .find_map(|line| {
                            let (name, value) = line.split_once(':')?;
                            name.eq_ignore_ascii_case("content-length")
                                .then(|| value.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    let mut body = head.len() - end;
                    while body < length {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => body += n,
                        }
                    }
                    let path = text.split(' ').nth(1).unwrap_or("").to_string();
                    *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
                    let reply = routes.lock().unwrap().get(&path).cloned();
                    let reply = reply.unwrap_or_else(|| response("404 Not Found", &[], b""));
                    if reply.is_empty() {
                        // A server that never answers: hold the connection until the client
                        // gives up.
                        let _ = stream.read(&mut buf).await;
                        return;
                    }
                    let _ = stream.write_all(&reply).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        server
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    fn route(&self, path: &str, reply: Arc<Vec<u8>>) {
        self.routes.lock().unwrap().insert(path.to_string(), reply);
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// A well-behaved MCP server at `/mcp` whose authorization server is `/as` on the same port.
    fn serve_good(&self) {
        let challenge = format!(
            r#"Bearer resource_metadata="{}", scope="whoami""#,
            self.url("/.well-known/oauth-protected-resource/mcp")
        );
        self.route(
            "/mcp",
            response("401 Unauthorized", &[("WWW-Authenticate", &challenge)], b""),
        );
        self.route(
            "/.well-known/oauth-protected-resource/mcp",
            json_response(&json!({
                "resource": self.url("/mcp"),
                "authorization_servers": [self.url("/as")],
                "scopes_supported": ["whoami"],
            })),
        );
        self.route(
            "/.well-known/oauth-authorization-server/as",
            json_response(&self.server_metadata(json!({}))),
        );
    }

    /// The authorization server's metadata with `changes` applied (null removes a field).
    fn server_metadata(&self, changes: Value) -> Value {
        let mut document = json!({
            "issuer": self.url("/as"),
            "authorization_endpoint": self.url("/as/authorize"),
            "token_endpoint": self.url("/as/token"),
            "registration_endpoint": self.url("/as/register"),
            "revocation_endpoint": self.url("/as/revoke"),
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
            "authorization_response_iss_parameter_supported": true,
        });
        for (key, value) in changes.as_object().unwrap() {
            if value.is_null() {
                document.as_object_mut().unwrap().remove(key);
            } else {
                document[key] = value.clone();
            }
        }
        document
    }
}

fn outbound(pki: &TestPki, allow: &str) -> Outbound {
    Outbound::new(&HttpSettings {
        ca_file: Some(pki.ca_path.clone()),
        connect_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(10),
        egress: EgressPolicy::parse(allow).unwrap(),
    })
    .unwrap()
}

/// Runs `vault-server mcp-probe` with exactly `pairs` as its environment (plus PATH) on a
/// blocking thread, so this runtime keeps serving the canned server: (exit code, stdout, stderr).
pub(crate) async fn probe(args: &[&str], pairs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = std::process::Command::new(binary());
    command
        .arg("mcp-probe")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in pairs {
        command.env(k, v);
    }
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_conforming_server_is_discovered_through_its_challenge() {
    let pki = TestPki::new();
    let server = CannedServer::start(&pki).await;
    server.serve_good();
    let mcp = url::Url::parse(&server.url("/mcp")).unwrap();

    let found = discover(&outbound(&pki, "127.0.0.0/8"), "jira", &mcp)
        .await
        .unwrap();

    assert_eq!(found.resource, server.url("/mcp"));
    assert_eq!(
        found.resource_metadata_url.as_str(),
        server.url("/.well-known/oauth-protected-resource/mcp")
    );
    assert_eq!(
        found.challenge.and_then(|c| c.scope).as_deref(),
        Some("whoami")
    );
    let meta = &found.authorization_server;
    assert_eq!(meta.issuer, server.url("/as"));
    assert_eq!(meta.token_endpoint.as_str(), server.url("/as/token"));
    assert_eq!(
        meta.authorization_endpoint.as_str(),
        server.url("/as/authorize")
    );
    assert_eq!(
        meta.registration_endpoint.as_ref().map(|u| u.to_string()),
        Some(server.url("/as/register"))
    );
    assert!(meta.authorization_response_iss_parameter_supported);
    // The challenge named the metadata: no well-known URI was guessed.
    assert_eq!(server.hits("/.well-known/oauth-protected-resource"), 0);
    assert_eq!(server.hits("/mcp"), 1);
}

#[tokio::test]
async fn without_a_challenge_url_the_well_known_uris_are_tried_path_first_then_root() {
    let pki = TestPki::new();
    let server = CannedServer::start(&pki).await;
    server.serve_good();
    server.route(
        "/mcp",
        response("401 Unauthorized", &[("WWW-Authenticate", "Bearer")], b""),
    );
    let document = server
        .routes
        .lock()
        .unwrap()
        .remove("/.well-known/oauth-protected-resource/mcp")
        .unwrap();
    server.route("/.well-known/oauth-protected-resource", document);
    let mcp = url::Url::parse(&server.url("/mcp")).unwrap();

    let found = discover(&outbound(&pki, "127.0.0.0/8"), "jira", &mcp)
        .await
        .unwrap();

    assert_eq!(
        found.resource_metadata_url.as_str(),
        server.url("/.well-known/oauth-protected-resource")
    );
    assert_eq!(server.hits("/.well-known/oauth-protected-resource/mcp"), 1);
    assert_eq!(server.hits("/.well-known/oauth-protected-resource"), 1);
}

#[tokio::test]
async fn broken_metadata_is_refused_naming_the_tool_and_the_rule() {
    let pki = TestPki::new();
    let server = CannedServer::start(&pki).await;
    let mcp = url::Url::parse(&server.url("/mcp")).unwrap();
    let http = outbound(&pki, "127.0.0.0/8");
    let other_issuer = server.url("/other");
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"code_challenge_methods_supported": ["plain"]}),
            "code_challenge_methods_supported",
        ),
        (
            json!({"code_challenge_methods_supported": null}),
            "code_challenge_methods_supported",
        ),
        (json!({"issuer": other_issuer}), "RFC 8414 §3.3"),
        (json!({"token_endpoint": null}), "token_endpoint is missing"),
    ];
    for (changes, rule) in cases {
        server.serve_good();
        server.route(
            "/.well-known/oauth-authorization-server/as",
            json_response(&server.server_metadata(changes.clone())),
        );
        let err = discover(&http, "jira", &mcp).await.unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("tool jira: "), "{changes}: {text}");
        assert!(text.contains(rule), "{changes}: {text}");
    }

    // The metadata of another resource, and a plain-http authorization server.
    server.serve_good();
    server.route(
        "/.well-known/oauth-protected-resource/mcp",
        json_response(&json!({
            "resource": server.url("/other-mcp"),
            "authorization_servers": [server.url("/as")],
        })),
    );
    let text = discover(&http, "jira", &mcp).await.unwrap_err().to_string();
    assert!(text.contains("RFC 9728 §3.3"), "{text}");
    server.route(
        "/.well-known/oauth-protected-resource/mcp",
        json_response(&json!({
            "resource": server.url("/mcp"),
            "authorization_servers": [format!("http://127.0.0.1:{}/as", server.port)],
        })),
    );
    let text = discover(&http, "jira", &mcp).await.unwrap_err().to_string();
    assert!(text.contains("authorization_servers"), "{text}");

    // A redirect is named, not followed.
    server.serve_good();
    server.route(
        "/.well-known/oauth-authorization-server/as",
        response("302 Found", &[("Location", &server.url("/elsewhere"))], b""),
    );
    let err = discover(&http, "jira", &mcp).await.unwrap_err();
    assert!(
        matches!(err, DiscoveryError::Redirected { status: 302, .. }),
        "{err}"
    );
    assert_eq!(server.hits("/elsewhere"), 0);
}

#[tokio::test]
async fn a_derived_metadata_url_on_loopback_is_refused_without_a_request() {
    let pki = TestPki::new();
    let server = CannedServer::start(&pki).await;
    server.serve_good();
    // A challenge naming a URL that is not one the vault would compute from the configured
    // one: learned from a response, so derived.
    let challenge = format!(
        r#"Bearer resource_metadata="{}""#,
        server.url("/elsewhere/prm")
    );
    server.route(
        "/mcp",
        response("401 Unauthorized", &[("WWW-Authenticate", &challenge)], b""),
    );
    let mcp = url::Url::parse(&server.url("/mcp")).unwrap();

    let err = discover(&outbound(&pki, ""), "jira", &mcp)
        .await
        .unwrap_err();

    let text = err.to_string();
    assert!(matches!(err, DiscoveryError::Fetch { .. }), "{text}");
    assert!(text.contains("is loopback"), "{text}");
    // The configured MCP URL was called; the URL its answer named was not.
    assert_eq!(server.hits("/mcp"), 1);
    assert_eq!(server.hits("/elsewhere/prm"), 0);
}

#[tokio::test]
async fn the_well_known_metadata_of_the_configured_server_is_as_trusted_as_its_url() {
    let pki = TestPki::new();
    let server = CannedServer::start(&pki).await;
    server.serve_good();
    let mcp = url::Url::parse(&server.url("/mcp")).unwrap();

    // Loopback is not allowed: the protected-resource metadata at the configured server's own
    // well-known URI is read, and the authorization server it names (learned from that
    // answer) is refused without a request.
    let err = discover(&outbound(&pki, ""), "jira", &mcp)
        .await
        .unwrap_err();

    let text = err.to_string();
    assert!(text.contains("authorization server metadata"), "{text}");
    assert!(text.contains("is loopback"), "{text}");
    assert_eq!(server.hits("/.well-known/oauth-protected-resource/mcp"), 1);
    assert_eq!(server.hits("/.well-known/oauth-authorization-server/as"), 0);
}

#[tokio::test]
async fn mcp_probe_prints_the_endpoints_and_exits_non_zero_on_the_first_violation() {
    let pki = TestPki::new();
    let server = CannedServer::start(&pki).await;
    server.serve_good();
    let mcp = server.url("/mcp");
    let ca = pki.ca_path.display().to_string();
    let env = [
        ("VAULT_PROVIDER_CA_FILE", ca.as_str()),
        ("VAULT_EGRESS_ALLOW_CIDRS", "127.0.0.0/8"),
    ];

    let (code, stdout, stderr) = probe(&[&mcp], &env).await;
    assert_eq!(code, Some(0), "{stderr}");
    for line in [
        format!("resource: {mcp}"),
        format!(
            "protected resource metadata: {}",
            server.url("/.well-known/oauth-protected-resource/mcp")
        ),
        format!("authorization server: {}", server.url("/as")),
        format!("authorization_endpoint: {}", server.url("/as/authorize")),
        format!("token_endpoint: {}", server.url("/as/token")),
        format!("registration_endpoint: {}", server.url("/as/register")),
        "registration: dynamic client registration (RFC 7591)".to_string(),
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line} in\n{stdout}");
    }
    assert!(stdout.contains("(S256 supported)"), "{stdout}");

    // --register needs the redirect URI to register, and says so before any request.
    let (code, _, stderr) = probe(&[&mcp, "--register"], &env).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("OAUTH_TOOL_REDIRECT_URI"), "{stderr}");
    assert_eq!(server.hits("/as/register"), 0);

    server.route(
        "/.well-known/oauth-authorization-server/as",
        json_response(&server.server_metadata(json!({"code_challenge_methods_supported": null}))),
    );
    let (code, _, stderr) = probe(&[&mcp, "--tool", "linear"], &env).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("tool linear"), "{stderr}");
    assert!(
        stderr.contains("code_challenge_methods_supported"),
        "{stderr}"
    );

    server.serve_good();
    let hits_before = server.hits("/.well-known/oauth-authorization-server/as");
    let (code, _, stderr) = probe(
        &[&mcp],
        &[
            ("VAULT_PROVIDER_CA_FILE", ca.as_str()),
            ("VAULT_EGRESS_ALLOW_CIDRS", ""),
        ],
    )
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("is loopback"), "{stderr}");
    // The configured server's own metadata is read; the authorization server it names is not.
    assert_eq!(
        server.hits("/.well-known/oauth-authorization-server/as"),
        hits_before
    );
}

/// A vault whose one tool, `jira`, is the canned server's `/mcp`, and a client of it.
struct VaultOf {
    app: crate::helpers::TestApp,
    vault: vault_client::Client,
    _db: crate::helpers::TestDb,
    _dir: tempfile::TempDir,
}

impl VaultOf {
    async fn start(pki: &TestPki, server: &CannedServer, more: &[(&str, &str)]) -> Self {
        use crate::helpers::*;
        let db = TestDb::new().await;
        let issuer = Issuer::new();
        let dir = tempfile::tempdir().unwrap();
        let providers = dir.path().join("providers.toml");
        std::fs::write(
            &providers,
            format!("[tools.jira]\nmcp_server = \"{}\"\n", server.url("/mcp")),
        )
        .unwrap();
        let (providers, ca) = (
            providers.display().to_string(),
            pki.ca_path.display().to_string(),
        );
        let mut settings = vec![
            ("VAULT_PROVIDERS_FILE", providers.as_str()),
            ("VAULT_PROVIDER_CA_FILE", ca.as_str()),
            (
                "OAUTH_TOOL_REDIRECT_URI",
                "http://127.0.0.1:9/api/v1/auth/tool/callback",
            ),
            ("VAULT_OAUTH_RETURN_URLS", "http://127.0.0.1:9/"),
        ];
        settings.extend_from_slice(more);
        let app = spawn_with(&db, &issuer, &settings).await;
        let vault = app.client(&issuer, "agent-a", "alice").await;
        Self {
            app,
            vault,
            _db: db,
            _dir: dir,
        }
    }
}

/// A reply that never comes (see [`CannedServer`]).
fn hang() -> Arc<Vec<u8>> {
    Arc::new(Vec::new())
}

#[tokio::test]
async fn an_mcp_tool_with_bad_metadata_is_refused_clearly_and_the_vault_keeps_serving() {
    use crate::helpers::*;
    let pki = TestPki::new();
    let server = CannedServer::start(&pki).await;
    let vault_of = VaultOf::start(
        &pki,
        &server,
        &[
            ("VAULT_PROVIDER_TIMEOUT_SECONDS", "1"),
            // Every Begin discovers again, so each case is seen.
            ("VAULT_DISCOVERY_TTL_SECONDS", "0"),
        ],
    )
    .await;
    let (app, vault) = (&vault_of.app, &vault_of.vault);
    let metadata = "/.well-known/oauth-authorization-server/as";
    let oversized = format!(
        "{{\"issuer\":\"{}\",\"pad\":\"{}\"}}",
        server.url("/as"),
        "x".repeat(2 * 1024 * 1024)
    );
    // (what is broken, how, the rule the error names)
    type Case<'a> = (&'a str, Box<dyn Fn() + 'a>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "an http authorization server",
            Box::new(|| {
                server.route(
                    "/.well-known/oauth-protected-resource/mcp",
                    json_response(&json!({
                        "resource": server.url("/mcp"),
                        "authorization_servers": [format!("http://127.0.0.1:{}/as", server.port)],
                    })),
                )
            }),
            "is not an https URL",
        ),
        (
            "another issuer",
            Box::new(|| {
                server.route(
                    metadata,
                    json_response(&server.server_metadata(json!({"issuer": server.url("/x")}))),
                )
            }),
            "RFC 8414 §3.3",
        ),
        (
            "a redirect",
            Box::new(|| {
                server.route(
                    metadata,
                    response(
                        "307 Temporary Redirect",
                        &[("Location", "https://127.0.0.1:9/")],
                        b"",
                    ),
                )
            }),
            "a redirect; discovery follows none",
        ),
        (
            "a 2 MiB document",
            Box::new(|| {
                server.route(
                    metadata,
                    response(
                        "200 OK",
                        &[("Content-Type", "application/json")],
                        oversized.as_bytes(),
                    ),
                )
            }),
            "response too large",
        ),
        (
            "a hanging server",
            Box::new(|| server.route(metadata, hang())),
            "unreachable",
        ),
    ];
    for (case, break_it, rule) in cases {
        server.serve_good();
        break_it();
        let err = vault
            .begin_authorization("jira", &[] as &[&str], Some("http://127.0.0.1:9/done"))
            .await
            .unwrap_err();
        assert_eq!(
            err.reason(),
            vault_client::ErrorReason::ProviderUnavailable,
            "{case}: {err}"
        );
        let message = err.to_string();
        assert!(message.contains("tool jira"), "{case}: {message}");
        assert!(message.contains(rule), "{case}: {message}");
        assert!(is_serving(&app.endpoint()).await, "{case}");
    }
    assert_eq!(server.hits("/as/register"), 0, "nothing was registered");
}

#[tokio::test]
async fn a_registration_endpoint_on_a_refused_address_is_not_contacted() {
    let pki = TestPki::new();
    let server = CannedServer::start(&pki).await;
    let elsewhere = crate::mcp_tools::Untouched::bind("127.0.0.2:0");
    server.serve_good();
    // Everything at 127.0.0.1 is allowed; the registration endpoint the metadata names is not.
    server.route(
        "/.well-known/oauth-authorization-server/as",
        json_response(&server.server_metadata(json!({
            "registration_endpoint": format!("https://127.0.0.2:{}/register", elsewhere.port()),
        }))),
    );
    let vault_of = VaultOf::start(
        &pki,
        &server,
        &[("VAULT_EGRESS_ALLOW_CIDRS", "127.0.0.1/32")],
    )
    .await;
    let vault = &vault_of.vault;

    let err = vault
        .begin_authorization("jira", &[] as &[&str], Some("http://127.0.0.1:9/done"))
        .await
        .unwrap_err();

    assert_eq!(
        err.reason(),
        vault_client::ErrorReason::ProviderUnavailable,
        "{err}"
    );
    let message = err.to_string();
    assert!(message.contains("jira"), "{message}");
    assert!(
        message.contains("address 127.0.0.2 is loopback"),
        "{message}"
    );
    assert!(!elsewhere.was_contacted());
}
