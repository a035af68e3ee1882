//! The root key record and the agent registry in the control schema.

use sqlx::{Executor as _, FromRow as _, Row as _};

use super::schema::latest_agent_version;
use super::{PgStore, agent_lock_key, e, namespace_for, quoted};
use crate::ids::{AgentId, IssuerId};
use crate::store::rows::{AgentRow, LegacyAgentRow, RootKeyRow, all, root_key_columns};
use crate::store::{
    AgentRecord, KeyStore, NextRoot, RootKeyRecord, RotationSwitch, Shred, ShredCounts, ShredPlan,
    StoreError,
};

/// The registry columns as [`AgentRow`] names them.
pub(super) const AGENT_COLUMNS: &str = "issuer, agent_id, schema_name AS namespace, wrapped_key, \
     key_version::int8 AS key_version, next_wrapped_key, retiring_wrapped_key, \
     retiring_key_version::int8 AS retiring_key_version";

/// Most agents [`KeyStore::finish_root_rotation`] names as missing at once.
const MISSING_PAGE: i64 = 1000;

/// The SQLSTATE `vault.create_agent` raises when the caller's root key is not the current one.
const ROOT_KEY_CHANGED: &str = "55000";
/// SQLSTATE `vault.create_agent` raises for a shredded identity.
const AGENT_SHREDDED: &str = "V0001";

/// Reads the root key record through `conn`.
async fn root_key_on(
    conn: &mut sqlx::PgConnection,
    lock: &str,
) -> Result<Option<RootKeyRecord>, StoreError> {
    let row: Option<RootKeyRow> = sqlx::query_as(&format!(
        "SELECT {} FROM vault.root_key WHERE id = 1 {lock}",
        root_key_columns("::int8")
    ))
    .fetch_optional(conn)
    .await
    .map_err(e)?;
    row.map(RootKeyRecord::try_from).transpose()
}

