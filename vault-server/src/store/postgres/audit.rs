//! The audit chains: `vault.audit_log` and `vault.audit_head` for the control plane, and
//! `audit_log` and `audit_head` in each agent's schema for that agent's, reached under the
//! agent's role like its credentials. The head table has one row, locked by every append.

use chrono::{DateTime, Utc};

use super::{PgStore, e, quoted};
use crate::audit::{Anchor, AuditRecord, SignedHead, Stored};
use crate::store::audit::{chained, db_int};
use crate::store::rows::{
    AUDIT_VALUE_COLUMNS, AnchorRow, AuditRow, CredentialRow, LastRow, SignedHeadRow, all,
};
use crate::store::{
    AuditStore, Chain, CredentialKey, CredentialStore as _, Release, StoreError, StoredCredential,
};

type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

/// A chain's tables, quoted for SQL: its log and its head.
struct Tables {
    log: String,
    head: String,
}

fn time_of(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| StoreError::Corrupt(format!("audit time out of range: {ms} ms")))
}

impl PgStore {
    /// A transaction on `chain`'s tables: an agent's under its role, the control plane's under
    /// the login role (the serving group's rights).
    async fn audit_tx(&self, chain: Chain<'_>) -> Result<(Tx, Tables), StoreError> {
        let tx = match chain {
            Chain::Control => self.pool.begin().await.map_err(e)?,
            Chain::Agent(agent) => self.agent_tx(&agent.namespace).await?,
        };
        Ok((tx, Self::chain_tables(chain)?))
    }
}

impl PgStore {
    fn chain_tables(chain: Chain<'_>) -> Result<Tables, StoreError> {
        match chain {
            Chain::Control => Ok(Tables {
                log: "vault.audit_log".into(),
                head: "vault.audit_head".into(),
            }),
            Chain::Agent(agent) => agent_tables(&agent.namespace),
        }
    }

    /// `columns` of `chain`'s one head row: one statement, outside any transaction.
    async fn head_row<R>(&self, chain: Chain<'_>, columns: &str) -> Result<R, StoreError>
    where
        R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        let tables = Self::chain_tables(chain)?;
        let sql = format!("SELECT {columns} FROM {}", tables.head);
        // Under the login role, whose serving group may read every chain's head.
        let row = self
            .reads
            .fetch_optional(None, sqlx::query(&sql))
            .await
            .map_err(e)?
            .ok_or_else(|| StoreError::Corrupt(format!("{} has no row", tables.head)))?;
        R::from_row(&row).map_err(e)
    }

    /// Appends `records` to `chain` on their own: compare-and-set statements outside any
    /// transaction (each one round trip and one commit), from the remembered head, then from
    /// the head each failed try found; if the chain is that contended, a transaction that
    /// queues on the head's lock. Under the login role, whose serving group may append to every
    /// chain (control migration 0008), so no statement waits for a role switch.
    async fn append_alone(
        &self,
        chain: Chain<'_>,
        records: Vec<AuditRecord>,
    ) -> Result<Vec<Stored>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let key = chain.key();
        let tables = Self::chain_tables(chain)?;
        let sql = cas_sql(&tables);
        let mut head = match self.heads.get(key) {
            Some(head) => head,
            None => self.head(chain).await?,
        };
        for _ in 0..CAS_ATTEMPTS {
            let stored = chained(head, records.clone());
            let row = self
                .reads
                .fetch_optional(None, cas_query(&sql, head, &stored)?)
                .await
                .map_err(e)?;
            match cas_outcome(row, &tables.head)? {
                Cas::Appended => {
                    self.heads.set(key, end_of(&stored, head));
                    self.wake_watchers(key, &stored);
                    return Ok(stored);
                }
                // The statement's snapshot still showed the expected head: it moved while the
                // statement waited for its lock. A new statement sees where it went.
                Cas::Stale(found) if found == head => head = self.head(chain).await?,
                Cas::Stale(found) => head = found,
            }
        }
        let mut tx = self.pool.begin().await.map_err(e)?;
        let stored = append_to(&mut tx, &tables, key, records, &self.heads).await?;
        self.commit_appended(tx, key, &stored).await?;
        Ok(stored)
    }

    /// Commits `tx`, in which `appended` went to the chain keyed `key`, then has other
    /// replicas' watchers of that chain woken if they have an event to read (sent off the
    /// commit: [`super::wakeups`]).
    pub(super) async fn commit_appended(
        &self,
        tx: Tx,
        key: &str,
        appended: &[Stored],
    ) -> Result<(), StoreError> {
        tx.commit().await.map_err(e)?;
        self.wake_watchers(key, appended);
        Ok(())
    }

    /// Has other replicas' watchers of the chain keyed `key` woken, if `appended` holds an
    /// event they stream: releases, reads and refusals, the bulk of the log, wake no one.
    fn wake_watchers(&self, key: &str, appended: &[Stored]) {
        if appended
            .iter()
            .any(|stored| crate::audit::event_kind(&stored.record).is_some())
        {
            self.peers.wake(key);
        }
    }
}

