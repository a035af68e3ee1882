//! Credential events: [`Client::watch`] streams them, and resumes by itself across lost
//! connections and vault restarts, so the caller sees every event once, in order.
//!
//! Each event carries its sequence in the agent's audit chain. The stream remembers the last
//! one it handed over (or, before the first, the point the vault said the watch started
//! after) and reconnects with `after_sequence` set to it: the vault re-reads its log from
//! there, so nothing is lost or repeated however long the outage.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::codec::Streaming;

use crate::{Client, Error, ErrorReason, proto, request};

/// The kind of a [`CredentialEvent`].
pub use vault_proto::credential_event::Kind as EventKind;

/// The response metadata in which the vault says which sequence a watch starts after.
pub const WATCH_AFTER_HEADER: &str = "vault-watch-after";

/// Events buffered between the connection and the caller.
const BUFFER: usize = 64;
/// Backoff ceiling before the first reconnect, doubled per failed attempt up to the largest.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What to watch: by default, every event of the caller's own credentials from now on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchRequest {
    /// Only this tool's events (and those of every tool, such as a Revoke of all of them).
    pub tool: Option<String>,
    /// Start after this sequence, the last event seen before; `None` starts from now.
    pub after_sequence: Option<u64>,
    /// Admin: every user's events of this agent, instead of the caller's own.
    pub agent_id: Option<String>,
}

/// One credential event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialEvent {
    /// Its place in the agent's audit chain: resume after it.
    pub sequence: u64,
    /// When it happened.
    pub at: SystemTime,
    /// What happened.
    pub kind: EventKind,
    /// The agent whose credential it concerns.
    pub agent_id: String,
    /// The user.
    pub user_id: String,
    /// The tool; `None` when the event concerned every tool of the user.
    pub tool: Option<String>,
    /// The credential generation written, when there is one.
    pub generation: Option<u64>,
    /// The consent flow, for the `Authorization*` kinds.
    pub authorization_id: Option<String>,
    /// Why, for [`EventKind::ReauthRequired`] and the flows' failures.
    pub reason: Option<ErrorReason>,
}

fn event_from(event: proto::CredentialEvent) -> CredentialEvent {
    let at = event.at.map_or(SystemTime::UNIX_EPOCH, |at| {
        SystemTime::try_from(at).unwrap_or(SystemTime::UNIX_EPOCH)
    });
    let some = |value: String| (!value.is_empty()).then_some(value);
    CredentialEvent {
        sequence: event.sequence,
        at,
        kind: EventKind::try_from(event.kind).unwrap_or(EventKind::Unspecified),
        agent_id: event.agent_id,
        user_id: event.user_id,
        tool: some(event.tool),
        generation: (event.generation > 0).then_some(event.generation),
        authorization_id: some(event.authorization_id),
        reason: some(event.reason)
            .map(|name| ErrorReason::from_str_name(&name).unwrap_or(ErrorReason::Unspecified)),
    }
}

/// A stream of [`CredentialEvent`]s that reconnects by itself. It ends only with an error the
/// caller must act on (the token was refused, the caller may not watch this), after handing it
/// over. Dropping it closes the watch.
#[derive(Debug)]
pub struct Watch {
    receiver: mpsc::Receiver<Result<CredentialEvent, Error>>,
    started_after: u64,
    task: JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watch {
    /// The next event; `None` once the stream has ended (after a final error).
    pub async fn next(&mut self) -> Option<Result<CredentialEvent, Error>> {
        self.receiver.recv().await
    }

    /// The sequence this watch started after (the vault's chain head when it was opened
    /// without `after_sequence`).
    pub fn started_after(&self) -> u64 {
        self.started_after
    }
}

impl tokio_stream::Stream for Watch {
    type Item = Result<CredentialEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.receiver.poll_recv(cx)
    }
}

/// Whether a failed watch is worth opening again: the connection or the vault went away, or
/// the vault has not yet noticed that the watch being replaced is gone.
fn resumable(error: &Error) -> bool {
    match error {
        Error::Unavailable { .. } | Error::Transport(_) | Error::DeadlineExceeded(_) => true,
        Error::ResourceExhausted { reason, .. } => *reason == ErrorReason::TooManyWatchers,
        // A connection reset mid-stream arrives as the status HTTP/2 made of it.
        Error::Other(status) => matches!(
            status.code(),
            Code::Unknown | Code::Cancelled | Code::Internal | Code::Aborted
        ),
        _ => false,
    }
}

