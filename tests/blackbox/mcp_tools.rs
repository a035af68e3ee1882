//! A tool that is only an MCP server URL, end to end against real peers: the MCP TypeScript
//! SDK's server (`tests/mcp/server.mjs`) protected by oidc-provider with dynamic registration
//! (RFC 7591) and resource indicators (RFC 8707). The vault discovers the authorization server,
//! registers itself once across replicas, runs the consent flow with `resource`, and the token
//! it hands out is accepted by the MCP server's `whoami` tool, before and after a refresh.

use std::time::Duration;

use tokio::net::TcpListener;
use url::Url;
use vault_client::ErrorReason;

use crate::browser::Browser;
use crate::helpers::*;
use crate::mcp::McpServer;
use crate::provider::*;

/// Where the gateway wants the browser back; never fetched by the tests.
const RETURN_URL: &str = "http://127.0.0.1:9/connected";
const NO_SCOPES: [&str; 0] = [];

/// The tool's entry: only the MCP server (and the scopes and `prompt` oidc-provider needs to
/// issue a refresh token).
fn mcp_tool(url: &str) -> String {
    format!(
        "[tools.jira]\nmcp_server = \"{url}\"\nscopes = [\"openid\", \"offline_access\", \"read:jira-work\"]\nextra_authorize_params = {{ prompt = \"consent\" }}\n"
    )
}

/// A database, an issuer, the authorization server, the MCP server it protects, and the
/// settings that point vaults at them.
struct World {
    db: TestDb,
    issuer: Issuer,
    pki: TestPki,
    dir: tempfile::TempDir,
    provider: OidcProvider,
    mcp: McpServer,
    providers_path: String,
    ca_path: String,
    callback: Option<TcpListener>,
    redirect_uri: String,
}

impl World {
    async fn new(provider_flags: &[&str]) -> Self {
        let db = TestDb::new().await;
        let issuer = Issuer::new();
        let pki = TestPki::new();
        let dir = tempfile::tempdir().unwrap();
        let callback = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let redirect_uri = format!(
            "http://{}/api/v1/auth/tool/callback",
            callback.local_addr().unwrap()
        );
        let state = dir.path().join("provider-state");
        std::fs::create_dir_all(&state).unwrap();
        // Strict: the vault must send `resource` on the token and refresh requests too.
        let mut flags = vec!["--registration", "--resource", "--strict-resource"];
        flags.extend_from_slice(provider_flags);
        let provider = OidcProvider::start_with_flags(&pki, &state, 0, 3600, &[], &flags);
        let mcp = McpServer::start(&pki, &provider.ready, &[]);
        let providers_path = dir.path().join("providers.toml");
        std::fs::write(&providers_path, mcp_tool(&mcp.ready.url)).unwrap();
        Self {
            db,
            issuer,
            ca_path: pki.ca_path.display().to_string(),
            pki,
            dir,
            provider,
            mcp,
            providers_path: providers_path.display().to_string(),
            callback: Some(callback),
            redirect_uri,
        }
    }

