//! OAuth2 providers: the registry mapping each tool to its authorization server, and the two
//! calls the vault makes there — refresh (RFC 6749 §6) and revocation (RFC 7009).

mod http;
mod presets;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oauth2::basic::{BasicClient, BasicErrorResponseType, BasicRevocationErrorResponse};
use oauth2::{
    AuthType, ClientId, ClientSecret, RefreshToken, RequestTokenError, RevocationErrorResponseType,
    RevocationUrl, StandardRevocableToken, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::RwLock;

pub use http::{HttpError, ProviderHttp};

use crate::ids::Tool;

/// How client credentials travel on token and revocation calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStyle {
    /// HTTP Basic (`client_secret_basic`).
    Basic,
    /// Form body (`client_secret_post`).
    Post,
}

/// What a provider call can end in.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider refused the grant itself (`invalid_grant`, `unauthorized_client`): only a
    /// new consent helps. Retrying would be futile.
    #[error("the provider rejected the grant ({0})")]
    GrantRejected(String),
    /// Unreachable, slow, 5xx, 429, or an unusable answer: the credential is kept and the call
    /// may be retried after `retry_after` if the provider said.
    #[error("{message}")]
    Unavailable {
        /// Safe to show: never contains a token.
        message: String,
        /// The provider's `Retry-After`.
        retry_after: Option<Duration>,
    },
}

impl ProviderError {
    fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable {
            message: message.into(),
            retry_after: None,
        }
    }
}

/// A successful refresh.
#[derive(Debug)]
pub struct Refreshed {
    /// The new access token.
    pub access_token: SecretString,
    /// A rotated refresh token, when the provider issued one.
    pub refresh_token: Option<SecretString>,
    /// Lifetime of the access token, when given.
    pub expires_in: Option<Duration>,
    /// Granted scopes, when the provider lists them.
    pub scopes: Option<Vec<String>>,
}

/// Which token a revocation names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// `token_type_hint=access_token`.
    Access,
    /// `token_type_hint=refresh_token`.
    Refresh,
}

#[derive(Debug, Clone)]
struct Endpoints {
    token_url: TokenUrl,
    revocation_url: Option<RevocationUrl>,
}

/// One tool's authorization server and client registration.
pub struct Provider {
    tool: String,
    client_id: ClientId,
    client_secret: SecretString,
    auth_style: AuthStyle,
    /// Explicit or preset endpoints; with an issuer, these override what discovery finds.
    fixed_token_url: Option<TokenUrl>,
    fixed_revocation_url: Option<RevocationUrl>,
    issuer: Option<String>,
    /// RFC 8414 discovery result, re-fetched when a call through it fails.
    discovered: RwLock<Option<(Endpoints, Instant)>>,
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

/// Shortest access-token lifetime taken from a provider.
pub const MIN_EXPIRES_IN: Duration = Duration::from_secs(1);
/// Longest access-token lifetime taken from a provider: a year.
pub const MAX_EXPIRES_IN: Duration = Duration::from_secs(365 * 86_400);

/// How long a discovery document is trusted before it is fetched again.
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);

