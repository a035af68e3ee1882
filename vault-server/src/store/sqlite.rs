//! The embedded store: SQLite through sqlx, one file (or memory), for the zero-setup default
//! and single-node installs. Same trait, same envelope, same fencing rules as PostgreSQL; the
//! conformance tests run against both.
//!
//! SQLite serialises writers, so the conditional UPDATEs that implement leases and
//! compare-and-swap are atomic without row locks. Times are unix milliseconds from this
//! process's clock: the embedded store has one writer process by design.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};

use super::{
    AgentRecord, CredentialState, NewCredential, OutboxEntry, RefreshLease, RootKeyRecord, Store,
    StoreError, StoredCredential, SweepOutcome, Upserted, generation_of, key_version_of,
    namespace_for,
};
use crate::crypto::{KdfParams, SealedCredential};
use crate::ids::{AgentId, Generation, IssuerId, Tool, UserId};

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

fn e(err: sqlx::Error) -> StoreError {
    StoreError::from_sqlx(err)
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn from_ms(value: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(value).unwrap_or_default()
}

/// Makes `path` a file only its owner can read: missing directories are created 0700, the file
/// is created (or tightened to) 0600, and so are its `-wal` and `-shm` companions when present.
/// SQLite creates those companions with the database file's mode, so they start private too.
fn private_file(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        for suffix in ["", "-wal", "-shm"] {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            let file = Path::new(&name);
            if file.exists() {
                std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))?;
            }
        }
    }
    #[cfg(not(unix))]
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    Ok(())
}

/// SQLite-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`.
    pub async fn open_file(path: &Path, max_connections: u32) -> Result<Self, StoreError> {
        private_file(path).map_err(|err| StoreError::Database(sqlx::Error::Io(err)))?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options)
            .await
            .map_err(e)?;
        Ok(Self { pool })
    }

    /// A private in-memory database: one connection that is never closed, since every new
    /// connection to `:memory:` would be a different, empty database.
    pub async fn open_memory() -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:").map_err(e)?;
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(e)?;
        Ok(Self { pool })
    }

    fn agent_from_row(row: &SqliteRow) -> Result<AgentRecord, StoreError> {
        let id: String = row.try_get("agent_id").map_err(e)?;
        let issuer: String = row.try_get("issuer").map_err(e)?;
        Ok(AgentRecord {
            issuer: IssuerId::parse(issuer)
                .map_err(|err| StoreError::Corrupt(format!("issuer in registry: {err}")))?,
            agent: AgentId::parse(id)
                .map_err(|err| StoreError::Corrupt(format!("agent id in registry: {err}")))?,
            namespace: row.try_get("namespace").map_err(e)?,
            wrapped_key: row.try_get("wrapped_key").map_err(e)?,
            key_version: key_version_of(row.try_get::<i64, _>("key_version").map_err(e)?)?,
        })
    }

    fn outbox_entry(row: &SqliteRow) -> Result<OutboxEntry, StoreError> {
        let user: String = row.try_get("user_id").map_err(e)?;
        let tool: String = row.try_get("tool").map_err(e)?;
        Ok(OutboxEntry {
            id: row.try_get("id").map_err(e)?,
            user: UserId::parse(user)
                .map_err(|err| StoreError::Corrupt(format!("outbox user: {err}")))?,
            tool: Tool::parse(tool)
                .map_err(|err| StoreError::Corrupt(format!("outbox tool: {err}")))?,
            generation: generation_of(row.try_get("generation").map_err(e)?)?,
            sealed: SealedCredential {
                wrapped_data_key: row.try_get("wrapped_data_key").map_err(e)?,
                ciphertext: row.try_get("ciphertext").map_err(e)?,
                key_version: key_version_of(row.try_get::<i64, _>("key_version").map_err(e)?)?,
            },
            attempts: row.try_get("attempts").map_err(e)?,
            created_at: from_ms(row.try_get("created_at").map_err(e)?),
        })
    }
}

