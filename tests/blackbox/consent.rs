//! The consent flow end to end against a real authorization server: the vault builds the
//! authorization URL, a headless browser logs in and consents at oidc-provider by posting its
//! forms, the provider's redirect reaches the vault's callback, and the gateway completes.

use std::time::Duration;

use base64::Engine as _;
use tokio::net::TcpListener;
use url::Url;
use vault_client::{AuthorizationState, ErrorReason};

use crate::browser::Browser;
use crate::helpers::*;
use crate::provider::*;

/// Where the gateway wants the browser back; never fetched by the tests.
const RETURN_URL: &str = "http://127.0.0.1:9/connected";
/// The tool's default scopes.
const NO_SCOPES: [&str; 0] = [];

/// A database, an issuer, the provider, and the consent settings that point vaults at it.
pub(crate) struct Consent {
    db: TestDb,
    pub(crate) issuer: Issuer,
    pki: TestPki,
    provider: OidcProvider,
    _dir: tempfile::TempDir,
    providers_path: String,
    ca_path: String,
    /// The first vault's callback listener, bound before the provider learnt its URL.
    callback: Option<TcpListener>,
    redirect_uri: String,
    pub(crate) browser: Browser,
}

impl Consent {
    pub(crate) async fn new() -> Self {
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
        let provider = OidcProvider::start_with(&pki, &state, 0, 3600, &[redirect_uri.as_str()]);
        let providers = consent_providers_file(dir.path(), &provider.ready);
        let browser = Browser::new(&pki);
        Self {
            db,
            issuer,
            providers_path: providers.display().to_string(),
            ca_path: pki.ca_path.display().to_string(),
            pki,
            provider,
            _dir: dir,
            callback: Some(callback),
            redirect_uri,
            browser,
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
        ];
        extra.extend_from_slice(more);
        extra
    }

    /// A vault serving the callback the provider redirects to.
    pub(crate) async fn vault(&mut self) -> TestApp {
        self.vault_with(&[]).await
    }

    async fn vault_with(&mut self, more: &[(&str, &str)]) -> TestApp {
        let callback = self
            .callback
            .take()
            .expect("one vault owns the registered callback");
        let extra = self.extra(more);
        try_spawn_listeners(&self.db, &self.issuer, &extra, None, Some(callback))
            .await
            .expect("vault starts")
    }

    /// Another replica on the same database, with a callback listener of its own.
    pub(crate) async fn replica(&self) -> TestApp {
        let extra = self.extra(&[("VAULT_CALLBACK_LISTEN", "127.0.0.1:0")]);
        spawn_with(&self.db, &self.issuer, &extra).await
    }

    /// Begins a bound flow for `tool` as (`agent`, `user`); returns the flow's id and URL.
    pub(crate) async fn begin(&self, app: &TestApp, agent: &str, user: &str) -> (String, String) {
        let vault = app.client(&self.issuer, agent, user).await;
        let begun = vault
            .begin_authorization("jira", NO_SCOPES, Some(RETURN_URL))
            .await
            .unwrap();
        (begun.authorization_id, begun.authorization_url)
    }

    /// The user consents at the provider, in a browser of their own; returns the provider's
    /// redirect to the callback.
    pub(crate) async fn consent(&self, url: &str, user: &str) -> Url {
        Browser::new(&self.pki).consent(url, user).await.unwrap()
    }
}

/// The same callback URL, delivered to the replica listening at `app`'s callback address.
fn to_replica(callback: &Url, app: &TestApp) -> Url {
    let mut url = callback.clone();
    let addr = app.callback.expect("the replica serves a callback");
    url.set_port(Some(addr.port())).unwrap();
    url
}

/// Delivers the provider's redirect; returns the status and where the vault sends the browser.
pub(crate) async fn deliver(browser: &Browser, callback: &Url) -> (u16, Option<String>, String) {
    browser.visit(callback).await
}

