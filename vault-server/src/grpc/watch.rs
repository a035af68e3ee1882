//! `WatchCredentials`: a stream of credential events read from the agent's audit chain.
//!
//! The chain is the only source of truth. Each stream runs a task that reads the chain a page at
//! a time from its last sequence, sends the records that are events for its caller, and, once
//! caught up, waits for a wake-up from [`Changes`] naming its chain (or every chain) before it
//! reads again. A wake-up lost or doubled only delays an event, never loses or repeats one: the
//! next read starts after the last sequence sent. Between the task and the client sits a bounded
//! channel, so a slow client holds back its own task and nothing else, and no stream holds more
//! than a page and the channel's capacity in memory.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::ERROR_DOMAIN;
use super::proto::credential_event::Kind;
use super::proto::{CredentialEvent, ErrorReason, WatchCredentialsRequest};
use super::status::{invalid_argument, log_failure};
use crate::audit::Call;
use crate::audit::events::EVERY_CHAIN;
use crate::audit::{AuditRecord, Changes, EventKind, Outcome, Stored};
use crate::auth::Caller;
use crate::ids::{AgentId, IssuerId, Tool, UserId};
use crate::store::{AgentRecord, Chain, Store, StoreError, namespace_for};
use crate::vault::VaultError;

/// Most streams one (issuer, agent, user) may hold open on one replica at a time.
pub const MAX_WATCHERS_PER_CALLER: usize = 8;
/// Records read from the chain at a time.
const PAGE: u32 = 64;
/// Events buffered between a stream's task and its client.
const BUFFER: usize = 64;
/// How long a caught-up stream waits without a wake-up before it re-reads anyway: a backstop
/// for a wake-up lost in a way nobody noticed. Wake-ups are the fast path.
const RECHECK: Duration = Duration::from_secs(30);
/// How often a stream for an agent not registered yet looks it up again without a wake-up
/// (an agent from before issuers were part of its identity has a chain key no wake-up names
/// until the stream has found it).
const AGENT_RECHECK: Duration = Duration::from_secs(2);
/// The response metadata carrying the sequence the stream starts after.
pub const WATCH_AFTER_HEADER: &str = "vault-watch-after";

/// The stream of a `WatchCredentials` call.
pub type EventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<CredentialEvent, Status>> + Send>>;

type Owner = (IssuerId, AgentId, UserId);

/// The open watch streams of this replica and what they need.
pub struct Watchers {
    store: Store,
    changes: Changes,
    /// Cancelled when the server drains: every stream ends (UNAVAILABLE, so clients reconnect
    /// to another replica) instead of holding graceful shutdown open.
    stop: CancellationToken,
    /// Open streams per caller.
    open: Mutex<HashMap<Owner, usize>>,
}

impl std::fmt::Debug for Watchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchers").finish_non_exhaustive()
    }
}

/// Which records of the chain a stream sends.
struct Filter {
    agent: AgentId,
    /// `None`: every user (an admin watching an agent).
    user: Option<UserId>,
    /// `None`: every tool. Events without a tool (a Revoke of every tool) concern every tool,
    /// so a stream filtered by tool sends them too.
    tool: Option<Tool>,
}

impl Filter {
    /// The event `record` is for this stream, if it is one.
    fn event(&self, record: &AuditRecord) -> Option<CredentialEvent> {
        if record.agent.as_deref() != Some(self.agent.as_str()) {
            return None;
        }
        if let Some(user) = &self.user
            && record.user.as_deref() != Some(user.as_str())
        {
            return None;
        }
        if let (Some(tool), Some(of_record)) = (&self.tool, record.tool.as_deref())
            && tool.as_str() != of_record
        {
            return None;
        }
        let kind = crate::audit::event_kind(record)?;
        Some(event(record, kind))
    }
}

fn kind(kind: EventKind) -> Kind {
    match kind {
        EventKind::Stored => Kind::Stored,
        EventKind::Refreshed => Kind::Refreshed,
        EventKind::ReauthRequired => Kind::ReauthRequired,
        EventKind::Revoked => Kind::Revoked,
        EventKind::Expired => Kind::Expired,
        EventKind::AuthorizationBegun => Kind::AuthorizationBegun,
        EventKind::AuthorizationCallback => Kind::AuthorizationCallback,
        EventKind::AuthorizationCompleted => Kind::AuthorizationCompleted,
        EventKind::AuthorizationDenied => Kind::AuthorizationDenied,
        EventKind::AuthorizationExpired => Kind::AuthorizationExpired,
        EventKind::AuthorizationMismatched => Kind::AuthorizationMismatched,
    }
}

