//! Acquisition: the OAuth consent flow (authorization code + PKCE S256), bound to the (agent,
//! user) that began it, and the connection list a user interface shows.
//!
//! Begin records a flow (its `state` only as a hash, its PKCE verifier sealed under the agent
//! key) and answers with the provider's authorization URL. The provider's redirect reaches
//! [`Vault::callback`], which records the code (sealed too) and sends the browser to the
//! gateway's `return_url`. Complete, called by the same (agent, user), exchanges the code and
//! stores the credential. Each step is a compare-and-set on the flow's status, so it happens
//! once across replicas.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tracing::Instrument as _;

use super::{AgentEntry, StoredToken, Vault, VaultError};
use crate::audit::{AuditRecord, Call, Outcome};
use crate::auth::Caller;
use crate::crypto::{
    Binding, FlowBinding, FlowSecret, flow_secret_version, open_flow_secret, random_bytes,
    seal_flow_secret,
};
use crate::ids::{AgentId, Tool, UserId};
use crate::oauth::{AuthorizationRequest, CallbackIssuerError, ProviderError, TokenKind};
use crate::secret::TokenSet;
use crate::store::{CredentialState, Flow, FlowChange, FlowStatus, NewFlow, StoreError};

/// Most scopes a flow may ask for, and the longest scope.
const MAX_SCOPES: usize = 64;
const MAX_SCOPE_BYTES: usize = 256;
/// Longest `return_url` accepted.
const MAX_RETURN_URL_BYTES: usize = 2048;
/// Longest value of a callback parameter the vault reads.
const MAX_CALLBACK_PARAM_BYTES: usize = 4096;
/// How long a flow is kept after it expired, so that GetAuthorization can still say so.
pub const FLOW_RETENTION: Duration = Duration::from_secs(3600);

/// The consent flow's settings.
#[derive(Debug, Clone, Default)]
pub struct ConsentOptions {
    /// `OAUTH_TOOL_REDIRECT_URI`.
    pub redirect_uri: Option<url::Url>,
    /// Allowed `return_url` prefixes.
    pub return_urls: Vec<url::Url>,
    /// Flows without `return_url` complete at the callback.
    pub unbound: bool,
    /// How long a flow lives.
    pub flow_ttl: Duration,
}

/// What BeginAuthorization answers.
#[derive(Debug, Clone)]
pub struct BegunAuthorization {
    /// Where to send the user's browser.
    pub authorization_url: url::Url,
    /// Names the flow.
    pub authorization_id: String,
    /// When it can no longer complete.
    pub expires_at: DateTime<Utc>,
}

/// What CompleteAuthorization answers.
#[derive(Debug, Clone)]
pub struct CompletedAuthorization {
    /// The stored credential.
    pub stored: StoredToken,
    /// The scopes granted.
    pub scopes: Vec<String>,
}

/// A flow's state as the caller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorizationState {
    /// The user is at the provider.
    Pending,
    /// The provider sent a code; Complete exchanges it.
    CallbackReceived,
    /// The credential is stored.
    Completed,
    /// Consent was refused.
    Denied,
    /// Not completed in time.
    Expired,
    /// Ended without a credential.
    Failed,
}

/// One flow, for GetAuthorization.
#[derive(Debug, Clone)]
pub struct AuthorizationView {
    /// Its id.
    pub authorization_id: String,
    /// The tool.
    pub tool: Tool,
    /// Where it is.
    pub state: AuthorizationState,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
    /// Why it was denied or failed.
    pub error: Option<String>,
}

/// The parameters of a provider's redirect to the callback, unchecked.
#[derive(Debug, Default)]
pub struct CallbackParams {
    /// `state`.
    pub state: Option<String>,
    /// `code`; a secret.
    pub code: Option<SecretString>,
    /// `error` (RFC 6749 §4.1.2.1).
    pub error: Option<String>,
    /// `iss` (RFC 9207).
    pub iss: Option<String>,
}

/// What the callback does with the browser.
#[derive(Debug)]
pub enum CallbackOutcome {
    /// Send it to the gateway's `return_url`, which now carries `authorization_id`.
    Redirect(url::Url),
    /// An unbound flow completed here: show "done".
    Completed {
        /// The tool now connected.
        tool: Tool,
    },
    /// Show what went wrong; safe to show (never a code, token or echo of the input).
    Refused(String),
    /// The vault failed, not the request: show this and let the browser retry.
    Unavailable(String),
}

/// A connection, for ListCredentials.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The tool.
    pub tool: Tool,
    /// `ACTIVE`, `REAUTH_REQUIRED` or `EXPIRED`.
    pub state: &'static str,
    /// Scopes granted.
    pub scopes: Vec<String>,
    /// When the access token expires, if known.
    pub access_expires_at: Option<DateTime<Utc>>,
    /// When the vault deletes it.
    pub ttl_expires_at: DateTime<Utc>,
    /// Its version.
    pub generation: crate::ids::Generation,
    /// Last written.
    pub updated_at: DateTime<Utc>,
    /// A refresh token is held.
    pub has_refresh_token: bool,
}

/// Random bytes as unpadded base64url.
fn random_text(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    random_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

fn sha256(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// The S256 challenge of a PKCE verifier (RFC 7636 §4.2).
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(sha256(verifier))
}

/// Whether `url` may be a `return_url`: same scheme, host and port as an allowed prefix, and a
/// path equal to the prefix's or below it on a `/` boundary. No user info, no fragment.
pub fn return_url_allowed(url: &url::Url, allowed: &[url::Url]) -> bool {
    if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
        return false;
    }
    allowed.iter().any(|prefix| {
        if url.scheme() != prefix.scheme()
            || url.host() != prefix.host()
            || url.port_or_known_default() != prefix.port_or_known_default()
        {
            return false;
        }
        let (path, base) = (url.path(), prefix.path());
        let base_dir = base.trim_end_matches('/');
        path == base || path == base_dir || path.starts_with(&format!("{base_dir}/"))
    })
}

