//! OAuth2 providers: the registry mapping each tool to its authorization server, and what the
//! vault does there — the consent flow's authorization URL and code exchange (RFC 6749 §4.1 with
//! PKCE, RFC 7636), refresh (RFC 6749 §6) and revocation (RFC 7009).

pub mod clients;
mod guard;
mod http;
pub mod mcp;
mod presets;
mod provider;
pub mod registration;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use oauth2::basic::BasicRevocationErrorResponse;
use oauth2::{ClientId, RequestTokenError, RevocationErrorResponseType, RevocationUrl, TokenUrl};
use secrecy::SecretString;
use serde::Deserialize;
use tokio::sync::RwLock;

pub use clients::Registrar;
pub use guard::GuardSettings;
pub use http::ProviderHttp;
pub use provider::{AuthorizationRequest, Provider};

use crate::http::{HttpError, Outbound};
use crate::ids::Tool;

/// How client credentials travel on token and revocation calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStyle {
    /// HTTP Basic (`client_secret_basic`).
    Basic,
    /// Form body (`client_secret_post`).
    Post,
}

/// The client the vault is at an authorization server: configured, or registered by the vault.
#[derive(Clone)]
pub struct ClientCredentials {
    /// `client_id`.
    pub id: ClientId,
    /// The client secret; `None` for a public client (PKCE only).
    pub secret: Option<SecretString>,
    /// How the secret travels.
    pub auth_style: AuthStyle,
    /// Registered by the vault (RFC 7591), so renewed when the server rejects it; a configured
    /// client is the operator's to fix.
    pub registered: bool,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("id", &self.id.as_str())
            .field("secret", &self.secret.as_ref().map(|_| "[redacted]"))
            .field("auth_style", &self.auth_style)
            .field("registered", &self.registered)
            .finish()
    }
}

/// What a provider call can end in.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider refused the grant itself (`invalid_grant`, `unauthorized_client`): only a
    /// new consent helps. Retrying would be futile.
    #[error("the provider rejected the grant ({0})")]
    GrantRejected(String),
    /// The tool now resolves to another authorization server or client than the one the
    /// credential or flow is bound to: nothing was sent, and only a new consent helps.
    #[error("{0}")]
    ServerChanged(String),
    /// Unreachable, slow, 5xx, 429, or an unusable answer: the credential is kept and the call
    /// may be retried after `retry_after` if the provider said.
    #[error("{message}")]
    Unavailable {
        /// Safe to show: never contains a token.
        message: String,
        /// The provider's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// The vault's own guard for this provider refused the call (its breaker is open, or its
    /// calls in flight are at the cap): nothing was sent, so it says nothing about this
    /// credential and must not count as its failure.
    #[error("{message}")]
    Paused {
        /// Safe to show.
        message: String,
        /// When the guard may let a call through again, if it knows.
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

/// Why a callback's `iss` (RFC 9207) was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackIssuerError {
    /// It names another issuer, or lacks one the provider promised: refuse the response.
    #[error("{0}")]
    Mismatch(String),
    /// The provider's metadata cannot be loaded now to tell; the response may be fine later.
    #[error("{0}")]
    Unverifiable(String),
}

/// Tokens from the token endpoint: a successful refresh or code exchange.
#[derive(Debug)]
pub struct Refreshed {
    /// The new access token.
    pub access_token: SecretString,
    /// A new (on exchange) or rotated (on refresh) refresh token, when the provider issued one.
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

/// Shortest access-token lifetime taken from a provider.
pub const MIN_EXPIRES_IN: Duration = Duration::from_secs(1);
/// Longest access-token lifetime taken from a provider: a year.
pub const MAX_EXPIRES_IN: Duration = Duration::from_secs(365 * 86_400);

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
    /// `VAULT_EGRESS_ALLOW_CIDRS`: where derived URLs may go beyond public addresses.
    pub egress: crate::egress::EgressPolicy,
    /// `VAULT_DISCOVERY_TTL_SECONDS`: how long discovered metadata is trusted.
    pub discovery_ttl: Duration,
    /// Each provider's cap on calls in flight and its circuit breaker.
    pub guard: GuardSettings,
}

impl ProviderSettings {
    /// The outbound client's settings: these limits apply to every request the vault makes.
    pub fn http(&self) -> crate::http::HttpSettings {
        crate::http::HttpSettings {
            ca_file: self.ca_file.clone(),
            connect_timeout: self.connect_timeout,
            timeout: self.timeout,
            egress: self.egress.clone(),
        }
    }
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
    mcp_server: Option<String>,
    issuer: Option<String>,
    token_url: Option<String>,
    revocation_url: Option<String>,
    client_id: Option<String>,
    client_secret_env: Option<String>,
    client_secret_file: Option<PathBuf>,
    client_secret: Option<String>,
    auth_style: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
    authorization_url: Option<String>,
    #[serde(default)]
    extra_authorize_params: BTreeMap<String, String>,
    redirect_uri: Option<String>,
}

/// Authorization-URL parameters the vault sets itself, so a providers file cannot: overriding
/// any of the first seven would break the flow or its CSRF/PKCE protection. `code_verifier` and
/// `client_secret` are secrets that must never travel in a browser's URL; `request` and
/// `request_uri` (RFC 9101) would replace every parameter the vault set; `response_mode` decides
/// how the response reaches the vault's callback, which is the callback's choice. `nonce` is
/// allowed: the vault does not set one, and a provider may want it.
const RESERVED_AUTHORIZE_PARAMS: &[&str] = &[
    "response_type",
    "client_id",
    "redirect_uri",
    "state",
    "code_challenge",
    "code_challenge_method",
    "scope",
    "code_verifier",
    "client_secret",
    "request",
    "request_uri",
    "response_mode",
];

/// Whether `key` is a parameter the vault sets on the authorization URL. Compared without case:
/// a server that reads parameters case-insensitively must not see two of one.
fn is_reserved_authorize_param(key: &str) -> bool {
    RESERVED_AUTHORIZE_PARAMS
        .iter()
        .any(|reserved| reserved.eq_ignore_ascii_case(key))
}

/// The provider registry: one [`Provider`] per configured tool.
#[derive(Debug, Clone)]
pub struct Providers {
    by_tool: Arc<HashMap<String, Arc<Provider>>>,
    registrar: Option<Arc<Registrar>>,
}

/// How a tool's entry is loaded: what every provider shares.
struct Loading<'a> {
    file: &'a Path,
    http: &'a ProviderHttp,
    discovery_ttl: Duration,
    guard: GuardSettings,
    registrar: Option<&'a Arc<Registrar>>,
}

