//! The vault's SQL stays in the shape Citus schema-based sharding can distribute
//! (docs/scaling.md): every statement the vault sends PostgreSQL, and every transaction, names at
//! most one agent schema, and no statement naming an agent schema writes a control table (the
//! control tables become reference tables, copied to every node; an agent schema lives on one).
//!
//! The vault talks to PostgreSQL through a relay in this test that reads the wire protocol: the
//! text of each statement executed (simple queries, and prepared statements at each Execute),
//! grouped into transactions by the server's ReadyForQuery status. The checks run on what
//! really went over the wire while the vault served a workload touching every table group.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use vault_client::proto::rotate_agent_key_response::State;

use vault_server::audit::AuditRecord;
use vault_server::config::{Database, DatabaseSettings};
use vault_server::ids::{AgentId, IssuerId};
use vault_server::store::{Chain, PgStore, Store};

use crate::agent_keys::rotate_rpc;
use crate::audit::list_audit;
use crate::helpers::{Issuer, TestDb, access_token, eventually, fast_forward, spawn_with, store};

/// One client connection's protocol state.
#[derive(Default)]
struct Session {
    /// Prepared statements by name ("" is the unnamed one).
    prepared: HashMap<String, String>,
    /// The statement the last Bind named, which the next Execute runs.
    bound: Option<String>,
    /// What ran since the server was last idle (outside any transaction).
    transaction: Vec<String>,
}

/// Every transaction the vault ran, as the statements in it.
#[derive(Clone, Default)]
struct Transactions(Arc<Mutex<Vec<Vec<String>>>>);

impl Transactions {
    fn all(&self) -> Vec<Vec<String>> {
        self.0.lock().unwrap().clone()
    }
}

/// Relays connections to PostgreSQL at `upstream`, recording each transaction's statements.
async fn tap(upstream: SocketAddr) -> (SocketAddr, Transactions) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Transactions::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                // A connection the vault drops half-way ends its relay; nothing to report.
                let _ = relay(client, upstream, record).await;
            });
        }
    });
    (addr, seen)
}

async fn read_message(from: &mut (impl AsyncRead + Unpin)) -> std::io::Result<(u8, Vec<u8>)> {
    let kind = from.read_u8().await?;
    let len = from.read_u32().await? as usize;
    let mut body = vec![0; len.saturating_sub(4)];
    from.read_exact(&mut body).await?;
    Ok((kind, body))
}

async fn write_message(
    to: &mut (impl AsyncWrite + Unpin),
    kind: u8,
    body: &[u8],
) -> std::io::Result<()> {
    let mut message = Vec::with_capacity(body.len() + 5);
    message.push(kind);
    message.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    message.extend_from_slice(body);
    to.write_all(&message).await
}

/// The NUL-terminated strings at the start of `body`.
fn strings(body: &[u8], count: usize) -> Vec<String> {
    body.split(|b| *b == 0)
        .take(count)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    seen: Transactions,
) -> std::io::Result<()> {
    let mut server = TcpStream::connect(upstream).await?;
    // The startup message has no type byte. An SSL request is refused here (the vault's URL
    // says sslmode=disable, so none should come), and the startup message follows it.
    loop {
        let len = client.read_u32().await? as usize;
        let mut body = vec![0; len.saturating_sub(4)];
        client.read_exact(&mut body).await?;
        if body.starts_with(&80_877_103_u32.to_be_bytes()) {
            client.write_all(b"N").await?;
            continue;
        }
        server.write_all(&(len as u32).to_be_bytes()).await?;
        server.write_all(&body).await?;
        break;
    }
    let session = Arc::new(Mutex::new(Session::default()));
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let from_client = {
        let session = Arc::clone(&session);
        async move {
            loop {
                let (kind, body) = read_message(&mut client_read).await?;
                {
                    let mut s = session.lock().unwrap();
                    match kind {
                        b'Q' => {
                            let text = strings(&body, 1).remove(0);
                            s.transaction.push(text);
                        }
                        b'P' => {
                            let parts = strings(&body, 2);
                            s.prepared.insert(parts[0].clone(), parts[1].clone());
                        }
                        b'B' => {
                            let parts = strings(&body, 2);
                            s.bound = s.prepared.get(&parts[1]).cloned();
                        }
                        b'E' => {
                            if let Some(text) = s.bound.clone() {
                                s.transaction.push(text);
                            }
                        }
                        _ => {}
                    }
                }
                write_message(&mut server_write, kind, &body).await?;
                if kind == b'X' {
                    return Ok::<_, std::io::Error>(());
                }
            }
        }
    };
    let from_server = async move {
        loop {
            let (kind, body) = read_message(&mut server_read).await?;
            if kind == b'Z' && body.first() == Some(&b'I') {
                let done = std::mem::take(&mut session.lock().unwrap().transaction);
                if !done.is_empty() {
                    seen.0.lock().unwrap().push(done);
                }
            }
            write_message(&mut client_write, kind, &body).await?;
        }
    };
    tokio::select! {
        r = from_client => r,
        r = from_server => r,
    }
}

