//! The root key record and the agent registry in the control schema.

use sqlx::Executor as _;

use super::{PgStore, agent_lock_key, e, namespace_for, quoted};
use crate::ids::{AgentId, IssuerId};
use crate::store::rows::{AgentRow, LegacyAgentRow, RootKeyRow};
use crate::store::{AgentRecord, KeyStore, RootKeyRecord, StoreError};

/// The registry columns as [`AgentRow`] names them.
pub(super) const AGENT_COLUMNS: &str =
    "issuer, agent_id, schema_name AS namespace, wrapped_key, key_version::int8 AS key_version";

#[async_trait::async_trait]
impl KeyStore for PgStore {
    #[tracing::instrument(skip_all)]
    async fn root_key(&self) -> Result<Option<RootKeyRecord>, StoreError> {
        let row: Option<RootKeyRow> = sqlx::query_as(
            "SELECT key_check, kdf_salt, kdf_m_cost::int8 AS kdf_m_cost,
                    kdf_t_cost::int8 AS kdf_t_cost, kdf_p_cost::int8 AS kdf_p_cost
             FROM vault.root_key WHERE id = 1",
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
            "INSERT INTO vault.root_key (id, key_check, kdf_salt, kdf_m_cost, kdf_t_cost, kdf_p_cost)
             VALUES (1, $1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&record.key_check)
        .bind(salt)
        .bind(params.map(|p| p.m_cost as i32))
        .bind(params.map(|p| p.t_cost as i32))
        .bind(params.map(|p| p.p_cost as i32))
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
            "SELECT {AGENT_COLUMNS} FROM vault.agents WHERE issuer = $1 AND agent_id = $2"
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
        if self.agent_roles {
            // The serving role has no DDL right: the owner's SECURITY DEFINER function creates
            // the schema and its role, or returns the agent a concurrent call created.
            let row: AgentRow = sqlx::query_as(
                "SELECT out_issuer AS issuer, out_agent_id AS agent_id,
                        out_schema_name AS namespace, out_wrapped_key AS wrapped_key,
                        out_key_version::int8 AS key_version
                 FROM vault.create_agent($1, $2, $3, $4)",
            )
            .bind(issuer.as_str())
            .bind(agent.as_str())
            .bind(wrapped_key)
            .bind(key_version as i32)
            .fetch_one(&self.pool)
            .await
            .map_err(e)?;
            let record = AgentRecord::try_from(row)?;
            tracing::info!(schema = %record.namespace, "agent registered");
            return Ok(record);
        }
        let mut tx = self.pool.begin().await.map_err(e)?;
        // Two replicas creating the same agent at once queue here; the second finds the row.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(agent_lock_key(issuer, agent))
            .execute(&mut *tx)
            .await
            .map_err(e)?;
        let existing: Option<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM vault.agents WHERE issuer = $1 AND agent_id = $2"
        ))
        .bind(issuer.as_str())
        .bind(agent.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(e)?;
        if let Some(row) = existing {
            tx.commit().await.map_err(e)?;
            return AgentRecord::try_from(row);
        }
        let namespace = namespace_for(issuer, agent);
        let create = format!("CREATE SCHEMA {}", quoted(&namespace)?);
        tx.execute(sqlx::raw_sql(&create)).await.map_err(e)?;
        let version = Self::apply_agent_migrations(&mut tx, &namespace, 0).await?;
        let row: AgentRow = sqlx::query_as(&format!(
            "INSERT INTO vault.agents (issuer, agent_id, schema_name, wrapped_key, key_version, schema_version)
             VALUES ($6, $1, $2, $3, $4, $5)
             RETURNING {AGENT_COLUMNS}"
        ))
        .bind(agent.as_str())
        .bind(&namespace)
        .bind(wrapped_key)
        .bind(key_version as i32)
        .bind(version)
        .bind(issuer.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        tracing::info!(schema = %namespace, "created agent schema");
        AgentRecord::try_from(row)
    }

    #[tracing::instrument(skip_all)]
    async fn agents(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AgentRecord>, StoreError> {
        // Keyset paging on the unique schema name: each page is one index range scan.
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM vault.agents
             WHERE issuer <> '' AND schema_name > $1
             ORDER BY schema_name LIMIT $2"
        ))
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        crate::store::rows::all(rows)
    }

    #[tracing::instrument(skip_all)]
    async fn legacy_agents(&self) -> Result<Vec<(AgentId, u32, Vec<u8>)>, StoreError> {
        let rows: Vec<LegacyAgentRow> = sqlx::query_as(
            "SELECT agent_id, key_version::int8 AS key_version, wrapped_key
             FROM vault.agents WHERE issuer = ''",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        crate::store::rows::all(rows)
    }

    #[tracing::instrument(skip_all)]
    async fn adopt_agent(
        &self,
        agent: &AgentId,
        issuer: &IssuerId,
        wrapped_key: &[u8],
    ) -> Result<bool, StoreError> {
        // Through the owner's function: the serving role may not rewrite registry rows, only
        // hand a row without an issuer to one.
        sqlx::query_scalar("SELECT vault.adopt_agent($1, $2, $3)")
            .bind(agent.as_str())
            .bind(issuer.as_str())
            .bind(wrapped_key)
            .fetch_one(&self.pool)
            .await
            .map_err(e)
    }
}
