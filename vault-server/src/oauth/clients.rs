//! The vault as a client of an MCP tool's authorization server when no `client_id` is
//! configured: a Client ID Metadata Document where the server accepts one (the MCP
//! authorization specification's preferred way, 2025-11-25), otherwise one dynamic registration
//! (RFC 7591) per tool and issuer, saved in the control schema and shared by every replica.
//!
//! Exactly one replica registers: the first to take the named lease for (tool, issuer) reads the
//! store again, registers and saves; the others wait for the saved registration. A registration
//! whose secret expired, whose redirect URI is no longer the configured one, or that the server
//! rejected (`invalid_client`) is replaced at its next use, once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use oauth2::ClientId;
use secrecy::{ExposeSecret, SecretString};

use super::registration::{AuthMethod, ClientMetadata, choose_auth_method, metadata_document};
use super::{AuthStyle, ClientCredentials, ProviderError, mcp::AuthorizationServer};
use crate::crypto::{ControlKey, open_client_secret, seal_client_secret};
use crate::http::{Origin, Outbound};
use crate::ids::Tool;
use crate::store::Store;
use crate::store::{NewRegistration, Registration};

/// How often a replica waiting for another's registration looks again.
const POLL: Duration = Duration::from_millis(50);
/// A registered secret this close to its expiry is renewed first.
const EXPIRY_MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(60);
/// The path, next to the callback's, where the vault's client metadata document is served.
pub const METADATA_DOCUMENT_PATH: &str = "/api/v1/auth/tool/client-metadata";
/// What the vault calls itself at authorization servers.
const CLIENT_NAME: &str = "credential-vault";

/// Registers the vault at authorization servers, and remembers where.
pub struct Registrar {
    store: Store,
    /// Seals the client secrets it is issued.
    control: ControlKey,
    holder: uuid::Uuid,
    outbound: Outbound,
    /// `OAUTH_TOOL_REDIRECT_URI`.
    redirect_uri: String,
    /// The Client ID Metadata Document's URL (its `client_id`), when the callback is public.
    metadata_url: Option<url::Url>,
    /// Outlives one registration call.
    lease: Duration,
    /// One registering task per (tool, issuer) in this process: the lease is per process.
    gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Registrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registrar")
            .field("redirect_uri", &self.redirect_uri)
            .field("metadata_url", &self.metadata_url)
            .finish_non_exhaustive()
    }
}

impl Registrar {
    /// A registrar sending `redirect_uri` (`OAUTH_TOOL_REDIRECT_URI`). When that is an `https`
    /// URL ending in `/callback`, the vault also offers a Client ID Metadata Document at
    /// [`METADATA_DOCUMENT_PATH`] on the same origin; the callback listener serves it.
    pub fn new(
        store: Store,
        control: ControlKey,
        outbound: Outbound,
        redirect_uri: String,
        lease: Duration,
    ) -> Self {
        let metadata_url = metadata_url_for(&redirect_uri);
        Self {
            store,
            control,
            holder: uuid::Uuid::new_v4(),
            outbound,
            redirect_uri,
            metadata_url,
            lease,
            gates: Mutex::default(),
        }
    }

    /// The vault's Client ID Metadata Document, when it offers one.
    pub fn metadata_document(&self) -> Option<serde_json::Value> {
        self.metadata_url.as_ref().map(|url| {
            metadata_document(url, CLIENT_NAME, std::slice::from_ref(&self.redirect_uri))
        })
    }

