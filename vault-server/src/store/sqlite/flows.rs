//! The `authorization_flows` table: consent flows, found by id or by state hash, never by agent.

use chrono::{DateTime, Utc};

use super::agent_keys::{fence, sealed_version};
use super::{SqliteStore, e, now_ms};
use crate::store::rows::{FlowRow, joined_scopes};
use crate::store::{Flow, FlowChange, FlowStatus, FlowStore, NewFlow, StoreError};

/// The columns of [`FlowRow`].
const FLOW_COLUMNS: &str = "id, issuer, agent_id, namespace, user_id, tool, scopes, return_url,
    redirect_uri, provider_binding, status, error, sealed_verifier, sealed_code,
    expires_at AS expires_at_ms,
    created_at AS created_at_ms";

#[async_trait::async_trait]
impl FlowStore for SqliteStore {
    #[tracing::instrument(skip_all)]
    async fn create_flow(&self, flow: &NewFlow<'_>) -> Result<(), StoreError> {
        let version = sealed_version(flow.sealed_verifier)?;
        // The insert first, so the transaction holds the write lock when the fence reads the
        // agent's key version.
        let mut tx = self.pool.begin().await.map_err(e)?;
        sqlx::query(
            "INSERT INTO authorization_flows
                 (id, state_hash, issuer, agent_id, namespace, user_id, tool, scopes, return_url,
                  redirect_uri, status, sealed_verifier, expires_at, provider_binding,
                  created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?15, ?14, ?14)",
        )
        .bind(flow.id)
        .bind(flow.state_hash.as_slice())
        .bind(flow.issuer.as_str())
        .bind(flow.agent.as_str())
        .bind(flow.namespace)
        .bind(flow.user.as_str())
        .bind(flow.tool.as_str())
        .bind(joined_scopes(flow.scopes)?)
        .bind(flow.return_url)
        .bind(flow.redirect_uri)
        .bind(FlowStatus::Pending.code())
        .bind(flow.sealed_verifier)
        .bind(flow.expires_at.timestamp_millis())
        .bind(now_ms())
        .bind(flow.provider_binding)
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        fence(&mut tx, flow.namespace, version).await?;
        tx.commit().await.map_err(e)?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    async fn flow(&self, id: &str) -> Result<Option<Flow>, StoreError> {
        let row: Option<FlowRow> = sqlx::query_as(&format!(
            "SELECT {FLOW_COLUMNS} FROM authorization_flows WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        row.map(Flow::try_from).transpose()
    }

    #[tracing::instrument(skip_all)]
    async fn flow_by_state(&self, state_hash: &[u8; 32]) -> Result<Option<Flow>, StoreError> {
        let row: Option<FlowRow> = sqlx::query_as(&format!(
            "SELECT {FLOW_COLUMNS} FROM authorization_flows WHERE state_hash = ?"
        ))
        .bind(state_hash.as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        row.map(Flow::try_from).transpose()
    }

    #[tracing::instrument(skip_all)]
    async fn transition(&self, id: &str, change: FlowChange<'_>) -> Result<bool, StoreError> {
        let version = change.sealed_code.map(sealed_version).transpose()?;
        let mut tx = self.pool.begin().await.map_err(e)?;
        // One statement: the status compare-and-set is the fence between replicas, and a flow
        // that ends loses its secrets in the same write that ends it.
        let moved = sqlx::query(
            "UPDATE authorization_flows SET
                 status = ?3,
                 sealed_verifier = CASE WHEN ?4 THEN NULL ELSE sealed_verifier END,
                 sealed_code = CASE WHEN ?4 THEN NULL ELSE coalesce(?5, sealed_code) END,
                 error = coalesce(?6, error),
                 updated_at = ?8
             WHERE id = ?1 AND status = ?2 AND (NOT ?7 OR expires_at > ?8)",
        )
        .bind(id)
        .bind(change.from.code())
        .bind(change.to.code())
        .bind(change.to.is_final())
        .bind(change.sealed_code)
        .bind(change.error)
        .bind(change.unexpired)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(e)?
        .rows_affected();
        // A code sealed under a retired agent key version is refused whether or not the flow
        // was still in `from`, as PostgreSQL's fence (taken before its update) refuses it. The
        // update above, even one that matched nothing, holds the write lock.
        if let Some(version) = version {
            let namespace: Option<String> =
                sqlx::query_scalar("SELECT namespace FROM authorization_flows WHERE id = ?")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(e)?;
            if let Some(namespace) = namespace {
                fence(&mut tx, &namespace, version).await?;
            }
        }
        tx.commit().await.map_err(e)?;
        Ok(moved == 1)
    }

    #[tracing::instrument(skip_all)]
    async fn expired_unfinished(&self, limit: u32) -> Result<Vec<Flow>, StoreError> {
        let rows: Vec<FlowRow> = sqlx::query_as(&format!(
            "SELECT {FLOW_COLUMNS} FROM authorization_flows
             WHERE status IN (?1, ?2) AND expires_at <= ?3
             ORDER BY expires_at LIMIT ?4"
        ))
        .bind(FlowStatus::UNFINISHED[0].code())
        .bind(FlowStatus::UNFINISHED[1].code())
        .bind(now_ms())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        rows.into_iter().map(Flow::try_from).collect()
    }

    #[tracing::instrument(skip_all)]
    async fn sweep_flows(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, StoreError> {
        let swept = sqlx::query(
            "DELETE FROM authorization_flows WHERE id IN (
                 SELECT id FROM authorization_flows WHERE expires_at < ?1
                 ORDER BY expires_at LIMIT ?2)",
        )
        .bind(before.timestamp_millis())
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await
        .map_err(e)?
        .rows_affected();
        sqlx::query(
            "UPDATE authorization_flows SET sealed_verifier = NULL, sealed_code = NULL
             WHERE expires_at < ? AND (sealed_verifier IS NOT NULL OR sealed_code IS NOT NULL)",
        )
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(e)?;
        Ok(swept)
    }
}
