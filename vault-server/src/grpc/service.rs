//! `vault.v1.CredentialVault`: validates each request at the edge, calls the use case with the
//! caller from the auth layer, and maps the answer back.

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use tonic::{Request, Response, Status};

use super::auth_layer::Presented;
use super::proto::credential_vault_server::CredentialVault;
use super::proto::{
    AccessToken, AuditEvent, Authorization, BeginAuthorizationRequest, BeginAuthorizationResponse,
    CompleteAuthorizationRequest, CompleteAuthorizationResponse, CredentialInfo,
    GetAuthorizationRequest, GetTokenRequest, GetTokenResponse, ListAuditEventsRequest,
    ListAuditEventsResponse, ListCredentialsRequest, ListCredentialsResponse, OAuthToken,
    RefreshRequest, RefreshResponse, RevokeRequest, RevokeResponse, RotateAgentKeyRequest,
    RotateAgentKeyResponse, StoreTokenRequest, StoreTokenResponse, SweepRequest, SweepResponse,
    authorization, rotate_agent_key_response,
};
use super::status::{audit_unavailable, invalid_argument, log_failure, reason_of};
use super::watch::{EventStream, Watchers};
use crate::audit::{Call, Origin, Outcome};
use crate::auth::Caller;
use crate::ids::{AgentId, Generation, Tool, UserId};
use crate::secret::TokenSet;
use crate::vault::{
    AuditQuery, AuthorizationState, IssuedToken, MAX_AUDIT_PAGE, RevokeTarget, Vault, VaultError,
};

/// Largest access or refresh token accepted.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Most scopes, and longest scope, accepted.
const MAX_SCOPES: usize = 256;
const MAX_SCOPE_BYTES: usize = 512;
/// Largest Sweep batch a call may ask for.
const MAX_SWEEP_LIMIT: u32 = 100_000;

/// The gRPC face of [`Vault`].
#[derive(Debug, Clone)]
pub struct CredentialVaultService {
    vault: Arc<Vault>,
    sweep_batch: u32,
    watchers: Arc<Watchers>,
}

impl CredentialVaultService {
    /// Serves `vault`; Sweep with `limit = 0` deletes up to `sweep_batch`. Watch streams are
    /// woken by the vault's own appends, and end on drain only after [`Self::watching`].
    pub fn new(vault: Arc<Vault>, sweep_batch: u32) -> Self {
        let watchers = Watchers::new(
            vault.store().clone(),
            vault.recorder().changes().clone(),
            tokio_util::sync::CancellationToken::new(),
        );
        Self {
            vault,
            sweep_batch,
            watchers,
        }
    }

    /// Wakes watch streams with `changes` (the channel the audit appends publish to), and ends
    /// them all when `stop` is cancelled (so draining never waits on a stream).
    pub fn watching(
        mut self,
        changes: crate::audit::Changes,
        stop: tokio_util::sync::CancellationToken,
    ) -> Self {
        self.watchers = Watchers::new(self.vault.store().clone(), changes, stop);
        self
    }
}

/// The audit record of this call, begun: who called, from where, in which trace.
fn start<T>(request: &Request<T>, action: &'static str, caller: &Caller) -> Call {
    let origin = Origin {
        digest: request
            .extensions()
            .get::<Presented>()
            .map(|presented| presented.0),
        peer: request.remote_addr().map(|addr| addr.to_string()),
        trace_id: crate::telemetry::current_trace_id(),
    };
    Call::new(action, caller, origin).with_deadline(deadline(request.metadata()))
}

/// When the caller stops waiting, from its `grpc-timeout` header (gRPC over HTTP/2: at most
/// eight digits, then H, M, S, m, u or n). A malformed header is ignored here; tonic's own
/// timeout layer reads the same header.
fn deadline(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => std::time::Duration::from_secs(amount * 3600),
        "M" => std::time::Duration::from_secs(amount * 60),
        "S" => std::time::Duration::from_secs(amount),
        "m" => std::time::Duration::from_millis(amount),
        "u" => std::time::Duration::from_micros(amount),
        "n" => std::time::Duration::from_nanos(amount),
        _ => return None,
    };
    std::time::Instant::now().checked_add(timeout)
}

