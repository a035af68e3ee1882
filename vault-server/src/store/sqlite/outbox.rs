//! The revocation outbox (all agents, keyed by namespace).

use std::time::Duration;

use sqlx::Row as _;

use super::keys::AGENT_COLUMNS;
use super::{SqliteStore, e, ms, now_ms};
use crate::ids::{Tool, UserId};
use crate::store::rows::{AgentRow, OutboxRow, all};
use crate::store::{AgentRecord, OutboxEntry, OutboxStore, StoreError};

/// The outbox columns as [`OutboxRow`] names them.
const OUTBOX_COLUMNS: &str = "id, user_id, tool, generation, key_version, wrapped_data_key,
    ciphertext, attempts, created_at AS created_at_ms";

#[async_trait::async_trait]
impl OutboxStore for SqliteStore {
    #[tracing::instrument(skip_all)]
    async fn delete_into_outbox(
        &self,
        agent: &AgentRecord,
        user: &UserId,
        tool: Option<&Tool>,
        owner: uuid::Uuid,
        lease: Duration,
        audit: Vec<crate::audit::AuditRecord>,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(e)?;
        let rows: Vec<OutboxRow> = sqlx::query_as(&format!(
            "INSERT INTO revocation_outbox
                 (namespace, user_id, tool, generation, key_version, wrapped_data_key, ciphertext,
                  created_at, next_attempt_at, lease_owner, lease_until)
             SELECT namespace, user_id, tool, generation, key_version, wrapped_data_key, ciphertext, ?4, ?4, ?5, ?6
             FROM credentials WHERE namespace = ?1 AND user_id = ?2 AND (?3 IS NULL OR tool = ?3)
             RETURNING {OUTBOX_COLUMNS}"
        ))
        .bind(&agent.namespace)
        .bind(user.as_str())
        .bind(tool.map(Tool::as_str))
        .bind(now)
        .bind(owner.to_string())
        .bind(now.saturating_add(ms(lease)))
        .fetch_all(&mut *tx)
        .await
        .map_err(e)?;
        sqlx::query(
            "DELETE FROM credentials WHERE namespace = ?1 AND user_id = ?2 AND (?3 IS NULL OR tool = ?3)",
        )
        .bind(&agent.namespace)
        .bind(user.as_str())
        .bind(tool.map(Tool::as_str))
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        super::audit::append_in(&mut tx, &agent.namespace, audit).await?;
        tx.commit().await.map_err(e)?;
        all(rows)
    }

    #[tracing::instrument(skip_all)]
    async fn claim_outbox(
        &self,
        owner: uuid::Uuid,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<(AgentRecord, OutboxEntry)>, StoreError> {
        let now = now_ms();
        let rows = sqlx::query(&format!(
            "UPDATE revocation_outbox SET lease_owner = ?1, lease_until = ?2 + ?3
             WHERE id IN (SELECT id FROM revocation_outbox
                          WHERE next_attempt_at <= ?2 AND (lease_until IS NULL OR lease_until <= ?2)
                          ORDER BY id LIMIT ?4)
             RETURNING namespace, {OUTBOX_COLUMNS}"
        ))
        .bind(owner.to_string())
        .bind(now)
        .bind(ms(lease))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            let namespace: String = row.try_get("namespace").map_err(e)?;
            let agent: AgentRow = sqlx::query_as(&format!(
                "SELECT {AGENT_COLUMNS} FROM agents WHERE namespace = ?"
            ))
            .bind(&namespace)
            .fetch_one(&self.pool)
            .await
            .map_err(e)?;
            let entry: OutboxRow = sqlx::FromRow::from_row(row).map_err(e)?;
            claimed.push((AgentRecord::try_from(agent)?, OutboxEntry::try_from(entry)?));
        }
        Ok(claimed)
    }

    #[tracing::instrument(skip_all)]
    async fn finish_outbox(&self, agent: &AgentRecord, id: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM revocation_outbox WHERE namespace = ? AND id = ?")
            .bind(&agent.namespace)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(e)?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    async fn retry_outbox(
        &self,
        agent: &AgentRecord,
        id: i64,
        wait: Duration,
        error: &str,
        counted: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE revocation_outbox SET attempts = attempts + ?5, next_attempt_at = ?3,
                 lease_owner = NULL, lease_until = NULL, last_error = ?4
             WHERE namespace = ?1 AND id = ?2",
        )
        .bind(&agent.namespace)
        .bind(id)
        .bind(now_ms().saturating_add(ms(wait)))
        .bind(error)
        .bind(i64::from(counted))
        .execute(&self.pool)
        .await
        .map_err(e)?;
        Ok(())
    }
}