fn scopes_problem(scopes: &[String]) -> Option<String> {
    if scopes.len() > MAX_SCOPES {
        return Some(format!("at most {MAX_SCOPES} scopes"));
    }
    scopes
        .iter()
        .any(|s| {
            s.is_empty()
                || s.len() > MAX_SCOPE_BYTES
                || !s.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        })
        .then(|| {
            format!(
                "each scope must be 1..{MAX_SCOPE_BYTES} printable ASCII characters without spaces, quotes or backslashes (RFC 6749 §3.3)"
            )
        })
}

/// A short, safe rendition of a provider's `error` code for the flow's record: the RFC 6749
/// alphabet only, bounded.
fn error_code(text: &str) -> String {
    let clean: String = text
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-' || *c == '.')
        .take(64)
        .collect();
    if clean.is_empty() {
        "unknown_error".into()
    } else {
        clean
    }
}

/// The state a caller sees: expiry wins over an unfinished status, and a claimed exchange is
/// still "callback received".
fn visible_state(flow: &Flow, now: DateTime<Utc>) -> AuthorizationState {
    match flow.status {
        FlowStatus::Completed => AuthorizationState::Completed,
        FlowStatus::Denied => AuthorizationState::Denied,
        FlowStatus::Failed if flow.error.as_deref() == Some(EXPIRED) => AuthorizationState::Expired,
        FlowStatus::Failed => AuthorizationState::Failed,
        _ if flow.expires_at <= now => AuthorizationState::Expired,
        FlowStatus::Pending => AuthorizationState::Pending,
        FlowStatus::CallbackReceived | FlowStatus::Exchanging => {
            AuthorizationState::CallbackReceived
        }
    }
}

/// Why a flow in `state` cannot be completed, as the caller's error.
fn not_completable(flow: &Flow, state: AuthorizationState) -> VaultError {
    let detail = flow.error.clone().unwrap_or_default();
    match state {
        AuthorizationState::Pending => VaultError::AuthorizationPending,
        AuthorizationState::Expired => VaultError::AuthorizationExpired(
            "the consent flow expired before it completed; begin a new one".into(),
        ),
        AuthorizationState::Completed => VaultError::AuthorizationExpired(
            "the consent flow has already completed; it completes only once".into(),
        ),
        // Claimed by a completion still exchanging the code: its outcome is not known yet.
        AuthorizationState::CallbackReceived => VaultError::AuthorizationPending,
        AuthorizationState::Denied => VaultError::AuthorizationDenied(format!(
            "consent was refused ({detail}); begin a new flow"
        )),
        AuthorizationState::Failed => VaultError::AuthorizationDenied(format!(
            "the consent flow failed ({detail}); begin a new flow"
        )),
    }
}

/// The audit action of a callback that brought a code.
pub const FLOW_CALLBACK: &str = "flow.callback";
/// The audit action of consent refused at the provider, or a callback that failed the flow.
pub const FLOW_DENIED: &str = "flow.denied";
/// The audit action of a callback after the flow expired.
pub const FLOW_EXPIRED: &str = "flow.expired";
/// The `error` of a flow ended because it expired before anyone finished it.
pub const EXPIRED: &str = "expired";
/// The audit action of a flow completed at the callback (without CompleteAuthorization).
pub const FLOW_COMPLETED: &str = "flow.completed";
/// The audit action of a flow burned because another caller tried to complete it.
pub const FLOW_MISMATCHED: &str = "flow.mismatched";

/// A consent-flow event's record.
fn flow_record(flow: &Flow, action: &str, outcome: Outcome) -> AuditRecord {
    AuditRecord {
        outcome,
        target: Some(crate::audit::flow_target(&flow.id)),
        ..crate::audit::event(action, &flow.agent, &flow.user, Some(&flow.tool))
    }
}