/// Where this process last saw each chain end: a guess that lets an append compute its hashes
/// without first reading the head. Every append checks the guess against the stored head in
/// the statement that moves it (compare-and-set), so a stale guess costs a retry, never a
/// broken chain; another replica's appends simply make it stale.
///
/// Bounded, and a full one forgets its older half, not everything: it keeps two generations,
/// the chains set or read since the last turnover and those of the one before, and when the
/// young one holds half the bound it becomes the old one and the old one is dropped. A chain in
/// use stays (a hit in the old generation moves it to the young one): every chain used within
/// the last half-bound of distinct chains is remembered. It used to forget everything at once
/// when full, and a vault with more agents than the bound then missed on nearly every call: a
/// GetToken that misses reads without recording, and its record is appended by the group commit
/// after a read of the head.
#[derive(Debug)]
pub(super) struct Heads {
    chains: std::sync::Mutex<Generations>,
    /// Chains per generation.
    half: usize,
}

#[derive(Debug, Default)]
struct Generations {
    young: std::collections::HashMap<String, Anchor>,
    old: std::collections::HashMap<String, Anchor>,
}

/// Most chains [`Heads`] remembers, the two generations together: at about 150 bytes a chain
/// (a table slot, and the 46-byte name's own allocation), some 30 MB at most, reached only with
/// that many agents in use.
const REMEMBERED_HEADS: usize = 200_000;

impl Default for Heads {
    fn default() -> Self {
        Self::with_capacity(REMEMBERED_HEADS)
    }
}

impl Heads {
    fn with_capacity(capacity: usize) -> Self {
        Self {
            chains: std::sync::Mutex::default(),
            half: (capacity / 2).max(1),
        }
    }

    fn chains(&self) -> std::sync::MutexGuard<'_, Generations> {
        // Only single inserts, moves and reads happen under the lock (a retired generation is
        // dropped after it is released).
        self.chains
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, key: &str) -> Option<Anchor> {
        let (head, retired) = {
            let mut chains = self.chains();
            if let Some(head) = chains.young.get(key) {
                return Some(*head);
            }
            let head = chains.old.remove(key)?;
            (head, chains.keep(key.to_string(), head, self.half))
        };
        drop(retired);
        Some(head)
    }

    fn forget(&self, key: &str) {
        let mut chains = self.chains();
        chains.young.remove(key);
        chains.old.remove(key);
    }

    pub(super) fn set(&self, key: &str, head: Anchor) {
        let retired = {
            let mut chains = self.chains();
            chains.old.remove(key);
            chains.keep(key.to_string(), head, self.half)
        };
        // Freed here, once the lock is released: up to half the bound of names.
        drop(retired);
    }
}

