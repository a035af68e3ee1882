//! WatchCredentials (issue 15): credential events read from the audit chain, woken within a
//! replica by the appends it makes and across replicas by PostgreSQL NOTIFY, resumable by
//! sequence without a gap or a repeat, scoped to the caller, and bounded per caller.

use std::time::{Duration, Instant};

use secrecy::SecretString;
use tokio::net::TcpListener;
use vault_client::proto::WatchCredentialsRequest;
use vault_client::{CredentialEvent, ErrorReason, EventKind, Watch, WatchRequest};
use vault_server::audit::{AuditRecord, Outcome};
use vault_server::config::{Database, DatabaseSettings};
use vault_server::ids::{AgentId, IssuerId};
use vault_server::store::{AUDIT_CHANNEL, AgentRecord, Chain, Store};

use crate::consent::{Consent, deliver};
use crate::helpers::*;

/// How long any event may take to arrive where no tighter bound is the point of the test.
const EVENT_WITHIN: Duration = Duration::from_secs(10);

/// The next event of `watch`, failing the test after `within`.
async fn next_within(watch: &mut Watch, within: Duration) -> CredentialEvent {
    tokio::time::timeout(within, watch.next())
        .await
        .unwrap_or_else(|_| panic!("no event within {within:?}"))
        .expect("the watch goes on")
        .expect("the watch has no error")
}

async fn next_event(watch: &mut Watch) -> CredentialEvent {
    next_within(watch, EVENT_WITHIN).await
}

/// The next `n` events of `watch` for `tool`, skipping events of other tools.
async fn events_of(watch: &mut Watch, tool: &str, n: usize) -> Vec<CredentialEvent> {
    let mut events = Vec::new();
    while events.len() < n {
        let event = next_event(watch).await;
        if event.tool.as_deref() == Some(tool) {
            events.push(event);
        }
    }
    events
}

/// Stores `n` tokens for `tool` through `vault`; their generations, in order.
async fn store_n(vault: &vault_client::Client, tool: &str, n: usize) -> Vec<u64> {
    let mut generations = Vec::new();
    for i in 0..n {
        generations.push(
            store(vault, tool, &format!("{tool}-access-{i}"))
                .await
                .generation,
        );
    }
    generations
}

fn stored_generations(events: &[CredentialEvent]) -> Vec<u64> {
    events
        .iter()
        .inspect(|e| assert_eq!(e.kind, EventKind::Stored, "{e:?}"))
        .map(|e| e.generation.expect("a stored event names its generation"))
        .collect()
}

fn own(tool: Option<&str>) -> WatchRequest {
    WatchRequest {
        tool: tool.map(Into::into),
        ..WatchRequest::default()
    }
}

/// A second store on the test database, as another vault process would open it.
async fn second_store(db: &TestDb) -> Store {
    let settings = DatabaseSettings {
        max_connections: 2,
        ..DatabaseSettings::new(Database::Postgres(SecretString::from(db.url.clone())))
    };
    let store = vault_server::store::open(&settings).await.unwrap();
    store.schema.ready().await.unwrap();
    store
}

async fn agent_record(store: &Store, agent: &str) -> AgentRecord {
    store
        .keys
        .agent(
            &IssuerId::parse(ISS).unwrap(),
            &AgentId::parse(agent).unwrap(),
        )
        .await
        .unwrap()
        .expect("the agent is registered")
}

/// A record as the vault writes for a StoreToken of (`agent`, `user`, `tool`).
fn stored_record(agent: &str, user: &str, tool: &str, generation: u64) -> AuditRecord {
    AuditRecord {
        at_ms: now() * 1000,
        action: "StoreToken".into(),
        agent: Some(agent.into()),
        user: Some(user.into()),
        tool: Some(tool.into()),
        outcome: Outcome::Ok,
        generation: Some(generation),
        verified: true,
        ..AuditRecord::default()
    }
}

