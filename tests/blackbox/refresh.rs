//! Refresh and provider revocation against a real authorization server, with the number of
//! provider calls read from the provider's side.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vault_client::Error;

use crate::helpers::*;
use crate::provider::*;
use crate::telemetry::{Collector, assert_no_secret, attribute};

/// A database, a caller-token issuer, a TLS authorization server, and the settings that point a
/// vault at it.
struct World {
    db: TestDb,
    issuer: Issuer,
    pki: TestPki,
    provider: OidcProvider,
    dir: tempfile::TempDir,
    providers_path: String,
    ca_path: String,
}

impl World {
    async fn new() -> Self {
        let db = TestDb::new().await;
        let issuer = Issuer::new();
        let pki = TestPki::new();
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("provider-state");
        std::fs::create_dir_all(&state).unwrap();
        let provider = OidcProvider::start(&pki, &state, 0, 3600);
        let providers_path = providers_file(dir.path(), &provider.ready)
            .display()
            .to_string();
        let ca_path = pki.ca_path.display().to_string();
        Self {
            db,
            issuer,
            pki,
            provider,
            dir,
            providers_path,
            ca_path,
        }
    }

    fn extra(&self) -> Vec<(&str, &str)> {
        vec![
            ("VAULT_PROVIDERS_FILE", self.providers_path.as_str()),
            ("VAULT_PROVIDER_CA_FILE", self.ca_path.as_str()),
            ("VAULT_PROVIDER_TIMEOUT_SECONDS", "5"),
            ("VAULT_REVOCATION_RETRY_INTERVAL_SECONDS", "1"),
            // Most tests here force refreshes back to back; the cooldown has a test of its own.
            ("VAULT_REFRESH_COOLDOWN_SECONDS", "0"),
        ]
    }

    async fn vault(&self) -> TestApp {
        spawn_with(&self.db, &self.issuer, &self.extra()).await
    }

    /// Kills the provider and starts it again on the same port with the same state.
    fn restart_provider(&mut self) {
        let port = self.provider.port();
        self.provider.kill();
        let state: PathBuf = self.provider.state_dir.clone();
        self.provider = OidcProvider::start(&self.pki, &state, port, 3600);
    }

    /// A vault whose `jira` tool is configured by `endpoints` (TOML lines such as
    /// `issuer = "…"`) with this world's client registration, instead of the usual file.
    async fn vault_with_jira(&self, endpoints: &str) -> TestApp {
        let path = self
            .dir
            .path()
            .join(format!("jira-{}.toml", uuid::Uuid::new_v4().simple()));
        std::fs::write(
            &path,
            format!(
                "[tools.jira]\n{endpoints}\nclient_id = \"{}\"\nclient_secret = \"{}\"\n",
                self.provider.ready.client_id, self.provider.ready.client_secret
            ),
        )
        .unwrap();
        let path = path.display().to_string();
        let mut extra = self.extra();
        extra.retain(|(k, _)| *k != "VAULT_PROVIDERS_FILE");
        extra.push(("VAULT_PROVIDERS_FILE", path.as_str()));
        spawn_with(&self.db, &self.issuer, &extra).await
    }

    /// `user` authorizes at the provider and their gateway stores the grant for `tool` (agent
    /// `agent-a`), its access token expiring in `expires_in` seconds; returns their client, the
    /// grant and the stored generation.
    async fn stores(
        &self,
        app: &TestApp,
        user: &str,
        tool: &str,
        expires_in: i64,
    ) -> (vault_client::Client, Grant, vault_client::Stored) {
        let grant = self.provider.authorize(user).await;
        let vault = app.client(&self.issuer, "agent-a", user).await;
        let stored = vault
            .store_token(
                tool,
                oauth_token(&grant.access_token, &grant.refresh_token, expires_in),
                None,
            )
            .await
            .unwrap();
        (vault, grant, stored)
    }

    async fn credential_state(&self, agent: &str, user: &str, tool: &str) -> Option<i16> {
        let schema = schema_of(agent);
        let mut conn = self.db.connect().await;
        sqlx::query_scalar(&format!(
            "SELECT state FROM \"{schema}\".credentials WHERE user_id = $1 AND tool = $2"
        ))
        .bind(user)
        .bind(tool)
        .fetch_optional(&mut conn)
        .await
        .unwrap()
    }
}

