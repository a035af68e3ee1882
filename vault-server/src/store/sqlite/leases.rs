//! The refresh lease columns of the credentials table, and the named leases.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{SqliteStore, e, ms, now_ms};
use crate::ids::Generation;
use crate::store::rows::{LeaseProbe, from_ms};
use crate::store::{CredentialKey, LeaseStore, RefreshLease, StoreError};

#[async_trait::async_trait]
impl LeaseStore for SqliteStore {
    #[tracing::instrument(skip_all)]
    async fn try_refresh_lease(
        &self,
        key: CredentialKey<'_>,
        generation: Generation,
        owner: uuid::Uuid,
        ttl: Duration,
    ) -> Result<RefreshLease, StoreError> {
        let now = now_ms();
        let taken: Option<i64> = sqlx::query_scalar(
            "UPDATE credentials SET refresh_lease_owner = ?5, refresh_lease_until = ?6 + ?7
             WHERE namespace = ?1 AND user_id = ?2 AND tool = ?3 AND generation = ?4 AND state = 0
               AND ttl_expires_at > ?6
               AND (refresh_lease_until IS NULL OR refresh_lease_until <= ?6 OR refresh_lease_owner = ?5)
               AND (refresh_not_before IS NULL OR refresh_not_before <= ?6)
             RETURNING refresh_failures",
        )
        .bind(&key.agent.namespace)
        .bind(key.user.as_str())
        .bind(key.tool.as_str())
        .bind(generation.get() as i64)
        .bind(owner.to_string())
        .bind(now)
        .bind(ms(ttl))
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        if let Some(failures) = taken {
            return Ok(RefreshLease::acquired(failures));
        }
        let probe: Option<LeaseProbe> = sqlx::query_as(
            "SELECT generation, state,
                    CASE WHEN refresh_lease_until > ?4 THEN 1 ELSE 0 END AS held,
                    CASE WHEN refresh_not_before > ?4 THEN refresh_not_before END AS not_before_ms
             FROM credentials
             WHERE namespace = ?1 AND user_id = ?2 AND tool = ?3 AND ttl_expires_at > ?4",
        )
        .bind(&key.agent.namespace)
        .bind(key.user.as_str())
        .bind(key.tool.as_str())
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        RefreshLease::refused(generation, probe)
    }

    #[tracing::instrument(skip_all)]
    async fn record_refresh_failure(
        &self,
        key: CredentialKey<'_>,
        generation: Generation,
        wait: Duration,
        counted: bool,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let until: Option<i64> = sqlx::query_scalar(
            "UPDATE credentials SET refresh_failures = refresh_failures + ?7,
                 refresh_not_before = ?5 + ?6, refresh_lease_owner = NULL, refresh_lease_until = NULL
             WHERE namespace = ?1 AND user_id = ?2 AND tool = ?3 AND generation = ?4
             RETURNING refresh_not_before",
        )
        .bind(&key.agent.namespace)
        .bind(key.user.as_str())
        .bind(key.tool.as_str())
        .bind(generation.get() as i64)
        .bind(now_ms())
        .bind(ms(wait))
        .bind(i64::from(counted))
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        Ok(until.map(from_ms))
    }

    #[tracing::instrument(skip_all)]
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