/// Provider settings from the environment.
#[derive(Debug, Clone, Default)]
pub struct ProviderSettings {
    /// `VAULT_PROVIDERS_FILE`.
    pub file: Option<PathBuf>,
    /// `VAULT_PROVIDER_CA_FILE`.
    pub ca_file: Option<PathBuf>,
    /// `VAULT_PROVIDER_CONNECT_TIMEOUT_SECONDS`.
    pub connect_timeout: Duration,
    /// `VAULT_PROVIDER_TIMEOUT_SECONDS`.
    pub timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvidersFile {
    #[serde(default)]
    tools: BTreeMap<String, ToolEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolEntry {
    preset: Option<String>,
    issuer: Option<String>,
    token_url: Option<String>,
    revocation_url: Option<String>,
    client_id: String,
    client_secret_env: Option<String>,
    client_secret_file: Option<PathBuf>,
    client_secret: Option<String>,
    auth_style: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
}

/// The provider registry: one [`Provider`] per configured tool.
#[derive(Debug, Clone)]
pub struct Providers {
    by_tool: Arc<HashMap<String, Arc<Provider>>>,
    http: ProviderHttp,
}

fn https_url(tool: &str, key: &str, value: &str) -> anyhow::Result<String> {
    let parsed = url::Url::parse(value)
        .map_err(|e| anyhow::anyhow!("tools.{tool}.{key}: not a URL: {e}"))?;
    if parsed.scheme() != "https" {
        anyhow::bail!("tools.{tool}.{key}: must be an https:// URL");
    }
    Ok(value.to_string())
}

impl Providers {
    /// No providers: every refresh answers "no provider configured".
    pub fn none(http: ProviderHttp) -> Self {
        Self {
            by_tool: Arc::new(HashMap::new()),
            http,
        }
    }

    /// Loads `VAULT_PROVIDERS_FILE`, resolving client secrets now so a missing one stops startup.
    pub fn load(settings: &ProviderSettings) -> anyhow::Result<Self> {
        let http = ProviderHttp::new(
            settings.ca_file.as_deref(),
            settings.connect_timeout,
            settings.timeout,
        )?;
        let Some(path) = &settings.file else {
            return Ok(Self::none(http));
        };
        let file: ProvidersFile = figment::Figment::from(
            <figment::providers::Toml as figment::providers::Format>::file_exact(path),
        )
        .extract()
        .map_err(|e| anyhow::anyhow!("VAULT_PROVIDERS_FILE ({}): {e}", path.display()))?;
        let mut by_tool = HashMap::new();
        for (tool, entry) in file.tools {
            let provider = Self::provider(&tool, entry, path)
                .map_err(|e| anyhow::anyhow!("VAULT_PROVIDERS_FILE ({}): {e:#}", path.display()))?;
            by_tool.insert(tool, Arc::new(provider));
        }
        tracing::info!(tools = by_tool.len(), "loaded OAuth provider registry");
        Ok(Self {
            by_tool: Arc::new(by_tool),
            http,
        })
    }

    fn provider(tool: &str, entry: ToolEntry, file: &Path) -> anyhow::Result<Provider> {
        Tool::parse(tool).map_err(|e| anyhow::anyhow!("tools.{tool}: tool name {e}"))?;
        let preset = match &entry.preset {
            Some(name) => Some(presets::preset(name).ok_or_else(|| {
                anyhow::anyhow!(
                    "tools.{tool}.preset: unknown preset {name:?} (known: {})",
                    presets::NAMES
                )
            })?),
            None => None,
        };
        let auth_style = match entry.auth_style.as_deref() {
            Some("basic") => AuthStyle::Basic,
            Some("post") => AuthStyle::Post,
            Some(other) => anyhow::bail!("tools.{tool}.auth_style: {other:?} is not basic or post"),
            None => preset.map_or(AuthStyle::Basic, |p| p.auth_style),
        };
        let token_url = entry
            .token_url
            .or_else(|| preset.map(|p| p.token_url.to_string()));
        let revocation_url = entry
            .revocation_url
            .or_else(|| preset.and_then(|p| p.revocation_url.map(str::to_string)));
        let issuer = entry
            .issuer
            .map(|i| https_url(tool, "issuer", i.trim_end_matches('/')))
            .transpose()?;
        if token_url.is_none() && issuer.is_none() {
            anyhow::bail!("tools.{tool}: needs token_url, issuer or preset");
        }
        let client_secret = match (
            entry.client_secret_env,
            entry.client_secret_file,
            entry.client_secret,
        ) {
            (Some(var), None, None) => std::env::var(&var).map_err(|_| {
                anyhow::anyhow!(
                    "tools.{tool}.client_secret_env: environment variable {var} is not set"
                )
            })?,
            (None, Some(path), None) => {
                let path = if path.is_relative() {
                    file.parent().unwrap_or(Path::new(".")).join(path)
                } else {
                    path
                };
                std::fs::read_to_string(&path)
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "tools.{tool}.client_secret_file: cannot read {}: {e}",
                            path.display()
                        )
                    })?
                    .trim()
                    .to_string()
            }
            (None, None, Some(secret)) => {
                tracing::warn!(%tool, "client_secret is written in the providers file; prefer client_secret_env or client_secret_file");
                secret
            }
            _ => anyhow::bail!(
                "tools.{tool}: set exactly one of client_secret_env, client_secret_file, client_secret"
            ),
        };
        if client_secret.is_empty() {
            anyhow::bail!("tools.{tool}: the client secret is empty");
        }
        if !entry.scopes.is_empty() {
            tracing::debug!(%tool, scopes = ?entry.scopes, "scopes are requested at consent; refresh keeps the granted ones");
        }
        Ok(Provider {
            tool: tool.to_string(),
            client_id: ClientId::new(entry.client_id),
            client_secret: SecretString::from(client_secret),
            auth_style,
            fixed_token_url: token_url
                .map(|u| https_url(tool, "token_url", &u).and_then(|u| Ok(TokenUrl::new(u)?)))
                .transpose()?,
            fixed_revocation_url: revocation_url
                .map(|u| {
                    https_url(tool, "revocation_url", &u).and_then(|u| Ok(RevocationUrl::new(u)?))
                })
                .transpose()?,
            issuer,
            discovered: RwLock::new(None),
        })
    }

    /// What a credential remembers of the provider it was stored for: every URL its tokens can
    /// be sent to, as configured (the issuer whose discovery is trusted, and any token or
    /// revocation endpoint set explicitly). A stored token is only sent to a provider whose
    /// binding matches, so editing the providers file cannot redirect it. A tool named by its
    /// issuer alone binds to just the issuer, the same value the first version recorded.
    pub fn binding(provider: &Provider) -> String {
        let issuer = provider.issuer.as_deref();
        let token = provider.fixed_token_url.as_ref().map(|u| u.as_str());
        let revocation = provider.fixed_revocation_url.as_ref().map(|u| u.as_str());
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

    /// The provider for `tool`, if configured.
    pub fn get(&self, tool: &Tool) -> Option<Arc<Provider>> {
        self.by_tool.get(tool.as_str()).cloned()
    }

    async fn endpoints(&self, provider: &Provider) -> Result<Endpoints, ProviderError> {
        let Some(issuer) = &provider.issuer else {
            return Ok(Endpoints {
                // Loading guarantees a token URL when there is no issuer.
                token_url: provider
                    .fixed_token_url
                    .clone()
                    .ok_or_else(|| ProviderError::unavailable("no token URL"))?,
                revocation_url: provider.fixed_revocation_url.clone(),
            });
        };
        let cached = provider.discovered.read().await.clone();
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
                    tracing::warn!(tool = %provider.tool, suffix, "discovery document names another issuer; refused (RFC 8414 §3.3)")
                }
                Err(err) => {
                    tracing::debug!(tool = %provider.tool, error = %err, suffix, "discovery attempt failed")
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
        let token_url = match &provider.fixed_token_url {
            Some(url) => url.clone(),
            None => field("token_endpoint")
                .and_then(|u| https_url(&provider.tool, "token_endpoint", &u).ok())
                .and_then(|u| TokenUrl::new(u).ok())
                .ok_or_else(|| {
                    ProviderError::unavailable("discovery document has no https token_endpoint")
                })?,
        };
        let revocation_url = provider.fixed_revocation_url.clone().or_else(|| {
            field("revocation_endpoint")
                .and_then(|u| https_url(&provider.tool, "revocation_endpoint", &u).ok())
                .and_then(|u| RevocationUrl::new(u).ok())
        });
        let endpoints = Endpoints {
            token_url,
            revocation_url,
        };
        *provider.discovered.write().await = Some((endpoints.clone(), Instant::now()));
        Ok(endpoints)
    }

    async fn forget_discovery(&self, provider: &Provider) {
        if provider.issuer.is_some() {
            *provider.discovered.write().await = None;
        }
    }

    fn client(
        provider: &Provider,
        endpoints: Endpoints,
    ) -> oauth2::basic::BasicClient<
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointMaybeSet,
        oauth2::EndpointSet,
    > {
        BasicClient::new(provider.client_id.clone())
            .set_client_secret(ClientSecret::new(
                provider.client_secret.expose_secret().to_string(),
            ))
            .set_auth_type(match provider.auth_style {
                AuthStyle::Basic => AuthType::BasicAuth,
                AuthStyle::Post => AuthType::RequestBody,
            })
            .set_token_uri(endpoints.token_url)
            .set_revocation_url_option(endpoints.revocation_url)
    }

    /// Whether revocation at the provider is possible for this tool.
    pub async fn can_revoke(&self, provider: &Provider) -> bool {
        if provider.fixed_revocation_url.is_some() {
            return true;
        }
        provider.issuer.is_some()
            && self
                .endpoints(provider)
                .await
                .is_ok_and(|e| e.revocation_url.is_some())
    }

    /// Exchanges `refresh_token` for new tokens.
    #[tracing::instrument(skip(self, provider, refresh_token), fields(tool = %provider.tool))]
    pub async fn refresh(
        &self,
        provider: &Provider,
        refresh_token: &SecretString,
    ) -> Result<Refreshed, ProviderError> {
        let endpoints = self.endpoints(provider).await?;
        let client = Self::client(provider, endpoints);
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
                self.forget_discovery(provider).await;
                Err(classify(err))
            }
        }
    }

    /// Revokes one token at the provider (RFC 7009). An unknown or already-revoked token is
    /// success: revocation is idempotent.
    #[tracing::instrument(skip(self, provider, token), fields(tool = %provider.tool, ?kind))]
    pub async fn revoke(
        &self,
        provider: &Provider,
        token: &SecretString,
        kind: TokenKind,
    ) -> Result<(), ProviderError> {
        let endpoints = self.endpoints(provider).await?;
        if endpoints.revocation_url.is_none() {
            return Err(ProviderError::unavailable(
                "the provider has no revocation endpoint",
            ));
        }
        let client = Self::client(provider, endpoints);
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
                self.forget_discovery(provider).await;
                Err(classify(err))
            }
        }
    }
}

