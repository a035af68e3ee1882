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

/// When the sweep next visits `agent`'s schema, and the earliest TTL of its credentials, in
/// Unix seconds.
/// Waits until one statement of the test database matching `like` waits for a lock.
async fn waits_for_a_lock(db: &TestDb, like: &'static str) {
    let watch = sqlx::PgPool::connect(&db.url).await.unwrap();
    eventually("a statement waits for a lock", || {
        let watch = watch.clone();
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND query LIKE $1",
            )
            .bind(like)
            .fetch_one(&watch)
            .await
            .unwrap();
            waiting == 1
        }
    })
    .await;
}

async fn due_and_earliest(db: &TestDb, agent: &str) -> (Option<i64>, Option<i64>) {
    let mut conn = db.connect().await;
    let schema = schema_of(agent);
    let due: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM sweep_due)::float8 FROM vault.agents WHERE schema_name = $1",
    )
    .bind(&schema)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let earliest: Option<f64> = sqlx::query_scalar(&format!(
        "SELECT extract(epoch FROM min(ttl_expires_at))::float8 FROM \"{schema}\".credentials"
    ))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    (due.map(|s| s as i64), earliest.map(|s| s as i64))
}

#[tokio::test]
async fn a_sweep_visits_only_the_agents_with_a_credential_due() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let two_hours = Duration::from_secs(7200);
    for agent in ["agent-a", "agent-b"] {
        let vault = app.client(&issuer, agent, "alice").await;
        store_for(&vault, "jira", "at", two_hours).await;
    }
    let short = app.client(&issuer, "agent-c", "alice").await;
    store_for(&short, "jira", "at", Duration::from_secs(1)).await;
    for agent in ["agent-a", "agent-b", "agent-c"] {
        let (due, earliest) = due_and_earliest(&db, agent).await;
        assert_eq!(
            due, earliest,
            "{agent}: due when its only credential expires"
        );
    }
    // A second credential expiring sooner brings its agent's sweep forward.
    let sooner = app.client(&issuer, "agent-a", "bob").await;
    store_for(&sooner, "jira", "at", Duration::from_secs(600)).await;
    let (due, earliest) = due_and_earliest(&db, "agent-a").await;
    assert_eq!(due, earliest);
    assert!(due.unwrap() <= now() + 601);

    // agent-b's credential expires behind the vault's back, its schedule unmoved: a sweep that
    // visited every agent would delete it.
    let mut conn = db.connect().await;
    sqlx::query(&format!(
        "UPDATE \"{}\".credentials SET ttl_expires_at = now() - interval '1 second'",
        schema_of("agent-b")
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    fast_forward(&db, Duration::from_secs(2)).await;

    let admin = app.admin(&issuer, "ops", "operator").await;
    let swept = admin.sweep(0, false).await.unwrap();
    assert_eq!((swept.swept, swept.more), (1, false), "agent-c's only");
    assert_eq!(count_rows(&db).await, 3, "agent-a's two and agent-b's");
    let (due, earliest) = due_and_earliest(&db, "agent-c").await;
    assert_eq!(earliest, None);
    let (half_day, day) = (12 * 3600, 24 * 3600);
    let ahead = due.unwrap() - now();
    assert!(
        (half_day - 60..=day + 60).contains(&ahead),
        "an agent with nothing left is still visited within a day, at a time drawn from the \
         second half of it: {ahead} s ahead"
    );
    assert_eq!(
        admin.sweep(0, false).await.unwrap().swept,
        0,
        "nobody is due"
    );

    // An hour on, and agent-b's day over (as if it had passed): agent-b is visited, and its
    // credential swept, with agent-a's shorter one.
    fast_forward(&db, Duration::from_secs(3600)).await;
    sqlx::query("UPDATE vault.agents SET sweep_due = now() WHERE schema_name = $1")
        .bind(schema_of("agent-b"))
        .execute(&mut conn)
        .await
        .unwrap();
    let swept = admin.sweep(0, false).await.unwrap();
    assert_eq!(swept.swept, 2);
    assert_eq!(count_rows(&db).await, 1);
    let (due, earliest) = due_and_earliest(&db, "agent-a").await;
    assert_eq!(due, earliest, "agent-a's next is its two-hour credential");
}

#[tokio::test]
async fn a_credential_written_while_its_agent_is_swept_still_brings_the_sweep_forward() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let alice = app.client(&issuer, "agent-a", "alice").await;
    store_for(&alice, "jira", "at", Duration::from_secs(3600)).await;

    // A sweep of agent-a in progress: the agent fell due, the sweep holds its row, has read its
    // credentials, and will set its schedule to what it read.
    let mut sweep = db.connect().await;
    sqlx::query(
        "UPDATE vault.agents SET sweep_due = now() - interval '1 second' WHERE schema_name = $1",
    )
    .bind(schema_of("agent-a"))
    .execute(&mut sweep)
    .await
    .unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut sweep).await.unwrap();
    sqlx::query("SELECT 1 FROM vault.agents WHERE schema_name = $1 FOR NO KEY UPDATE")
        .bind(schema_of("agent-a"))
        .fetch_one(&mut sweep)
        .await
        .unwrap();

    // Meanwhile bob's credential commits, expiring sooner; its store waits for the sweep.
    let bob = app.client(&issuer, "agent-a", "bob").await;
    let write = tokio::spawn(async move {
        store_for(&bob, "jira", "at", Duration::from_secs(60)).await;
    });
    waits_for_a_lock(&db, "UPDATE vault.agents%").await;
    sqlx::query(
        "UPDATE vault.agents SET sweep_due = now() + interval '1 hour' WHERE schema_name = $1",
    )
    .bind(schema_of("agent-a"))
    .execute(&mut sweep)
    .await
    .unwrap();
    sqlx::raw_sql("COMMIT").execute(&mut sweep).await.unwrap();
    write.await.unwrap();

    let (due, earliest) = due_and_earliest(&db, "agent-a").await;
    assert_eq!(due, earliest, "bob's credential is due first");
    assert!(due.unwrap() <= now() + 61);
}

