//! `vault-server audit verify` and `audit export` as an operator runs them, on PostgreSQL and on
//! the embedded SQLite store: a vault with records in the control chain and two agents' chains,
//! heads signed by the signing job's pass, then tampered with SQL behind the store's back; the
//! retention pass the sweeper runs; and what one signing pass signs.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use sqlx::Connection as _;
use tokio_util::sync::CancellationToken;
use vault_server::audit::{AuditRecord, HeadKey, Outcome, Stored, link, token_digest};
use vault_server::config::{Database, DatabaseSettings};
use vault_server::crypto::{RootKey, RootKeySource};
use vault_server::ids::{AgentId, IssuerId};
use vault_server::jobs::{retain, sign_heads};
use vault_server::store::{AgentRecord, Chain, Store};

use crate::helpers::{ISS, ROOT_KEY, TestDb, binary};

const DAY_MS: i64 = 86_400_000;

fn root_key() -> RootKey {
    let bytes: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(ROOT_KEY)
        .unwrap()
        .try_into()
        .unwrap();
    RootKey::from_bytes(bytes)
}

/// The key the vault in `store` signs heads with: derived from its control key, which its root
/// key unwraps.
async fn head_key(store: &Store) -> HeadKey {
    let root = vault_server::vault::unlock_root_key(store, RootKeySource::Key(root_key()))
        .await
        .unwrap();
    HeadKey::derive(&root.control)
}

/// A record of `action` at `at_ms`, with the fields a real call would fill.
fn record(n: u64, at_ms: i64) -> AuditRecord {
    AuditRecord {
        at_ms,
        action: if n.is_multiple_of(2) {
            "GetToken"
        } else {
            "StoreToken"
        }
        .into(),
        agent: Some("agent-a".into()),
        user: Some(format!("user-{n}")),
        tool: Some("jira".into()),
        outcome: Outcome::Ok,
        generation: Some(n),
        caller_iss: Some(ISS.into()),
        caller_jti: Some(format!("jti-{n}")),
        caller_digest: Some(token_digest(&format!("caller-token-{n}"))),
        verified: true,
        peer: Some("127.0.0.1:50000".into()),
        trace_id: None,
        target: None,
        ..AuditRecord::default()
    }
}

/// Where the vault's data is.
enum Backend {
    Postgres(TestDb),
    Sqlite(tempfile::TempDir),
}

/// A vault with a control chain of 4 records and agents `agent-a` (6) and `agent-b` (5), the
/// records `days_old` days old each (oldest first), and every head signed by one signing pass.
struct Vault {
    backend: Backend,
    store: Store,
    a: AgentRecord,
    b: AgentRecord,
    /// Every record as appended: (chain key, record).
    appended: Vec<(String, Stored)>,
}

/// How old each chain's records are, in days, oldest first.
const CONTROL_AGES: [i64; 4] = [500, 450, 3, 1];
const A_AGES: [i64; 6] = [600, 500, 401, 2, 1, 0];
const B_AGES: [i64; 5] = [10, 5, 2, 1, 0];

impl Vault {
    async fn new(postgres: bool) -> Self {
        let (backend, settings) = if postgres {
            let db = TestDb::new().await;
            let settings = DatabaseSettings::new(Database::Postgres(db.url.clone().into()));
            (Backend::Postgres(db), settings)
        } else {
            let dir = tempfile::tempdir().unwrap();
            let settings = DatabaseSettings {
                max_connections: 4,
                ..DatabaseSettings::new(Database::SqliteFile(dir.path().join("vault.db")))
            };
            (Backend::Sqlite(dir), settings)
        };
        let store = vault_server::store::open(&settings).await.unwrap();
        store.schema.migrate().await.unwrap();
        let kcv = vault_server::vault::unlock_root_key(&store, RootKeySource::Key(root_key()))
            .await
            .unwrap()
            .key_check;
        let iss = IssuerId::parse(ISS).unwrap();
        let register = async |id: &str| {
            store
                .keys
                .create_agent(
                    &iss,
                    &AgentId::parse(id).unwrap(),
                    b"wrapped-agent-key",
                    1,
                    &kcv,
                )
                .await
                .unwrap()
        };
        let (a, b) = (register("agent-a").await, register("agent-b").await);
        let now = Utc::now().timestamp_millis();
        let mut appended = Vec::new();
        for (chain, ages) in [
            (Chain::Control, &CONTROL_AGES[..]),
            (Chain::Agent(&a), &A_AGES[..]),
            (Chain::Agent(&b), &B_AGES[..]),
        ] {
            let records = ages
                .iter()
                .enumerate()
                // A minute apart within a day, so records of one day keep their order.
                .map(|(i, days)| record(i as u64 + 1, now - days * DAY_MS + i as i64 * 60_000))
                .collect();
            for stored in store.audit.append(chain, records).await.unwrap() {
                appended.push((chain.key().to_string(), stored));
            }
        }
        assert_eq!(
            sign_heads(&store, &head_key(&store).await).await.unwrap(),
            3
        );
        Self {
            backend,
            store,
            a,
            b,
            appended,
        }
    }