impl Client {
    /// Watches credential events (see [`WatchRequest`]). The first connection is made before
    /// this returns, so a refusal (no permission, too many watches, a bad tool) is this call's
    /// error; later connection losses are handled inside the stream.
    pub async fn watch(&self, what: WatchRequest) -> Result<Watch, Error> {
        let (stream, started_after) = self.open_watch(&what, what.after_sequence).await?;
        let (sender, receiver) = mpsc::channel(BUFFER);
        let task = tokio::spawn(follow(self.clone(), what, stream, started_after, sender));
        Ok(Watch {
            receiver,
            started_after,
            task,
        })
    }

    /// One `WatchCredentials` call: its stream, and the sequence it starts after.
    async fn open_watch(
        &self,
        what: &WatchRequest,
        after: Option<u64>,
    ) -> Result<(Streaming<proto::CredentialEvent>, u64), Error> {
        let header = self.authorize().await?;
        let body = proto::WatchCredentialsRequest {
            tool: what.tool.clone().unwrap_or_default(),
            after_sequence: after,
            agent_id: what.agent_id.clone().unwrap_or_default(),
        };
        let response = self
            .raw()
            .watch_credentials(request(body, &header))
            .await
            .map_err(Error::from)?;
        let started_after = match after {
            Some(after) => after,
            None => response
                .metadata()
                .get(WATCH_AFTER_HEADER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse().ok())
                .ok_or_else(|| Error::malformed("WatchCredentials without vault-watch-after"))?,
        };
        Ok((response.into_inner(), started_after))
    }
}

/// Hands events to `sender` and reopens the watch after the last one whenever it breaks, until
/// the receiver is dropped or an error needs the caller.
async fn follow(
    client: Client,
    what: WatchRequest,
    mut stream: Streaming<proto::CredentialEvent>,
    mut last: u64,
    sender: mpsc::Sender<Result<CredentialEvent, Error>>,
) {
    loop {
        // Read until the stream breaks or the vault ends it (it does when it shuts down).
        loop {
            match stream.message().await {
                Ok(Some(event)) => {
                    last = event.sequence;
                    if sender.send(Ok(event_from(event))).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    let error = Error::from(status);
                    if !resumable(&error) {
                        let _ = sender.send(Err(error)).await;
                        return;
                    }
                    break;
                }
            }
        }
        let mut ceiling = INITIAL_BACKOFF;
        stream = loop {
            // Full jitter, so the watchers of a vault that restarted do not all return at once.
            tokio::time::sleep(ceiling.mul_f64(fastrand::f64())).await;
            if sender.is_closed() {
                return;
            }
            match client.open_watch(&what, Some(last)).await {
                Ok((stream, _)) => break stream,
                Err(error) if resumable(&error) => ceiling = (ceiling * 2).min(MAX_BACKOFF),
                Err(error) => {
                    let _ = sender.send(Err(error)).await;
                    return;
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_fields_of_an_event_are_absent() {
        let event = event_from(proto::CredentialEvent {
            sequence: 4,
            at: Some(prost_types::Timestamp {
                seconds: 10,
                nanos: 0,
            }),
            kind: EventKind::Revoked as i32,
            agent_id: "a".into(),
            user_id: "u".into(),
            ..proto::CredentialEvent::default()
        });
        assert_eq!(event.kind, EventKind::Revoked);
        assert_eq!(event.at, SystemTime::UNIX_EPOCH + Duration::from_secs(10));
        assert_eq!(
            (
                event.tool,
                event.generation,
                event.authorization_id,
                event.reason
            ),
            (None, None, None, None)
        );
    }

    #[test]
    fn a_lost_connection_resumes_and_a_refusal_does_not() {
        assert!(resumable(&Error::Unavailable {
            reason: ErrorReason::Unspecified,
            message: String::new()
        }));
        assert!(resumable(&Error::Other(tonic::Status::unknown("reset"))));
        assert!(resumable(&Error::ResourceExhausted {
            reason: ErrorReason::TooManyWatchers,
            message: String::new(),
            retry_after: None,
        }));
        assert!(!resumable(&Error::PermissionDenied {
            reason: ErrorReason::PermissionDenied,
            message: String::new()
        }));
        assert!(!resumable(&Error::Unauthenticated(String::new())));
    }
}