impl CredentialVaultService {
    /// Ends `call`: counts it, and writes its record unless its credential write already did.
    /// A record that cannot be written turns the answer into AUDIT_UNAVAILABLE: no call
    /// succeeds unaudited.
    async fn end<T>(&self, call: &Call, result: Result<T, Status>) -> Result<T, Status> {
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(status) => Outcome::Failed(reason_of(status)),
        };
        let Some((owner, record)) = call.finish(outcome) else {
            return result;
        };
        self.vault.recorder().count(&record);
        if record.action == "GetToken"
            && record.outcome == Outcome::Ok
            && !self.vault.records_releases()
        {
            return result;
        }
        match self.vault.recorder().record(owner, record).await {
            Ok(()) => result,
            Err(err) => {
                tracing::error!(error = %crate::telemetry::error_chain(&err), "the call's audit record could not be written; answering AUDIT_UNAVAILABLE");
                Err(audit_unavailable())
            }
        }
    }
}

fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    // Set by the auth layer; absent only if the service were mounted without it.
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no verified caller"))
}

fn tool(field: &'static str, value: String) -> Result<Tool, Status> {
    Tool::parse(value).map_err(|err| invalid_argument(field, err.0))
}

fn timestamp(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

fn access_token(issued: IssuedToken) -> AccessToken {
    AccessToken {
        access_token: issued.access_token.expose_secret().to_owned(),
        token_type: issued.token_type,
        expires_at: issued.expires_at.map(timestamp),
        scopes: issued.scopes,
        generation: issued.generation.get(),
    }
}

/// Validates the incoming token set and moves its secrets into zeroizing types.
fn token_set(token: Option<OAuthToken>) -> Result<TokenSet, Status> {
    let token = token.ok_or_else(|| invalid_argument("token", "is required"))?;
    if token.access_token.is_empty() {
        return Err(invalid_argument("token.access_token", "must not be empty"));
    }
    if token.access_token.len() > MAX_TOKEN_BYTES {
        return Err(invalid_argument(
            "token.access_token",
            "must be at most 16 KiB",
        ));
    }
    if token.refresh_token.len() > MAX_TOKEN_BYTES {
        return Err(invalid_argument(
            "token.refresh_token",
            "must be at most 16 KiB",
        ));
    }
    let token_type = if token.token_type.is_empty() {
        "Bearer".to_string()
    } else {
        token.token_type
    };
    if token_type.len() > 64 || !token_type.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid_argument(
            "token.token_type",
            "must be at most 64 printable ASCII characters",
        ));
    }
    if token.scopes.len() > MAX_SCOPES {
        return Err(invalid_argument("token.scopes", "at most 256 scopes"));
    }
    if token
        .scopes
        .iter()
        .any(|s| s.is_empty() || s.len() > MAX_SCOPE_BYTES || s.chars().any(char::is_whitespace))
    {
        return Err(invalid_argument(
            "token.scopes",
            "each scope must be 1..512 bytes without spaces",
        ));
    }
    let expires_at = match token.expires_at {
        None => None,
        Some(ts) => {
            // Years 1970..=9999: anything else is not an expiry a provider issues.
            if !(0..=253_402_300_799).contains(&ts.seconds)
                || !(0..1_000_000_000).contains(&ts.nanos)
            {
                return Err(invalid_argument(
                    "token.expires_at",
                    "must be a valid timestamp after 1970",
                ));
            }
            Some(ts.seconds)
        }
    };
    Ok(TokenSet {
        access_token: SecretString::from(token.access_token),
        refresh_token: (!token.refresh_token.is_empty())
            .then(|| SecretString::from(token.refresh_token)),
        token_type,
        expires_at,
        scopes: token.scopes,
        // Set by the use case from the tool's configured provider, never by the caller.
        provider: None,
        obtained_at: None,
    })
}

/// The admin-only `agent_id` and `user_id` of a request, each `None` when empty.
fn owner(agent_id: String, user_id: String) -> Result<(Option<AgentId>, Option<UserId>), Status> {
    let agent = (!agent_id.is_empty())
        .then(|| AgentId::parse(agent_id).map_err(|err| invalid_argument("agent_id", err.0)))
        .transpose()?;
    let user = (!user_id.is_empty())
        .then(|| UserId::parse(user_id).map_err(|err| invalid_argument("user_id", err.0)))
        .transpose()?;
    Ok((agent, user))
}

/// An `authorization_id` as BeginAuthorization makes them: unpadded base64url, bounded.
fn authorization_id(value: String) -> Result<String, Status> {
    if value.is_empty() {
        return Err(invalid_argument("authorization_id", "is required"));
    }
    if value.len() > 64
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid_argument(
            "authorization_id",
            "is not an id BeginAuthorization returned",
        ));
    }
    Ok(value)
}

