//! The request size limit, answered by the vault itself: a tower layer reads the 5-byte gRPC
//! message prefix (compression flag, then the big-endian length) before tonic decodes anything,
//! and refuses a message longer than the limit with the vault's own status, naming the limit,
//! with the `REQUEST_TOO_LARGE` reason. Left to tonic, the same request got a bare OUT_OF_RANGE
//! without `ErrorInfo`, which a client cannot tell from any other range error.
//!
//! gRPC requests carry no `content-length` (HTTP/2 streams them), so the prefix is the first
//! place the size is known. The frames read to find it are replayed to tonic unchanged; tonic's
//! own `max_decoding_message_size` stays set as the backstop (a compressed message, say).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tonic::body::Body;
use tower::{Layer, Service};

/// The gRPC message prefix: one flag byte, then the message length as a big-endian `u32`.
const PREFIX_LEN: usize = 5;

/// Refuses gRPC messages longer than `limit` bytes.
#[derive(Debug, Clone, Copy)]
pub struct SizeLimitLayer {
    limit: usize,
}

impl SizeLimitLayer {
    /// Messages of up to `limit` bytes pass.
    pub fn new(limit: usize) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for SizeLimitLayer {
    type Service = SizeLimited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SizeLimited {
            inner,
            limit: self.limit,
        }
    }
}

/// A service whose requests are at most the limit.
#[derive(Debug, Clone)]
pub struct SizeLimited<S> {
    inner: S,
    limit: usize,
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
        let limit = self.limit;
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let (declared, body) = read_prefix(body, limit).await;
            if let Some(size) = declared
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
            inner.call(Request::from_parts(parts, body)).await
        })
    }
}

/// Reads `body` until the first message is in hand (its prefix declares its length), or only
/// the prefix when the message is over `limit`; returns the declared length (none when the
/// body ends or fails first: tonic reports that as it always did) and a body that replays what
/// was read, then the rest. Every call of the vault is unary, so tonic would hold the whole
/// message anyway; reading it here means a caller that sends its message slowly waits outside
/// the concurrency limit (see `shed`) instead of holding a place in it.
async fn read_prefix(mut body: Body, limit: usize) -> (Option<usize>, Body) {
    let mut read = VecDeque::new();
    let mut head = BytesMut::new();
    let mut ended = false;
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
    (declared, Body::new(Replay { read, rest }))
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
        let (declared, body) = read_prefix(chunked(message), 1024).await;
        assert_eq!(declared, Some(258));
        let replayed = body.collect().await.unwrap().to_bytes();
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
        let (declared, body) = read_prefix(body, 1024).await;
        assert_eq!(declared, Some(2));
        drop(tx);
        assert_eq!(
            &body.collect().await.unwrap().to_bytes()[..],
            &[0, 0, 0, 0, 2, 9, 9]
        );
    }

    #[tokio::test]
    async fn a_body_shorter_than_a_prefix_declares_nothing() {
        let (declared, body) = read_prefix(chunked(&[&[0, 0]]), 1024).await;
        assert_eq!(declared, None);
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], &[0, 0]);
    }
}