impl PgStore {
    /// Registers the agent (see [`KeyStore::create_agent`]), taking a spare schema when one is
    /// ready.
    async fn register_agent(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
        wrapped_key: &[u8],
        key_version: u32,
        key_check: &[u8],
    ) -> Result<AgentRecord, StoreError> {
        let fenced = |err: sqlx::Error| match &err {
            sqlx::Error::Database(db) if db.code().as_deref() == Some(ROOT_KEY_CHANGED) => {
                StoreError::RootKeyChanged
            }
            sqlx::Error::Database(db) if db.code().as_deref() == Some(AGENT_SHREDDED) => {
                StoreError::AgentShredded
            }
            _ => e(err),
        };
        if self.agent_roles {
            // The serving role has no DDL right: the owner's SECURITY DEFINER function creates
            // the schema and its role, or returns the agent a concurrent call created.
            let row: AgentRow = sqlx::query_as(
                "SELECT out_issuer AS issuer, out_agent_id AS agent_id,
                        out_schema_name AS namespace, out_wrapped_key AS wrapped_key,
                        out_key_version::int8 AS key_version, NULL::bytea AS next_wrapped_key,
                        NULL::bytea AS retiring_wrapped_key, NULL::int8 AS retiring_key_version
                 FROM vault.create_agent($1, $2, $3, $4, $5)",
            )
            .bind(issuer.as_str())
            .bind(agent.as_str())
            .bind(wrapped_key)
            .bind(key_version as i32)
            .bind(key_check)
            .fetch_one(&self.pool)
            .await
            .map_err(fenced)?;
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
        let shredded: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM vault.shredded_agents WHERE issuer = $1 AND agent_id = $2",
        )
        .bind(issuer.as_str())
        .bind(agent.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(e)?;
        if shredded.is_some() {
            return Err(StoreError::AgentShredded);
        }
        // As vault.create_agent does: only under the current root, which stays current until
        // this commits (a rotation's switch locks the row FOR UPDATE).
        let current: Option<i16> = sqlx::query_scalar(
            "SELECT id FROM vault.root_key WHERE id = 1 AND key_check = $1 FOR SHARE",
        )
        .bind(key_check)
        .fetch_optional(&mut *tx)
        .await
        .map_err(e)?;
        if current.is_none() {
            return Err(StoreError::RootKeyChanged);
        }
        // A spare schema, made ahead at the latest version (control migration 0012), when one
        // is ready, recorded at the version it is at; else the agent's own, made here.
        let spare: Option<(String, i32)> =
            sqlx::query_as("SELECT schema_name, schema_version FROM vault.take_spare_schema()")
                .fetch_optional(&mut *tx)
                .await
                .map_err(e)?;
        let (namespace, version) = match spare {
            Some(spare) => spare,
            None => {
                let namespace = namespace_for(issuer, agent);
                let create = format!("CREATE SCHEMA {}", quoted(&namespace)?);
                tx.execute(sqlx::raw_sql(&create)).await.map_err(e)?;
                let version = Self::apply_agent_migrations(&mut tx, &namespace, 0).await?;
                (namespace, version)
            }
        };
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
    async fn agent_schema_upgraded(&self, namespace: &str, version: i32) -> Result<(), StoreError> {
        if version >= latest_agent_version() {
            return Ok(());
        }
        let to: i32 = sqlx::query_scalar("SELECT vault.upgrade_agent_schema($1)")
            .bind(namespace)
            .fetch_one(&self.pool)
            .await
            .map_err(e)?;
        if to < latest_agent_version() {
            return Err(StoreError::Corrupt(format!(
                "agent schema {namespace} is at version {to} after its upgrade, behind this vault's {}: run `vault-server migrate`",
                latest_agent_version()
            )));
        }
        tracing::info!(schema = %namespace, from = version, to, "upgraded agent schema on first use");
        Ok(())
    }
}

#[async_trait::async_trait]
impl KeyStore for PgStore {
    #[tracing::instrument(skip_all)]
    async fn root_key(&self) -> Result<Option<RootKeyRecord>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(e)?;
        root_key_on(&mut conn, "").await
    }

    #[tracing::instrument(skip_all)]
    async fn insert_root_key(&self, record: &RootKeyRecord) -> Result<(), StoreError> {
        let (salt, params) = match &record.kdf {
            Some((salt, p)) => (Some(salt.clone()), Some(*p)),
            None => (None, None),
        };
        sqlx::query(
            "INSERT INTO vault.root_key
                 (id, key_check, kdf_salt, kdf_m_cost, kdf_t_cost, kdf_p_cost, wrapped_control_key)
             VALUES (1, $1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&record.key_check)
        .bind(salt)
        .bind(params.map(|p| p.m_cost as i32))
        .bind(params.map(|p| p.t_cost as i32))
        .bind(params.map(|p| p.p_cost as i32))
        .bind(&record.wrapped_control_key)
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
        let row = sqlx::query(&format!(
            "SELECT {AGENT_COLUMNS}, schema_version FROM vault.agents
             WHERE issuer = $1 AND agent_id = $2"
        ))
        .bind(issuer.as_str())
        .bind(agent.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let record = AgentRecord::try_from(AgentRow::from_row(&row).map_err(e)?)?;
        // Upgraded before its first use by this process (each process reads an agent's entry
        // once, then caches it): per-agent migrations run online, agent by agent (control
        // migration 0013).
        let version: i32 = row.try_get("schema_version").map_err(e)?;
        self.agent_schema_upgraded(&record.namespace, version)
            .await?;
        Ok(Some(record))
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
        let record = self
            .register_agent(issuer, agent, wrapped_key, key_version, key_check)
            .await;
        // A spare may have been taken: the spare-schema job looks again.
        self.spare_taken.notify_one();
        if let Ok(made) = &record
            && made.wrapped_key == wrapped_key
        {
            // This call made the agent (its key is the one given): its chain is empty, so its
            // first record (the key's making) needs no read of the head. Only a guess, checked
            // by the append like every other.
            self.heads.set(&made.namespace, crate::audit::Anchor::START);
        }
        record
    }

    #[tracing::instrument(skip_all)]
    async fn shred_agent(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
        plan: ShredPlan,
    ) -> Result<Shred, StoreError> {
        let mut tx = self.pool.begin().await.map_err(e)?;
        // The registration lock, then the row: no creation or key change of this agent runs
        // alongside.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(agent_lock_key(issuer, agent))
            .execute(&mut *tx)
            .await
            .map_err(e)?;
        let namespace: Option<String> = sqlx::query_scalar(
            "SELECT schema_name FROM vault.agents WHERE issuer = $1 AND agent_id = $2 FOR UPDATE",
        )
        .bind(issuer.as_str())
        .bind(agent.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(e)?;
        let Some(namespace) = namespace else {
            return Ok(Shred::NotRegistered);
        };
        let schema = quoted(&namespace)?;
        let (credentials, revocations, audit_records): (i64, i64, i64) = sqlx::query_as(&format!(
            "SELECT (SELECT count(*) FROM {schema}.credentials),
                        (SELECT count(*) FROM {schema}.revocation_outbox),
                        (SELECT count(*) FROM {schema}.audit_log)"
        ))
        .fetch_one(&mut *tx)
        .await
        .map_err(e)?;
        let flows: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM vault.authorization_flows WHERE issuer = $1 AND agent_id = $2",
        )
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
        sqlx::query("DELETE FROM vault.authorization_flows WHERE issuer = $1 AND agent_id = $2")
            .bind(issuer.as_str())
            .bind(agent.as_str())
            .execute(&mut *tx)
            .await
            .map_err(e)?;
        sqlx::query("DELETE FROM vault.agents WHERE issuer = $1 AND agent_id = $2")
            .bind(issuer.as_str())
            .bind(agent.as_str())
            .execute(&mut *tx)
            .await
            .map_err(e)?;
        sqlx::query(
            "INSERT INTO vault.shredded_agents (issuer, agent_id, schema_name) VALUES ($1, $2, $3)
             ON CONFLICT (issuer, agent_id) DO NOTHING",
        )
        .bind(issuer.as_str())
        .bind(agent.as_str())
        .bind(&namespace)
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        tx.execute(sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE")))
            .await
            .map_err(e)?;
        tx.commit().await.map_err(e)?;
        // The agent's role, after the commit: a serving connection may still have it set (the
        // read lanes SET ROLE), and a role that fails to go is only a name with no rights left.
        let role: String = sqlx::query_scalar("SELECT vault.agent_role($1)")
            .bind(&namespace)
            .fetch_one(&self.pool)
            .await
            .map_err(e)?;
        let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_roles WHERE rolname = $1")
            .bind(&role)
            .fetch_optional(&self.pool)
            .await
            .map_err(e)?;
        if exists.is_some() {
            let drop = format!("DROP ROLE \"{}\"", role.replace('"', "\"\""));
            if let Err(err) = self.pool.execute(sqlx::raw_sql(&drop)).await {
                tracing::warn!(role = %role, error = %err, "the shredded agent's role was left");
            }
        }
        tracing::info!(schema = %namespace, "agent shredded");
        Ok(Shred::Shredded(counts))
    }

    #[tracing::instrument(skip_all)]
    async fn begin_root_rotation(&self, next: &NextRoot) -> Result<RootKeyRecord, StoreError> {
        let (salt, params) = match &next.kdf {
            Some((salt, p)) => (Some(salt.clone()), Some(*p)),
            None => (None, None),
        };
        let mut tx = self.pool.begin().await.map_err(e)?;
        // The root key row first: an agent key rotation starts only under it FOR SHARE, so
        // every one that started is visible below, and none starts until this commits.
        root_key_on(&mut tx, "FOR UPDATE").await?;
        let rotating: Option<String> = sqlx::query_scalar(
            "SELECT agent_id FROM vault.agents WHERE retiring_key_version IS NOT NULL LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await
        .map_err(e)?;
        if let Some(agent) = rotating {
            return Err(StoreError::KeyRotationInProgress(format!(
                "an agent key rotation is in progress (agent {agent}); finish it with rotate-agent-key first"
            )));
        }
        sqlx::query(
            "UPDATE vault.root_key SET next_key_check = $1, next_kdf_salt = $2,
                 next_kdf_m_cost = $3, next_kdf_t_cost = $4, next_kdf_p_cost = $5,
                 next_wrapped_control_key = $6
             WHERE id = 1 AND next_key_check IS NULL",
        )
        .bind(&next.key_check)
        .bind(salt)
        .bind(params.map(|p| p.m_cost as i32))
        .bind(params.map(|p| p.t_cost as i32))
        .bind(params.map(|p| p.p_cost as i32))
        .bind(&next.wrapped_control_key)
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        let record = root_key_on(&mut tx, "")
            .await?
            .ok_or_else(|| StoreError::Corrupt("root key row vanished".into()))?;
        tx.commit().await.map_err(e)?;
        Ok(record)
    }

    #[tracing::instrument(skip_all)]
    async fn abort_root_rotation(&self) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(e)?;
        let done = sqlx::query(
            "UPDATE vault.root_key SET next_key_check = NULL, next_kdf_salt = NULL,
                 next_kdf_m_cost = NULL, next_kdf_t_cost = NULL, next_kdf_p_cost = NULL,
                 next_wrapped_control_key = NULL
             WHERE id = 1 AND next_key_check IS NOT NULL",
        )
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        sqlx::query(
            "UPDATE vault.agents SET next_wrapped_key = NULL WHERE next_wrapped_key IS NOT NULL",
        )
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(skip_all)]
    async fn agents_to_rewrap(&self, limit: u32) -> Result<Vec<AgentRecord>, StoreError> {
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM vault.agents
             WHERE next_wrapped_key IS NULL ORDER BY schema_name LIMIT $1"
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
            "UPDATE vault.agents SET next_wrapped_key = $1
             WHERE schema_name = $2 AND wrapped_key = $3 AND key_version = $4
               AND EXISTS (SELECT 1 FROM vault.root_key WHERE id = 1 AND next_key_check = $5)",
        )
        .bind(next_wrapped_key)
        .bind(&record.namespace)
        .bind(&record.wrapped_key)
        .bind(record.key_version as i32)
        .bind(next_key_check)
        .execute(&self.pool)
        .await
        .map_err(e)?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(skip_all)]
    async fn rewrap_progress(&self) -> Result<(u64, u64), StoreError> {
        let (done, total): (i64, i64) =
            sqlx::query_as("SELECT count(next_wrapped_key), count(*) FROM vault.agents")
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
        let mut tx = self.pool.begin().await.map_err(e)?;
        // Registration holds the root key row FOR SHARE until it commits: from here on none
        // starts, and every one that did is visible below.
        let Some(record) = root_key_on(&mut tx, "FOR UPDATE").await? else {
            return Err(StoreError::Corrupt(
                "the vault has no root key record".into(),
            ));
        };
        let Some(next) = record.next.filter(|next| next.key_check == next_key_check) else {
            return Ok(RotationSwitch::NotPending);
        };
        let missing: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM vault.agents
             WHERE next_wrapped_key IS NULL ORDER BY schema_name LIMIT $1"
        ))
        .bind(MISSING_PAGE)
        .fetch_all(&mut *tx)
        .await
        .map_err(e)?;
        if !missing.is_empty() {
            return Ok(RotationSwitch::Missing(all(missing)?));
        }
        let moved = sqlx::query(
            "UPDATE vault.agents SET wrapped_key = next_wrapped_key, next_wrapped_key = NULL",
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
            "UPDATE vault.root_key SET key_check = next_key_check, kdf_salt = $1,
                 kdf_m_cost = $2, kdf_t_cost = $3, kdf_p_cost = $4,
                 wrapped_control_key = next_wrapped_control_key,
                 next_key_check = NULL, next_kdf_salt = NULL, next_kdf_m_cost = NULL,
                 next_kdf_t_cost = NULL, next_kdf_p_cost = NULL, next_wrapped_control_key = NULL
             WHERE id = 1",
        )
        .bind(salt)
        .bind(params.map(|p| p.m_cost as i32))
        .bind(params.map(|p| p.t_cost as i32))
        .bind(params.map(|p| p.p_cost as i32))
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