impl Vault {
    /// Starts a consent flow for the caller's (agent, user) and `tool`.
    #[tracing::instrument(skip(self, caller, scopes, return_url), fields(agent = %caller.agent, tool = %tool))]
    pub async fn begin_authorization(
        &self,
        call: &Call,
        caller: &Caller,
        tool: &Tool,
        scopes: Vec<String>,
        return_url: Option<&str>,
    ) -> Result<BegunAuthorization, VaultError> {
        if !caller.store {
            return Err(VaultError::PermissionDenied(format!(
                "BeginAuthorization needs the {} scope in the caller token: acquiring a credential is a write",
                self.options.store_scope
            )));
        }
        let policy = self.admit(caller, Some(tool))?;
        super::before(call.deadline(), "the consent flow")?;
        let consent = &self.options.consent;
        let return_url = match return_url {
            Some(text) => {
                let invalid = |problem: String| VaultError::InvalidArgument {
                    field: "return_url",
                    problem,
                };
                if text.len() > MAX_RETURN_URL_BYTES {
                    return Err(invalid(format!(
                        "must be at most {MAX_RETURN_URL_BYTES} bytes"
                    )));
                }
                let url =
                    url::Url::parse(text).map_err(|_| invalid("must be an absolute URL".into()))?;
                if url.query_pairs().any(|(k, _)| k == "authorization_id") {
                    return Err(invalid(
                        "must not carry authorization_id; the callback adds it".into(),
                    ));
                }
                if !return_url_allowed(&url, &consent.return_urls) {
                    return Err(invalid(
                        "is not under any of the server's VAULT_OAUTH_RETURN_URLS".into(),
                    ));
                }
                Some(url)
            }
            None if consent.unbound => None,
            None => {
                return Err(VaultError::InvalidArgument {
                    field: "return_url",
                    problem: "is required: this server completes flows only for the caller that began them (VAULT_OAUTH_UNBOUND_CALLBACK=deny)".into(),
                });
            }
        };
        let provider = self
            .providers
            .get(tool)
            .ok_or_else(|| VaultError::InvalidArgument {
                field: "tool",
                problem: format!("no OAuth provider is configured for tool {tool}"),
            })?;
        let scopes = if scopes.is_empty() {
            provider.consent_scopes().await.map_err(provider_error)?
        } else {
            scopes
        };
        if let Some(problem) = scopes_problem(&scopes) {
            return Err(VaultError::InvalidArgument {
                field: "scopes",
                problem,
            });
        }
        super::within_ceiling(policy.as_deref(), "scopes", tool, &scopes)?;
        let redirect_uri = match provider.redirect_uri() {
            Some(uri) => uri.to_string(),
            None => consent
                .redirect_uri
                .as_ref()
                .map(url::Url::to_string)
                .ok_or_else(|| VaultError::InvalidArgument {
                    field: "tool",
                    problem: format!(
                        "tool {tool} has no redirect URI: the server needs OAUTH_TOOL_REDIRECT_URI or tools.{tool}.redirect_uri"
                    ),
                })?,
        };
        let entry = self
            .agent_entry(&caller.issuer, &caller.agent, true)
            .await?
            .ok_or_else(|| {
                VaultError::Unexpected(anyhow::anyhow!("agent vanished after creation"))
            })?;

        let id = random_text(16);
        call.on_agent(&entry.record);
        call.flow(&id);
        let state = zeroize::Zeroizing::new(random_text(32));
        let verifier = zeroize::Zeroizing::new(random_text(32));
        let challenge = pkce_challenge(&verifier);
        let (authorization_url, provider_binding) = provider
            .authorization_url(&AuthorizationRequest {
                state: &state,
                code_challenge: &challenge,
                scopes: &scopes,
                redirect_uri: &redirect_uri,
            })
            .await
            .map_err(provider_error)?;
        ensure_pkce(&authorization_url, &challenge)?;

        let binding = FlowBinding {
            agent: &caller.agent,
            user: &caller.user,
            tool,
            flow: &id,
        };
        let ttl = chrono::Duration::from_std(consent.flow_ttl)
            .map_err(|e| VaultError::Unexpected(e.into()))?;
        let expires_at = Utc::now() + ttl;
        let mut entry = entry;
        let mut attempts = 0;
        loop {
            let sealed_verifier = seal_flow_secret(
                &entry.key,
                binding,
                FlowSecret::Verifier,
                verifier.as_bytes(),
            );
            let created = self
                .store
                .flows
                .create_flow(&NewFlow {
                    id: &id,
                    state_hash: &sha256(&state),
                    issuer: &caller.issuer,
                    agent: &caller.agent,
                    namespace: &entry.record.namespace,
                    user: &caller.user,
                    tool,
                    scopes: &scopes,
                    return_url: return_url.as_ref().map(url::Url::as_str),
                    redirect_uri: &redirect_uri,
                    provider_binding: Some(&provider_binding),
                    sealed_verifier: &sealed_verifier,
                    expires_at,
                })
                .await;
            match created {
                // The agent key was rotated since this replica cached it: seal again.
                Err(StoreError::AgentKeyRotated) if attempts < super::RESEAL_ATTEMPTS => {
                    attempts += 1;
                    entry = self.reload_entry(&entry).await?;
                }
                other => break other?,
            }
        }
        tracing::info!(authorization_id = %id, bound = return_url.is_some(), "consent flow begun");
        Ok(BegunAuthorization {
            authorization_url,
            authorization_id: id,
            expires_at,
        })
    }

    /// The provider's redirect back to the vault.
    #[tracing::instrument(skip_all)]
    pub async fn callback(self: &Arc<Self>, params: CallbackParams) -> CallbackOutcome {
        match self.take_callback(params).await {
            Ok(outcome) => outcome,
            Err(err) => {
                tracing::warn!(error = %crate::telemetry::error_chain(&err), "consent callback failed");
                CallbackOutcome::Unavailable(
                    "The vault could not record this sign-in. Try again from the application."
                        .into(),
                )
            }
        }
    }