fn https_url(tool: &str, key: &str, value: &str) -> anyhow::Result<String> {
    let parsed = url::Url::parse(value)
        .map_err(|e| anyhow::anyhow!("tools.{tool}.{key}: not a URL: {e}"))?;
    if parsed.scheme() != "https" {
        anyhow::bail!("tools.{tool}.{key}: must be an https:// URL");
    }
    Ok(value.to_string())
}

/// A URL the operator wrote for the vault to call: `https://`, or `http://` to a loopback host;
/// its destination is trusted (an authorization server may live on a private address).
fn configured_url(tool: &str, key: &str, value: &str) -> anyhow::Result<String> {
    crate::http::check_configured(value)
        .map_err(|problem| anyhow::anyhow!("tools.{tool}.{key}: {problem}"))?;
    Ok(value.to_string())
}

/// An absolute http(s) URL without a fragment (RFC 6749 §3.1.2), for redirect URIs: a local
/// development callback may be plain http.
/// A redirect URI: where the provider sends the browser with a code, so `https://`, or
/// `http://` to a loopback host only (RFC 9700 §2.6); no user info, no fragment.
fn redirect_url(tool: &str, key: &str, value: &str) -> anyhow::Result<String> {
    crate::config::check_web_url(value)
        .map_err(|problem| anyhow::anyhow!("tools.{tool}.{key}: {problem}"))?;
    Ok(value.to_string())
}

impl Providers {
    /// No providers: every refresh answers "no provider configured".
    pub fn none() -> Self {
        Self {
            by_tool: Arc::new(HashMap::new()),
            registrar: None,
        }
    }

