//! Each agent schema's `revocation_outbox`.

use std::time::Duration;

use super::keys::AGENT_COLUMNS;
use super::{AT_LEAST_DAILY, PgStore, e, quoted};
use crate::ids::{Tool, UserId};
use crate::store::rows::{AgentRow, OutboxRow, all};
use crate::store::{AgentRecord, OutboxEntry, OutboxStore, StoreError};

/// The outbox columns as [`OutboxRow`] names them.
const OUTBOX_COLUMNS: &str = "id, user_id, tool, generation, key_version::int8 AS key_version,
    wrapped_data_key, ciphertext, attempts::int8 AS attempts,
    (extract(epoch FROM created_at) * 1000)::int8 AS created_at_ms";

#[async_trait::async_trait]
impl OutboxStore for PgStore {
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
        let schema = quoted(&agent.namespace)?;
        let mut tx = self.pool.begin().await.map_err(e)?;
        // First, so that the agent's row is locked before its tables (as the outbox pass and
        // the sweep lock it): the pass will look when the leases below end, should this
        // replica not deliver them (control migration 0017). Moved even if nothing is queued
        // after all, which costs one visit.
        outbox_due_within(&mut tx, &agent.namespace, lease).await?;
        self.set_agent_role(&mut tx, &agent.namespace).await?;
        // One statement: the deletion and the queued revocation commit together or not at all.
        let sql = format!(
            "WITH gone AS (
                 DELETE FROM {schema}.credentials
                 WHERE user_id = $1 AND ($2::text IS NULL OR tool = $2)
                 RETURNING user_id, tool, generation, key_version, wrapped_data_key, ciphertext)
             INSERT INTO {schema}.revocation_outbox
                 (user_id, tool, generation, key_version, wrapped_data_key, ciphertext, lease_owner, lease_until)
             SELECT user_id, tool, generation, key_version, wrapped_data_key, ciphertext, $3,
                    now() + make_interval(secs => $4)
             FROM gone
             RETURNING {OUTBOX_COLUMNS}"
        );
        let rows: Vec<OutboxRow> = sqlx::query_as(&sql)
            .bind(user.as_str())
            .bind(tool.map(Tool::as_str))
            .bind(owner)
            .bind(lease.as_secs_f64())
            .fetch_all(&mut *tx)
            .await
            .map_err(e)?;
        let appended = super::audit::append_agent(self, &mut tx, &agent.namespace, audit).await?;
        self.commit_appended(tx, &agent.namespace, &appended)
            .await?;
        all(rows)
    }

    #[tracing::instrument(skip_all)]
    async fn claim_outbox(
        &self,
        owner: uuid::Uuid,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<(AgentRecord, OutboxEntry)>, StoreError> {
        // Only the agents with a revocation that may be due (control migration 0017). Legacy
        // agents (issuer '') are adopted at startup before anything is served; agents behind
        // this version's per-agent migrations wait for their upgrade.
        let agents: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM vault.agents
             WHERE outbox_due <= now() AND issuer <> '' AND schema_version >= $1
             ORDER BY outbox_due LIMIT $2"
        ))
        .bind(super::schema::latest_agent_version())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        let mut claimed = Vec::new();
        for row in agents {
            let remaining = i64::from(limit) - claimed.len() as i64;
            if remaining <= 0 {
                break;
            }
            let agent = AgentRecord::try_from(row)?;
            // One agent that fails (its schema damaged, say) must not hold up the others'
            // revocations: it stays due, and is tried again at the next pass.
            match self.claim_agent(&agent, owner, lease, remaining).await {
                Ok(entries) => {
                    claimed.extend(entries.into_iter().map(|entry| (agent.clone(), entry)))
                }
                Err(err) => tracing::error!(
                    error = %crate::telemetry::error_chain(&err),
                    schema = %agent.namespace,
                    "cannot claim the agent's queued revocations"
                ),
            }
        }
        Ok(claimed)
    }

    #[tracing::instrument(skip_all)]
    async fn finish_outbox(&self, agent: &AgentRecord, id: i64) -> Result<(), StoreError> {
        let schema = quoted(&agent.namespace)?;
        let mut tx = self.agent_tx(&agent.namespace).await?;
        sqlx::query(&format!(
            "DELETE FROM {schema}.revocation_outbox WHERE id = $1"
        ))
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
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
        let schema = quoted(&agent.namespace)?;
        let mut tx = self.pool.begin().await.map_err(e)?;
        // The entry is released before its lease ends: the pass must look again when it is
        // due, not when the lease would have ended (control migration 0017). The agent's row
        // first, as everywhere.
        outbox_due_within(&mut tx, &agent.namespace, wait).await?;
        self.set_agent_role(&mut tx, &agent.namespace).await?;
        sqlx::query(&format!(
            "UPDATE {schema}.revocation_outbox
             SET attempts = attempts + CASE WHEN $4 THEN 1 ELSE 0 END,
                 next_attempt_at = now() + make_interval(secs => $3),
                 lease_owner = NULL, lease_until = NULL, last_error = $2
             WHERE id = $1"
        ))
        .bind(id)
        .bind(error)
        .bind(wait.as_secs_f64())
        .bind(counted)
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        Ok(())
    }
}