/// `url` with its parameter `name` replaced by `value`.
fn with_param(url: &Url, name: &str, value: &str) -> Url {
    let mut out = url.clone();
    out.query_pairs_mut().clear();
    for (k, v) in url.query_pairs() {
        let v = if k == name { value.into() } else { v };
        out.query_pairs_mut().append_pair(&k, &v);
    }
    out
}

/// `vault` holds no credential for the tool.
async fn assert_nothing_stored(vault: &vault_client::Client) {
    let err = vault.get_token("jira", Duration::ZERO).await.unwrap_err();
    assert_eq!(err.reason(), ErrorReason::CredentialNotFound, "{err}");
}

fn query(url: &str, name: &str) -> Option<String> {
    Url::parse(url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

#[tokio::test]
async fn a_bound_consent_flow_stores_the_providers_token_and_refresh_works() {
    let mut w = Consent::new().await;
    let app = w.vault().await;
    let vault = app.client(&w.issuer, "agent-a", "alice").await;
    assert_nothing_stored(&vault).await;

    let begun = vault
        .begin_authorization("jira", NO_SCOPES, Some(RETURN_URL))
        .await
        .unwrap();
    let url = Url::parse(&begun.authorization_url).unwrap();
    let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    let param = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(param("code_challenge_method").as_deref(), Some("S256"));
    assert_eq!(param("code_challenge").map(|c| c.len()), Some(43));
    assert_eq!(
        param("redirect_uri").as_deref(),
        Some(w.redirect_uri.as_str())
    );
    assert!(param("code_verifier").is_none());
    let state = param("state").unwrap();
    let pending = vault
        .get_authorization(&begun.authorization_id)
        .await
        .unwrap();
    assert_eq!(pending.state, AuthorizationState::Pending);

    let callback = w.consent(&begun.authorization_url, "alice").await;
    assert_eq!(
        query(callback.as_str(), "state").as_deref(),
        Some(state.as_str())
    );
    let (status, location, _) = deliver(&w.browser, &callback).await;
    assert_eq!(status, 303);
    let location = location.expect("the callback redirects to the return_url");
    assert!(location.starts_with(RETURN_URL), "{location}");
    assert_eq!(
        query(&location, "authorization_id").as_deref(),
        Some(begun.authorization_id.as_str())
    );
    assert!(query(&location, "code").is_none() && query(&location, "state").is_none());
    assert_eq!(
        vault
            .get_authorization(&begun.authorization_id)
            .await
            .unwrap()
            .state,
        AuthorizationState::CallbackReceived
    );

    // Neither the state nor the code is kept in clear, nor in hex or base64, in any column.
    let code = query(callback.as_str(), "code").unwrap();
    let mut conn = w.db.connect().await;
    let rows: Vec<String> =
        sqlx::query_scalar("SELECT row_to_json(f)::text FROM vault.authorization_flows f")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].contains("sealed_code"), "{}", rows[0]);
    for secret in [&code, &state] {
        for form in [
            secret.to_string(),
            hex::encode(secret),
            base64::engine::general_purpose::STANDARD.encode(secret),
        ] {
            assert!(!rows[0].contains(&form), "a flow secret is stored readable");
        }
    }

    let completed = vault
        .complete_authorization(&begun.authorization_id)
        .await
        .unwrap();
    assert!(
        completed.scopes.iter().any(|s| s == "read:jira-work"),
        "{:?}",
        completed.scopes
    );
    let token = vault.get_token("jira", Duration::ZERO).await.unwrap();
    assert_eq!(token.generation, completed.stored.generation);
    assert!(w.provider.is_active(&token.access_token).await);
    assert_eq!(
        vault
            .get_authorization(&begun.authorization_id)
            .await
            .unwrap()
            .state,
        AuthorizationState::Completed
    );
    // The secrets are gone once the flow has ended.
    let (sealed_verifier, sealed_code): (Option<Vec<u8>>, Option<Vec<u8>>) =
        sqlx::query_as("SELECT sealed_verifier, sealed_code FROM vault.authorization_flows")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(sealed_verifier.is_none() && sealed_code.is_none());

    // The refresh token came from the vault's own exchange, and refreshes.
    let refreshed = vault.refresh("jira", None).await.unwrap();
    assert!(refreshed.refreshed);
    assert_ne!(refreshed.access_token, token.access_token);
    assert!(w.provider.is_active(&refreshed.access_token).await);

    // Nothing secret of the flow reached the logs.
    let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
    assert!(
        logs.contains("consent flow completed"),
        "the log capture works"
    );
    for secret in [&code, &state, &token.access_token, &refreshed.access_token] {
        assert!(
            !logs.contains(secret.as_str()),
            "a flow secret appeared in the logs"
        );
    }
}

