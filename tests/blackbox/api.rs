//! The credential round trip, isolation between agents and users, encryption at rest, revoke.

use std::time::Duration;

use sqlx::Row;
use vault_client::{Error, Owner};

use crate::helpers::*;

fn schema(agent: &str) -> String {
    schema_of(agent)
}

#[tokio::test]
async fn a_stored_token_comes_back_to_its_owner() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let gateway = app.client(&issuer, "agent-a", "alice").await;

    let stored = gateway
        .store_token("jira", oauth_token("at-1", "rt-1", 3600), None)
        .await
        .unwrap();
    let token = gateway
        .get_token("jira", Duration::from_secs(60))
        .await
        .unwrap();

    assert!(stored.generation >= 1);
    let expected_ttl = now() + 2_592_000;
    assert!(
        (unix(stored.ttl_expires_at) - expected_ttl).abs() < 60,
        "default TTL is 30 days"
    );
    assert_eq!(token.access_token, "at-1");
    assert_eq!(token.token_type, "Bearer");
    assert_eq!(token.scopes, vec!["read:jira-work", "offline_access"]);
    assert_eq!(token.generation, stored.generation);
    assert!(!token.refreshed);
    assert!((unix(token.expires_at.unwrap()) - (now() + 3600)).abs() < 60);
}

#[tokio::test]
async fn storing_again_replaces_the_token_with_a_newer_generation() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let vault = app.client(&issuer, "agent-a", "alice").await;

    let first = vault
        .store_token("jira", oauth_token("at-1", "rt-1", 3600), None)
        .await
        .unwrap();
    let second = vault
        .store_token("jira", oauth_token("at-2", "rt-2", 3600), None)
        .await
        .unwrap();

    assert!(second.generation > first.generation);
    let token = vault.get_token("jira", Duration::ZERO).await.unwrap();
    assert_eq!(token.access_token, "at-2");
    assert_eq!(token.generation, second.generation);
}

/// Generations are per agent (README): a replaced credential never gets back a number the
/// deleted one had, so nothing computed for the old one can be taken for the new one.
#[tokio::test]
async fn a_credential_deleted_and_stored_again_never_reuses_a_generation() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let vault = app.client(&issuer, "agent-a", "alice").await;

    let old = store(&vault, "jira", "at-1").await;
    let other_tool = store(&vault, "github", "gh-1").await;
    assert!(
        other_tool.generation > old.generation,
        "one counter per agent, not per credential"
    );
    assert_eq!(vault.revoke(Some("jira"), false).await.unwrap().revoked, 1);
    let new = store(&vault, "jira", "at-2").await;

    assert!(
        new.generation > other_tool.generation,
        "{new:?} after {old:?}"
    );
    let token = vault.get_token("jira", Duration::ZERO).await.unwrap();
    assert_eq!(
        (token.access_token.as_str(), token.generation),
        ("at-2", new.generation)
    );
}

#[tokio::test]
async fn concurrent_stores_leave_the_newest_generation() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let vault = app.client(&issuer, "agent-a", "alice").await;

    let mut tasks = Vec::new();
    for i in 0..16 {
        let vault = vault.clone();
        tasks.push(tokio::spawn(async move {
            vault
                .store_token("jira", oauth_token(&format!("at-{i}"), "rt", 3600), None)
                .await
                .unwrap()
        }));
    }
    let mut highest = 0;
    for task in tasks {
        highest = highest.max(task.await.unwrap().generation);
    }

    let token = vault
        .clone()
        .get_token("jira", Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        token.generation, highest,
        "the newest write wins, never an older one"
    );
}

#[tokio::test]
async fn one_user_cannot_read_another_users_token() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let alice = app.client(&issuer, "agent-a", "alice").await;
    let bob = app.client(&issuer, "agent-a", "bob").await;

    store(&alice, "jira", "alice-at").await;

    assert!(matches!(
        bob.get_token("jira", Duration::ZERO).await,
        Err(Error::CredentialNotFound)
    ));
    store(&bob, "jira", "bob-at").await;
    assert_eq!(access_token(&alice, "jira").await, "alice-at");
    assert_eq!(
        bob.get_token("jira", Duration::ZERO)
            .await
            .unwrap()
            .access_token,
        "bob-at"
    );
}

