//! The request size limit, answered by the vault itself: a tower layer reads the 5-byte gRPC
//! message prefix (compression flag, then the big-endian length) before tonic decodes anything,
//! and refuses a message longer than the limit with the vault's own status, naming the limit,
//! with the `REQUEST_TOO_LARGE` reason. Left to tonic, the same request got a bare OUT_OF_RANGE
//! without `ErrorInfo`, which a client cannot tell from any other range error.
//!
//! gRPC requests carry no `content-length` (HTTP/2 streams them), so the prefix is the first
//! place the size is known. The frames read to find it are replayed to tonic unchanged; tonic's
//! own `max_decoding_message_size` stays set as the backstop (a compressed message, say).
//!
//! A message that does not arrive whole with its prefix is held while the rest comes, so those
//! bytes come out of a [`Budget`]: `VAULT_MAX_BUFFERED_REQUEST_BYTES` over all connections, and
//! at most a quarter of it for any one agent (of one issuer). Without it, every connection could
//! hold its streams' worth of unfinished messages (256 × 1 MiB), and connections are not
//! bounded. A message the budget cannot take is answered RESOURCE_EXHAUSTED (`OVERLOADED`, with
//! `RetryInfo`) at once. One agent that trickles large messages cannot take the whole budget;
//! four can, and each of them holds a JWT from a trusted issuer. A message that arrives whole
//! with its prefix (one HTTP/2 DATA frame, 16 KiB by default: every ordinary call) takes
//! nothing from the budget and no lock.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tower::{Layer, Service};

use crate::auth::Caller;
use crate::ids::{AgentId, IssuerId};

/// Whose share a reservation is in: an agent of one issuer.
type Holder = (IssuerId, AgentId);

/// The gRPC message prefix: one flag byte, then the message length as a big-endian `u32`.
const PREFIX_LEN: usize = 5;

/// Bytes of unfinished request messages held at once: in all, and by any one agent.
#[derive(Debug)]
pub struct Budget {
    total: Arc<Semaphore>,
    capacity: usize,
    per_agent: usize,
    agents: Mutex<HashMap<Holder, usize>>,
}

impl Budget {
    /// At most `capacity` bytes, a quarter of them for one agent.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            total: Arc::new(Semaphore::new(capacity.min(Semaphore::MAX_PERMITS))),
            capacity,
            per_agent: capacity / 4,
            agents: Mutex::new(HashMap::new()),
        })
    }

    /// Takes `bytes` for `holder`'s message, if the budget and the holder's share allow.
    fn reserve(self: &Arc<Self>, holder: Option<Holder>, bytes: usize) -> Option<Reserved> {
        let permits = u32::try_from(bytes).ok()?;
        let Some(holder) = holder else {
            let permit = Arc::clone(&self.total)
                .try_acquire_many_owned(permits)
                .ok()?;
            return Some(Reserved {
                budget: Arc::clone(self),
                holder: None,
                bytes,
                _permit: permit,
            });
        };
        // The share is checked first, under the lock, so a reservation refused for the share
        // never holds the total's permits, even for a moment.
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let held = agents.get(&holder).copied().unwrap_or(0);
        if held + bytes > self.per_agent {
            return None;
        }
        let permit = Arc::clone(&self.total)
            .try_acquire_many_owned(permits)
            .ok()?;
        agents.insert(holder.clone(), held + bytes);
        drop(agents);
        Some(Reserved {
            budget: Arc::clone(self),
            holder: Some(holder),
            bytes,
            _permit: permit,
        })
    }
}

/// Bytes taken from the [`Budget`], given back when the call that holds them ends.
#[derive(Debug)]
struct Reserved {
    budget: Arc<Budget>,
    holder: Option<Holder>,
    bytes: usize,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let Some(holder) = &self.holder else { return };
        let mut agents = self.budget.agents.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = agents.get_mut(holder) {
            *held = held.saturating_sub(self.bytes);
            if *held == 0 {
                agents.remove(holder);
            }
        }
    }
}

/// Refuses gRPC messages longer than `limit` bytes, and unfinished ones past the [`Budget`].
#[derive(Debug, Clone)]
pub struct SizeLimitLayer {
    limit: usize,
    budget: Arc<Budget>,
}

impl SizeLimitLayer {
    /// Messages of up to `limit` bytes pass, while `budget` can hold the unfinished ones.
    pub fn new(limit: usize, budget: Arc<Budget>) -> Self {
        Self { limit, budget }
    }
}