#[tokio::test]
async fn completing_as_another_user_or_agent_is_refused_and_burns_the_flow() {
    let mut w = Consent::new().await;
    let app = w.vault().await;
    for intruder in [("agent-a", "mallory"), ("agent-b", "alice")] {
        let (id, url) = w.begin(&app, "agent-a", "alice").await;
        let callback = w.consent(&url, "alice").await;
        assert_eq!(deliver(&w.browser, &callback).await.0, 303);

        let other = app.client(&w.issuer, intruder.0, intruder.1).await;
        let err = other.complete_authorization(&id).await.unwrap_err();
        assert_eq!(err.reason(), ErrorReason::AuthorizationMismatch, "{err}");

        let alice = app.client(&w.issuer, "agent-a", "alice").await;
        let err = alice.complete_authorization(&id).await.unwrap_err();
        assert_eq!(err.reason(), ErrorReason::AuthorizationDenied, "{err}");
        assert_eq!(
            alice.get_authorization(&id).await.unwrap().state,
            AuthorizationState::Failed
        );
        for (agent, user) in [("agent-a", "alice"), intruder] {
            let vault = app.client(&w.issuer, agent, user).await;
            assert_nothing_stored(&vault).await;
        }
        // Another caller cannot even see the flow.
        assert_eq!(
            other.get_authorization(&id).await.unwrap_err().reason(),
            ErrorReason::AuthorizationNotFound
        );
    }
    assert_eq!(w.provider.stats().await.token_calls, 0);
}

