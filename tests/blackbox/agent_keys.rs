//! Agent key rotation (issue 17): `rotate-agent-key` online under load on two replicas, killed
//! halfway and run again, the RotateAgentKey RPC, and the embedded store.

use std::time::Duration;

use vault_client::proto::rotate_agent_key_response::State;
use vault_client::proto::{RotateAgentKeyRequest, RotateAgentKeyResponse};

use crate::helpers::{
    Issuer, ROOT_KEY, TestDb, access_token, channel, eventually, schema_of, spawn_with, store,
};
use crate::keys::{Killable, WriteReadLoad, run, waits_on_lock};

const AGENT: &str = "rotating-agent";
const BYSTANDER: &str = "bystander-agent";

fn user(n: usize) -> String {
    format!("user-{n:02}")
}

/// Runs `vault-server rotate-agent-key ARGS` on `db_url` (root [`ROOT_KEY`]).
async fn rotate_agent_key(db_url: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["rotate-agent-key"];
    all.extend_from_slice(args);
    run(
        &all,
        &[("VAULT_DATABASE_URL", db_url), ("VAULT_ROOT_KEY", ROOT_KEY)],
    )
    .await
}

/// The agent's registry entry: (key version, wrapped key, retiring version).
async fn registry(conn: &mut sqlx::PgConnection, agent: &str) -> (i32, Vec<u8>, Option<i32>) {
    sqlx::query_as(
        "SELECT key_version, wrapped_key, retiring_key_version FROM vault.agents WHERE agent_id = $1",
    )
    .bind(agent)
    .fetch_one(conn)
    .await
    .unwrap()
}

/// How many of the agent's credentials are sealed under each version: (version, rows).
async fn versions(conn: &mut sqlx::PgConnection, agent: &str) -> Vec<(i32, i64)> {
    sqlx::query_as(&format!(
        "SELECT key_version, count(*) FROM {}.credentials GROUP BY key_version ORDER BY key_version",
        schema_of(agent)
    ))
    .fetch_all(conn)
    .await
    .unwrap()
}

/// Whether any registry column still holds `wrapped` (the old wrapped agent key).
async fn wrapped_key_anywhere(conn: &mut sqlx::PgConnection, wrapped: &[u8]) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM vault.agents
         WHERE wrapped_key = $1 OR next_wrapped_key = $1 OR retiring_wrapped_key = $1",
    )
    .bind(wrapped)
    .fetch_one(conn)
    .await
    .unwrap()
}

/// A credential row's seals: (generation, key version, wrapped data key, ciphertext).
type Sealed = (i64, i32, Vec<u8>, Vec<u8>);

async fn sealed_row(conn: &mut sqlx::PgConnection, agent: &str, user: &str) -> Sealed {
    sqlx::query_as(&format!(
        "SELECT generation, key_version, wrapped_data_key, ciphertext
         FROM {}.credentials WHERE user_id = $1",
        schema_of(agent)
    ))
    .bind(user)
    .fetch_one(conn)
    .await
    .unwrap()
}

async fn restore_row(conn: &mut sqlx::PgConnection, agent: &str, user: &str, row: &Sealed) {
    sqlx::query(&format!(
        "UPDATE {}.credentials SET generation = $2, key_version = $3, wrapped_data_key = $4,
             ciphertext = $5
         WHERE user_id = $1",
        schema_of(agent)
    ))
    .bind(user)
    .bind(row.0)
    .bind(row.1)
    .bind(&row.2)
    .bind(&row.3)
    .execute(conn)
    .await
    .unwrap();
}

