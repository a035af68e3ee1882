//! Load shedding: at most `VAULT_MAX_CONCURRENT_CALLS` calls are served at once by this replica,
//! over all its connections, and the next one is answered at once with RESOURCE_EXHAUSTED
//! (reason `OVERLOADED`, `RetryInfo` of [`RETRY_AFTER`]) instead of waiting in a queue that only
//! grows: under overload a queue turns every call slow, where shedding keeps the admitted calls
//! fast and tells the rest to go elsewhere (another replica, through the client's retry).
//!
//! It sits inside the auth and size layers: a call takes a place only once its caller is verified
//! and its request message has arrived whole, so callers that trickle their requests (or never
//! finish them) hold no place, and an unauthenticated flood is refused before it could take one.
//! Verification of a token seen before is a cache lookup, so shedding stays cheap. A permit is
//! held until the call's response is ready (a watch stream's permit ends when the stream opens). Health checks are never shed: a replica at capacity is busy, not
//! unhealthy, and a probe that failed for it would restart the replica that was serving.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tokio::sync::Semaphore;
use tonic::body::Body;
use tower::{Layer, Service};

/// What a shed call is told to wait before retrying.
pub const RETRY_AFTER: Duration = Duration::from_millis(100);

/// The health service's path prefix: never shed.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// Sheds calls past a global concurrency limit.
#[derive(Debug, Clone)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl ShedLayer {
    /// At most `limit` calls at once.
    pub fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            permits: Arc::clone(&self.permits),
            limit: self.limit,
        }
    }
}

/// A service that sheds calls past the limit.
#[derive(Debug, Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
    limit: usize,
}

impl<S> Service<Request<Body>> for Shed<S>
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

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if request.uri().path().starts_with(HEALTH_PREFIX) {
            return Box::pin(inner.call(request));
        }
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            tracing::debug!(
                path = request.uri().path(),
                limit = self.limit,
                "at VAULT_MAX_CONCURRENT_CALLS; shedding a call"
            );
            let status = super::status::overloaded(self.limit, RETRY_AFTER);
            return Box::pin(async move { Ok(status.into_http()) });
        };
        Box::pin(async move {
            let response = inner.call(request).await;
            drop(permit);
            response
        })
    }
}