fn datetime(at: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

fn non_negative(field: &'static str, value: i64) -> Result<u64, Status> {
    u64::try_from(value).map_err(|_| invalid_argument(field, "must not be negative"))
}

fn answer<T>(rpc: &'static str, result: Result<T, VaultError>) -> Result<T, Status> {
    result.map_err(|err| {
        log_failure(rpc, &err);
        Status::from(err)
    })
}

#[tonic::async_trait]
impl CredentialVault for CredentialVaultService {
    async fn store_token(
        &self,
        request: Request<StoreTokenRequest>,
    ) -> Result<Response<StoreTokenResponse>, Status> {
        let caller = caller(&request)?;
        let call = start(&request, "StoreToken", &caller);
        let result = async {
            let body = request.into_inner();
            let tool = tool("tool", body.tool)?;
            call.tool(&tool);
            let ttl = match non_negative("ttl_seconds", body.ttl_seconds)? {
                0 => None,
                ttl => Some(ttl),
            };
            let tokens = token_set(body.token)?;
            let stored = answer(
                "StoreToken",
                self.vault
                    .store_token(&call, &caller, &tool, tokens, ttl)
                    .await,
            )?;
            Ok(Response::new(StoreTokenResponse {
                generation: stored.generation.get(),
                ttl_expires_at: Some(datetime(stored.ttl_expires_at)),
            }))
        }
        .await;
        self.end(&call, result).await
    }

    async fn get_token(
        &self,
        request: Request<GetTokenRequest>,
    ) -> Result<Response<GetTokenResponse>, Status> {
        let caller = caller(&request)?;
        let call = start(&request, "GetToken", &caller);
        let result = async {
            let body = request.into_inner();
            let tool = tool("tool", body.tool)?;
            call.tool(&tool);
            let min_valid = non_negative("min_valid_seconds", body.min_valid_seconds)?;
            let issued = answer(
                "GetToken",
                self.vault.get_token(&call, &caller, &tool, min_valid).await,
            )?;
            let refreshed = issued.refreshed;
            call.generation(issued.generation);
            Ok(Response::new(GetTokenResponse {
                token: Some(access_token(issued)),
                refreshed,
            }))
        }
        .await;
        self.end(&call, result).await
    }

    async fn refresh(
        &self,
        request: Request<RefreshRequest>,
    ) -> Result<Response<RefreshResponse>, Status> {
        let caller = caller(&request)?;
        let call = start(&request, "Refresh", &caller);
        let result = async {
            let body = request.into_inner();
            let tool = tool("tool", body.tool)?;
            call.tool(&tool);
            let issued = answer(
                "Refresh",
                self.vault
                    .refresh(&call, &caller, &tool, Generation::new(body.if_generation))
                    .await,
            )?;
            let refreshed = issued.refreshed;
            call.generation(issued.generation);
            Ok(Response::new(RefreshResponse {
                token: Some(access_token(issued)),
                refreshed,
            }))
        }
        .await;
        self.end(&call, result).await
    }

    async fn revoke(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let caller = caller(&request)?;
        let call = start(&request, "Revoke", &caller);
        let result = async {
            let body = request.into_inner();
            let (agent, user) = owner(body.agent_id, body.user_id)?;
            let target = RevokeTarget {
                tool: if body.tool.is_empty() {
                    None
                } else {
                    Some(tool("tool", body.tool)?)
                },
                agent,
                user,
            };
            let revoked = answer(
                "Revoke",
                self.vault
                    .revoke(&call, &caller, target, body.at_provider)
                    .await,
            )?;
            Ok(Response::new(RevokeResponse {
                revoked: revoked.revoked,
                provider_revoked: revoked.provider_revoked,
            }))
        }
        .await;
        self.end(&call, result).await
    }

    async fn sweep(
        &self,
        request: Request<SweepRequest>,
    ) -> Result<Response<SweepResponse>, Status> {
        let caller = caller(&request)?;
        let call = start(&request, "Sweep", &caller);
        let result = async {
            let body = request.into_inner();
            let limit = match body.limit {
                0 => self.sweep_batch,
                n => n.min(MAX_SWEEP_LIMIT),
            };
            let outcome = answer(
                "Sweep",
                self.vault.sweep(&caller, limit, body.dry_run).await,
            )?;
            Ok(Response::new(SweepResponse {
                swept: outcome.swept,
                more: outcome.more,
            }))
        }
        .await;
        self.end(&call, result).await
    }

    async fn begin_authorization(
        &self,
        request: Request<BeginAuthorizationRequest>,
    ) -> Result<Response<BeginAuthorizationResponse>, Status> {
        let caller = caller(&request)?;
        let call = start(&request, "BeginAuthorization", &caller);
        let result = async {
            let body = request.into_inner();
            let tool = tool("tool", body.tool)?;
            call.tool(&tool);
            let return_url = (!body.return_url.is_empty()).then_some(body.return_url.as_str());
            let begun = answer(
                "BeginAuthorization",
                self.vault
                    .begin_authorization(&call, &caller, &tool, body.scopes, return_url)
                    .await,
            )?;
            Ok(Response::new(BeginAuthorizationResponse {
                authorization_url: begun.authorization_url.into(),
                authorization_id: begun.authorization_id,
                expires_at: Some(datetime(begun.expires_at)),
            }))
        }
        .await;
        self.end(&call, result).await
    }

    async fn complete_authorization(
        &self,
        request: Request<CompleteAuthorizationRequest>,
    ) -> Result<Response<CompleteAuthorizationResponse>, Status> {
        let caller = caller(&request)?;
        let call = start(&request, "CompleteAuthorization", &caller);
        let result = async {
            let id = authorization_id(request.into_inner().authorization_id)?;
            let completed = answer(
                "CompleteAuthorization",
                self.vault.complete_authorization(&call, &caller, &id).await,
            )?;
            Ok(Response::new(CompleteAuthorizationResponse {
                generation: completed.stored.generation.get(),
                ttl_expires_at: Some(datetime(completed.stored.ttl_expires_at)),
                scopes: completed.scopes,
            }))
        }
        .await;
        self.end(&call, result).await
    }

    async fn get_authorization(
        &self,
        request: Request<GetAuthorizationRequest>,
    ) -> Result<Response<Authorization>, Status> {
        let caller = caller(&request)?;
        let call = start(&request, "GetAuthorization", &caller);
        let result = async {
            let id = authorization_id(request.into_inner().authorization_id)?;
            let view = answer(
                "GetAuthorization",
                self.vault.get_authorization(&call, &caller, &id).await,
            )?;
            let state = match view.state {
                AuthorizationState::Pending => authorization::State::Pending,
                AuthorizationState::CallbackReceived => authorization::State::CallbackReceived,
                AuthorizationState::Completed => authorization::State::Completed,
                AuthorizationState::Denied => authorization::State::Denied,
                AuthorizationState::Expired => authorization::State::Expired,
                AuthorizationState::Failed => authorization::State::Failed,
            };
            Ok(Response::new(Authorization {
                authorization_id: view.authorization_id,
                tool: view.tool.as_str().to_string(),
                state: state.into(),
                expires_at: Some(datetime(view.expires_at)),
                error: view.error.unwrap_or_default(),
            }))
        }
        .await;
        self.end(&call, result).await
    }

    async fn list_credentials(
        &self,
        request: Request<ListCredentialsRequest>,
    ) -> Result<Response<ListCredentialsResponse>, Status> {
        let caller = caller(&request)?;
        let call = start(&request, "ListCredentials", &caller);
        let result = async {
            let body = request.into_inner();
            let (agent, user) = owner(body.agent_id, body.user_id)?;
            let listed = answer(
                "ListCredentials",
                self.vault
                    .list_credentials(&call, &caller, agent, user)
                    .await,
            )?;
            Ok(Response::new(ListCredentialsResponse {
                credentials: listed
                    .into_iter()
                    .map(|c| CredentialInfo {
                        tool: c.tool.as_str().to_string(),
                        state: c.state.to_string(),
                        scopes: c.scopes,
                        access_expires_at: c.access_expires_at.map(datetime),
                        ttl_expires_at: Some(datetime(c.ttl_expires_at)),
                        generation: c.generation.get(),
                        updated_at: Some(datetime(c.updated_at)),
                        has_refresh_token: c.has_refresh_token,
                    })
                    .collect(),
            }))
        }
        .await;
        self.end(&call, result).await
    }

    type WatchCredentialsStream = EventStream;

    async fn watch_credentials(
        &self,
        request: Request<super::proto::WatchCredentialsRequest>,
    ) -> Result<Response<Self::WatchCredentialsStream>, Status> {
        let caller = caller(&request)?;
        let call = start(&request, "WatchCredentials", &caller);
        let result = self
            .watchers
            .watch(&call, caller, request.into_inner())
            .await;
        // Recorded when the stream opens (or is refused): its end may be hours away.
        self.end(&call, result).await
    }

    async fn list_audit_events(
        &self,
        request: Request<ListAuditEventsRequest>,
    ) -> Result<Response<ListAuditEventsResponse>, Status> {
        let caller = caller(&request)?;
        let call = start(&request, "ListAuditEvents", &caller);
        let result = async {
            let body = request.into_inner();
            let (agent, user) = owner(body.agent_id, body.user_id)?;
            let tool = if body.tool.is_empty() {
                None
            } else {
                Some(tool("tool", body.tool)?)
            };
            if body.limit > MAX_AUDIT_PAGE {
                return Err(invalid_argument(
                    "limit",
                    &format!("must be at most {MAX_AUDIT_PAGE}"),
                ));
            }
            let query = AuditQuery {
                agent,
                user,
                tool,
                after: body.after_sequence,
                limit: if body.limit == 0 { 100 } else { body.limit },
            };
            let page = answer(
                "ListAuditEvents",
                self.vault.list_audit_events(&call, &caller, query).await,
            )?;
            Ok(Response::new(ListAuditEventsResponse {
                events: page.records.into_iter().map(audit_event).collect(),
                next_after_sequence: page.next_after,
            }))
        }
        .await;
        self.end(&call, result).await
    }

    async fn rotate_agent_key(
        &self,
        request: Request<RotateAgentKeyRequest>,
    ) -> Result<Response<RotateAgentKeyResponse>, Status> {
        let caller = caller(&request)?;
        let call = start(&request, "RotateAgentKey", &caller);
        let result = async {
            let body = request.into_inner();
            let agent = AgentId::parse(body.agent_id)
                .map_err(|e| invalid_argument("agent_id", &e.to_string()))?;
            let status = answer(
                "RotateAgentKey",
                self.vault
                    .rotate_agent_key(
                        &call,
                        &caller,
                        &agent,
                        body.status_only,
                        (body.from_key_version != 0).then_some(body.from_key_version),
                    )
                    .await,
            )?;
            use rotate_agent_key_response::State;
            let state = if status.error.is_some() && !status.running {
                State::Failed
            } else if status.retiring_version.is_some() {
                State::Rotating
            } else {
                State::Idle
            };
            Ok(Response::new(RotateAgentKeyResponse {
                state: state.into(),
                key_version: status.key_version,
                retiring_version: status.retiring_version.unwrap_or(0),
                remaining: status.remaining,
                resealed: status.resealed,
                error: status.error.unwrap_or_default(),
                running: status.running,
            }))
        }
        .await;
        self.end(&call, result).await
    }
}

/// An audit record as ListAuditEvents shows it.
fn audit_event(stored: crate::audit::Stored) -> AuditEvent {
    let record = stored.record;
    AuditEvent {
        sequence: record.sequence,
        at: chrono::DateTime::from_timestamp_millis(record.at_ms).map(datetime),
        action: record.action,
        agent_id: record.agent.unwrap_or_default(),
        user_id: record.user.unwrap_or_default(),
        tool: record.tool.unwrap_or_default(),
        outcome: record.outcome.as_str().to_string(),
        generation: record.generation.unwrap_or_default(),
        caller_iss: record.caller_iss.unwrap_or_default(),
        caller_jti: record.caller_jti.unwrap_or_default(),
        caller_digest: record.caller_digest.map(hex::encode).unwrap_or_default(),
        verified: record.verified,
        peer: record.peer.unwrap_or_default(),
        trace_id: record.trace_id.unwrap_or_default(),
        target: record.target.unwrap_or_default(),
        hash: hex::encode(stored.hash),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(value: &str) -> tonic::metadata::MetadataMap {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("grpc-timeout", value.parse().unwrap());
        metadata
    }

    #[test]
    fn a_grpc_timeout_becomes_a_deadline_and_a_malformed_one_is_ignored() {
        let now = std::time::Instant::now();
        let in_two_seconds = deadline(&with_timeout("2S")).unwrap();
        assert!(in_two_seconds >= now + std::time::Duration::from_secs(2));
        assert!(in_two_seconds < now + std::time::Duration::from_secs(3));
        let hour = deadline(&with_timeout("1H")).unwrap();
        assert!(hour >= now + std::time::Duration::from_secs(3600));
        assert!(deadline(&with_timeout("0n")).unwrap() <= std::time::Instant::now());
        for bad in ["", "S", "123456789S", "5x", "-5S", "5 S"] {
            let mut metadata = tonic::metadata::MetadataMap::new();
            if let Ok(value) = bad.parse() {
                metadata.insert("grpc-timeout", value);
            }
            assert_eq!(deadline(&metadata), None, "{bad:?}");
        }
        assert_eq!(deadline(&tonic::metadata::MetadataMap::new()), None);
    }
}