impl<S> Layer<S> for SizeLimitLayer {
    type Service = SizeLimited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SizeLimited {
            inner,
            limit: self.limit,
            budget: Arc::clone(&self.budget),
        }
    }
}

/// A service whose requests are at most the limit.
#[derive(Debug, Clone)]
pub struct SizeLimited<S> {
    inner: S,
    limit: usize,
    budget: Arc<Budget>,
}

impl<S> Service<Request<Body>> for SizeLimited<S>
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
        // Only the vault's own calls, which are all unary: a streaming call (reflection, health
        // watch) must not wait here for a first message.
        if !request
            .uri()
            .path()
            .starts_with(super::auth_layer::PROTECTED_PREFIX)
        {
            return Box::pin(inner.call(request));
        }
        let (limit, budget) = (self.limit, Arc::clone(&self.budget));
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let caller = parts.extensions.get::<Caller>();
            let read = match read_prefix(body, limit, &budget, caller).await {
                Ok(read) => read,
                Err(OverBudget(size)) => {
                    // A client's doing, so not above info; debug, as for a shed call.
                    tracing::debug!(
                        path = parts.uri.path(),
                        agent = caller.map(|c| c.agent.as_str()),
                        size,
                        budget = budget.capacity,
                        "unfinished requests at VAULT_MAX_BUFFERED_REQUEST_BYTES; refusing one"
                    );
                    return Ok(super::status::over_budget(
                        budget.capacity,
                        super::shed::RETRY_AFTER,
                    )
                    .into_http());
                }
            };
            if let Some(size) = read.declared
                && size > limit
            {
                tracing::info!(
                    path = parts.uri.path(),
                    size,
                    limit,
                    "request over the size limit"
                );
                return Ok(super::status::request_too_large(limit, size).into_http());
            }
            let response = inner.call(Request::from_parts(parts, read.body)).await;
            // Held until the call is answered: tonic holds the decoded message that long.
            drop(read.reserved);
            response
        })
    }
}

/// The first message, read.
struct Read {
    /// The length its prefix declares (none when the body ended or failed first).
    declared: Option<usize>,
    /// What was read, then the rest.
    body: Body,
    /// Its bytes in the budget, when it did not come whole at once.
    reserved: Option<Reserved>,
}

/// A message of this many bytes would go past the budget.
#[derive(Debug)]
struct OverBudget(usize);

/// Reads `body` until the first message is in hand (its prefix declares its length), or only
/// the prefix when the message is over `limit`. Tonic reports a body that ends or fails first
/// as it always did. Every call of the vault is unary, so tonic would hold the whole message
/// anyway; reading it here means a caller that sends its message slowly waits outside the
/// concurrency limit (see `shed`) instead of holding a place in it, and out of `budget`, in
/// `caller`'s share, instead of without bound.
async fn read_prefix(
    mut body: Body,
    limit: usize,
    budget: &Arc<Budget>,
    caller: Option<&Caller>,
) -> Result<Read, OverBudget> {
    let mut read = VecDeque::new();
    let mut head = BytesMut::new();
    let mut ended = false;
    let mut reserved = None;
    loop {
        // What is needed: the prefix, then the message it declares, unless that is over the
        // limit (then the prefix is all the refusal needs).
        let needed = if head.len() < PREFIX_LEN {
            PREFIX_LEN
        } else {
            let declared = (&head[1..PREFIX_LEN]).get_u32() as usize;
            if declared > limit {
                break;
            }
            PREFIX_LEN + declared
        };
        if head.len() >= needed {
            break;
        }
        // Known to be unfinished: what is still to come is held from now on.
        if needed > PREFIX_LEN && reserved.is_none() {
            reserved = Some(
                budget
                    // Who holds it is copied only here, off the path of ordinary calls.
                    .reserve(caller.map(|c| (c.issuer.clone(), c.agent.clone())), needed)
                    .ok_or(OverBudget(needed))?,
            );
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    head.extend_from_slice(data);
                }
                let trailers = frame.is_trailers();
                read.push_back(Ok(frame));
                if trailers {
                    break;
                }
            }
            Some(Err(status)) => {
                read.push_back(Err(status));
                break;
            }
            None => {
                ended = true;
                break;
            }
        }
    }
    let declared = (head.len() >= PREFIX_LEN).then(|| {
        let mut length = &head[1..PREFIX_LEN];
        length.get_u32() as usize
    });
    let rest = (!ended).then_some(body);
    Ok(Read {
        declared,
        body: Body::new(Replay { read, rest }),
        reserved,
    })
}