#[tokio::test]
async fn an_expired_credential_is_refreshed_on_get_token_and_the_refresh_token_rotates() {
    let w = World::new().await;
    let app = w.vault().await;
    let (vault, grant, stored) = w.stores(&app, "alice", "jira", -60).await;
    w.provider.reset_stats().await;

    let token = vault.get_token("jira", Duration::ZERO).await.unwrap();

    assert!(token.refreshed);
    assert_ne!(token.access_token, grant.access_token);
    assert!(token.generation > stored.generation);
    assert!(
        unix(token.expires_at.unwrap()) > now() + 3000,
        "expiry taken from expires_in"
    );
    assert_eq!(w.provider.stats().await.refresh_calls, 1);
    assert!(
        w.provider.is_active(&token.access_token).await,
        "the new access token is live at the provider"
    );

    let again = vault.get_token("jira", Duration::ZERO).await.unwrap();
    assert_eq!(
        (again.access_token.as_str(), again.refreshed),
        (token.access_token.as_str(), false)
    );
    assert_eq!(
        w.provider.stats().await.refresh_calls,
        1,
        "a fresh token is not refreshed again"
    );

    // The vault kept the rotated refresh token: the original one was consumed by the first
    // refresh, so a second refresh can only succeed with the new one.
    let forced = vault.refresh("jira", None).await.unwrap();
    assert!(forced.refreshed);
    assert_ne!(forced.access_token, token.access_token);
    assert_eq!(w.provider.stats().await.refresh_calls, 2);
    let (status, body) = w.provider.refresh_directly(&grant.refresh_token).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "the gateway's refresh token was rotated away"
    );
}

#[tokio::test]
async fn sixty_four_concurrent_calls_on_two_server_processes_make_one_provider_call() {
    let w = World::new().await;
    let pairs = settings_pairs(&w.db, &w.issuer, &w.extra());
    let first = start_binary(&pairs).await;
    let second = start_binary(&pairs).await;
    let grant = w.provider.authorize("alice").await;
    let token = w.issuer.token("agent-a", "alice");
    let a = vault_client::Client::connect(first.endpoint())
        .await
        .unwrap()
        .with_bearer(&token)
        .unwrap();
    let b = vault_client::Client::connect(second.endpoint())
        .await
        .unwrap()
        .with_bearer(&token)
        .unwrap();
    a.store_token(
        "confluence",
        oauth_token(&grant.access_token, &grant.refresh_token, -60),
        None,
    )
    .await
    .unwrap();
    w.provider.reset_stats().await;

    let mut calls = Vec::new();
    for i in 0..64 {
        let client = if i % 2 == 0 { a.clone() } else { b.clone() };
        calls.push(tokio::spawn(async move {
            client
                .get_token("confluence", Duration::from_secs(60))
                .await
        }));
    }
    let mut tokens = Vec::new();
    for call in calls {
        tokens.push(call.await.unwrap().expect("every caller gets a token"));
    }

    assert_eq!(
        w.provider.stats().await.refresh_calls,
        1,
        "exactly one refresh at the provider"
    );
    let first_token = &tokens[0];
    assert_ne!(first_token.access_token, grant.access_token);
    for token in &tokens {
        assert_eq!(
            token.access_token, first_token.access_token,
            "every caller gets the same new token"
        );
        assert_eq!(token.generation, first_token.generation);
    }
    assert!(w.provider.is_active(&first_token.access_token).await);
}

