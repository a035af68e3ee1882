//! Audit store conformance (issue 15): chains append gap-free under concurrency, read back
//! exactly, stay apart, survive retention from their anchor, keep their signed heads, and give
//! away tampering done behind the store's back with SQL.

use std::path::PathBuf;

use sqlx::Connection as _;
use vault_server::audit::chain::GENESIS;
use vault_server::audit::{
    Anchor, AuditRecord, Broken, HeadKey, Outcome, SignedHead, Stored, link, token_digest, verify,
};
use vault_server::config::{Database, DatabaseSettings};
use vault_server::crypto::ControlKey;
use vault_server::ids::Generation;
use vault_server::store::{AgentRecord, Chain, NewCredential, PgStore, Release, Store};

use super::{ServingLogin, key, migrated_pg, postgres, registered, sealed, sqlite, tool, user};
use crate::helpers::TestDb;

const T0: i64 = 1_764_000_000_123;

/// A record with every field set, distinct per `n`; times a millisecond apart.
fn full(n: u64) -> AuditRecord {
    AuditRecord {
        sequence: 0,
        at_ms: T0 + n as i64,
        action: "StoreToken".into(),
        agent: Some("agent-a".into()),
        user: Some(format!("user-{n}")),
        tool: Some("jira".into()),
        outcome: if n.is_multiple_of(2) {
            Outcome::Ok
        } else {
            Outcome::Failed("PERMISSION_DENIED".into())
        },
        generation: Some(n),
        caller_iss: Some(crate::helpers::ISS.into()),
        caller_jti: Some(format!("jti-{n}")),
        caller_digest: Some(token_digest(&format!("caller-token-{n}"))),
        verified: !n.is_multiple_of(3),
        peer: Some("127.0.0.1:50000".into()),
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        target: Some("agent-b/bob".into()),
    }
}

/// A record with every optional field absent.
fn bare(action: &str, at_ms: i64) -> AuditRecord {
    AuditRecord {
        at_ms,
        action: action.into(),
        ..AuditRecord::default()
    }
}

async fn all_of(store: &Store, chain: Chain<'_>) -> Vec<Stored> {
    store.audit.records(chain, 0, 1000).await.unwrap()
}

/// Verifies `chain` as stored: from its anchor, against `head` if given.
async fn verified(
    store: &Store,
    chain: Chain<'_>,
    head: Option<(&HeadKey, &SignedHead)>,
) -> Result<Anchor, Broken> {
    let anchor = store.audit.anchor(chain).await.unwrap();
    verify(anchor, &all_of(store, chain).await, head)
}

fn sequences(stored: &[Stored]) -> Vec<u64> {
    stored.iter().map(|s| s.record.sequence).collect()
}

fn head_key() -> HeadKey {
    HeadKey::derive(&ControlKey::from_bytes([7; 32]))
}

async fn an_audit_record_reads_back_exactly(store: &Store) {
    let a = registered(store, "agent-a").await;
    let written = vec![full(1), bare("startup", -5), full(2), full(3)];
    let stored = store
        .audit
        .append(Chain::Agent(&a), written.clone())
        .await
        .unwrap();
    assert_eq!(sequences(&stored), [1, 2, 3, 4]);
    for (stored, mut record) in stored.iter().zip(written) {
        record.sequence = stored.record.sequence;
        assert_eq!(
            stored.record, record,
            "stored as given, numbered by the store"
        );
    }
    assert_eq!(all_of(store, Chain::Agent(&a)).await, stored);
    assert_eq!(stored[0].hash, link(&GENESIS, &stored[0].record));
    assert_eq!(
        store.audit.anchor(Chain::Agent(&a)).await.unwrap(),
        Anchor::START
    );
    assert_eq!(
        verified(store, Chain::Agent(&a), None)
            .await
            .unwrap()
            .sequence,
        4
    );
    assert!(
        store
            .audit
            .append(Chain::Agent(&a), Vec::new())
            .await
            .unwrap()
            .is_empty()
    );
}