const AGENT_COLUMNS: &str = "issuer, agent_id, namespace, wrapped_key, key_version";
const OUTBOX_COLUMNS: &str = "id, user_id, tool, generation, key_version, wrapped_data_key, ciphertext, attempts, created_at";

#[async_trait::async_trait]
impl Store for SqliteStore {
    #[tracing::instrument(skip_all, err)]
    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATIONS.run(&self.pool).await?;
        Ok(())
    }

    #[tracing::instrument(skip_all, err)]
    async fn root_key(&self) -> Result<Option<RootKeyRecord>, StoreError> {
        let row = sqlx::query("SELECT key_check, kdf_salt, kdf_m_cost, kdf_t_cost, kdf_p_cost FROM root_key WHERE id = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(e)?;
        let Some(row) = row else { return Ok(None) };
        let salt: Option<Vec<u8>> = row.try_get("kdf_salt").map_err(e)?;
        let cost = |name: &str| -> Result<u32, StoreError> {
            let v: Option<i64> = row.try_get(name).map_err(e)?;
            v.and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| StoreError::Corrupt(format!("root_key.{name} missing")))
        };
        let kdf = match salt {
            None => None,
            Some(salt) => Some((
                salt,
                KdfParams {
                    m_cost: cost("kdf_m_cost")?,
                    t_cost: cost("kdf_t_cost")?,
                    p_cost: cost("kdf_p_cost")?,
                },
            )),
        };
        Ok(Some(RootKeyRecord {
            key_check: row.try_get("key_check").map_err(e)?,
            kdf,
        }))
    }

    #[tracing::instrument(skip_all, err)]
    async fn init_root_key(&self, record: &RootKeyRecord) -> Result<RootKeyRecord, StoreError> {
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
        self.root_key()
            .await?
            .ok_or_else(|| StoreError::Corrupt("root key row vanished".into()))
    }

    #[tracing::instrument(skip_all, err)]
    async fn agent(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
    ) -> Result<Option<AgentRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE issuer = ? AND agent_id = ?"
        ))
        .bind(issuer.as_str())
        .bind(agent.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        row.as_ref().map(Self::agent_from_row).transpose()
    }

    #[tracing::instrument(skip_all, err)]
    async fn create_agent(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
        wrapped_key: &[u8],
        key_version: u32,
    ) -> Result<AgentRecord, StoreError> {
        // INSERT OR IGNORE then read: a concurrent creator's key wins, as in PostgreSQL.
        sqlx::query("INSERT INTO agents (issuer, agent_id, namespace, wrapped_key, key_version, created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (issuer, agent_id) DO NOTHING")
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

    #[tracing::instrument(skip_all, err)]
    async fn legacy_agents(&self) -> Result<Vec<(AgentId, u32, Vec<u8>)>, StoreError> {
        let rows =
            sqlx::query("SELECT agent_id, key_version, wrapped_key FROM agents WHERE issuer = ''")
                .fetch_all(&self.pool)
                .await
                .map_err(e)?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("agent_id").map_err(e)?;
                Ok((
                    AgentId::parse(id).map_err(|err| {
                        StoreError::Corrupt(format!("agent id in registry: {err}"))
                    })?,
                    key_version_of(row.try_get::<i64, _>("key_version").map_err(e)?)?,
                    row.try_get("wrapped_key").map_err(e)?,
                ))
            })
            .collect()
    }

    #[tracing::instrument(skip_all, err)]
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

    #[tracing::instrument(skip_all, err)]
    async fn next_generation(&self, agent: &AgentRecord) -> Result<Generation, StoreError> {
        let value: i64 = sqlx::query_scalar(
            "UPDATE agents SET next_generation = next_generation + 1 WHERE namespace = ? RETURNING next_generation - 1",
        )
        .bind(&agent.namespace)
        .fetch_one(&self.pool)
        .await
        .map_err(e)?;
        generation_of(value)
    }

    #[tracing::instrument(skip_all, err)]
    async fn upsert(
        &self,
        agent: &AgentRecord,
        new: NewCredential<'_>,
    ) -> Result<Upserted, StoreError> {
        let now = now_ms();
        let ttl_expires_at = now.saturating_add(ms(Duration::from_secs(new.ttl_seconds)));
        let written: Option<i64> = sqlx::query_scalar(
            "INSERT INTO credentials AS c
                 (namespace, user_id, tool, generation, state, key_version, wrapped_data_key, ciphertext,
                  access_expires_at, ttl_expires_at, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?7, ?8, ?9, ?10, ?10)
             ON CONFLICT (namespace, user_id, tool) DO UPDATE SET
                 generation = excluded.generation, state = 0, key_version = excluded.key_version,
                 wrapped_data_key = excluded.wrapped_data_key, ciphertext = excluded.ciphertext,
                 access_expires_at = excluded.access_expires_at, ttl_expires_at = excluded.ttl_expires_at,
                 refresh_lease_owner = NULL, refresh_lease_until = NULL, refresh_failures = 0,
                 refresh_not_before = NULL, updated_at = excluded.updated_at
             WHERE c.generation < excluded.generation
             RETURNING ttl_expires_at",
        )
        .bind(&agent.namespace)
        .bind(new.user.as_str())
        .bind(new.tool.as_str())
        .bind(new.generation.get() as i64)
        .bind(i64::from(new.sealed.key_version))
        .bind(&new.sealed.wrapped_data_key)
        .bind(&new.sealed.ciphertext)
        .bind(new.access_expires_at.map(|t| t.timestamp_millis()))
        .bind(ttl_expires_at)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        Ok(match written {
            Some(at) => Upserted::Written {
                ttl_expires_at: from_ms(at),
            },
            None => Upserted::Superseded,
        })
    }

    #[tracing::instrument(skip_all, err)]
    async fn load(
        &self,
        agent: &AgentRecord,
        user: &UserId,
        tool: &Tool,
    ) -> Result<Option<StoredCredential>, StoreError> {
        let row = sqlx::query(
            "SELECT generation, state, key_version, wrapped_data_key, ciphertext FROM credentials
             WHERE namespace = ? AND user_id = ? AND tool = ? AND ttl_expires_at > ?",
        )
        .bind(&agent.namespace)
        .bind(user.as_str())
        .bind(tool.as_str())
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        let Some(row) = row else { return Ok(None) };
        let state: i64 = row.try_get("state").map_err(e)?;
        Ok(Some(StoredCredential {
            generation: generation_of(row.try_get("generation").map_err(e)?)?,
            state: match state {
                0 => CredentialState::Active,
                1 => CredentialState::ReauthRequired,
                other => return Err(StoreError::Corrupt(format!("unknown state {other}"))),
            },
            sealed: SealedCredential {
                wrapped_data_key: row.try_get("wrapped_data_key").map_err(e)?,
                ciphertext: row.try_get("ciphertext").map_err(e)?,
                key_version: key_version_of(row.try_get::<i64, _>("key_version").map_err(e)?)?,
            },
        }))
    }

    #[tracing::instrument(skip_all, err)]
    async fn delete(
        &self,
        agent: &AgentRecord,
        user: &UserId,
        tool: Option<&Tool>,
    ) -> Result<u64, StoreError> {
        let result = sqlx::query("DELETE FROM credentials WHERE namespace = ? AND user_id = ? AND (?3 IS NULL OR tool = ?3)")
            .bind(&agent.namespace)
            .bind(user.as_str())
            .bind(tool.map(Tool::as_str))
            .execute(&self.pool)
            .await
            .map_err(e)?;
        Ok(result.rows_affected())
    }

    #[tracing::instrument(skip_all, err)]
    async fn sweep(
        &self,
        limit: u32,
        dry_run: bool,
        revoke: bool,
    ) -> Result<SweepOutcome, StoreError> {
        let now = now_ms();
        let swept = if dry_run {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM (SELECT 1 FROM credentials WHERE ttl_expires_at <= ? LIMIT ?)",
            )
            .bind(now)
            .bind(i64::from(limit))
            .fetch_one(&self.pool)
            .await
            .map_err(e)?;
            n as u64
        } else {
            // One transaction: what is queued for revocation is exactly what is deleted.
            let mut tx = self.pool.begin().await.map_err(e)?;
            if revoke {
                sqlx::query(
                    "INSERT INTO revocation_outbox
                         (namespace, user_id, tool, generation, key_version, wrapped_data_key,
                          ciphertext, created_at, next_attempt_at)
                     SELECT namespace, user_id, tool, generation, key_version, wrapped_data_key,
                            ciphertext, ?1, ?1
                     FROM credentials WHERE ttl_expires_at <= ?1
                     ORDER BY ttl_expires_at LIMIT ?2",
                )
                .bind(now)
                .bind(i64::from(limit))
                .execute(&mut *tx)
                .await
                .map_err(e)?;
            }
            let deleted = sqlx::query(
                "DELETE FROM credentials WHERE (namespace, user_id, tool) IN (
                     SELECT namespace, user_id, tool FROM credentials WHERE ttl_expires_at <= ?1
                     ORDER BY ttl_expires_at LIMIT ?2)",
            )
            .bind(now)
            .bind(i64::from(limit))
            .execute(&mut *tx)
            .await
            .map_err(e)?
            .rows_affected();
            tx.commit().await.map_err(e)?;
            deleted
        };
        Ok(SweepOutcome {
            swept,
            more: swept >= u64::from(limit),
        })
    }

    #[tracing::instrument(skip_all, err)]
    async fn try_refresh_lease(
        &self,
        agent: &AgentRecord,
        user: &UserId,
        tool: &Tool,
        generation: Generation,
        owner: uuid::Uuid,
        ttl: Duration,
    ) -> Result<RefreshLease, StoreError> {
        let now = now_ms();
        let taken = sqlx::query(
            "UPDATE credentials SET refresh_lease_owner = ?5, refresh_lease_until = ?6 + ?7
             WHERE namespace = ?1 AND user_id = ?2 AND tool = ?3 AND generation = ?4 AND state = 0
               AND ttl_expires_at > ?6
               AND (refresh_lease_until IS NULL OR refresh_lease_until <= ?6 OR refresh_lease_owner = ?5)
               AND (refresh_not_before IS NULL OR refresh_not_before <= ?6)",
        )
        .bind(&agent.namespace)
        .bind(user.as_str())
        .bind(tool.as_str())
        .bind(generation.get() as i64)
        .bind(owner.to_string())
        .bind(now)
        .bind(ms(ttl))
        .execute(&self.pool)
        .await
        .map_err(e)?
        .rows_affected();
        if taken == 1 {
            return Ok(RefreshLease::Acquired);
        }
        let row = sqlx::query(
            "SELECT generation, state, refresh_lease_until, refresh_not_before FROM credentials
             WHERE namespace = ? AND user_id = ? AND tool = ? AND ttl_expires_at > ?",
        )
        .bind(&agent.namespace)
        .bind(user.as_str())
        .bind(tool.as_str())
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        let Some(row) = row else {
            return Ok(RefreshLease::Changed);
        };
        let stored: i64 = row.try_get("generation").map_err(e)?;
        let state: i64 = row.try_get("state").map_err(e)?;
        if stored != generation.get() as i64 || state != 0 {
            return Ok(RefreshLease::Changed);
        }
        if let Some(until) = row
            .try_get::<Option<i64>, _>("refresh_not_before")
            .map_err(e)?
            .filter(|t| *t > now)
        {
            return Ok(RefreshLease::BackingOff {
                until: from_ms(until),
            });
        }
        if row
            .try_get::<Option<i64>, _>("refresh_lease_until")
            .map_err(e)?
            .is_some_and(|t| t > now)
        {
            return Ok(RefreshLease::Held);
        }
        Ok(RefreshLease::Changed)
    }

    #[tracing::instrument(skip_all, err)]
    async fn complete_refresh(
        &self,
        agent: &AgentRecord,
        old: Generation,
        new: NewCredential<'_>,
    ) -> Result<bool, StoreError> {
        let written = sqlx::query(
            "UPDATE credentials SET generation = ?5, key_version = ?6, wrapped_data_key = ?7, ciphertext = ?8,
                 access_expires_at = ?9, refresh_lease_owner = NULL, refresh_lease_until = NULL,
                 refresh_failures = 0, refresh_not_before = NULL, updated_at = ?10
             WHERE namespace = ?1 AND user_id = ?2 AND tool = ?3 AND generation = ?4",
        )
        .bind(&agent.namespace)
        .bind(new.user.as_str())
        .bind(new.tool.as_str())
        .bind(old.get() as i64)
        .bind(new.generation.get() as i64)
        .bind(i64::from(new.sealed.key_version))
        .bind(&new.sealed.wrapped_data_key)
        .bind(&new.sealed.ciphertext)
        .bind(new.access_expires_at.map(|t| t.timestamp_millis()))
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(e)?
        .rows_affected();
        Ok(written == 1)
    }

    #[tracing::instrument(skip_all, err)]
    async fn mark_reauth_required(
        &self,
        agent: &AgentRecord,
        user: &UserId,
        tool: &Tool,
        generation: Generation,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE credentials SET state = 1, refresh_lease_owner = NULL, refresh_lease_until = NULL, updated_at = ?5
             WHERE namespace = ?1 AND user_id = ?2 AND tool = ?3 AND generation = ?4",
        )
        .bind(&agent.namespace)
        .bind(user.as_str())
        .bind(tool.as_str())
        .bind(generation.get() as i64)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(e)?;
        Ok(())
    }

    #[tracing::instrument(skip_all, err)]
    async fn record_refresh_failure(
        &self,
        agent: &AgentRecord,
        user: &UserId,
        tool: &Tool,
        generation: Generation,
        retry_after: Option<Duration>,
        base: Duration,
        cap: Duration,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let failures: Option<i64> = sqlx::query_scalar(
            "SELECT refresh_failures FROM credentials WHERE namespace = ? AND user_id = ? AND tool = ? AND generation = ?",
        )
        .bind(&agent.namespace)
        .bind(user.as_str())
        .bind(tool.as_str())
        .bind(generation.get() as i64)
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        let Some(failures) = failures else {
            return Ok(None);
        };
        // The same rule as PostgreSQL: exponential from `base`, capped, Retry-After up to an hour.
        let exponential = base.saturating_mul(1u32 << failures.clamp(0, 30)).min(cap);
        let wait = exponential.max(
            retry_after
                .unwrap_or_default()
                .min(Duration::from_secs(3600)),
        );
        let until = now_ms().saturating_add(ms(wait));
        let updated = sqlx::query(
            "UPDATE credentials SET refresh_failures = refresh_failures + 1, refresh_not_before = ?5,
                 refresh_lease_owner = NULL, refresh_lease_until = NULL
             WHERE namespace = ?1 AND user_id = ?2 AND tool = ?3 AND generation = ?4",
        )
        .bind(&agent.namespace)
        .bind(user.as_str())
        .bind(tool.as_str())
        .bind(generation.get() as i64)
        .bind(until)
        .execute(&self.pool)
        .await
        .map_err(e)?
        .rows_affected();
        Ok((updated == 1).then(|| from_ms(until)))
    }

    #[tracing::instrument(skip_all, err)]
    async fn delete_into_outbox(
        &self,
        agent: &AgentRecord,
        user: &UserId,
        tool: Option<&Tool>,
        owner: uuid::Uuid,
        lease: Duration,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(e)?;
        let rows = sqlx::query(&format!(
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
        sqlx::query("DELETE FROM credentials WHERE namespace = ?1 AND user_id = ?2 AND (?3 IS NULL OR tool = ?3)")
            .bind(&agent.namespace)
            .bind(user.as_str())
            .bind(tool.map(Tool::as_str))
            .execute(&mut *tx)
            .await
            .map_err(e)?;
        tx.commit().await.map_err(e)?;
        rows.iter().map(Self::outbox_entry).collect()
    }

    #[tracing::instrument(skip_all, err)]
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
            let agent = sqlx::query(&format!(
                "SELECT {AGENT_COLUMNS} FROM agents WHERE namespace = ?"
            ))
            .bind(&namespace)
            .fetch_one(&self.pool)
            .await
            .map_err(e)?;
            claimed.push((Self::agent_from_row(&agent)?, Self::outbox_entry(row)?));
        }
        Ok(claimed)
    }

    #[tracing::instrument(skip_all, err)]
    async fn finish_outbox(&self, agent: &AgentRecord, id: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM revocation_outbox WHERE namespace = ? AND id = ?")
            .bind(&agent.namespace)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(e)?;
        Ok(())
    }

    #[tracing::instrument(skip_all, err)]
    async fn retry_outbox(
        &self,
        agent: &AgentRecord,
        id: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        let attempts: Option<i64> = sqlx::query_scalar(
            "SELECT attempts FROM revocation_outbox WHERE namespace = ? AND id = ?",
        )
        .bind(&agent.namespace)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        let Some(attempts) = attempts else {
            return Ok(());
        };
        let wait =
            Duration::from_secs(1u64 << attempts.clamp(0, 12)).min(Duration::from_secs(3600));
        sqlx::query(
            "UPDATE revocation_outbox SET attempts = attempts + 1, next_attempt_at = ?3, lease_owner = NULL,
                 lease_until = NULL, last_error = ?4 WHERE namespace = ?1 AND id = ?2",
        )
        .bind(&agent.namespace)
        .bind(id)
        .bind(now_ms().saturating_add(ms(wait)))
        .bind(error)
        .execute(&self.pool)
        .await
        .map_err(e)?;
        Ok(())
    }

    #[tracing::instrument(skip_all, err)]
    async fn try_lease(
        &self,
        name: &str,
        holder: uuid::Uuid,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let row: Option<String> = sqlx::query_scalar(
            "INSERT INTO leases AS l (name, holder, expires_at) VALUES (?1, ?2, ?3 + ?4)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
             WHERE l.expires_at <= ?3 OR l.holder = excluded.holder
             RETURNING holder",
        )
        .bind(name)
        .bind(holder.to_string())
        .bind(now)
        .bind(ms(ttl))
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        Ok(row.as_deref() == Some(holder.to_string().as_str()))
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn the_database_its_wal_and_its_directory_are_private() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("vault-data").join("nested");
        let path = dir.join("vault.db");
        let store = SqliteStore::open_file(&path, 2).await.unwrap();
        store.migrate().await.unwrap();
        assert_eq!(mode(&path), 0o600);
        for companion in ["vault.db-wal", "vault.db-shm"] {
            let file = dir.join(companion);
            assert!(file.exists(), "{companion} exists in WAL mode");
            assert_eq!(mode(&file), 0o600, "{companion}");
        }
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(dir.parent().unwrap()), 0o700);
    }

    #[tokio::test]
    async fn an_existing_world_readable_database_is_tightened() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("vault.db");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        SqliteStore::open_file(&path, 1).await.unwrap();
        assert_eq!(mode(&path), 0o600);
    }
}
