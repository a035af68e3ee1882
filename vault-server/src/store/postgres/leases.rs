//! The refresh lease columns of each agent's credentials, and `vault.leases`.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{PgStore, e, quoted};
use crate::ids::Generation;
use crate::store::rows::LeaseProbe;
use crate::store::{CredentialKey, LeaseStore, RefreshLease, StoreError};

#[async_trait::async_trait]
impl LeaseStore for PgStore {
    #[tracing::instrument(skip_all)]
    async fn try_refresh_lease(
        &self,
        key: CredentialKey<'_>,
        generation: Generation,
        owner: uuid::Uuid,
        ttl: Duration,
    ) -> Result<RefreshLease, StoreError> {
        let schema = quoted(&key.agent.namespace)?;
        let mut tx = self.agent_tx(&key.agent.namespace).await?;
        // Taken only on the generation the caller saw, only when free or expired, and never
        // during a backoff window.
        let taken: Option<i64> = sqlx::query_scalar(&format!(
            "UPDATE {schema}.credentials
             SET refresh_lease_owner = $4, refresh_lease_until = now() + make_interval(secs => $5)
             WHERE user_id = $1 AND tool = $2 AND generation = $3 AND state = 0
               AND ttl_expires_at > now()
               AND (refresh_lease_until IS NULL OR refresh_lease_until <= now() OR refresh_lease_owner = $4)
               AND (refresh_not_before IS NULL OR refresh_not_before <= now())
             RETURNING refresh_failures::int8"
        ))
        .bind(key.user.as_str())
        .bind(key.tool.as_str())
        .bind(generation.get() as i64)
        .bind(owner)
        .bind(ttl.as_secs_f64())
        .fetch_optional(&mut *tx)
        .await
        .map_err(e)?;
        if let Some(failures) = taken {
            tx.commit().await.map_err(e)?;
            return Ok(RefreshLease::acquired(failures));
        }
        // Rounded up to the millisecond, so the time a caller is told to wait for is never
        // before the real end of the backoff.
        let probe: Option<LeaseProbe> = sqlx::query_as(&format!(
            "SELECT generation, state::int8 AS state,
                    (CASE WHEN refresh_lease_until > now() THEN 1 ELSE 0 END)::int8 AS held,
                    (CASE WHEN refresh_not_before > now()
                          THEN ceil(extract(epoch FROM refresh_not_before) * 1000) END)::int8
                        AS not_before_ms
             FROM {schema}.credentials
             WHERE user_id = $1 AND tool = $2 AND ttl_expires_at > now()"
        ))
        .bind(key.user.as_str())
        .bind(key.tool.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
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
        let schema = quoted(&key.agent.namespace)?;
        let mut tx = self.agent_tx(&key.agent.namespace).await?;
        let until: Option<DateTime<Utc>> = sqlx::query_scalar(&format!(
            "UPDATE {schema}.credentials
             SET refresh_failures = refresh_failures + $5,
                 refresh_not_before = now() + make_interval(secs => $4),
                 refresh_lease_owner = NULL, refresh_lease_until = NULL
             WHERE user_id = $1 AND tool = $2 AND generation = $3
             RETURNING refresh_not_before"
        ))
        .bind(key.user.as_str())
        .bind(key.tool.as_str())
        .bind(generation.get() as i64)
        .bind(wait.as_secs_f64())
        .bind(i64::from(counted))
        .fetch_optional(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        Ok(until)
    }

    #[tracing::instrument(skip_all)]
    async fn try_lease(
        &self,
        name: &str,
        holder: uuid::Uuid,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        // Taken if free, expired, or already ours (renewal).
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