impl Generations {
    /// Puts `key` in the young generation, turning it over once it holds `half` chains; answers
    /// the generation a turnover retired, for the caller to drop once it released the lock. The
    /// new young generation starts at its full size, so it never grows by rehashing under the
    /// lock.
    #[must_use]
    fn keep(
        &mut self,
        key: String,
        head: Anchor,
        half: usize,
    ) -> Option<std::collections::HashMap<String, Anchor>> {
        self.young.insert(key, head);
        if self.young.len() < half {
            return None;
        }
        let young = std::mem::replace(
            &mut self.young,
            std::collections::HashMap::with_capacity(half),
        );
        Some(std::mem::replace(&mut self.old, young))
    }
}

/// Compare-and-set appends tried before queueing on the head's lock.
const CAS_ATTEMPTS: usize = 3;

/// What a compare-and-set append found.
enum Cas {
    /// The head was where expected; the records are in.
    Appended,
    /// The head was elsewhere; nothing was written. This is the head in the statement's
    /// snapshot, which can still be the expected one if the head moved while the statement
    /// waited for its lock.
    Stale(Anchor),
}

/// One statement that appends records to a chain if its head is still where the writer
/// expected: it moves the head row (which also locks it until the transaction ends), inserts
/// the records only if the head moved. It returns whether the head moved, and the head in the
/// statement's snapshot. (Other replicas are woken after the commit, not by a `NOTIFY` in
/// it: [`super::wakeups`].) One round trip, where a read of the head under lock and
/// separate statements would take five.
fn cas_sql(tables: &Tables) -> String {
    format!(
        "WITH moved AS (
             UPDATE {head} SET last_sequence = $3, last_hash = $4
             WHERE last_sequence = $1 AND last_hash = $2
             RETURNING 1
         ), added AS (
             INSERT INTO {log} (sequence, at, {AUDIT_VALUE_COLUMNS})
             SELECT * FROM unnest($5::int8[], $6::timestamptz[], $7::text[], $8::text[],
                 $9::text[], $10::text[], $11::text[], $12::int8[], $13::text[], $14::text[],
                 $15::bytea[], $16::bool[], $17::text[], $18::text[], $19::text[], $20::bytea[])
             WHERE EXISTS (SELECT 1 FROM moved)
         )
         SELECT (SELECT count(*) FROM moved) AS moved, last_sequence, last_hash FROM {head}",
        head = tables.head,
        log = tables.log,
    )
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// [`cas_sql`] bound for appending `stored` (chained from `expected`) to the chain `key`.
fn cas_query<'q>(
    sql: &'q str,
    expected: Anchor,
    stored: &[Stored],
) -> Result<PgQuery<'q>, StoreError> {
    let end = stored.last().ok_or_else(|| {
        StoreError::Corrupt("an audit append without records reached the database".into())
    })?;
    let n = stored.len();
    let mut sequence = Vec::with_capacity(n);
    let mut at = Vec::with_capacity(n);
    let mut action = Vec::with_capacity(n);
    let mut agent = Vec::with_capacity(n);
    let mut user = Vec::with_capacity(n);
    let mut tool = Vec::with_capacity(n);
    let mut outcome = Vec::with_capacity(n);
    let mut generation = Vec::with_capacity(n);
    let mut iss = Vec::with_capacity(n);
    let mut jti = Vec::with_capacity(n);
    let mut digest = Vec::with_capacity(n);
    let mut verified = Vec::with_capacity(n);
    let mut peer = Vec::with_capacity(n);
    let mut trace = Vec::with_capacity(n);
    let mut target = Vec::with_capacity(n);
    let mut hash = Vec::with_capacity(n);
    for Stored { record, hash: h } in stored {
        sequence.push(db_int(record.sequence, "audit sequence")?);
        at.push(time_of(record.at_ms)?);
        action.push(record.action.clone());
        agent.push(record.agent.clone());
        user.push(record.user.clone());
        tool.push(record.tool.clone());
        outcome.push(record.outcome.as_str().to_string());
        generation.push(
            record
                .generation
                .map(|g| db_int(g, "audit generation"))
                .transpose()?,
        );
        iss.push(record.caller_iss.clone());
        jti.push(record.caller_jti.clone());
        digest.push(record.caller_digest.map(|d| d.to_vec()));
        verified.push(record.verified);
        peer.push(record.peer.clone());
        trace.push(record.trace_id.clone());
        target.push(record.target.clone());
        hash.push(h.to_vec());
    }
    Ok(sqlx::query(sql)
        .bind(db_int(expected.sequence, "audit sequence")?)
        .bind(expected.hash.to_vec())
        .bind(db_int(end.record.sequence, "audit sequence")?)
        .bind(end.hash.to_vec())
        .bind(sequence)
        .bind(at)
        .bind(action)
        .bind(agent)
        .bind(user)
        .bind(tool)
        .bind(outcome)
        .bind(generation)
        .bind(iss)
        .bind(jti)
        .bind(digest)
        .bind(verified)
        .bind(peer)
        .bind(trace)
        .bind(target)
        .bind(hash))
}

