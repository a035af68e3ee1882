//! Many agents (issue 18): spare agent schemas made ahead of need, taken by new agents with and
//! without per-agent roles, and onboarding thousands of agents while existing agents read.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::helpers::{
    Issuer, TestDb, access_token, client_at, eventually, schema_of, spawn_with, store,
    store_and_read_back,
};

/// The spare schemas ready in `db`, oldest first.
async fn spares(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar("SELECT schema_name FROM vault.spare_schemas ORDER BY created_at")
        .fetch_all(&mut db.connect().await)
        .await
        .unwrap()
}

/// The schema the registry gives `agent`.
async fn registered_schema(db: &TestDb, agent: &str) -> String {
    sqlx::query_scalar("SELECT schema_name FROM vault.agents WHERE agent_id = $1")
        .bind(agent)
        .fetch_one(&mut db.connect().await)
        .await
        .unwrap()
}

async fn new_agents_take_spares(agent_roles: &str) {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(
        &db,
        &issuer,
        &[
            ("VAULT_DATABASE_SPARE_SCHEMAS", "2"),
            ("VAULT_DATABASE_AGENT_ROLES", agent_roles),
        ],
    )
    .await;
    eventually("two spare schemas are ready", || async {
        spares(&db).await.len() == 2
    })
    .await;
    let ready = spares(&db).await;

    let first = app.client(&issuer, "first-agent", "alice").await;
    store_and_read_back(&first, "jira", "first-access").await;
    let schema = registered_schema(&db, "first-agent").await;
    assert_eq!(schema, ready[0], "the oldest spare is taken");
    assert_ne!(schema, schema_of("first-agent"));
    let mut conn = db.connect().await;
    let rows: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{schema}\".credentials WHERE user_id = 'alice'"
    ))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(rows, 1, "the credential is in the taken schema");
    if agent_roles == "true" {
        let (own, others): (bool, bool) = sqlx::query_as(
            "SELECT has_schema_privilege(vault.agent_role($1), $1, 'USAGE'),
                    has_schema_privilege(vault.agent_role($1), $2, 'USAGE')",
        )
        .bind(&schema)
        .bind(&ready[1])
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert!(
            own && !others,
            "a spare's role reaches its own schema alone"
        );
    }

    eventually("the job made a spare in the taken one's place", || async {
        let now = spares(&db).await;
        now.len() == 2 && !now.contains(&schema)
    })
    .await;
    let second = app.client(&issuer, "second-agent", "alice").await;
    store(&second, "jira", "second-access").await;
    let other = registered_schema(&db, "second-agent").await;
    assert_ne!(other, schema);
    assert_eq!(access_token(&first, "jira").await, "first-access");
    assert_eq!(access_token(&second, "jira").await, "second-access");
    let (taken, spare_left): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM vault.agents WHERE schema_name = ANY($1)),
                (SELECT count(*) FROM vault.spare_schemas WHERE schema_name = ANY($1))",
    )
    .bind(vec![schema, other])
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        (taken, spare_left),
        (2, 0),
        "a schema is an agent's or a spare"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_agent_takes_a_spare_schema_and_another_is_made() {
    new_agents_take_spares("true").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_agent_roles_a_new_agent_takes_a_spare_schema_too() {
    new_agents_take_spares("false").await;
}

/// Agents onboarded while existing agents read.
const ONBOARDED: usize = 2_000;
const EXISTING: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_agents_onboard_while_existing_agents_read_and_no_call_fails() {
    let db = TestDb::new().await;
    let issuer = Arc::new(Issuer::new());
    // A few spares, fewer than the agents: registrations take them and make schemas themselves,
    // concurrently, while the job makes more.
    let app = spawn_with(
        &db,
        &issuer,
        &[
            ("VAULT_DATABASE_SPARE_SCHEMAS", "16"),
            ("VAULT_AGENT_CREATION_PER_MINUTE", "1000000"),
        ],
    )
    .await;
    let endpoint = app.endpoint();
    for n in 0..EXISTING {
        let vault = app.client(&issuer, &format!("existing-{n}"), "alice").await;
        store(&vault, "jira", &format!("existing-access-{n}")).await;
    }

    let onboarding_done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|reader| {
            let (issuer, endpoint) = (Arc::clone(&issuer), endpoint.clone());
            let (done, reads) = (Arc::clone(&onboarding_done), Arc::clone(&reads));
            tokio::spawn(async move {
                let mut clients = Vec::new();
                for n in 0..EXISTING {
                    let token = issuer.agent_token(&format!("existing-{n}"), "alice");
                    clients.push((n, client_at(endpoint.clone(), &token).await));
                }
                let mut turn = reader;
                // At least one full round, then until onboarding ends.
                while turn < EXISTING || !done.load(Ordering::Acquire) {
                    let (n, vault) = &clients[turn % EXISTING];
                    let got = vault
                        .get_token("jira", std::time::Duration::ZERO)
                        .await
                        .unwrap_or_else(|err| panic!("GetToken of existing-{n} failed: {err}"));
                    assert_eq!(got.access_token, format!("existing-access-{n}"));
                    reads.fetch_add(1, Ordering::Relaxed);
                    turn += 1;
                }
            })
        })
        .collect();

    let base = vault_client::Client::connect(endpoint.clone())
        .await
        .unwrap();
    let reads_before = reads.load(Ordering::Relaxed);
    // 16 callers at once, each onboarding the next agent not yet taken.
    let next = Arc::new(AtomicUsize::new(0));
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (issuer, base, next) = (Arc::clone(&issuer), base.clone(), Arc::clone(&next));
        callers.spawn(async move {
            let mut onboarded = 0;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= ONBOARDED {
                    return onboarded;
                }
                let agent = format!("onboarded-{n:04}");
                let vault = base
                    .clone()
                    .with_bearer(&issuer.token(&agent, "bob"))
                    .unwrap();
                vault
                    .store_token(
                        "jira",
                        crate::helpers::oauth_token(&format!("onboarded-access-{n}"), "rt", 3600),
                        None,
                    )
                    .await
                    .unwrap_or_else(|err| panic!("StoreToken of {agent} failed: {err}"));
                onboarded += 1;
            }
        });
    }
    let mut onboarded = 0;
    while let Some(caller) = callers.join_next().await {
        onboarded += caller.expect("no StoreToken failed");
    }
    let reads_during = reads.load(Ordering::Relaxed) - reads_before;
    onboarding_done.store(true, Ordering::Release);
    for reader in readers {
        reader.await.expect("no read failed");
    }
    assert_eq!(onboarded, ONBOARDED);
    assert!(
        reads_during > 0,
        "existing agents were read while others onboarded"
    );

    let (agents, schemas): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT schema_name) FROM vault.agents
         WHERE agent_id LIKE 'onboarded-%'",
    )
    .fetch_one(&mut db.connect().await)
    .await
    .unwrap();
    assert_eq!((agents, schemas), (ONBOARDED as i64, ONBOARDED as i64));
    for n in [0, ONBOARDED / 2, ONBOARDED - 1] {
        let agent = format!("onboarded-{n:04}");
        let vault = base
            .clone()
            .with_bearer(&issuer.agent_token(&agent, "bob"))
            .unwrap();
        assert_eq!(
            access_token(&vault, "jira").await,
            format!("onboarded-access-{n}")
        );
    }
    app.stop().await;
}

