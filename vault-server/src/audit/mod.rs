//! The audit log (issue 15), built from the bottom: what a record holds and how its chain makes
//! tampering evident. Recording every RPC and background event, the stores, `audit verify` and
//! the event stream build on these; [`cli`] holds the `audit verify` and `audit export` commands.

pub mod call;
pub mod chain;
pub mod changes;
pub mod cli;
pub mod events;
pub mod record;
pub mod recorder;

pub use call::{Call, Origin, event, event_without_user, flow_target, now_ms};
pub use chain::{Anchor, Broken, HeadKey, SignedHead, Stored, link, verify};
pub use changes::Changes;
pub use events::{EventKind, authorization_id, event_kind};
pub use record::{AuditRecord, GENERATION_FIELD, Outcome, token_digest};
pub use recorder::{AuditError, Owner, Recorder};