/// Reads [`cas_sql`]'s answer.
fn cas_outcome(row: Option<sqlx::postgres::PgRow>, head: &str) -> Result<Cas, StoreError> {
    use sqlx::Row as _;
    let row = row.ok_or_else(|| StoreError::Corrupt(format!("{head} has no row")))?;
    let moved: i64 = row.try_get("moved").map_err(e)?;
    if moved == 1 {
        return Ok(Cas::Appended);
    }
    let found = LastRow {
        last_sequence: row.try_get("last_sequence").map_err(e)?,
        last_hash: row.try_get("last_hash").map_err(e)?,
    };
    Ok(Cas::Stale(found.try_into()?))
}

fn end_of(stored: &[Stored], otherwise: Anchor) -> Anchor {
    stored.last().map_or(otherwise, |end| Anchor {
        sequence: end.record.sequence,
        hash: end.hash,
    })
}

/// Locks the chain's head row until the transaction ends; returns where the chain ends.
async fn lock_head(tx: &mut Tx, head: &str) -> Result<Anchor, StoreError> {
    let row: Option<LastRow> = sqlx::query_as(&format!(
        "SELECT last_sequence, last_hash FROM {head} FOR UPDATE"
    ))
    .fetch_optional(&mut **tx)
    .await
    .map_err(e)?;
    row.ok_or_else(|| StoreError::Corrupt(format!("{head} has no row")))?
        .try_into()
}

/// Appends `records` to the chain whose tables are `tables` (keyed `key`) inside `tx`, which
/// then holds the head row's lock until it ends: appends to one chain queue on it across tasks
/// and replicas, so sequences have no gaps. Commit `tx` with [`PgStore::commit_appended`], which
/// wakes other replicas' watchers once the records are in. Credential writes call it after
/// their own statements, so the record and the write commit or roll back together. The first
/// try uses the remembered head; if the head moved, the second locks it first and cannot miss.
async fn append_to(
    tx: &mut Tx,
    tables: &Tables,
    key: &str,
    records: Vec<AuditRecord>,
    heads: &Heads,
) -> Result<Vec<Stored>, StoreError> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let sql = cas_sql(tables);
    if let Some(guess) = heads.get(key) {
        let stored = chained(guess, records.clone());
        let row = cas_query(&sql, guess, &stored)?
            .fetch_optional(&mut **tx)
            .await
            .map_err(e)?;
        if let Cas::Appended = cas_outcome(row, &tables.head)? {
            heads.set(key, end_of(&stored, guess));
            return Ok(stored);
        }
    }
    let last = lock_head(tx, &tables.head).await?;
    let stored = chained(last, records);
    let row = cas_query(&sql, last, &stored)?
        .fetch_optional(&mut **tx)
        .await
        .map_err(e)?;
    match cas_outcome(row, &tables.head)? {
        Cas::Appended => {
            heads.set(key, end_of(&stored, last));
            Ok(stored)
        }
        Cas::Stale(_) => Err(StoreError::Corrupt(format!(
            "{} moved while this transaction held its lock",
            tables.head
        ))),
    }
}