#[tokio::test]
async fn replays_forgeries_denials_and_rejected_codes_each_end_in_their_state() {
    let mut w = Consent::new().await;
    let app = w.vault().await;
    let alice = app.client(&w.issuer, "agent-a", "alice").await;

    // A replayed callback and a replayed Complete.
    let (id, url) = w.begin(&app, "agent-a", "alice").await;
    let callback = w.consent(&url, "alice").await;
    assert_eq!(deliver(&w.browser, &callback).await.0, 303);
    let (status, location, page) = deliver(&w.browser, &callback).await;
    assert_eq!((status, location), (400, None));
    assert!(page.contains("already used"), "{page}");
    let first = alice.complete_authorization(&id).await.unwrap();
    let err = alice.complete_authorization(&id).await.unwrap_err();
    assert_eq!(err.reason(), ErrorReason::AuthorizationExpired, "{err}");
    assert_eq!(
        alice
            .get_token("jira", Duration::ZERO)
            .await
            .unwrap()
            .generation,
        first.stored.generation
    );

    // A forged state, and one that echoes markup.
    let (_, url) = w.begin(&app, "agent-a", "alice").await;
    let original = w.consent(&url, "alice").await;
    let mut forged = original.clone();
    let code = query(forged.as_str(), "code").unwrap();
    forged
        .query_pairs_mut()
        .clear()
        .append_pair("code", &code)
        .append_pair("state", "<script>alert(1)</script>");
    let (status, _, page) = deliver(&w.browser, &forged).await;
    assert_eq!(status, 400);
    assert!(
        !page.contains("<script>") && !page.contains(&code),
        "{page}"
    );
    // The forgery changed nothing: the real callback still completes the real flow.
    assert_eq!(deliver(&w.browser, &original).await.0, 303);
    // A HEAD never runs the callback.
    let head = reqwest::Client::new()
        .head(original.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(head.status().as_u16(), 405);

    // The user refuses consent.
    let (id, url) = w.begin(&app, "agent-a", "bob").await;
    let bob = app.client(&w.issuer, "agent-a", "bob").await;
    let denied = Browser::new(&w.pki).deny(&url, "bob").await.unwrap();
    assert_eq!(
        query(denied.as_str(), "error").as_deref(),
        Some("access_denied")
    );
    let (status, _, page) = deliver(&w.browser, &denied).await;
    assert_eq!(status, 400);
    assert!(page.contains("not granted"), "{page}");
    let view = bob.get_authorization(&id).await.unwrap();
    assert_eq!(view.state, AuthorizationState::Denied);
    assert_eq!(view.error.as_deref(), Some("access_denied"));
    let err = bob.complete_authorization(&id).await.unwrap_err();
    assert_eq!(err.reason(), ErrorReason::AuthorizationDenied);

    // A code the provider refuses: the callback carries the right state and a wrong code.
    let (id, url) = w.begin(&app, "agent-a", "bob").await;
    let wrong = with_param(&w.consent(&url, "bob").await, "code", "not-the-code");
    assert_eq!(deliver(&w.browser, &wrong).await.0, 303);
    let err = bob.complete_authorization(&id).await.unwrap_err();
    assert_eq!(err.reason(), ErrorReason::AuthorizationDenied, "{err}");
    assert_eq!(
        bob.get_authorization(&id).await.unwrap().state,
        AuthorizationState::Failed
    );

    // A callback naming another issuer (RFC 9207).
    let (id, url) = w.begin(&app, "agent-a", "bob").await;
    let mixed = with_param(&w.consent(&url, "bob").await, "iss", "https://127.0.0.1:1");
    assert_eq!(deliver(&w.browser, &mixed).await.0, 400);
    assert_eq!(
        bob.get_authorization(&id).await.unwrap().state,
        AuthorizationState::Failed
    );

    assert_nothing_stored(&bob).await;
    assert!(is_serving(&app.endpoint()).await);
}

#[tokio::test]
async fn an_expired_flow_takes_no_callback_and_cannot_complete() {
    let mut w = Consent::new().await;
    let app = w
        .vault_with(&[("VAULT_OAUTH_FLOW_TTL_SECONDS", "60")])
        .await;
    let alice = app.client(&w.issuer, "agent-a", "alice").await;

    // Expired after the callback.
    let (late, url) = w.begin(&app, "agent-a", "alice").await;
    let callback = w.consent(&url, "alice").await;
    assert_eq!(deliver(&w.browser, &callback).await.0, 303);
    // Expired before the callback.
    let (early, url) = w.begin(&app, "agent-a", "alice").await;
    let early_callback = w.consent(&url, "alice").await;

    fast_forward(&w.db, Duration::from_secs(61)).await;

    let (status, _, page) = deliver(&w.browser, &early_callback).await;
    assert_eq!(status, 400);
    assert!(page.contains("expired"), "{page}");
    for id in [&late, &early] {
        assert_eq!(
            alice.get_authorization(id).await.unwrap().state,
            AuthorizationState::Expired
        );
        let err = alice.complete_authorization(id).await.unwrap_err();
        assert_eq!(err.reason(), ErrorReason::AuthorizationExpired, "{err}");
    }
    assert_nothing_stored(&alice).await;

    // Swept an hour after expiry, with the credentials.
    fast_forward(&w.db, Duration::from_secs(3600)).await;
    let admin = app.admin(&w.issuer, "agent-a", "root").await;
    admin.sweep(0, false).await.unwrap();
    assert_eq!(
        alice.get_authorization(&late).await.unwrap_err().reason(),
        ErrorReason::AuthorizationNotFound
    );
}

#[tokio::test]
async fn a_flow_that_expires_unobserved_is_ended_by_the_sweep_and_its_expiry_recorded_once() {
    let mut w = Consent::new().await;
    let app = w
        .vault_with(&[("VAULT_OAUTH_FLOW_TTL_SECONDS", "60")])
        .await;
    let alice = app.client(&w.issuer, "agent-a", "alice").await;
    // One flow nobody came back to, one whose callback came but that nobody completed.
    let (abandoned, _) = w.begin(&app, "agent-a", "alice").await;
    let (unclaimed, url) = w.begin(&app, "agent-a", "alice").await;
    let callback = w.consent(&url, "alice").await;
    assert_eq!(deliver(&w.browser, &callback).await.0, 303);
    let (live, _) = w.begin(&app, "agent-a", "alice").await;

    fast_forward_flow(&w.db, &abandoned).await;
    fast_forward_flow(&w.db, &unclaimed).await;
    let admin = app.admin(&w.issuer, "agent-a", "root").await;
    admin.sweep(0, false).await.unwrap();
    // A second pass finds nothing left to end.
    admin.sweep(0, false).await.unwrap();

    let mut conn = w.db.connect().await;
    let expired: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT target, outcome FROM \"{}\".audit_log WHERE action = 'flow.expired'
         ORDER BY sequence",
        schema_of("agent-a")
    ))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let mut ids: Vec<String> = expired
        .iter()
        .map(|(target, outcome)| {
            assert_eq!(outcome, "AUTHORIZATION_EXPIRED");
            let target: serde_json::Value = serde_json::from_str(target).unwrap();
            target["authorization_id"].as_str().unwrap().to_string()
        })
        .collect();
    ids.sort();
    let mut want = vec![abandoned.clone(), unclaimed.clone()];
    want.sort();
    assert_eq!(
        ids, want,
        "each expired flow is recorded once, the live one not at all"
    );
    for id in [&abandoned, &unclaimed] {
        assert_eq!(
            alice.get_authorization(id).await.unwrap().state,
            AuthorizationState::Expired
        );
        let err = alice.complete_authorization(id).await.unwrap_err();
        assert_eq!(err.reason(), ErrorReason::AuthorizationExpired, "{err}");
    }
    assert_eq!(
        alice.get_authorization(&live).await.unwrap().state,
        AuthorizationState::Pending
    );
    // The callback of an ended flow still says it expired, and records nothing more.
    let (status, _, page) = deliver(&w.browser, &callback).await;
    assert_eq!(status, 400);
    assert!(page.contains("expired"), "{page}");
}

