//! One tool's authorization server and the calls the vault makes there: discovery (RFC 8414),
//! the consent flow's authorization URL, code exchange and response issuer check (RFC 6749
//! §4.1, RFC 7636, RFC 9207), refresh (RFC 6749 §6) and revocation (RFC 7009).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{
    AuthType, AuthorizationCode, ClientSecret, PkceCodeVerifier, RedirectUrl, RefreshToken,
    RequestTokenError, RevocationErrorResponseType, RevocationUrl, StandardRevocableToken,
    TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::RwLock;

use crate::http::Origin;

use super::clients::Registrar;
use super::mcp::AuthorizationServer;
use super::{
    AuthStyle, ClientCredentials, MAX_EXPIRES_IN, MIN_EXPIRES_IN, ProviderError, ProviderHttp,
    Refreshed, TokenKind, classify, error_code, https_url, is_reserved_authorize_param,
    issuer_matches, revocation_error, same_issuer,
};

#[derive(Debug, Clone)]
pub(super) struct Endpoints {
    pub(super) token_url: TokenUrl,
    /// Configured, or read from the discovery document (and then held to the egress policy).
    pub(super) token_origin: Origin,
    pub(super) revocation_url: Option<RevocationUrl>,
    pub(super) revocation_origin: Origin,
    /// Explicit, preset or discovered; `None` when the tool can refresh but not start consent.
    pub(super) authorization_url: Option<url::Url>,
    /// RFC 9207: the provider promises an `iss` parameter on every authorization response.
    pub(super) iss_parameter_supported: bool,
    /// The issuer these endpoints belong to: configured, or discovered for an MCP tool.
    pub(super) issuer: Option<String>,
    /// An MCP tool's authorization server metadata, for client registration.
    pub(super) server: Option<Arc<AuthorizationServer>>,
    /// The scopes an MCP server asks for: its challenge's `scope`, else its metadata's
    /// `scopes_supported` (the MCP specification's scope selection).
    pub(super) discovered_scopes: Vec<String>,
}

/// A tool that is only an MCP server URL: everything else is discovered (RFC 9728, RFC 8414).
#[derive(Debug)]
pub(super) struct McpSource {
    /// The configured MCP server URL.
    pub(super) server: url::Url,
    /// Its canonical URI, sent as `resource` (RFC 8707) on authorize, token and refresh.
    pub(super) resource: String,
}

/// What BeginAuthorization puts in the authorization URL.
#[derive(Debug, Clone, Copy)]
pub struct AuthorizationRequest<'a> {
    /// The flow's CSRF token, echoed back to the callback.
    pub state: &'a str,
    /// `BASE64URL(SHA256(code_verifier))` (RFC 7636 §4.2); sent with method `S256`.
    pub code_challenge: &'a str,
    /// Scopes to ask for; none omits the `scope` parameter (the provider's default applies).
    pub scopes: &'a [String],
    /// Where the provider sends the user back; the code exchange must repeat it.
    pub redirect_uri: &'a str,
}