    fn extra<'a>(&'a self, more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut extra = vec![
            ("VAULT_PROVIDERS_FILE", self.providers_path.as_str()),
            ("VAULT_PROVIDER_CA_FILE", self.ca_path.as_str()),
            ("VAULT_PROVIDER_TIMEOUT_SECONDS", "5"),
            ("VAULT_REFRESH_COOLDOWN_SECONDS", "0"),
            ("OAUTH_TOOL_REDIRECT_URI", self.redirect_uri.as_str()),
            ("VAULT_OAUTH_RETURN_URLS", RETURN_URL),
            // Everything here is on loopback, which derived URLs may not reach by default.
            ("VAULT_EGRESS_ALLOW_CIDRS", "127.0.0.0/8"),
        ];
        extra.extend_from_slice(more);
        extra
    }

    /// The vault serving the callback the registration names.
    async fn vault(&mut self, more: &[(&str, &str)]) -> TestApp {
        let callback = self.callback.take().expect("one vault owns the callback");
        let extra = self.extra(more);
        try_spawn_listeners(&self.db, &self.issuer, &extra, None, Some(callback))
            .await
            .expect("vault starts")
    }

    /// Restarts the MCP server at the same URL naming a new authorization server, which it
    /// returns (running, with registration and resource indicators).
    fn switch_authorization_server(&mut self) -> OidcProvider {
        let state = self.dir.path().join("other-provider");
        std::fs::create_dir_all(&state).unwrap();
        let other = OidcProvider::start_with_flags(
            &self.pki,
            &state,
            0,
            3600,
            &[],
            &["--registration", "--resource"],
        );
        let port = self.mcp.ready.port;
        self.mcp.stop();
        self.mcp = McpServer::start_on(
            &self.pki,
            &self.provider.ready,
            port,
            &["--as-override", &other.ready.issuer],
        );
        other
    }

    /// Another replica on the same database.
    async fn replica(&self) -> TestApp {
        self.replica_with(&[]).await
    }

    async fn replica_with(&self, more: &[(&str, &str)]) -> TestApp {
        let mut extra = self.extra(&[("VAULT_CALLBACK_LISTEN", "127.0.0.1:0")]);
        extra.extend_from_slice(more);
        spawn_with(&self.db, &self.issuer, &extra).await
    }

    /// Begin, consent as `user` in a browser, deliver the callback, complete: the credential
    /// is stored.
    async fn connect(&self, vault: &vault_client::Client, user: &str) -> Url {
        let begun = vault
            .begin_authorization("jira", NO_SCOPES, Some(RETURN_URL))
            .await
            .unwrap();
        let browser = Browser::new(&self.pki);
        let callback = browser
            .consent(&begun.authorization_url, user)
            .await
            .unwrap();
        let (status, location, body) = browser.visit(&callback).await;
        assert_eq!(status, 303, "{body}");
        assert!(location.unwrap().starts_with(RETURN_URL));
        vault
            .complete_authorization(&begun.authorization_id)
            .await
            .unwrap();
        Url::parse(&begun.authorization_url).unwrap()
    }
}

fn param(url: &Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

#[tokio::test]
async fn an_mcp_server_url_alone_connects_and_its_token_calls_the_tool_before_and_after_refresh() {
    let mut w = World::new(&[]).await;
    let app = w.vault(&[]).await;
    let vault = app.client(&w.issuer, "agent-a", "alice").await;

    let authorization_url = w.connect(&vault, "alice").await;

    // The consent went to the discovered authorization server, as the registered client, for
    // the MCP server's resource.
    assert!(
        authorization_url
            .as_str()
            .starts_with(&w.provider.ready.issuer),
        "{authorization_url}"
    );
    assert_eq!(
        param(&authorization_url, "resource").as_deref(),
        Some(w.mcp.ready.url.as_str())
    );
    let client_id = param(&authorization_url, "client_id").unwrap();
    assert_ne!(client_id, w.provider.ready.client_id, "a registered client");
    let stats = w.provider.stats().await;
    assert_eq!(stats.registration_calls, 1, "{stats:?}");

    let token = vault.get_token("jira", Duration::ZERO).await.unwrap();
    let answer = w.mcp.call_whoami(&token.access_token).await.unwrap();
    assert_eq!(answer["sub"], "alice", "{answer}");
    assert_eq!(answer["aud"], w.mcp.ready.url.as_str(), "{answer}");

    // A forced refresh goes to the discovered token endpoint with the registered client and the
    // resource; the new token is accepted too.
    let refreshed = vault.refresh("jira", None).await.unwrap();
    assert!(refreshed.refreshed);
    assert_ne!(refreshed.access_token, token.access_token);
    let answer = w.mcp.call_whoami(&refreshed.access_token).await.unwrap();
    assert_eq!(answer["sub"], "alice", "{answer}");
    assert_eq!(answer["aud"], w.mcp.ready.url.as_str(), "{answer}");
    let stats = w.provider.stats().await;
    assert_eq!(
        (stats.registration_calls, stats.refresh_calls),
        (1, 1),
        "{stats:?}"
    );

    // Discovery was cached: one unauthenticated request to the MCP server for all of it.
    let mcp_stats = w.mcp.stats().await;
    assert_eq!(
        mcp_stats["/.well-known/oauth-protected-resource/mcp"], 1,
        "{mcp_stats}"
    );

    // The registration is kept in the control schema with its secret sealed.
    let mut conn = w.db.connect().await;
    let rows: Vec<String> =
        sqlx::query_scalar("SELECT row_to_json(r)::text FROM vault.client_registrations r")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].contains(&client_id), "{}", rows[0]);
}