#[tokio::test]
async fn one_agent_cannot_read_another_agents_token_for_the_same_user() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let agent_a = app.client(&issuer, "agent-a", "alice").await;
    let agent_b = app.client(&issuer, "agent-b", "alice").await;

    store(&agent_a, "jira", "a-at").await;

    assert!(matches!(
        agent_b.get_token("jira", Duration::ZERO).await,
        Err(Error::CredentialNotFound)
    ));
    store(&agent_b, "jira", "b-at").await;
    assert_eq!(access_token(&agent_a, "jira").await, "a-at");

    let mut conn = db.connect().await;
    let schemas: Vec<String> =
        sqlx::query_scalar("SELECT schema_name FROM vault.agents ORDER BY 1")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let mut expected = vec![schema("agent-a"), schema("agent-b")];
    expected.sort();
    assert_eq!(schemas, expected, "one schema per agent");
}

#[tokio::test]
async fn an_unknown_tool_is_not_found() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let vault = app.client(&issuer, "agent-a", "alice").await;
    assert!(matches!(
        vault.get_token("stripe", Duration::ZERO).await,
        Err(Error::CredentialNotFound)
    ));
    store(&vault, "jira", "at").await;
    assert!(matches!(
        vault.get_token("stripe", Duration::ZERO).await,
        Err(Error::CredentialNotFound)
    ));
}

/// Every byte column in every vault schema, as raw bytes and as text.
async fn all_stored_bytes(db: &TestDb) -> Vec<u8> {
    let mut conn = db.connect().await;
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema, table_name FROM information_schema.tables
         WHERE table_schema = 'vault' OR table_schema LIKE 'agent\\_%'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let mut all = Vec::new();
    for (schema, table) in tables {
        let rows = sqlx::query(&format!(
            "SELECT to_jsonb(t)::text AS j FROM \"{schema}\".\"{table}\" t"
        ))
        .fetch_all(&mut conn)
        .await
        .unwrap();
        for row in rows {
            let text: String = row.get("j");
            all.extend_from_slice(text.as_bytes());
        }
        let byteas: Vec<String> = sqlx::query_scalar(
            "SELECT column_name::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 AND data_type = 'bytea'",
        )
        .bind(&schema)
        .bind(&table)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        for column in byteas {
            let values: Vec<Option<Vec<u8>>> = sqlx::query_scalar(&format!(
                "SELECT \"{column}\" FROM \"{schema}\".\"{table}\""
            ))
            .fetch_all(&mut conn)
            .await
            .unwrap();
            for value in values.into_iter().flatten() {
                all.extend_from_slice(&value);
            }
        }
    }
    all
}

#[tokio::test]
async fn the_database_holds_no_token_in_clear_or_encoded() {
    use base64::Engine as _;
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let vault = app.client(&issuer, "agent-a", "alice").await;
    let access = "ACCESS-5f1d2c9e-very-secret";
    let refresh = "REFRESH-9a8b7c6d-very-secret";
    vault
        .store_token("jira", oauth_token(access, refresh, 3600), None)
        .await
        .unwrap();

    let stored = all_stored_bytes(&db).await;
    assert!(stored.len() > 100, "the scan saw the credential row");
    for secret in [access, refresh] {
        let forms = [
            secret.as_bytes().to_vec(),
            hex::encode(secret).into_bytes(),
            base64::engine::general_purpose::STANDARD
                .encode(secret)
                .into_bytes(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(secret)
                .into_bytes(),
            // The distinctive middle, in case of an encoding with other padding or alignment.
            b"very-secret".to_vec(),
        ];
        for form in forms {
            assert!(
                !stored.windows(form.len()).any(|w| w == form.as_slice()),
                "found {:?} at rest",
                String::from_utf8_lossy(&form)
            );
        }
    }
}

#[tokio::test]
async fn a_sealed_row_copied_onto_another_users_row_does_not_open() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let alice = app.client(&issuer, "agent-a", "alice").await;
    let mallory = app.client(&issuer, "agent-a", "mallory").await;
    store(&alice, "jira", "alice-secret").await;
    store(&mallory, "jira", "mallory-at").await;

    // An attacker with write access to the table swaps alice's sealed row into mallory's.
    let mut conn = db.connect().await;
    let s = schema("agent-a");
    sqlx::query(&format!(
        "UPDATE \"{s}\".credentials m SET generation = a.generation, key_version = a.key_version,
             wrapped_data_key = a.wrapped_data_key, ciphertext = a.ciphertext
         FROM \"{s}\".credentials a
         WHERE m.user_id = 'mallory' AND a.user_id = 'alice' AND m.tool = 'jira' AND a.tool = 'jira'"
    ))
    .execute(&mut conn)
    .await
    .unwrap();

    let stolen = mallory.get_token("jira", Duration::ZERO).await;
    assert!(
        matches!(&stolen, Err(Error::Other(status)) if status.code() == tonic::Code::Internal),
        "{stolen:?}"
    );
    // The audit log never says the token was released: the release recorded with the read (a
    // lone GetToken's) is retracted by the failure's record.
    let gets: Vec<(i64, String, Option<String>)> = sqlx::query_as(&format!(
        "SELECT sequence, outcome, target FROM \"{s}\".audit_log
         WHERE action = 'GetToken' AND user_id = 'mallory' ORDER BY sequence"
    ))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    match &gets[..] {
        [(released, ok, None), (_, outcome, Some(target))] => {
            assert_eq!((ok.as_str(), outcome.as_str()), ("OK", "INTERNAL"));
            assert_eq!(target, &format!("{{\"retracts\":{released}}}"));
        }
        other => panic!("unexpected GetToken records: {other:?}"),
    }
    assert_eq!(access_token(&alice, "jira").await, "alice-secret");
}