/// One tool's authorization server and client registration.
pub struct Provider {
    pub(super) tool: String,
    /// The configured client; `None` for an MCP tool that registers itself.
    pub(super) client: Option<ClientCredentials>,
    /// Explicit or preset endpoints; with an issuer, these override what discovery finds.
    pub(super) fixed_token_url: Option<TokenUrl>,
    pub(super) fixed_revocation_url: Option<RevocationUrl>,
    /// Explicit or preset authorization endpoint; with an issuer, overrides discovery.
    pub(super) fixed_authorization_url: Option<url::Url>,
    /// Added to every authorization URL, preset's merged under the file's; never a reserved key.
    pub(super) extra_authorize_params: Vec<(String, String)>,
    /// Asked for at consent when the caller names none.
    pub(super) scopes: Vec<String>,
    /// This tool's callback, overriding the server-wide one.
    pub(super) redirect_uri: Option<String>,
    pub(super) issuer: Option<String>,
    /// Set for a tool configured by `mcp_server` alone.
    pub(super) mcp: Option<McpSource>,
    /// Registers the vault at an MCP tool's authorization server; `None` when a client is
    /// configured.
    pub(super) registrar: Option<Arc<Registrar>>,
    /// RFC 8414 (or MCP) discovery result, re-fetched when a call through it fails.
    pub(super) discovered: RwLock<Option<(Endpoints, Instant)>>,
    /// How long a discovery result is trusted.
    pub(super) discovery_ttl: Duration,
    /// The shared HTTP client every call to the provider goes through.
    pub(super) http: ProviderHttp,
    /// The cap on calls in flight and the circuit breaker of this provider.
    pub(super) guard: super::guard::Guard,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("tool", &self.tool)
            .field("client", &self.client)
            .field("issuer", &self.issuer)
            .field("mcp", &self.mcp)
            .field("scopes", &self.scopes)
            .field("redirect_uri", &self.redirect_uri)
            .finish_non_exhaustive()
    }
}

impl Provider {
    /// What a credential remembers of the provider it was stored for: every URL its tokens can
    /// be sent to, as configured (the issuer whose discovery is trusted, and any token or
    /// revocation endpoint set explicitly). A stored token is only sent to a provider whose
    /// binding matches, so editing the providers file cannot redirect it. A tool named by its
    /// issuer alone binds to just the issuer, the same value the first version recorded.
    ///
    /// The authorization endpoint is deliberately not part of it: no token is ever sent there
    /// (the browser carries only a code back from it, and that code goes to the token endpoint,
    /// which is bound), and adding it would change the binding of every existing preset tool.
    ///
    /// An MCP tool binds to its resource, the issuer discovery names and the vault's client
    /// there, so a credential is never sent to an authorization server other than the one that
    /// minted it, nor under another client than the one it was issued to.
    pub async fn binding(&self) -> Result<String, ProviderError> {
        Ok(self.resolve(None).await?.binding)
    }

    /// Whether a credential bound to `bound` may still go where the tool resolves to now;
    /// [`ProviderError::ServerChanged`] when it may not. Registers nowhere new to find out.
    pub async fn check_bound(&self, bound: Option<&str>) -> Result<(), ProviderError> {
        self.resolve(bound).await.map(|_| ())
    }

    /// The binding to record when [`Self::binding`] cannot be resolved now: for an MCP tool it
    /// names no issuer or client, so it matches none and the credential is never refreshed
    /// through an unverified server.
    pub fn unresolved_binding(&self) -> String {
        match &self.mcp {
            Some(mcp) => mcp_binding(&mcp.resource, "", ""),
            None => self.configured_binding(),
        }
    }

    /// Endpoints, client and binding, looked up once for one operation: every request of the
    /// operation goes where this says. With `bound`, it must be what the credential or flow is
    /// bound to ([`ProviderError::ServerChanged`] otherwise); the issuer is compared before the
    /// client is looked up, so the vault never registers at a server it will not use.
    async fn resolve(&self, bound: Option<&str>) -> Result<Resolved, ProviderError> {
        let endpoints = self.endpoints().await?;
        if self.mcp.is_some()
            && let Some(issuer) = bound.and_then(|b| binding_field(b, "issuer"))
            && endpoints.issuer.as_deref() != Some(issuer)
        {
            return Err(self.changed());
        }
        let credentials = self.credentials(&endpoints).await?;
        let binding = match &self.mcp {
            Some(mcp) => mcp_binding(
                &mcp.resource,
                endpoints.issuer.as_deref().unwrap_or(""),
                credentials.id.as_str(),
            ),
            None => self.configured_binding(),
        };
        if bound.is_some_and(|bound| bound != binding) {
            return Err(self.changed());
        }
        Ok(Resolved {
            endpoints,
            credentials,
            binding,
        })
    }

