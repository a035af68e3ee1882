//! The PostgreSQL store: control schema `vault` plus one schema per agent.
//!
//! Schema names come only from [`namespace_for`] (a hash of the agent id) and are re-checked by
//! [`quoted`] before they are spliced into SQL; every value is a bind parameter.

use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor as _, Row};

use super::{
    AgentRecord, CredentialState, NewCredential, OutboxEntry, RefreshLease, RootKeyRecord, Store,
    StoreError, StoredCredential, SweepOutcome, Upserted, generation_of, key_version_of,
};
use crate::config::DatabaseSettings;
use crate::crypto::{KdfParams, SealedCredential};
use crate::ids::{AgentId, Generation, IssuerId, Tool, UserId};

static CONTROL_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/control");

/// The per-agent schema template, in order; `{schema}` is the quoted schema name.
const AGENT_MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        include_str!("../../../migrations/agent/0001_credentials.sql"),
    ),
    (
        2,
        include_str!("../../../migrations/agent/0002_refresh_and_revocation.sql"),
    ),
];

fn latest_agent_version() -> i32 {
    AGENT_MIGRATIONS.last().map_or(0, |(v, _)| *v)
}

/// Serialises migrations across replicas (an arbitrary constant: "vault" in ASCII).
const MIGRATION_LOCK: i64 = 0x0076_6175_6c74;

/// The schema of an agent: `agent_` and 40 hex digits of SHA-256 of the issuer and the id. Fits
/// PostgreSQL's 63-byte identifier limit, and no agent id can inject anything through it.
/// (Agents registered before issuers were part of the identity keep the schema they were given,
/// a hash of the id alone: the registry stores each agent's schema name.)
pub fn namespace_for(issuer: &IssuerId, agent: &AgentId) -> String {
    format!(
        "agent_{}",
        &hex::encode(identity_digest(issuer, agent))[..40]
    )
}

/// SHA-256 of the length-prefixed issuer followed by the agent id, so no two (issuer, agent)
/// pairs hash the same input.
fn identity_digest(issuer: &IssuerId, agent: &AgentId) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update((issuer.as_str().len() as u32).to_be_bytes());
    hash.update(issuer.as_str().as_bytes());
    hash.update(agent.as_str().as_bytes());
    hash.finalize().into()
}

/// The schema name quoted for SQL, after checking it is one [`namespace_for`] could have made.
fn quoted(namespace: &str) -> Result<String, StoreError> {
    let ok = namespace.len() == 46
        && namespace.starts_with("agent_")
        && namespace[6..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !ok {
        return Err(StoreError::Corrupt(format!(
            "schema name {namespace:?} is not a vault agent schema"
        )));
    }
    Ok(format!("\"{namespace}\""))
}

/// Drops a vault database and the roles it made (roles are cluster-wide and outlive the
/// database): `database_url` names the vault database, `admin` is a connection to another
/// database of the same server with the right to drop both.
pub async fn drop_database_and_roles(
    admin: &mut sqlx::PgConnection,
    database_url: &str,
    name: &str,
) -> Result<(), sqlx::Error> {
    let prefix: Option<String> = match sqlx::PgConnection::connect(database_url).await {
        Ok(mut conn) => {
            let prefix = sqlx::query_scalar("SELECT role_prefix FROM vault.instance WHERE id = 1")
                .fetch_optional(&mut conn)
                .await
                .ok()
                .flatten();
            let _ = conn.close().await;
            prefix
        }
        Err(_) => None,
    };
    let quoted_name = format!("\"{}\"", name.replace('"', "\"\""));
    admin
        .execute(format!("DROP DATABASE IF EXISTS {quoted_name} WITH (FORCE)").as_str())
        .await?;
    if let Some(prefix) = prefix {
        let roles: Vec<String> =
            sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1)")
                .bind(format!("{prefix}_"))
                .fetch_all(&mut *admin)
                .await?;
        for role in roles {
            admin
                .execute(format!("DROP ROLE IF EXISTS \"{}\"", role.replace('"', "\"\"")).as_str())
                .await?;
        }
    }
    Ok(())
}

/// A transaction-scoped advisory lock key for one agent.
fn agent_lock_key(issuer: &IssuerId, agent: &AgentId) -> i64 {
    let digest = identity_digest(issuer, agent);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

fn e(err: sqlx::Error) -> StoreError {
    StoreError::from_sqlx(err)
}

/// The registry columns [`PgStore::agent_from_row`] reads.
const AGENT_COLUMNS: &str = "issuer, agent_id, schema_name, wrapped_key, key_version";

/// The columns [`outbox_entry`] reads, in order.
const OUTBOX_COLUMNS: &str = "id, user_id, tool, generation, key_version, wrapped_data_key, ciphertext, attempts, created_at";

fn outbox_entry(row: &sqlx::postgres::PgRow) -> Result<OutboxEntry, StoreError> {
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
            key_version: key_version_of(i64::from(
                row.try_get::<i32, _>("key_version").map_err(e)?,
            ))?,
        },
        attempts: row.try_get("attempts").map_err(e)?,
        created_at: row.try_get("created_at").map_err(e)?,
    })
}

