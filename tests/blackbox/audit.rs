//! The audit log, black-box: each RPC leaves exactly its record in the right chain, no record
//! holds a secret in any encoding, and a call whose record cannot be written fails without its
//! write becoming visible (issue 15).

use std::time::Duration;

use base64::Engine as _;
use sqlx::Connection as _;
use vault_client::{Error, ErrorReason};

use crate::helpers::*;

/// One record, as the tests compare them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    action: String,
    outcome: String,
    agent: Option<String>,
    user: Option<String>,
    tool: Option<String>,
    verified: bool,
}

/// The first record of an agent's chain: its key was made.
fn key_created() -> Row {
    Row {
        user: None,
        ..row("key.agent_created", "OK", "", None)
    }
}

fn row(action: &str, outcome: &str, user: &str, tool: Option<&str>) -> Row {
    Row {
        action: action.into(),
        outcome: outcome.into(),
        agent: Some("agent-a".into()),
        user: Some(user.into()),
        tool: tool.map(Into::into),
        verified: true,
    }
}

type Raw = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    bool,
);

fn rows(raw: Vec<Raw>) -> Vec<Row> {
    raw.into_iter()
        .map(|(action, outcome, agent, user, tool, verified)| Row {
            action,
            outcome,
            agent,
            user,
            tool,
            verified,
        })
        .collect()
}

const COLUMNS: &str = "action, outcome, agent, user_id, tool, verified";

/// The records of `agent`'s chain on PostgreSQL, in order.
async fn agent_rows(db: &TestDb, agent: &str) -> Vec<Row> {
    let mut conn = db.connect().await;
    let raw: Vec<Raw> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM \"{}\".audit_log ORDER BY sequence",
        schema_of(agent)
    ))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    rows(raw)
}

/// The control plane's records on PostgreSQL, in order, without the servers' startups and
/// shutdowns.
async fn control_rows(db: &TestDb) -> Vec<Row> {
    let mut conn = db.connect().await;
    let raw: Vec<Raw> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM vault.audit_log
         WHERE action NOT IN ('startup', 'shutdown') ORDER BY sequence"
    ))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    rows(raw)
}

/// Every kind of call the suite makes, as agent-a (alice, and an admin acting on bob), plus a
/// forged token; returns the secrets that went by.
async fn every_kind_of_call(app: &TestApp, issuer: &Issuer) -> Vec<String> {
    let gateway = app
        .client_with(&issuer.scoped_token("agent-a", "alice", "vault:store"))
        .await;
    let alice_token = issuer.agent_token("agent-a", "alice");
    let alice = app.client_with(&alice_token).await;
    let admin = app.admin(issuer, "agent-a", "root").await;

    gateway
        .store_token(
            "jira",
            oauth_token("at-JIRA-secret-1", "rt-JIRA-secret-1", 3600),
            None,
        )
        .await
        .unwrap();
    alice.get_token("jira", Duration::ZERO).await.unwrap();
    assert!(matches!(
        alice.get_token("zoom", Duration::ZERO).await,
        Err(Error::CredentialNotFound)
    ));
    assert!(matches!(
        alice.get_token("bad tool!", Duration::ZERO).await,
        Err(Error::InvalidArgument { .. })
    ));
    // No provider is configured: the vault cannot refresh.
    assert!(matches!(
        alice.refresh("jira", None).await,
        Err(Error::ReauthRequired(_))
    ));
    alice.list_credentials().await.unwrap();
    // An agent may not write: StoreToken needs the store scope.
    assert!(matches!(
        alice
            .store_token("jira", oauth_token("at-NOPE-secret", "", 60), None)
            .await,
        Err(Error::PermissionDenied { .. })
    ));
    let bob_gateway = app
        .client_with(&issuer.scoped_token("agent-a", "bob", "vault:store"))
        .await;
    bob_gateway
        .store_token(
            "slack",
            oauth_token("at-SLACK-secret-2", "rt-SLACK-secret-2", 3600),
            None,
        )
        .await
        .unwrap();
    admin
        .revoke_for(owner("agent-a", "bob"), Some("slack"), false)
        .await
        .unwrap();
    alice.revoke(Some("jira"), false).await.unwrap();
    admin.sweep(10, true).await.unwrap();
    // A token from nobody the vault trusts.
    let forged = Issuer::named("https://forger.example").token("agent-a", "mallory");
    let stranger = app.client_with(&forged).await;
    assert!(matches!(
        stranger.get_token("jira", Duration::ZERO).await,
        Err(Error::Unauthenticated(_))
    ));
    vec![
        "at-JIRA-secret-1".into(),
        "rt-JIRA-secret-1".into(),
        "at-NOPE-secret".into(),
        "at-SLACK-secret-2".into(),
        "rt-SLACK-secret-2".into(),
        alice_token,
        forged,
    ]
}