    fn changed(&self) -> ProviderError {
        tracing::warn!(tool = %self.tool, "the tool's authorization server or client changed since the credential or flow was bound; nothing is sent");
        ProviderError::ServerChanged(format!(
            "tool {} now names a different authorization server or client than the one this was issued by",
            self.tool
        ))
    }

    /// The `resource` (RFC 8707) this tool's tokens are for: an MCP tool's canonical URI.
    pub fn resource(&self) -> Option<&str> {
        self.mcp.as_ref().map(|m| m.resource.as_str())
    }

    fn configured_binding(&self) -> String {
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
        if let Some(mcp) = &self.mcp {
            let cached = self.discovered.read().await.clone();
            if let Some((endpoints, at)) = cached
                && at.elapsed() < self.discovery_ttl
            {
                return Ok(endpoints);
            }
            let endpoints = self.discover_mcp(mcp).await?;
            *self.discovered.write().await = Some((endpoints.clone(), Instant::now()));
            return Ok(endpoints);
        }
        let Some(issuer) = &self.issuer else {
            return Ok(Endpoints {
                // Loading guarantees a token URL when there is no issuer.
                token_url: self
                    .fixed_token_url
                    .clone()
                    .ok_or_else(|| ProviderError::unavailable("no token URL"))?,
                token_origin: Origin::Configured,
                revocation_url: self.fixed_revocation_url.clone(),
                revocation_origin: Origin::Configured,
                authorization_url: self.fixed_authorization_url.clone(),
                iss_parameter_supported: false,
                issuer: None,
                server: None,
                discovered_scopes: Vec::new(),
            });
        };
        let cached = self.discovered.read().await.clone();
        if let Some((endpoints, at)) = cached
            && at.elapsed() < self.discovery_ttl
        {
            return Ok(endpoints);
        }
        let mut document = None;
        for suffix in [
            "/.well-known/oauth-authorization-server",
            "/.well-known/openid-configuration",
        ] {
            match self
                .http
                .get_json(Origin::Configured, &format!("{issuer}{suffix}"))
                .await
            {
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
        let origin = |fixed: bool| {
            if fixed {
                Origin::Configured
            } else {
                Origin::Derived
            }
        };
        let token_origin = origin(self.fixed_token_url.is_some());
        let revocation_origin = origin(self.fixed_revocation_url.is_some());
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
        let authorization_url = self.fixed_authorization_url.clone().or_else(|| {
            field("authorization_endpoint")
                .and_then(|u| https_url(&self.tool, "authorization_endpoint", &u).ok())
                .and_then(|u| url::Url::parse(&u).ok())
        });
        let endpoints = Endpoints {
            token_url,
            token_origin,
            revocation_url,
            revocation_origin,
            authorization_url,
            iss_parameter_supported: document
                .get("authorization_response_iss_parameter_supported")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            issuer: Some(issuer.clone()),
            server: None,
            discovered_scopes: Vec::new(),
        };
        *self.discovered.write().await = Some((endpoints.clone(), Instant::now()));
        Ok(endpoints)
    }

    /// Discovery for a tool that is only an MCP server URL. Every endpoint was named by a
    /// response, so each call to it is held to the egress policy.
    async fn discover_mcp(&self, mcp: &McpSource) -> Result<Endpoints, ProviderError> {
        let found = super::mcp::discover(self.http.outbound(), &self.tool, &mcp.server)
            .await
            .map_err(|e| {
                tracing::info!(tool = %self.tool, error = %e, "MCP discovery failed");
                ProviderError::unavailable(e.to_string())
            })?;
        let server = found.authorization_server;
        let discovered_scopes = match found.challenge.as_ref().and_then(|c| c.scope.as_deref()) {
            Some(scope) => scope
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            None => found.scopes_supported.clone(),
        };
        Ok(Endpoints {
            discovered_scopes,
            token_url: TokenUrl::from_url(server.token_endpoint.clone()),
            token_origin: Origin::Derived,
            revocation_url: server
                .revocation_endpoint
                .clone()
                .map(RevocationUrl::from_url),
            revocation_origin: Origin::Derived,
            authorization_url: Some(server.authorization_endpoint.clone()),
            iss_parameter_supported: server.authorization_response_iss_parameter_supported,
            issuer: Some(server.issuer.clone()),
            server: Some(Arc::new(server)),
        })
    }

    async fn forget_discovery(&self) {
        if self.issuer.is_some() || self.mcp.is_some() {
            *self.discovered.write().await = None;
        }
    }

    /// The client to call `endpoints` as: the configured one, or the vault's registration at an
    /// MCP tool's authorization server (made now if there is none). A configured client of an
    /// MCP tool is only used at the issuer it was configured for, so its secret never goes to a
    /// server the metadata names later.
    async fn credentials(&self, endpoints: &Endpoints) -> Result<ClientCredentials, ProviderError> {
        if let Some(client) = &self.client {
            if self.mcp.is_some()
                && let Some(configured) = &self.issuer
                && endpoints
                    .issuer
                    .as_deref()
                    .is_none_or(|found| !same_issuer(found, configured))
            {
                return Err(ProviderError::unavailable(format!(
                    "tool {}: the MCP server names authorization server {}, not the configured issuer {configured} its client belongs to",
                    self.tool,
                    endpoints.issuer.as_deref().unwrap_or("(none)")
                )));
            }
            return Ok(client.clone());
        }
        match (&self.registrar, &endpoints.server) {
            (Some(registrar), Some(server)) => {
                registrar
                    .client(&self.tool, server, self.redirect_uri.as_deref())
                    .await
            }
            _ => Err(ProviderError::unavailable(format!(
                "tool {}: no client is configured or registered",
                self.tool
            ))),
        }
    }

    /// After the authorization server answered `invalid_client` to a registered client: drops
    /// the registration, so the next use registers anew (once; never in a loop).
    async fn client_rejected(&self, endpoints: &Endpoints, client: &ClientCredentials) {
        if !client.registered {
            return;
        }
        if let (Some(registrar), Some(issuer)) = (&self.registrar, &endpoints.issuer) {
            registrar
                .forget(&self.tool, issuer, client.id.as_str())
                .await;
        }
    }

    /// A consent bound to `bound` came back with `unauthorized_client` or `invalid_client`
    /// (RFC 6749 §4.1.2.1): if that client is the vault's registration, drop it so the next
    /// Begin registers anew.
    pub async fn client_refused_at_authorization(&self, bound: &str) {
        let (Some(registrar), Some(issuer), Some(client)) = (
            &self.registrar,
            binding_field(bound, "issuer"),
            binding_client(bound),
        ) else {
            return;
        };
        registrar.forget(&self.tool, issuer, client).await;
    }

    fn client(
        endpoints: &Endpoints,
        credentials: &ClientCredentials,
    ) -> oauth2::basic::BasicClient<
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointMaybeSet,
        oauth2::EndpointSet,
    > {
        let client = BasicClient::new(credentials.id.clone())
            .set_token_uri(endpoints.token_url.clone())
            .set_revocation_url_option(endpoints.revocation_url.clone());
        match &credentials.secret {
            // A public client (RFC 7591 `none`, PKCE only) names itself in the body.
            None => client.set_auth_type(AuthType::RequestBody),
            Some(secret) => client
                .set_client_secret(ClientSecret::new(secret.expose_secret().to_string()))
                .set_auth_type(match credentials.auth_style {
                    AuthStyle::Basic => AuthType::BasicAuth,
                    AuthStyle::Post => AuthType::RequestBody,
                }),
        }
    }

    /// Whether revocation at the provider is possible for this tool.
    pub async fn can_revoke(&self) -> bool {
        if self.fixed_revocation_url.is_some() {
            return true;
        }
        (self.issuer.is_some() || self.mcp.is_some())
            && self
                .endpoints()
                .await
                .is_ok_and(|e| e.revocation_url.is_some())
    }

    /// Exchanges `refresh_token` for new tokens.
    #[tracing::instrument(skip(self, refresh_token), fields(tool = %self.tool))]
    ///
    /// `bound` is the credential's binding: when the provider now resolves to another
    /// authorization server or client, nothing is sent ([`ProviderError::ServerChanged`]).
    /// Returns the binding the new tokens belong to.
    pub async fn refresh(
        &self,
        refresh_token: &SecretString,
        bound: Option<&str>,
    ) -> Result<(Refreshed, String), ProviderError> {
        self.guard
            .run(&self.tool, self.refresh_unguarded(refresh_token, bound))
            .await
    }

    async fn refresh_unguarded(
        &self,
        refresh_token: &SecretString,
        bound: Option<&str>,
    ) -> Result<(Refreshed, String), ProviderError> {
        let resolved = self.resolve(bound).await?;
        let Resolved {
            endpoints,
            credentials,
            binding,
        } = resolved;
        let http = self.http.to(endpoints.token_origin);
        let client = Self::client(&endpoints, &credentials);
        let token = RefreshToken::new(refresh_token.expose_secret().to_string());
        let mut request = client.exchange_refresh_token(&token);
        if let Some(resource) = self.resource() {
            request = request.add_extra_param("resource", resource.to_string());
        }
        let result = request.request_async(&http).await;
        match result {
            Ok(response) => Ok((tokens(&response)?, binding)),
            Err(RequestTokenError::ServerResponse(response)) => match response.error() {
                BasicErrorResponseType::InvalidGrant => {
                    Err(ProviderError::GrantRejected("invalid_grant".into()))
                }
                BasicErrorResponseType::UnauthorizedClient => {
                    Err(ProviderError::GrantRejected("unauthorized_client".into()))
                }
                // The refresh token belongs to the client that was rejected; a new
                // registration cannot use it, so only a new consent helps.
                BasicErrorResponseType::InvalidClient if credentials.registered => {
                    self.client_rejected(&endpoints, &credentials).await;
                    Err(ProviderError::GrantRejected(REGISTRATION_REJECTED.into()))
                }
                other => Err(ProviderError::unavailable(format!(
                    "the provider refused the refresh ({}); check the client registration",
                    error_code(other.as_ref())
                ))),
            },
            Err(err) => {
                self.forget_discovery().await;
                Err(classify(&self.tool, err))
            }
        }
    }

    /// The tool's default scopes (the providers file's `scopes`).
    pub fn default_scopes(&self) -> &[String] {
        &self.scopes
    }

    /// The scopes a consent asks for when the caller names none: the providers file's, else
    /// for an MCP tool what its server asks for (the challenge's `scope`, then
    /// `scopes_supported`), else none (the provider's default applies).
    pub async fn consent_scopes(&self) -> Result<Vec<String>, ProviderError> {
        if !self.scopes.is_empty() || self.mcp.is_none() {
            return Ok(self.scopes.clone());
        }
        Ok(self.endpoints().await?.discovered_scopes)
    }

    /// The tool's own redirect_uri, overriding the server-wide one.
    pub fn redirect_uri(&self) -> Option<&str> {
        self.redirect_uri.as_deref()
    }

    /// The provider's authorization URL for a consent flow: response_type=code, client_id,
    /// redirect_uri, state, scope (space-joined, omitted when empty), code_challenge and
    /// code_challenge_method=S256 always, then the extra params. Discovery failure ->
    /// [`ProviderError::Unavailable`].
    #[tracing::instrument(skip(self, request), fields(tool = %self.tool))]
    ///
    /// Returns the URL and the binding it was made for, which the flow keeps.
    pub async fn authorization_url(
        &self,
        request: &AuthorizationRequest<'_>,
    ) -> Result<(url::Url, String), ProviderError> {
        if self.mcp.is_some() {
            let Resolved {
                endpoints,
                credentials,
                binding,
            } = self.resolve(None).await?;
            let endpoint = endpoints.authorization_url.clone().ok_or_else(|| {
                ProviderError::unavailable("discovery found no authorization_endpoint")
            })?;
            let mut extra = self.extra_authorize_params.clone();
            if let Some(resource) = self.resource() {
                extra.push(("resource".into(), resource.to_string()));
            }
            return Ok((
                build_authorization_url(endpoint, credentials.id.as_str(), request, &extra),
                binding,
            ));
        }
        let Some(client) = &self.client else {
            return Err(ProviderError::unavailable(
                "no client is configured for this tool",
            ));
        };
        // An explicit or preset endpoint needs no discovery.
        let endpoint = match &self.fixed_authorization_url {
            Some(url) => url.clone(),
            None if self.issuer.is_some() => {
                self.endpoints().await?.authorization_url.ok_or_else(|| {
                    ProviderError::unavailable(
                        "discovery document has no https authorization_endpoint",
                    )
                })?
            }
            None => {
                return Err(ProviderError::unavailable(
                    "no authorization endpoint is configured for this tool",
                ));
            }
        };
        Ok((
            build_authorization_url(
                endpoint,
                client.id.as_str(),
                request,
                &self.extra_authorize_params,
            ),
            self.configured_binding(),
        ))
    }

    /// Exchanges an authorization code (RFC 6749 §4.1.3) with the PKCE verifier (RFC 7636) and
    /// the same redirect_uri, authenticating as configured (basic/post). `invalid_grant` (the
    /// code refused, expired or reused, or the verifier wrong) is
    /// [`ProviderError::GrantRejected`]; a call the provider's guard holds back is
    /// [`ProviderError::Paused`]; anything else is [`ProviderError::Unavailable`].
    #[tracing::instrument(skip(self, code, verifier), fields(tool = %self.tool))]
    pub async fn exchange_code(
        &self,
        code: &SecretString,
        verifier: &SecretString,
        redirect_uri: &str,
        bound: Option<&str>,
    ) -> Result<(Refreshed, String), ProviderError> {
        self.guard
            .run(
                &self.tool,
                self.exchange_code_unguarded(code, verifier, redirect_uri, bound),
            )
            .await
    }

    async fn exchange_code_unguarded(
        &self,
        code: &SecretString,
        verifier: &SecretString,
        redirect_uri: &str,
        bound: Option<&str>,
    ) -> Result<(Refreshed, String), ProviderError> {
        let redirect = RedirectUrl::new(redirect_uri.to_string())
            .map_err(|_| ProviderError::unavailable("the redirect URI is not a URL"))?;
        // The code and verifier go only to the server and client the flow began with.
        let resolved = self.resolve(bound).await?;
        let Resolved {
            endpoints,
            credentials,
            binding,
        } = resolved;
        let http = self.http.to(endpoints.token_origin);
        let client = Self::client(&endpoints, &credentials);
        let mut request = client
            .exchange_code(AuthorizationCode::new(code.expose_secret().to_string()))
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.expose_secret().to_string()))
            .set_redirect_uri(Cow::Owned(redirect));
        if let Some(resource) = self.resource() {
            request = request.add_extra_param("resource", resource.to_string());
        }
        let result = request.request_async(&http).await;
        match result {
            Ok(response) => Ok((tokens(&response)?, binding)),
            // RFC 6749 §5.2 and RFC 7636 §4.6: a bad, expired or replayed code and a wrong
            // verifier all answer invalid_grant; only a new consent helps.
            Err(RequestTokenError::ServerResponse(response))
                if matches!(response.error(), BasicErrorResponseType::InvalidGrant) =>
            {
                Err(ProviderError::GrantRejected("invalid_grant".into()))
            }
            Err(RequestTokenError::ServerResponse(response))
                if credentials.registered
                    && matches!(response.error(), BasicErrorResponseType::InvalidClient) =>
            {
                self.client_rejected(&endpoints, &credentials).await;
                Err(ProviderError::GrantRejected(REGISTRATION_REJECTED.into()))
            }
            Err(RequestTokenError::ServerResponse(response)) => {
                Err(ProviderError::unavailable(format!(
                    "the provider refused the code exchange ({}); check the client registration",
                    error_code(response.error().as_ref())
                )))
            }
            Err(err) => {
                self.forget_discovery().await;
                Err(classify(&self.tool, err))
            }
        }
    }