/// Appends `records` to `agent`'s chain from another process, and notifies as every append
/// does.
async fn append_elsewhere(
    db: &TestDb,
    store: &Store,
    agent: &AgentRecord,
    records: Vec<AuditRecord>,
) {
    store
        .audit
        .append(Chain::Agent(agent), records)
        .await
        .unwrap();
    let mut conn = db.connect().await;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(AUDIT_CHANNEL)
        .bind(&agent.namespace)
        .execute(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_watcher_hears_what_another_process_appends_to_its_chain_and_only_its_own_events() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let alice = app.client(&issuer, "agent-a", "alice").await;
    // Registers the agent, so that its chain exists.
    store(&alice, "jira", "first").await;
    let mut watch = alice.watch(own(None)).await.unwrap();

    let elsewhere = second_store(&db).await;
    let agent = agent_record(&elsewhere, "agent-a").await;
    let read = AuditRecord {
        action: "GetToken".into(),
        ..stored_record("agent-a", "alice", "direct", 0)
    };
    append_elsewhere(
        &db,
        &elsewhere,
        &agent,
        vec![
            stored_record("agent-a", "bob", "direct", 1),
            read,
            stored_record("agent-a", "alice", "direct", 2),
        ],
    )
    .await;

    let started = Instant::now();
    let event = events_of(&mut watch, "direct", 1).await.remove(0);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        (event.kind, event.user_id.as_str(), event.generation),
        (EventKind::Stored, "alice", Some(2)),
        "bob's store and alice's read are no events for alice"
    );
    assert!(event.sequence > watch.started_after());
}

#[tokio::test]
async fn a_watch_resumed_after_its_last_event_gets_exactly_what_it_missed() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let alice = app.client(&issuer, "agent-a", "alice").await;
    store(&alice, "jira", "first").await;
    let elsewhere = second_store(&db).await;
    let agent = agent_record(&elsewhere, "agent-a").await;
    let records = |from: u64, to: u64| -> Vec<_> {
        (from..=to)
            .map(|g| stored_record("agent-a", "alice", "direct", g))
            .collect()
    };

    let mut watch = alice.watch(own(Some("direct"))).await.unwrap();
    append_elsewhere(&db, &elsewhere, &agent, records(1, 2)).await;
    let seen = events_of(&mut watch, "direct", 2).await;
    assert_eq!(stored_generations(&seen), [1, 2]);
    let last = seen[1].sequence;
    drop(watch);
    // More than a page, while nobody watches.
    append_elsewhere(&db, &elsewhere, &agent, records(3, 200)).await;

    let mut resumed = alice
        .watch(WatchRequest {
            after_sequence: Some(last),
            ..own(Some("direct"))
        })
        .await
        .unwrap();
    assert_eq!(resumed.started_after(), last);
    let missed = events_of(&mut resumed, "direct", 198).await;
    assert_eq!(stored_generations(&missed), (3..=200).collect::<Vec<_>>());
    assert!(missed.windows(2).all(|w| w[0].sequence < w[1].sequence));
    assert!(missed[0].sequence > last);
}

#[tokio::test]
async fn a_watch_for_an_agent_not_registered_yet_starts_at_its_first_record() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let alice = app.client(&issuer, "agent-new", "alice").await;
    let mut watch = alice.watch(own(None)).await.unwrap();
    assert_eq!(watch.started_after(), 0);
    // Registers the agent.
    store(&alice, "jira", "first").await;
    let elsewhere = second_store(&db).await;
    let agent = agent_record(&elsewhere, "agent-new").await;
    append_elsewhere(
        &db,
        &elsewhere,
        &agent,
        vec![stored_record("agent-new", "alice", "direct", 1)],
    )
    .await;
    let event = events_of(&mut watch, "direct", 1).await.remove(0);
    assert_eq!(event.generation, Some(1));
}

#[tokio::test]
async fn a_non_admin_may_not_watch_an_agent_and_an_admin_sees_every_user() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let alice = app.client(&issuer, "agent-a", "alice").await;
    store(&alice, "jira", "first").await;
    let refused = alice
        .watch(WatchRequest {
            agent_id: Some("agent-a".into()),
            ..WatchRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.reason(), ErrorReason::PermissionDenied, "{refused}");

    let admin = app.admin(&issuer, "ops-agent", "operator").await;
    let mut all = admin
        .watch(WatchRequest {
            agent_id: Some("agent-a".into()),
            ..WatchRequest::default()
        })
        .await
        .unwrap();
    let elsewhere = second_store(&db).await;
    let agent = agent_record(&elsewhere, "agent-a").await;
    append_elsewhere(
        &db,
        &elsewhere,
        &agent,
        vec![
            stored_record("agent-a", "bob", "direct", 1),
            stored_record("agent-a", "alice", "direct", 2),
        ],
    )
    .await;
    let users: Vec<_> = events_of(&mut all, "direct", 2)
        .await
        .into_iter()
        .map(|e| e.user_id)
        .collect();
    assert_eq!(users, ["bob", "alice"]);
}

