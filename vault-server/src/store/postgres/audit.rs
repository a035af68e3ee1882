//! The audit chains: `vault.audit_log` and `vault.audit_head` for the control plane, and
//! `audit_log` and `audit_head` in each agent's schema for that agent's, reached under the
//! agent's role like its credentials. The head table has one row, locked by every append.

use chrono::{DateTime, Utc};

use sqlx::Executor as _;

use super::{PgStore, e, quoted};
use crate::audit::{Anchor, AuditRecord, SignedHead, Stored};
use crate::store::audit::{chained, db_int};
use crate::store::rows::{AUDIT_VALUE_COLUMNS, AnchorRow, AuditRow, LastRow, SignedHeadRow, all};
use crate::store::{AuditStore, Chain, StoreError};

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
        match chain {
            Chain::Control => Ok((
                self.pool.begin().await.map_err(e)?,
                Tables {
                    log: "vault.audit_log".into(),
                    head: "vault.audit_head".into(),
                },
            )),
            Chain::Agent(agent) => Ok((
                self.agent_tx(&agent.namespace).await?,
                agent_tables(&agent.namespace)?,
            )),
        }
    }
}

impl PgStore {
    /// `columns` of `chain`'s one head row.
    async fn head_row<R>(&self, chain: Chain<'_>, columns: &str) -> Result<R, StoreError>
    where
        R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        let (mut tx, tables) = self.audit_tx(chain).await?;
        let row: Option<R> = sqlx::query_as(&format!("SELECT {columns} FROM {}", tables.head))
            .fetch_optional(&mut *tx)
            .await
            .map_err(e)?;
        tx.commit().await.map_err(e)?;
        row.ok_or_else(|| StoreError::Corrupt(format!("{} has no row", tables.head)))
    }
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

/// Appends `records` to the chain whose tables are `tables` (keyed `key`) inside `tx`: under
/// the head row's lock, which serialises appends to the chain across tasks and replicas (the
/// next append reads the head this one writes, so sequences have no gaps), with a
/// `vault_audit` notification that PostgreSQL delivers to listening replicas only if `tx`
/// commits. Credential writes call it after their own statements, so the record and the write
/// commit or roll back together.
async fn append_to(
    tx: &mut Tx,
    tables: &Tables,
    key: &str,
    records: Vec<AuditRecord>,
) -> Result<Vec<Stored>, StoreError> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let last = lock_head(tx, &tables.head).await?;
    let stored = chained(last, records);
    let insert = format!(
        "INSERT INTO {} (sequence, at, {AUDIT_VALUE_COLUMNS})
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        tables.log
    );
    for Stored { record, hash } in &stored {
        sqlx::query(&insert)
            .bind(db_int(record.sequence, "audit sequence")?)
            .bind(time_of(record.at_ms)?)
            .bind(&record.action)
            .bind(&record.agent)
            .bind(&record.user)
            .bind(&record.tool)
            .bind(record.outcome.as_str())
            .bind(
                record
                    .generation
                    .map(|g| db_int(g, "audit generation"))
                    .transpose()?,
            )
            .bind(&record.caller_iss)
            .bind(&record.caller_jti)
            .bind(record.caller_digest.as_ref().map(|d| &d[..]))
            .bind(record.verified)
            .bind(&record.peer)
            .bind(&record.trace_id)
            .bind(&record.target)
            .bind(&hash[..])
            .execute(&mut **tx)
            .await
            .map_err(e)?;
    }
    let end = stored.last().expect("records is not empty, checked above");
    sqlx::query(&format!(
        "UPDATE {} SET last_sequence = $1, last_hash = $2",
        tables.head
    ))
    .bind(db_int(end.record.sequence, "audit sequence")?)
    .bind(&end.hash[..])
    .execute(&mut **tx)
    .await
    .map_err(e)?;
    sqlx::query("SELECT pg_notify('vault_audit', $1)")
        .bind(key)
        .execute(&mut **tx)
        .await
        .map_err(e)?;
    Ok(stored)
}

