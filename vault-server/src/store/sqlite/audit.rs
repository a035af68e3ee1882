//! The audit chains, every one in `audit_log` keyed by `chain` ('control' or the agent's
//! namespace), with one `audit_heads` row per chain made by its first append.

use super::{SqliteStore, e};
use crate::audit::{Anchor, AuditRecord, SignedHead, Stored};
use crate::store::audit::{chained, db_int};
use crate::store::rows::{AUDIT_VALUE_COLUMNS, AnchorRow, AuditRow, LastRow, SignedHeadRow, all};
use crate::store::{AuditStore, Chain, StoreError};

type Tx = sqlx::Transaction<'static, sqlx::Sqlite>;

/// Begins a transaction whose first statement writes: it waits for SQLite's single write lock
/// (up to the busy timeout) before reading anything, so the head it then reads cannot change
/// under it, and it never has to upgrade a read snapshot (which fails at once when another
/// writer went first). Makes the chain's head row if this is its first use.
async fn write_tx(store: &SqliteStore, chain: &str) -> Result<Tx, StoreError> {
    let mut tx = store.pool.begin().await.map_err(e)?;
    sqlx::query(
        "INSERT INTO audit_heads (chain, last_sequence, last_hash, anchor_sequence, anchor_hash)
         VALUES (?1, 0, zeroblob(32), 0, zeroblob(32))
         ON CONFLICT (chain) DO NOTHING",
    )
    .bind(chain)
    .execute(&mut *tx)
    .await
    .map_err(e)?;
    Ok(tx)
}

/// Appends `records` to the chain keyed `key` inside `tx`, after the transaction's own writes
/// (which already hold SQLite's one write lock, so the head read here cannot change under it):
/// the write and its records commit or roll back together.
pub(super) async fn append_in(
    tx: &mut Tx,
    key: &str,
    records: Vec<AuditRecord>,
) -> Result<Vec<Stored>, StoreError> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query(
        "INSERT INTO audit_heads (chain, last_sequence, last_hash, anchor_sequence, anchor_hash)
         VALUES (?1, 0, zeroblob(32), 0, zeroblob(32))
         ON CONFLICT (chain) DO NOTHING",
    )
    .bind(key)
    .execute(&mut **tx)
    .await
    .map_err(e)?;
    let last: LastRow =
        sqlx::query_as("SELECT last_sequence, last_hash FROM audit_heads WHERE chain = ?1")
            .bind(key)
            .fetch_one(&mut **tx)
            .await
            .map_err(e)?;
    let stored = chained(last.try_into()?, records);
    for Stored { record, hash } in &stored {
        sqlx::query(&format!(
            "INSERT INTO audit_log (chain, sequence, at, {AUDIT_VALUE_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                         ?17)"
        ))
        .bind(key)
        .bind(db_int(record.sequence, "audit sequence")?)
        .bind(record.at_ms)
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
    sqlx::query("UPDATE audit_heads SET last_sequence = ?2, last_hash = ?3 WHERE chain = ?1")
        .bind(key)
        .bind(db_int(end.record.sequence, "audit sequence")?)
        .bind(&end.hash[..])
        .execute(&mut **tx)
        .await
        .map_err(e)?;
    Ok(stored)
}

#[async_trait::async_trait]
impl AuditStore for SqliteStore {
    #[tracing::instrument(skip_all)]
    async fn append(
        &self,
        chain: Chain<'_>,
        records: Vec<AuditRecord>,
    ) -> Result<Vec<Stored>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let key = chain.key();
        let mut tx = write_tx(self, key).await?;
        let stored = append_in(&mut tx, key, records).await?;
        tx.commit().await.map_err(e)?;
        Ok(stored)
    }

    #[tracing::instrument(skip_all)]
    async fn records(
        &self,
        chain: Chain<'_>,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Stored>, StoreError> {
        let rows: Vec<AuditRow> = sqlx::query_as(&format!(
            "SELECT sequence, at AS at_ms, {AUDIT_VALUE_COLUMNS}
             FROM audit_log WHERE chain = ?1 AND sequence > ?2 ORDER BY sequence LIMIT ?3"
        ))
        .bind(chain.key())
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        all(rows)
    }

    #[tracing::instrument(skip_all)]
    async fn head(&self, chain: Chain<'_>) -> Result<Anchor, StoreError> {
        let row: Option<LastRow> =
            sqlx::query_as("SELECT last_sequence, last_hash FROM audit_heads WHERE chain = ?1")
                .bind(chain.key())
                .fetch_optional(&self.pool)
                .await
                .map_err(e)?;
        row.map_or(Ok(Anchor::START), Anchor::try_from)
    }

    #[tracing::instrument(skip_all)]
    async fn anchor(&self, chain: Chain<'_>) -> Result<Anchor, StoreError> {
        let row: Option<AnchorRow> =
            sqlx::query_as("SELECT anchor_sequence, anchor_hash FROM audit_heads WHERE chain = ?1")
                .bind(chain.key())
                .fetch_optional(&self.pool)
                .await
                .map_err(e)?;
        row.map_or(Ok(Anchor::START), Anchor::try_from)
    }

    #[tracing::instrument(skip_all)]
    async fn delete_before(
        &self,
        chain: Chain<'_>,
        before_ms: i64,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let key = chain.key();
        let mut tx = write_tx(self, key).await?;
        let oldest: Vec<(i64, Vec<u8>, bool)> = sqlx::query_as(
            "SELECT sequence, hash, at < ?2 FROM audit_log WHERE chain = ?1
             ORDER BY sequence LIMIT ?3",
        )
        .bind(key)
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
        let deleted = sqlx::query("DELETE FROM audit_log WHERE chain = ?1 AND sequence <= ?2")
            .bind(key)
            .bind(sequence)
            .execute(&mut *tx)
            .await
            .map_err(e)?
            .rows_affected();
        sqlx::query(
            "UPDATE audit_heads SET anchor_sequence = ?2, anchor_hash = ?3 WHERE chain = ?1",
        )
        .bind(key)
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
        let key = chain.key();
        let mut tx = write_tx(self, key).await?;
        sqlx::query(
            "UPDATE audit_heads SET signed_chain = ?2, signed_sequence = ?3, signed_hash = ?4,
                 signed_mac = ?5
             WHERE chain = ?1 AND (signed_sequence IS NULL OR signed_sequence <= ?3)",
        )
        .bind(key)
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
        let row: Option<SignedHeadRow> = sqlx::query_as(
            "SELECT signed_chain, signed_sequence, signed_hash, signed_mac
             FROM audit_heads WHERE chain = ?1",
        )
        .bind(chain.key())
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        row.map(Option::<SignedHead>::try_from)
            .transpose()
            .map(Option::flatten)
    }
}
