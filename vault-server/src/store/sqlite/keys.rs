//! The root key record and the agent registry.

use super::{SqliteStore, e, now_ms};
use crate::ids::{AgentId, IssuerId};
use crate::store::rows::{AgentRow, LegacyAgentRow, RootKeyRow, all, root_key_columns};
use crate::store::{
    AgentRecord, KeyStore, NextRoot, RootKeyRecord, RotationSwitch, Shred, ShredCounts, ShredPlan,
    StoreError, namespace_for,
};

/// The registry columns as [`AgentRow`] names them.
pub(super) const AGENT_COLUMNS: &str = "issuer, agent_id, namespace, wrapped_key, key_version, next_wrapped_key, \
     retiring_wrapped_key, retiring_key_version";

/// Most agents [`KeyStore::finish_root_rotation`] names as missing at once.
const MISSING_PAGE: i64 = 1000;

#[async_trait::async_trait]
impl KeyStore for SqliteStore {
    #[tracing::instrument(skip_all)]
    async fn root_key(&self) -> Result<Option<RootKeyRecord>, StoreError> {
        let row: Option<RootKeyRow> = sqlx::query_as(&format!(
            "SELECT {} FROM root_key WHERE id = 1",
            root_key_columns("")
        ))
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
            "INSERT INTO root_key (id, key_check, kdf_salt, kdf_m_cost, kdf_t_cost, kdf_p_cost,
                 wrapped_control_key, created_at)
             VALUES (1, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&record.key_check)
        .bind(salt)
        .bind(params.map(|p| i64::from(p.m_cost)))
        .bind(params.map(|p| i64::from(p.t_cost)))
        .bind(params.map(|p| i64::from(p.p_cost)))
        .bind(&record.wrapped_control_key)
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
        key_check: &[u8],
    ) -> Result<AgentRecord, StoreError> {
        // Insert unless present, then read: a concurrent creator's key wins, as in PostgreSQL.
        // One statement, so under SQLite's single writer the root key cannot change between
        // the check and the insert.
        sqlx::query(
            "INSERT INTO agents (issuer, agent_id, namespace, wrapped_key, key_version, created_at)
             SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS
                 (SELECT 1 FROM root_key WHERE id = 1 AND key_check = ?)
               AND NOT EXISTS
                 (SELECT 1 FROM shredded_agents WHERE issuer = ? AND agent_id = ?)
             ON CONFLICT (issuer, agent_id) DO NOTHING",
        )
        .bind(issuer.as_str())
        .bind(agent.as_str())
        .bind(namespace_for(issuer, agent))
        .bind(wrapped_key)
        .bind(i64::from(key_version))
        .bind(now_ms())
        .bind(key_check)
        .bind(issuer.as_str())
        .bind(agent.as_str())
        .execute(&self.pool)
        .await
        .map_err(e)?;
        // Absent: it was not there and the root key changed, or it was shredded (a present
        // agent is answered as in PostgreSQL, whatever the root).
        if let Some(record) = self.agent(issuer, agent).await? {
            return Ok(record);
        }
        let shredded: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM shredded_agents WHERE issuer = ? AND agent_id = ?")
                .bind(issuer.as_str())
                .bind(agent.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(e)?;
        Err(if shredded.is_some() {
            StoreError::AgentShredded
        } else {
            StoreError::RootKeyChanged
        })
    }

    #[tracing::instrument(skip_all)]
    async fn shred_agent(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
        plan: ShredPlan,
    ) -> Result<Shred, StoreError> {
        let mut tx = self.pool.begin().await.map_err(e)?;
        // Take SQLite's write lock first (an update that changes nothing), so nothing below can
        // change before the commit.
        sqlx::query("UPDATE root_key SET id = id WHERE id = 1")
            .execute(&mut *tx)
            .await
            .map_err(e)?;
        let namespace: Option<String> =
            sqlx::query_scalar("SELECT namespace FROM agents WHERE issuer = ? AND agent_id = ?")
                .bind(issuer.as_str())
                .bind(agent.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(e)?;
        let Some(namespace) = namespace else {
            return Ok(Shred::NotRegistered);
        };
        let (credentials, revocations, flows, audit_records): (i64, i64, i64, i64) =
            sqlx::query_as(
                "SELECT (SELECT count(*) FROM credentials WHERE namespace = ?1),
                        (SELECT count(*) FROM revocation_outbox WHERE namespace = ?1),
                        (SELECT count(*) FROM authorization_flows
                         WHERE issuer = ?2 AND agent_id = ?3),
                        (SELECT count(*) FROM audit_log WHERE chain = ?1)",
            )
            .bind(&namespace)
            .bind(issuer.as_str())
            .bind(agent.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(e)?;
        let counts = ShredCounts {
            credentials: credentials.max(0) as u64,
            revocations: revocations.max(0) as u64,
            flows: flows.max(0) as u64,
            audit_records: audit_records.max(0) as u64,
        };
        if plan.dry_run {
            return Ok(Shred::WouldShred(counts));
        }
        if counts.revocations > 0 && !plan.abandon_revocations {
            return Ok(Shred::RevocationsPending(counts));
        }
        for statement in [
            "DELETE FROM credentials WHERE namespace = ?",
            "DELETE FROM revocation_outbox WHERE namespace = ?",
            "DELETE FROM audit_log WHERE chain = ?",
            "DELETE FROM audit_heads WHERE chain = ?",
        ] {
            sqlx::query(statement)
                .bind(&namespace)
                .execute(&mut *tx)
                .await
                .map_err(e)?;
        }
        for statement in [
            "DELETE FROM authorization_flows WHERE issuer = ? AND agent_id = ?",
            "DELETE FROM agents WHERE issuer = ? AND agent_id = ?",
        ] {
            sqlx::query(statement)
                .bind(issuer.as_str())
                .bind(agent.as_str())
                .execute(&mut *tx)
                .await
                .map_err(e)?;
        }
        sqlx::query(
            "INSERT INTO shredded_agents (issuer, agent_id, namespace, shredded_at)
             VALUES (?, ?, ?, ?) ON CONFLICT (issuer, agent_id) DO NOTHING",
        )
        .bind(issuer.as_str())
        .bind(agent.as_str())
        .bind(&namespace)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        tracing::info!(namespace = %namespace, "agent shredded");
        Ok(Shred::Shredded(counts))
    }

    #[tracing::instrument(skip_all)]
    async fn begin_root_rotation(&self, next: &NextRoot) -> Result<RootKeyRecord, StoreError> {
        let (salt, params) = match &next.kdf {
            Some((salt, p)) => (Some(salt.clone()), Some(*p)),
            None => (None, None),
        };
        // The write lock first (an update that changes nothing): an agent key rotation starts
        // under the same lock, so every one that started is seen below and none starts before
        // this commits. The two kinds of rotation exclude each other, so a retiring agent key
        // is always wrapped by the current root.
        let mut tx = self.pool.begin().await.map_err(e)?;
        sqlx::query("UPDATE root_key SET id = id WHERE id = 1")
            .execute(&mut *tx)
            .await
            .map_err(e)?;
        let rotating: Option<String> = sqlx::query_scalar(
            "SELECT agent_id FROM agents WHERE retiring_key_version IS NOT NULL LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await
        .map_err(e)?;
        if let Some(agent) = rotating {
            return Err(StoreError::KeyRotationInProgress(format!(
                "an agent key rotation is in progress (agent {agent}); finish it with \
                 rotate-agent-key first"
            )));
        }
        sqlx::query(
            "UPDATE root_key SET next_key_check = ?, next_kdf_salt = ?, next_kdf_m_cost = ?,
                 next_kdf_t_cost = ?, next_kdf_p_cost = ?, next_wrapped_control_key = ?
             WHERE id = 1 AND next_key_check IS NULL",
        )
        .bind(&next.key_check)
        .bind(salt)
        .bind(params.map(|p| i64::from(p.m_cost)))
        .bind(params.map(|p| i64::from(p.t_cost)))
        .bind(params.map(|p| i64::from(p.p_cost)))
        .bind(&next.wrapped_control_key)
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        let row: Option<RootKeyRow> = sqlx::query_as(&format!(
            "SELECT {} FROM root_key WHERE id = 1",
            root_key_columns("")
        ))
        .fetch_optional(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        row.map(RootKeyRecord::try_from)
            .transpose()?
            .ok_or_else(|| StoreError::Corrupt("root key row vanished".into()))
    }

    #[tracing::instrument(skip_all)]
    async fn abort_root_rotation(&self) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(e)?;
        let done = sqlx::query(
            "UPDATE root_key SET next_key_check = NULL, next_kdf_salt = NULL,
                 next_kdf_m_cost = NULL, next_kdf_t_cost = NULL, next_kdf_p_cost = NULL,
                 next_wrapped_control_key = NULL
             WHERE id = 1 AND next_key_check IS NOT NULL",
        )
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        sqlx::query("UPDATE agents SET next_wrapped_key = NULL WHERE next_wrapped_key IS NOT NULL")
            .execute(&mut *tx)
            .await
            .map_err(e)?;
        tx.commit().await.map_err(e)?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(skip_all)]
    async fn agents_to_rewrap(&self, limit: u32) -> Result<Vec<AgentRecord>, StoreError> {
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents
             WHERE next_wrapped_key IS NULL ORDER BY namespace LIMIT ?"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        all(rows)
    }

    #[tracing::instrument(skip_all)]
    async fn set_next_wrap(
        &self,
        record: &AgentRecord,
        next_wrapped_key: &[u8],
        next_key_check: &[u8],
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE agents SET next_wrapped_key = ?
             WHERE namespace = ? AND wrapped_key = ? AND key_version = ?
               AND EXISTS (SELECT 1 FROM root_key WHERE id = 1 AND next_key_check = ?)",
        )
        .bind(next_wrapped_key)
        .bind(&record.namespace)
        .bind(&record.wrapped_key)
        .bind(i64::from(record.key_version))
        .bind(next_key_check)
        .execute(&self.pool)
        .await
        .map_err(e)?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(skip_all)]
    async fn rewrap_progress(&self) -> Result<(u64, u64), StoreError> {
        let (done, total): (i64, i64) =
            sqlx::query_as("SELECT count(next_wrapped_key), count(*) FROM agents")
                .fetch_one(&self.pool)
                .await
                .map_err(e)?;
        Ok((done.max(0) as u64, total.max(0) as u64))
    }

    #[tracing::instrument(skip_all)]
    async fn finish_root_rotation(
        &self,
        next_key_check: &[u8],
    ) -> Result<RotationSwitch, StoreError> {
        // SQLite has one writer: taking the write lock first (an UPDATE that changes nothing)
        // holds off registration for the rest of the transaction.
        let mut tx = self.pool.begin().await.map_err(e)?;
        sqlx::query("UPDATE root_key SET id = id WHERE id = 1")
            .execute(&mut *tx)
            .await
            .map_err(e)?;
        let row: Option<RootKeyRow> = sqlx::query_as(&format!(
            "SELECT {} FROM root_key WHERE id = 1",
            root_key_columns("")
        ))
        .fetch_optional(&mut *tx)
        .await
        .map_err(e)?;
        let Some(record) = row.map(RootKeyRecord::try_from).transpose()? else {
            return Err(StoreError::Corrupt(
                "the vault has no root key record".into(),
            ));
        };
        let Some(next) = record.next.filter(|next| next.key_check == next_key_check) else {
            return Ok(RotationSwitch::NotPending);
        };
        let missing: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents
             WHERE next_wrapped_key IS NULL ORDER BY namespace LIMIT ?"
        ))
        .bind(MISSING_PAGE)
        .fetch_all(&mut *tx)
        .await
        .map_err(e)?;
        if !missing.is_empty() {
            return Ok(RotationSwitch::Missing(all(missing)?));
        }
        let moved = sqlx::query(
            "UPDATE agents SET wrapped_key = next_wrapped_key, next_wrapped_key = NULL",
        )
        .execute(&mut *tx)
        .await
        .map_err(e)?
        .rows_affected();
        let (salt, params) = match next.kdf {
            Some((salt, p)) => (Some(salt), Some(p)),
            None => (None, None),
        };
        sqlx::query(
            "UPDATE root_key SET key_check = next_key_check, kdf_salt = ?, kdf_m_cost = ?,
                 kdf_t_cost = ?, kdf_p_cost = ?, wrapped_control_key = next_wrapped_control_key,
                 next_key_check = NULL, next_kdf_salt = NULL, next_kdf_m_cost = NULL,
                 next_kdf_t_cost = NULL, next_kdf_p_cost = NULL, next_wrapped_control_key = NULL
             WHERE id = 1",
        )
        .bind(salt)
        .bind(params.map(|p| i64::from(p.m_cost)))
        .bind(params.map(|p| i64::from(p.t_cost)))
        .bind(params.map(|p| i64::from(p.p_cost)))
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        Ok(RotationSwitch::Done { agents: moved })
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