#[tokio::test]
async fn each_rpc_leaves_exactly_its_record_in_its_agents_chain_or_the_control_chain() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    every_kind_of_call(&app, &issuer).await;

    let admin_on_bob = Row {
        user: Some("bob".into()),
        ..row("Revoke", "OK", "bob", Some("slack"))
    };
    assert_eq!(
        agent_rows(&db, "agent-a").await,
        [
            key_created(),
            row("StoreToken", "OK", "alice", Some("jira")),
            row("GetToken", "OK", "alice", Some("jira")),
            row("GetToken", "CREDENTIAL_NOT_FOUND", "alice", Some("zoom")),
            row("Refresh", "REAUTH_REQUIRED", "alice", Some("jira")),
            row("ListCredentials", "OK", "alice", None),
            row("StoreToken", "OK", "bob", Some("slack")),
            admin_on_bob,
            row("Revoke", "OK", "alice", Some("jira")),
        ]
    );
    // Calls refused before an agent was looked up (the invalid tool, the missing store scope),
    // the sweep (every agent's), and the forged token, under the identity it claimed,
    // unverified.
    assert_eq!(
        control_rows(&db).await,
        [
            row("GetToken", "INVALID_ARGUMENT", "alice", None),
            row("StoreToken", "PERMISSION_DENIED", "alice", Some("jira")),
            Row {
                agent: Some("agent-a".into()),
                ..row("Sweep", "OK", "root", None)
            },
            Row {
                verified: false,
                ..row("GetToken", "UNAUTHENTICATED", "mallory", None)
            },
        ]
    );

    // The admin's record names who acted, and the chain verifies end to end.
    let mut conn = db.connect().await;
    let target: String = sqlx::query_scalar(&format!(
        "SELECT target FROM \"{}\".audit_log WHERE user_id = 'bob' AND action = 'Revoke'",
        schema_of("agent-a")
    ))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let target: serde_json::Value = serde_json::from_str(&target).unwrap();
    assert_eq!(target["by_user"], "root");
    assert_eq!(target["user"], "bob");
}

#[tokio::test]
async fn no_audit_record_holds_a_token_or_jwt_in_plain_base64_or_hex_form() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let secrets = every_kind_of_call(&app, &issuer).await;
    let mut conn = db.connect().await;
    let mut dump: Vec<String> = sqlx::query_scalar("SELECT a::text FROM vault.audit_log a")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    dump.extend(
        sqlx::query_scalar::<_, String>(&format!(
            "SELECT a::text FROM \"{}\".audit_log a",
            schema_of("agent-a")
        ))
        .fetch_all(&mut conn)
        .await
        .unwrap(),
    );
    assert!(dump.len() >= 12, "{dump:?}");
    let dump = dump.join("\n");
    for secret in &secrets {
        let forms = [
            secret.clone(),
            hex::encode(secret),
            base64::engine::general_purpose::STANDARD.encode(secret),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
        ];
        for form in forms {
            // Long enough that a chance match is impossible.
            let probe = &form[..form.len().min(24)];
            assert!(!dump.contains(probe), "{probe} found in the audit log");
        }
    }
    // Every JWT part, too: the signature and the payload of the caller tokens.
    for jwt in secrets.iter().filter(|s| s.matches('.').count() == 2) {
        for part in jwt.split('.') {
            assert!(!dump.contains(part), "a JWT part is in the audit log");
        }
    }
}