fn revocation_error(response: &BasicRevocationErrorResponse) -> String {
    match response.error() {
        RevocationErrorResponseType::UnsupportedTokenType => "unsupported_token_type".into(),
        RevocationErrorResponseType::Basic(basic) => basic.as_ref().to_string(),
    }
}

/// Whether a discovery document's `issuer` is exactly the configured one (which is stored
/// without a trailing slash; a document may spell it with one).
fn issuer_matches(document: &serde_json::Value, issuer: &str) -> bool {
    document
        .get("issuer")
        .and_then(|v| v.as_str())
        .is_some_and(|named| named == issuer || named.strip_suffix('/') == Some(issuer))
}

/// Maps a failed call to a transient error. Deliberately drops `Parse`'s body: a token response
/// that failed to parse may still contain tokens.
fn classify<E: oauth2::ErrorResponse + 'static>(
    err: RequestTokenError<HttpError, E>,
) -> ProviderError {
    match err {
        RequestTokenError::Request(HttpError::Status {
            status,
            retry_after,
        }) => ProviderError::Unavailable {
            message: format!("the provider answered HTTP {status}"),
            retry_after,
        },
        // What goes back to callers names the kind of failure only: a transport error's text
        // carries the provider's URL, so it goes to the log at debug level instead.
        RequestTokenError::Request(other) => {
            tracing::debug!(error = %other, "provider call failed");
            ProviderError::unavailable(other.caller_message())
        }
        RequestTokenError::Parse(_, _) => {
            ProviderError::unavailable("the provider's response could not be parsed")
        }
        RequestTokenError::Other(message) => {
            tracing::debug!(%message, "provider call failed");
            ProviderError::unavailable("the provider call failed")
        }
        RequestTokenError::ServerResponse(_) => {
            ProviderError::unavailable("the provider returned an error")
        }
    }
}