#[tokio::test]
async fn two_replicas_racing_the_first_begin_register_the_vault_once() {
    let mut w = World::new(&[]).await;
    let first = w.vault(&[]).await;
    let second = w.replica().await;
    let a = first.client(&w.issuer, "agent-a", "alice").await;
    let b = second.client(&w.issuer, "agent-a", "bob").await;

    let (one, two) = tokio::join!(
        a.begin_authorization("jira", NO_SCOPES, Some(RETURN_URL)),
        b.begin_authorization("jira", NO_SCOPES, Some(RETURN_URL)),
    );

    let (one, two) = (one.unwrap(), two.unwrap());
    let client = |begun: &vault_client::AuthorizationStart| {
        param(&Url::parse(&begun.authorization_url).unwrap(), "client_id").unwrap()
    };
    assert_eq!(client(&one), client(&two), "both replicas use one client");
    assert_eq!(w.provider.stats().await.registration_calls, 1);
}

#[tokio::test]
async fn a_registration_the_server_rejects_is_renewed_at_the_next_authorization() {
    let mut w = World::new(&[]).await;
    let app = w.vault(&[]).await;
    let vault = app.client(&w.issuer, "agent-a", "alice").await;
    let first = w.connect(&vault, "alice").await;
    let client_id = param(&first, "client_id").unwrap();

    w.provider.delete_client(&client_id).await;
    let refused = vault.refresh("jira", None).await.unwrap_err();

    // The refresh token belonged to the rejected client: only a new consent helps.
    assert_eq!(refused.reason(), ErrorReason::ReauthRequired, "{refused}");
    let second = w.connect(&vault, "alice").await;
    assert_ne!(param(&second, "client_id").unwrap(), client_id);
    assert_eq!(w.provider.stats().await.registration_calls, 2);
    let token = vault.get_token("jira", Duration::ZERO).await.unwrap();
    let answer = w.mcp.call_whoami(&token.access_token).await.unwrap();
    assert_eq!(answer["sub"], "alice");
    // And the renewed one is used from then on.
    vault.refresh("jira", None).await.unwrap();
    assert_eq!(w.provider.stats().await.registration_calls, 2);
}

