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

use crate::auth::{AuthError, Caller, Verifier};

/// The path prefix of the vault's own calls.
pub(super) const PROTECTED_PREFIX: &str = "/vault.v1.CredentialVault/";

/// Adds caller authentication to a service.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    verifier: Arc<Verifier>,
}

impl AuthLayer {
    /// Authenticates with `verifier`.
    pub fn new(verifier: Arc<Verifier>) -> Self {
        Self { verifier }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            verifier: Arc::clone(&self.verifier),
        }
    }
}

/// A service whose vault calls carry a verified [`Caller`].
#[derive(Debug, Clone)]
pub struct Authenticated<S> {
    inner: S,
    verifier: Arc<Verifier>,
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
        Box::pin(async move {
            let verified: Result<Caller, AuthError> = match bearer(&request) {
                Ok(token) => verifier.verify(token).await,
                Err(err) => Err(err),
            };
            match verified {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                    inner.call(request).await
                }
                Err(err) => {
                    tracing::info!(path = request.uri().path(), reason = %err, "unauthenticated call");
                    Ok(tonic::Status::from(err).into_http())
                }
            }
        })
    }
}