    /// RFC 9207: checks the `iss` parameter of an authorization response. With an issuer
    /// configured, a present `iss` must be it (allowing a trailing slash), and a missing one is
    /// refused when the discovery document promises it
    /// (`authorization_response_iss_parameter_supported`) or cannot be loaded to tell. Without
    /// an issuer configured, `iss` is ignored. The error is a short message safe to show.
    #[tracing::instrument(skip(self), fields(tool = %self.tool))]
    ///
    /// An MCP tool's issuer is the one its flow began with (`bound`), never what discovery
    /// names at callback time.
    pub async fn check_callback_issuer(
        &self,
        iss: Option<&str>,
        bound: Option<&str>,
    ) -> Result<(), super::CallbackIssuerError> {
        let issuer = match (&self.mcp, &self.issuer) {
            (Some(_), _) => bound
                .and_then(|b| binding_field(b, "issuer"))
                .filter(|i| !i.is_empty())
                .ok_or_else(|| {
                    super::CallbackIssuerError::Mismatch(
                        "the flow does not record the authorization server it began with".into(),
                    )
                })?,
            (None, Some(issuer)) => issuer.as_str(),
            (None, None) => return Ok(()),
        };
        let promised = match iss {
            Some(_) => false,
            // Failing closed: the response may come from a mix-up attacker's server, and
            // without the metadata the vault cannot know the real one would have said who it is.
            None => {
                self.endpoints()
                    .await
                    .map_err(|_| {
                        super::CallbackIssuerError::Unverifiable(
                            "the provider's metadata could not be loaded".to_string(),
                        )
                    })?
                    .iss_parameter_supported
            }
        };
        check_issuer(issuer, iss, promised).map_err(super::CallbackIssuerError::Mismatch)
    }