#[tokio::test]
async fn a_caller_may_hold_eight_watches_and_gets_a_ninth_once_one_closes() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let alice = app.client(&issuer, "agent-a", "alice").await;
    let mut open = Vec::new();
    for _ in 0..8 {
        open.push(
            alice
                .raw()
                .watch_credentials(WatchCredentialsRequest::default())
                .await
                .unwrap(),
        );
    }
    let refused = alice
        .raw()
        .watch_credentials(WatchCredentialsRequest::default())
        .await
        .unwrap_err();
    let refused = vault_client::Error::from(refused);
    assert_eq!(refused.reason(), ErrorReason::TooManyWatchers, "{refused}");
    // Another user of the same agent has slots of their own.
    let bob = app.client(&issuer, "agent-a", "bob").await;
    bob.watch(own(None)).await.unwrap();

    open.pop();
    eventually("the closed watch's slot is free again", || async {
        alice
            .raw()
            .watch_credentials(WatchCredentialsRequest::default())
            .await
            .is_ok()
    })
    .await;
}

#[tokio::test]
async fn shutdown_ends_open_watches_instead_of_waiting_for_them() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let alice = app.client(&issuer, "agent-a", "alice").await;
    let mut stream = alice
        .raw()
        .watch_credentials(WatchCredentialsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let started = Instant::now();
    app.stop().await;
    // The grace period is 5 s: a watch that held the drain open would take all of it.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    match stream.message().await {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        Ok(end) => assert!(end.is_none(), "{end:?}"),
    }
}

#[tokio::test]
async fn an_invalid_tool_is_refused() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let alice = app.client(&issuer, "agent-a", "alice").await;
    let refused = alice.watch(own(Some("bad tool\n"))).await.unwrap_err();
    assert_eq!(refused.reason(), ErrorReason::InvalidArgument, "{refused}");
}

// What follows needs the RPCs to write their audit records.

#[tokio::test]
async fn a_watcher_on_one_replica_sees_a_store_on_another_within_a_second() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let a = spawn(&db, &issuer).await;
    let b = spawn(&db, &issuer).await;
    let on_b = b.client(&issuer, "agent-a", "alice").await;
    store(&on_b, "jira", "first").await;
    let on_a = a.client(&issuer, "agent-a", "alice").await;
    let mut watch = on_a.watch(own(None)).await.unwrap();

    let stored = store(&on_b, "jira", "second").await;
    let started = Instant::now();
    let event = next_within(&mut watch, Duration::from_secs(1)).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(event.kind, EventKind::Stored);
    assert_eq!(event.tool.as_deref(), Some("jira"));
    assert_eq!(event.generation, Some(stored.generation));
    assert_eq!(
        (event.agent_id.as_str(), event.user_id.as_str()),
        ("agent-a", "alice")
    );
}

#[tokio::test]
async fn a_raw_watch_dropped_and_resumed_misses_and_repeats_nothing() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let alice = app.client(&issuer, "agent-a", "alice").await;
    let response = alice
        .raw()
        .watch_credentials(WatchCredentialsRequest::default())
        .await
        .unwrap();
    let after: u64 = response
        .metadata()
        .get("vault-watch-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut stream = response.into_inner();
    let first = store_n(&alice, "jira", 2).await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event = tokio::time::timeout(EVENT_WITHIN, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(event.sequence > after);
        seen.push(event);
    }
    assert_eq!(seen.iter().map(|e| e.generation).collect::<Vec<_>>(), first);
    drop(stream);
    let missed = store_n(&alice, "jira", 3).await;

    let mut resumed = alice
        .watch(WatchRequest {
            after_sequence: Some(seen[1].sequence),
            ..WatchRequest::default()
        })
        .await
        .unwrap();
    let events = events_of(&mut resumed, "jira", 3).await;
    assert_eq!(stored_generations(&events), missed);
    assert!(events[0].sequence > seen[1].sequence);
}