#[tokio::test]
async fn a_sealed_row_copied_into_another_agents_schema_does_not_open() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let agent_a = app.client(&issuer, "agent-a", "alice").await;
    let agent_b = app.client(&issuer, "agent-b", "alice").await;
    store(&agent_a, "jira", "a-secret").await;
    store(&agent_b, "jira", "b-at").await;

    let mut conn = db.connect().await;
    let (a, b) = (schema("agent-a"), schema("agent-b"));
    sqlx::query(&format!(
        "UPDATE \"{b}\".credentials t SET generation = s.generation, key_version = s.key_version,
             wrapped_data_key = s.wrapped_data_key, ciphertext = s.ciphertext
         FROM \"{a}\".credentials s WHERE t.user_id = s.user_id AND t.tool = s.tool"
    ))
    .execute(&mut conn)
    .await
    .unwrap();

    let result = agent_b.get_token("jira", Duration::ZERO).await;
    assert!(
        matches!(&result, Err(Error::Other(status)) if status.code() == tonic::Code::Internal),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_token_survives_a_restart() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let vault = app.client(&issuer, "agent-a", "alice").await;
    let stored = vault
        .store_token("jira", oauth_token("persisted", "rt", 3600), None)
        .await
        .unwrap();
    app.stop().await;

    let app = spawn(&db, &issuer).await;
    let vault = app.client(&issuer, "agent-a", "alice").await;
    let token = vault.get_token("jira", Duration::ZERO).await.unwrap();
    assert_eq!(token.access_token, "persisted");
    assert_eq!(token.generation, stored.generation);
}

#[tokio::test]
async fn refresh_without_a_provider_never_pretends() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let vault = app.client(&issuer, "agent-a", "alice").await;
    let first = vault
        .store_token("jira", oauth_token("at-1", "rt", 3600), None)
        .await
        .unwrap();

    assert!(matches!(
        vault.refresh("jira", None).await,
        Err(Error::ReauthRequired(_))
    ));
    assert!(matches!(
        vault.refresh("stripe", None).await,
        Err(Error::CredentialNotFound)
    ));

    // A caller that saw an older generation gets the newer one without a refresh.
    let second = vault
        .store_token("jira", oauth_token("at-2", "rt", 3600), None)
        .await
        .unwrap();
    let token = vault.refresh("jira", Some(first.generation)).await.unwrap();
    assert_eq!(token.access_token, "at-2");
    assert_eq!(token.generation, second.generation);
    assert!(!token.refreshed);
}