/// [`append_to`] an agent's chain, in a transaction already under that agent's role.
pub(super) async fn append_agent(
    tx: &mut Tx,
    namespace: &str,
    records: Vec<AuditRecord>,
) -> Result<Vec<Stored>, StoreError> {
    let tables = agent_tables(namespace)?;
    append_to(tx, &tables, namespace, records).await
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
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let (mut tx, tables) = self.audit_tx(chain).await?;
        let stored = append_to(&mut tx, &tables, chain.key(), records).await?;
        tx.commit().await.map_err(e)?;
        Ok(stored)
    }

    #[tracing::instrument(skip_all)]
    async fn append_batches(
        &self,
        batches: Vec<(Chain<'_>, Vec<AuditRecord>)>,
    ) -> Result<(), StoreError> {
        let mut batches: Vec<_> = batches
            .into_iter()
            .filter(|(_, records)| !records.is_empty())
            .collect();
        if batches.is_empty() {
            return Ok(());
        }
        // Every replica's flusher locks heads in this one order, so two never wait on each
        // other in a cycle (a credential write locks only its own chain's head).
        batches.sort_by(|a, b| a.0.key().cmp(b.0.key()));
        let mut tx = self.pool.begin().await.map_err(e)?;
        for (chain, records) in batches {
            let tables = match chain {
                Chain::Control => {
                    if self.agent_roles {
                        // Back to the login role, which holds the control chain's rights.
                        tx.execute("SET LOCAL ROLE NONE").await.map_err(e)?;
                    }
                    Tables {
                        log: "vault.audit_log".into(),
                        head: "vault.audit_head".into(),
                    }
                }
                Chain::Agent(agent) => {
                    if self.agent_roles {
                        let role = self.agent_role(&agent.namespace)?;
                        tx.execute(format!("SET LOCAL ROLE {role}").as_str())
                            .await
                            .map_err(e)?;
                    }
                    agent_tables(&agent.namespace)?
                }
            };
            append_to(&mut tx, &tables, chain.key(), records).await?;
        }
        tx.commit().await.map_err(e)?;
        Ok(())
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

    #[tracing::instrument(skip_all)]
    async fn delete_before(
        &self,
        chain: Chain<'_>,
        before_ms: i64,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let (mut tx, tables) = self.audit_tx(chain).await?;
        // Under the head's lock, so the anchor and the records deleted move together.
        lock_head(&mut tx, &tables.head).await?;
        let oldest: Vec<(i64, Vec<u8>, bool)> = sqlx::query_as(&format!(
            // Compared in milliseconds: any cut-off is valid, even one past every timestamp.
            "SELECT sequence, hash, extract(epoch FROM at) * 1000 < $1
             FROM {} ORDER BY sequence LIMIT $2",
            tables.log
        ))
        .bind(before_ms)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(e)?;
        // Only a prefix: a record stamped late by a slow clock stops retention there.
        let Some((sequence, hash, _)) = oldest.into_iter().take_while(|(_, _, old)| *old).last()
        else {
            return Ok(0);
        };
        let deleted = sqlx::query(&format!("DELETE FROM {} WHERE sequence <= $1", tables.log))
            .bind(sequence)
            .execute(&mut *tx)
            .await
            .map_err(e)?
            .rows_affected();
        sqlx::query(&format!(
            "UPDATE {} SET anchor_sequence = $1, anchor_hash = $2",
            tables.head
        ))
        .bind(sequence)
        .bind(hash)
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        Ok(deleted)
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
        let (mut tx, tables) = self.audit_tx(chain).await?;
        let row: Option<SignedHeadRow> = sqlx::query_as(&format!(
            "SELECT signed_chain, signed_sequence, signed_hash, signed_mac FROM {}",
            tables.head
        ))
        .fetch_optional(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        row.map(Option::<SignedHead>::try_from)
            .transpose()
            .map(Option::flatten)
    }
}
