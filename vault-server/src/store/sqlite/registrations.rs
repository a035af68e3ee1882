//! The `client_registrations` table: dynamic client registrations, one per (tool, issuer).

use super::{SqliteStore, e, now_ms};
use crate::ids::Tool;
use crate::store::rows::{RegistrationRow, joined_redirect_uris};
use crate::store::{NewRegistration, Registration, RegistrationStore, StoreError};

#[async_trait::async_trait]
impl RegistrationStore for SqliteStore {
    #[tracing::instrument(skip_all)]
    async fn registration(
        &self,
        tool: &Tool,
        issuer: &str,
    ) -> Result<Option<Registration>, StoreError> {
        let row: Option<RegistrationRow> = sqlx::query_as(
            "SELECT tool, issuer, client_id, sealed_secret, auth_method,
                 secret_expires_at AS secret_expires_at_ms, redirect_uris,
                 registered_at AS registered_at_ms
             FROM client_registrations WHERE tool = ?1 AND issuer = ?2",
        )
        .bind(tool.as_str())
        .bind(issuer)
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        row.map(Registration::try_from).transpose()
    }

    #[tracing::instrument(skip_all)]
    async fn save_registration(
        &self,
        registration: &NewRegistration<'_>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO client_registrations
                 (tool, issuer, client_id, sealed_secret, auth_method, secret_expires_at,
                  redirect_uris, registered_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (tool, issuer) DO UPDATE SET
                 client_id = excluded.client_id,
                 sealed_secret = excluded.sealed_secret,
                 auth_method = excluded.auth_method,
                 secret_expires_at = excluded.secret_expires_at,
                 redirect_uris = excluded.redirect_uris,
                 registered_at = excluded.registered_at",
        )
        .bind(registration.tool.as_str())
        .bind(registration.issuer)
        .bind(registration.client_id)
        .bind(registration.sealed_secret)
        .bind(registration.auth_method)
        .bind(
            registration
                .secret_expires_at
                .map(|at| at.timestamp_millis()),
        )
        .bind(joined_redirect_uris(registration.redirect_uris)?)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(e)?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    async fn forget_registration(
        &self,
        tool: &Tool,
        issuer: &str,
        client_id: &str,
    ) -> Result<bool, StoreError> {
        // Conditional on the client, so a stale client's rejection never deletes a fresh one.
        let deleted = sqlx::query(
            "DELETE FROM client_registrations
             WHERE tool = ?1 AND issuer = ?2 AND client_id = ?3",
        )
        .bind(tool.as_str())
        .bind(issuer)
        .bind(client_id)
        .execute(&self.pool)
        .await
        .map_err(e)?
        .rows_affected();
        Ok(deleted == 1)
    }
}