#[tokio::test]
async fn a_grant_revoked_at_the_provider_needs_reauthorization_and_is_not_retried() {
    let w = World::new().await;
    let app = w.vault().await;
    let (vault, grant, _) = w.stores(&app, "alice", "jira", -60).await;
    w.provider
        .revoke_directly(&grant.refresh_token, "refresh_token")
        .await;
    w.provider.reset_stats().await;

    assert!(matches!(
        vault.get_token("jira", Duration::ZERO).await,
        Err(Error::ReauthRequired(_))
    ));
    assert_eq!(w.provider.stats().await.refresh_calls, 1);
    assert!(matches!(
        vault.get_token("jira", Duration::ZERO).await,
        Err(Error::ReauthRequired(_))
    ));
    assert!(matches!(
        vault.refresh("jira", None).await,
        Err(Error::ReauthRequired(_))
    ));
    assert_eq!(
        w.provider.stats().await.refresh_calls,
        1,
        "no further provider calls"
    );
    assert_eq!(
        w.credential_state("agent-a", "alice", "jira").await,
        Some(1),
        "kept, marked for re-auth"
    );

    // A new consent replaces it and clears the mark.
    let fresh = w.provider.authorize("alice").await;
    vault
        .store_token(
            "jira",
            oauth_token(&fresh.access_token, &fresh.refresh_token, 3600),
            None,
        )
        .await
        .unwrap();
    assert_eq!(access_token(&vault, "jira").await, fresh.access_token);
}

