//! `vault.authorization_flows`: consent flows, in the control schema (the provider's callback
//! finds a flow by its state hash before it knows the agent). Like `vault.leases`, it is read
//! and written on the pool under the login role (the serving group's rights), never under an
//! agent's role.

use chrono::{DateTime, Utc};

use super::{PgStore, e};
use crate::store::rows::{FlowRow, joined_scopes};
use crate::store::{Flow, FlowChange, FlowStatus, FlowStore, NewFlow, StoreError};

/// The columns of [`FlowRow`]; times rounded down to the millisecond.
const FLOW_COLUMNS: &str = "id, issuer, agent_id, namespace, user_id, tool, scopes, return_url,
    redirect_uri, provider_binding, status::int8 AS status, error, sealed_verifier, sealed_code,
    floor(extract(epoch FROM expires_at) * 1000)::int8 AS expires_at_ms,
    floor(extract(epoch FROM created_at) * 1000)::int8 AS created_at_ms";

/// Within `tx`, the agent key write fence (`vault.fence_agent_key`) for a flow secret, which
/// starts with the version that sealed it.
async fn fence(
    tx: &mut sqlx::PgConnection,
    namespace: &str,
    sealed: &[u8],
) -> Result<(), StoreError> {
    let version = sealed
        .first_chunk::<4>()
        .map(|v| u32::from_be_bytes(*v))
        .ok_or_else(|| StoreError::Corrupt("a flow secret without its key version".into()))?;
    let current: bool = sqlx::query_scalar("SELECT vault.fence_agent_key($1, $2)")
        .bind(namespace)
        .bind(version as i32)
        .fetch_one(tx)
        .await
        .map_err(e)?;
    if current {
        Ok(())
    } else {
        Err(StoreError::AgentKeyRotated)
    }
}

#[async_trait::async_trait]
impl FlowStore for PgStore {
    #[tracing::instrument(skip_all)]
    async fn create_flow(&self, flow: &NewFlow<'_>) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(e)?;
        fence(&mut tx, flow.namespace, flow.sealed_verifier).await?;
        sqlx::query(
            "INSERT INTO vault.authorization_flows
                 (id, state_hash, issuer, agent_id, namespace, user_id, tool, scopes, return_url,
                  redirect_uri, status, sealed_verifier, expires_at, provider_binding,
                  created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, now(), now())",
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
        .bind(flow.expires_at)
        .bind(flow.provider_binding)
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    async fn flow(&self, id: &str) -> Result<Option<Flow>, StoreError> {
        let row: Option<FlowRow> = sqlx::query_as(&format!(
            "SELECT {FLOW_COLUMNS} FROM vault.authorization_flows WHERE id = $1"
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
            "SELECT {FLOW_COLUMNS} FROM vault.authorization_flows WHERE state_hash = $1"
        ))
        .bind(state_hash.as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        row.map(Flow::try_from).transpose()
    }

    #[tracing::instrument(skip_all)]
    async fn transition(&self, id: &str, change: FlowChange<'_>) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(e)?;
        if let Some(code) = change.sealed_code {
            let namespace: Option<String> =
                sqlx::query_scalar("SELECT namespace FROM vault.authorization_flows WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(e)?;
            if let Some(namespace) = namespace {
                fence(&mut tx, &namespace, code).await?;
            }
        }
        // One statement: the status compare-and-set is the fence between replicas, and a flow
        // that ends loses its secrets in the same write that ends it.
        let moved = sqlx::query(
            "UPDATE vault.authorization_flows SET
                 status = $3,
                 sealed_verifier = CASE WHEN $4 THEN NULL ELSE sealed_verifier END,
                 sealed_code = CASE WHEN $4 THEN NULL ELSE coalesce($5, sealed_code) END,
                 error = coalesce($6, error),
                 updated_at = now()
             WHERE id = $1 AND status = $2 AND (NOT $7 OR expires_at > now())",
        )
        .bind(id)
        .bind(change.from.code())
        .bind(change.to.code())
        .bind(change.to.is_final())
        .bind(change.sealed_code)
        .bind(change.error)
        .bind(change.unexpired)
        .execute(&mut *tx)
        .await
        .map_err(e)?
        .rows_affected();
        tx.commit().await.map_err(e)?;
        Ok(moved == 1)
    }

    #[tracing::instrument(skip_all)]
    async fn expired_unfinished(&self, limit: u32) -> Result<Vec<Flow>, StoreError> {
        let rows: Vec<FlowRow> = sqlx::query_as(&format!(
            "SELECT {FLOW_COLUMNS} FROM vault.authorization_flows
             WHERE status IN ($1, $2) AND expires_at <= now()
             ORDER BY expires_at LIMIT $3"
        ))
        .bind(FlowStatus::UNFINISHED[0].code())
        .bind(FlowStatus::UNFINISHED[1].code())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        rows.into_iter().map(Flow::try_from).collect()
    }

    #[tracing::instrument(skip_all)]
    async fn sweep_flows(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, StoreError> {
        // SKIP LOCKED: concurrent sweepers split the work, and a flow a request is changing
        // right now is left for the next pass.
        let swept = sqlx::query(
            "DELETE FROM vault.authorization_flows WHERE id IN (
                 SELECT id FROM vault.authorization_flows WHERE expires_at < $1
                 ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)
             AND expires_at < $1",
        )
        .bind(before)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await
        .map_err(e)?
        .rows_affected();
        sqlx::query(
            "UPDATE vault.authorization_flows SET sealed_verifier = NULL, sealed_code = NULL
             WHERE expires_at < now() AND (sealed_verifier IS NOT NULL OR sealed_code IS NOT NULL)",
        )
        .execute(&self.pool)
        .await
        .map_err(e)?;
        Ok(swept)
    }
}