/// The per-agent migration each agent in `agents` is at.
async fn schema_versions(db: &TestDb, agents: &[&str]) -> Vec<i32> {
    let mut versions = Vec::new();
    for agent in agents {
        let version: i32 =
            sqlx::query_scalar("SELECT schema_version FROM vault.agents WHERE agent_id = $1")
                .bind(agent)
                .fetch_one(&mut db.connect().await)
                .await
                .unwrap();
        versions.push(version);
    }
    versions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_agent_migrations_run_online_and_an_agent_is_upgraded_before_its_first_use() {
    // Without the upgrade on first use, the used agent's GetToken fails (its audit tables are
    // gone); without `migrate`'s batches, the other two stay at version 2.
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let agents = ["old-a", "old-b", "old-c"];
    let app = crate::helpers::spawn(&db, &issuer).await;
    for agent in agents {
        let vault = app.client(&issuer, agent, "alice").await;
        store(&vault, "jira", &format!("{agent}-access")).await;
    }
    app.stop().await;
    // As a vault from before the per-agent audit migration (3) left them: at version 2, with no
    // audit tables.
    let mut conn = db.connect().await;
    for agent in agents {
        let schema = registered_schema(&db, agent).await;
        sqlx::raw_sql(&format!(
            "DROP TABLE \"{schema}\".audit_log, \"{schema}\".audit_head"
        ))
        .execute(&mut conn)
        .await
        .unwrap();
    }
    sqlx::query("UPDATE vault.agents SET schema_version = 2 WHERE agent_id = ANY($1)")
        .bind(&agents[..])
        .execute(&mut conn)
        .await
        .unwrap();

    // A new vault's background pass upgrades the agents behind, in schema order: the first one
    // is held here (its registry row locked), so the pass waits on it and then gives up
    // (lock_timeout), and the next agent is upgraded by its first use instead.
    let mut order = Vec::new();
    for agent in agents {
        order.push((registered_schema(&db, agent).await, agent));
    }
    order.sort();
    let (held, used, last) = (order[0].1, order[1].1, order[2].1);
    let mut holder = db.connect().await;
    sqlx::raw_sql(&format!(
        "BEGIN; SELECT 1 FROM vault.agents WHERE agent_id = '{held}' FOR UPDATE"
    ))
    .execute(&mut holder)
    .await
    .unwrap();
    let app = crate::helpers::spawn(&db, &issuer).await;
    let vault = app.client(&issuer, used, "alice").await;
    assert_eq!(access_token(&vault, "jira").await, format!("{used}-access"));
    assert_eq!(schema_versions(&db, &[held, used, last]).await, [2, 3, 2]);
    eventually("the background pass gave up on the held agent", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut db.connect().await)
        .await
        .unwrap();
        waiting == 0
    })
    .await;
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    assert_eq!(schema_versions(&db, &[held, used, last]).await, [2, 3, 2]);

    // `migrate` upgrades the rest a batch at a time while the vault serves.
    let env = [
        ("VAULT_DATABASE_URL", db.url.as_str()),
        ("VAULT_ROOT_KEY", crate::helpers::ROOT_KEY),
    ];
    let (ok, out, err) = crate::keys::run(&["migrate", "--batch", "1"], &env).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("agent schemas: 1 upgraded, 1 left")
            && out.contains("agent schemas: 2 upgraded, 0 left")
            && out.contains("agent schemas at the latest version (2 upgraded)"),
        "{out}"
    );
    assert_eq!(schema_versions(&db, &agents).await, [3, 3, 3]);
    for agent in [held, last] {
        let vault = app.client(&issuer, agent, "alice").await;
        assert_eq!(
            access_token(&vault, "jira").await,
            format!("{agent}-access")
        );
        let schema = registered_schema(&db, agent).await;
        let released: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{schema}\".audit_log WHERE action = 'GetToken'"
        ))
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert!(
            released >= 1,
            "{agent}'s release is audited in its new tables"
        );
    }
    let (ok, out, err) = crate::keys::run(&["migrate"], &env).await;
    assert!(ok, "{err}");
    assert!(out.contains("(0 upgraded)"), "{out}");
    app.stop().await;
}