/// Actions of the agent's audit chain, in order.
async fn audit_actions(conn: &mut sqlx::PgConnection, agent: &str) -> Vec<String> {
    sqlx::query_scalar(&format!(
        "SELECT action FROM {}.audit_log WHERE action LIKE 'key.%' ORDER BY sequence",
        schema_of(agent)
    ))
    .fetch_all(conn)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotate_agent_key_under_load_on_two_replicas_loses_no_call_and_destroys_the_old_key() {
    const USERS: usize = 24;
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let a = spawn_with(&db, &issuer, &[]).await;
    let b = spawn_with(&db, &issuer, &[]).await;
    // User 0 is left alone: its row stays sealed under version 1 until the rotation reaches it.
    for n in 0..USERS {
        store(
            &a.client(&issuer, AGENT, &user(n)).await,
            "jira",
            &format!("v0-{}", user(n)),
        )
        .await;
    }
    store(
        &b.client(&issuer, BYSTANDER, "user-00").await,
        "jira",
        "bystander",
    )
    .await;
    let mut conn = db.connect().await;
    let (version, old_wrapped, retiring) = registry(&mut conn, AGENT).await;
    assert_eq!((version, retiring), (1, None));
    let frozen = sealed_row(&mut conn, AGENT, &user(0)).await;
    assert_eq!(frozen.1, 1);
    // A third replica unwraps the agent's key once, then sits the rotation out.
    let idle = spawn_with(&db, &issuer, &[]).await;
    let idle_vault = idle.client(&issuer, AGENT, &user(0)).await;
    assert_eq!(access_token(&idle_vault, "jira").await, "v0-user-00");

    // Load on every other user.
    let mut callers = Vec::new();
    for n in 1..USERS {
        let name = user(n);
        let replicas = [
            a.client(&issuer, AGENT, &name).await,
            b.client(&issuer, AGENT, &name).await,
        ];
        callers.push((n, name, replicas));
    }
    let load = WriteReadLoad::start(callers);
    load.goes_on("the load is running").await;

    let (ok, out, err) = rotate_agent_key(&db.url, &["--agent", AGENT, "--batch", "3"]).await;
    assert!(ok, "rotate-agent-key failed: {out}\n{err}");
    assert!(
        out.contains("key version 1 → 2"),
        "plain progress lines: {out}"
    );
    assert!(out.contains("old version destroyed"), "{out}");
    load.goes_on("the load goes on after the rotation").await;
    let latest = load.stop(vec![format!("v0-{}", user(0)); USERS]).await;

    // Every row is under version 2, the old wrapped key is nowhere, and the destroy is audited.
    let (version, _, retiring) = registry(&mut conn, AGENT).await;
    assert_eq!((version, retiring), (2, None));
    assert_eq!(versions(&mut conn, AGENT).await, vec![(2, USERS as i64)]);
    assert_eq!(wrapped_key_anywhere(&mut conn, &old_wrapped).await, 0);
    assert_eq!(
        audit_actions(&mut conn, AGENT).await,
        [
            "key.agent_created",
            "key.agent_key_rotation_started",
            "key.agent_key_destroyed"
        ]
    );
    assert_eq!(
        registry(&mut conn, BYSTANDER).await.0,
        1,
        "other agents are untouched"
    );

    // Every user's last acknowledged write opens, on a running replica and a fresh one.
    let fresh = spawn_with(&db, &issuer, &[]).await;
    for (n, expected) in latest.iter().enumerate() {
        for app in [&a, &fresh] {
            let vault = app.client(&issuer, AGENT, &user(n)).await;
            assert_eq!(&access_token(&vault, "jira").await, expected, "user {n}");
        }
    }
    let bystander = fresh.client(&issuer, BYSTANDER, "user-00").await;
    assert_eq!(access_token(&bystander, "jira").await, "bystander");

    // User 0's row as it was sealed under version 1, restored: it opens nowhere any more, not
    // even on the replica that held the old version while the rotation ran.
    restore_row(&mut conn, AGENT, &user(0), &frozen).await;
    for app in [&a, &b, &fresh] {
        let vault = app.client(&issuer, AGENT, &user(0)).await;
        let refused = vault
            .get_token("jira", Duration::ZERO)
            .await
            .expect_err("a row sealed under the destroyed version does not open");
        assert!(
            matches!(&refused, vault_client::Error::Other(status) if status.code() == tonic::Code::Internal),
            "{refused:?}"
        );
    }
    // The replica that sat the rotation out was told to drop the destroyed version too.
    eventually("the idle replica no longer opens the restored row", || {
        let vault = idle_vault.clone();
        async move { vault.get_token("jira", Duration::ZERO).await.is_err() }
    })
    .await;
    a.stop().await;
    b.stop().await;
    fresh.stop().await;
    idle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_agent_key_killed_halfway_serves_both_versions_and_a_rerun_finishes() {
    const USERS: usize = 10;
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(&db, &issuer, &[]).await;
    for n in 0..USERS {
        store(
            &app.client(&issuer, AGENT, &user(n)).await,
            "jira",
            &format!("v0-{}", user(n)),
        )
        .await;
    }
    let mut conn = db.connect().await;
    let (_, old_wrapped, _) = registry(&mut conn, AGENT).await;

    // Hold user 5's row, so the run re-seals users 0-4 and waits there; then kill it.
    let mut holder = db.connect().await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query(&format!(
        "SELECT 1 FROM {}.credentials WHERE user_id = 'user-05' FOR UPDATE",
        schema_of(AGENT)
    ))
    .execute(&mut holder)
    .await
    .unwrap();
    let run = Killable::start(
        &["rotate-agent-key", "--agent", AGENT, "--batch", "1"],
        &db.url,
    );
    waits_on_lock(
        &db,
        "rotate-agent-key waits on the held row",
        "UPDATE %credentials%SET key_version%",
    )
    .await;
    assert_eq!(
        versions(&mut conn, AGENT).await,
        vec![(1, 5), (2, 5)],
        "halfway"
    );
    let printed = run.kill();
    assert_eq!(
        printed.last().map(String::as_str),
        Some("agent rotating-agent: key version 1 → 2, re-sealed 5/10 rows")
    );
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    assert_eq!(
        registry(&mut conn, AGENT).await.2,
        Some(1),
        "version 1 is retiring"
    );

    // Killed halfway: both versions open, on the replica that cached version 1 as current and
    // on a fresh one; a write lands under version 2.
    let fresh = spawn_with(&db, &issuer, &[]).await;
    for n in 0..USERS {
        for server in [&app, &fresh] {
            let vault = server.client(&issuer, AGENT, &user(n)).await;
            assert_eq!(
                access_token(&vault, "jira").await,
                format!("v0-{}", user(n))
            );
        }
    }
    store(
        &app.client(&issuer, AGENT, "user-09").await,
        "jira",
        "written-halfway",
    )
    .await;
    assert_eq!(sealed_row(&mut conn, AGENT, "user-09").await.1, 2);

    // No root rotation while an agent key rotation is in progress.
    let (ok, out, err) = crate::keys::run(
        &["rotate-root", "--new-passphrase-env", "NEW_PHRASE"],
        &[
            ("VAULT_DATABASE_URL", db.url.as_str()),
            ("VAULT_ROOT_KEY", ROOT_KEY),
            ("NEW_PHRASE", "a new root passphrase for the test"),
        ],
    )
    .await;
    assert!(!ok, "{out}");
    assert!(err.contains("agent key rotation is in progress"), "{err}");

    let (ok, out, err) = rotate_agent_key(&db.url, &["--agent", AGENT, "--batch", "4"]).await;
    assert!(ok, "the re-run failed: {out}\n{err}");
    assert!(out.contains("old version destroyed"), "{out}");
    assert_eq!(versions(&mut conn, AGENT).await, vec![(2, USERS as i64)]);
    assert_eq!(wrapped_key_anywhere(&mut conn, &old_wrapped).await, 0);
    assert_eq!(registry(&mut conn, AGENT).await.2, None);
    for n in 0..USERS {
        let expected = if n == 9 {
            "written-halfway".to_owned()
        } else {
            format!("v0-{}", user(n))
        };
        let vault = fresh.client(&issuer, AGENT, &user(n)).await;
        assert_eq!(access_token(&vault, "jira").await, expected);
    }
    app.stop().await;
    fresh.stop().await;
}

/// RotateAgentKey through the generated client, as `jwt`.
pub(crate) async fn rotate_rpc(
    endpoint: &str,
    jwt: &str,
    agent: &str,
    status_only: bool,
    from_key_version: u32,
) -> Result<RotateAgentKeyResponse, tonic::Status> {
    let mut client = vault_client::proto::credential_vault_client::CredentialVaultClient::new(
        channel(endpoint).await,
    );
    let mut request = tonic::Request::new(RotateAgentKeyRequest {
        agent_id: agent.into(),
        status_only,
        from_key_version,
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {jwt}").parse().expect("ASCII token"),
    );
    client
        .rotate_agent_key(request)
        .await
        .map(tonic::Response::into_inner)
}

/// Rotates through the RPC twice and follows each to its end; `admin` is an admin's token.
async fn rotate_twice_through_the_rpc(app: &crate::helpers::TestApp, issuer: &Issuer) {
    let admin = issuer.admin_token("ops", "operator");
    for round in 1..=2u32 {
        let started = rotate_rpc(&app.endpoint(), &admin, AGENT, false, round)
            .await
            .unwrap();
        assert_eq!(started.key_version, round + 1, "{started:?}");
        assert!(started.error.is_empty(), "{started:?}");
        let (endpoint, token) = (app.endpoint(), admin.clone());
        eventually("the background rotation finishes", move || {
            let (endpoint, admin) = (endpoint.clone(), token.clone());
            async move {
                let now = rotate_rpc(&endpoint, &admin, AGENT, true, 0).await.unwrap();
                now.state() == State::Idle && !now.running && now.remaining == 0
            }
        })
        .await;
        let done = rotate_rpc(&app.endpoint(), &admin, AGENT, true, 0)
            .await
            .unwrap();
        assert_eq!(
            (done.key_version, done.retiring_version, done.resealed),
            (round + 1, 0, 3),
            "{done:?}"
        );
    }
    // A retried call meant for a version already rotated away starts nothing.
    let retried = rotate_rpc(&app.endpoint(), &admin, AGENT, false, 1)
        .await
        .unwrap();
    assert_eq!(
        (retried.state(), retried.key_version, retried.running),
        (State::Idle, 3, false),
        "{retried:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rotate_agent_key_rpc_rotates_in_the_background_for_admins_only() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(&db, &issuer, &[]).await;
    for n in 0..3 {
        store(
            &app.client(&issuer, AGENT, &user(n)).await,
            "jira",
            &format!("v0-{}", user(n)),
        )
        .await;
    }
    let refused = rotate_rpc(
        &app.endpoint(),
        &issuer.token(AGENT, "user-00"),
        AGENT,
        false,
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let missing = rotate_rpc(
        &app.endpoint(),
        &issuer.admin_token("ops", "operator"),
        "nobody",
        false,
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let bad = rotate_rpc(
        &app.endpoint(),
        &issuer.admin_token("ops", "operator"),
        "",
        false,
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("agent_id"), "{bad:?}");

    rotate_twice_through_the_rpc(&app, &issuer).await;
    let mut conn = db.connect().await;
    assert_eq!(versions(&mut conn, AGENT).await, vec![(3, 3)]);
    assert_eq!(
        audit_actions(&mut conn, AGENT).await,
        [
            "key.agent_created",
            "key.agent_key_rotation_started",
            "key.agent_key_destroyed",
            "key.agent_key_rotation_started",
            "key.agent_key_destroyed"
        ]
    );
    for n in 0..3 {
        let vault = app.client(&issuer, AGENT, &user(n)).await;
        assert_eq!(
            access_token(&vault, "jira").await,
            format!("v0-{}", user(n))
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_keys_rotate_on_the_embedded_store_through_the_rpc_and_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("vault.db").display());
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let on_sqlite = [("VAULT_DATABASE_URL", url.as_str())];
    let app = spawn_with(&db, &issuer, &on_sqlite).await;
    for n in 0..3 {
        store(
            &app.client(&issuer, AGENT, &user(n)).await,
            "jira",
            &format!("v0-{}", user(n)),
        )
        .await;
    }
    store(
        &app.client(&issuer, BYSTANDER, "user-00").await,
        "jira",
        "bystander",
    )
    .await;
    rotate_twice_through_the_rpc(&app, &issuer).await;
    app.stop().await;

    let (ok, out, err) = rotate_agent_key(&url, &["--all"]).await;
    assert!(ok, "rotate-agent-key --all failed: {out}\n{err}");
    assert!(out.contains("rotated the keys of 2 agents"), "{out}");
    assert!(
        out.contains("agent rotating-agent: key version 3 → 4"),
        "{out}"
    );
    assert!(
        out.contains("agent bystander-agent: key version 1 → 2"),
        "{out}"
    );

    let sqlite = sqlx::SqlitePool::connect(&url).await.unwrap();
    let rows: Vec<(String, i64, Option<i64>)> = sqlx::query_as(
        "SELECT agent_id, key_version, retiring_key_version FROM agents ORDER BY agent_id",
    )
    .fetch_all(&sqlite)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [(BYSTANDER.to_owned(), 2, None), (AGENT.to_owned(), 4, None)]
    );
    let sealed: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT key_version, count(*) FROM credentials GROUP BY key_version ORDER BY key_version",
    )
    .fetch_all(&sqlite)
    .await
    .unwrap();
    assert_eq!(sealed, [(2, 1), (4, 3)]);
    sqlite.close().await;

    let app = spawn_with(&db, &issuer, &on_sqlite).await;
    for n in 0..3 {
        let vault = app.client(&issuer, AGENT, &user(n)).await;
        assert_eq!(
            access_token(&vault, "jira").await,
            format!("v0-{}", user(n))
        );
    }
    let bystander = app.client(&issuer, BYSTANDER, "user-00").await;
    assert_eq!(access_token(&bystander, "jira").await, "bystander");
    app.stop().await;
}
