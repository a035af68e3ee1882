//! One tool's authorization server and the calls the vault makes there: discovery (RFC 8414),
//! refresh (RFC 6749 §6) and revocation (RFC 7009).

use std::time::Instant;

use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{
    AuthType, ClientId, ClientSecret, RefreshToken, RequestTokenError, RevocationErrorResponseType,
    RevocationUrl, StandardRevocableToken, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::RwLock;

use super::{
    AuthStyle, DISCOVERY_TTL, MAX_EXPIRES_IN, MIN_EXPIRES_IN, ProviderError, ProviderHttp,
    Refreshed, TokenKind, classify, https_url, issuer_matches, revocation_error,
};

#[derive(Debug, Clone)]
pub(super) struct Endpoints {
    pub(super) token_url: TokenUrl,
    pub(super) revocation_url: Option<RevocationUrl>,
}

/// One tool's authorization server and client registration.
pub struct Provider {
    pub(super) tool: String,
    pub(super) client_id: ClientId,
    pub(super) client_secret: SecretString,
    pub(super) auth_style: AuthStyle,
    /// Explicit or preset endpoints; with an issuer, these override what discovery finds.
    pub(super) fixed_token_url: Option<TokenUrl>,
    pub(super) fixed_revocation_url: Option<RevocationUrl>,
    pub(super) issuer: Option<String>,
    /// RFC 8414 discovery result, re-fetched when a call through it fails.
    pub(super) discovered: RwLock<Option<(Endpoints, Instant)>>,
    /// The shared HTTP client every call to the provider goes through.
    pub(super) http: ProviderHttp,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("tool", &self.tool)
            .field("client_id", &self.client_id.as_str())
            .field("auth_style", &self.auth_style)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl Provider {
    /// What a credential remembers of the provider it was stored for: every URL its tokens can
    /// be sent to, as configured (the issuer whose discovery is trusted, and any token or
    /// revocation endpoint set explicitly). A stored token is only sent to a provider whose
    /// binding matches, so editing the providers file cannot redirect it. A tool named by its
    /// issuer alone binds to just the issuer, the same value the first version recorded.
    pub fn binding(&self) -> String {
        let issuer = self.issuer.as_deref();
        let token = self.fixed_token_url.as_ref().map(|u| u.as_str());
        let revocation = self.fixed_revocation_url.as_ref().map(|u| u.as_str());
        match (issuer, token, revocation) {
            (Some(issuer), None, None) => issuer.to_string(),
            _ => format!(
                "issuer={} token={} revocation={}",
                issuer.unwrap_or(""),
                token.unwrap_or(""),
                revocation.unwrap_or("")
            ),
        }
    }

    async fn endpoints(&self) -> Result<Endpoints, ProviderError> {
        let Some(issuer) = &self.issuer else {
            return Ok(Endpoints {
                // Loading guarantees a token URL when there is no issuer.
                token_url: self
                    .fixed_token_url
                    .clone()
                    .ok_or_else(|| ProviderError::unavailable("no token URL"))?,
                revocation_url: self.fixed_revocation_url.clone(),
            });
        };
        let cached = self.discovered.read().await.clone();
        if let Some((endpoints, at)) = cached
            && at.elapsed() < DISCOVERY_TTL
        {
            return Ok(endpoints);
        }
        let mut document = None;
        for suffix in [
            "/.well-known/oauth-authorization-server",
            "/.well-known/openid-configuration",
        ] {
            match self.http.get_json(&format!("{issuer}{suffix}")).await {
                // RFC 8414 §3.3: the document must name exactly the issuer it was fetched
                // for, or its endpoints belong to someone else.
                Ok(json) if issuer_matches(&json, issuer) => {
                    document = Some(json);
                    break;
                }
                Ok(_) => {
                    tracing::warn!(tool = %self.tool, suffix, "discovery document names another issuer; refused (RFC 8414 §3.3)")
                }
                Err(err) => {
                    tracing::debug!(tool = %self.tool, error = %err, suffix, "discovery attempt failed")
                }
            }
        }
        // Callers learn that discovery failed, never the URL; the log has the details.
        let document = document.ok_or_else(|| {
            ProviderError::unavailable("the provider's metadata could not be loaded")
        })?;
        let field = |name: &str| {
            document
                .get(name)
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        let token_url = match &self.fixed_token_url {
            Some(url) => url.clone(),
            None => field("token_endpoint")
                .and_then(|u| https_url(&self.tool, "token_endpoint", &u).ok())
                .and_then(|u| TokenUrl::new(u).ok())
                .ok_or_else(|| {
                    ProviderError::unavailable("discovery document has no https token_endpoint")
                })?,
        };
        let revocation_url = self.fixed_revocation_url.clone().or_else(|| {
            field("revocation_endpoint")
                .and_then(|u| https_url(&self.tool, "revocation_endpoint", &u).ok())
                .and_then(|u| RevocationUrl::new(u).ok())
        });
        let endpoints = Endpoints {
            token_url,
            revocation_url,
        };
        *self.discovered.write().await = Some((endpoints.clone(), Instant::now()));
        Ok(endpoints)
    }

    async fn forget_discovery(&self) {
        if self.issuer.is_some() {
            *self.discovered.write().await = None;
        }
    }

    fn client(
        &self,
        endpoints: Endpoints,
    ) -> oauth2::basic::BasicClient<
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointMaybeSet,
        oauth2::EndpointSet,
    > {
        BasicClient::new(self.client_id.clone())
            .set_client_secret(ClientSecret::new(
                self.client_secret.expose_secret().to_string(),
            ))
            .set_auth_type(match self.auth_style {
                AuthStyle::Basic => AuthType::BasicAuth,
                AuthStyle::Post => AuthType::RequestBody,
            })
            .set_token_uri(endpoints.token_url)
            .set_revocation_url_option(endpoints.revocation_url)
    }

    /// Whether revocation at the provider is possible for this tool.
    pub async fn can_revoke(&self) -> bool {
        if self.fixed_revocation_url.is_some() {
            return true;
        }
        self.issuer.is_some()
            && self
                .endpoints()
                .await
                .is_ok_and(|e| e.revocation_url.is_some())
    }

    /// Exchanges `refresh_token` for new tokens.
    #[tracing::instrument(skip(self, refresh_token), fields(tool = %self.tool))]
    pub async fn refresh(&self, refresh_token: &SecretString) -> Result<Refreshed, ProviderError> {
        let endpoints = self.endpoints().await?;
        let client = self.client(endpoints);
        let token = RefreshToken::new(refresh_token.expose_secret().to_string());
        let result = client
            .exchange_refresh_token(&token)
            .request_async(&self.http)
            .await;
        match result {
            Ok(response) => {
                let access = response.access_token().secret();
                if access.is_empty() || access.len() > 16 * 1024 {
                    return Err(ProviderError::unavailable(
                        "the provider returned an unusable access token",
                    ));
                }
                Ok(Refreshed {
                    access_token: SecretString::from(access.clone()),
                    refresh_token: response
                        .refresh_token()
                        .map(|t| t.secret())
                        .filter(|t| !t.is_empty())
                        .map(|t| SecretString::from(t.clone())),
                    // Clamped again here: whatever the provider said, the arithmetic on it stays
                    // in range (the HTTP layer already normalised the JSON).
                    expires_in: response
                        .expires_in()
                        .map(|d| d.clamp(MIN_EXPIRES_IN, MAX_EXPIRES_IN)),
                    scopes: response
                        .scopes()
                        .map(|s| s.iter().map(|s| s.to_string()).collect()),
                })
            }
            Err(RequestTokenError::ServerResponse(response)) => match response.error() {
                BasicErrorResponseType::InvalidGrant => {
                    Err(ProviderError::GrantRejected("invalid_grant".into()))
                }
                BasicErrorResponseType::UnauthorizedClient => {
                    Err(ProviderError::GrantRejected("unauthorized_client".into()))
                }
                other => Err(ProviderError::unavailable(format!(
                    "the provider refused the refresh ({}); check the client registration",
                    other.as_ref()
                ))),
            },
            Err(err) => {
                self.forget_discovery().await;
                Err(classify(err))
            }
        }
    }

    /// Revokes one token at the provider (RFC 7009). An unknown or already-revoked token is
    /// success: revocation is idempotent.
    #[tracing::instrument(skip(self, token), fields(tool = %self.tool, ?kind))]
    pub async fn revoke(&self, token: &SecretString, kind: TokenKind) -> Result<(), ProviderError> {
        let endpoints = self.endpoints().await?;
        if endpoints.revocation_url.is_none() {
            return Err(ProviderError::unavailable(
                "the provider has no revocation endpoint",
            ));
        }
        let client = self.client(endpoints);
        let secret = token.expose_secret().to_string();
        let revocable = match kind {
            TokenKind::Access => {
                StandardRevocableToken::AccessToken(oauth2::AccessToken::new(secret))
            }
            TokenKind::Refresh => StandardRevocableToken::RefreshToken(RefreshToken::new(secret)),
        };
        let request = client
            .revoke_token(revocable)
            .map_err(|e| ProviderError::unavailable(format!("revocation is misconfigured: {e}")))?;
        match request.request_async(&self.http).await {
            Ok(()) => Ok(()),
            // RFC 7009 §2.2.1: a server that cannot revoke access tokens says so; the refresh
            // token's revocation covers them.
            Err(RequestTokenError::ServerResponse(response))
                if matches!(
                    response.error(),
                    RevocationErrorResponseType::UnsupportedTokenType
                ) =>
            {
                Ok(())
            }
            Err(RequestTokenError::ServerResponse(response)) => {
                Err(ProviderError::unavailable(format!(
                    "the provider refused the revocation ({})",
                    revocation_error(&response)
                )))
            }
            Err(err) => {
                self.forget_discovery().await;
                Err(classify(err))
            }
        }
    }
}