/// Sequential scans of `pg_class` so far in the transaction on `conn`.
async fn pg_class_scans(conn: &mut sqlx::PgConnection) -> i64 {
    catalog_scans(conn, "pg_class").await
}

/// Sequential scans of the system catalog `relname` in this transaction so far. Read from the
/// function, not `pg_stat_xact_sys_tables`: that view joins `pg_index` and `pg_class`, so reading
/// it scans them itself.
async fn catalog_scans(conn: &mut sqlx::PgConnection, relname: &str) -> i64 {
    sqlx::query_scalar("SELECT pg_stat_get_xact_numscans(('pg_catalog.' || $1)::regclass)")
        .bind(relname)
        .fetch_one(conn)
        .await
        .unwrap()
}

/// What the catalog says schema `schema` holds, one line per fact, sorted, with the schema's
/// name written `S`: relations (and whether each has TOAST), columns in order with their types,
/// nullability and defaults, constraints, indexes, sequences and what owns them, and the rows of
/// its audit head.
async fn schema_description(conn: &mut sqlx::PgConnection, schema: &str) -> String {
    let lines: Vec<String> = sqlx::query_scalar(
        "SELECT format('relation %s kind %s toast %s', c.relname, c.relkind, c.reltoastrelid <> 0)
           FROM pg_class c WHERE c.relnamespace = $1::regnamespace
         UNION ALL
         SELECT format('column %s.%s #%s %s not null %s default %s', c.relname, a.attname,
                       a.attnum, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                       pg_get_expr(d.adbin, d.adrelid))
           FROM pg_class c
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
           LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
          WHERE c.relnamespace = $1::regnamespace
         UNION ALL
         SELECT format('constraint %s.%s %s', c.relname, k.conname, pg_get_constraintdef(k.oid))
           FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
          WHERE c.relnamespace = $1::regnamespace
         UNION ALL
         SELECT format('index %s', pg_get_indexdef(i.indexrelid))
           FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
          WHERE c.relnamespace = $1::regnamespace
         UNION ALL
         SELECT format('sequence %s %s start %s by %s min %s max %s cache %s cycle %s',
                       c.relname, format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement,
                       s.seqmin, s.seqmax, s.seqcache, s.seqcycle)
           FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
          WHERE c.relnamespace = $1::regnamespace
         UNION ALL
         SELECT format('%s owned by %s.%s', c.relname, t.relname, a.attname)
           FROM pg_depend d
           JOIN pg_class c ON c.oid = d.objid AND d.classid = 'pg_class'::regclass
           JOIN pg_class t ON t.oid = d.refobjid AND d.refclassid = 'pg_class'::regclass
           JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid
          WHERE c.relnamespace = $1::regnamespace AND c.relkind = 'S' AND d.deptype = 'a'",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let head: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT row_to_json(h)::text FROM \"{schema}\".audit_head h"
    ))
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let mut lines: Vec<String> = lines
        .into_iter()
        .chain(head.into_iter().map(|row| format!("audit_head row {row}")))
        .map(|line| line.replace(schema, "S"))
        .collect();
    lines.sort();
    lines.join("\n")
}

