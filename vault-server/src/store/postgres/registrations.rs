//! `vault.client_registrations`: dynamic client registrations, one per (tool, issuer), in the
//! control schema so every replica and every agent uses the same client. Like
//! `vault.authorization_flows`, it is read and written on the pool under the login role (the
//! serving group's rights), never under an agent's role.

use super::{PgStore, e};
use crate::ids::Tool;
use crate::store::rows::{RegistrationRow, joined_redirect_uris};
use crate::store::{NewRegistration, Registration, RegistrationStore, StoreError};

#[async_trait::async_trait]
impl RegistrationStore for PgStore {
    #[tracing::instrument(skip_all)]
    async fn registration(
        &self,
        tool: &Tool,
        issuer: &str,
    ) -> Result<Option<Registration>, StoreError> {
        // Times rounded down to the millisecond, as every backend returns them.
        let row: Option<RegistrationRow> = sqlx::query_as(
            "SELECT tool, issuer, client_id, sealed_secret, auth_method,
                 floor(extract(epoch FROM secret_expires_at) * 1000)::int8
                     AS secret_expires_at_ms,
                 redirect_uris,
                 floor(extract(epoch FROM registered_at) * 1000)::int8 AS registered_at_ms
             FROM vault.client_registrations WHERE tool = $1 AND issuer = $2",
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
            "INSERT INTO vault.client_registrations
                 (tool, issuer, client_id, sealed_secret, auth_method, secret_expires_at,
                  redirect_uris, registered_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, now())
             ON CONFLICT (tool, issuer) DO UPDATE SET
                 client_id = EXCLUDED.client_id,
                 sealed_secret = EXCLUDED.sealed_secret,
                 auth_method = EXCLUDED.auth_method,
                 secret_expires_at = EXCLUDED.secret_expires_at,
                 redirect_uris = EXCLUDED.redirect_uris,
                 registered_at = now()",
        )
        .bind(registration.tool.as_str())
        .bind(registration.issuer)
        .bind(registration.client_id)
        .bind(registration.sealed_secret)
        .bind(registration.auth_method)
        .bind(registration.secret_expires_at)
        .bind(joined_redirect_uris(registration.redirect_uris)?)
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
        // Conditional on the client: a replica that saw a stale client rejected must not
        // delete the one another replica has just registered in its place.
        let deleted = sqlx::query(
            "DELETE FROM vault.client_registrations
             WHERE tool = $1 AND issuer = $2 AND client_id = $3",
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