    async fn take_callback(
        self: &Arc<Self>,
        params: CallbackParams,
    ) -> Result<CallbackOutcome, VaultError> {
        let refused = |text: &str| Ok(CallbackOutcome::Refused(text.to_string()));
        let too_long = [&params.state, &params.error, &params.iss]
            .into_iter()
            .flatten()
            .any(|v| v.len() > MAX_CALLBACK_PARAM_BYTES)
            || params
                .code
                .as_ref()
                .is_some_and(|c| c.expose_secret().len() > MAX_CALLBACK_PARAM_BYTES);
        if too_long {
            return refused("This sign-in response is malformed.");
        }
        let Some(state) = params.state.as_deref().filter(|s| !s.is_empty()) else {
            return refused(
                "This sign-in response carries no state; it was not sent by this vault's flow.",
            );
        };
        let Some(flow) = self.store.flows.flow_by_state(&sha256(state)).await? else {
            tracing::warn!("consent callback with an unknown state (forged, or from a swept flow)");
            return refused("This sign-in link is not valid. Start again from the application.");
        };
        let now = Utc::now();
        if flow.status == FlowStatus::Failed && flow.error.as_deref() == Some(EXPIRED) {
            // Ended by the sweeper, which recorded its expiry.
            tracing::info!(authorization_id = %flow.id, "consent callback after the flow expired");
            return refused(
                "This sign-in took too long and has expired. Start again from the application.",
            );
        }
        if flow.status != FlowStatus::Pending {
            tracing::warn!(authorization_id = %flow.id, status = ?flow.status, "consent callback replayed");
            return refused(
                "This sign-in link was already used. Start again from the application.",
            );
        }
        if flow.expires_at <= now {
            tracing::info!(authorization_id = %flow.id, "consent callback after the flow expired");
            self.flow_event(
                &flow,
                FLOW_EXPIRED,
                Outcome::Failed("AUTHORIZATION_EXPIRED".into()),
            )
            .await;
            return refused(
                "This sign-in took too long and has expired. Start again from the application.",
            );
        }
        let Some(provider) = self.providers.get(&flow.tool) else {
            self.fail_pending(&flow, "tool_not_configured").await?;
            return refused("This tool is no longer configured in the vault.");
        };
        // RFC 9207 §2.4: error responses are checked too, so a mix-up cannot deny a flow.
        let bound = flow.provider_binding.as_deref();
        match provider
            .check_callback_issuer(params.iss.as_deref(), bound)
            .await
        {
            Ok(()) => {}
            Err(CallbackIssuerError::Unverifiable(problem)) => {
                tracing::warn!(authorization_id = %flow.id, %problem, "cannot check the callback's issuer now");
                return Ok(CallbackOutcome::Unavailable(
                    "The vault cannot verify this sign-in right now. Reload this page in a moment."
                        .into(),
                ));
            }
            Err(CallbackIssuerError::Mismatch(problem)) => {
                tracing::warn!(authorization_id = %flow.id, %problem, "consent callback from the wrong issuer (RFC 9207)");
                self.fail_pending(&flow, "issuer_mismatch").await?;
                return refused("This sign-in response did not come from the expected provider.");
            }
        }
        if let Some(error) = params.error.as_deref() {
            let code = error_code(error);
            let (to, text) = if code == "access_denied" {
                (
                    FlowStatus::Denied,
                    "Access was not granted, so nothing was connected.",
                )
            } else {
                (
                    FlowStatus::Failed,
                    "The provider reported an error, so nothing was connected.",
                )
            };
            self.end_flow(&flow, FlowStatus::Pending, to, &code).await?;
            self.flow_event(
                &flow,
                FLOW_DENIED,
                Outcome::Failed("AUTHORIZATION_DENIED".into()),
            )
            .await;
            tracing::info!(authorization_id = %flow.id, error = %code, "provider refused consent");
            // The server no longer knows the vault's registered client: renew it at the next
            // Begin instead of handing out a dead client ID.
            if matches!(code.as_str(), "unauthorized_client" | "invalid_client")
                && let Some(bound) = bound
            {
                provider.client_refused_at_authorization(bound).await;
            }
            return refused(text);
        }
        let Some(code) = params.code.filter(|c| !c.expose_secret().is_empty()) else {
            self.fail_pending(&flow, "no_code").await?;
            return refused("The provider sent no authorization code.");
        };
        let mut entry = self.flow_agent(&flow).await?;
        let mut attempts = 0;
        let (moved, sealed_code) = loop {
            let sealed_code = seal_flow_secret(
                &entry.key,
                flow_binding(&flow),
                FlowSecret::Code,
                code.expose_secret().as_bytes(),
            );
            let moved = self
                .store
                .flows
                .transition(
                    &flow.id,
                    FlowChange {
                        from: FlowStatus::Pending,
                        to: FlowStatus::CallbackReceived,
                        unexpired: true,
                        sealed_code: Some(&sealed_code),
                        error: None,
                    },
                )
                .await;
            match moved {
                // The agent key was rotated since this replica cached it: seal again.
                Err(StoreError::AgentKeyRotated) if attempts < super::RESEAL_ATTEMPTS => {
                    attempts += 1;
                    entry = self.reload_entry(&entry).await?;
                }
                other => break (other?, sealed_code),
            }
        };
        if !moved {
            return refused(
                "This sign-in link was already used or has expired. Start again from the application.",
            );
        }
        tracing::info!(authorization_id = %flow.id, "consent callback received");
        self.flow_event(&flow, FLOW_CALLBACK, Outcome::Ok).await;
        match &flow.return_url {
            Some(return_url) => {
                let mut url = url::Url::parse(return_url).map_err(|e| {
                    VaultError::Unexpected(anyhow::anyhow!("stored return_url: {e}"))
                })?;
                url.query_pairs_mut()
                    .append_pair("authorization_id", &flow.id);
                Ok(CallbackOutcome::Redirect(url))
            }
            None if self.options.consent.unbound => {
                // No caller is here to admit, but the policy in force now still decides whether
                // the flow's agent may use its tool, as it does at CompleteAuthorization.
                if let Some(policy) = self.options.policy.current()
                    && let Err(denied) = policy.check_use(&flow.agent, &flow.tool)
                {
                    tracing::info!(authorization_id = %flow.id, rule = %denied.rule, "unbound consent flow refused by the policy");
                    self.end_flow(
                        &flow,
                        FlowStatus::CallbackReceived,
                        FlowStatus::Failed,
                        "policy_denied",
                    )
                    .await?;
                    self.flow_event(&flow, FLOW_DENIED, Outcome::Failed("POLICY_DENIED".into()))
                        .await;
                    return refused(
                        "The vault's policy does not let this application use this tool, so nothing was connected.",
                    );
                }
                let mut flow = flow;
                flow.sealed_code = Some(sealed_code);
                flow.status = FlowStatus::CallbackReceived;
                let record = flow_record(&flow, FLOW_COMPLETED, Outcome::Ok);
                match self.exchange(&flow, &entry, record).await {
                    Ok(_) => Ok(CallbackOutcome::Completed {
                        tool: flow.tool.clone(),
                    }),
                    Err(err) => {
                        tracing::info!(authorization_id = %flow.id, error = %err, "unbound consent flow did not complete");
                        refused(match err {
                            VaultError::AuthorizationDenied(_) => {
                                "The provider refused the authorization code, so nothing was connected."
                            }
                            VaultError::ProviderUnavailable(_) => {
                                "The provider could not be reached to finish connecting. Start again from the application."
                            }
                            _ => "The vault could not finish connecting this tool.",
                        })
                    }
                }
            }
            None => {
                self.end_flow(
                    &flow,
                    FlowStatus::CallbackReceived,
                    FlowStatus::Failed,
                    "unbound_callback_denied",
                )
                .await?;
                refused("This vault does not complete sign-ins without the application.")
            }
        }
    }