/// [`crate::store::CredentialStore::load_releasing`]: one statement, under the agent's role,
/// outside any transaction, that reads the credential and, if it is releasable, computes the
/// release record's hash from the remembered head, the record's encoding around its generation
/// and the generation read (`sha256` in SQL, checked against [`crate::audit::link`] here), moves
/// the head if it is still there, inserts the record and queues the wake-up.
pub(super) async fn load_releasing(
    store: &PgStore,
    key: CredentialKey<'_>,
    release: &Release,
) -> Result<(Option<StoredCredential>, Option<u64>), StoreError> {
    let namespace = &key.agent.namespace;
    let Some(head) = store.heads.get(namespace) else {
        // Nothing to chain from without a read of the head; the call records itself.
        return Ok((store.load(key).await?, None));
    };
    let schema = quoted(namespace)?;
    let mut record = release.record.clone();
    record.sequence = head.sequence + 1;
    record.outcome = crate::audit::Outcome::Ok;
    let (before, after) = record.canonical_around_generation();
    let sql = format!(
        "WITH cred AS (
             SELECT generation, state::int8 AS state, key_version::int8 AS key_version,
                    wrapped_data_key, ciphertext,
                    state = 0 AND (access_expires_at IS NULL OR access_expires_at > to_timestamp($3))
                        AS releasable
             FROM {schema}.credentials
             WHERE user_id = $1 AND tool = $2 AND ttl_expires_at > now()
         ), rec AS (
             SELECT generation,
                    sha256($5 || $7 || $8 || int8send(generation) || $9) AS hash
             FROM cred WHERE releasable
         ), moved AS (
             UPDATE {schema}.audit_head SET last_sequence = $4 + 1, last_hash = rec.hash
             FROM rec WHERE last_sequence = $4 AND last_hash = $5
             RETURNING rec.generation, rec.hash
         ), added AS (
             INSERT INTO {schema}.audit_log (sequence, at, {AUDIT_VALUE_COLUMNS})
             SELECT $4 + 1, $6, $10, $11, $12, $13, $14, moved.generation, $15, $16, $17, $18,
                    $19, $20, $21, moved.hash
             FROM moved
         )
         SELECT cred.generation, cred.state, cred.key_version, cred.wrapped_data_key,
                cred.ciphertext, (SELECT hash FROM moved) AS released
         FROM cred"
    );
    // Under the agent's role: the statement reads its credentials.
    let role = if store.agent_roles {
        Some(store.agent_role(namespace)?)
    } else {
        None
    };
    let query = sqlx::query(&sql)
        .bind(key.user.as_str())
        .bind(key.tool.as_str())
        .bind(release.valid_until as f64)
        .bind(db_int(head.sequence, "audit sequence")?)
        .bind(head.hash.to_vec())
        .bind(time_of(record.at_ms)?)
        .bind(before)
        .bind(crate::audit::GENERATION_FIELD.to_vec())
        .bind(after)
        .bind(&record.action)
        .bind(&record.agent)
        .bind(&record.user)
        .bind(&record.tool)
        .bind(record.outcome.as_str())
        .bind(&record.caller_iss)
        .bind(&record.caller_jti)
        .bind(record.caller_digest.map(|d| d.to_vec()))
        .bind(record.verified)
        .bind(&record.peer)
        .bind(&record.trace_id)
        .bind(&record.target);
    let Some(row) = store
        .reads
        .fetch_optional(role.as_deref(), query)
        .await
        .map_err(e)?
    else {
        return Ok((None, None));
    };
    use sqlx::{FromRow as _, Row as _};
    let released: Option<Vec<u8>> = row.try_get("released").map_err(e)?;
    let stored = StoredCredential::try_from(CredentialRow::from_row(&row).map_err(e)?)?;
    let Some(released) = released else {
        // Perhaps the head moved: the next append reads it afresh rather than miss with it.
        store.heads.forget(namespace);
        return Ok((Some(stored), None));
    };
    record.generation = Some(stored.generation.get());
    let hash = crate::audit::link(&head.hash, &record);
    if released[..] != hash[..] {
        // The database hashed another encoding than this process would: the chain now fails
        // `audit verify` at this record. Never expected; loud if it happens.
        return Err(StoreError::Corrupt(format!(
            "the release record {} of chain {namespace} was hashed differently in the database",
            record.sequence
        )));
    }
    store.heads.set(
        namespace,
        Anchor {
            sequence: record.sequence,
            hash,
        },
    );
    // A release is no event a watcher streams: no wake-up.
    Ok((Some(stored), Some(record.sequence)))
}

