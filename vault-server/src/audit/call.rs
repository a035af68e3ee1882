//! The audit record of one RPC, filled in as the call proceeds and written once at its end:
//! inside the call's credential write when it makes one (so the write and its record commit or
//! fail together), otherwise through the [`super::Recorder`] when the call ends.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use super::recorder::Owner;
use super::{AuditRecord, Outcome};
use crate::auth::Caller;
use crate::ids::{AgentId, Generation, Tool, UserId};
use crate::store::AgentRecord;

/// Who called, as the audit log names them: never the token itself.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// [`super::token_digest`] of the caller's token, when one was presented.
    pub digest: Option<[u8; 32]>,
    /// The peer address.
    pub peer: Option<String>,
    /// The trace id, when the call is traced.
    pub trace_id: Option<String>,
}

/// One RPC's audit record in the making.
#[derive(Debug)]
pub struct Call {
    record: Mutex<AuditRecord>,
    owner: Mutex<Option<Owner>>,
    written: AtomicBool,
    /// When the caller stops waiting (`grpc-timeout`), if it said.
    deadline: Option<std::time::Instant>,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Call {
    /// The record of `action` made by the verified `caller`.
    pub fn new(action: &'static str, caller: &Caller, origin: Origin) -> Self {
        Self {
            record: Mutex::new(AuditRecord {
                action: action.into(),
                agent: Some(caller.agent.as_str().into()),
                user: Some(caller.user.as_str().into()),
                caller_iss: Some(caller.issuer.as_str().into()),
                caller_jti: caller.jti.clone(),
                caller_digest: origin.digest,
                verified: true,
                peer: origin.peer,
                trace_id: origin.trace_id,
                ..AuditRecord::default()
            }),
            owner: Mutex::new(None),
            written: AtomicBool::new(false),
            deadline: None,
        }
    }

    /// The call's caller stops waiting at `deadline`.
    pub fn with_deadline(mut self, deadline: Option<std::time::Instant>) -> Self {
        self.deadline = deadline;
        self
    }

    /// When the caller stops waiting, if it said.
    pub fn deadline(&self) -> Option<std::time::Instant> {
        self.deadline
    }

    fn edit(&self, change: impl FnOnce(&mut AuditRecord)) {
        change(&mut self.record.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The call concerns `agent`'s credentials: its record goes to that agent's chain (a call
    /// that never reaches a registered agent is recorded in the control plane's chain).
    pub fn on_agent(&self, agent: &AgentRecord) {
        let mut owner = self.owner.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(&*owner, Some(Owner::Agent(a)) if a.namespace == agent.namespace) {
            *owner = Some(Owner::Agent(std::sync::Arc::new(agent.clone())));
        }
    }

    /// The tool acted on.
    pub fn tool(&self, tool: &Tool) {
        self.edit(|r| r.tool = Some(tool.as_str().into()));
    }

    /// The credential generation read or written.
    pub fn generation(&self, generation: Generation) {
        self.edit(|r| r.generation = Some(generation.get()));
    }

    /// An admin acts on another agent's or user's credentials: the record names what was acted
    /// on as its agent and user (so it is in that agent's chain and that user's events), and
    /// `target` says so, with who acted.
    pub fn acting_on(&self, agent: &AgentId, user: Option<&UserId>) {
        self.edit(|r| {
            let mut target = serde_json::Map::new();
            target.insert("agent".into(), agent.as_str().into());
            if let Some(user) = user {
                target.insert("user".into(), user.as_str().into());
            }
            target.insert("by_agent".into(), r.agent.clone().into());
            target.insert("by_user".into(), r.user.clone().into());
            r.target = Some(serde_json::Value::Object(target).to_string());
            r.agent = Some(agent.as_str().into());
            r.user = user.map(|u| u.as_str().into());
        });
    }

    /// The call recorded a release with its read (at `sequence` of the same chain) and then
    /// failed before serving it: the failure's record names that record in its `target`, as
    /// `{"retracts": sequence}`, so nobody reads the release as made.
    pub fn retracts(&self, sequence: u64) {
        self.edit(|r| r.target = Some(serde_json::json!({ "retracts": sequence }).to_string()));
    }

    /// The consent flow acted on.
    pub fn flow(&self, authorization_id: &str) {
        self.edit(|r| r.target = Some(flow_target(authorization_id)));
    }

    /// The record as it stands, stamped now with outcome OK: what a credential write of this
    /// call carries in its transaction. Call [`Self::written`] once that write committed.
    pub fn for_write(&self) -> AuditRecord {
        let mut record = self
            .record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        record.at_ms = now_ms();
        record.outcome = Outcome::Ok;
        record
    }

    /// The record went into a credential write that committed.
    pub fn written(&self) {
        self.written.store(true, Ordering::Release);
    }

    /// What is left to write at the end of the call, if anything: nothing when the call
    /// succeeded and its record was committed with its write.
    pub fn finish(&self, outcome: Outcome) -> Option<(Owner, AuditRecord)> {
        if outcome == Outcome::Ok && self.written.load(Ordering::Acquire) {
            return None;
        }
        let mut record = self
            .record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        record.at_ms = now_ms();
        record.outcome = outcome;
        let owner = self
            .owner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or(Owner::Control);
        Some((owner, record))
    }
}

/// The `target` of a consent flow's records.
pub fn flow_target(authorization_id: &str) -> String {
    serde_json::json!({ "authorization_id": authorization_id }).to_string()
}

/// A background event's record: no caller.
pub fn event(action: &str, agent: &AgentId, user: &UserId, tool: Option<&Tool>) -> AuditRecord {
    AuditRecord {
        at_ms: now_ms(),
        action: action.into(),
        agent: Some(agent.as_str().into()),
        user: Some(user.as_str().into()),
        tool: tool.map(|t| t.as_str().into()),
        verified: true,
        ..AuditRecord::default()
    }
}

/// A background event's record that concerns no user (a key event).
pub fn event_without_user(action: &str) -> AuditRecord {
    AuditRecord {
        at_ms: now_ms(),
        action: action.into(),
        verified: true,
        ..AuditRecord::default()
    }
}