    /// Loads `VAULT_PROVIDERS_FILE`, resolving client secrets now so a missing one stops startup.
    /// Every provider call goes through `outbound`; MCP tools without a configured client
    /// register through `registrar`.
    pub fn load(
        settings: &ProviderSettings,
        outbound: &Outbound,
        registrar: Option<Arc<Registrar>>,
    ) -> anyhow::Result<Self> {
        let http = ProviderHttp::new(outbound.clone());
        let Some(path) = &settings.file else {
            return Ok(Self::none());
        };
        let file: ProvidersFile = figment::Figment::from(
            <figment::providers::Toml as figment::providers::Format>::file_exact(path),
        )
        .extract()
        .map_err(|e| anyhow::anyhow!("VAULT_PROVIDERS_FILE ({}): {e}", path.display()))?;
        let loading = Loading {
            file: path,
            http: &http,
            discovery_ttl: settings.discovery_ttl,
            guard: settings.guard,
            registrar: registrar.as_ref(),
        };
        Self::from_file(file, &loading)
    }

    fn from_file(file: ProvidersFile, loading: &Loading<'_>) -> anyhow::Result<Self> {
        let mut by_tool = HashMap::new();
        for (tool, entry) in file.tools {
            let provider = Self::provider(&tool, entry, loading).map_err(|e| {
                anyhow::anyhow!("VAULT_PROVIDERS_FILE ({}): {e:#}", loading.file.display())
            })?;
            by_tool.insert(tool, Arc::new(provider));
        }
        tracing::info!(tools = by_tool.len(), "loaded OAuth provider registry");
        let registrar = by_tool
            .values()
            .any(|p| p.registrar.is_some())
            .then(|| loading.registrar.cloned())
            .flatten();
        Ok(Self {
            by_tool: Arc::new(by_tool),
            registrar,
        })
    }

    /// The registrar, when a tool registers the vault: it serves the vault's client metadata
    /// document.
    pub fn registrar(&self) -> Option<&Arc<Registrar>> {
        self.registrar.as_ref()
    }

    /// A tool configured by `mcp_server`: the MCP server's URL (https, or http on loopback for
    /// development), and optionally a pre-registered client; everything else is discovered.
    fn mcp_provider(
        tool: &str,
        server: &str,
        entry: ToolEntry,
        loading: &Loading<'_>,
    ) -> anyhow::Result<Provider> {
        let server = configured_url(tool, "mcp_server", server)?;
        let server = url::Url::parse(&server)?;
        for (key, set) in [
            ("preset", entry.preset.is_some()),
            (
                "issuer",
                entry.issuer.is_some() && entry.client_id.is_none(),
            ),
            ("token_url", entry.token_url.is_some()),
            ("revocation_url", entry.revocation_url.is_some()),
            ("authorization_url", entry.authorization_url.is_some()),
            (
                "auth_style",
                entry.auth_style.is_some() && entry.client_id.is_none(),
            ),
        ] {
            if set {
                anyhow::bail!(
                    "tools.{tool}.{key}: an mcp_server tool discovers its authorization server; remove {key}"
                );
            }
        }
        Self::check_extra_params(tool, &entry.extra_authorize_params)?;
        if entry
            .extra_authorize_params
            .keys()
            .any(|k| k.eq_ignore_ascii_case("resource"))
        {
            anyhow::bail!(
                "tools.{tool}.extra_authorize_params.resource: the vault sends the MCP server's canonical URI itself"
            );
        }
        // A pre-registered client belongs to one authorization server: `issuer` names it, and
        // a client secret is only ever sent there.
        let issuer = entry
            .issuer
            .map(|i| configured_url(tool, "issuer", i.trim_end_matches('/')))
            .transpose()?;
        let client = match entry.client_id {
            Some(id) => {
                let secret = Self::client_secret(
                    tool,
                    entry.client_secret_env,
                    entry.client_secret_file,
                    entry.client_secret,
                    loading.file,
                    true,
                )?;
                if secret.is_some() && issuer.is_none() {
                    anyhow::bail!(
                        "tools.{tool}.issuer: an mcp_server tool with a client secret needs the issuer the client is registered at, so the secret never goes to another"
                    );
                }
                Some(ClientCredentials {
                    id: ClientId::new(id),
                    secret,
                    auth_style: Self::auth_style(tool, entry.auth_style.as_deref(), None)?,
                    registered: false,
                })
            }
            None => {
                if entry.client_secret_env.is_some()
                    || entry.client_secret_file.is_some()
                    || entry.client_secret.is_some()
                {
                    anyhow::bail!("tools.{tool}: a client secret needs client_id");
                }
                if loading.registrar.is_none() {
                    anyhow::bail!(
                        "tools.{tool}: without client_id the vault registers itself, which needs OAUTH_TOOL_REDIRECT_URI"
                    );
                }
                None
            }
        };
        let redirect_uri = entry
            .redirect_uri
            .map(|u| redirect_url(tool, "redirect_uri", &u))
            .transpose()?;
        Ok(Provider {
            guard: guard::Guard::new(loading.guard),
            http: loading.http.clone(),
            tool: tool.to_string(),
            registrar: if client.is_none() {
                loading.registrar.cloned()
            } else {
                None
            },
            client,
            fixed_token_url: None,
            fixed_revocation_url: None,
            fixed_authorization_url: None,
            extra_authorize_params: entry.extra_authorize_params.into_iter().collect(),
            scopes: entry.scopes,
            redirect_uri,
            issuer,
            mcp: Some(provider::McpSource {
                resource: mcp::canonical_resource(&server),
                server,
            }),
            discovered: RwLock::new(None),
            discovery_ttl: loading.discovery_ttl,
        })
    }