    /// Revokes one token at the provider (RFC 7009). An unknown or already-revoked token is
    /// success: revocation is idempotent.
    #[tracing::instrument(skip(self, token), fields(tool = %self.tool, ?kind))]
    ///
    /// `bound` is the credential's binding, held as in [`Self::refresh`].
    pub async fn revoke(
        &self,
        token: &SecretString,
        kind: TokenKind,
        bound: Option<&str>,
    ) -> Result<(), ProviderError> {
        self.guard
            .run(&self.tool, self.revoke_unguarded(token, kind, bound))
            .await
    }

    async fn revoke_unguarded(
        &self,
        token: &SecretString,
        kind: TokenKind,
        bound: Option<&str>,
    ) -> Result<(), ProviderError> {
        let resolved = self.resolve(bound).await?;
        let Resolved {
            endpoints,
            credentials,
            ..
        } = resolved;
        if endpoints.revocation_url.is_none() {
            return Err(ProviderError::unavailable(
                "the provider has no revocation endpoint",
            ));
        }
        let http = self.http.to(endpoints.revocation_origin);
        let client = Self::client(&endpoints, &credentials);
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
        match request.request_async(&http).await {
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
                Err(classify(&self.tool, err))
            }
        }
    }
}

/// What the vault says when the authorization server no longer knows its registered client.
const REGISTRATION_REJECTED: &str = "invalid_client: the authorization server rejected the vault's registration; it is renewed at the next authorization";