/// [`append_to`] an agent's chain, in a transaction already under that agent's role.
pub(super) async fn append_agent(
    store: &PgStore,
    tx: &mut Tx,
    namespace: &str,
    records: Vec<AuditRecord>,
) -> Result<Vec<Stored>, StoreError> {
    let tables = agent_tables(namespace)?;
    append_to(tx, &tables, namespace, records, &store.heads).await
}

fn agent_tables(namespace: &str) -> Result<Tables, StoreError> {
    let schema = quoted(namespace)?;
    Ok(Tables {
        log: format!("{schema}.audit_log"),
        head: format!("{schema}.audit_head"),
    })
}

#[async_trait::async_trait]
impl AuditStore for PgStore {
    #[tracing::instrument(skip_all)]
    async fn append(
        &self,
        chain: Chain<'_>,
        records: Vec<AuditRecord>,
    ) -> Result<Vec<Stored>, StoreError> {
        self.append_alone(chain, records).await
    }

    /// Each chain's batch in a statement and a commit of its own, under the login role: a
    /// transaction never spans two agent schemas (docs/scaling.md, rule 2: on Citus each may
    /// live on another node). The chains are appended at once, on every read lane, and
    /// PostgreSQL flushes its log once for the commits that arrive together, so chains still
    /// share flushes. Each statement locks one head, so flushers never wait on each other
    /// in a cycle, and one broken chain fails only its own batch.
    #[tracing::instrument(skip_all)]
    async fn append_batches(
        &self,
        batches: Vec<(Chain<'_>, Vec<AuditRecord>)>,
    ) -> Vec<Result<(), StoreError>> {
        use futures_util::StreamExt as _;
        let at_once = self.reads.lanes() as usize;
        let mut appends = Vec::with_capacity(batches.len());
        for (chain, records) in batches {
            appends.push(self.append_alone(chain, records));
        }
        futures_util::stream::iter(appends)
            .buffered(at_once)
            .map(|appended| appended.map(drop))
            .collect()
            .await
    }

    #[tracing::instrument(skip_all)]
    async fn records(
        &self,
        chain: Chain<'_>,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Stored>, StoreError> {
        let (mut tx, tables) = self.audit_tx(chain).await?;
        // Times are stored to the millisecond, so this reads them back exactly.
        let rows: Vec<AuditRow> = sqlx::query_as(&format!(
            "SELECT sequence, floor(extract(epoch FROM at) * 1000)::int8 AS at_ms,
                 {AUDIT_VALUE_COLUMNS}
             FROM {} WHERE sequence > $1 ORDER BY sequence LIMIT $2",
            tables.log
        ))
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        all(rows)
    }

    #[tracing::instrument(skip_all)]
    async fn head(&self, chain: Chain<'_>) -> Result<Anchor, StoreError> {
        self.head_row::<LastRow>(chain, "last_sequence, last_hash")
            .await?
            .try_into()
    }

    #[tracing::instrument(skip_all)]
    async fn anchor(&self, chain: Chain<'_>) -> Result<Anchor, StoreError> {
        self.head_row::<AnchorRow>(chain, "anchor_sequence, anchor_hash")
            .await?
            .try_into()
    }

    /// Through vault.audit_trim (control migration 0008): the vault's own roles may not delete
    /// a record or move an anchor, and the function deletes nothing younger than the retention
    /// `migrate` set, whatever `before_ms` says.
    #[tracing::instrument(skip_all)]
    async fn delete_before(
        &self,
        chain: Chain<'_>,
        before_ms: i64,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let deleted: i64 = sqlx::query_scalar("SELECT vault.audit_trim($1, $2, $3)")
            .bind(chain.key())
            .bind(
                DateTime::from_timestamp_millis(before_ms).unwrap_or(if before_ms < 0 {
                    DateTime::<Utc>::MIN_UTC
                } else {
                    DateTime::<Utc>::MAX_UTC
                }),
            )
            .bind(i32::try_from(limit).unwrap_or(i32::MAX))
            .fetch_one(&self.pool)
            .await
            .map_err(e)?;
        Ok(u64::try_from(deleted).unwrap_or(0))
    }

    #[tracing::instrument(skip_all)]
    async fn save_head(&self, chain: Chain<'_>, head: &SignedHead) -> Result<(), StoreError> {
        let (mut tx, tables) = self.audit_tx(chain).await?;
        sqlx::query(&format!(
            "UPDATE {} SET signed_chain = $1, signed_sequence = $2, signed_hash = $3,
                 signed_mac = $4
             WHERE signed_sequence IS NULL OR signed_sequence <= $2",
            tables.head
        ))
        .bind(&head.chain)
        .bind(db_int(head.sequence, "signed head")?)
        .bind(&head.hash[..])
        .bind(&head.mac)
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    async fn signed_head(&self, chain: Chain<'_>) -> Result<Option<SignedHead>, StoreError> {
        // One statement under the login role, like the head itself: the signing pass reads
        // both for every chain each interval.
        Option::<SignedHead>::try_from(
            self.head_row::<SignedHeadRow>(
                chain,
                "signed_chain, signed_sequence, signed_hash, signed_mac",
            )
            .await?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{Anchor, Heads};

    fn anchor(sequence: u64) -> Anchor {
        Anchor {
            sequence,
            hash: [0; 32],
        }
    }

    #[test]
    fn a_full_heads_cache_forgets_the_oldest_chains_not_all_of_them() {
        let heads = Heads::with_capacity(6);
        for n in 0..7 {
            heads.set(&format!("chain-{n}"), anchor(n));
        }
        // The old generation holds chains 3 to 5, the young one 6: the last ones set. (Reading
        // 6, 5 and 4 moves them to the young generation and turns it over, dropping 3.)
        {
            let chains = heads.chains();
            assert_eq!(chains.young.len() + chains.old.len(), 4);
        }
        for n in (4..7).rev() {
            assert_eq!(
                heads.get(&format!("chain-{n}")).map(|a| a.sequence),
                Some(n),
                "chain-{n}"
            );
        }
        assert!(heads.get("chain-0").is_none(), "the oldest is forgotten");
    }

    #[test]
    fn a_chain_read_often_stays_while_others_come_and_go() {
        let heads = Heads::with_capacity(4);
        heads.set("hot", anchor(7));
        for n in 0..50 {
            heads.set(&format!("cold-{n}"), anchor(n));
            assert_eq!(heads.get("hot").map(|a| a.sequence), Some(7), "after {n}");
        }
        let chains = heads.chains();
        assert!(chains.young.len() + chains.old.len() <= 4, "bounded");
    }

    #[test]
    fn a_forgotten_head_is_gone_from_both_generations() {
        let heads = Heads::with_capacity(4);
        heads.set("a", anchor(1));
        heads.set("b", anchor(2));
        heads.set("c", anchor(3));
        heads.forget("a");
        heads.forget("c");
        assert!(heads.get("a").is_none() && heads.get("c").is_none());
        assert_eq!(heads.get("b").map(|a| a.sequence), Some(2));
    }
}
