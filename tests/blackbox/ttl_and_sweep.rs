//! Vault TTL: never served once passed, swept by the RPC and by the background sweeper, and
//! each expired row deleted exactly once however many sweepers run.

use std::time::Duration;

use vault_client::Error;

use crate::helpers::*;

async fn count_rows(db: &TestDb) -> i64 {
    let mut conn = db.connect().await;
    let schemas: Vec<String> = sqlx::query_scalar("SELECT schema_name FROM vault.agents")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let mut total = 0;
    for schema in schemas {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{schema}\".credentials"))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        total += n;
    }
    total
}

/// Stores `access` for `tool` through `vault`, kept by the vault for `ttl`.
async fn store_for(
    vault: &vault_client::Client,
    tool: &str,
    access: &str,
    ttl: Duration,
) -> vault_client::Stored {
    vault
        .store_token(tool, oauth_token(access, "rt", 3600), Some(ttl))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_credential_past_its_ttl_is_never_served_even_before_the_sweep() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let vault = app.client(&issuer, "agent-a", "alice").await;
    let stored = store_for(&vault, "jira", "short-lived", Duration::from_secs(1)).await;
    assert!(unix(stored.ttl_expires_at) <= now() + 2);
    assert!(vault.get_token("jira", Duration::ZERO).await.is_ok());

    fast_forward(&db, Duration::from_secs(2)).await;

    assert!(matches!(
        vault.get_token("jira", Duration::ZERO).await,
        Err(Error::CredentialNotFound)
    ));
    assert!(matches!(
        vault.refresh("jira", None).await,
        Err(Error::CredentialNotFound)
    ));
    assert_eq!(count_rows(&db).await, 1, "still in the table until swept");

    let admin = app.admin(&issuer, "ops", "operator").await;
    let dry = admin.sweep(0, true).await.unwrap();
    assert_eq!((dry.swept, dry.more), (1, false));
    assert_eq!(count_rows(&db).await, 1, "a dry run deletes nothing");
    let swept = admin.sweep(0, false).await.unwrap();
    assert_eq!((swept.swept, swept.more), (1, false));
    assert_eq!(count_rows(&db).await, 0);
}

#[tokio::test]
async fn a_ttl_longer_than_the_configured_one_is_shortened() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(&db, &issuer, &[("SECRETS_TTL_SECONDS", "100")]).await;
    let vault = app.client(&issuer, "agent-a", "alice").await;

    let longer = store_for(&vault, "jira", "at", Duration::from_secs(1_000_000)).await;
    let default = store(&vault, "stripe", "at").await;
    let shorter = store_for(&vault, "canva", "at", Duration::from_secs(10)).await;

    assert!(
        (unix(longer.ttl_expires_at) - (now() + 100)).abs() <= 2,
        "clamped to 100 s"
    );
    assert!((unix(default.ttl_expires_at) - (now() + 100)).abs() <= 2);
    assert!((unix(shorter.ttl_expires_at) - (now() + 10)).abs() <= 2);
}

#[tokio::test]
async fn sweep_respects_its_limit_and_reports_more() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    for user in 0..5 {
        let vault = app
            .client(&issuer, "agent-a", &format!("user-{user}"))
            .await;
        store_for(&vault, "jira", "at", Duration::from_secs(1)).await;
    }
    let keeper = app.client(&issuer, "agent-a", "keeper").await;
    store(&keeper, "jira", "kept").await;
    fast_forward(&db, Duration::from_secs(2)).await;

    let admin = app.admin(&issuer, "ops", "operator").await;
    let first = admin.sweep(3, false).await.unwrap();
    assert_eq!((first.swept, first.more), (3, true));
    let second = admin.sweep(3, false).await.unwrap();
    assert_eq!((second.swept, second.more), (2, false));
    assert_eq!(access_token(&keeper, "jira").await, "kept");
    assert_eq!(count_rows(&db).await, 1);
}

#[tokio::test]
async fn two_servers_sweeping_at_once_delete_each_row_once() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let first = spawn(&db, &issuer).await;
    let second = spawn(&db, &issuer).await;
    let expired = 120;
    for i in 0..expired {
        let agent = format!("agent-{}", i % 4);
        let vault = first.client(&issuer, &agent, &format!("user-{i}")).await;
        store_for(&vault, "jira", "at", Duration::from_secs(1)).await;
    }
    fast_forward(&db, Duration::from_secs(2)).await;

    let mut tasks = Vec::new();
    for app in [&first, &second, &first, &second] {
        let admin = app.admin(&issuer, "ops", "operator").await;
        tasks.push(tokio::spawn(async move {
            let mut total = 0;
            loop {
                let outcome = admin.sweep(7, false).await.unwrap();
                total += outcome.swept;
                if outcome.swept == 0 {
                    return total;
                }
            }
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }

    assert_eq!(
        total, expired as u64,
        "every row counted by exactly one sweeper"
    );
    assert_eq!(count_rows(&db).await, 0);
}

#[tokio::test]
async fn the_background_sweeper_deletes_expired_credentials_under_one_lease() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let extra = [("VAULT_SWEEP_INTERVAL_SECONDS", "1")];
    let first = spawn_with(&db, &issuer, &extra).await;
    let _second = spawn_with(&db, &issuer, &extra).await;
    let vault = first.client(&issuer, "agent-a", "alice").await;
    store_for(&vault, "jira", "at", Duration::from_secs(1)).await;
    store(&vault, "stripe", "at").await;

    fast_forward(&db, Duration::from_secs(2)).await;
    eventually(
        "the background sweeper deletes the expired credential",
        || async { count_rows(&db).await <= 1 },
    )
    .await;
    assert_eq!(access_token(&vault, "stripe").await, "at");

    let mut conn = db.connect().await;
    let holders: i64 =
        sqlx::query_scalar("SELECT count(*) FROM vault.leases WHERE name = 'sweeper'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(holders, 1, "one lease row, held by one replica at a time");
}