#[tokio::test]
async fn an_expired_access_token_is_not_served_without_a_provider() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let vault = app.client(&issuer, "agent-a", "alice").await;

    vault
        .store_token("expired", oauth_token("old", "rt", -10), None)
        .await
        .unwrap();
    vault
        .store_token("expiring", oauth_token("soon", "rt", 20), None)
        .await
        .unwrap();

    assert!(matches!(
        vault.get_token("expired", Duration::ZERO).await,
        Err(Error::ReauthRequired(_))
    ));
    // Still valid, though inside the refresh window: better than nothing, and not "refreshed".
    let token = vault
        .get_token("expiring", Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(token.access_token, "soon");
    assert!(!token.refreshed);
}

#[tokio::test]
async fn revoke_deletes_one_tool_or_all_of_them() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let vault = app.client(&issuer, "agent-a", "alice").await;
    for tool in ["jira", "stripe", "canva"] {
        vault
            .store_token(tool, oauth_token("at", "rt", 3600), None)
            .await
            .unwrap();
    }

    assert_eq!(vault.revoke(Some("jira"), false).await.unwrap().revoked, 1);
    assert!(matches!(
        vault.get_token("jira", Duration::ZERO).await,
        Err(Error::CredentialNotFound)
    ));
    assert_eq!(
        vault.revoke(Some("jira"), false).await.unwrap().revoked,
        0,
        "idempotent"
    );
    let all = vault.revoke(None, false).await.unwrap();
    assert_eq!((all.revoked, all.provider_revoked), (2, 0));
    assert!(matches!(
        vault.get_token("stripe", Duration::ZERO).await,
        Err(Error::CredentialNotFound)
    ));
}

#[tokio::test]
async fn revoking_for_someone_else_needs_the_admin_scope() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let alice = app.client(&issuer, "agent-a", "alice").await;
    let bob = app.client(&issuer, "agent-a", "bob").await;
    let other_agent = app.client(&issuer, "agent-b", "alice").await;
    store(&alice, "jira", "at").await;
    store(&other_agent, "jira", "at").await;

    let as_bob = bob
        .revoke_for(
            Owner {
                user_id: Some("alice".into()),
                ..Owner::default()
            },
            None,
            false,
        )
        .await;
    assert!(
        matches!(as_bob, Err(Error::PermissionDenied { .. })),
        "{as_bob:?}"
    );
    let cross_agent = bob.revoke_for(owner("agent-b", "bob"), None, false).await;
    assert!(matches!(cross_agent, Err(Error::PermissionDenied { .. })));
    assert!(alice.get_token("jira", Duration::ZERO).await.is_ok());

    let admin = app.admin(&issuer, "ops-console", "operator").await;
    let revoked = admin
        .revoke_for(owner("agent-a", "alice"), None, false)
        .await
        .unwrap();
    assert_eq!(revoked.revoked, 1);
    assert!(matches!(
        alice.get_token("jira", Duration::ZERO).await,
        Err(Error::CredentialNotFound)
    ));
    assert!(
        other_agent.get_token("jira", Duration::ZERO).await.is_ok(),
        "only the named agent's credential went"
    );

    let unknown = admin
        .revoke_for(owner("never-seen", "x"), None, false)
        .await
        .unwrap();
    assert_eq!(unknown.revoked, 0);
}

#[tokio::test]
async fn no_token_ever_reaches_the_logs() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let caller_jwt = issuer.token("agent-log", "alice");
    let vault = app.client_with(&caller_jwt).await;
    let access = "LOGCHECK-ACCESS-7c0ffee";
    let refresh = "LOGCHECK-REFRESH-7c0ffee";

    vault
        .store_token("jira", oauth_token(access, refresh, 3600), None)
        .await
        .unwrap();
    vault.get_token("jira", Duration::ZERO).await.unwrap();
    let _ = vault.refresh("jira", None).await;
    let _ = vault
        .store_token("bad tool", oauth_token(access, refresh, 3600), None)
        .await;
    vault.revoke(Some("jira"), true).await.unwrap();
    let forged = app.client_with(&format!("{caller_jwt}x")).await;
    let _ = forged.get_token("jira", Duration::ZERO).await;

    let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
    assert!(logs.contains("stored credential"), "the log capture works");
    for secret in [access, refresh, "7c0ffee", caller_jwt.as_str()] {
        assert!(!logs.contains(secret), "{secret} appeared in the logs");
    }
    let signature = caller_jwt.rsplit('.').next().unwrap();
    assert!(!logs.contains(signature));
}