/// One operation's endpoints, client, and the binding they make.
struct Resolved {
    endpoints: Endpoints,
    credentials: ClientCredentials,
    binding: String,
}

/// What an MCP tool's credential is bound to: its resource, the issuer that minted it and the
/// client it was issued to (last: a client ID is the one field that may hold spaces).
fn mcp_binding(resource: &str, issuer: &str, client: &str) -> String {
    format!("mcp resource={resource} issuer={issuer} client={client}")
}

/// A space-free field (`resource`, `issuer`) of an MCP binding.
fn binding_field<'a>(binding: &'a str, key: &str) -> Option<&'a str> {
    binding
        .strip_prefix("mcp ")?
        .split(' ')
        .find_map(|part| part.strip_prefix(key)?.strip_prefix('='))
}

/// The client of an MCP binding.
fn binding_client(binding: &str) -> Option<&str> {
    binding
        .strip_prefix("mcp ")?
        .split_once(" client=")
        .map(|(_, client)| client)
        .filter(|c| !c.is_empty())
}

/// The pure half of [`Provider::check_callback_issuer`]: `promised` is whether the provider's
/// metadata says every authorization response carries `iss`.
pub(super) fn check_issuer(issuer: &str, iss: Option<&str>, promised: bool) -> Result<(), String> {
    match iss {
        Some(named) if same_issuer(named, issuer) => Ok(()),
        Some(_) => Err("the authorization response names another issuer (RFC 9207)".into()),
        None if promised => {
            Err("the authorization response lacks the issuer it must carry (RFC 9207)".into())
        }
        None => Ok(()),
    }
}