/// Moves one flow's expiry into the past.
async fn fast_forward_flow(db: &TestDb, id: &str) {
    let mut conn = db.connect().await;
    sqlx::query(
        "UPDATE vault.authorization_flows SET expires_at = now() - interval '1 second'
         WHERE id = $1",
    )
    .bind(id)
    .execute(&mut conn)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_return_url_must_be_allowed_and_required_unless_unbound_callbacks_are() {
    let mut w = Consent::new().await;
    let app = w.vault().await;
    let alice = app.client(&w.issuer, "agent-a", "alice").await;
    for bad in [
        "http://127.0.0.1:9/connected?authorization_id=planted",
        "http://127.0.0.1:9/connected-elsewhere",
        "http://127.0.0.1:10/connected",
        "https://evil.example/connected",
        "not a url",
    ] {
        let err = alice
            .begin_authorization("jira", NO_SCOPES, Some(bad))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), ErrorReason::InvalidArgument, "{bad}: {err}");
        assert!(err.to_string().contains("return_url"), "{err}");
    }
    let err = alice
        .begin_authorization("jira", NO_SCOPES, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("return_url"), "{err}");
    let err = alice
        .begin_authorization("unknown-tool", NO_SCOPES, Some(RETURN_URL))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("tool"), "{err}");
    // An agent's read-only token may not acquire credentials.
    let reader = app
        .client_with(&w.issuer.agent_token("agent-a", "alice"))
        .await;
    assert_eq!(
        reader
            .begin_authorization("jira", NO_SCOPES, Some(RETURN_URL))
            .await
            .unwrap_err()
            .reason(),
        ErrorReason::PermissionDenied
    );
    assert!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM vault.authorization_flows")
            .fetch_one(&mut w.db.connect().await)
            .await
            .unwrap()
            == 0
    );
}