async fn sequences_continue_across_appends_and_pages_follow_them(store: &Store) {
    let a = registered(store, "agent-a").await;
    let first = store
        .audit
        .append(Chain::Agent(&a), vec![full(1), full(2)])
        .await
        .unwrap();
    let second = store
        .audit
        .append(Chain::Agent(&a), vec![full(3), full(4), full(5)])
        .await
        .unwrap();
    assert_eq!(sequences(&second), [3, 4, 5]);
    assert_eq!(
        store.audit.head(Chain::Agent(&a)).await.unwrap(),
        Anchor {
            sequence: 5,
            hash: second[2].hash
        }
    );
    assert_eq!(second[0].hash, link(&first[1].hash, &second[0].record));
    let page = store.audit.records(Chain::Agent(&a), 2, 2).await.unwrap();
    assert_eq!(page, second[..2]);
    assert!(
        store
            .audit
            .records(Chain::Agent(&a), 5, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        verified(store, Chain::Agent(&a), None)
            .await
            .unwrap()
            .sequence,
        5
    );
}

async fn concurrent_appends_make_one_gap_free_chain(store: &Store) {
    let a = registered(store, "agent-a").await;
    let appends: Vec<_> = (0..50)
        .map(|n| {
            let (store, a) = (store.clone(), a.clone());
            tokio::spawn(async move {
                store
                    .audit
                    .append(Chain::Agent(&a), vec![full(n)])
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut given = Vec::new();
    for append in appends {
        given.extend(sequences(&append.await.unwrap()));
    }
    given.sort_unstable();
    assert_eq!(given, (1..=50).collect::<Vec<_>>());
    let log = all_of(store, Chain::Agent(&a)).await;
    assert_eq!(log.len(), 50);
    assert_eq!(verify(Anchor::START, &log, None).unwrap().sequence, 50);
}

async fn one_group_appends_to_many_chains_and_each_continues_its_own(store: &Store) {
    let a = registered(store, "agent-a").await;
    let b = registered(store, "agent-b").await;
    store
        .audit
        .append(Chain::Agent(&a), vec![full(1)])
        .await
        .unwrap();
    store
        .audit
        .append_batches(vec![
            (Chain::Agent(&b), vec![full(2)]),
            (Chain::Control, vec![bare("startup", T0)]),
            (Chain::Agent(&a), vec![full(3), full(4)]),
            (Chain::Agent(&b), Vec::new()),
        ])
        .await
        .into_iter()
        .for_each(|result| result.unwrap());
    assert_eq!(sequences(&all_of(store, Chain::Agent(&a)).await), [1, 2, 3]);
    assert_eq!(sequences(&all_of(store, Chain::Agent(&b)).await), [1]);
    assert_eq!(sequences(&all_of(store, Chain::Control).await), [1]);
    for chain in [Chain::Agent(&a), Chain::Agent(&b), Chain::Control] {
        verified(store, chain, None).await.unwrap();
    }
}

async fn each_agent_and_the_control_plane_have_a_chain_of_their_own(store: &Store) {
    let a = registered(store, "agent-a").await;
    let b = registered(store, "agent-b").await;
    store
        .audit
        .append(Chain::Agent(&a), vec![full(1), full(2)])
        .await
        .unwrap();
    let on_b = store
        .audit
        .append(Chain::Agent(&b), vec![full(7)])
        .await
        .unwrap();
    let on_control = store
        .audit
        .append(
            Chain::Control,
            vec![
                bare("startup", T0),
                bare("key.rotate", T0 + 1),
                bare("shutdown", T0 + 2),
            ],
        )
        .await
        .unwrap();
    assert_eq!(sequences(&on_b), [1]);
    assert_eq!(sequences(&on_control), [1, 2, 3]);
    store
        .audit
        .append(Chain::Agent(&a), vec![full(3)])
        .await
        .unwrap();
    assert_eq!(sequences(&all_of(store, Chain::Agent(&a)).await), [1, 2, 3]);
    assert_eq!(all_of(store, Chain::Agent(&b)).await, on_b);
    assert_eq!(all_of(store, Chain::Control).await, on_control);
    for chain in [Chain::Agent(&a), Chain::Agent(&b), Chain::Control] {
        verified(store, chain, None).await.unwrap();
    }
    // Retention on one chain leaves the others whole.
    assert_eq!(
        store
            .audit
            .delete_before(Chain::Agent(&a), i64::MAX, 10)
            .await
            .unwrap(),
        3
    );
    assert_eq!(all_of(store, Chain::Agent(&b)).await, on_b);
    assert_eq!(
        store.audit.anchor(Chain::Control).await.unwrap(),
        Anchor::START
    );
}

async fn retention_deletes_an_old_prefix_and_the_rest_verifies_from_the_anchor(store: &Store) {
    let a = registered(store, "agent-a").await;
    // Record 3 was stamped late (a replica with a fast clock): retention stops there rather
    // than leave a hole.
    let times = [100, 200, 900, 300, 400, 500];
    let stored = store
        .audit
        .append(
            Chain::Agent(&a),
            times.iter().map(|&t| bare("GetToken", t)).collect(),
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .audit
            .delete_before(Chain::Agent(&a), 50, 10)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store.audit.anchor(Chain::Agent(&a)).await.unwrap(),
        Anchor::START
    );

    assert_eq!(
        store
            .audit
            .delete_before(Chain::Agent(&a), 350, 10)
            .await
            .unwrap(),
        2
    );
    let anchor = store.audit.anchor(Chain::Agent(&a)).await.unwrap();
    assert_eq!(
        anchor,
        Anchor {
            sequence: 2,
            hash: stored[1].hash
        }
    );
    let kept = all_of(store, Chain::Agent(&a)).await;
    assert_eq!(kept, stored[2..]);
    assert_eq!(verify(anchor, &kept, None).unwrap().sequence, 6);
    assert!(
        verify(Anchor::START, &kept, None).is_err(),
        "without the anchor the kept part does not verify"
    );

    // At most `limit` per call.
    assert_eq!(
        store
            .audit
            .delete_before(Chain::Agent(&a), 1000, 1)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.audit.anchor(Chain::Agent(&a)).await.unwrap().sequence,
        3
    );
    assert_eq!(
        store
            .audit
            .delete_before(Chain::Agent(&a), 1000, 10)
            .await
            .unwrap(),
        3
    );
    let anchor = store.audit.anchor(Chain::Agent(&a)).await.unwrap();
    assert_eq!(
        anchor,
        Anchor {
            sequence: 6,
            hash: stored[5].hash
        }
    );
    // An emptied chain carries on from its anchor.
    let next = store
        .audit
        .append(Chain::Agent(&a), vec![bare("GetToken", 2000)])
        .await
        .unwrap();
    assert_eq!(sequences(&next), [7]);
    assert_eq!(next[0].hash, link(&stored[5].hash, &next[0].record));
    assert_eq!(
        verified(store, Chain::Agent(&a), None)
            .await
            .unwrap()
            .sequence,
        7
    );
}

async fn the_latest_signed_head_of_each_chain_is_kept(store: &Store) {
    let a = registered(store, "agent-a").await;
    let key = head_key();
    assert_eq!(
        store.audit.signed_head(Chain::Agent(&a)).await.unwrap(),
        None
    );
    assert_eq!(store.audit.signed_head(Chain::Control).await.unwrap(), None);
    let stored = store
        .audit
        .append(Chain::Agent(&a), (1..=5).map(full).collect())
        .await
        .unwrap();
    let at = |n: usize| key.sign("agent-a", n as u64, &stored[n - 1].hash);

    store
        .audit
        .save_head(Chain::Agent(&a), &at(3))
        .await
        .unwrap();
    let read = store.audit.signed_head(Chain::Agent(&a)).await.unwrap();
    assert_eq!(read, Some(at(3)));
    assert!(key.verifies(&read.unwrap()));
    // A slower signer's older head never replaces a newer one.
    store
        .audit
        .save_head(Chain::Agent(&a), &at(2))
        .await
        .unwrap();
    assert_eq!(
        store.audit.signed_head(Chain::Agent(&a)).await.unwrap(),
        Some(at(3))
    );
    store
        .audit
        .save_head(Chain::Agent(&a), &at(5))
        .await
        .unwrap();
    let head = store
        .audit
        .signed_head(Chain::Agent(&a))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head, at(5));
    assert_eq!(
        verified(store, Chain::Agent(&a), Some((&key, &head)))
            .await
            .unwrap()
            .sequence,
        5
    );
    assert_eq!(store.audit.signed_head(Chain::Control).await.unwrap(), None);

    let control = key.sign("control", 0, &GENESIS);
    store
        .audit
        .save_head(Chain::Control, &control)
        .await
        .unwrap();
    assert_eq!(
        store.audit.signed_head(Chain::Control).await.unwrap(),
        Some(control)
    );
    assert_eq!(
        store.audit.signed_head(Chain::Agent(&a)).await.unwrap(),
        Some(at(5))
    );
}

conformance!(
    an_audit_record_reads_back_exactly,
    sequences_continue_across_appends_and_pages_follow_them,
    concurrent_appends_make_one_gap_free_chain,
    each_agent_and_the_control_plane_have_a_chain_of_their_own,
    one_group_appends_to_many_chains_and_each_continues_its_own,
    a_release_is_recorded_with_its_read_only_when_it_can_be_made,
    retention_deletes_an_old_prefix_and_the_rest_verifies_from_the_anchor,
    the_latest_signed_head_of_each_chain_is_kept,
);

/// GetToken's record for a release of alice's jira credential at agent-a.
fn release(valid_until: i64) -> Release {
    Release {
        record: AuditRecord {
            action: "GetToken".into(),
            generation: None,
            ..full(2)
        },
        valid_until,
    }
}

/// Stores alice's jira credential at `a`, its access token valid for `valid_for` seconds.
async fn stored(store: &Store, a: &AgentRecord, valid_for: i64) -> Generation {
    let generation = store.credentials.next_generation(a).await.unwrap();
    let (alice, jira) = (user("alice"), tool("jira"));
    store
        .credentials
        .upsert(
            key(a, &alice, &jira),
            NewCredential {
                generation,
                sealed: &sealed(1),
                access_expires_at: Some(chrono::Utc::now() + chrono::Duration::seconds(valid_for)),
                ttl_seconds: 3600,
            },
            Vec::new(),
        )
        .await
        .unwrap();
    generation
}

/// Whichever way a store answers a release (recorded with its read, or left to the caller),
/// the credential read is the same, a recorded release carries the generation read and links
/// into the chain, and a credential that cannot be released as it stands is never recorded.
async fn a_release_is_recorded_with_its_read_only_when_it_can_be_made(store: &Store) {
    let a = registered(store, "agent-a").await;
    let (alice, jira) = (user("alice"), tool("jira"));
    store
        .audit
        .append(Chain::Agent(&a), vec![full(1)])
        .await
        .unwrap();
    let generation = stored(store, &a, 60).await;
    let now = chrono::Utc::now().timestamp();

    let (loaded, recorded) = store
        .credentials
        .load_releasing(key(&a, &alice, &jira), &release(now))
        .await
        .unwrap();
    assert_eq!(loaded.unwrap().generation, generation);
    let log = all_of(store, Chain::Agent(&a)).await;
    assert_eq!(log.len(), 1 + usize::from(recorded.is_some()));
    if let Some(sequence) = recorded {
        assert_eq!(sequence, 2);
        assert_eq!(log[1].record.action, "GetToken");
        assert_eq!(log[1].record.generation, Some(generation.get()));
        assert_eq!(log[1].record.outcome, Outcome::Ok);
    }

    // Expiring before the caller needs it: read, never recorded as released.
    let (loaded, late) = store
        .credentials
        .load_releasing(key(&a, &alice, &jira), &release(now + 120))
        .await
        .unwrap();
    assert!(loaded.is_some());
    assert_eq!(late, None);
    // Absent: nothing read, nothing recorded.
    let (loaded, absent) = store
        .credentials
        .load_releasing(key(&a, &user("bob"), &jira), &release(now))
        .await
        .unwrap();
    assert!(loaded.is_none() && absent.is_none());

    store
        .audit
        .append(Chain::Agent(&a), vec![full(3)])
        .await
        .unwrap();
    let log = all_of(store, Chain::Agent(&a)).await;
    assert_eq!(
        sequences(&log),
        (1..=2 + u64::from(recorded.is_some())).collect::<Vec<_>>()
    );
    verified(store, Chain::Agent(&a), None).await.unwrap();
}

/// Two replicas append to one chain and release from it, each from a head the other keeps
/// moving: every stale head is caught by the statement that would have moved it, the chain
/// stays gap-free and verifies, and a replica whose head is current records a release with
/// its read (the one round trip GetToken's audit costs at one caller).
#[tokio::test]
async fn replicas_appending_from_stale_heads_keep_one_chain_and_releases_ride_on_reads() {
    let db = TestDb::new().await;
    let (_, one) = migrated_pg(&db, 4).await;
    let (_, two) = migrated_pg(&db, 4).await;
    let a = registered(&one, "agent-a").await;
    let (alice, jira) = (user("alice"), tool("jira"));
    let generation = stored(&one, &a, 3600).await;
    let now = chrono::Utc::now().timestamp();
    let mut expected = 0;
    for n in 0..10 {
        one.audit
            .append(Chain::Agent(&a), vec![full(n)])
            .await
            .unwrap();
        // One's head is current: its release is recorded with the read.
        let (loaded, recorded) = one
            .credentials
            .load_releasing(key(&a, &alice, &jira), &release(now))
            .await
            .unwrap();
        assert_eq!(loaded.unwrap().generation, generation);
        assert!(
            recorded.is_some(),
            "round {n}: the release rides on the read"
        );
        for result in two
            .audit
            .append_batches(vec![(Chain::Agent(&a), vec![full(n), full(n + 1)])])
            .await
        {
            result.unwrap();
        }
        // Now one's head is stale: nothing is recorded, and the caller records it itself.
        let (_, recorded) = one
            .credentials
            .load_releasing(key(&a, &alice, &jira), &release(now))
            .await
            .unwrap();
        assert_eq!(recorded, None, "round {n}: a stale head records nothing");
        expected += 4;
    }
    let log = all_of(&one, Chain::Agent(&a)).await;
    assert_eq!(sequences(&log), (1..=expected).collect::<Vec<_>>());
    let releases: Vec<_> = log
        .iter()
        .filter(|s| s.record.action == "GetToken")
        .map(|s| s.record.generation)
        .collect();
    assert_eq!(releases, vec![Some(generation.get()); 10]);
    verified(&one, Chain::Agent(&a), None).await.unwrap();
}

/// The database behind a store, reached around it, as an intruder with SQL access would.
enum Raw {
    Postgres(String),
    Sqlite(PathBuf),
}

impl Raw {
    /// Runs `sql` on `agent`'s chain: `{log}` is its log table, `{mine}` a condition selecting
    /// its rows, and `{chain_col}` the column naming the chain where chains share a table
    /// (with its trailing comma; empty where they do not).
    async fn tamper(&self, agent: &AgentRecord, sql: &str) {
        match self {
            Self::Postgres(url) => {
                let sql = sql
                    .replace("{log}", &format!("\"{}\".audit_log", agent.namespace))
                    .replace("{mine}", "true")
                    .replace("{chain_col}", "");
                let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
                sqlx::raw_sql(&sql).execute(&mut conn).await.unwrap();
            }
            Self::Sqlite(path) => {
                let sql = sql
                    .replace("{log}", "audit_log")
                    .replace("{mine}", &format!("chain = '{}'", agent.namespace))
                    .replace("{chain_col}", "chain, ");
                let mut conn =
                    sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
                        .await
                        .unwrap();
                sqlx::raw_sql(&sql).execute(&mut conn).await.unwrap();
            }
        }
    }

    /// `bytes` as a literal of the backend's binary type.
    fn blob(&self, bytes: &[u8]) -> String {
        match self {
            Self::Postgres(_) => format!("'\\x{}'::bytea", hex::encode(bytes)),
            Self::Sqlite(_) => format!("X'{}'", hex::encode(bytes)),
        }
    }
}

/// An agent named `name` with six records, a head signed at the sixth, and a chain that
/// verifies before anyone touches it.
async fn six_records(store: &Store, name: &str) -> (AgentRecord, Vec<Stored>, SignedHead) {
    let a = registered(store, name).await;
    let stored = store
        .audit
        .append(Chain::Agent(&a), (1..=6).map(full).collect())
        .await
        .unwrap();
    let key = head_key();
    store
        .audit
        .save_head(Chain::Agent(&a), &key.sign(name, 6, &stored[5].hash))
        .await
        .unwrap();
    let head = store
        .audit
        .signed_head(Chain::Agent(&a))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        verified(store, Chain::Agent(&a), Some((&key, &head)))
            .await
            .unwrap()
            .sequence,
        6
    );
    (a, stored, head)
}

async fn tampering_with_sql_is_caught_naming_the_record(store: &Store, raw: &Raw) {
    let key = head_key();

    let (a, _, head) = six_records(store, "edited").await;
    raw.tamper(
        &a,
        "UPDATE {log} SET outcome = 'OK' WHERE {mine} AND sequence = 3",
    )
    .await;
    assert_eq!(
        verified(store, Chain::Agent(&a), Some((&key, &head))).await,
        Err(Broken::Edited { sequence: 3 })
    );

    let (a, _, head) = six_records(store, "deleted").await;
    raw.tamper(&a, "DELETE FROM {log} WHERE {mine} AND sequence = 3")
        .await;
    assert_eq!(
        verified(store, Chain::Agent(&a), Some((&key, &head))).await,
        Err(Broken::Gap {
            sequence: 4,
            expected: 3
        })
    );

    let (a, _, head) = six_records(store, "reordered").await;
    raw.tamper(
        &a,
        "UPDATE {log} SET sequence = -1 WHERE {mine} AND sequence = 2;
         UPDATE {log} SET sequence = 2 WHERE {mine} AND sequence = 3;
         UPDATE {log} SET sequence = 3 WHERE {mine} AND sequence = -1;",
    )
    .await;
    assert_eq!(
        verified(store, Chain::Agent(&a), Some((&key, &head))).await,
        Err(Broken::Edited { sequence: 2 })
    );

    // The intruder knows the hash function: the inserted record links correctly to the one
    // before it, and the records after it are renumbered. The first renumbered one gives it
    // away.
    let (a, stored, head) = six_records(store, "inserted").await;
    let mut forged = stored[2].record.clone();
    forged.sequence = 4;
    forged.action = "RevokeToken".into();
    let forged_hash = link(&stored[2].hash, &forged);
    raw.tamper(
        &a,
        &format!(
            "UPDATE {{log}} SET sequence = -sequence WHERE {{mine}} AND sequence > 3;
             UPDATE {{log}} SET sequence = 1 - sequence WHERE {{mine}} AND sequence < 0;
             INSERT INTO {{log}} ({{chain_col}}sequence, at, action, agent, user_id, tool,
                 outcome, generation, caller_iss, caller_jti, caller_digest, verified, peer,
                 trace_id, target, hash)
             SELECT {{chain_col}}4, at, 'RevokeToken', agent, user_id, tool, outcome,
                 generation, caller_iss, caller_jti, caller_digest, verified, peer, trace_id,
                 target, {}
             FROM {{log}} WHERE {{mine}} AND sequence = 3;",
            raw.blob(&forged_hash)
        ),
    )
    .await;
    let log = all_of(store, Chain::Agent(&a)).await;
    assert_eq!(
        log[3],
        Stored {
            record: forged,
            hash: forged_hash
        }
    );
    assert_eq!(
        verified(store, Chain::Agent(&a), Some((&key, &head))).await,
        Err(Broken::Edited { sequence: 5 })
    );

    // Cutting the tail leaves a chain that verifies on its own; the signed head catches it.
    let (a, _, head) = six_records(store, "truncated").await;
    raw.tamper(&a, "DELETE FROM {log} WHERE {mine} AND sequence > 4")
        .await;
    assert_eq!(
        verified(store, Chain::Agent(&a), None)
            .await
            .unwrap()
            .sequence,
        4
    );
    assert_eq!(
        verified(store, Chain::Agent(&a), Some((&key, &head))).await,
        Err(Broken::Truncated {
            sequence: 6,
            problem: "ends before it"
        })
    );
}

#[tokio::test]
async fn tampering_with_sql_is_caught_naming_the_record_on_postgres() {
    let db = TestDb::new().await;
    let store = postgres(&db).await;
    tampering_with_sql_is_caught_naming_the_record(&store, &Raw::Postgres(db.url.clone())).await;
}

#[tokio::test]
async fn tampering_with_sql_is_caught_naming_the_record_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir).await;
    tampering_with_sql_is_caught_naming_the_record(
        &store,
        &Raw::Sqlite(dir.path().join("vault.db")),
    )
    .await;
}

/// Whether `sql`, run as `login` (under `role` first when given), is refused for want of a
/// privilege (SQLSTATE 42501).
async fn refused(login_url: &str, role: Option<&str>, sql: &str) -> bool {
    let mut conn = sqlx::PgConnection::connect(login_url).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    if let Some(role) = role {
        sqlx::raw_sql(&format!("SET LOCAL ROLE \"{role}\""))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    match sqlx::raw_sql(sql).execute(&mut *tx).await {
        Err(sqlx::Error::Database(err)) => err.code().as_deref() == Some("42501"),
        Err(other) => panic!("{sql}: {other}"),
        Ok(_) => false,
    }
}

/// The serving role appends, reads, signs and runs retention on both kinds of chain, but may
/// not rewrite or delete a record, move an anchor, nor remove or add a head row; retention runs
/// through the owner's function and stops at the floor `migrate` recorded.
#[tokio::test]
async fn the_serving_role_appends_and_runs_retention_but_cannot_rewrite_records() {
    let db = TestDb::new().await;
    let login = ServingLogin::create(&db).await;
    let owner = PgStore::connect(&DatabaseSettings {
        serving_role: Some(login.name.clone()),
        audit_retention_days: 30,
        ..DatabaseSettings::new(Database::Postgres(db.url.clone().into()))
    })
    .await
    .unwrap();
    Store::new(owner).schema.migrate().await.unwrap();
    let login_url = login.url(&db);
    let serving = Store::new(
        PgStore::connect(&DatabaseSettings::new(Database::Postgres(
            login_url.clone().into(),
        )))
        .await
        .unwrap(),
    );
    serving.schema.ready().await.unwrap();

    let a = registered(&serving, "agent-a").await;
    let key = head_key();
    for chain in [Chain::Control, Chain::Agent(&a)] {
        let stored = serving
            .audit
            .append(chain, vec![bare("startup", 100), bare("GetToken", 200)])
            .await
            .unwrap();
        serving
            .audit
            .save_head(chain, &key.sign("c", 2, &stored[1].hash))
            .await
            .unwrap();
        assert_eq!(
            serving.audit.delete_before(chain, 150, 10).await.unwrap(),
            1
        );
        assert_eq!(verified(&serving, chain, None).await.unwrap().sequence, 2);
    }

    let mut admin = db.connect().await;
    let agent_role: String = sqlx::query_scalar("SELECT vault.agent_role($1)")
        .bind(&a.namespace)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    let schema = format!("\"{}\"", a.namespace);
    for (role, log, head) in [
        (
            None,
            "vault.audit_log".to_string(),
            "vault.audit_head".to_string(),
        ),
        (
            Some(agent_role.as_str()),
            format!("{schema}.audit_log"),
            format!("{schema}.audit_head"),
        ),
    ] {
        for sql in [
            format!("UPDATE {log} SET action = 'forged'"),
            format!("DELETE FROM {log}"),
            format!("UPDATE {head} SET anchor_sequence = 0"),
            format!("UPDATE {head} SET anchor_hash = last_hash"),
            format!("DELETE FROM {head}"),
            format!(
                "INSERT INTO {head} (last_sequence, last_hash, anchor_sequence, anchor_hash)
                 VALUES (0, '', 0, '')"
            ),
        ] {
            assert!(refused(&login_url, role, &sql).await, "{role:?}: {sql}");
        }
        // What the store itself does is allowed (so the refusals above are for want of a right).
        for sql in [
            format!("SELECT count(*) FROM {log}"),
            format!("UPDATE {head} SET last_sequence = last_sequence"),
        ] {
            assert!(!refused(&login_url, role, &sql).await, "{role:?}: {sql}");
        }
    }

    // Group commit appends to many agents' chains (each in its own commit) under the serving group,
    // which may append to them and move their ends, and nothing more: not read an agent's
    // credentials, not rewrite or delete a record, not move an anchor or a signed head.
    let b = registered(&serving, "agent-b").await;
    for result in serving
        .audit
        .append_batches(vec![
            (Chain::Agent(&a), vec![full(1)]),
            (Chain::Agent(&b), vec![full(2), full(3)]),
            (Chain::Control, vec![bare("shutdown", 300)]),
        ])
        .await
    {
        result.unwrap();
    }
    assert_eq!(
        verified(&serving, Chain::Agent(&a), None)
            .await
            .unwrap()
            .sequence,
        3
    );
    assert_eq!(
        verified(&serving, Chain::Agent(&b), None)
            .await
            .unwrap()
            .sequence,
        2
    );
    for sql in [
        format!("SELECT count(*) FROM {schema}.credentials"),
        format!("SELECT count(*) FROM {schema}.audit_log"),
        format!("UPDATE {schema}.audit_log SET action = 'forged'"),
        format!("DELETE FROM {schema}.audit_log"),
        format!("DELETE FROM {schema}.audit_head"),
        format!("UPDATE {schema}.audit_head SET anchor_sequence = 0"),
        format!("UPDATE {schema}.audit_head SET signed_mac = NULL"),
    ] {
        assert!(refused(&login_url, None, &sql).await, "serving: {sql}");
    }
    assert!(
        !refused(
            &login_url,
            None,
            &format!("UPDATE {schema}.audit_head SET last_sequence = last_sequence"),
        )
        .await
    );

    // Retention goes through vault.audit_trim, which deletes nothing younger than the
    // retention `migrate` recorded, whatever cut-off the serving login asks for.
    let floor: i32 =
        sqlx::query_scalar("SELECT audit_retention_days FROM vault.instance WHERE id = 1")
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!(floor, 30, "migrate recorded the configured retention");
    let mut as_serving = sqlx::PgConnection::connect(&login_url).await.unwrap();
    for chain in [Chain::Agent(&a), Chain::Control] {
        // Records of 1970 and 2025 (older than the floor), then one stamped now.
        let recent = serving
            .audit
            .append(
                chain,
                vec![bare("GetToken", chrono::Utc::now().timestamp_millis())],
            )
            .await
            .unwrap();
        let before = serving.audit.records(chain, 0, 100).await.unwrap();
        let old = before.len() - 1;
        assert!(old > 0);
        // A cut-off in the future deletes the old ones and stops at the floor.
        let deleted: i64 =
            sqlx::query_scalar("SELECT vault.audit_trim($1, now() + interval '1 day', 1000)")
                .bind(chain.key())
                .fetch_one(&mut as_serving)
                .await
                .unwrap();
        assert_eq!(
            deleted,
            old as i64,
            "{}: only what is older than the floor",
            chain.key()
        );
        assert_eq!(
            serving.audit.records(chain, 0, 100).await.unwrap(),
            recent,
            "{}",
            chain.key()
        );
        assert_eq!(
            verified(&serving, chain, None).await.unwrap().sequence,
            recent[0].record.sequence
        );
    }
    // And it trims only chains: no other schema's table.
    assert!(
        sqlx::query_scalar::<_, i64>("SELECT vault.audit_trim('public', now(), 10)")
            .fetch_one(&mut as_serving)
            .await
            .is_err()
    );
    drop(serving);
    drop(db);
    drop(login);
}

/// An agent whose schema predates the audit log gets its audit tables, head row and rights
/// when `migrate`'s online upgrade reaches it.
#[tokio::test]
async fn migrate_gives_an_older_agent_schema_its_audit_chain() {
    let db = TestDb::new().await;
    let store = postgres(&db).await;
    let a = registered(&store, "agent-a").await;
    let schema = format!("\"{}\"", a.namespace);
    let mut admin = db.connect().await;
    // Back to agent schema version 2, as an agent made before this release has it.
    sqlx::raw_sql(&format!(
        "DROP TABLE {schema}.audit_log, {schema}.audit_head;
         UPDATE vault.agents SET schema_version = 2;"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    assert!(
        store
            .audit
            .append(Chain::Agent(&a), vec![bare("GetToken", T0)])
            .await
            .is_err()
    );

    // `migrate` leaves agent schemas to the online upgrade, which `vault-server migrate` runs
    // next.
    store.schema.migrate().await.unwrap();
    let upgraded = store.schema.upgrade_agents(10).await.unwrap();
    assert_eq!((upgraded.upgraded, upgraded.left), (1, 0));
    let stored = store
        .audit
        .append(Chain::Agent(&a), vec![bare("GetToken", T0)])
        .await
        .unwrap();
    assert_eq!(sequences(&stored), [1]);
    let agent_role: String = sqlx::query_scalar("SELECT vault.agent_role($1)")
        .bind(&a.namespace)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert!(
        refused(
            &db.url,
            Some(&agent_role),
            &format!("UPDATE {schema}.audit_log SET action = 'forged'")
        )
        .await
    );
}