/// The event a record is, minus what only auditors need (caller, peer, trace).
fn event(record: &AuditRecord, event_kind: EventKind) -> CredentialEvent {
    CredentialEvent {
        sequence: record.sequence,
        at: Some(prost_types::Timestamp {
            seconds: record.at_ms.div_euclid(1000),
            // Below 1000 ms, so below 10^9 ns: fits.
            nanos: (record.at_ms.rem_euclid(1000) * 1_000_000) as i32,
        }),
        kind: kind(event_kind).into(),
        agent_id: record.agent.clone().unwrap_or_default(),
        user_id: record.user.clone().unwrap_or_default(),
        tool: record.tool.clone().unwrap_or_default(),
        generation: record.generation.unwrap_or_default(),
        authorization_id: crate::audit::authorization_id(record).unwrap_or_default(),
        reason: match &record.outcome {
            Outcome::Ok => String::new(),
            Outcome::Failed(reason) => reason.clone(),
        },
    }
}

fn too_many_watchers() -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        format!(
            "this caller already has {MAX_WATCHERS_PER_CALLER} WatchCredentials streams open; close one first"
        ),
        ErrorDetails::with_error_info(
            ErrorReason::TooManyWatchers.as_str_name(),
            ERROR_DOMAIN,
            HashMap::new(),
        ),
    )
}

fn shutting_down() -> Status {
    Status::unavailable("the vault is shutting down; reconnect and resume after the last event")
}

/// A storage failure as the stream's status, logged with its cause.
fn storage_failure(err: StoreError) -> Status {
    let err = VaultError::from(err);
    log_failure("WatchCredentials", &err);
    Status::from(err)
}

/// One open stream of a caller; the count goes down when the stream's task ends, which is
/// when the client went away, the server drains, or storage failed.
struct Slot {
    watchers: Arc<Watchers>,
    owner: Owner,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .watchers
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.owner) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.owner);
            }
        }
    }
}

impl Watchers {
    /// Streams `store`'s chains, woken by `changes`, until `stop` is cancelled.
    pub fn new(store: Store, changes: Changes, stop: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            store,
            changes,
            stop,
            open: Mutex::new(HashMap::new()),
        })
    }

    fn take_slot(self: &Arc<Self>, owner: Owner) -> Result<Slot, Status> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = open.entry(owner.clone()).or_default();
        if *count >= MAX_WATCHERS_PER_CALLER {
            return Err(too_many_watchers());
        }
        *count += 1;
        Ok(Slot {
            watchers: Arc::clone(self),
            owner,
        })
    }

    /// Serves one `WatchCredentials` call for `caller`.
    pub async fn watch(
        self: &Arc<Self>,
        call: &Call,
        caller: Caller,
        body: WatchCredentialsRequest,
    ) -> Result<Response<EventStream>, Status> {
        let tool = (!body.tool.is_empty())
            .then(|| Tool::parse(body.tool).map_err(|err| invalid_argument("tool", err.0)))
            .transpose()?;
        if let Some(tool) = &tool {
            call.tool(tool);
        }
        let filter = if body.agent_id.is_empty() {
            Filter {
                agent: caller.agent.clone(),
                user: Some(caller.user.clone()),
                tool,
            }
        } else {
            let agent =
                AgentId::parse(body.agent_id).map_err(|err| invalid_argument("agent_id", err.0))?;
            if !caller.admin {
                let err = VaultError::PermissionDenied(
                    "agent_id is for admins: watch your own events without it".into(),
                );
                log_failure("WatchCredentials", &err);
                return Err(err.into());
            }
            call.acting_on(&agent, None);
            Filter {
                agent,
                user: None,
                tool,
            }
        };
        let slot = self.take_slot((
            caller.issuer.clone(),
            caller.agent.clone(),
            caller.user.clone(),
        ))?;
        // Subscribed before the first read, so no append that commits after the read started
        // can go unheard.
        let wakeups = self.changes.subscribe();
        let agent = self
            .store
            .keys
            .agent(&caller.issuer, &filter.agent)
            .await
            .map_err(storage_failure)?;
        if let Some(record) = &agent {
            call.on_agent(record);
        }
        let after = match (body.after_sequence, &agent) {
            (Some(after), _) => after,
            (None, Some(record)) => {
                self.store
                    .audit
                    .head(Chain::Agent(record))
                    .await
                    .map_err(storage_failure)?
                    .sequence
            }
            // No chain yet: every event of the agent is in the future.
            (None, None) => 0,
        };
        let (sender, receiver) = mpsc::channel(BUFFER);
        let task = Task {
            watchers: Arc::clone(self),
            issuer: caller.issuer,
            agent,
            filter,
            after,
            sender,
            wakeups,
            _slot: slot,
        };
        tokio::spawn(task.run());
        let stream: EventStream = Box::pin(ReceiverStream::new(receiver));
        let mut response = Response::new(stream);
        response.metadata_mut().insert(
            WATCH_AFTER_HEADER,
            after
                .to_string()
                .parse()
                .expect("a decimal number is a valid metadata value"),
        );
        Ok(response)
    }
}