#[tokio::test]
async fn an_unbound_flow_whose_tool_the_policy_no_longer_grants_fails_at_the_callback() {
    let mut w = Consent::new().await;
    let grants = |tools: &str| format!("[[grants]]\nagents = [\"agent-a\"]\ntools = [{tools}]\n");
    let policy = crate::policy::PolicyFile::new(&grants("\"jira\""));
    let app = w
        .vault_with(&[
            ("VAULT_OAUTH_UNBOUND_CALLBACK", "allow"),
            ("VAULT_POLICY_FILE", policy.path()),
            ("VAULT_POLICY_RELOAD_SECONDS", "1"),
        ])
        .await;
    let alice = app.client(&w.issuer, "agent-a", "alice").await;
    let begun = alice
        .begin_authorization("jira", NO_SCOPES, None)
        .await
        .unwrap();
    // The operator takes jira away from the agent while the user is at the provider.
    policy.replace(&grants("\"confluence\""));
    eventually("the new policy is in force", || async {
        alice
            .get_token("jira", Duration::ZERO)
            .await
            .is_err_and(|e| e.reason() == ErrorReason::PolicyDenied)
    })
    .await;
    let callback = w.consent(&begun.authorization_url, "alice").await;
    let (status, _, page) = deliver(&w.browser, &callback).await;
    assert_eq!(status, 400, "{page}");
    assert!(
        page.contains("policy does not let this application"),
        "{page}"
    );
    assert_eq!(
        alice
            .get_authorization(&begun.authorization_id)
            .await
            .unwrap()
            .state,
        AuthorizationState::Failed
    );
    assert!(alice.list_credentials().await.unwrap().is_empty());
    // The code was never spent.
    assert_eq!(w.provider.stats().await.token_calls, 0);
}

#[tokio::test]
async fn two_replicas_share_flows_begin_on_one_callback_on_the_other() {
    let mut w = Consent::new().await;
    let a = w.vault().await;
    let b = w.replica().await;
    for (begin_on, callback_on, complete_on, user) in [(&a, &b, &a, "alice"), (&b, &a, &b, "bob")] {
        let (id, url) = w.begin(begin_on, "agent-a", user).await;
        let callback = w.consent(&url, user).await;
        let callback = to_replica(&callback, callback_on);
        assert_eq!(deliver(&w.browser, &callback).await.0, 303);
        let vault = complete_on.client(&w.issuer, "agent-a", user).await;
        vault.complete_authorization(&id).await.unwrap();
        let other = if std::ptr::eq(complete_on, &a) {
            &b
        } else {
            &a
        };
        let there = other.client(&w.issuer, "agent-a", user).await;
        there.get_token("jira", Duration::ZERO).await.unwrap();
    }
}