    /// The client to be at `server` for `tool`, whose redirect URI is `tool_redirect` (or the
    /// server-wide one): the metadata document's URL when the server accepts it, otherwise the
    /// saved registration, registering now when there is none usable.
    pub async fn client(
        &self,
        tool: &str,
        server: &AuthorizationServer,
        tool_redirect: Option<&str>,
    ) -> Result<ClientCredentials, ProviderError> {
        let redirect = tool_redirect.unwrap_or(&self.redirect_uri);
        if server.client_id_metadata_document_supported
            && redirect == self.redirect_uri
            && let Some(url) = &self.metadata_url
        {
            return Ok(ClientCredentials {
                id: ClientId::new(url.to_string()),
                secret: None,
                auth_style: AuthStyle::Post,
                registered: false,
            });
        }
        let Some(endpoint) = &server.registration_endpoint else {
            return Err(ProviderError::unavailable(format!(
                "tool {tool}: the authorization server {} offers no dynamic client registration \
                 (RFC 7591){}; configure client_id for this tool",
                server.issuer,
                if server.client_id_metadata_document_supported {
                    " and the vault's callback is not a public https URL for a client metadata document"
                } else {
                    ""
                }
            )));
        };
        let tool = Tool::parse(tool)
            .map_err(|e| ProviderError::unavailable(format!("tool {tool}: {e}")))?;
        let issuer = server.issuer.as_str();
        let lease = format!("client-registration {tool} {issuer}");
        // Tasks of this process take turns (the named lease only tells processes apart); the
        // second finds the first one's registration saved.
        let gate = {
            let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(gates.entry(lease.clone()).or_default())
        };
        let _turn = gate.lock().await;
        let deadline = Instant::now() + self.lease + Duration::from_secs(5);
        loop {
            if let Some(client) = self.saved(&tool, issuer, redirect).await? {
                return Ok(client);
            }
            let taken = self
                .store
                .leases
                .try_lease(&lease, self.holder, self.lease)
                .await
                .map_err(store_error)?;
            if taken {
                // Another replica may have saved one between the read and the lease.
                let outcome = match self.saved(&tool, issuer, redirect).await {
                    Ok(Some(client)) => Ok(client),
                    Ok(None) => self.register(&tool, server, endpoint, redirect).await,
                    Err(e) => Err(e),
                };
                // Released at once, so a renewal on another replica need not wait it out.
                let _ = self
                    .store
                    .leases
                    .try_lease(&lease, self.holder, Duration::ZERO)
                    .await;
                return outcome;
            }
            if Instant::now() >= deadline {
                return Err(ProviderError::unavailable(format!(
                    "tool {tool}: another replica is still registering the vault at {issuer}; retry"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Drops the registration of `client_id` after the server rejected it, unless another
    /// replica already replaced it.
    pub async fn forget(&self, tool: &str, issuer: &str, client_id: &str) {
        let Ok(tool) = Tool::parse(tool) else {
            return;
        };
        match self
            .store
            .registrations
            .forget_registration(&tool, issuer, client_id)
            .await
        {
            Ok(true) => tracing::warn!(
                %tool, issuer,
                "the authorization server rejected the vault's registered client; it is renewed at the next use"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(%tool, error = %e, "could not drop a rejected registration"),
        }
    }

    /// The saved registration, if it is still usable for `redirect`.
    async fn saved(
        &self,
        tool: &Tool,
        issuer: &str,
        redirect: &str,
    ) -> Result<Option<ClientCredentials>, ProviderError> {
        let Some(saved) = self
            .store
            .registrations
            .registration(tool, issuer)
            .await
            .map_err(store_error)?
        else {
            return Ok(None);
        };
        Ok(self.usable(tool, &saved, redirect))
    }

    fn usable(
        &self,
        tool: &Tool,
        saved: &Registration,
        redirect: &str,
    ) -> Option<ClientCredentials> {
        if !saved.redirect_uris.iter().any(|u| u == redirect) {
            tracing::info!(%tool, "the redirect URI changed since the vault registered; registering again");
            return None;
        }
        // Renewed a little before it expires: a minute early, or a quarter of its life for a
        // short-lived one, so it is never renewed on every use.
        if saved.secret_expires_at.is_some_and(|at| {
            let margin = EXPIRY_MARGIN.min((at - saved.registered_at) / 4);
            at - margin <= Utc::now()
        }) {
            tracing::info!(%tool, "the registered client secret expired; registering again");
            return None;
        }
        let method = AuthMethod::parse(&saved.auth_method)?;
        let secret = match &saved.sealed_secret {
            Some(sealed) => {
                let opened = open_client_secret(
                    &self.control,
                    tool,
                    &saved.issuer,
                    &saved.client_id,
                    sealed,
                );
                match opened.ok().and_then(|s| String::from_utf8(s.to_vec()).ok()) {
                    Some(secret) => Some(SecretString::from(secret)),
                    None => {
                        tracing::warn!(%tool, "a saved client secret does not open; registering again");
                        return None;
                    }
                }
            }
            None => None,
        };
        Some(credentials(&saved.client_id, secret, method, true))
    }

    async fn register(
        &self,
        tool: &Tool,
        server: &AuthorizationServer,
        endpoint: &url::Url,
        redirect: &str,
    ) -> Result<ClientCredentials, ProviderError> {
        let method = choose_auth_method(&server.token_endpoint_auth_methods_supported)
            .map_err(|rule| ProviderError::unavailable(format!("tool {tool}: {rule}")))?;
        let redirect_uris = [redirect.to_string()];
        let metadata = ClientMetadata {
            client_name: CLIENT_NAME,
            redirect_uris: &redirect_uris,
            auth_method: method,
            scope: None,
        };
        // Named by the server's metadata: held to the egress policy.
        let registered = super::registration::register(
            &self.outbound,
            tool.as_str(),
            Origin::Derived,
            endpoint,
            &metadata,
        )
        .await
        .map_err(|e| ProviderError::unavailable(e.to_string()))?;
        let sealed = registered.client_secret.as_ref().map(|secret| {
            seal_client_secret(
                &self.control,
                tool,
                &server.issuer,
                &registered.client_id,
                secret.expose_secret().as_bytes(),
            )
        });
        self.store
            .registrations
            .save_registration(&NewRegistration {
                tool,
                issuer: &server.issuer,
                client_id: &registered.client_id,
                sealed_secret: sealed.as_deref(),
                auth_method: registered.auth_method.as_str(),
                secret_expires_at: registered.secret_expires_at,
                redirect_uris: &redirect_uris,
            })
            .await
            .map_err(store_error)?;
        tracing::info!(%tool, issuer = %server.issuer, "registered the vault at the authorization server (RFC 7591)");
        Ok(credentials(
            &registered.client_id,
            registered.client_secret,
            registered.auth_method,
            true,
        ))
    }
}

fn credentials(
    client_id: &str,
    secret: Option<SecretString>,
    method: AuthMethod,
    registered: bool,
) -> ClientCredentials {
    ClientCredentials {
        id: ClientId::new(client_id.to_string()),
        // A `none` client has no secret to send, whatever was saved.
        secret: if method == AuthMethod::None {
            None
        } else {
            secret
        },
        auth_style: match method {
            AuthMethod::ClientSecretBasic => AuthStyle::Basic,
            AuthMethod::ClientSecretPost | AuthMethod::None => AuthStyle::Post,
        },
        registered,
    }
}

fn store_error(e: crate::store::StoreError) -> ProviderError {
    tracing::warn!(error = %e, "the client registration store failed");
    ProviderError::unavailable("the vault's client registrations could not be read or saved")
}

/// The Client ID Metadata Document's URL for `redirect_uri`: the same origin and path with its
/// last segment `callback` replaced, when the redirect URI is `https` (an authorization server
/// fetches the document, and a client ID is an `https` URL).
fn metadata_url_for(redirect_uri: &str) -> Option<url::Url> {
    let url = url::Url::parse(redirect_uri).ok()?;
    if url.scheme() != "https" || url.query().is_some() {
        return None;
    }
    let base = url.path().strip_suffix("/api/v1/auth/tool/callback")?;
    let mut document = url.clone();
    document.set_path(&format!("{base}{METADATA_DOCUMENT_PATH}"));
    Some(document)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metadata_document_sits_next_to_a_public_callback() {
        assert_eq!(
            metadata_url_for("https://vault.example/api/v1/auth/tool/callback")
                .map(|u| u.to_string()),
            Some("https://vault.example/api/v1/auth/tool/client-metadata".into())
        );
        assert_eq!(
            metadata_url_for("https://vault.example:8443/gw/api/v1/auth/tool/callback")
                .map(|u| u.to_string()),
            Some("https://vault.example:8443/gw/api/v1/auth/tool/client-metadata".into())
        );
        for none in [
            "http://127.0.0.1:8250/api/v1/auth/tool/callback",
            "https://vault.example/oauth/return",
            "https://vault.example/api/v1/auth/tool/callback?x=1",
        ] {
            assert_eq!(metadata_url_for(none), None, "{none}");
        }
    }

    #[test]
    fn a_none_client_sends_no_secret() {
        let public = credentials(
            "c",
            Some(SecretString::from("s".to_string())),
            AuthMethod::None,
            true,
        );
        assert!(public.secret.is_none());
        let basic = credentials(
            "c",
            Some(SecretString::from("s".to_string())),
            AuthMethod::ClientSecretBasic,
            true,
        );
        assert_eq!(basic.auth_style, AuthStyle::Basic);
        assert!(basic.secret.is_some());
    }
}