/// The reading side of one stream.
struct Task {
    watchers: Arc<Watchers>,
    issuer: IssuerId,
    /// The watched agent's registry entry, once it has one.
    agent: Option<AgentRecord>,
    filter: Filter,
    /// The last sequence read (sent or skipped).
    after: u64,
    sender: mpsc::Sender<Result<CredentialEvent, Status>>,
    wakeups: broadcast::Receiver<Arc<str>>,
    _slot: Slot,
}

/// Why a stream's task stops.
enum End {
    /// The client went away.
    Gone,
    /// The stream ends with this status.
    Status(Status),
}

impl Task {
    async fn run(mut self) {
        let end = loop {
            if let Err(end) = self.catch_up().await {
                break end;
            }
            if let Err(end) = self.wait().await {
                break end;
            }
        };
        if let End::Status(status) = end {
            // Best effort: a full buffer means a client that is not reading; the stream ends
            // either way when the sender is dropped.
            let _ = self.sender.try_send(Err(status));
        }
    }

    /// The key of the watched chain: the registered namespace, or the one the agent will get.
    fn chain_key(&self) -> String {
        match &self.agent {
            Some(record) => record.namespace.clone(),
            None => namespace_for(&self.issuer, &self.filter.agent),
        }
    }

    /// Sends every event after `after`, a page at a time.
    async fn catch_up(&mut self) -> Result<(), End> {
        if self.agent.is_none() {
            self.agent = self
                .watchers
                .store
                .keys
                .agent(&self.issuer, &self.filter.agent)
                .await
                .map_err(|err| End::Status(storage_failure(err)))?;
        }
        let Some(agent) = &self.agent else {
            return Ok(());
        };
        loop {
            let page = self
                .watchers
                .store
                .audit
                .records(Chain::Agent(agent), self.after, PAGE)
                .await
                .map_err(|err| End::Status(storage_failure(err)))?;
            let full = page.len() == PAGE as usize;
            for Stored { record, .. } in page {
                self.after = record.sequence;
                let Some(event) = self.filter.event(&record) else {
                    continue;
                };
                tokio::select! {
                    sent = self.sender.send(Ok(event)) => sent.map_err(|_| End::Gone)?,
                    () = self.watchers.stop.cancelled() => return Err(End::Status(shutting_down())),
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Waits until the chain may have grown: a wake-up for it or for every chain, missed
    /// wake-ups, or the backstop timer.
    async fn wait(&mut self) -> Result<(), End> {
        let key = self.chain_key();
        let deadline = Instant::now()
            + if self.agent.is_some() {
                RECHECK
            } else {
                AGENT_RECHECK
            };
        loop {
            tokio::select! {
                () = self.sender.closed() => return Err(End::Gone),
                () = self.watchers.stop.cancelled() => return Err(End::Status(shutting_down())),
                () = tokio::time::sleep_until(deadline) => return Ok(()),
                woken = self.wakeups.recv() => match woken {
                    Ok(chain) if *chain == *key || &*chain == EVERY_CHAIN => return Ok(()),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return Ok(()),
                    // The service holds the sender for as long as it serves.
                    Err(broadcast::error::RecvError::Closed) => return Err(End::Status(shutting_down())),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(agent: &str, user: &str, tool: Option<&str>) -> AuditRecord {
        AuditRecord {
            sequence: 7,
            at_ms: 1_764_000_000_123,
            action: "StoreToken".into(),
            agent: Some(agent.into()),
            user: Some(user.into()),
            tool: tool.map(Into::into),
            generation: Some(3),
            ..AuditRecord::default()
        }
    }

    fn filter(user: Option<&str>, tool: Option<&str>) -> Filter {
        Filter {
            agent: AgentId::parse("agent-a").unwrap(),
            user: user.map(|u| UserId::parse(u).unwrap()),
            tool: tool.map(|t| Tool::parse(t).unwrap()),
        }
    }

    #[test]
    fn a_stream_sends_its_users_events_of_its_tool_and_those_of_every_tool() {
        let own = filter(Some("alice"), Some("jira"));
        let sent = own
            .event(&record("agent-a", "alice", Some("jira")))
            .unwrap();
        assert_eq!(sent.kind, Kind::Stored as i32);
        assert_eq!((sent.sequence, sent.generation), (7, 3));
        let at = sent.at.unwrap();
        assert_eq!((at.seconds, at.nanos), (1_764_000_000, 123_000_000));
        assert!(own.event(&record("agent-a", "alice", None)).is_some());
        assert!(
            own.event(&record("agent-a", "alice", Some("github")))
                .is_none()
        );
        assert!(own.event(&record("agent-a", "bob", Some("jira"))).is_none());
        assert!(
            own.event(&record("agent-b", "alice", Some("jira")))
                .is_none()
        );
        let admin = filter(None, None);
        assert!(
            admin
                .event(&record("agent-a", "bob", Some("github")))
                .is_some()
        );
    }
}