    fn database_url(&self) -> String {
        match &self.backend {
            Backend::Postgres(db) => db.url.clone(),
            Backend::Sqlite(dir) => format!("sqlite://{}", self.sqlite_path(dir).display()),
        }
    }

    fn sqlite_path(&self, dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("vault.db")
    }

    /// Runs `vault-server audit ARGS` on this vault, with pipes for stdout and stderr; returns
    /// (exit code, stdout, stderr).
    fn audit(&self, args: &[&str]) -> (i32, String, String) {
        let output = Command::new(binary())
            .arg("audit")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("VAULT_DATABASE_URL", self.database_url())
            .env("VAULT_ROOT_KEY", ROOT_KEY)
            .output()
            .unwrap();
        (
            output.status.code().expect("exited, not killed"),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Runs `sql` on a chain's rows as an intruder with SQL access would: `{log}` is its log
    /// table, `{head}` its head table, `{mine}` a condition selecting its rows, and
    /// `{chain_col}` the column naming the chain where chains share a table (with a trailing
    /// comma; empty where they do not).
    async fn tamper(&self, agent: Option<&AgentRecord>, sql: &str) {
        match &self.backend {
            Backend::Postgres(db) => {
                let schema = agent.map_or_else(|| "vault".to_string(), |a| a.namespace.clone());
                let sql = sql
                    .replace("{log}", &format!("\"{schema}\".audit_log"))
                    .replace("{head}", &format!("\"{schema}\".audit_head"))
                    .replace("{mine}", "true")
                    .replace("{chain_col}", "");
                let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
                sqlx::raw_sql(&sql).execute(&mut conn).await.unwrap();
            }
            Backend::Sqlite(dir) => {
                let chain = agent.map_or("control", |a| a.namespace.as_str());
                let sql = sql
                    .replace("{log}", "audit_log")
                    .replace("{head}", "audit_heads")
                    .replace("{mine}", &format!("chain = '{chain}'"))
                    .replace("{chain_col}", "chain, ");
                let url = format!("sqlite://{}", self.sqlite_path(dir).display());
                let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
                sqlx::raw_sql(&sql).execute(&mut conn).await.unwrap();
            }
        }
    }

    /// `bytes` as a literal of the backend's binary type.
    fn blob(&self, bytes: &[u8]) -> String {
        match &self.backend {
            Backend::Postgres(_) => format!("'\\x{}'::bytea", hex::encode(bytes)),
            Backend::Sqlite(_) => format!("X'{}'", hex::encode(bytes)),
        }
    }

    fn stored(&self, chain: &str, sequence: u64) -> &Stored {
        &self
            .appended
            .iter()
            .find(|(c, s)| c == chain && s.record.sequence == sequence)
            .unwrap()
            .1
    }
}

const A_LABEL: &str = "chain agent agent-a (issuer https://issuer.test)";

/// Asserts that `verify` exits 1 with one broken chain, naming `chain` and `problem`.
fn assert_broken(vault: &Vault, what: &str, chain: &str, problem: &str) {
    let (code, stdout, stderr) = vault.audit(&["verify"]);
    assert_eq!(code, 1, "{what}: {stdout}{stderr}");
    let broken: Vec<_> = stdout
        .lines()
        .filter(|l| l.starts_with("broken: "))
        .collect();
    assert_eq!(broken.len(), 1, "{what}: {stdout}");
    assert!(
        broken[0].starts_with(&format!("broken: {chain}: {problem}")),
        "{what}: {stdout}"
    );
    assert!(
        stdout.contains("checked 3 chain(s)") && stdout.contains("1 broken"),
        "{what}: {stdout}"
    );
    assert!(
        stderr.contains("1 audit chain(s) broken"),
        "{what}: {stderr}"
    );
}

async fn verify_passes_then_names_each_kind_of_tampering(postgres: bool) {
    let vault = Vault::new(postgres).await;
    let (code, stdout, stderr) = vault.audit(&["verify"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(
        stdout.trim(),
        "checked 3 chain(s), 15 record(s): all intact",
        "{stderr}"
    );
    let (code, stdout, _) = vault.audit(&["verify", "--agent", "agent-b"]);
    assert_eq!(
        (code, stdout.trim()),
        (0, "checked 1 chain(s), 5 record(s): all intact")
    );

    // Each on a fresh vault.
    let vault = Vault::new(postgres).await;
    vault
        .tamper(
            Some(&vault.a),
            "UPDATE {log} SET outcome = 'PERMISSION_DENIED' WHERE {mine} AND sequence = 3",
        )
        .await;
    assert_broken(
        &vault,
        "an edit",
        A_LABEL,
        "record 3: its hash does not match",
    );
    // Verifying only another agent does not look at the broken chain.
    let (code, _, _) = vault.audit(&["verify", "--agent", "agent-b", "--issuer", ISS]);
    assert_eq!(code, 0);
    let (code, stdout, _) = vault.audit(&["verify", "--agent", "agent-a"]);
    assert_eq!(code, 1, "{stdout}");

    let vault = Vault::new(postgres).await;
    vault
        .tamper(
            None,
            "UPDATE {log} SET action = 'shutdown' WHERE {mine} AND sequence = 2",
        )
        .await;
    assert_broken(
        &vault,
        "an edit of the control chain",
        "chain control",
        "record 2: its hash does not match",
    );

    let vault = Vault::new(postgres).await;
    vault
        .tamper(
            Some(&vault.a),
            "DELETE FROM {log} WHERE {mine} AND sequence = 3",
        )
        .await;
    assert_broken(
        &vault,
        "a deletion",
        A_LABEL,
        "record 4: expected sequence 3",
    );

    // Cutting the tail leaves a chain that links up; the signed head gives it away.
    let vault = Vault::new(postgres).await;
    vault
        .tamper(
            Some(&vault.a),
            "DELETE FROM {log} WHERE {mine} AND sequence > 4",
        )
        .await;
    assert_broken(
        &vault,
        "a truncation",
        A_LABEL,
        "record 6: the signed head names it, but the log ends before it",
    );

    let vault = Vault::new(postgres).await;
    vault
        .tamper(
            Some(&vault.a),
            "UPDATE {log} SET sequence = -1 WHERE {mine} AND sequence = 2;
             UPDATE {log} SET sequence = 2 WHERE {mine} AND sequence = 3;
             UPDATE {log} SET sequence = 3 WHERE {mine} AND sequence = -1;",
        )
        .await;
    assert_broken(
        &vault,
        "a reordering",
        A_LABEL,
        "record 2: its hash does not match",
    );

    // The intruder knows the hash function: the forged record links to the one before it and
    // the records after it are renumbered. The first renumbered one gives it away.
    let vault = Vault::new(postgres).await;
    let before = vault.stored(&vault.a.namespace, 3);
    let mut forged = before.record.clone();
    forged.sequence = 4;
    forged.action = "RevokeToken".into();
    let forged_hash = link(&before.hash, &forged);
    vault
        .tamper(
            Some(&vault.a),
            &format!(
                "UPDATE {{log}} SET sequence = -sequence WHERE {{mine}} AND sequence > 3;
                 UPDATE {{log}} SET sequence = 1 - sequence WHERE {{mine}} AND sequence < 0;
                 INSERT INTO {{log}} ({{chain_col}}sequence, at, action, agent, user_id, tool,
                     outcome, generation, caller_iss, caller_jti, caller_digest, verified, peer,
                     trace_id, target, hash)
                 SELECT {{chain_col}}4, at, 'RevokeToken', agent, user_id, tool, outcome,
                     generation, caller_iss, caller_jti, caller_digest, verified, peer,
                     trace_id, target, {}
                 FROM {{log}} WHERE {{mine}} AND sequence = 3;",
                vault.blob(&forged_hash)
            ),
        )
        .await;
    assert_broken(
        &vault,
        "an insertion",
        A_LABEL,
        "record 5: its hash does not match",
    );

    // A head re-signed by someone without the root key.
    let vault = Vault::new(postgres).await;
    vault
        .tamper(
            Some(&vault.b),
            &format!(
                "UPDATE {{head}} SET signed_mac = {} WHERE {{mine}}",
                vault.blob(&[0; 32])
            ),
        )
        .await;
    let (code, stdout, _) = vault.audit(&["verify"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(
            "broken: chain agent agent-b (issuer https://issuer.test): the signed head of chain"
        ) && stdout.contains("does not verify under this root key"),
        "{stdout}"
    );
}

async fn export_prints_the_records_since_a_time_as_json_lines(postgres: bool) {
    let vault = Vault::new(postgres).await;
    let since = Utc::now() - chrono::Duration::days(4);
    let since_text = since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let (code, stdout, stderr) = vault.audit(&["export", "--since", &since_text]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !stderr.contains("chains") && !stderr.contains('\r'),
        "no progress bar when piped: {stderr:?}"
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let expected: Vec<_> = vault
        .appended
        .iter()
        .filter(|(_, s)| s.record.at_ms >= since.timestamp_millis())
        .collect();
    // Control 3 and 4, agent-a 4 to 6, agent-b 3 to 5.
    assert_eq!(lines.len(), 8, "{stdout}");
    let key = |chain: &str, sequence: u64| (chain.to_string(), sequence);
    let mut got: Vec<_> = lines
        .iter()
        .map(|l| {
            key(
                l["chain"].as_str().unwrap(),
                l["sequence"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut want: Vec<_> = expected
        .iter()
        .map(|(c, s)| key(c, s.record.sequence))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    for line in &lines {
        let chain = line["chain"].as_str().unwrap();
        let stored = vault.stored(chain, line["sequence"].as_u64().unwrap());
        let r = &stored.record;
        let at = DateTime::parse_from_rfc3339(line["at"].as_str().unwrap()).unwrap();
        assert_eq!(at.timestamp_millis(), r.at_ms);
        assert_eq!(line["action"], r.action.as_str());
        assert_eq!(line["user"], r.user.as_deref().unwrap());
        assert_eq!(line["outcome"], "OK");
        assert_eq!(line["generation"], r.generation.unwrap());
        assert_eq!(line["caller_iss"], ISS);
        assert_eq!(line["caller_digest"], hex::encode(r.caller_digest.unwrap()));
        assert_eq!(line["verified"], true);
        assert_eq!(line["trace_id"], serde_json::Value::Null);
        assert_eq!(line["hash"], hex::encode(stored.hash));
        assert_eq!(line.as_object().unwrap().len(), 17);
    }

    // One agent, and a span back from now: agent-b's records of the last 36 hours.
    let (code, stdout, stderr) = vault.audit(&["export", "--since", "36h", "--agent", "agent-b"]);
    assert_eq!(code, 0, "{stderr}");
    let sequences: Vec<u64> = stdout
        .lines()
        .map(|line| {
            let line: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(line["chain"], vault.b.namespace.as_str());
            line["sequence"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(sequences, [4, 5]);

    let (code, _, stderr) = vault.audit(&["export", "--since", "yesterday"]);
    assert!(code != 0 && stderr.contains("--since"), "{stderr}");
    let (code, _, stderr) = vault.audit(&["export", "--since", "1d", "--agent", "nobody"]);
    assert!(
        code != 0 && stderr.contains("no registered agent"),
        "{stderr}"
    );
}

async fn retention_deletes_old_records_and_the_chains_still_verify(postgres: bool) {
    let vault = Vault::new(postgres).await;
    let deleted = retain(
        &vault.store,
        Duration::from_secs(400 * 86_400),
        2,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    // Control 500 and 450 days old, agent-a 600, 500 and 401; agent-b nothing.
    assert_eq!(deleted, 5);
    for (chain, first_kept, anchor) in [
        (Chain::Control, 3, 2),
        (Chain::Agent(&vault.a), 4, 3),
        (Chain::Agent(&vault.b), 1, 0),
    ] {
        let kept = vault.store.audit.records(chain, 0, 100).await.unwrap();
        assert_eq!(kept[0].record.sequence, first_kept);
        assert_eq!(
            vault.store.audit.anchor(chain).await.unwrap().sequence,
            anchor
        );
    }
    let (code, stdout, stderr) = vault.audit(&["verify"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(
        stdout.trim(),
        "checked 3 chain(s), 10 record(s): all intact"
    );
    // Nothing more is that old.
    assert_eq!(
        retain(
            &vault.store,
            Duration::from_secs(400 * 86_400),
            2,
            &CancellationToken::new()
        )
        .await
        .unwrap(),
        0
    );
}

async fn a_signing_pass_signs_exactly_the_chains_that_advanced(postgres: bool) {
    let vault = Vault::new(postgres).await;
    let key = head_key(&vault.store).await;
    let kcv = vault
        .store
        .keys
        .root_key()
        .await
        .unwrap()
        .unwrap()
        .key_check;
    // A registered agent that never recorded anything has no head to sign.
    let idle = vault
        .store
        .keys
        .create_agent(
            &IssuerId::parse(ISS).unwrap(),
            &AgentId::parse("agent-idle").unwrap(),
            b"wrapped-agent-key",
            1,
            &kcv,
        )
        .await
        .unwrap();
    assert_eq!(sign_heads(&vault.store, &key).await.unwrap(), 0);
    let a_head = vault
        .store
        .audit
        .signed_head(Chain::Agent(&vault.a))
        .await
        .unwrap();

    let now = Utc::now().timestamp_millis();
    vault
        .store
        .audit
        .append(Chain::Agent(&vault.b), vec![record(6, now), record(7, now)])
        .await
        .unwrap();
    assert_eq!(sign_heads(&vault.store, &key).await.unwrap(), 1);
    let b_head = vault
        .store
        .audit
        .signed_head(Chain::Agent(&vault.b))
        .await
        .unwrap()
        .unwrap();
    let b_end = vault
        .store
        .audit
        .head(Chain::Agent(&vault.b))
        .await
        .unwrap();
    assert_eq!((b_head.sequence, b_head.hash), (7, b_end.hash));
    assert_eq!(b_head.chain, vault.b.namespace);
    assert!(key.verifies(&b_head));
    assert_eq!(
        vault
            .store
            .audit
            .signed_head(Chain::Agent(&vault.a))
            .await
            .unwrap(),
        a_head,
        "a chain that did not move keeps its head"
    );
    assert_eq!(
        vault
            .store
            .audit
            .signed_head(Chain::Agent(&idle))
            .await
            .unwrap(),
        None
    );

    vault
        .store
        .audit
        .append(Chain::Control, vec![record(5, now)])
        .await
        .unwrap();
    vault
        .store
        .audit
        .append(Chain::Agent(&vault.a), vec![record(7, now)])
        .await
        .unwrap();
    assert_eq!(sign_heads(&vault.store, &key).await.unwrap(), 2);
    assert_eq!(sign_heads(&vault.store, &key).await.unwrap(), 0);
    let (code, stdout, _) = vault.audit(&["verify"]);
    assert_eq!(code, 0, "{stdout}");
}

macro_rules! on_both {
    ($($case:ident),* $(,)?) => {
        mod on_postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(true).await;
                }
            )*
        }
        mod on_sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(false).await;
                }
            )*
        }
    };
}

on_both!(
    verify_passes_then_names_each_kind_of_tampering,
    export_prints_the_records_since_a_time_as_json_lines,
    retention_deletes_old_records_and_the_chains_still_verify,
    a_signing_pass_signs_exactly_the_chains_that_advanced,
);