#[tokio::test]
async fn the_client_watch_resumes_across_a_vault_restart_without_a_gap_or_a_repeat() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = try_spawn_on(&db, &issuer, &[], Some(listener))
        .await
        .unwrap();
    let alice = app.client(&issuer, "agent-a", "alice").await;
    let mut watch = alice.watch(own(Some("jira"))).await.unwrap();
    let before = store_n(&alice, "jira", 2).await;
    assert_eq!(
        stored_generations(&events_of(&mut watch, "jira", 2).await),
        before
    );

    app.stop().await;
    let listener = TcpListener::bind(addr).await.unwrap();
    let app = try_spawn_on(&db, &issuer, &[], Some(listener))
        .await
        .unwrap();
    let after = store_n(&app.client(&issuer, "agent-a", "alice").await, "jira", 3).await;
    assert_eq!(
        stored_generations(&events_of(&mut watch, "jira", 3).await),
        after
    );
}

#[tokio::test]
async fn a_watch_filtered_by_tool_sees_that_tool_and_nobody_sees_another_users_events() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let alice = app.client(&issuer, "agent-a", "alice").await;
    let bob = app.client(&issuer, "agent-a", "bob").await;
    store(&alice, "jira", "first").await;
    let mut jira_only = alice.watch(own(Some("jira"))).await.unwrap();
    let mut everything = alice.watch(own(None)).await.unwrap();

    store(&bob, "jira", "bobs").await;
    store(&alice, "github", "alices-github").await;
    let jira = store(&alice, "jira", "alices-jira").await;

    let event = next_event(&mut jira_only).await;
    assert_eq!(
        (event.tool.as_deref(), event.generation),
        (Some("jira"), Some(jira.generation))
    );
    let tools: Vec<_> = [
        next_event(&mut everything).await,
        next_event(&mut everything).await,
    ]
    .into_iter()
    .map(|e| {
        assert_eq!(e.user_id, "alice");
        e.tool
    })
    .collect();
    assert_eq!(tools, [Some("github".into()), Some("jira".into())]);
}

#[tokio::test]
async fn on_sqlite_a_watcher_sees_a_store_on_the_same_vault() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(&db, &issuer, &[("VAULT_DATABASE_URL", "sqlite::memory:")]).await;
    let alice = app.client(&issuer, "agent-a", "alice").await;
    let mut watch = alice.watch(own(None)).await.unwrap();
    let stored = store(&alice, "jira", "first").await;
    let event = next_event(&mut watch).await;
    assert_eq!(
        (event.kind, event.generation),
        (EventKind::Stored, Some(stored.generation))
    );
}

#[tokio::test]
async fn consent_completed_on_one_replica_wakes_the_agent_watching_on_another() {
    let mut w = Consent::new().await;
    let a = w.vault().await;
    let b = w.replica().await;
    let agent = b.client(&w.issuer, "agent-a", "alice").await;
    let mut watch = agent.watch(own(Some("jira"))).await.unwrap();

    let (id, url) = w.begin(&a, "agent-a", "alice").await;
    let callback = w.consent(&url, "alice").await;
    assert_eq!(deliver(&w.browser, &callback).await.0, 303);
    let gateway = a.client(&w.issuer, "agent-a", "alice").await;
    let completed = gateway.complete_authorization(&id).await.unwrap();

    let mut kinds = Vec::new();
    loop {
        let event = next_event(&mut watch).await;
        if event.authorization_id.as_deref() != Some(id.as_str()) {
            continue;
        }
        kinds.push(event.kind);
        if event.kind == EventKind::AuthorizationCompleted {
            assert_eq!(event.generation, Some(completed.stored.generation));
            break;
        }
    }
    assert_eq!(
        kinds,
        [
            EventKind::AuthorizationBegun,
            EventKind::AuthorizationCallback,
            EventKind::AuthorizationCompleted
        ]
    );
    agent.get_token("jira", Duration::ZERO).await.unwrap();
}