/// A new agent schema is made in one pass (control migration 0015), and it is the schema the
/// per-agent templates make one after another. Making it reads no catalog whole: template
/// 0002's ALTER TABLE scans all of `pg_index` (ten rows per agent), which made every new agent
/// slower than the last (50 to 10 agents/s over 19,000 agents).
#[tokio::test]
async fn a_new_agent_schema_is_made_in_one_pass_and_equals_the_templates_schema() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(&db, &issuer, &[]).await;
    app.stop().await;
    let (one_pass, by_templates) = (
        format!("agent_{}", "b".repeat(40)),
        format!("agent_{}", "a".repeat(40)),
    );
    let mut conn = db.connect().await;
    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
    // A first schema warms this backend's caches (a new backend, and the first DDL after
    // others' DDL, rebuild them with scans of their own, whatever the number of agents).
    sqlx::query("SELECT vault.make_agent_schema($1)")
        .bind(format!("agent_{}", "c".repeat(40)))
        .execute(&mut conn)
        .await
        .unwrap();
    let catalogs = [
        "pg_index",
        "pg_class",
        "pg_attribute",
        "pg_depend",
        "pg_type",
    ];
    let mut before = Vec::new();
    for catalog in catalogs {
        before.push(catalog_scans(&mut conn, catalog).await);
    }
    let version: i32 = sqlx::query_scalar("SELECT vault.make_agent_schema($1)")
        .bind(&one_pass)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    for (catalog, before) in catalogs.into_iter().zip(&before) {
        assert_eq!(
            catalog_scans(&mut conn, catalog).await,
            *before,
            "making a schema scanned {catalog} whole"
        );
    }
    let latest: i32 = sqlx::query_scalar("SELECT max(version) FROM vault.agent_migrations")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(version, latest);

    let templates: Vec<String> =
        sqlx::query_scalar("SELECT template FROM vault.agent_migrations ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let index_scans = catalog_scans(&mut conn, "pg_index").await;
    sqlx::query(&format!("CREATE SCHEMA \"{by_templates}\""))
        .execute(&mut conn)
        .await
        .unwrap();
    for template in templates {
        sqlx::raw_sql(&template.replace("{schema}", &format!("\"{by_templates}\"")))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    // The probe sees the scan it is there to catch.
    assert!(catalog_scans(&mut conn, "pg_index").await > index_scans);

    let made = schema_description(&mut conn, &one_pass).await;
    assert!(
        made.contains("column credentials.refresh_not_before #15"),
        "{made}"
    );
    assert_eq!(made, schema_description(&mut conn, &by_templates).await);
    sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap();
}

/// Granting an agent's role its schema must not read the whole catalog: `GRANT … ON ALL TABLES
/// IN SCHEMA` scans all of `pg_class` (twenty rows per agent), which made every registration
/// slower as agents accumulated (control migration 0014).
#[tokio::test]
async fn granting_an_agent_role_its_schema_scans_no_catalog_whole() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(&db, &issuer, &[]).await;
    store(&app.client(&issuer, "agent-a", "alice").await, "jira", "t").await;
    app.stop().await;
    let schema = registered_schema(&db, "agent-a").await;

    let mut conn = db.connect().await;
    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
    let before = pg_class_scans(&mut conn).await;
    sqlx::query("SELECT vault.grant_agent_role($1)")
        .bind(&schema)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(pg_class_scans(&mut conn).await, before);
    // The probe sees the scan it is there to catch.
    sqlx::query(&format!(
        "GRANT SELECT ON ALL TABLES IN SCHEMA \"{schema}\" TO CURRENT_USER"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    assert!(pg_class_scans(&mut conn).await > before);
    sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap();
}

/// The first record of a new agent's chain (its key's making) rides in the transaction of the
/// first store. When that store fails after the agent was registered, the record is still
/// written, on its own: no chain lacks its first record.
#[tokio::test]
async fn a_new_agent_whose_first_store_fails_still_has_its_keys_record() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(
        &db,
        &issuer,
        &[
            ("VAULT_DATABASE_SPARE_SCHEMAS", "1"),
            ("VAULT_DATABASE_AGENT_ROLES", "true"),
        ],
    )
    .await;
    eventually("a spare schema is ready", || async {
        spares(&db).await.len() == 1
    })
    .await;
    let spare = spares(&db).await.remove(0);
    // The agent's role may no longer write credentials there: its first store fails after the
    // registration took the spare.
    sqlx::query(&format!(
        "DO $$ BEGIN EXECUTE format('REVOKE INSERT ON \"{spare}\".credentials FROM %I', \
         vault.agent_role('{spare}')); END $$"
    ))
    .execute(&mut db.connect().await)
    .await
    .unwrap();
    let vault = app.client(&issuer, "failing-agent", "alice").await;
    let token = vault_client::TokenSet::bearer("never-stored");
    assert!(vault.store_token("jira", token, None).await.is_err());
    assert_eq!(registered_schema(&db, "failing-agent").await, spare);
    let chain = || async {
        sqlx::query_scalar::<_, String>(&format!(
            "SELECT action FROM \"{spare}\".audit_log ORDER BY sequence"
        ))
        .fetch_all(&mut db.connect().await)
        .await
        .unwrap()
    };
    eventually("the key's record is written on its own", || async {
        chain().await.first().map(String::as_str) == Some("key.agent_created")
    })
    .await;
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{spare}\".credentials"))
        .fetch_one(&mut db.connect().await)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    app.stop().await;
}