/// The agent schemas `sql` names (`agent_` and 40 hex digits).
fn agent_schemas(sql: &str) -> BTreeSet<&str> {
    let mut found = BTreeSet::new();
    let mut at = 0;
    while let Some(i) = sql[at..].find("agent_") {
        let start = at + i;
        let end = start + "agent_".len() + 40;
        let preceded = sql[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !preceded
            && sql.len() >= end
            && sql[start + 6..end].bytes().all(|b| b.is_ascii_hexdigit())
            && !sql[end..].starts_with(|c: char| c.is_ascii_alphanumeric())
        {
            found.insert(&sql[start..end]);
        }
        at = start + 1;
    }
    found
}

/// Whether `sql` writes a table of the control schema.
fn writes_control_table(sql: &str) -> bool {
    let upper = sql
        .to_ascii_uppercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    ["INSERT INTO VAULT.", "UPDATE VAULT.", "DELETE FROM VAULT."]
        .iter()
        .any(|write| upper.contains(write))
}

/// What breaks the Citus shape in `transactions`, one line each.
fn citus_violations(transactions: &[Vec<String>]) -> Vec<String> {
    let mut found = Vec::new();
    for transaction in transactions {
        let mut schemas = BTreeSet::new();
        for sql in transaction {
            let named = agent_schemas(sql);
            if named.len() > 1 {
                found.push(format!(
                    "a statement names {} agent schemas: {sql}",
                    named.len()
                ));
            }
            if !named.is_empty() && writes_control_table(sql) {
                found.push(format!(
                    "a statement on an agent schema writes a control table: {sql}"
                ));
            }
            schemas.extend(named);
        }
        if schemas.len() > 1 {
            found.push(format!(
                "a transaction spans {} agent schemas: {}",
                schemas.len(),
                transaction.join(" ; ")
            ));
        }
        // Not a Citus rule, but one this tap is placed to keep: a notifying transaction holds
        // PostgreSQL's database-wide notify lock through its commit's flush, so an agent's
        // writes that notified would commit one flush after another (store/postgres/wakeups.rs).
        if !schemas.is_empty()
            && let Some(sql) = transaction
                .iter()
                .find(|sql| sql.to_ascii_lowercase().contains("notify"))
        {
            found.push(format!("a transaction on an agent schema notifies: {sql}"));
        }
    }
    found
}

#[test]
fn the_citus_checks_catch_what_they_look_for() {
    let a = format!("agent_{}", "a".repeat(40));
    let b = format!("agent_{}", "b".repeat(40));
    let one = |sql: String| vec![vec![sql]];
    assert!(citus_violations(&one(format!("SELECT * FROM \"{a}\".credentials"))).is_empty());
    assert_eq!(
        citus_violations(&one(format!(
            "SELECT * FROM \"{a}\".credentials JOIN \"{b}\".credentials USING (tool)"
        )))
        .len(),
        2,
        "the statement, and so its transaction"
    );
    assert_eq!(
        citus_violations(&[vec![
            format!("UPDATE \"{a}\".credentials SET state = 1"),
            format!("DELETE FROM \"{b}\".credentials"),
        ]])
        .len(),
        1,
        "two schemas in one transaction"
    );
    assert_eq!(
        citus_violations(&one(format!(
            "WITH x AS (DELETE FROM \"{a}\".credentials RETURNING 1)\n update  vault.agents SET key_version = 2"
        )))
        .len(),
        1
    );
    assert_eq!(
        citus_violations(&[vec![
            format!("UPDATE \"{a}\".audit_head SET last_sequence = 2"),
            "SELECT pg_notify('vault_audit', 'x')".to_string(),
        ]])
        .len(),
        1,
        "a notification in an agent's transaction"
    );
    assert!(
        citus_violations(&one(
            "SELECT pg_notify($1, chain) FROM unnest($2::text[]) AS chain".into()
        ))
        .is_empty(),
        "a notification of its own"
    );
    // Reading the control tables beside an agent schema is what reference tables are for; a
    // role name is not a schema.
    assert!(
        citus_violations(&one(format!(
            "SELECT vault.fence_agent_key('{a}', 1); SET ROLE \"vault_12345678_{}\"",
            "c".repeat(40)
        )))
        .is_empty()
    );
}

/// A URL reaching `db` through a new tap, and what the tap records.
async fn tapped(db: &TestDb) -> (String, Transactions) {
    // The test database's own server and login, reached through the relay.
    let rest = db.url.split_once("://").expect("a URL").1;
    let (authority, path) = rest.split_once('/').expect("a database path");
    let (login, host) = authority.rsplit_once('@').unwrap_or(("", authority));
    let host = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5432")
    };
    let upstream = tokio::net::lookup_host(host)
        .await
        .unwrap()
        .next()
        .expect("the database host resolves");
    let (relay, seen) = tap(upstream).await;
    let path = path.split('?').next().unwrap_or(path);
    let at = if login.is_empty() { "" } else { "@" };
    let url = format!("postgres://{login}{at}{relay}/{path}?sslmode=disable");
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_statement_and_transaction_stays_within_one_agent_schema() {
    let db = TestDb::new().await;
    let (url, seen) = tapped(&db).await;
    let issuer = Issuer::new();
    let app = spawn_with(
        &db,
        &issuer,
        &[
            ("VAULT_DATABASE_URL", url.as_str()),
            ("VAULT_DATABASE_SPARE_SCHEMAS", "2"),
            ("VAULT_SWEEP_INTERVAL_SECONDS", "1"),
            ("VAULT_AUDIT_SIGN_INTERVAL_SECONDS", "1"),
        ],
    )
    .await;

    // Three agents, two users each: stores, releases, lists, deletes, revocations (queued for
    // the provider), an expired credential swept, a key rotation re-sealing rows, audit reads.
    let agents = ["tap-a", "tap-b", "tap-c"];
    for agent in agents {
        for user in ["alice", "bob"] {
            let vault = app.client(&issuer, agent, user).await;
            store(&vault, "jira", &format!("{agent}-{user}-jira")).await;
            store(&vault, "stripe", &format!("{agent}-{user}-stripe")).await;
            assert_eq!(
                access_token(&vault, "jira").await,
                format!("{agent}-{user}-jira")
            );
            assert_eq!(vault.list_credentials().await.unwrap().len(), 2);
        }
        let vault = app.client(&issuer, agent, "bob").await;
        vault.revoke(Some("stripe"), true).await.unwrap();
    }
    // Releases of every agent at once: the audit group commit gets records of many chains
    // together.
    let mut releases = tokio::task::JoinSet::new();
    for agent in agents {
        for user in ["alice", "bob"] {
            let vault = app.client(&issuer, agent, user).await;
            let expected = format!("{agent}-{user}-jira");
            for _ in 0..8 {
                let (vault, expected) = (vault.clone(), expected.clone());
                releases
                    .spawn(async move { assert_eq!(access_token(&vault, "jira").await, expected) });
            }
        }
    }
    while let Some(done) = releases.join_next().await {
        done.unwrap();
    }
    // And one group append of two agents' chains and the control plane's, through the relay,
    // so that the group path is taken whatever the timing above did.
    let direct = Store::new(
        PgStore::connect(&DatabaseSettings::new(Database::Postgres(
            url.clone().into(),
        )))
        .await
        .unwrap(),
    );
    let iss = IssuerId::parse(&issuer.iss).unwrap();
    let mut chains = Vec::new();
    for agent in ["tap-a", "tap-b"] {
        chains.push(
            direct
                .keys
                .agent(&iss, &AgentId::parse(agent).unwrap())
                .await
                .unwrap()
                .expect("the agent is registered"),
        );
    }
    let event = |action: &str| AuditRecord {
        at_ms: chrono::Utc::now().timestamp_millis(),
        action: action.into(),
        ..AuditRecord::default()
    };
    for result in direct
        .audit
        .append_batches(vec![
            (
                Chain::Agent(&chains[0]),
                vec![event("test.a"), event("test.a")],
            ),
            (Chain::Control, vec![event("test.control")]),
            (Chain::Agent(&chains[1]), vec![event("test.b")]),
        ])
        .await
    {
        result.unwrap();
    }

    let admin = issuer.admin_token("tap-a", "alice");
    rotate_rpc(&app.endpoint(), &admin, "tap-b", false, 1)
        .await
        .unwrap();
    let (endpoint, token) = (app.endpoint(), admin.clone());
    eventually("the key rotation of tap-b finishes", move || {
        let (endpoint, admin) = (endpoint.clone(), token.clone());
        async move {
            let now = rotate_rpc(&endpoint, &admin, "tap-b", true, 0)
                .await
                .unwrap();
            now.state() == State::Idle && !now.running && now.remaining == 0
        }
    })
    .await;
    let vault = app.client(&issuer, "tap-c", "alice").await;
    store(&vault, "short", "tap-c-short").await;
    fast_forward(&db, Duration::from_secs(400 * 86_400)).await;
    let schema_c: String =
        sqlx::query_scalar("SELECT schema_name FROM vault.agents WHERE agent_id = 'tap-c'")
            .fetch_one(&mut db.connect().await)
            .await
            .unwrap();
    eventually("the sweeper removed the expired credentials", || async {
        let left: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM \"{schema_c}\".credentials"))
                .fetch_one(&mut db.connect().await)
                .await
                .unwrap();
        left == 0
    })
    .await;
    let events = list_audit(
        &app,
        &admin,
        vault_client::proto::ListAuditEventsRequest {
            agent_id: "tap-a".into(),
            limit: 100,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(!events.events.is_empty());
    app.stop().await;

    let transactions = seen.all();
    let on_agents = transactions
        .iter()
        .filter(|t| t.iter().any(|sql| !agent_schemas(sql).is_empty()))
        .count();
    assert!(
        on_agents >= 30,
        "the tap saw the agents' statements ({on_agents} transactions)"
    );
    let violations = citus_violations(&transactions);
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

/// A StoreToken is one transaction on its agent's schema: the generation, the row and the audit
/// record commit together (one commit, where taking the generation first was a commit of its
/// own). A new agent's first StoreToken adds the first record of its chain, its key's making, to
/// that same transaction rather than committing it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_is_one_transaction_on_its_agent_schema_even_a_new_agents_first() {
    let db = TestDb::new().await;
    let (url, seen) = tapped(&db).await;
    let issuer = Issuer::new();
    let app = spawn_with(&db, &issuer, &[("VAULT_DATABASE_URL", url.as_str())]).await;
    let vault = app.client(&issuer, "tap-new", "alice").await;
    store(&vault, "jira", "first").await;
    let schema: String =
        sqlx::query_scalar("SELECT schema_name FROM vault.agents WHERE agent_id = 'tap-new'")
            .fetch_one(&mut db.connect().await)
            .await
            .unwrap();
    // The transactions that wrote this agent's credentials or generations, or its chain.
    let writes = || {
        seen.all()
            .into_iter()
            .filter(|t| {
                t.iter().any(|sql| {
                    agent_schemas(sql).contains(schema.as_str())
                        && (sql.contains("nextval(")
                            || sql.contains(".credentials")
                            || sql.contains(".audit_log"))
                })
            })
            .collect::<Vec<_>>()
    };
    let first = writes();
    assert_eq!(first.len(), 1, "{first:#?}");
    let sql = first[0].join("\n");
    for part in ["nextval(", "INSERT INTO", ".credentials", ".audit_log"] {
        assert!(sql.contains(part), "{part} in {sql}");
    }
    store(&vault, "jira", "second").await;
    assert_eq!(writes().len(), 2);
    // Neither store's TTL (the default, 30 days) is earlier than the new agent's first sweep (a
    // day ahead), which the key fence read: neither sends a lowering of the schedule (control
    // migration 0018), where each used to send one after its commit.
    let lowerings = seen
        .all()
        .iter()
        .flatten()
        .filter(|sql| sql.contains("SET sweep_due = least(coalesce(sweep_due"))
        .count();
    assert_eq!(lowerings, 0);
    app.stop().await;

    // Both records of the first store are in the chain, the key's making first.
    let actions: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT action FROM \"{schema}\".audit_log ORDER BY sequence"
    ))
    .fetch_all(&mut db.connect().await)
    .await
    .unwrap();
    assert_eq!(actions[0], "key.agent_created", "{actions:?}");
    assert_eq!(actions.len(), 3, "{actions:?}");
}