    /// Exchanges the flow's code and stores the credential, for the caller that began it.
    #[tracing::instrument(skip(self, caller), fields(agent = %caller.agent))]
    pub async fn complete_authorization(
        self: &Arc<Self>,
        call: &Call,
        caller: &Caller,
        authorization_id: &str,
    ) -> Result<CompletedAuthorization, VaultError> {
        call.flow(authorization_id);
        if !caller.store {
            return Err(VaultError::PermissionDenied(format!(
                "CompleteAuthorization needs the {} scope in the caller token: it stores a credential",
                self.options.store_scope
            )));
        }
        let flow = self
            .store
            .flows
            .flow(authorization_id)
            .await?
            .ok_or(VaultError::AuthorizationNotFound)?;
        if flow.issuer != caller.issuer || flow.agent != caller.agent || flow.user != caller.user {
            tracing::warn!(authorization_id = %flow.id, "consent flow completed by another agent or user; burning it");
            self.burn(&flow).await?;
            self.flow_event(
                &flow,
                FLOW_MISMATCHED,
                Outcome::Failed("AUTHORIZATION_MISMATCH".into()),
            )
            .await;
            return Err(VaultError::AuthorizationMismatch);
        }
        let state = visible_state(&flow, Utc::now());
        if state != AuthorizationState::CallbackReceived
            || flow.status != FlowStatus::CallbackReceived
        {
            return Err(not_completable(&flow, state));
        }
        call.tool(&flow.tool);
        // The policy in force now decides, not the one the flow began under.
        self.admit(caller, Some(&flow.tool))?;
        let entry = self.flow_agent(&flow).await?;
        call.on_agent(&entry.record);
        super::before(call.deadline(), "the code exchange")?;
        let completed = self.exchange(&flow, &entry, call.for_write()).await?;
        call.written();
        Ok(completed)
    }

    /// Claims a flow in `CallbackReceived`, exchanges its code and stores the credential, to
    /// the end even if the caller hangs up: a code spent at the provider whose tokens were then
    /// dropped would orphan a grant there.
    async fn exchange(
        self: &Arc<Self>,
        flow: &Flow,
        entry: &Arc<AgentEntry>,
        audit: AuditRecord,
    ) -> Result<CompletedAuthorization, VaultError> {
        let (this, flow, entry) = (Arc::clone(self), flow.clone(), Arc::clone(entry));
        self.detached
            .spawn(
                async move { this.exchange_detached(&flow, &entry, audit).await }
                    .instrument(tracing::Span::current()),
            )
            .await
            .map_err(|err| VaultError::Unexpected(anyhow::anyhow!("exchange task failed: {err}")))?
    }