    fn auth_style(
        tool: &str,
        named: Option<&str>,
        preset: Option<presets::Preset>,
    ) -> anyhow::Result<AuthStyle> {
        Ok(match named {
            Some("basic") => AuthStyle::Basic,
            Some("post") => AuthStyle::Post,
            Some(other) => anyhow::bail!("tools.{tool}.auth_style: {other:?} is not basic or post"),
            None => preset.map_or(AuthStyle::Basic, |p| p.auth_style),
        })
    }

    fn check_extra_params(tool: &str, params: &BTreeMap<String, String>) -> anyhow::Result<()> {
        for key in params.keys() {
            if key.is_empty() {
                anyhow::bail!("tools.{tool}.extra_authorize_params: a key is empty");
            }
            if is_reserved_authorize_param(key) {
                anyhow::bail!(
                    "tools.{tool}.extra_authorize_params.{key}: the vault sets this parameter itself"
                );
            }
        }
        Ok(())
    }

    /// The client secret from exactly one of its three sources; with `optional`, none is a
    /// public client.
    fn client_secret(
        tool: &str,
        env: Option<String>,
        path: Option<PathBuf>,
        inline: Option<String>,
        file: &Path,
        optional: bool,
    ) -> anyhow::Result<Option<SecretString>> {
        let secret = match (env, path, inline) {
            (None, None, None) if optional => return Ok(None),
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
        if secret.is_empty() {
            anyhow::bail!("tools.{tool}: the client secret is empty");
        }
        Ok(Some(SecretString::from(secret)))
    }

    fn provider(tool: &str, entry: ToolEntry, loading: &Loading<'_>) -> anyhow::Result<Provider> {
        Tool::parse(tool).map_err(|e| anyhow::anyhow!("tools.{tool}: tool name {e}"))?;
        if let Some(server) = entry.mcp_server.clone() {
            return Self::mcp_provider(tool, &server, entry, loading);
        }
        // A preset without a client: the provider's MCP server, which needs none.
        if entry.client_id.is_none()
            && let Some(preset) = entry.preset.as_deref().and_then(presets::preset)
        {
            let entry = ToolEntry {
                preset: None,
                ..entry
            };
            return Self::mcp_provider(tool, preset.mcp_server, entry, loading);
        }
        let file = loading.file;
        let http = loading.http;
        let preset = match &entry.preset {
            Some(name) => Some(presets::preset(name).ok_or_else(|| {
                anyhow::anyhow!(
                    "tools.{tool}.preset: unknown preset {name:?} (known: {})",
                    presets::NAMES
                )
            })?),
            None => None,
        };
        let auth_style = Self::auth_style(tool, entry.auth_style.as_deref(), preset)?;
        let Some(client_id) = entry.client_id else {
            anyhow::bail!(
                "tools.{tool}.client_id: missing (only an mcp_server tool can register itself)"
            );
        };
        let token_url = entry
            .token_url
            .or_else(|| preset.map(|p| p.token_url.to_string()));
        let revocation_url = entry
            .revocation_url
            .or_else(|| preset.and_then(|p| p.revocation_url.map(str::to_string)));
        let issuer = entry
            .issuer
            .map(|i| configured_url(tool, "issuer", i.trim_end_matches('/')))
            .transpose()?;
        if token_url.is_none() && issuer.is_none() {
            anyhow::bail!("tools.{tool}: needs token_url, issuer or preset");
        }
        let client_secret = Self::client_secret(
            tool,
            entry.client_secret_env,
            entry.client_secret_file,
            entry.client_secret,
            file,
            false,
        )?;
        if !entry.scopes.is_empty() {
            tracing::debug!(%tool, scopes = ?entry.scopes, "scopes are requested at consent; refresh keeps the granted ones");
        }
        let authorization_url = entry
            .authorization_url
            .or_else(|| preset.map(|p| p.authorization_url.to_string()))
            .map(|u| {
                https_url(tool, "authorization_url", &u).and_then(|u| Ok(url::Url::parse(&u)?))
            })
            .transpose()?;
        Self::check_extra_params(tool, &entry.extra_authorize_params)?;
        // The preset's required parameters first, then the entry's over them.
        let mut extra_authorize_params: BTreeMap<String, String> = preset
            .map(|p| p.authorize_params)
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        extra_authorize_params.extend(entry.extra_authorize_params);
        let redirect_uri = entry
            .redirect_uri
            .map(|u| redirect_url(tool, "redirect_uri", &u))
            .transpose()?;
        Ok(Provider {
            guard: guard::Guard::new(loading.guard),
            http: http.clone(),
            tool: tool.to_string(),
            client: Some(ClientCredentials {
                id: ClientId::new(client_id),
                secret: client_secret,
                auth_style,
                registered: false,
            }),
            fixed_token_url: token_url
                .map(|u| configured_url(tool, "token_url", &u).and_then(|u| Ok(TokenUrl::new(u)?)))
                .transpose()?,
            fixed_revocation_url: revocation_url
                .map(|u| {
                    configured_url(tool, "revocation_url", &u)
                        .and_then(|u| Ok(RevocationUrl::new(u)?))
                })
                .transpose()?,
            fixed_authorization_url: authorization_url,
            extra_authorize_params: extra_authorize_params.into_iter().collect(),
            scopes: entry.scopes,
            redirect_uri,
            issuer,
            mcp: None,
            registrar: None,
            discovered: RwLock::new(None),
            discovery_ttl: loading.discovery_ttl,
        })
    }

    /// The provider for `tool`, if configured.
    pub fn get(&self, tool: &Tool) -> Option<Arc<Provider>> {
        self.by_tool.get(tool.as_str()).cloned()
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
        .is_some_and(|named| same_issuer(named, issuer))
}

/// Whether `named` is the configured `issuer` (stored without a trailing slash), allowing the
/// one trailing slash a provider may add.
fn same_issuer(named: &str, issuer: &str) -> bool {
    named == issuer || named.strip_suffix('/') == Some(issuer)
}

/// An OAuth error code fit to show a caller: RFC 6749 codes are short ASCII words, but an
/// extension code is provider-chosen text, so anything else is replaced.
fn error_code(code: &str) -> &str {
    if !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        code
    } else {
        "unrecognised error"
    }
}

/// Maps a failed call to a transient error. Deliberately drops `Parse`'s body: a token response
/// that failed to parse may still contain tokens.
fn classify<E: oauth2::ErrorResponse + 'static>(
    tool: &str,
    err: RequestTokenError<HttpError, E>,
) -> ProviderError {
    match err {
        // The rule and address, which the operator needs to fix the allow list or the provider;
        // already logged at warning where it was refused.
        RequestTokenError::Request(refused @ HttpError::Refused(_)) => {
            ProviderError::unavailable(format!("tool {tool}: {}", refused.caller_message()))
        }
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use figment::providers::{Format, Toml};
    use secrecy::ExposeSecret;

    use super::provider::{Endpoints, check_issuer, tokens};
    use super::*;

    fn load(toml: &str) -> anyhow::Result<Providers> {
        let file: ProvidersFile = figment::Figment::from(Toml::string(toml)).extract()?;
        let http = ProviderHttp::new(Outbound::new(&crate::http::HttpSettings {
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            ..Default::default()
        })?);
        Providers::from_file(
            file,
            &Loading {
                file: Path::new("providers.toml"),
                http: &http,
                discovery_ttl: Duration::from_secs(3600),
                guard: GuardSettings::default(),
                registrar: None,
            },
        )
    }

    fn provider(toml: &str) -> Arc<Provider> {
        let providers = load(toml).expect("the test's providers file loads");
        let tool = Tool::parse("t").expect("a valid tool name");
        providers.get(&tool).expect("the test configures tool t")
    }

    fn load_error(toml: &str) -> String {
        format!(
            "{:#}",
            load(toml).expect_err("the providers file is refused")
        )
    }

    const SCOPES: &[&str] = &["read:jira-work", "offline_access"];

    fn request<'a>(scopes: &'a [String]) -> AuthorizationRequest<'a> {
        AuthorizationRequest {
            state: "st4te",
            code_challenge: "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
            scopes,
            redirect_uri: "https://vault.example/oauth/callback",
        }
    }

    fn query(url: &url::Url) -> Vec<(String, String)> {
        url.query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    fn param(url: &url::Url, key: &str) -> Vec<String> {
        query(url)
            .into_iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v)
            .collect()
    }

    fn filled_discovery(provider: &Provider, authorization: Option<&str>, iss_promised: bool) {
        let endpoints = Endpoints {
            token_url: oauth2::TokenUrl::new("https://idp.example/token".into()).unwrap(),
            token_origin: crate::http::Origin::Derived,
            revocation_url: None,
            revocation_origin: crate::http::Origin::Derived,
            authorization_url: authorization.map(|u| url::Url::parse(u).unwrap()),
            iss_parameter_supported: iss_promised,
            issuer: Some("https://idp.example".into()),
            server: None,
            discovered_scopes: Vec::new(),
        };
        *provider
            .discovered
            .try_write()
            .expect("no one else holds the cache") = Some((endpoints, Instant::now()));
    }

    const ATLASSIAN: &str = r#"
        [tools.t]
        preset = "atlassian"
        client_id = "cid"
        client_secret = "s"
        scopes = ["read:jira-work", "offline_access"]
    "#;

    #[tokio::test]
    async fn the_authorization_url_always_carries_the_flow_and_pkce_parameters() {
        let jira = provider(ATLASSIAN);
        let url = jira.authorization_url(&request(&[])).await.unwrap().0;

        assert_eq!(url.scheme(), "https");
        assert_eq!(url.host_str(), Some("auth.atlassian.com"));
        assert_eq!(url.path(), "/authorize");
        for (key, value) in [
            ("response_type", "code"),
            ("client_id", "cid"),
            ("redirect_uri", "https://vault.example/oauth/callback"),
            ("state", "st4te"),
            (
                "code_challenge",
                "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
            ),
            ("code_challenge_method", "S256"),
        ] {
            assert_eq!(param(&url, key), [value], "{key}");
        }
        assert!(param(&url, "scope").is_empty(), "no scopes, no scope");
    }

    #[tokio::test]
    async fn scopes_are_joined_by_spaces() {
        let jira = provider(ATLASSIAN);
        let scopes: Vec<String> = SCOPES.iter().map(|s| s.to_string()).collect();
        assert_eq!(jira.default_scopes(), scopes.as_slice());

        let url = jira.authorization_url(&request(&scopes)).await.unwrap().0;

        assert_eq!(param(&url, "scope"), ["read:jira-work offline_access"]);
    }

    #[tokio::test]
    async fn preset_params_are_present_and_the_files_own_merge_over_them() {
        let preset_only = provider(ATLASSIAN);
        let url = preset_only
            .authorization_url(&request(&[]))
            .await
            .unwrap()
            .0;
        assert_eq!(param(&url, "audience"), ["api.atlassian.com"]);
        assert_eq!(param(&url, "prompt"), ["consent"]);

        let merged = provider(&format!(
            "{ATLASSIAN}\n[tools.t.extra_authorize_params]\nprompt = \"login\"\nlogin_hint = \"a@b.example\"\n"
        ));
        let url = merged.authorization_url(&request(&[])).await.unwrap().0;
        assert_eq!(param(&url, "audience"), ["api.atlassian.com"]);
        assert_eq!(param(&url, "prompt"), ["login"]);
        assert_eq!(param(&url, "login_hint"), ["a@b.example"]);
    }

    #[tokio::test]
    async fn an_endpoint_query_is_kept_but_cannot_set_a_flow_parameter() {
        let tool = provider(
            r#"
            [tools.t]
            token_url = "https://idp.example/token"
            authorization_url = "https://idp.example/authorize?tenant=x&state=evil"
            client_id = "cid"
            client_secret = "s"
            "#,
        );
        let url = tool.authorization_url(&request(&[])).await.unwrap().0;
        assert_eq!(param(&url, "tenant"), ["x"]);
        assert_eq!(param(&url, "state"), ["st4te"]);
    }

    #[test]
    fn a_reserved_extra_param_is_refused_at_load_naming_it() {
        for key in ["state", "code_challenge_method", "Scope", "code_verifier"] {
            let error = load_error(&format!(
                "{ATLASSIAN}\n[tools.t.extra_authorize_params]\n{key} = \"x\"\n"
            ));
            assert!(
                error.contains(&format!("tools.t.extra_authorize_params.{key}")),
                "{error}"
            );
        }
    }

    #[test]
    fn an_http_authorization_url_is_refused() {
        let error = load_error(
            r#"
            [tools.t]
            token_url = "https://idp.example/token"
            authorization_url = "http://idp.example/authorize"
            client_id = "cid"
            client_secret = "s"
            "#,
        );
        assert!(error.contains("tools.t.authorization_url"), "{error}");
    }

    #[test]
    fn a_tool_redirect_uri_must_be_an_absolute_http_url() {
        let with = |uri: &str| format!("{ATLASSIAN}\nredirect_uri = \"{uri}\"\n");
        // `redirect_uri` must sit inside [tools.t], before any sub-table.
        let tool = provider(&with("http://localhost:8080/cb"));
        assert_eq!(tool.redirect_uri(), Some("http://localhost:8080/cb"));
        assert_eq!(provider(ATLASSIAN).redirect_uri(), None);
        for bad in [
            "/oauth/callback",
            "ftp://x.example/cb",
            "https://x.example/cb#f",
            "http://vault.example/cb",
        ] {
            let error = load_error(&with(bad));
            assert!(error.contains("tools.t.redirect_uri"), "{bad}: {error}");
        }
    }

    #[tokio::test]
    async fn a_tool_without_an_authorization_endpoint_still_loads_but_cannot_start_consent() {
        let tool = provider(
            r#"
            [tools.t]
            token_url = "https://idp.example/token"
            client_id = "cid"
            client_secret = "s"
            "#,
        );
        let error = tool.authorization_url(&request(&[])).await.unwrap_err();
        assert!(matches!(error, ProviderError::Unavailable { .. }));
    }

    const ISSUER: &str = r#"
        [tools.t]
        issuer = "https://idp.example/"
        client_id = "cid"
        client_secret = "s"
    "#;

    #[tokio::test]
    async fn an_issuer_tool_takes_its_authorization_endpoint_from_discovery() {
        let tool = provider(ISSUER);
        filled_discovery(&tool, Some("https://idp.example/auth"), false);

        let url = tool.authorization_url(&request(&[])).await.unwrap().0;

        assert_eq!(url.path(), "/auth");
        assert_eq!(param(&url, "code_challenge_method"), ["S256"]);
    }

    #[test]
    fn the_binding_of_existing_configurations_is_unchanged() {
        assert_eq!(provider(ISSUER).unresolved_binding(), "https://idp.example");
        assert_eq!(
            provider(ATLASSIAN).unresolved_binding(),
            "issuer= token=https://auth.atlassian.com/oauth/token revocation="
        );
    }

    #[test]
    fn the_callback_issuer_decision() {
        let issuer = "https://idp.example";
        assert!(check_issuer(issuer, Some("https://idp.example"), true).is_ok());
        assert!(check_issuer(issuer, Some("https://idp.example/"), true).is_ok());
        assert!(check_issuer(issuer, Some("https://evil.example"), false).is_err());
        assert!(check_issuer(issuer, Some("https://idp.example/x"), false).is_err());
        assert!(check_issuer(issuer, None, true).is_err());
        assert!(check_issuer(issuer, None, false).is_ok());
    }

    #[tokio::test]
    async fn the_callback_issuer_is_checked_against_the_configured_issuer_and_its_metadata() {
        let promised = provider(ISSUER);
        filled_discovery(&promised, None, true);
        assert!(
            promised
                .check_callback_issuer(Some("https://idp.example"), None)
                .await
                .is_ok()
        );
        assert!(
            promised
                .check_callback_issuer(Some("https://evil.example"), None)
                .await
                .is_err()
        );
        assert!(promised.check_callback_issuer(None, None).await.is_err());

        let silent = provider(ISSUER);
        filled_discovery(&silent, None, false);
        assert!(silent.check_callback_issuer(None, None).await.is_ok());
        assert!(
            silent
                .check_callback_issuer(Some("https://evil.example"), None)
                .await
                .is_err()
        );

        let no_issuer = provider(ATLASSIAN);
        assert!(
            no_issuer
                .check_callback_issuer(Some("https://anyone.example"), None)
                .await
                .is_ok()
        );
        assert!(no_issuer.check_callback_issuer(None, None).await.is_ok());
    }

    fn token_response(json: &str) -> oauth2::basic::BasicTokenResponse {
        serde_json::from_str(json).expect("a token response")
    }

    #[test]
    fn a_token_response_is_read_the_same_way_for_refresh_and_exchange() {
        let read = tokens(&token_response(
            r#"{"access_token":"at","refresh_token":"rt","token_type":"Bearer","expires_in":3600,"scope":"a b"}"#,
        ))
        .unwrap();
        assert_eq!(read.access_token.expose_secret(), "at");
        assert_eq!(read.refresh_token.unwrap().expose_secret(), "rt");
        assert_eq!(read.expires_in, Some(Duration::from_secs(3600)));
        assert_eq!(read.scopes, Some(vec!["a".to_string(), "b".to_string()]));

        let empty = tokens(&token_response(
            r#"{"access_token":"","token_type":"Bearer"}"#,
        ));
        assert!(matches!(empty, Err(ProviderError::Unavailable { .. })));
        let huge = "a".repeat(16 * 1024 + 1);
        let oversized = tokens(&token_response(&format!(
            r#"{{"access_token":"{huge}","token_type":"Bearer"}}"#
        )));
        assert!(matches!(oversized, Err(ProviderError::Unavailable { .. })));
    }

    #[test]
    fn an_extension_error_code_is_shown_only_when_it_looks_like_one() {
        assert_eq!(error_code("invalid_client"), "invalid_client");
        assert_eq!(
            error_code("see https://idp.example/help?x=1"),
            "unrecognised error"
        );
        assert_eq!(error_code(""), "unrecognised error");
    }

    #[test]
    fn an_mcp_tool_with_a_client_secret_names_the_issuer_it_belongs_to() {
        let error = load_error(
            r#"
            [tools.t]
            mcp_server = "https://mcp.example/mcp"
            client_id = "cid"
            client_secret = "s"
            "#,
        );
        assert!(error.contains("tools.t.issuer"), "{error}");
        let public = provider(
            r#"
            [tools.t]
            mcp_server = "https://mcp.example/mcp"
            client_id = "cid"
            "#,
        );
        assert_eq!(public.resource(), Some("https://mcp.example/mcp"));
        let pinned = provider(
            r#"
            [tools.t]
            mcp_server = "https://mcp.example/mcp"
            issuer = "https://as.example"
            client_id = "cid"
            client_secret = "s"
            "#,
        );
        assert_eq!(pinned.resource(), Some("https://mcp.example/mcp"));
        let error = load_error(
            r#"
            [tools.t]
            mcp_server = "https://mcp.example/mcp"
            token_url = "https://as.example/token"
            client_id = "cid"
            "#,
        );
        assert!(error.contains("tools.t.token_url"), "{error}");
    }

    #[test]
    fn a_preset_without_a_client_is_its_mcp_server() {
        // Loaded here without a registrar, so the MCP path says what it needs.
        let error = load_error("[tools.t]\npreset = \"canva\"\n");
        assert!(error.contains("OAUTH_TOOL_REDIRECT_URI"), "{error}");
        assert_eq!(provider(ATLASSIAN).resource(), None);
    }
}