#[tokio::test]
async fn a_provider_outage_keeps_the_credential_and_refresh_resumes_when_it_returns() {
    let mut w = World::new().await;
    let app = w.vault().await;
    let (vault, _, _) = w.stores(&app, "alice", "jira", -60).await;
    let port = w.provider.port();
    w.provider.kill();

    let down = vault.get_token("jira", Duration::ZERO).await;
    assert!(
        matches!(down, Err(Error::ProviderUnavailable(_))),
        "{down:?}"
    );
    assert!(matches!(
        vault.get_token("jira", Duration::ZERO).await,
        Err(Error::ProviderUnavailable(_))
    ));
    assert_eq!(
        w.credential_state("agent-a", "alice", "jira").await,
        Some(0),
        "credential intact"
    );

    w.restart_provider();
    assert_eq!(w.provider.port(), port);
    let deadline = Instant::now() + Duration::from_secs(20);
    let token = loop {
        match vault.get_token("jira", Duration::ZERO).await {
            Ok(token) => break token,
            Err(Error::ProviderUnavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Err(other) => panic!("{other:?}"),
        }
    };
    assert!(token.refreshed);
    assert!(w.provider.is_active(&token.access_token).await);
}

#[tokio::test]
async fn provider_errors_back_off_and_a_still_valid_token_is_served_meanwhile() {
    let w = World::new().await;
    let app = w.vault().await;
    // Still valid for 20 s, inside the 30 s refresh window: a failed refresh serves it anyway.
    let (vault, grant, _) = w.stores(&app, "alice", "jira", 20).await;
    w.provider.reset_stats().await;
    w.provider.fail_next("500", 1).await;
    let served = vault.get_token("jira", Duration::ZERO).await.unwrap();
    assert_eq!(
        (served.access_token.as_str(), served.refreshed),
        (grant.access_token.as_str(), false)
    );
    assert_eq!(w.provider.stats().await.refresh_calls, 1);

    // Expired, and the provider says 429 with Retry-After: 2.
    store_grant(&vault, "jira", &grant, -60).await;
    w.provider.reset_stats().await;
    w.provider.fail_next("429", 1).await;
    assert!(matches!(
        vault.get_token("jira", Duration::ZERO).await,
        Err(Error::ProviderUnavailable(_))
    ));
    assert!(matches!(
        vault.get_token("jira", Duration::ZERO).await,
        Err(Error::ProviderUnavailable(_))
    ));
    assert!(matches!(
        vault.refresh("jira", None).await,
        Err(Error::ProviderUnavailable(_))
    ));
    assert_eq!(
        w.provider.stats().await.refresh_calls,
        1,
        "no provider call inside the Retry-After window"
    );

    fast_forward(&w.db, Duration::from_secs(3)).await;
    let token = vault.get_token("jira", Duration::ZERO).await.unwrap();
    assert!(token.refreshed);
    assert_eq!(w.provider.stats().await.refresh_calls, 2);
}

#[tokio::test]
async fn revoke_at_provider_makes_both_tokens_inactive() {
    let w = World::new().await;
    let app = w.vault().await;
    let (vault, grant, _) = w.stores(&app, "alice", "jira", 3600).await;
    assert!(w.provider.is_active(&grant.access_token).await);

    let revoked = vault.revoke(Some("jira"), true).await.unwrap();

    assert_eq!((revoked.revoked, revoked.provider_revoked), (1, 1));
    assert!(!w.provider.is_active(&grant.access_token).await);
    assert!(!w.provider.is_active(&grant.refresh_token).await);
    assert!(matches!(
        vault.get_token("jira", Duration::ZERO).await,
        Err(Error::CredentialNotFound)
    ));
}

#[tokio::test]
async fn a_revocation_made_during_an_outage_is_delivered_after_it_across_a_vault_restart() {
    let mut w = World::new().await;
    let app = w.vault().await;
    let (vault, grant, _) = w.stores(&app, "bob", "confluence", 3600).await;
    let port = w.provider.port();
    w.provider.kill();

    let revoked = vault.revoke(None, true).await.unwrap();
    assert_eq!(
        (revoked.revoked, revoked.provider_revoked),
        (1, 0),
        "deleted locally, owed to the provider"
    );
    assert!(matches!(
        vault.get_token("confluence", Duration::ZERO).await,
        Err(Error::CredentialNotFound)
    ));
    app.stop().await;

    w.restart_provider();
    assert_eq!(w.provider.port(), port);
    assert!(
        w.provider.is_active(&grant.refresh_token).await,
        "not revoked yet"
    );
    let _restarted = w.vault().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.provider.is_active(&grant.refresh_token).await
        || w.provider.is_active(&grant.access_token).await
    {
        assert!(
            Instant::now() < deadline,
            "the queued revocation was not delivered"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut conn = w.db.connect().await;
    let schema = schema_of("agent-a");
    let left: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{schema}\".revocation_outbox"
    ))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(left, 0, "the outbox is empty once delivered");
    let _ = &w.dir;
}

#[tokio::test]
async fn refresh_with_an_old_generation_returns_the_current_token_without_a_provider_call() {
    let w = World::new().await;
    let app = w.vault().await;
    let grant = w.provider.authorize("alice").await;
    let vault = app.client(&w.issuer, "agent-a", "alice").await;
    let old = vault
        .store_token(
            "jira",
            oauth_token("stale-at", &grant.refresh_token, 3600),
            None,
        )
        .await
        .unwrap();
    let current = store_grant(&vault, "jira", &grant, 3600).await;
    w.provider.reset_stats().await;

    let token = vault.refresh("jira", Some(old.generation)).await.unwrap();

    assert_eq!(token.access_token, grant.access_token);
    assert_eq!(token.generation, current.generation);
    assert!(!token.refreshed);
    assert_eq!(w.provider.stats().await.refresh_calls, 0);

    let fresh = vault
        .refresh("jira", Some(current.generation))
        .await
        .unwrap();
    assert!(fresh.refreshed, "the current generation does refresh");
    assert_eq!(w.provider.stats().await.refresh_calls, 1);
}

#[tokio::test]
async fn refresh_outcomes_are_counted_and_the_provider_call_is_traced_over_otlp() {
    let w = World::new().await;
    let (collector, otlp) = Collector::start().await;
    let mut extra = w.extra();
    extra.push(("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()));
    extra.push(("OTEL_BSP_SCHEDULE_DELAY", "100"));
    let server = start_binary(&settings_pairs(&w.db, &w.issuer, &extra)).await;
    let grant = w.provider.authorize("alice").await;
    let jwt = w.issuer.token("agent-a", "alice");
    let vault = server.client_with(&jwt).await;
    store_grant(&vault, "jira", &grant, -60).await;
    let token = vault.get_token("jira", Duration::ZERO).await.unwrap();
    assert!(token.refreshed);

    // SIGTERM flushes the last spans and metric points.
    drop(vault);
    let status = server.terminate().await;
    assert!(status.success());

    let outcomes = collector.counter("vault.refresh.outcomes", "outcome");
    assert_eq!(outcomes.get("refreshed"), Some(&1), "{outcomes:?}");
    assert_eq!(outcomes.values().sum::<i64>(), 1, "{outcomes:?}");

    let spans = collector.spans();
    let rpc = spans
        .iter()
        .find(|s| s.name == "vault.v1.CredentialVault/GetToken")
        .expect("the GetToken span");
    let provider_call = spans
        .iter()
        .find(|s| s.name == "refresh" && s.trace_id == rpc.trace_id)
        .expect("the provider call is a span in the GetToken trace");
    assert_eq!(attribute(&provider_call.attributes, "tool"), Some("jira"));
    assert_no_secret(
        &collector,
        &[
            &grant.access_token,
            &grant.refresh_token,
            &token.access_token,
            &jwt,
        ],
    );
}

#[tokio::test]
async fn a_refresh_token_is_never_sent_to_an_authorization_server_the_tool_did_not_name_at_store_time()
 {
    let w = World::new().await;
    let app = w.vault().await;
    let (_, _, _) = w.stores(&app, "alice", "jira", -60).await;
    app.stop().await;

    // The operator (or an attacker with write access to the providers file) points the tool at
    // another token endpoint. The credential was stored for the provider's issuer, so its
    // refresh token must not go there.
    let ready = &w.provider.ready;
    let app = w
        .vault_with_jira(&format!("token_url = \"{}\"", ready.token_endpoint))
        .await;
    let vault = app.client(&w.issuer, "agent-a", "alice").await;
    w.provider.reset_stats().await;

    let refused = vault.get_token("jira", Duration::ZERO).await;
    assert!(
        matches!(&refused, Err(Error::ReauthRequired(m)) if m.contains("different authorization server")),
        "{refused:?}"
    );
    assert_eq!(w.provider.stats().await.refresh_calls, 0);
    app.stop().await;

    // Keeping the issuer but overriding its token endpoint is a redirect too.
    let app = w
        .vault_with_jira(&format!(
            "issuer = \"{}\"\ntoken_url = \"{}\"",
            ready.issuer, ready.token_endpoint
        ))
        .await;
    let vault = app.client(&w.issuer, "agent-a", "alice").await;
    assert!(matches!(
        vault.get_token("jira", Duration::ZERO).await,
        Err(Error::ReauthRequired(_))
    ));
    assert_eq!(w.provider.stats().await.refresh_calls, 0);
    app.stop().await;

    // Under the original configuration the same credential refreshes.
    let app = w.vault().await;
    let vault = app.client(&w.issuer, "agent-a", "alice").await;
    assert!(
        vault
            .get_token("jira", Duration::ZERO)
            .await
            .unwrap()
            .refreshed
    );
    assert_eq!(w.provider.stats().await.refresh_calls, 1);
}

#[tokio::test]
async fn callers_cannot_amplify_refreshes_of_a_still_valid_token() {
    let w = World::new().await;
    let mut extra = w.extra();
    extra.retain(|(k, _)| *k != "VAULT_REFRESH_COOLDOWN_SECONDS");
    let app = spawn_with(&w.db, &w.issuer, &extra).await;
    let grant = w.provider.authorize("alice").await;
    let vault = app.client(&w.issuer, "agent-a", "alice").await;
    // Valid for another ten minutes: nothing forces a refresh but the callers' asks.
    let stored = store_grant(&vault, "jira", &grant, 600).await;
    w.provider.reset_stats().await;

    for _ in 0..30 {
        let token = vault
            .get_token("jira", Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(
            (token.access_token.as_str(), token.refreshed),
            (grant.access_token.as_str(), false)
        );
        let forced = vault.refresh("jira", None).await.unwrap();
        assert_eq!(forced.generation, stored.generation);
        assert!(!forced.refreshed);
    }
    assert_eq!(
        w.provider.stats().await.refresh_calls,
        0,
        "60 asks inside the cooldown made no provider call"
    );

    // min_valid_seconds beyond the cap is refused, naming the field and the cap.
    match vault.get_token("jira", Duration::from_secs(3601)).await {
        Err(Error::InvalidArgument { field, message }) => {
            assert_eq!(field, "min_valid_seconds");
            assert!(message.contains("3600"), "{message}");
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }

    // if_generation fencing still answers without a provider call.
    let fenced = vault
        .refresh("jira", Some(stored.generation - 1))
        .await
        .unwrap();
    assert_eq!(fenced.generation, stored.generation);
    assert_eq!(w.provider.stats().await.refresh_calls, 0);
}

#[tokio::test]
async fn an_expired_token_is_refreshed_even_inside_the_cooldown() {
    let w = World::new().await;
    let mut extra = w.extra();
    extra.retain(|(k, _)| *k != "VAULT_REFRESH_COOLDOWN_SECONDS");
    let app = spawn_with(&w.db, &w.issuer, &extra).await;
    let (vault, _, _) = w.stores(&app, "alice", "jira", -60).await;
    w.provider.reset_stats().await;
    let token = vault.get_token("jira", Duration::ZERO).await.unwrap();
    assert!(token.refreshed);
    assert_eq!(w.provider.stats().await.refresh_calls, 1);
}

#[tokio::test]
async fn a_discovery_document_naming_another_issuer_is_refused_and_callers_never_see_urls() {
    let w = World::new().await;
    // The same server under another name: its metadata says https://127.0.0.1:PORT, which is
    // not the issuer configured here (RFC 8414 §3.3).
    let port = w.provider.port();
    let app = w
        .vault_with_jira(&format!("issuer = \"https://localhost:{port}\""))
        .await;
    let (vault, _, _) = w.stores(&app, "alice", "jira", -60).await;
    w.provider.reset_stats().await;

    let refused = vault.get_token("jira", Duration::ZERO).await;
    let Err(Error::ProviderUnavailable(message)) = refused else {
        panic!("expected PROVIDER_UNAVAILABLE, got {refused:?}");
    };
    assert_eq!(w.provider.stats().await.refresh_calls, 0);
    for leak in ["://", "localhost", "127.0.0.1", &port.to_string()] {
        assert!(!message.contains(leak), "{leak} in {message}");
    }
}

#[tokio::test]
async fn an_unreachable_provider_is_reported_without_its_url() {
    let mut w = World::new().await;
    let app = w.vault().await;
    let (vault, _, _) = w.stores(&app, "alice", "confluence", -60).await;
    let port = w.provider.port();
    w.provider.kill();

    let refused = vault.get_token("confluence", Duration::ZERO).await;
    let Err(Error::ProviderUnavailable(message)) = refused else {
        panic!("expected PROVIDER_UNAVAILABLE, got {refused:?}");
    };
    for leak in ["://", "127.0.0.1", &port.to_string(), "/token"] {
        assert!(!message.contains(leak), "{leak} in {message}");
    }
}

/// Past the vault TTL a credential gets by default.
const THIRTY_DAYS_AND_A_SECOND: Duration = Duration::from_secs(30 * 86_400 + 1);

#[tokio::test]
async fn the_ttl_sweep_revokes_what_it_deletes_at_the_provider() {
    let w = World::new().await;
    let app = w.vault().await;
    let (_, grant, _) = w.stores(&app, "alice", "jira", 3600).await;
    // Its vault TTL (the default thirty days) passes, moved in the database rather than waited
    // for.
    fast_forward(&w.db, THIRTY_DAYS_AND_A_SECOND).await;

    let admin = app.admin(&w.issuer, "ops", "operator").await;
    assert_eq!(admin.sweep(0, false).await.unwrap().swept, 1);

    // The outbox delivers it in the background (retry interval 1 s in this world).
    let deadline = Instant::now() + Duration::from_secs(20);
    while w.provider.is_active(&grant.refresh_token).await
        || w.provider.is_active(&grant.access_token).await
    {
        assert!(
            Instant::now() < deadline,
            "the swept tokens were not revoked at the provider"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn with_sweep_revocation_off_the_sweep_only_deletes() {
    let w = World::new().await;
    let mut extra = w.extra();
    extra.push(("VAULT_SWEEP_REVOKE_AT_PROVIDER", "false"));
    let app = spawn_with(&w.db, &w.issuer, &extra).await;
    let (_, grant, _) = w.stores(&app, "alice", "jira", 3600).await;
    let schema = schema_of("agent-a");
    fast_forward(&w.db, THIRTY_DAYS_AND_A_SECOND).await;
    let mut conn = w.db.connect().await;
    let admin = app.admin(&w.issuer, "ops", "operator").await;
    assert_eq!(admin.sweep(0, false).await.unwrap().swept, 1);
    let queued: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{schema}\".revocation_outbox"
    ))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(queued, 0);
    assert!(w.provider.is_active(&grant.refresh_token).await);
}