#[tokio::test]
async fn a_call_whose_record_cannot_be_written_fails_and_its_write_is_not_visible() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let gateway = app
        .client_with(&issuer.scoped_token("agent-a", "alice", "vault:store"))
        .await;
    let alice = app.client(&issuer, "agent-a", "alice").await;
    let first = store(&gateway, "jira", "at-first").await;

    // The agent's audit log refuses every append, whoever makes it (an audit device that is
    // down: a trigger, since the tests' vault logs in as a superuser, whom no REVOKE binds).
    let mut conn = db.connect().await;
    let log = format!("\"{}\".audit_log", schema_of("agent-a"));
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION public.audit_device_down() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN RAISE EXCEPTION 'audit device down'; END $$;
         CREATE TRIGGER down BEFORE INSERT ON {log}
             FOR EACH ROW EXECUTE FUNCTION public.audit_device_down();"
    ))
    .execute(&mut conn)
    .await
    .unwrap();

    let refused = gateway
        .store_token("jira", oauth_token("at-second", "", 3600), None)
        .await
        .unwrap_err();
    assert_eq!(
        refused.reason(),
        ErrorReason::AuditUnavailable,
        "{refused:?}"
    );
    let refused = alice.get_token("jira", Duration::ZERO).await.unwrap_err();
    assert_eq!(
        refused.reason(),
        ErrorReason::AuditUnavailable,
        "a release that cannot be recorded is not made: {refused:?}"
    );
    let refused = alice.revoke(Some("jira"), false).await.unwrap_err();
    assert_eq!(refused.reason(), ErrorReason::AuditUnavailable);

    sqlx::raw_sql(&format!("DROP TRIGGER down ON {log}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let token = alice.get_token("jira", Duration::ZERO).await.unwrap();
    assert_eq!(
        token.access_token, "at-first",
        "neither the second store nor the revoke took effect"
    );
    assert_eq!(token.generation, first.generation);
    let actions: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT action, outcome FROM \"{}\".audit_log ORDER BY sequence",
        schema_of("agent-a")
    ))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        actions,
        [
            ("key.agent_created".to_string(), "OK".to_string()),
            ("StoreToken".to_string(), "OK".to_string()),
            ("GetToken".to_string(), "OK".to_string()),
        ],
        "nothing unaudited happened in between"
    );
}

#[tokio::test]
async fn with_releases_off_successful_gets_are_not_recorded_and_everything_else_is() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(&db, &issuer, &[("VAULT_AUDIT_RELEASES", "off")]).await;
    let gateway = app
        .client_with(&issuer.scoped_token("agent-a", "alice", "vault:store"))
        .await;
    let alice = app.client(&issuer, "agent-a", "alice").await;
    store(&gateway, "jira", "at-1").await;
    alice.get_token("jira", Duration::ZERO).await.unwrap();
    alice.get_token("zoom", Duration::ZERO).await.unwrap_err();
    assert_eq!(
        agent_rows(&db, "agent-a").await,
        [
            key_created(),
            row("StoreToken", "OK", "alice", Some("jira")),
            row("GetToken", "CREDENTIAL_NOT_FOUND", "alice", Some("zoom")),
        ]
    );
}

#[tokio::test]
async fn on_sqlite_a_store_that_cannot_be_recorded_fails_and_is_not_visible() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vault.db");
    let url = format!("sqlite://{}", file.display());
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(&db, &issuer, &[("VAULT_DATABASE_URL", url.as_str())]).await;
    let gateway = app
        .client_with(&issuer.scoped_token("agent-a", "alice", "vault:store"))
        .await;
    let alice = app.client(&issuer, "agent-a", "alice").await;
    store(&gateway, "jira", "at-first").await;
    alice.get_token("jira", Duration::ZERO).await.unwrap();

    let mut side = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let recorded: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT action, outcome, user_id FROM audit_log WHERE chain <> 'control' ORDER BY sequence",
    )
    .fetch_all(&mut side)
    .await
    .unwrap();
    assert_eq!(
        recorded,
        [
            ("key.agent_created".into(), "OK".into(), None),
            ("StoreToken".into(), "OK".into(), Some("alice".into())),
            ("GetToken".into(), "OK".into(), Some("alice".into())),
        ]
    );
    sqlx::query(
        "CREATE TRIGGER no_audit BEFORE INSERT ON audit_log
         BEGIN SELECT RAISE(ABORT, 'audit device broken'); END",
    )
    .execute(&mut side)
    .await
    .unwrap();
    let refused = gateway
        .store_token("jira", oauth_token("at-second", "", 3600), None)
        .await
        .unwrap_err();
    assert_eq!(
        refused.reason(),
        ErrorReason::AuditUnavailable,
        "{refused:?}"
    );
    sqlx::query("DROP TRIGGER no_audit")
        .execute(&mut side)
        .await
        .unwrap();
    let token = alice.get_token("jira", Duration::ZERO).await.unwrap();
    assert_eq!(token.access_token, "at-first");
}