impl PgStore {
    /// Claims at most `limit` of the agent's revocations that are due, for `lease`, and moves
    /// its `outbox_due` to when the earliest entry left may be claimed (control migration
    /// 0017). An agent another replica is visiting, or no longer due, is left alone.
    async fn claim_agent(
        &self,
        agent: &AgentRecord,
        owner: uuid::Uuid,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let schema = quoted(&agent.namespace)?;
        let mut tx = self.pool.begin().await.map_err(e)?;
        // Held to the commit: a revocation queued meanwhile moves `outbox_due` after this pass
        // sets it, not before.
        let due = sqlx::query(
            "SELECT 1 FROM vault.agents WHERE schema_name = $1 AND outbox_due <= now()
             FOR NO KEY UPDATE SKIP LOCKED",
        )
        .bind(&agent.namespace)
        .fetch_optional(&mut *tx)
        .await
        .map_err(e)?;
        if due.is_none() {
            return Ok(Vec::new());
        }
        self.set_agent_role(&mut tx, &agent.namespace).await?;
        let rows: Vec<OutboxRow> = sqlx::query_as(&format!(
            "UPDATE {schema}.revocation_outbox
             SET lease_owner = $1, lease_until = now() + make_interval(secs => $2)
             WHERE id IN (
                 SELECT id FROM {schema}.revocation_outbox
                 WHERE next_attempt_at <= now() AND (lease_until IS NULL OR lease_until <= now())
                 ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)
             RETURNING {OUTBOX_COLUMNS}"
        ))
        .bind(owner)
        .bind(lease.as_secs_f64())
        .bind(limit)
        .fetch_all(&mut *tx)
        .await
        .map_err(e)?;
        // A new snapshot: every entry left, the ones just claimed (claimable again when their
        // lease ends) and the ones skipped or queued since.
        let next: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(&format!(
            "SELECT min(greatest(next_attempt_at, coalesce(lease_until, '-infinity')))
             FROM {schema}.revocation_outbox"
        ))
        .fetch_one(&mut *tx)
        .await
        .map_err(e)?;
        self.reset_role(&mut tx).await?;
        // At least daily, whatever is queued: a revocation queued by a replica that does not
        // move `outbox_due` (an older version, during a rolling upgrade) waits a day at most.
        sqlx::query(&format!(
            "UPDATE vault.agents SET outbox_due = least($2, now() + {AT_LEAST_DAILY})
             WHERE schema_name = $1"
        ))
        .bind(&agent.namespace)
        .bind(next)
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        all(rows)
    }
}

/// Makes the outbox pass visit the agent schema `namespace` within `within` at the latest (it
/// may be due sooner already): the first statement of a transaction that queues or releases a
/// revocation, so that the agent's registry row is locked before its tables, as the pass and
/// the sweep lock it (control migration 0017).
async fn outbox_due_within(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    namespace: &str,
    within: Duration,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE vault.agents
         SET outbox_due = least(coalesce(outbox_due, now() + make_interval(secs => $2)),
                                now() + make_interval(secs => $2))
         WHERE schema_name = $1",
    )
    .bind(namespace)
    .bind(within.as_secs_f64())
    .execute(&mut **tx)
    .await
    .map_err(e)?;
    Ok(())
}
