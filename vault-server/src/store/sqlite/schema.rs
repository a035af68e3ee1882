//! Creating and upgrading the embedded database: one set of migrations for every table.

use super::{SqliteStore, e};
use crate::store::{SchemaStore, StoreError};

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

#[async_trait::async_trait]
impl SchemaStore for SqliteStore {
    #[tracing::instrument(skip_all)]
    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATIONS.run(&self.pool).await?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    async fn ready(&self) -> Result<(), StoreError> {
        // The embedded store is migrated by the process that serves it; checking that every
        // migration ran is enough.
        let applied: i64 =
            sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await
                .map_err(e)?;
        if applied < MIGRATIONS.iter().count() as i64 {
            return Err(StoreError::Corrupt(
                "the embedded database is not migrated to this version: run `vault-server migrate`"
                    .into(),
            ));
        }
        Ok(())
    }

    async fn upgrade_agents(&self, _batch: u32) -> Result<crate::store::AgentUpgrades, StoreError> {
        // One schema for every agent, migrated by `migrate`.
        Ok(crate::store::AgentUpgrades {
            upgraded: 0,
            left: 0,
        })
    }

    async fn make_spare_schema(&self, _target: u32) -> Result<bool, StoreError> {
        // One file holds every agent's rows: there is no schema to make ahead.
        Ok(false)
    }

    async fn spare_taken(&self) {
        std::future::pending().await
    }
}