/// PostgreSQL-backed [`Store`].
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    reads: std::sync::Arc<ReadLanes>,
    /// Per-agent roles (DESIGN §4): every statement on an agent schema runs under that agent's
    /// own role, which holds rights on that schema alone.
    agent_roles: bool,
    /// This vault's role-name prefix (`vault.instance`), known once the control schema is.
    role_prefix: std::sync::Arc<std::sync::OnceLock<String>>,
    /// A login role that `migrate` makes a member of the serving group.
    serving_role: Option<String>,
}

/// Connections kept for the hot read (`load`, behind every GetToken), outside sqlx's pool.
///
/// sqlx 0.8's pool pings each connection as it comes back: a spawned task and a second round
/// trip per query (found with `strace -c` on the server under vault-bench: two sends to
/// PostgreSQL per GetToken). A single-statement read outside any transaction needs neither.
/// A fair semaphore admits at most `lanes` reads at once, in arrival order; each takes an idle
/// connection (or opens one) for the query. A read cancelled half-way drops its connection
/// instead of putting a half-used one back.
struct ReadLanes {
    options: PgConnectOptions,
    lanes: u32,
    permits: tokio::sync::Semaphore,
    /// Idle connections, each with the role it was last switched to (`SET ROLE` lasts for the
    /// session, so a connection that stays with one agent switches only once).
    idle: std::sync::Mutex<Vec<(sqlx::PgConnection, Option<String>)>>,
}

impl std::fmt::Debug for ReadLanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadLanes")
            .field("lanes", &self.lanes)
            .finish_non_exhaustive()
    }
}