/// `endpoint` with the consent flow's parameters. A query the endpoint already has is kept
/// (RFC 6749 §3.1), less any parameter the vault sets, so none appears twice.
fn build_authorization_url(
    mut endpoint: url::Url,
    client_id: &str,
    request: &AuthorizationRequest<'_>,
    extra: &[(String, String)],
) -> url::Url {
    let kept: Vec<(String, String)> = endpoint
        .query_pairs()
        .filter(|(key, _)| !is_reserved_authorize_param(key))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    endpoint.set_query(None);
    {
        let mut query = endpoint.query_pairs_mut();
        query.extend_pairs(&kept);
        query
            .append_pair("response_type", "code")
            .append_pair("client_id", client_id)
            .append_pair("redirect_uri", request.redirect_uri)
            .append_pair("state", request.state);
        if !request.scopes.is_empty() {
            query.append_pair("scope", &request.scopes.join(" "));
        }
        query
            .append_pair("code_challenge", request.code_challenge)
            .append_pair("code_challenge_method", "S256");
        // Loading refuses reserved keys; filtered again so no configuration path can override
        // state or PKCE.
        query.extend_pairs(
            extra
                .iter()
                .filter(|(key, _)| !is_reserved_authorize_param(key)),
        );
    }
    endpoint
}

