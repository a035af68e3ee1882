//! The tower layer that authenticates every vault RPC: it verifies the bearer JWT and puts the
//! resulting [`Caller`] into the request extensions, or answers UNAUTHENTICATED itself. Health
//! and reflection pass through untouched.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::body::Body;
use tower::{Layer, Service};

use crate::audit::{AuditRecord, Outcome, Owner, Recorder, now_ms, token_digest};
use crate::auth::{AuthError, Caller, Verifier};
use crate::ids::{AgentId, UserId};

/// The path prefix of the vault's own calls.
pub(super) const PROTECTED_PREFIX: &str = "/vault.v1.CredentialVault/";

/// [`crate::audit::token_digest`] of the caller token a verified call presented, for its
/// audit record.
#[derive(Debug, Clone, Copy)]
pub struct Presented(pub [u8; 32]);

/// Adds caller authentication to a service; refused calls are recorded in the audit log.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    verifier: Arc<Verifier>,
    recorder: Arc<Recorder>,
    agent_claim: Arc<str>,
}

impl AuthLayer {
    /// Authenticates with `verifier`, records refusals with `recorder`, reading a refused
    /// token's claimed agent from `agent_claim`.
    pub fn new(verifier: Arc<Verifier>, recorder: Arc<Recorder>, agent_claim: &str) -> Self {
        Self {
            verifier,
            recorder,
            agent_claim: Arc::from(agent_claim),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            verifier: Arc::clone(&self.verifier),
            recorder: Arc::clone(&self.recorder),
            agent_claim: Arc::clone(&self.agent_claim),
        }
    }
}

/// A service whose vault calls carry a verified [`Caller`].
#[derive(Debug, Clone)]
pub struct Authenticated<S> {
    inner: S,
    verifier: Arc<Verifier>,
    recorder: Arc<Recorder>,
    agent_claim: Arc<str>,
}

fn bearer(request: &Request<Body>) -> Result<&str, AuthError> {
    let value = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?;
    let value = value
        .to_str()
        .map_err(|_| AuthError::Malformed("authorization is not ASCII"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(AuthError::Malformed("expected `Bearer <JWT>`"))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Malformed("expected `Bearer <JWT>`"));
    }
    Ok(token.trim())
}

impl<S> Service<Request<Body>> for Authenticated<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !request.uri().path().starts_with(PROTECTED_PREFIX) {
            return Box::pin(inner.call(request));
        }
        let verifier = Arc::clone(&self.verifier);
        let recorder = Arc::clone(&self.recorder);
        let agent_claim = Arc::clone(&self.agent_claim);
        Box::pin(async move {
            let token = bearer(&request);
            let digest = token.as_ref().ok().map(|token| token_digest(token));
            let verified: Result<Caller, AuthError> = match token {
                Ok(token) => verifier.verify(token).await,
                Err(err) => Err(err),
            };
            match verified {
                Ok(caller) => {
                    if let Some(digest) = digest {
                        request.extensions_mut().insert(Presented(digest));
                    }
                    request.extensions_mut().insert(caller);
                    inner.call(request).await
                }
                Err(err) => {
                    tracing::info!(path = request.uri().path(), reason = %err, "unauthenticated call");
                    let status = tonic::Status::from(err);
                    let record = refused_record(&request, &status, digest, &agent_claim);
                    recorder.count(&record);
                    // The call fails either way; a record that cannot be written is logged.
                    if let Err(err) = recorder.record(Owner::Control, record).await {
                        tracing::error!(error = %crate::telemetry::error_chain(&err), "could not record a refused call in the audit log");
                    }
                    Ok(status.into_http())
                }
            }
        })
    }
}

/// The audit record of a call refused before it reached the service: in the control plane's
/// chain, marked unverified, under the identity the token claims when that can be read safely
/// (a JWT payload that decodes to JSON with a valid `sub` and agent claim; never the token).
fn refused_record(
    request: &Request<Body>,
    status: &tonic::Status,
    digest: Option<[u8; 32]>,
    agent_claim: &str,
) -> AuditRecord {
    let claims = bearer(request).ok().and_then(unverified_claims);
    let claimed = |name: &str| {
        claims
            .as_ref()
            .and_then(|c| c.get(name))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    let action = request
        .uri()
        .path()
        .strip_prefix(PROTECTED_PREFIX)
        .filter(|m| m.len() <= 64 && m.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or("unknown");
    AuditRecord {
        at_ms: now_ms(),
        action: action.into(),
        agent: claimed(agent_claim).filter(|a| AgentId::parse(a.as_str()).is_ok()),
        user: claimed("sub").filter(|u| UserId::parse(u.as_str()).is_ok()),
        outcome: Outcome::Failed(super::status::reason_of(status)),
        caller_iss: claimed("iss").filter(|i| i.len() <= 256 && !i.chars().any(char::is_control)),
        caller_jti: claimed("jti").filter(|j| j.len() <= 256 && !j.chars().any(char::is_control)),
        caller_digest: digest,
        verified: false,
        peer: request
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|info| info.remote_addr())
            .map(|addr| addr.to_string()),
        trace_id: crate::telemetry::current_trace_id(),
        ..AuditRecord::default()
    }
}

/// The payload of a compact JWT, unverified: only for naming who a refused token claimed to be.
fn unverified_claims(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let (_, payload) = (parts.next()?, parts.next()?);
    if payload.len() > 16 * 1024 {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}