impl ReadLanes {
    fn new(options: PgConnectOptions, lanes: u32) -> Self {
        let lanes = lanes.max(1);
        Self {
            options,
            lanes,
            permits: tokio::sync::Semaphore::new(lanes as usize),
            idle: std::sync::Mutex::new(Vec::with_capacity(lanes as usize)),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<(sqlx::PgConnection, Option<String>)>> {
        // Only pushes and pops happen under the lock; a panic cannot leave the list half-done.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An idle connection, preferring one already switched to `role`.
    async fn connection(
        &self,
        role: Option<&str>,
    ) -> Result<(sqlx::PgConnection, Option<String>), sqlx::Error> {
        let idle = {
            let mut idle = self.idle();
            let same = idle.iter().rposition(|(_, r)| r.as_deref() == role);
            match same {
                Some(at) => Some(idle.swap_remove(at)),
                None => idle.pop(),
            }
        };
        match idle {
            Some(idle) => Ok(idle),
            None => Ok((sqlx::PgConnection::connect_with(&self.options).await?, None)),
        }
    }

    /// Runs `query` as `role` (a quoted role name; `None`: the login role) on an idle
    /// connection, waiting for one if all are busy.
    async fn fetch_optional(
        &self,
        role: Option<&str>,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Option<sqlx::postgres::PgRow>, sqlx::Error> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let (mut conn, mut current) = self.connection(role).await?;
        let result = async {
            if current.as_deref() != role {
                let switch = match role {
                    Some(role) => format!("SET ROLE {role}"),
                    None => "RESET ROLE".to_string(),
                };
                // Forget the old role first: if the switch fails, the connection is dropped.
                current = None;
                conn.execute(switch.as_str()).await?;
                current = role.map(str::to_string);
            }
            query.fetch_optional(&mut conn).await
        }
        .await;
        // After any error the connection is not trusted: a terminated backend, for one, first
        // answers with a database error and only then closes. Errors here are rare (the agent
        // schema is known to exist), so reconnecting costs little.
        if result.is_ok() {
            self.idle().push((conn, current));
        }
        result
    }

    /// How many statements naming an agent's credentials the idle connections keep prepared.
    async fn prepared_agent_statements(&self) -> Result<i64, sqlx::Error> {
        let _all = self
            .permits
            .acquire_many(self.lanes)
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let connections = std::mem::take(&mut *self.idle());
        let mut total = 0;
        for (mut conn, role) in connections {
            let count: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_prepared_statements \
                 WHERE statement LIKE '%.credentials%'",
            )
            .fetch_one(&mut conn)
            .await?;
            total += count;
            self.idle().push((conn, role));
        }
        Ok(total)
    }
}

impl PgStore {
    /// Connects a pool. Nothing is created until [`Store::migrate`].
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, StoreError> {
        let crate::config::Database::Postgres(url) = &settings.database else {
            return Err(StoreError::Corrupt(
                "not a PostgreSQL database setting".into(),
            ));
        };
        let options: PgConnectOptions = url
            .expose_secret()
            .parse::<PgConnectOptions>()
            .map_err(StoreError::Database)?
            .application_name("vault-server")
            .statement_cache_capacity(settings.statement_cache);
        // The connection budget is split: half for the hot read lanes, the rest for the pool
        // (writes, leases, the sweeper); each side gets at least one.
        let lanes = (settings.max_connections / 2).max(1);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections.saturating_sub(lanes).max(1))
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            // A ping per acquire doubles the round trips of a query; a dead connection
            // surfaces as a query error instead, and the pool replaces it.
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await
            .map_err(e)?;
        let reads = std::sync::Arc::new(ReadLanes::new(options, lanes));
        Ok(Self {
            pool,
            reads,
            agent_roles: settings.agent_roles,
            role_prefix: std::sync::Arc::default(),
            serving_role: settings.serving_role.clone(),
        })
    }

    /// The role of an agent schema, quoted for SQL: the vault's prefix and the schema's hash.
    fn agent_role(&self, namespace: &str) -> Result<String, StoreError> {
        quoted(namespace)?;
        let prefix = self.role_prefix.get().ok_or_else(|| {
            StoreError::Corrupt("the role prefix is read before any agent query".into())
        })?;
        Ok(format!("\"{prefix}_{}\"", &namespace["agent_".len()..]))
    }

    /// A transaction on one agent's schema. With per-agent roles it runs under that agent's
    /// role (`SET LOCAL ROLE`), so a statement in it cannot touch any other agent's tables,
    /// whatever its SQL says. The switch runs inside the transaction sqlx already tracks: if it
    /// fails, or the caller goes away, dropping the transaction rolls it back, and the
    /// connection never returns to the pool mid-transaction or under an agent's role.
    async fn agent_tx(
        &self,
        namespace: &str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(e)?;
        if self.agent_roles {
            let role = self.agent_role(namespace)?;
            tx.execute(format!("SET LOCAL ROLE {role}").as_str())
                .await
                .map_err(e)?;
        }
        Ok(tx)
    }

    /// Gives every agent schema its role (agents from before roles, and schemas just upgraded
    /// with new tables), and the configured serving login role the serving group.
    async fn migrate_roles(&self, conn: &mut sqlx::PgConnection) -> Result<(), StoreError> {
        let serving: Option<String> = sqlx::query_scalar(
            "SELECT rolname::text FROM pg_roles
             WHERE rolname = (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_serving'",
        )
        .fetch_optional(&mut *conn)
        .await
        .map_err(e)?;
        let Some(serving) = serving else {
            return Err(StoreError::Corrupt(
                "per-agent roles need the migrating role to have CREATEROLE (see docs/database-roles.md), or set VAULT_DATABASE_AGENT_ROLES=false".into(),
            ));
        };
        sqlx::query(
            "SELECT vault.grant_agent_role(schema_name) FROM vault.agents
             WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = vault.agent_role(schema_name))",
        )
        .execute(&mut *conn)
        .await
        .map_err(e)?;
        match &self.serving_role {
            Some(login) => {
                if !login
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    || login.len() > 63
                {
                    return Err(StoreError::Corrupt(format!(
                        "VAULT_DATABASE_SERVING_ROLE {login:?} is not a plain role name"
                    )));
                }
                conn.execute(format!("GRANT \"{serving}\" TO \"{login}\"").as_str())
                    .await
                    .map_err(e)?;
            }
            // One role migrates and serves: it must be able to switch to agent roles too, and
            // only a superuser may without being a member.
            None => {
                conn.execute(format!("GRANT \"{serving}\" TO CURRENT_USER").as_str())
                    .await
                    .map_err(e)?;
            }
        }
        Ok(())
    }

    /// Reads the role prefix; the control schema must be migrated.
    async fn load_role_prefix(&self) -> Result<(), StoreError> {
        if self.role_prefix.get().is_some() {
            return Ok(());
        }
        let prefix: String =
            sqlx::query_scalar("SELECT role_prefix FROM vault.instance WHERE id = 1")
                .fetch_one(&self.pool)
                .await
                .map_err(e)?;
        let _ = self.role_prefix.set(prefix);
        Ok(())
    }

    /// How many statements naming an agent's credentials the hot read connections keep prepared
    /// (a diagnostic: each agent schema has its own SQL, and all of it should stay prepared).
    pub async fn prepared_read_statements(&self) -> Result<i64, StoreError> {
        self.reads.prepared_agent_statements().await.map_err(e)
    }

    /// The underlying pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Boxed with an explicit `Send` bound: as a plain `async fn` borrowing a connection, the
    /// compiler cannot prove the callers' futures `Send` (a known higher-ranked lifetime limit).
    fn apply_agent_migrations<'a>(
        conn: &'a mut sqlx::PgConnection,
        namespace: &'a str,
        from_version: i32,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<i32, StoreError>> + Send + 'a>>
    {
        Box::pin(async move {
            let schema = quoted(namespace)?;
            let mut version = from_version;
            for (v, template) in AGENT_MIGRATIONS {
                if *v > version {
                    let sql = template.replace("{schema}", &schema);
                    conn.execute(sqlx::raw_sql(&sql)).await.map_err(e)?;
                    version = *v;
                }
            }
            Ok(version)
        })
    }

    fn agent_from_row(row: &sqlx::postgres::PgRow) -> Result<AgentRecord, StoreError> {
        let id: String = row.try_get("agent_id").map_err(e)?;
        let issuer: String = row.try_get("issuer").map_err(e)?;
        let key_version: i32 = row.try_get("key_version").map_err(e)?;
        Ok(AgentRecord {
            issuer: IssuerId::parse(issuer)
                .map_err(|err| StoreError::Corrupt(format!("issuer in registry: {err}")))?,
            agent: AgentId::parse(id)
                .map_err(|err| StoreError::Corrupt(format!("agent id in registry: {err}")))?,
            namespace: row.try_get("schema_name").map_err(e)?,
            wrapped_key: row.try_get("wrapped_key").map_err(e)?,
            key_version: u32::try_from(key_version)
                .map_err(|_| StoreError::Corrupt("negative key version".into()))?,
        })
    }
}

#[async_trait::async_trait]
impl Store for PgStore {
    #[tracing::instrument(skip_all, err)]
    async fn migrate(&self) -> Result<(), StoreError> {
        // A dedicated connection, closed afterwards, so the session-level lock can never leak
        // back into the pool if a step fails.
        let mut conn = self.pool.acquire().await.map_err(e)?.detach();
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut conn)
            .await
            .map_err(e)?;
        conn.execute(sqlx::raw_sql(
            "CREATE SCHEMA IF NOT EXISTS vault; SET search_path TO vault",
        ))
        .await
        .map_err(e)?;
        CONTROL_MIGRATIONS.run_direct(&mut conn).await?;
        conn.execute(sqlx::raw_sql("RESET search_path"))
            .await
            .map_err(e)?;
        for (version, template) in AGENT_MIGRATIONS {
            sqlx::query(
                "INSERT INTO vault.agent_migrations (version, template) VALUES ($1, $2)
                 ON CONFLICT (version) DO UPDATE SET template = EXCLUDED.template",
            )
            .bind(version)
            .bind(*template)
            .execute(&mut conn)
            .await
            .map_err(e)?;
        }

