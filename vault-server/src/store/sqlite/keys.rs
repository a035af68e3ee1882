//! The root key record and the agent registry.

use super::{SqliteStore, e, now_ms};
use crate::ids::{AgentId, IssuerId};
use crate::store::rows::{AgentRow, LegacyAgentRow, RootKeyRow, all};
use crate::store::{AgentRecord, KeyStore, RootKeyRecord, StoreError, namespace_for};

/// The registry columns as [`AgentRow`] names them.
pub(super) const AGENT_COLUMNS: &str = "issuer, agent_id, namespace, wrapped_key, key_version";

#[async_trait::async_trait]
impl KeyStore for SqliteStore {
    #[tracing::instrument(skip_all)]
    async fn root_key(&self) -> Result<Option<RootKeyRecord>, StoreError> {
        let row: Option<RootKeyRow> = sqlx::query_as(
            "SELECT key_check, kdf_salt, kdf_m_cost, kdf_t_cost, kdf_p_cost FROM root_key WHERE id = 1",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        row.map(RootKeyRecord::try_from).transpose()
    }

    #[tracing::instrument(skip_all)]
    async fn insert_root_key(&self, record: &RootKeyRecord) -> Result<(), StoreError> {
        let (salt, params) = match &record.kdf {
            Some((salt, p)) => (Some(salt.clone()), Some(*p)),
            None => (None, None),
        };
        sqlx::query(
            "INSERT INTO root_key (id, key_check, kdf_salt, kdf_m_cost, kdf_t_cost, kdf_p_cost, created_at)
             VALUES (1, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&record.key_check)
        .bind(salt)
        .bind(params.map(|p| i64::from(p.m_cost)))
        .bind(params.map(|p| i64::from(p.t_cost)))
        .bind(params.map(|p| i64::from(p.p_cost)))
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(e)?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    async fn agent(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
    ) -> Result<Option<AgentRecord>, StoreError> {
        let row: Option<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE issuer = ? AND agent_id = ?"
        ))
        .bind(issuer.as_str())
        .bind(agent.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        row.map(AgentRecord::try_from).transpose()
    }

    #[tracing::instrument(skip_all)]
    async fn create_agent(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
        wrapped_key: &[u8],
        key_version: u32,
    ) -> Result<AgentRecord, StoreError> {
        // Insert unless present, then read: a concurrent creator's key wins, as in PostgreSQL.
        sqlx::query(
            "INSERT INTO agents (issuer, agent_id, namespace, wrapped_key, key_version, created_at)
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (issuer, agent_id) DO NOTHING",
        )
        .bind(issuer.as_str())
        .bind(agent.as_str())
        .bind(namespace_for(issuer, agent))
        .bind(wrapped_key)
        .bind(i64::from(key_version))
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(e)?;
        self.agent(issuer, agent)
            .await?
            .ok_or_else(|| StoreError::Corrupt("agent row vanished".into()))
    }

    #[tracing::instrument(skip_all)]
    async fn agents(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AgentRecord>, StoreError> {
        // Keyset paging on the unique namespace: each page is one index range scan.
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents
             WHERE issuer <> '' AND namespace > ?
             ORDER BY namespace LIMIT ?"
        ))
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        all(rows)
    }

    #[tracing::instrument(skip_all)]
    async fn legacy_agents(&self) -> Result<Vec<(AgentId, u32, Vec<u8>)>, StoreError> {
        let rows: Vec<LegacyAgentRow> = sqlx::query_as(
            "SELECT agent_id, key_version, wrapped_key FROM agents WHERE issuer = ''",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        all(rows)
    }

    #[tracing::instrument(skip_all)]
    async fn adopt_agent(
        &self,
        agent: &AgentId,
        issuer: &IssuerId,
        wrapped_key: &[u8],
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE agents SET issuer = ?, wrapped_key = ? WHERE issuer = '' AND agent_id = ?",
        )
        .bind(issuer.as_str())
        .bind(wrapped_key)
        .bind(agent.as_str())
        .execute(&self.pool)
        .await
        .map_err(e)?;
        Ok(done.rows_affected() == 1)
    }
}
