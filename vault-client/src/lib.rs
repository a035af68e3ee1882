//! Async client for the credential vault (`vault.v1.CredentialVault`).
//!
//! Agents fetch access tokens with [`Client::get_token`]; gateways store a user's
//! [`TokenSet`] after consent with [`Client::store_token`]. Every call carries the caller's JWT
//! as `authorization: Bearer …` from a [`TokenSource`]; failures come back as one [`Error`]
//! type built from the server's `google.rpc.ErrorInfo`, so callers branch on variants (or on
//! [`Error::reason`], an [`ErrorReason`]) rather than strings. Idempotent calls are retried on
//! `UNAVAILABLE` with backoff and jitter, within a deadline ([`RetryPolicy`]).
//!
//! Methods take `&self`: the channel is shared, so clone the client rather than lock it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), vault_client::Error> {
//! use std::time::Duration;
//!
//! use vault_client::{Client, Error, TokenSource};
//!
//! let vault = Client::builder("http://127.0.0.1:50051")
//!     .token(TokenSource::file("/var/run/secrets/vault/token"))
//!     .connect()
//!     .await?;
//! match vault.get_token("jira", Duration::from_secs(60)).await {
//!     Ok(token) => println!("expires at {:?}", token.expires_at),
//!     Err(Error::CredentialNotFound) => println!("start a consent flow"),
//!     Err(Error::ReauthRequired(why)) => println!("ask the user to authorize again: {why}"),
//!     Err(other) => return Err(other),
//! }
//! # Ok(()) }
//! ```
//!
//! Without a credential, the vault runs the OAuth consent flow itself: begin it, send the user
//! to the URL, and complete it once the provider has sent the browser back.
//!
//! ```no_run
//! # async fn demo(vault: vault_client::Client) -> Result<(), vault_client::Error> {
//! use vault_client::AuthorizationState;
//!
//! let flow = vault
//!     .begin_authorization("jira", ["read:jira-work"], Some("https://app.example/connected"))
//!     .await?;
//! println!("open {}", flow.authorization_url);
//! // … later, when the browser has come back to the return URL:
//! let status = vault.get_authorization(&flow.authorization_id).await?;
//! if status.state == AuthorizationState::CallbackReceived {
//!     let completed = vault.complete_authorization(&flow.authorization_id).await?;
//!     println!("stored generation {}", completed.stored.generation);
//! }
//! # Ok(()) }
//! ```
//!
//! An agent that only needs to know when consent is done can watch for it instead of polling:
//! open the watch before the flow begins (so the completion cannot slip past), then wait for
//! the completion of that flow and fetch the token. The watch resumes by itself if the
//! connection drops, without losing or repeating an event.
//!
//! ```no_run
//! # async fn demo(vault: vault_client::Client) -> Result<(), vault_client::Error> {
//! use std::time::Duration;
//!
//! use vault_client::{EventKind, WatchRequest};
//!
//! let mut events = vault
//!     .watch(WatchRequest {
//!         tool: Some("jira".into()),
//!         ..WatchRequest::default()
//!     })
//!     .await?;
//! let flow = vault
//!     .begin_authorization("jira", ["read:jira-work"], None)
//!     .await?;
//! println!("open {}", flow.authorization_url);
//! while let Some(event) = events.next().await {
//!     let event = event?;
//!     if event.authorization_id.as_deref() != Some(flow.authorization_id.as_str()) {
//!         continue;
//!     }
//!     match event.kind {
//!         EventKind::AuthorizationCompleted => {
//!             let token = vault.get_token("jira", Duration::from_secs(60)).await?;
//!             println!("connected; generation {}", token.generation);
//!             break;
//!         }
//!         EventKind::AuthorizationDenied
//!         | EventKind::AuthorizationExpired
//!         | EventKind::AuthorizationMismatched => {
//!             println!("consent did not complete: {:?}", event.reason);
//!             break;
//!         }
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```

pub mod env;
mod error;
mod token;
mod types;
mod watch;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tonic::Status;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub use error::Error;
pub use token::{BoxError, TokenSource};
pub use types::{
    Authorization, AuthorizationStart, AuthorizationState, Completed, ConnectionState,
    CredentialInfo, Owner, Revoked, Stored, Swept, Token, TokenSet, rfc3339,
};
/// The generated API, for calls through [`Client::raw`].
pub use vault_proto as proto;
pub use vault_proto::{ERROR_DOMAIN, ErrorReason};
pub use watch::{CredentialEvent, EventKind, WATCH_AFTER_HEADER, Watch, WatchRequest};

/// Retries for idempotent calls (GetToken, Refresh with `if_generation`, Revoke, Sweep,
/// GetAuthorization, ListCredentials) on `UNAVAILABLE`: exponential backoff with full jitter, bounded by attempts and a deadline.
/// Any call (StoreToken too) is tried again, within the deadline and without counting an
/// attempt, when its replica's connection was refused, so it certainly never arrived.
/// A call refused for the caller's rate limit (`RATE_LIMITED`) or shed under load
/// (`OVERLOADED`) is retried after the wait its `google.rpc.RetryInfo` gives, within the same
/// bounds.
/// `PROVIDER_UNAVAILABLE` is not retried: the vault already backs off per credential, and the
/// caller should decide whether to wait.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, including the first.
    pub max_attempts: u32,
    /// Backoff ceiling before the first retry.
    pub initial_backoff: Duration,
    /// Largest backoff ceiling.
    pub max_backoff: Duration,
    /// No retry starts after this much time since the first attempt.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            deadline: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retries.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }
}

/// Attaches the current caller token to every call, including those made through
/// [`Client::raw`].
#[derive(Clone, Default)]
pub struct BearerInterceptor {
    value: Arc<RwLock<Option<MetadataValue<Ascii>>>>,
}

impl std::fmt::Debug for BearerInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerInterceptor([REDACTED])")
    }
}

impl BearerInterceptor {
    fn set(&self, value: MetadataValue<Ascii>) {
        *self.value.write().unwrap_or_else(|p| p.into_inner()) = Some(value);
    }
}

impl Interceptor for BearerInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        // Typed calls attach their own token; this covers calls made through `raw()`.
        if !request.metadata().contains_key("authorization")
            && let Some(value) = self.value.read().unwrap_or_else(|p| p.into_inner()).clone()
        {
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// `message` with this call's caller token attached. Per request rather than through shared
/// state, so clones with different token sources never send each other's token.
fn request<T>(message: T, header: &Option<MetadataValue<Ascii>>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = header {
        request
            .metadata_mut()
            .insert("authorization", value.clone());
    }
    request
}

/// The generated client with the bearer interceptor, for calls the typed methods do not cover.
pub type RawClient = proto::credential_vault_client::CredentialVaultClient<
    InterceptedService<Channel, BearerInterceptor>,
>;

/// Configures a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoint: String,
    tls: Option<ClientTlsConfig>,
    connect_timeout: Duration,
    request_timeout: Duration,
    user_agent: String,
    token: Option<TokenSource>,
    retry: RetryPolicy,
}

impl ClientBuilder {
    /// Trust this PEM CA bundle for the vault's certificate (enables TLS).
    pub fn tls_ca_pem(mut self, pem: impl AsRef<[u8]>) -> Self {
        let tls = self.tls.take().unwrap_or_default();
        self.tls = Some(tls.ca_certificate(Certificate::from_pem(pem)));
        self
    }

    /// Trust the operating system's roots (enables TLS).
    pub fn tls_native_roots(mut self) -> Self {
        self.tls = Some(self.tls.take().unwrap_or_default().with_native_roots());
        self
    }

    /// Present this client certificate and key (PEM) for mutual TLS.
    pub fn tls_identity(mut self, cert_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> Self {
        let tls = self.tls.take().unwrap_or_default();
        self.tls = Some(tls.identity(Identity::from_pem(cert_pem, key_pem)));
        self
    }

    /// The name to verify in the vault's certificate, when it differs from the endpoint host.
    pub fn tls_domain_name(mut self, name: impl Into<String>) -> Self {
        let tls = self.tls.take().unwrap_or_default();
        self.tls = Some(tls.domain_name(name));
        self
    }

    /// Time allowed to establish the connection (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Time allowed for each call attempt (default 10 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The `user-agent` prefix sent on every call.
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = user_agent.into();
        self
    }

    /// Where the caller's JWT comes from.
    pub fn token(mut self, source: TokenSource) -> Self {
        self.token = Some(source);
        self
    }

    /// Retries for idempotent calls.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    fn endpoint(&self) -> Result<Endpoint, Error> {
        let mut endpoint = Endpoint::from_shared(self.endpoint.clone())?
            .user_agent(self.user_agent.clone())?
            .connect_timeout(self.connect_timeout)
            .timeout(self.request_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        Ok(endpoint)
    }

    fn finish(self, channel: Channel) -> Client {
        let mut client = Client::from_channel(channel);
        client.retry = self.retry;
        if let Some(source) = self.token {
            client.set_token_source(source);
        }
        client
    }

    /// Connects now.
    pub async fn connect(self) -> Result<Client, Error> {
        let channel = self.endpoint()?.connect().await?;
        Ok(self.finish(channel))
    }

    /// Connects on first use (and reconnects as needed), so a vault that is not up yet is
    /// not an error until a call is made.
    pub fn connect_lazy(self) -> Result<Client, Error> {
        let channel = self.endpoint()?.connect_lazy();
        Ok(self.finish(channel))
    }
}

/// A vault client. Cheap to clone: clones share the connection, and each keeps its own token
/// source, so one connection can serve many callers.
#[derive(Debug)]
pub struct Client {
    channel: Channel,
    inner: RawClient,
    bearer: BearerInterceptor,
    source: Option<TokenSource>,
    retry: RetryPolicy,
}

impl Clone for Client {
    fn clone(&self) -> Self {
        let mut clone = Self::from_channel(self.channel.clone());
        clone.retry = self.retry;
        if let Some(source) = &self.source {
            clone.set_token_source(source.clone());
        }
        clone
    }
}

/// How long to wait before trying a failed attempt again, or `None` when another try would not
/// help. `UNAVAILABLE` waits a random time below the backoff `ceiling` (full jitter). A call the
/// vault refused for its rate limit or shed under load waits what its `RetryInfo` says, plus a
/// little jitter so refused callers do not come back in one burst.
fn retry_wait(error: &Error, ceiling: Duration) -> Option<Duration> {
    match error {
        Error::Unavailable { .. } => Some(ceiling.mul_f64(fastrand::f64())),
        Error::ResourceExhausted {
            reason: ErrorReason::RateLimited | ErrorReason::Overloaded,
            retry_after: Some(after),
            ..
        } => Some(*after + after.mul_f64(0.1 * fastrand::f64())),
        _ => None,
    }
}

impl Client {
    /// A builder for `endpoint` (`http://host:port` or `https://host:port`).
    pub fn builder(endpoint: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            endpoint: endpoint.into(),
            tls: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            user_agent: concat!("vault-client/", env!("CARGO_PKG_VERSION")).to_string(),
            token: None,
            retry: RetryPolicy::default(),
        }
    }

    /// Connects to `endpoint` with default settings.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self, Error> {
        Self::builder(endpoint).connect().await
    }

    /// Wraps an existing channel (no token source, default retries).
    pub fn from_channel(channel: Channel) -> Self {
        let bearer = BearerInterceptor::default();
        let inner = proto::credential_vault_client::CredentialVaultClient::with_interceptor(
            channel.clone(),
            bearer.clone(),
        );
        Self {
            channel,
            inner,
            bearer,
            source: None,
            retry: RetryPolicy::default(),
        }
    }

    /// Sends `token` (a caller JWT) on every call from now on.
    pub fn with_bearer(mut self, token: &str) -> Result<Self, Error> {
        self.set_token_source(TokenSource::fixed(token)?);
        Ok(self)
    }

    /// The same client with another retry policy for idempotent calls.
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Replaces the token source for this client (clones keep theirs).
    pub fn set_token_source(&mut self, source: TokenSource) {
        if let Some(value) = source.fixed_value() {
            self.bearer.set(value);
        }
        self.source = Some(source);
    }

    /// The generated client, sharing this client's connection; calls through it carry this
    /// client's fixed token, or the last one its source produced, unless they set
    /// `authorization` themselves.
    pub fn raw(&self) -> RawClient {
        self.inner.clone()
    }

    async fn authorize(&self) -> Result<Option<MetadataValue<Ascii>>, Error> {
        let Some(source) = &self.source else {
            return Ok(None);
        };
        let value = source.current().await?;
        self.bearer.set(value.clone());
        Ok(Some(value))
    }

    /// Runs `call`, retrying per the policy: an idempotent call on `UNAVAILABLE` (and on a
    /// rate limit or shed load, after its `RetryInfo`); any call, writes included, when it
    /// certainly never reached a vault (the replica's connection was refused: it has just
    /// stopped, and a balanced channel may still pick it). Those cost no attempt, only time
    /// within the deadline, so a client of several replicas rides out one of them stopping.
    async fn call<T, F, Fut>(&self, idempotent: bool, mut call: F) -> Result<T, Error>
    where
        F: FnMut(RawClient, Option<MetadataValue<Ascii>>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let started = Instant::now();
        let policy = self.retry;
        let mut ceiling = policy.initial_backoff;
        // Calls that never reached a vault back off on their own, from a short first pause:
        // another replica may take the call at once, and a client whose every replica is down
        // must not spin.
        let mut unreached_ceiling = Duration::from_millis(20);
        let mut attempt = 1;
        loop {
            let header = self.authorize().await?;
            let (error, unreached) = match call(self.inner.clone(), header).await {
                Ok(value) => return Ok(value),
                Err(status) => {
                    let unreached = error::never_reached(&status);
                    (Error::from(status), unreached)
                }
            };
            let wait = if unreached && policy.max_attempts > 1 {
                let wait = unreached_ceiling.mul_f64(fastrand::f64());
                unreached_ceiling = (unreached_ceiling * 2).min(policy.max_backoff);
                Some(wait)
            } else if idempotent && attempt < policy.max_attempts.max(1) {
                retry_wait(&error, ceiling)
            } else {
                None
            };
            let Some(wait) = wait else {
                return Err(error);
            };
            if started.elapsed() + wait >= policy.deadline {
                return Err(error);
            }
            tokio::time::sleep(wait).await;
            if !unreached {
                ceiling = (ceiling * 2).min(policy.max_backoff);
                attempt += 1;
            }
        }
    }

    /// Stores the caller's token set for `tool`, kept by the vault for `ttl` (`None`, or zero,
    /// is the vault's default; longer than the default is clamped to it). Retried only when it
    /// certainly never reached a vault: each store is a new generation, so after an answer
    /// that was lost a retry could overwrite a newer store.
    pub async fn store_token(
        &self,
        tool: &str,
        token: TokenSet,
        ttl: Option<Duration>,
    ) -> Result<Stored, Error> {
        let request_body = proto::StoreTokenRequest {
            tool: tool.into(),
            token: Some(token.into()),
            ttl_seconds: ttl.map_or(0, types::seconds),
        };
        let response = self
            .call(false, |mut raw, header| {
                let request = request(request_body.clone(), &header);
                async move {
                    raw.store_token(request)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
        types::stored_from(response)
    }

    /// A usable access token for `tool`, refreshed first if it expires within `min_valid`
    /// (rounded up to whole seconds).
    pub async fn get_token(&self, tool: &str, min_valid: Duration) -> Result<Token, Error> {
        let request_body = proto::GetTokenRequest {
            tool: tool.into(),
            min_valid_seconds: types::seconds(min_valid),
        };
        let response = self
            .call(true, |mut raw, header| {
                let request = request(request_body.clone(), &header);
                async move {
                    raw.get_token(request)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
        types::token_from(response.token, response.refreshed)
    }

    /// Refreshes now; with `if_generation`, only if nothing newer than that generation is
    /// stored (and then the call is safe to retry).
    pub async fn refresh(&self, tool: &str, if_generation: Option<u64>) -> Result<Token, Error> {
        let request_body = proto::RefreshRequest {
            tool: tool.into(),
            if_generation: if_generation.unwrap_or(0),
        };
        let response = self
            // Generation 0 is "no condition" on the wire: only a real generation makes it safe.
            .call(if_generation.is_some_and(|g| g > 0), |mut raw, header| {
                let request = request(request_body.clone(), &header);
                async move { raw.refresh(request).await.map(tonic::Response::into_inner) }
            })
            .await?;
        types::token_from(response.token, response.refreshed)
    }

    /// Deletes the caller's credential for `tool`, or every tool's when `None`; with
    /// `at_provider`, also revokes the tokens at the provider.
    pub async fn revoke(&self, tool: Option<&str>, at_provider: bool) -> Result<Revoked, Error> {
        self.revoke_for(Owner::default(), tool, at_provider).await
    }

    /// Admin: [`revoke`](Self::revoke) for another user or agent.
    pub async fn revoke_for(
        &self,
        owner: Owner,
        tool: Option<&str>,
        at_provider: bool,
    ) -> Result<Revoked, Error> {
        let request_body = proto::RevokeRequest {
            tool: tool.unwrap_or_default().into(),
            at_provider,
            user_id: owner.user_id.unwrap_or_default(),
            agent_id: owner.agent_id.unwrap_or_default(),
        };
        let response = self
            .call(true, |mut raw, header| {
                let request = request(request_body.clone(), &header);
                async move { raw.revoke(request).await.map(tonic::Response::into_inner) }
            })
            .await?;
        Ok(Revoked {
            revoked: response.revoked,
            provider_revoked: response.provider_revoked,
        })
    }

    /// Admin: deletes up to `limit` credentials past their vault TTL (0 = server batch size).
    pub async fn sweep(&self, limit: u32, dry_run: bool) -> Result<Swept, Error> {
        let body = proto::SweepRequest { limit, dry_run };
        let response = self
            .call(true, |mut raw, header| async move {
                raw.sweep(request(body, &header))
                    .await
                    .map(tonic::Response::into_inner)
            })
            .await?;
        Ok(Swept {
            swept: response.swept,
            more: response.more,
        })
    }

    /// Starts a consent flow for `tool`: send the user's browser to the answer's
    /// `authorization_url`. `scopes` empty asks for the tool's default scopes. `return_url` is
    /// where the vault's callback sends the browser afterwards (it must be one the vault
    /// allows); `None` lets the callback complete the flow itself, where the vault allows that.
    /// Retried only when it certainly never reached a vault: each call creates a new flow.
    pub async fn begin_authorization<S: AsRef<str>>(
        &self,
        tool: &str,
        scopes: impl IntoIterator<Item = S>,
        return_url: Option<&str>,
    ) -> Result<AuthorizationStart, Error> {
        let request_body = proto::BeginAuthorizationRequest {
            tool: tool.into(),
            scopes: scopes.into_iter().map(|s| s.as_ref().to_owned()).collect(),
            return_url: return_url.unwrap_or_default().into(),
        };
        let response = self
            .call(false, |mut raw, header| {
                let request = request(request_body.clone(), &header);
                async move {
                    raw.begin_authorization(request)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
        types::start_from(response)
    }

    /// Exchanges the code of a flow whose callback arrived, and stores the credential. Only the
    /// (agent, user) that began the flow may complete it, once.
    ///
    /// Call it from the handler of the flow's `return_url`, as the user whose browser session
    /// arrived there, with the `authorization_id` the redirect carries; never because polling
    /// shows the callback arrived. The binding stops an account swap only if the completing
    /// caller is the person who consented: someone who begins a flow and sends its URL to a
    /// victim must not be the one who completes it. Before the callback this is
    /// [`Error::AuthorizationPending`]. Retried only when it certainly never reached a vault: a
    /// flow completes once, so a retry after a lost reply would be refused even though the
    /// credential was stored; on `Unavailable`,
    /// ask [`get_authorization`](Self::get_authorization) whether it completed.
    pub async fn complete_authorization(&self, authorization_id: &str) -> Result<Completed, Error> {
        let request_body = proto::CompleteAuthorizationRequest {
            authorization_id: authorization_id.into(),
        };
        let response = self
            .call(false, |mut raw, header| {
                let request = request(request_body.clone(), &header);
                async move {
                    raw.complete_authorization(request)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
        types::completed_from(response)
    }

    /// Where one of the caller's consent flows stands.
    pub async fn get_authorization(&self, authorization_id: &str) -> Result<Authorization, Error> {
        let request_body = proto::GetAuthorizationRequest {
            authorization_id: authorization_id.into(),
        };
        let response = self
            .call(true, |mut raw, header| {
                let request = request(request_body.clone(), &header);
                async move {
                    raw.get_authorization(request)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
        types::authorization_from(response)
    }

    /// The caller's connections, one per tool; never a token.
    pub async fn list_credentials(&self) -> Result<Vec<CredentialInfo>, Error> {
        self.list_credentials_for(Owner::default()).await
    }

    /// Admin: [`list_credentials`](Self::list_credentials) for another user or agent.
    pub async fn list_credentials_for(&self, owner: Owner) -> Result<Vec<CredentialInfo>, Error> {
        let request_body = proto::ListCredentialsRequest {
            user_id: owner.user_id.unwrap_or_default(),
            agent_id: owner.agent_id.unwrap_or_default(),
        };
        let response = self
            .call(true, |mut raw, header| {
                let request = request(request_body.clone(), &header);
                async move {
                    raw.list_credentials(request)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
        response
            .credentials
            .into_iter()
            .map(types::credential_from)
            .collect()
    }
}