/// The revocation outbox's pass reads only the agents with a revocation queued (control
/// migration 0017): it used to open a transaction on every agent schema, every few seconds, on
/// every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_pass_reads_only_the_agents_with_a_revocation_queued() {
    let db = TestDb::new().await;
    let (url, seen) = tapped(&db).await;
    let issuer = Issuer::new();
    let app = spawn_with(
        &db,
        &issuer,
        &[
            ("VAULT_DATABASE_URL", url.as_str()),
            ("VAULT_REVOCATION_RETRY_INTERVAL_SECONDS", "1"),
        ],
    )
    .await;
    for agent in ["tap-quiet", "tap-swept"] {
        let vault = app.client(&issuer, agent, "alice").await;
        store(&vault, "jira", "secret").await;
    }
    let mut conn = db.connect().await;
    let schema_of = |agent: &'static str| {
        sqlx::query_scalar::<_, String>("SELECT schema_name FROM vault.agents WHERE agent_id = $1")
            .bind(agent)
    };
    let quiet = schema_of("tap-quiet").fetch_one(&mut conn).await.unwrap();
    let swept = schema_of("tap-swept").fetch_one(&mut conn).await.unwrap();
    // The outbox pass's claims on `schema`.
    let visits = |schema: &str| {
        seen.all()
            .iter()
            .filter(|t| {
                t.iter().any(|sql| {
                    agent_schemas(sql).contains(schema)
                        && sql.contains(".revocation_outbox")
                        && sql.contains("SET lease_owner")
                })
            })
            .count()
    };
    let passes = || {
        seen.all()
            .iter()
            .filter(|t| {
                t.iter()
                    .any(|sql| sql.contains("WHERE outbox_due <= now() AND"))
            })
            .count()
    };
    let before = passes();
    eventually("two more outbox passes ran", || async {
        passes() >= before + 2
    })
    .await;
    assert_eq!(visits(&quiet) + visits(&swept), 0, "nothing is queued");

    // tap-swept's credential expires, and the sweep queues its revocation: the next pass
    // visits tap-swept, and still not tap-quiet.
    sqlx::raw_sql(&format!(
        "UPDATE \"{swept}\".credentials SET ttl_expires_at = now() - interval '1 second';
         UPDATE vault.agents SET sweep_due = now() - interval '1 second'
         WHERE schema_name = '{swept}'"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let admin = app.admin(&issuer, "ops", "operator").await;
    assert_eq!(admin.sweep(0, false).await.unwrap().swept, 1);
    let queued = visits(&swept);
    eventually("a pass visited tap-swept's outbox", || async {
        visits(&swept) > queued
    })
    .await;
    let before = passes();
    eventually("two more outbox passes ran", || async {
        passes() >= before + 2
    })
    .await;
    assert_eq!(visits(&quiet), 0, "tap-quiet has nothing queued");
    app.stop().await;
}