/// A store whose TTL is not earlier than the agent's schedule skips lowering it (control
/// migration 0018). A sweep of the agent while such a store is between its key fence and its
/// commit cannot see the store's credential; it must not move the schedule past that
/// credential's TTL, or the credential would be swept up to a day late.
#[tokio::test]
async fn a_store_in_flight_while_its_agent_is_swept_is_not_left_behind_the_schedule() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let (alice, bob) = (
        app.client(&issuer, "agent-a", "alice").await,
        app.client(&issuer, "agent-a", "bob").await,
    );
    store_for(&bob, "jira", "at", Duration::from_secs(3 * 3600)).await;
    store_for(&alice, "jira", "at", Duration::from_secs(3600)).await;
    // alice's credential goes: the schedule, an hour ahead, is now only a lower bound.
    alice.revoke(Some("jira"), false).await.unwrap();
    let schema = schema_of("agent-a");

    // bob's next store, for two hours, reads the schedule at its fence (an hour ahead: no need
    // to lower it) and then waits for bob's row, held here.
    let mut hold = db.connect().await;
    sqlx::raw_sql("BEGIN").execute(&mut hold).await.unwrap();
    sqlx::query(&format!(
        "SELECT 1 FROM \"{schema}\".credentials WHERE user_id = 'bob' FOR UPDATE"
    ))
    .fetch_one(&mut hold)
    .await
    .unwrap();
    let write = tokio::spawn(async move {
        store_for(&bob, "jira", "at", Duration::from_secs(2 * 3600)).await;
    });
    waits_for_a_lock(&db, "INSERT INTO%credentials%").await;

    // Meanwhile the agent falls due (another store's short credential, since expired, lowered
    // it) and a sweep visits it. Its snapshot holds bob's old row, three hours ahead.
    sqlx::query(
        "UPDATE vault.agents SET sweep_due = now() - interval '1 second' WHERE schema_name = $1",
    )
    .bind(&schema)
    .execute(&mut db.connect().await)
    .await
    .unwrap();
    let admin = app.admin(&issuer, "ops", "operator").await;
    assert_eq!(admin.sweep(0, false).await.unwrap().swept, 0);
    sqlx::raw_sql("COMMIT").execute(&mut hold).await.unwrap();
    write.await.unwrap();

    let (due, earliest) = due_and_earliest(&db, "agent-a").await;
    assert!(
        due.unwrap() <= earliest.unwrap(),
        "the agent is visited no later than bob's new TTL: due {due:?}, earliest {earliest:?}"
    );
    // Once no store is in flight, a sweep schedules the agent at that TTL.
    admin.sweep(0, false).await.unwrap();
    let (due, earliest) = due_and_earliest(&db, "agent-a").await;
    assert_eq!(due, earliest);
    assert!(earliest.unwrap() <= now() + 2 * 3600 + 1);
}

/// An agent whose schema cannot be read (dropped behind the vault's back) stays due and is
/// logged, and neither the sweep nor the revocation outbox's pass stops at it: both go on with
/// the other agents.
#[tokio::test]
async fn an_agent_that_cannot_be_visited_does_not_hold_up_the_others() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(
        &db,
        &issuer,
        &[("VAULT_REVOCATION_RETRY_INTERVAL_SECONDS", "1")],
    )
    .await;
    for agent in ["agent-a", "agent-b"] {
        let vault = app.client(&issuer, agent, "alice").await;
        store_for(&vault, "jira", "at", Duration::from_secs(3600)).await;
    }
    let (a, b) = (schema_of("agent-a"), schema_of("agent-b"));
    let mut conn = db.connect().await;
    // agent-a is damaged and first in line for both; agent-b's credential has expired.
    sqlx::raw_sql(&format!(
        "DROP SCHEMA \"{a}\" CASCADE;
         UPDATE vault.agents SET sweep_due = '-infinity', outbox_due = '-infinity'
         WHERE schema_name = '{a}';
         UPDATE \"{b}\".credentials SET ttl_expires_at = now() - interval '1 second';
         UPDATE vault.agents SET sweep_due = now() - interval '1 second'
         WHERE schema_name = '{b}';"
    ))
    .execute(&mut conn)
    .await
    .unwrap();

    let admin = app.admin(&issuer, "ops", "operator").await;
    assert_eq!(admin.sweep(0, false).await.unwrap().swept, 1, "agent-b's");
    // Its revocation is queued, and settled by a later pass (no provider is configured for the
    // tool, so it is recorded as abandoned and leaves the outbox).
    eventually("agent-b's queued revocation is settled", || async {
        let mut conn = db.connect().await;
        let settled: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{b}\".audit_log WHERE action = 'revocation.abandoned'"
        ))
        .fetch_one(&mut conn)
        .await
        .unwrap();
        settled == 1
    })
    .await;
    let due: bool = sqlx::query_scalar(
        "SELECT sweep_due <= now() AND outbox_due <= now() FROM vault.agents
         WHERE schema_name = $1",
    )
    .bind(&a)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(due, "agent-a stays due for both");
    app.stop().await;
}