#[tokio::test]
async fn an_expiring_registration_is_renewed_before_use_and_only_then() {
    // A short-lived secret (60 s) is still used while it is valid: no registration per use.
    let mut w = World::new(&["--registration-secret-ttl", "60"]).await;
    let app = w.vault(&[]).await;
    let vault = app.client(&w.issuer, "agent-a", "alice").await;
    let begin = || vault.begin_authorization("jira", NO_SCOPES, Some(RETURN_URL));
    begin().await.unwrap();
    begin().await.unwrap();
    assert_eq!(w.provider.stats().await.registration_calls, 1);

    // Its expiry comes (moved, rather than waited for): the next use registers anew.
    let mut conn = w.db.connect().await;
    sqlx::query(
        "UPDATE vault.client_registrations
         SET secret_expires_at = now() - interval '1 second', registered_at = now() - interval '1 minute'",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    begin().await.unwrap();
    begin().await.unwrap();

    assert_eq!(w.provider.stats().await.registration_calls, 2);
}

#[tokio::test]
async fn concurrent_first_uses_on_one_replica_register_once() {
    let mut w = World::new(&[]).await;
    let app = w.vault(&[]).await;
    let alice = app.client(&w.issuer, "agent-a", "alice").await;
    let bob = app.client(&w.issuer, "agent-a", "bob").await;

    let (one, two) = tokio::join!(
        alice.begin_authorization("jira", NO_SCOPES, Some(RETURN_URL)),
        bob.begin_authorization("jira", NO_SCOPES, Some(RETURN_URL)),
    );

    let client = |url: &str| param(&Url::parse(url).unwrap(), "client_id").unwrap();
    assert_eq!(
        client(&one.unwrap().authorization_url),
        client(&two.unwrap().authorization_url)
    );
    assert_eq!(w.provider.stats().await.registration_calls, 1);
}

#[tokio::test]
async fn a_credential_is_not_sent_to_an_authorization_server_the_metadata_names_later() {
    let mut w = World::new(&[]).await;
    let app = w.vault(&[("VAULT_DISCOVERY_TTL_SECONDS", "0")]).await;
    let vault = app.client(&w.issuer, "agent-a", "alice").await;
    w.connect(&vault, "alice").await;
    let before = w.provider.stats().await;

    // The MCP server (same URL) now names another authorization server.
    let other = w.switch_authorization_server();

    let refused = vault.refresh("jira", None).await.unwrap_err();

    assert_eq!(refused.reason(), ErrorReason::ReauthRequired, "{refused}");
    let after = w.provider.stats().await;
    assert_eq!(after.refresh_calls, before.refresh_calls);
    let elsewhere = other.stats().await;
    assert_eq!(
        (elsewhere.token_calls, elsewhere.registration_calls),
        (0, 0),
        "nothing reached the new server: {elsewhere:?}"
    );
    // The credential stays (another refresh would need the old server back, or a consent).
    assert_eq!(vault.list_credentials().await.unwrap().len(), 1);
}

#[tokio::test]
async fn where_the_server_accepts_client_id_metadata_documents_the_vault_serves_one_and_registers_nothing()
 {
    let mut w = World::new(&["--client-id-metadata"]).await;
    // A public https callback: the authorization server fetches the document next to it.
    let callback = w.callback.take().unwrap();
    let addr = callback.local_addr().unwrap();
    let redirect_uri = format!("https://{addr}/api/v1/auth/tool/callback");
    let (cert, key) = (
        w.pki.cert_path.display().to_string(),
        w.pki.key_path.display().to_string(),
    );
    let extra = w.extra(&[
        ("OAUTH_TOOL_REDIRECT_URI", redirect_uri.as_str()),
        ("VAULT_TLS_CERT_FILE", cert.as_str()),
        ("VAULT_TLS_KEY_FILE", key.as_str()),
    ]);
    let app = try_spawn_listeners(&w.db, &w.issuer, &extra, None, Some(callback))
        .await
        .expect("vault starts");
    let vault = vault_client::Client::builder(format!("https://127.0.0.1:{}", app.addr.port()))
        .tls_ca_pem(&w.pki.ca_pem)
        .connect()
        .await
        .unwrap()
        .with_bearer(&w.issuer.token("agent-a", "alice"))
        .unwrap();

    let begun = vault
        .begin_authorization("jira", NO_SCOPES, Some(RETURN_URL))
        .await
        .unwrap();
    let url = Url::parse(&begun.authorization_url).unwrap();
    let document_url = format!("https://{addr}/api/v1/auth/tool/client-metadata");
    assert_eq!(
        param(&url, "client_id").as_deref(),
        Some(document_url.as_str())
    );
    let document: serde_json::Value = w
        .pki
        .client()
        .get(&document_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(document["client_id"], document_url.as_str());
    assert_eq!(document["redirect_uris"], serde_json::json!([redirect_uri]));
    assert_eq!(document["token_endpoint_auth_method"], "none");

    let browser = Browser::new(&w.pki);
    let callback = browser
        .consent(&begun.authorization_url, "alice")
        .await
        .unwrap();
    let (status, _, body) = browser.visit(&callback).await;
    assert_eq!(status, 303, "{body}");
    vault
        .complete_authorization(&begun.authorization_id)
        .await
        .unwrap();
    let token = vault.get_token("jira", Duration::ZERO).await.unwrap();
    let answer = w.mcp.call_whoami(&token.access_token).await.unwrap();
    assert_eq!(answer["sub"], "alice", "{answer}");
    let refreshed = vault.refresh("jira", None).await.unwrap();
    assert!(refreshed.refreshed);
    assert_eq!(
        w.provider.stats().await.registration_calls,
        0,
        "no dynamic registration"
    );
}

/// A listener standing in for a server the vault must not contact; it only counts.
pub(crate) struct Untouched {
    listener: std::net::TcpListener,
}

impl Untouched {
    pub(crate) fn bind(addr: &str) -> Self {
        let listener = std::net::TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        Self { listener }
    }

    pub(crate) fn port(&self) -> u16 {
        self.listener.local_addr().unwrap().port()
    }

    /// Whether anyone connected. A connection is in the backlog as soon as its client's
    /// connect returned, so after the vault answered there is nothing left to wait for.
    pub(crate) fn was_contacted(&self) -> bool {
        match self.listener.accept() {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("accept: {e}"),
        }
    }
}

#[tokio::test]
async fn authorization_servers_on_loopback_are_refused_without_a_connection_until_allowed() {
    let mut w = World::new(&[]).await;
    let v4 = Untouched::bind("127.0.0.2:0");
    let named = Untouched::bind("127.0.0.1:0");
    let v6 = Untouched::bind("[::1]:0");
    let pinned = Untouched::bind("127.0.0.1:0");
    let refused = [
        (
            format!("https://127.0.0.2:{}/", v4.port()),
            "127.0.0.2",
            &v4,
        ),
        // From the hosts file.
        (
            format!("https://localhost:{}/", named.port()),
            "127.0.0.1",
            &named,
        ),
        (format!("https://[::1]:{}/", v6.port()), "::1", &v6),
        // From the vault's own resolver table (VAULT_EGRESS_HOSTS).
        (
            format!("https://as.test.invalid:{}/", pinned.port()),
            "127.0.0.1",
            &pinned,
        ),
    ];
    // One MCP server per named authorization server, each a tool of the same vault; the last
    // names the real provider.
    let servers: Vec<McpServer> = refused
        .iter()
        .map(|(url, _, _)| McpServer::start(&w.pki, &w.provider.ready, &["--as-override", url]))
        .collect();
    let mut file = String::new();
    for (i, server) in servers.iter().enumerate() {
        file.push_str(&mcp_tool(&server.ready.url).replace("tools.jira", &format!("tools.t{i}")));
    }
    file.push_str(&mcp_tool(&w.mcp.ready.url));
    std::fs::write(&w.providers_path, file).unwrap();

    // Loopback is not allowed: the MCP servers' own metadata (at their configured origin) is
    // read, and every authorization server it names is refused.
    let app = w
        .vault(&[
            ("VAULT_EGRESS_ALLOW_CIDRS", ""),
            ("VAULT_EGRESS_HOSTS", "as.test.invalid=127.0.0.1"),
        ])
        .await;
    let vault = app.client(&w.issuer, "agent-a", "alice").await;
    for (i, (_, address, listener)) in refused.iter().enumerate() {
        let err = vault
            .begin_authorization(&format!("t{i}"), NO_SCOPES, Some(RETURN_URL))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), ErrorReason::ProviderUnavailable, "{err}");
        let message = err.to_string();
        assert!(message.contains(&format!("t{i}")), "{message}");
        assert!(
            message.contains(&format!("address {address} is loopback")),
            "{message}"
        );
        assert!(!listener.was_contacted(), "t{i}: the vault connected");
    }
    let err = vault
        .begin_authorization("jira", NO_SCOPES, Some(RETURN_URL))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), ErrorReason::ProviderUnavailable, "{err}");
    let stats = w.provider.stats().await;
    assert_eq!(stats.registration_calls, 0, "{stats:?}");
    drop(vault);
    drop(app);

    // Allowed: the same flow succeeds against the real provider.
    let allowing = w
        .replica_with(&[("VAULT_EGRESS_ALLOW_CIDRS", "127.0.0.0/8")])
        .await;
    let vault = allowing.client(&w.issuer, "agent-a", "alice").await;
    vault
        .begin_authorization("jira", NO_SCOPES, Some(RETURN_URL))
        .await
        .unwrap();
    assert_eq!(w.provider.stats().await.registration_calls, 1);
}