#[tokio::test]
async fn list_credentials_shows_each_connection_through_its_life() {
    let mut w = Consent::new().await;
    let app = w.vault().await;
    let alice = app.client(&w.issuer, "agent-a", "alice").await;
    assert!(alice.list_credentials().await.unwrap().is_empty());

    let (id, url) = w.begin(&app, "agent-a", "alice").await;
    let callback = w.consent(&url, "alice").await;
    deliver(&w.browser, &callback).await;
    let completed = alice.complete_authorization(&id).await.unwrap();
    alice
        .store_token("confluence", oauth_token("plain-access", "", 3600), None)
        .await
        .unwrap();

    let listed = alice.list_credentials().await.unwrap();
    let tools: Vec<&str> = listed.iter().map(|c| c.tool.as_str()).collect();
    assert_eq!(tools, ["confluence", "jira"]);
    let jira = &listed[1];
    assert_eq!(jira.state, vault_client::ConnectionState::Active);
    assert!(jira.has_refresh_token);
    assert!(!listed[0].has_refresh_token);
    assert_eq!(jira.generation, completed.stored.generation);
    assert!(jira.scopes.iter().any(|s| s == "read:jira-work"));
    assert!(jira.access_expires_at.is_some());

    // An admin lists another user; a non-admin may not.
    let admin = app.admin(&w.issuer, "agent-a", "root").await;
    assert_eq!(
        admin
            .list_credentials_for(owner("agent-a", "alice"))
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(
        admin
            .list_credentials_for(owner("agent-b", "alice"))
            .await
            .unwrap()
            .is_empty()
    );
    let bob = app.client(&w.issuer, "agent-b", "alice").await;
    assert_eq!(
        bob.list_credentials_for(owner("agent-a", "alice"))
            .await
            .unwrap_err()
            .reason(),
        ErrorReason::PermissionDenied
    );
    let bob = app.client(&w.issuer, "agent-a", "bob").await;
    assert_eq!(
        bob.list_credentials_for(owner("agent-a", "alice"))
            .await
            .unwrap_err()
            .reason(),
        ErrorReason::PermissionDenied
    );

    // The provider revokes the grant: the next refresh finds invalid_grant.
    let token = alice.get_token("jira", Duration::ZERO).await.unwrap();
    w.provider
        .revoke_directly(&token.access_token, "access_token")
        .await;
    let err = alice.refresh("jira", None).await.unwrap_err();
    assert_eq!(err.reason(), ErrorReason::ReauthRequired, "{err}");
    let state_of = |listed: &[vault_client::CredentialInfo], tool: &str| {
        listed
            .iter()
            .find(|c| c.tool == tool)
            .map(|c| c.state.clone())
    };
    let listed = alice.list_credentials().await.unwrap();
    assert_eq!(
        state_of(&listed, "jira"),
        Some(vault_client::ConnectionState::ReauthRequired)
    );

    // Revoked: gone from the list.
    alice.revoke(Some("jira"), false).await.unwrap();
    let listed = alice.list_credentials().await.unwrap();
    assert_eq!(state_of(&listed, "jira"), None);

    // Past its vault TTL, until swept.
    fast_forward(&w.db, Duration::from_secs(31 * 86_400)).await;
    let listed = alice.list_credentials().await.unwrap();
    assert_eq!(
        state_of(&listed, "confluence"),
        Some(vault_client::ConnectionState::Expired)
    );
}

#[tokio::test]
async fn the_callback_serves_https_with_the_grpc_certificate() {
    let w = Consent::new().await;
    let cert = w.pki.cert_path.display().to_string();
    let key = w.pki.key_path.display().to_string();
    let extra = w.extra(&[
        ("VAULT_TLS_CERT_FILE", cert.as_str()),
        ("VAULT_TLS_KEY_FILE", key.as_str()),
        ("VAULT_CALLBACK_LISTEN", "127.0.0.1:0"),
    ]);
    let app = spawn_with(&w.db, &w.issuer, &extra).await;
    let port = app.callback.unwrap().port();
    let health = Url::parse(&format!("https://127.0.0.1:{port}/healthz")).unwrap();
    let (status, _, body) = w.browser.visit(&health).await;
    assert_eq!((status, body.contains("Serving")), (200, true), "{body}");
    let other = Url::parse(&format!("https://127.0.0.1:{port}/anything")).unwrap();
    assert_eq!(w.browser.visit(&other).await.0, 404);
}