        let stale = sqlx::query(
            "SELECT schema_name, schema_version FROM vault.agents WHERE schema_version < $1",
        )
        .bind(latest_agent_version())
        .fetch_all(&mut conn)
        .await
        .map_err(e)?;
        for row in stale {
            let namespace: String = row.try_get("schema_name").map_err(e)?;
            let from: i32 = row.try_get("schema_version").map_err(e)?;
            let mut tx = conn.begin().await.map_err(e)?;
            let to = Self::apply_agent_migrations(&mut tx, &namespace, from).await?;
            if self.agent_roles {
                // In the same transaction: a migrate cut off after the upgrade commits must not
                // leave the new tables out of the agent role's reach.
                sqlx::query("SELECT vault.grant_agent_role($1)")
                    .bind(&namespace)
                    .execute(&mut *tx)
                    .await
                    .map_err(e)?;
            }
            sqlx::query("UPDATE vault.agents SET schema_version = $2 WHERE schema_name = $1")
                .bind(&namespace)
                .bind(to)
                .execute(&mut *tx)
                .await
                .map_err(e)?;
            tx.commit().await.map_err(e)?;
            tracing::info!(schema = %namespace, from, to, "upgraded agent schema");
        }
        if self.agent_roles {
            self.migrate_roles(&mut conn).await?;
        }
        conn.close().await.map_err(e)?;
        self.ready().await
    }

