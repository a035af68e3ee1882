//! Creating and upgrading the database: the control schema's migrations, the per-agent schema
//! template, and the per-agent roles (DESIGN §4, docs/database-roles.md).

use sqlx::migrate::Migrator;
use sqlx::{Connection as _, Executor as _};

use super::{PgStore, e, quoted};
use crate::store::{AgentUpgrades, SchemaStore, StoreError};

static CONTROL_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/control");

/// The per-agent schema template, in order; `{schema}` is the quoted schema name.
const AGENT_MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        include_str!("../../../../migrations/agent/0001_credentials.sql"),
    ),
    (
        2,
        include_str!("../../../../migrations/agent/0002_refresh_and_revocation.sql"),
    ),
    (
        3,
        include_str!("../../../../migrations/agent/0003_audit.sql"),
    ),
];

/// For a per-agent version, the template that makes a new, empty agent schema at it in one pass:
/// what the templates up to it make one after another, without their ALTER TABLEs (control
/// migration 0015). The last entry's version must be a version of [`AGENT_MIGRATIONS`].
const AGENT_CREATES: &[(i32, &str)] = &[(
    3,
    include_str!("../../../../migrations/agent/creates/0003.sql"),
)];

pub(super) fn latest_agent_version() -> i32 {
    AGENT_MIGRATIONS.last().map_or(0, |(v, _)| *v)
}

/// Serialises migrations across replicas (an arbitrary constant: "vault" in ASCII).
const MIGRATION_LOCK: i64 = 0x0076_6175_6c74;

impl PgStore {
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
    pub(super) async fn load_role_prefix(&self) -> Result<(), StoreError> {
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

    /// Boxed with an explicit `Send` bound: as a plain `async fn` borrowing a connection, the
    /// compiler cannot prove the callers' futures `Send` (a known higher-ranked lifetime limit).
    pub(super) fn apply_agent_migrations<'a>(
        conn: &'a mut sqlx::PgConnection,
        namespace: &'a str,
        from_version: i32,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<i32, StoreError>> + Send + 'a>>
    {
        Box::pin(async move {
            let schema = quoted(namespace)?;
            let mut version = from_version;
            // A new schema is made in one pass where a template for that exists (control
            // migration 0015): the templates' ALTER TABLEs scan the whole of pg_index.
            if version == 0
                && let Some((v, creates)) = AGENT_CREATES.last()
            {
                let sql = creates.replace("{schema}", &schema);
                conn.execute(sqlx::raw_sql(&sql)).await.map_err(e)?;
                version = *v;
            }
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
}

#[async_trait::async_trait]
impl SchemaStore for PgStore {
    #[tracing::instrument(skip_all)]
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
        // The floor vault.audit_trim holds retention to (control migration 0008): only the
        // owner, here, may lower it.
        sqlx::query("UPDATE vault.instance SET audit_retention_days = $1 WHERE id = 1")
            .bind(i32::try_from(self.audit_retention_days.max(1)).unwrap_or(i32::MAX))
            .execute(&mut conn)
            .await
            .map_err(e)?;
        for (version, template) in AGENT_MIGRATIONS {
            let creates = AGENT_CREATES
                .iter()
                .find(|(v, _)| v == version)
                .map(|(_, creates)| *creates);
            sqlx::query(
                "INSERT INTO vault.agent_migrations (version, template, creates) VALUES ($1, $2, $3)
                 ON CONFLICT (version) DO UPDATE
                 SET template = EXCLUDED.template, creates = EXCLUDED.creates",
            )
            .bind(version)
            .bind(*template)
            .bind(creates)
            .execute(&mut conn)
            .await
            .map_err(e)?;
        }

        // Agent schemas are not upgraded here: each is upgraded on its first use after this
        // version, or by `upgrade_agents` (what `vault-server migrate` runs next), online.
        // Spares made before this version are upgraded too, or no registration could take one.
        let stale_spares: Vec<(String, i32)> = sqlx::query_as(
            "SELECT schema_name, schema_version FROM vault.spare_schemas WHERE schema_version < $1",
        )
        .bind(latest_agent_version())
        .fetch_all(&mut conn)
        .await
        .map_err(e)?;
        for (namespace, from) in stale_spares {
            let mut tx = conn.begin().await.map_err(e)?;
            let to = Self::apply_agent_migrations(&mut tx, &namespace, from).await?;
            if self.agent_roles {
                sqlx::query("SELECT vault.grant_agent_role($1)")
                    .bind(&namespace)
                    .execute(&mut *tx)
                    .await
                    .map_err(e)?;
            }
            sqlx::query(
                "UPDATE vault.spare_schemas SET schema_version = $2 WHERE schema_name = $1",
            )
            .bind(&namespace)
            .bind(to)
            .execute(&mut *tx)
            .await
            .map_err(e)?;
            tx.commit().await.map_err(e)?;
        }
        if self.agent_roles {
            self.migrate_roles(&mut conn).await?;
        }
        conn.close().await.map_err(e)?;
        self.ready().await
    }

    #[tracing::instrument(skip_all)]
    async fn ready(&self) -> Result<(), StoreError> {
        let applied: i64 =
            sqlx::query_scalar("SELECT count(*) FROM vault._sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await
                .map_err(e)?;
        let templates: i32 =
            sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM vault.agent_migrations")
                .fetch_one(&self.pool)
                .await
                .map_err(e)?;
        if applied < CONTROL_MIGRATIONS.iter().count() as i64 || templates < latest_agent_version()
        {
            return Err(StoreError::Corrupt(
                "the database is not migrated to this version: run `vault-server migrate` as the owner role (VAULT_DATABASE_MIGRATE_URL)".into(),
            ));
        }
        self.load_role_prefix().await
    }

    #[tracing::instrument(skip_all)]
    async fn upgrade_agents(&self, batch: u32) -> Result<AgentUpgrades, StoreError> {
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT schema_name FROM vault.agents WHERE schema_version < $1
             ORDER BY schema_name LIMIT $2",
        )
        .bind(latest_agent_version())
        .bind(i64::from(batch.max(1)))
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        // One transaction per agent, in the owner's function: a replica using the agent
        // meanwhile waits for one schema's DDL at most, and a run cut off keeps what it did.
        for namespace in &stale {
            sqlx::query("SELECT vault.upgrade_agent_schema($1)")
                .bind(namespace)
                .execute(&self.pool)
                .await
                .map_err(e)?;
        }
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM vault.agents WHERE schema_version < $1")
                .bind(latest_agent_version())
                .fetch_one(&self.pool)
                .await
                .map_err(e)?;
        Ok(AgentUpgrades {
            upgraded: stale.len() as u64,
            left: u64::try_from(left).unwrap_or(0),
        })
    }

    #[tracing::instrument(skip_all)]
    async fn make_spare_schema(&self, target: u32) -> Result<bool, StoreError> {
        // The owner's function: the serving role has no DDL right of its own.
        sqlx::query_scalar("SELECT vault.create_spare_schema($1)")
            .bind(i32::try_from(target).unwrap_or(i32::MAX))
            .fetch_one(&self.pool)
            .await
            .map_err(e)
    }

    async fn spare_taken(&self) {
        self.spare_taken.notified().await
    }
}