/// The frames already read, then the rest of the body.
struct Replay {
    read: VecDeque<Result<Frame<Bytes>, tonic::Status>>,
    rest: Option<Body>,
}

impl HttpBody for Replay {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Some(frame) = self.read.pop_front() {
            return Poll::Ready(Some(frame));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that arrives in the given chunks.
    fn chunked(chunks: &[&[u8]]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, tonic::Status>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
    }

    #[tokio::test]
    async fn a_prefix_split_across_frames_is_read_and_the_body_is_replayed_unchanged() {
        let message: &[&[u8]] = &[&[0, 0], &[0, 1, 2], &[7, 7], &[7]];
        let read = read_prefix(chunked(message), 1024, &roomy(), None)
            .await
            .unwrap();
        assert_eq!(read.declared, Some(258));
        let replayed = read.body.collect().await.unwrap().to_bytes();
        assert_eq!(&replayed[..], &[0, 0, 0, 1, 2, 7, 7, 7]);
    }

    #[tokio::test]
    async fn the_whole_first_message_is_read_before_the_call_goes_on_and_no_more() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, tonic::Status>>(4);
        for chunk in [&[0u8, 0, 0, 0][..], &[2, 9], &[9]] {
            tx.send(Ok(Frame::data(Bytes::copy_from_slice(chunk))))
                .await
                .unwrap();
        }
        // The sender stays open: reading past the message would wait forever.
        let body = Body::new(http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ));
        let read = read_prefix(body, 1024, &roomy(), None).await.unwrap();
        assert_eq!(read.declared, Some(2));
        drop(tx);
        assert_eq!(
            &read.body.collect().await.unwrap().to_bytes()[..],
            &[0, 0, 0, 0, 2, 9, 9]
        );
    }

    #[tokio::test]
    async fn a_body_shorter_than_a_prefix_declares_nothing() {
        let read = read_prefix(chunked(&[&[0, 0]]), 1024, &roomy(), None)
            .await
            .unwrap();
        assert_eq!(read.declared, None);
        assert_eq!(&read.body.collect().await.unwrap().to_bytes()[..], &[0, 0]);
    }

    fn roomy() -> Arc<Budget> {
        Budget::new(1 << 20)
    }

    fn holder(issuer: &str, agent: &str) -> Option<Holder> {
        Some((
            IssuerId::parse(issuer).unwrap(),
            AgentId::parse(agent).unwrap(),
        ))
    }

    #[tokio::test]
    async fn a_message_whole_in_its_first_frame_takes_nothing_from_the_budget() {
        let budget = Budget::new(16);
        let read = read_prefix(
            chunked(&[&[0, 0, 0, 0, 200], &[1; 200]]),
            1024,
            &budget,
            None,
        )
        .await;
        // 205 bytes do not fit a 16-byte budget: an unfinished message is refused...
        assert!(matches!(read, Err(OverBudget(205))));
        // ...and one that came whole is not held at all.
        let mut whole = vec![0, 0, 0, 0, 200];
        whole.extend([1; 200]);
        let read = read_prefix(chunked(&[&whole]), 1024, &budget, None)
            .await
            .unwrap();
        assert!(read.reserved.is_none());
        assert_eq!(read.declared, Some(200));
    }

    #[test]
    fn one_agent_holds_at_most_a_quarter_and_everything_comes_back() {
        let budget = Budget::new(1000);
        let greedy = || holder("https://a.test", "greedy");
        let first = budget.reserve(greedy(), 200).unwrap();
        assert!(budget.reserve(greedy(), 100).is_none(), "past its share");
        // The same agent name from another issuer is another agent, with a share of its own.
        let namesake = budget.reserve(holder("https://b.test", "greedy"), 250);
        assert!(namesake.is_some());
        assert_eq!(
            budget.total.available_permits(),
            550,
            "a refusal holds nothing"
        );
        let others: Vec<_> = ["c", "d"]
            .iter()
            .map(|name| budget.reserve(holder("https://a.test", name), 250).unwrap())
            .collect();
        assert!(budget.reserve(None, 51).is_none(), "past the total");
        let last = budget.reserve(None, 50).unwrap();
        drop((first, namesake, others, last));
        assert_eq!(budget.total.available_permits(), 1000);
        assert!(budget.agents.lock().unwrap().is_empty());
        assert!(budget.reserve(greedy(), 250).is_some());
    }
}