/// What the vault takes from a successful token response, for refresh and code exchange alike.
pub(super) fn tokens(response: &impl TokenResponse) -> Result<Refreshed, ProviderError> {
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
        // Clamped again here: whatever the provider said, the arithmetic on it stays in range
        // (the HTTP layer already normalised the JSON).
        expires_in: response
            .expires_in()
            .map(|d| d.clamp(MIN_EXPIRES_IN, MAX_EXPIRES_IN)),
        scopes: response
            .scopes()
            .map(|s| s.iter().map(|s| s.to_string()).collect()),
    })
}

#[cfg(test)]
mod binding_tests {
    use super::*;

    #[test]
    fn an_mcp_binding_reads_back_its_issuer_and_client() {
        let bound = mcp_binding("https://mcp.example/mcp", "https://as.example", "c 1");
        assert_eq!(binding_field(&bound, "issuer"), Some("https://as.example"));
        assert_eq!(
            binding_field(&bound, "resource"),
            Some("https://mcp.example/mcp")
        );
        assert_eq!(binding_client(&bound), Some("c 1"));
        assert_eq!(binding_field("https://idp.example", "issuer"), None);
        assert_eq!(
            binding_field("issuer=https://idp.example token= revocation=", "issuer"),
            None
        );
        assert_eq!(binding_client(&mcp_binding("r", "", "")), None);
    }
}