    async fn exchange_detached(
        &self,
        flow: &Flow,
        entry: &Arc<AgentEntry>,
        audit: AuditRecord,
    ) -> Result<CompletedAuthorization, VaultError> {
        let claimed = self
            .store
            .flows
            .transition(
                &flow.id,
                FlowChange {
                    from: FlowStatus::CallbackReceived,
                    to: FlowStatus::Exchanging,
                    unexpired: true,
                    sealed_code: None,
                    error: None,
                },
            )
            .await?;
        if !claimed {
            let now = self.store.flows.flow(&flow.id).await?;
            return Err(match now {
                Some(now) => not_completable(&now, visible_state(&now, Utc::now())),
                None => VaultError::AuthorizationNotFound,
            });
        }
        let binding = flow_binding(flow);
        // The secrets may have been sealed under a version this replica has not cached.
        let mut entry = Arc::clone(entry);
        for sealed in [&flow.sealed_verifier, &flow.sealed_code] {
            if let Some(version) = sealed.as_deref().and_then(flow_secret_version) {
                entry = self.entry_for(entry, version).await?;
            }
        }
        let open = |kind, sealed: &Option<Vec<u8>>| {
            let sealed = sealed.as_deref().ok_or_else(|| {
                VaultError::Unexpected(anyhow::anyhow!("flow {} lost its {kind:?}", flow.id))
            })?;
            let key = flow_secret_version(sealed).and_then(|version| entry.key_at(version));
            let opened = key
                .ok_or(crate::crypto::OpenError)
                .and_then(|key| open_flow_secret(key, binding, kind, sealed));
            let clear = opened.map_err(|_| {
                tracing::error!(authorization_id = %flow.id, ?kind, "a flow secret does not open for its flow");
                VaultError::Unexpected(anyhow::anyhow!("flow secret does not open"))
            })?;
            String::from_utf8(clear.to_vec())
                .map(SecretString::from)
                .map_err(|_| VaultError::Unexpected(anyhow::anyhow!("flow secret is not text")))
        };
        let opened = open(FlowSecret::Verifier, &flow.sealed_verifier)
            .and_then(|v| Ok((v, open(FlowSecret::Code, &flow.sealed_code)?)));
        let (verifier, code) = match opened {
            Ok(pair) => pair,
            Err(err) => {
                self.end_flow(
                    flow,
                    FlowStatus::Exchanging,
                    FlowStatus::Failed,
                    "internal_error",
                )
                .await?;
                return Err(err);
            }
        };
        let provider = match self.providers.get(&flow.tool) {
            Some(provider) => provider,
            None => {
                self.end_flow(
                    flow,
                    FlowStatus::Exchanging,
                    FlowStatus::Failed,
                    "tool_not_configured",
                )
                .await?;
                return Err(VaultError::AuthorizationDenied(format!(
                    "tool {} is no longer configured; begin a new flow once it is",
                    flow.tool
                )));
            }
        };
        let (obtained, binding) = match provider
            .exchange_code(
                &code,
                &verifier,
                &flow.redirect_uri,
                flow.provider_binding.as_deref(),
            )
            .await
        {
            Ok(obtained) => obtained,
            Err(ProviderError::GrantRejected(reason)) => {
                self.end_flow(
                    flow,
                    FlowStatus::Exchanging,
                    FlowStatus::Failed,
                    &format!("code_rejected: {reason}"),
                )
                .await?;
                return Err(VaultError::AuthorizationDenied(format!(
                    "the provider refused the authorization code ({reason}); begin a new flow"
                )));
            }
            Err(ProviderError::ServerChanged(reason)) => {
                self.end_flow(
                    flow,
                    FlowStatus::Exchanging,
                    FlowStatus::Failed,
                    "provider_changed",
                )
                .await?;
                return Err(VaultError::AuthorizationDenied(format!(
                    "{reason}; the code was not sent there; begin a new flow"
                )));
            }
            Err(
                ProviderError::Unavailable { message, .. } | ProviderError::Paused { message, .. },
            ) => {
                // The code may still be good: let a retry within the expiry try again.
                self.store
                    .flows
                    .transition(
                        &flow.id,
                        FlowChange {
                            from: FlowStatus::Exchanging,
                            to: FlowStatus::CallbackReceived,
                            unexpired: false,
                            sealed_code: None,
                            error: None,
                        },
                    )
                    .await?;
                return Err(VaultError::ProviderUnavailable(message));
            }
        };
        let now = Utc::now().timestamp();
        let scopes = obtained.scopes.unwrap_or_else(|| flow.scopes.clone());
        let tokens = TokenSet {
            access_token: obtained.access_token,
            refresh_token: obtained.refresh_token,
            token_type: "Bearer".into(),
            expires_at: obtained
                .expires_in
                .map(|d| now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))),
            scopes: scopes.clone(),
            // The server and client that exchanged the code minted these tokens.
            provider: Some(binding),
            obtained_at: Some(now),
        };
        let policy = self.options.policy.current();
        let written = match policy
            .as_deref()
            .map(|p| p.check_scopes(&flow.tool, &scopes))
        {
            // The flow asked for scopes within the ceiling; a provider that granted more gets its
            // grant back rather than the vault holding it.
            Some(Err(over)) => Err(VaultError::PolicyDenied {
                rule: over.rule,
                message: format!("the provider granted scopes {}", over.problem),
            }),
            _ => {
                let ttl = super::ttl_cap(
                    policy.as_deref(),
                    &flow.tool,
                    self.options.secrets_ttl_seconds,
                );
                self.write_credential(
                    &entry,
                    &flow.user,
                    &flow.tool,
                    &tokens,
                    ttl,
                    (super::OwedRecord::default(), audit),
                )
                .await
            }
        };
        let stored = match written {
            Ok(stored) => stored,
            Err(err) => {
                // The code is spent: give the provider its tokens back rather than leave a grant
                // nobody holds, and end the flow (both best effort: the store may be down).
                tracing::error!(authorization_id = %flow.id, error = %err, "storing the credential from a code exchange failed; revoking its tokens at the provider");
                let token = tokens
                    .refresh_token
                    .as_ref()
                    .map_or((&tokens.access_token, TokenKind::Access), |refresh| {
                        (refresh, TokenKind::Refresh)
                    });
                if let Err(revoke) = provider
                    .revoke(token.0, token.1, tokens.provider.as_deref())
                    .await
                {
                    tracing::warn!(authorization_id = %flow.id, error = %revoke, "could not revoke the orphaned grant");
                }
                let _ = self
                    .end_flow(
                        flow,
                        FlowStatus::Exchanging,
                        FlowStatus::Failed,
                        if matches!(err, VaultError::PolicyDenied { .. }) {
                            "policy_denied"
                        } else {
                            "store_failed"
                        },
                    )
                    .await;
                return Err(err);
            }
        };
        let completed = self
            .store
            .flows
            .transition(
                &flow.id,
                FlowChange {
                    from: FlowStatus::Exchanging,
                    to: FlowStatus::Completed,
                    unexpired: false,
                    sealed_code: None,
                    error: None,
                },
            )
            .await?;
        if !completed {
            // Only this call moves a flow out of Exchanging; a lost update is a broken invariant.
            tracing::error!(authorization_id = %flow.id, "a claimed flow left Exchanging under its claimant");
        }
        tracing::info!(authorization_id = %flow.id, generation = %stored.generation, "consent flow completed");
        Ok(CompletedAuthorization { stored, scopes })
    }

    /// The state of one of the caller's flows; another caller's is not found.
    #[tracing::instrument(skip(self, caller), fields(agent = %caller.agent))]
    pub async fn get_authorization(
        &self,
        call: &Call,
        caller: &Caller,
        authorization_id: &str,
    ) -> Result<AuthorizationView, VaultError> {
        self.admit(caller, None)?;
        call.flow(authorization_id);
        let flow = self
            .store
            .flows
            .flow(authorization_id)
            .await?
            .filter(|f| {
                f.issuer == caller.issuer && f.agent == caller.agent && f.user == caller.user
            })
            .ok_or(VaultError::AuthorizationNotFound)?;
        Ok(AuthorizationView {
            state: visible_state(&flow, Utc::now()),
            authorization_id: flow.id,
            tool: flow.tool,
            expires_at: flow.expires_at,
            error: flow.error,
        })
    }

    /// The connections of the caller, or (admin) of another user or agent of its issuer.
    #[tracing::instrument(skip(self, caller), fields(agent = %caller.agent))]
    pub async fn list_credentials(
        &self,
        call: &Call,
        caller: &Caller,
        agent: Option<AgentId>,
        user: Option<UserId>,
    ) -> Result<Vec<ConnectionInfo>, VaultError> {
        self.admit(caller, None)?;
        let agent = agent.unwrap_or_else(|| caller.agent.clone());
        let user = user.unwrap_or_else(|| caller.user.clone());
        if (agent != caller.agent || user != caller.user) && !caller.admin {
            return Err(VaultError::PermissionDenied(
                "listing another user's or agent's credentials needs the vault:admin scope".into(),
            ));
        }
        if agent != caller.agent || user != caller.user {
            call.acting_on(&agent, Some(&user));
        }
        let Some(entry) = self.agent_entry(&caller.issuer, &agent, false).await? else {
            return Ok(Vec::new());
        };
        call.on_agent(&entry.record);
        let now = Utc::now();
        let mut out = Vec::new();
        for row in self.store.credentials.list(&entry.record, &user).await? {
            let binding = Binding {
                agent: &agent,
                user: &user,
                tool: &row.tool,
                generation: row.generation,
            };
            let entry = self
                .entry_for(Arc::clone(&entry), row.sealed.key_version)
                .await?;
            let Ok(tokens) = super::open_sealed(&entry, binding, &row.sealed) else {
                tracing::error!(tool = %row.tool, generation = %row.generation, "stored credential does not open for its row; not listed");
                continue;
            };
            let access_expired = row.access_expires_at.is_some_and(|at| at <= now);
            let state = if row.state == CredentialState::ReauthRequired {
                "REAUTH_REQUIRED"
            } else if row.ttl_expires_at <= now
                || (access_expired && tokens.refresh_token.is_none())
            {
                "EXPIRED"
            } else {
                "ACTIVE"
            };
            out.push(ConnectionInfo {
                tool: row.tool,
                state,
                has_refresh_token: tokens.refresh_token.is_some(),
                scopes: tokens.scopes,
                access_expires_at: row.access_expires_at,
                ttl_expires_at: row.ttl_expires_at,
                generation: row.generation,
                updated_at: row.updated_at,
            });
        }
        Ok(out)
    }

    /// The registry entry of the agent that began `flow`.
    /// Records a consent-flow transition that no RPC made, in the flow's agent's chain.
    async fn flow_event(&self, flow: &Flow, action: &str, outcome: Outcome) {
        match self.flow_agent(flow).await {
            Ok(entry) => {
                self.record_event(&entry.record, flow_record(flow, action, outcome))
                    .await;
            }
            Err(err) => {
                tracing::error!(authorization_id = %flow.id, %action, error = %err, "could not record a consent-flow event: its agent is unavailable");
            }
        }
    }

    async fn flow_agent(&self, flow: &Flow) -> Result<Arc<AgentEntry>, VaultError> {
        self.agent_entry(&flow.issuer, &flow.agent, false)
            .await?
            .ok_or_else(|| {
                VaultError::Unexpected(anyhow::anyhow!(
                    "the agent of flow {} is not registered",
                    flow.id
                ))
            })
    }

    /// Ends up to `limit` consent flows that expired before anyone finished them, each with a
    /// `flow.expired` record, so that a watcher waiting for consent learns the flow is over.
    /// The record is written first: a pass that stops in between records the expiry again on
    /// the next pass rather than never (and an admin Sweep racing the sweeper may record one
    /// twice; nothing can complete an expired flow, so no record contradicts it). Returns how
    /// many flows ended.
    pub async fn expire_flows(&self, limit: u32) -> Result<u64, VaultError> {
        let mut ended = 0;
        for flow in self.store.flows.expired_unfinished(limit).await? {
            let Some(entry) = self.agent_entry(&flow.issuer, &flow.agent, false).await? else {
                // No agent, no chain to record in: end the flow all the same, or it would come
                // first in every pass and keep the others from expiring.
                tracing::warn!(authorization_id = %flow.id, "an expired consent flow's agent is not registered; ending it unrecorded");
                self.end_flow(&flow, flow.status, FlowStatus::Failed, EXPIRED)
                    .await?;
                continue;
            };
            self.recorder
                .record(
                    crate::audit::Owner::Agent(Arc::new(entry.record.clone())),
                    flow_record(
                        &flow,
                        FLOW_EXPIRED,
                        Outcome::Failed("AUTHORIZATION_EXPIRED".into()),
                    ),
                )
                .await
                .map_err(VaultError::AuditUnavailable)?;
            if self
                .end_flow(&flow, flow.status, FlowStatus::Failed, EXPIRED)
                .await?
            {
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// Ends a flow in `to` with `error`, if it is still in `from`.
    async fn end_flow(
        &self,
        flow: &Flow,
        from: FlowStatus,
        to: FlowStatus,
        error: &str,
    ) -> Result<bool, VaultError> {
        Ok(self
            .store
            .flows
            .transition(
                &flow.id,
                FlowChange {
                    from,
                    to,
                    unexpired: false,
                    sealed_code: None,
                    error: Some(error),
                },
            )
            .await?)
    }

    /// Fails a flow still waiting for its callback.
    async fn fail_pending(&self, flow: &Flow, error: &str) -> Result<bool, VaultError> {
        self.end_flow(flow, FlowStatus::Pending, FlowStatus::Failed, error)
            .await
    }

    /// Fails a flow that has not yet been claimed for its exchange: a mismatched completion
    /// means its link reached someone else, so nobody may complete it. A flow whose exchange the
    /// rightful caller already claimed is left to finish.
    async fn burn(&self, flow: &Flow) -> Result<(), VaultError> {
        let mut status = flow.status;
        // Each miss means a concurrent step moved it; a flow only moves forward, so this ends.
        while matches!(status, FlowStatus::Pending | FlowStatus::CallbackReceived) {
            if self
                .end_flow(flow, status, FlowStatus::Failed, "caller_mismatch")
                .await?
            {
                return Ok(());
            }
            status = match self.store.flows.flow(&flow.id).await? {
                Some(now) => now.status,
                None => return Ok(()),
            };
        }
        Ok(())
    }
}

fn flow_binding(flow: &Flow) -> FlowBinding<'_> {
    FlowBinding {
        agent: &flow.agent,
        user: &flow.user,
        tool: &flow.tool,
        flow: &flow.id,
    }
}

fn provider_error(err: ProviderError) -> VaultError {
    match err {
        ProviderError::GrantRejected(reason) => VaultError::ProviderUnavailable(format!(
            "the provider refused the client ({reason}); check the tool's registration"
        )),
        ProviderError::Unavailable { message, .. } | ProviderError::Paused { message, .. } => {
            VaultError::ProviderUnavailable(message)
        }
        ProviderError::ServerChanged(message) => VaultError::ProviderUnavailable(message),
    }
}

/// The last line of defence for PKCE: an authorization URL without our S256 challenge is never
/// handed out, whatever the provider configuration says.
fn ensure_pkce(url: &url::Url, challenge: &str) -> Result<(), VaultError> {
    let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    let has = |name: &str, value: &str| {
        pairs.iter().filter(|(k, _)| k == name).count() == 1
            && pairs.iter().any(|(k, v)| k == name && v == value)
    };
    if has("code_challenge", challenge) && has("code_challenge_method", "S256") {
        Ok(())
    } else {
        Err(VaultError::Unexpected(anyhow::anyhow!(
            "the authorization URL lacks the PKCE S256 challenge; refusing to hand it out"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(list: &[&str]) -> Vec<url::Url> {
        list.iter().map(|u| url::Url::parse(u).unwrap()).collect()
    }

    #[test]
    fn a_return_url_must_sit_under_an_allowed_prefix_on_a_path_boundary() {
        let allowed = urls(&["https://app.example/oauth/done", "http://127.0.0.1:8080/"]);
        let ok = |u: &str| return_url_allowed(&url::Url::parse(u).unwrap(), &allowed);
        assert!(ok("https://app.example/oauth/done"));
        assert!(ok("https://app.example/oauth/done?x=1"));
        assert!(ok("https://app.example/oauth/done/step"));
        assert!(ok("https://app.example:443/oauth/done"));
        assert!(ok("http://127.0.0.1:8080/anything"));
        assert!(!ok("https://app.example/oauth/done-evil"));
        assert!(!ok("https://app.example/oauth"));
        assert!(!ok("https://app.example.evil.com/oauth/done"));
        assert!(!ok("http://app.example/oauth/done"));
        assert!(!ok("https://app.example:8443/oauth/done"));
        assert!(!ok("https://user@app.example/oauth/done"));
        assert!(!ok("https://app.example/oauth/done#frag"));
        assert!(!ok("http://127.0.0.1:8081/anything"));
        assert!(!return_url_allowed(
            &url::Url::parse("https://app.example/oauth/done").unwrap(),
            &[]
        ));
    }

    #[test]
    fn the_pkce_challenge_is_unpadded_base64url_of_sha256() {
        // Computed independently: base64.urlsafe_b64encode(hashlib.sha256(v).digest()) in Python.
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWxOEjXk"),
            "O_uB6U03gRg--6ORZ0ZVqgZbsQmdYdFwf4Y3sAFCu7I"
        );
    }

    #[test]
    fn an_authorization_url_without_the_s256_challenge_is_never_handed_out() {
        let good = url::Url::parse(
            "https://as.example/auth?code_challenge=abc&code_challenge_method=S256",
        )
        .unwrap();
        assert!(ensure_pkce(&good, "abc").is_ok());
        for bad in [
            "https://as.example/auth?client_id=x",
            "https://as.example/auth?code_challenge=abc",
            "https://as.example/auth?code_challenge=abc&code_challenge_method=plain",
            "https://as.example/auth?code_challenge=other&code_challenge_method=S256",
            "https://as.example/auth?code_challenge=abc&code_challenge=evil&code_challenge_method=S256",
        ] {
            assert!(
                ensure_pkce(&url::Url::parse(bad).unwrap(), "abc").is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn scopes_are_checked_against_the_rfc_alphabet() {
        assert!(scopes_problem(&["read:jira-work".into()]).is_none());
        assert!(scopes_problem(&["".into()]).is_some());
        assert!(scopes_problem(&["a b".into()]).is_some());
        assert!(scopes_problem(&["a\"b".into()]).is_some());
        assert!(scopes_problem(&vec!["s".to_string(); MAX_SCOPES + 1]).is_some());
    }

    #[test]
    fn a_provider_error_code_is_reduced_to_its_safe_alphabet() {
        assert_eq!(error_code("access_denied"), "access_denied");
        assert_eq!(
            error_code("<script>alert(1)</script>"),
            "scriptalert1script"
        );
        assert_eq!(error_code("\u{0}"), "unknown_error");
        assert_eq!(error_code(&"x".repeat(500)).len(), 64);
    }
}