/// ListAuditEvents through the generated client, as `jwt`.
pub async fn list_audit(
    app: &TestApp,
    jwt: &str,
    query: vault_client::proto::ListAuditEventsRequest,
) -> Result<vault_client::proto::ListAuditEventsResponse, tonic::Status> {
    let mut client = vault_client::proto::credential_vault_client::CredentialVaultClient::new(
        channel(&app.endpoint()).await,
    );
    let mut request = tonic::Request::new(query);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {jwt}").parse().expect("ASCII token"),
    );
    client
        .list_audit_events(request)
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn an_admin_pages_through_an_agents_audit_log_filtered_by_user_and_tool() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    for (user, tool) in [
        ("alice", "jira"),
        ("bob", "jira"),
        ("alice", "slack"),
        ("alice", "jira"),
    ] {
        let gateway = app.client_with(&issuer.token("agent-a", user)).await;
        store(&gateway, tool, "at").await;
    }
    let admin = issuer.admin_token("agent-a", "root");
    let query = |after_sequence, limit| vault_client::proto::ListAuditEventsRequest {
        agent_id: "agent-a".into(),
        user_id: "alice".into(),
        tool: "jira".into(),
        after_sequence,
        limit,
    };
    let first = list_audit(&app, &admin, query(0, 1)).await.unwrap();
    assert_eq!(first.events.len(), 1);
    assert_eq!(first.events[0].sequence, 2, "after the key's creation");
    assert_eq!(first.events[0].action, "StoreToken");
    assert_eq!(first.events[0].hash.len(), 64, "hex SHA-256");
    assert!(!first.events[0].caller_digest.is_empty());
    let rest = list_audit(&app, &admin, query(first.next_after_sequence, 10))
        .await
        .unwrap();
    assert_eq!(
        rest.events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [5],
        "bob's and the slack record are filtered out"
    );
    assert_eq!(rest.next_after_sequence, 0, "the end of the chain");

    // The control chain: the server's startup is there.
    let control = list_audit(
        &app,
        &admin,
        vault_client::proto::ListAuditEventsRequest::default(),
    )
    .await
    .unwrap();
    assert_eq!(control.events[0].action, "startup");

    // Not for an agent.
    let refused = list_audit(&app, &issuer.token("agent-a", "alice"), query(0, 10))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let after = list_audit(&app, &admin, query(5, 10)).await.unwrap();
    assert!(after.events.is_empty());
    let too_many = list_audit(&app, &admin, query(0, 1001)).await.unwrap_err();
    assert_eq!(too_many.code(), tonic::Code::InvalidArgument);
    assert!(
        too_many.message().contains("limit"),
        "{}",
        too_many.message()
    );
}

/// GetTokens on different agents at once each write their release record in the statement that
/// reads their credential (a turn per chain), while those on one agent also share the group
/// commit: every release is recorded exactly once, in its own agent's chain, and every chain
/// verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_releases_on_many_agents_are_each_recorded_once_and_the_chains_verify() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let agents = ["agent-a", "agent-b", "agent-c", "agent-d"];
    let mut clients = Vec::new();
    for agent in agents {
        let vault = app.client(&issuer, agent, "alice").await;
        store(&vault, "jira", agent).await;
        clients.push(vault);
    }
    let mut calls = tokio::task::JoinSet::new();
    for (vault, agent) in clients.iter().zip(agents) {
        for _ in 0..8 {
            let vault = vault.clone();
            calls.spawn(async move { assert_eq!(access_token(&vault, "jira").await, agent) });
        }
    }
    while let Some(call) = calls.join_next().await {
        call.unwrap();
    }
    app.stop().await;
    for agent in agents {
        let rows = agent_rows(&db, agent).await;
        let releases = rows
            .iter()
            .filter(|r| r.action == "GetToken" && r.outcome == "OK")
            .count();
        assert_eq!(releases, 8, "{agent}: {rows:?}");
        assert!(rows.iter().all(|r| r.agent.as_deref() == Some(agent)));
    }
    let url = db.url.clone();
    let (ok, err) = tokio::task::spawn_blocking(move || {
        run_binary_to_exit(
            &["audit", "verify"],
            &[
                ("VAULT_DATABASE_URL", url.as_str()),
                ("VAULT_ROOT_KEY", ROOT_KEY),
            ],
        )
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
}