#[tokio::test]
async fn mcp_probe_finds_the_real_servers_endpoints_and_registers_only_when_asked() {
    let w = World::new(&[]).await;
    let env = [
        ("VAULT_PROVIDER_CA_FILE", w.ca_path.as_str()),
        ("VAULT_EGRESS_ALLOW_CIDRS", "127.0.0.0/8"),
        ("OAUTH_TOOL_REDIRECT_URI", w.redirect_uri.as_str()),
    ];

    let (code, out, err) = crate::mcp_probe::probe(&[&w.mcp.ready.url], &env).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains(&format!(
            "authorization server: {}",
            w.provider.ready.issuer
        )),
        "{out}"
    );
    assert!(
        out.contains("registration: dynamic client registration"),
        "{out}"
    );
    assert_eq!(w.provider.stats().await.registration_calls, 0);

    let (code, out, err) = crate::mcp_probe::probe(&[&w.mcp.ready.url, "--register"], &env).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("registered: client_id="), "{out}");
    assert!(out.contains("client_secret=issued (not shown)"), "{out}");
    assert_eq!(w.provider.stats().await.registration_calls, 1);
}

#[tokio::test]
async fn revocation_goes_to_the_discovered_endpoint_as_the_registered_client() {
    let mut w = World::new(&[]).await;
    let app = w.vault(&[]).await;
    let vault = app.client(&w.issuer, "agent-a", "alice").await;
    w.connect(&vault, "alice").await;
    let token = vault.get_token("jira", Duration::ZERO).await.unwrap();
    assert!(w.mcp.call_whoami(&token.access_token).await.is_ok());

    let revoked = vault.revoke(Some("jira"), true).await.unwrap();

    // oidc-provider only lets the client a token was issued to revoke it.
    assert_eq!((revoked.revoked, revoked.provider_revoked), (1, 1));
    assert!(!w.provider.is_active(&token.access_token).await);
    let (status, _) = w.mcp.call_whoami(&token.access_token).await.unwrap_err();
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_flow_whose_authorization_server_changes_mid_flow_sends_its_code_nowhere() {
    let mut w = World::new(&[]).await;
    let app = w.vault(&[("VAULT_DISCOVERY_TTL_SECONDS", "0")]).await;
    let vault = app.client(&w.issuer, "agent-a", "alice").await;
    let begun = vault
        .begin_authorization("jira", NO_SCOPES, Some(RETURN_URL))
        .await
        .unwrap();
    let browser = Browser::new(&w.pki);
    let callback = browser
        .consent(&begun.authorization_url, "alice")
        .await
        .unwrap();

    // Between the callback and the exchange, the MCP server starts naming another server.
    let (status, _, body) = browser.visit(&callback).await;
    assert_eq!(
        status, 303,
        "the callback is checked against the flow's own issuer: {body}"
    );
    let other = w.switch_authorization_server();

    let err = vault
        .complete_authorization(&begun.authorization_id)
        .await
        .unwrap_err();

    assert_eq!(err.reason(), ErrorReason::AuthorizationDenied, "{err}");
    assert_eq!(w.provider.stats().await.token_calls, 0);
    let elsewhere = other.stats().await;
    assert_eq!(
        (elsewhere.token_calls, elsewhere.registration_calls),
        (0, 0),
        "{elsewhere:?}"
    );
}

#[tokio::test]
async fn without_configured_scopes_consent_asks_for_what_the_mcp_server_advertises() {
    let mut w = World::new(&[]).await;
    std::fs::write(
        &w.providers_path,
        format!("[tools.jira]\nmcp_server = \"{}\"\n", w.mcp.ready.url),
    )
    .unwrap();
    let app = w.vault(&[]).await;
    let vault = app.client(&w.issuer, "agent-a", "alice").await;

    let begun = vault
        .begin_authorization("jira", NO_SCOPES, Some(RETURN_URL))
        .await
        .unwrap();

    // No challenge scope from this server: its metadata's scopes_supported.
    let metadata: serde_json::Value = w
        .pki
        .client()
        .get(&w.mcp.ready.resource_metadata)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let advertised: Vec<&str> = metadata["scopes_supported"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(!advertised.is_empty());
    let url = Url::parse(&begun.authorization_url).unwrap();
    assert_eq!(param(&url, "scope"), Some(advertised.join(" ")), "{url}");
}