    #[tracing::instrument(skip_all, err)]
    async fn ready(&self) -> Result<(), StoreError> {
        let applied: i64 =
            sqlx::query_scalar("SELECT count(*) FROM vault._sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await
                .map_err(e)?;
        if applied < CONTROL_MIGRATIONS.iter().count() as i64 {
            return Err(StoreError::Corrupt(
                "the database is not migrated to this version: run `vault-server migrate` as the owner role (VAULT_DATABASE_MIGRATE_URL)".into(),
            ));
        }
        self.load_role_prefix().await
    }

    #[tracing::instrument(skip_all, err)]
    async fn root_key(&self) -> Result<Option<RootKeyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT key_check, kdf_salt, kdf_m_cost, kdf_t_cost, kdf_p_cost FROM vault.root_key WHERE id = 1",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        let Some(row) = row else { return Ok(None) };
        let salt: Option<Vec<u8>> = row.try_get("kdf_salt").map_err(e)?;
        let kdf = match salt {
            None => None,
            Some(salt) => {
                let cost = |name: &str| -> Result<u32, StoreError> {
                    let v: Option<i32> = row.try_get(name).map_err(e)?;
                    v.and_then(|v| u32::try_from(v).ok())
                        .ok_or_else(|| StoreError::Corrupt(format!("root_key.{name} missing")))
                };
                Some((
                    salt,
                    KdfParams {
                        m_cost: cost("kdf_m_cost")?,
                        t_cost: cost("kdf_t_cost")?,
                        p_cost: cost("kdf_p_cost")?,
                    },
                ))
            }
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
            "SELECT {AGENT_COLUMNS} FROM vault.agents WHERE issuer = $1 AND agent_id = $2"
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
        if self.agent_roles {
            // The serving role has no DDL right: the owner's SECURITY DEFINER function creates
            // the schema and its role, or returns the agent a concurrent call created.
            let row = sqlx::query(
                "SELECT out_issuer AS issuer, out_agent_id AS agent_id,
                        out_schema_name AS schema_name, out_wrapped_key AS wrapped_key,
                        out_key_version AS key_version
                 FROM vault.create_agent($1, $2, $3, $4)",
            )
            .bind(issuer.as_str())
            .bind(agent.as_str())
            .bind(wrapped_key)
            .bind(key_version as i32)
            .fetch_one(&self.pool)
            .await
            .map_err(e)?;
            let record = Self::agent_from_row(&row)?;
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
        let existing = sqlx::query(&format!(
            "SELECT {AGENT_COLUMNS} FROM vault.agents WHERE issuer = $1 AND agent_id = $2"
        ))
        .bind(issuer.as_str())
        .bind(agent.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(e)?;
        if let Some(row) = existing {
            tx.commit().await.map_err(e)?;
            return Self::agent_from_row(&row);
        }
        let namespace = namespace_for(issuer, agent);
        let create = format!("CREATE SCHEMA {}", quoted(&namespace)?);
        tx.execute(sqlx::raw_sql(&create)).await.map_err(e)?;
        let version = Self::apply_agent_migrations(&mut tx, &namespace, 0).await?;
        let row = sqlx::query(
            "INSERT INTO vault.agents (issuer, agent_id, schema_name, wrapped_key, key_version, schema_version)
             VALUES ($6, $1, $2, $3, $4, $5)
             RETURNING issuer, agent_id, schema_name, wrapped_key, key_version",
        )
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
        Self::agent_from_row(&row)
    }

    #[tracing::instrument(skip_all, err)]
    async fn legacy_agents(&self) -> Result<Vec<(AgentId, u32, Vec<u8>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT agent_id, key_version, wrapped_key FROM vault.agents WHERE issuer = ''",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("agent_id").map_err(e)?;
                let version: i32 = row.try_get("key_version").map_err(e)?;
                Ok((
                    AgentId::parse(id).map_err(|err| {
                        StoreError::Corrupt(format!("agent id in registry: {err}"))
                    })?,
                    key_version_of(i64::from(version))?,
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

    #[tracing::instrument(skip_all, err)]
    async fn next_generation(&self, agent: &AgentRecord) -> Result<Generation, StoreError> {
        let sql = format!(
            "SELECT nextval('{}.generation_seq')",
            quoted(&agent.namespace)?
        );
        let mut tx = self.agent_tx(&agent.namespace).await?;
        let value: i64 = sqlx::query_scalar(&sql)
            .fetch_one(&mut *tx)
            .await
            .map_err(e)?;
        tx.commit().await.map_err(e)?;
        u64::try_from(value)
            .ok()
            .and_then(Generation::new)
            .ok_or_else(|| StoreError::Corrupt(format!("generation sequence returned {value}")))
    }

    #[tracing::instrument(skip_all, err)]
    async fn upsert(
        &self,
        agent: &AgentRecord,
        new: NewCredential<'_>,
    ) -> Result<Upserted, StoreError> {
        let schema = quoted(&agent.namespace)?;
        let mut tx = self.agent_tx(&agent.namespace).await?;
        // The WHERE on the conflict arm is the fence: a slower writer holding an older
        // generation can never overwrite a newer one. A new token set is a new grant, so it
        // starts with no re-auth mark, no lease and no backoff.
        let sql = format!(
            "INSERT INTO {schema}.credentials AS c
                 (user_id, tool, generation, state, key_version, wrapped_data_key, ciphertext,
                  access_expires_at, ttl_expires_at)
             VALUES ($1, $2, $3, 0, $4, $5, $6, $7, now() + make_interval(secs => $8))
             ON CONFLICT (user_id, tool) DO UPDATE SET
                 generation = EXCLUDED.generation, state = 0, key_version = EXCLUDED.key_version,
                 wrapped_data_key = EXCLUDED.wrapped_data_key, ciphertext = EXCLUDED.ciphertext,
                 access_expires_at = EXCLUDED.access_expires_at,
                 ttl_expires_at = EXCLUDED.ttl_expires_at,
                 refresh_lease_owner = NULL, refresh_lease_until = NULL,
                 refresh_failures = 0, refresh_not_before = NULL, updated_at = now()
             WHERE c.generation < EXCLUDED.generation
             RETURNING ttl_expires_at"
        );
        let row: Option<DateTime<Utc>> = sqlx::query_scalar(&sql)
            .bind(new.user.as_str())
            .bind(new.tool.as_str())
            .bind(new.generation.get() as i64)
            .bind(new.sealed.key_version as i32)
            .bind(&new.sealed.wrapped_data_key)
            .bind(&new.sealed.ciphertext)
            .bind(new.access_expires_at)
            .bind(new.ttl_seconds as f64)
            .fetch_optional(&mut *tx)
            .await
            .map_err(e)?;
        tx.commit().await.map_err(e)?;
        Ok(match row {
            Some(ttl_expires_at) => Upserted::Written { ttl_expires_at },
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
        let sql = format!(
            "SELECT generation, state, key_version, wrapped_data_key, ciphertext
             FROM {}.credentials
             WHERE user_id = $1 AND tool = $2 AND ttl_expires_at > now()",
            quoted(&agent.namespace)?
        );
        let role = if self.agent_roles {
            Some(self.agent_role(&agent.namespace)?)
        } else {
            None
        };
        let row = self
            .reads
            .fetch_optional(
                role.as_deref(),
                sqlx::query(&sql).bind(user.as_str()).bind(tool.as_str()),
            )
            .await
            .map_err(e)?;
        let Some(row) = row else { return Ok(None) };
        let generation: i64 = row.try_get(0).map_err(e)?;
        let state: i16 = row.try_get(1).map_err(e)?;
        let key_version: i32 = row.try_get(2).map_err(e)?;
        Ok(Some(StoredCredential {
            generation: generation_of(generation)?,
            state: match state {
                0 => CredentialState::Active,
                1 => CredentialState::ReauthRequired,
                other => return Err(StoreError::Corrupt(format!("unknown state {other}"))),
            },
            sealed: SealedCredential {
                wrapped_data_key: row.try_get(3).map_err(e)?,
                ciphertext: row.try_get(4).map_err(e)?,
                key_version: key_version_of(i64::from(key_version))?,
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
        let schema = quoted(&agent.namespace)?;
        let mut tx = self.agent_tx(&agent.namespace).await?;
        let result = match tool {
            Some(tool) => {
                sqlx::query(&format!(
                    "DELETE FROM {schema}.credentials WHERE user_id = $1 AND tool = $2"
                ))
                .bind(user.as_str())
                .bind(tool.as_str())
                .execute(&mut *tx)
                .await
            }
            None => {
                sqlx::query(&format!(
                    "DELETE FROM {schema}.credentials WHERE user_id = $1"
                ))
                .bind(user.as_str())
                .execute(&mut *tx)
                .await
            }
        }
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        Ok(result.rows_affected())
    }

    #[tracing::instrument(skip_all, err)]
    async fn sweep(
        &self,
        limit: u32,
        dry_run: bool,
        revoke: bool,
    ) -> Result<SweepOutcome, StoreError> {
        let namespaces: Vec<String> =
            sqlx::query_scalar("SELECT schema_name FROM vault.agents ORDER BY schema_name")
                .fetch_all(&self.pool)
                .await
                .map_err(e)?;
        let mut swept: u64 = 0;
        for namespace in namespaces {
            let remaining = u64::from(limit) - swept;
            if remaining == 0 {
                break;
            }
            let schema = quoted(&namespace)?;
            let mut tx = self.agent_tx(&namespace).await?;
            let n: i64 = if dry_run {
                sqlx::query_scalar(&format!(
                    "SELECT count(*) FROM (SELECT 1 FROM {schema}.credentials
                     WHERE ttl_expires_at <= now() LIMIT $1) AS expired"
                ))
                .bind(remaining as i64)
                .fetch_one(&mut *tx)
                .await
                .map_err(e)?
            } else {
                // SKIP LOCKED: concurrent sweepers (or a request holding a row) split the work
                // instead of queueing; the statement's own row count is what is reported, so a
                // row is counted by exactly the sweeper that removed it. With `revoke`, what is
                // deleted is queued for provider revocation in the same statement.
                let delete = format!(
                    "DELETE FROM {schema}.credentials WHERE (user_id, tool) IN (
                         SELECT user_id, tool FROM {schema}.credentials
                         WHERE ttl_expires_at <= now()
                         ORDER BY ttl_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                     AND ttl_expires_at <= now()"
                );
                let sql = if revoke {
                    format!(
                        "WITH gone AS ({delete}
                             RETURNING user_id, tool, generation, key_version, wrapped_data_key, ciphertext)
                         INSERT INTO {schema}.revocation_outbox
                             (user_id, tool, generation, key_version, wrapped_data_key, ciphertext)
                         SELECT user_id, tool, generation, key_version, wrapped_data_key, ciphertext
                         FROM gone"
                    )
                } else {
                    delete
                };
                sqlx::query(&sql)
                    .bind(remaining as i64)
                    .execute(&mut *tx)
                    .await
                    .map_err(e)?
                    .rows_affected() as i64
            };
            tx.commit().await.map_err(e)?;
            swept += n as u64;
        }
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
        let schema = quoted(&agent.namespace)?;
        let mut tx = self.agent_tx(&agent.namespace).await?;
        // The lease is the cross-replica half of "one provider call per stale credential": it
        // is taken only on the generation the caller saw, only when free or expired (a crashed
        // holder blocks others for at most `ttl`), and never during a backoff window.
        let taken = sqlx::query(&format!(
            "UPDATE {schema}.credentials
             SET refresh_lease_owner = $4, refresh_lease_until = now() + make_interval(secs => $5)
             WHERE user_id = $1 AND tool = $2 AND generation = $3 AND state = 0
               AND ttl_expires_at > now()
               AND (refresh_lease_until IS NULL OR refresh_lease_until <= now() OR refresh_lease_owner = $4)
               AND (refresh_not_before IS NULL OR refresh_not_before <= now())"
        ))
        .bind(user.as_str())
        .bind(tool.as_str())
        .bind(generation.get() as i64)
        .bind(owner)
        .bind(ttl.as_secs_f64())
        .execute(&mut *tx)
        .await
        .map_err(e)?
        .rows_affected();
        if taken == 1 {
            tx.commit().await.map_err(e)?;
            return Ok(RefreshLease::Acquired);
        }
        let row = sqlx::query(&format!(
            "SELECT generation, state, refresh_lease_until > now() AS held,
                    CASE WHEN refresh_not_before > now() THEN refresh_not_before END AS not_before
             FROM {schema}.credentials
             WHERE user_id = $1 AND tool = $2 AND ttl_expires_at > now()"
        ))
        .bind(user.as_str())
        .bind(tool.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(e)?;
        let Some(row) = row else {
            return Ok(RefreshLease::Changed);
        };
        let stored: i64 = row.try_get("generation").map_err(e)?;
        let state: i16 = row.try_get("state").map_err(e)?;
        if stored != generation.get() as i64 || state != 0 {
            return Ok(RefreshLease::Changed);
        }
        if let Some(until) = row
            .try_get::<Option<DateTime<Utc>>, _>("not_before")
            .map_err(e)?
        {
            return Ok(RefreshLease::BackingOff { until });
        }
        if row.try_get::<Option<bool>, _>("held").map_err(e)? == Some(true) {
            return Ok(RefreshLease::Held);
        }
        tx.commit().await.map_err(e)?;
        Ok(RefreshLease::Changed)
    }

    #[tracing::instrument(skip_all, err)]
    async fn complete_refresh(
        &self,
        agent: &AgentRecord,
        old: Generation,
        new: NewCredential<'_>,
    ) -> Result<bool, StoreError> {
        let schema = quoted(&agent.namespace)?;
        let mut tx = self.agent_tx(&agent.namespace).await?;
        // Compare-and-swap on the generation read before the provider call: if a StoreToken
        // (or anything else) wrote meanwhile, its newer value stands and this write is dropped.
        let written = sqlx::query(&format!(
            "UPDATE {schema}.credentials
             SET generation = $4, key_version = $5, wrapped_data_key = $6, ciphertext = $7,
                 access_expires_at = $8, refresh_lease_owner = NULL, refresh_lease_until = NULL,
                 refresh_failures = 0, refresh_not_before = NULL, updated_at = now()
             WHERE user_id = $1 AND tool = $2 AND generation = $3"
        ))
        .bind(new.user.as_str())
        .bind(new.tool.as_str())
        .bind(old.get() as i64)
        .bind(new.generation.get() as i64)
        .bind(new.sealed.key_version as i32)
        .bind(&new.sealed.wrapped_data_key)
        .bind(&new.sealed.ciphertext)
        .bind(new.access_expires_at)
        .execute(&mut *tx)
        .await
        .map_err(e)?
        .rows_affected();
        tx.commit().await.map_err(e)?;
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
        let schema = quoted(&agent.namespace)?;
        let mut tx = self.agent_tx(&agent.namespace).await?;
        sqlx::query(&format!(
            "UPDATE {schema}.credentials
             SET state = 1, refresh_lease_owner = NULL, refresh_lease_until = NULL, updated_at = now()
             WHERE user_id = $1 AND tool = $2 AND generation = $3"
        ))
        .bind(user.as_str())
        .bind(tool.as_str())
        .bind(generation.get() as i64)
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
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
        let schema = quoted(&agent.namespace)?;
        let mut tx = self.agent_tx(&agent.namespace).await?;
        // Retry-After is honoured up to an hour; the exponential part is capped at `cap`.
        let until: Option<DateTime<Utc>> = sqlx::query_scalar(&format!(
            "UPDATE {schema}.credentials
             SET refresh_failures = refresh_failures + 1,
                 refresh_not_before = now() + make_interval(secs => GREATEST(
                     LEAST($4::float8, 3600.0),
                     LEAST($6::float8, $5::float8 * power(2.0, LEAST(refresh_failures, 30))))),
                 refresh_lease_owner = NULL, refresh_lease_until = NULL
             WHERE user_id = $1 AND tool = $2 AND generation = $3
             RETURNING refresh_not_before"
        ))
        .bind(user.as_str())
        .bind(tool.as_str())
        .bind(generation.get() as i64)
        .bind(retry_after.map_or(0.0, |d| d.as_secs_f64()))
        .bind(base.as_secs_f64())
        .bind(cap.as_secs_f64())
        .fetch_optional(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        Ok(until)
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
        let schema = quoted(&agent.namespace)?;
        let mut tx = self.agent_tx(&agent.namespace).await?;
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
        let rows = sqlx::query(&sql)
            .bind(user.as_str())
            .bind(tool.map(Tool::as_str))
            .bind(owner)
            .bind(lease.as_secs_f64())
            .fetch_all(&mut *tx)
            .await
            .map_err(e)?;
        tx.commit().await.map_err(e)?;
        rows.iter().map(outbox_entry).collect()
    }

    #[tracing::instrument(skip_all, err)]
    async fn claim_outbox(
        &self,
        owner: uuid::Uuid,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<(AgentRecord, OutboxEntry)>, StoreError> {
        // Legacy agents (issuer '') are adopted at startup before anything is served.
        let agents = sqlx::query(&format!(
            "SELECT {AGENT_COLUMNS} FROM vault.agents WHERE issuer <> '' ORDER BY schema_name"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        let mut claimed = Vec::new();
        for row in agents {
            let remaining = i64::from(limit) - claimed.len() as i64;
            if remaining <= 0 {
                break;
            }
            let agent = Self::agent_from_row(&row)?;
            let schema = quoted(&agent.namespace)?;
            let mut tx = self.agent_tx(&agent.namespace).await?;
            let rows = sqlx::query(&format!(
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
            .bind(remaining)
            .fetch_all(&mut *tx)
            .await
            .map_err(e)?;
            tx.commit().await.map_err(e)?;
            for row in &rows {
                claimed.push((agent.clone(), outbox_entry(row)?));
            }
        }
        Ok(claimed)
    }

    #[tracing::instrument(skip_all, err)]
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

    #[tracing::instrument(skip_all, err)]
    async fn retry_outbox(
        &self,
        agent: &AgentRecord,
        id: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        let schema = quoted(&agent.namespace)?;
        let mut tx = self.agent_tx(&agent.namespace).await?;
        sqlx::query(&format!(
            "UPDATE {schema}.revocation_outbox
             SET attempts = attempts + 1,
                 next_attempt_at = now() + make_interval(secs => LEAST(3600.0, power(2.0, LEAST(attempts, 12)))),
                 lease_owner = NULL, lease_until = NULL, last_error = $2
             WHERE id = $1"
        ))
        .bind(id)
        .bind(error)
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        Ok(())
    }

    #[tracing::instrument(skip_all, err)]
    async fn try_lease(
        &self,
        name: &str,
        holder: uuid::Uuid,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        // Taken if free, expired, or already ours (renewal). Expiry means a crashed holder
        // blocks the others for at most `ttl`.
        let row: Option<uuid::Uuid> = sqlx::query_scalar(
            "INSERT INTO vault.leases AS l (name, holder, expires_at)
             VALUES ($1, $2, now() + make_interval(secs => $3))
             ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
             WHERE l.expires_at <= now() OR l.holder = EXCLUDED.holder
             RETURNING holder",
        )
        .bind(name)
        .bind(holder)
        .bind(ttl.as_secs_f64())
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        Ok(row == Some(holder))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schema_name_is_a_fixed_length_hash_whatever_the_agent_id() {
        let issuer = IssuerId::parse("https://issuer.example").unwrap();
        let hostile = AgentId::parse("x\"; DROP SCHEMA vault CASCADE; --").unwrap();
        let name = namespace_for(&issuer, &hostile);
        assert_eq!(name.len(), 46);
        assert!(quoted(&name).is_ok());
        assert_ne!(name, namespace_for(&issuer, &AgentId::parse("y").unwrap()));
        let other = IssuerId::parse("https://other.example").unwrap();
        assert_ne!(
            name,
            namespace_for(&other, &hostile),
            "issuers never share a schema"
        );
    }

    #[test]
    fn a_schema_name_not_made_by_the_hash_is_refused() {
        assert!(quoted("public").is_err());
        assert!(quoted("agent_\"; drop").is_err());
    }
}
