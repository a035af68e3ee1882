//! The vault's client registrations at authorization servers (RFC 7591 dynamic client
//! registration), one per (tool, issuer), in the control schema so every replica uses the same
//! client. The client secret arrives sealed under the root key (`crypto::registration`); the
//! store never sees it in the clear.
//!
//! Exactly one registration across replicas is the caller's job (a named lease around
//! "read, register, save"); the store only keeps the result and forgets it conditionally, so a
//! replica that saw a client rejected cannot delete the fresh one another replica just saved.

use chrono::{DateTime, Utc};

use super::StoreError;
use crate::ids::Tool;

/// A registration to save.
#[derive(Debug)]
pub struct NewRegistration<'a> {
    /// The tool it was made for.
    pub tool: &'a Tool,
    /// The authorization server's issuer identifier, exactly as discovery names it.
    pub issuer: &'a str,
    /// The `client_id` the server assigned.
    pub client_id: &'a str,
    /// The client secret sealed under the root key; `None` for a public client.
    pub sealed_secret: Option<&'a [u8]>,
    /// The `token_endpoint_auth_method` the server registered (`client_secret_basic`,
    /// `client_secret_post` or `none`).
    pub auth_method: &'a str,
    /// `client_secret_expires_at`; `None` when the secret does not expire.
    pub secret_expires_at: Option<DateTime<Utc>>,
    /// The redirect URIs registered, in order: a configuration naming others needs a new
    /// registration.
    pub redirect_uris: &'a [String],
}

/// A saved registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The tool.
    pub tool: Tool,
    /// The issuer.
    pub issuer: String,
    /// The `client_id`.
    pub client_id: String,
    /// The sealed client secret; `None` for a public client.
    pub sealed_secret: Option<Vec<u8>>,
    /// The registered `token_endpoint_auth_method`.
    pub auth_method: String,
    /// When the secret expires; `None` for never.
    pub secret_expires_at: Option<DateTime<Utc>>,
    /// The registered redirect URIs, in the order saved.
    pub redirect_uris: Vec<String>,
    /// When it was saved.
    pub registered_at: DateTime<Utc>,
}

/// Client registrations.
#[async_trait::async_trait]
pub trait RegistrationStore: Send + Sync + 'static {
    /// The registration for (`tool`, `issuer`), if any (expired or not: the caller decides).
    async fn registration(
        &self,
        tool: &Tool,
        issuer: &str,
    ) -> Result<Option<Registration>, StoreError>;

    /// Saves `registration`, replacing any for the same (tool, issuer).
    async fn save_registration(&self, registration: &NewRegistration<'_>)
    -> Result<(), StoreError>;

    /// Deletes the registration for (`tool`, `issuer`) only if its client is still
    /// `client_id`; returns whether one was deleted.
    async fn forget_registration(
        &self,
        tool: &Tool,
        issuer: &str,
        client_id: &str,
    ) -> Result<bool, StoreError>;
}
