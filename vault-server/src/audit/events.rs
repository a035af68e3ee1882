//! Which audit records are credential events, and of what kind: the one place that maps the
//! log's actions and outcomes to what `WatchCredentials` streams. A record that maps to nothing
//! is skipped by watchers (reads, refusals, admin housekeeping).

use super::{AuditRecord, Outcome};

/// A wake-up key meaning "any chain may have new records": what the PostgreSQL listener
/// publishes after it reconnects, since notifications sent while it was away are lost.
pub const EVERY_CHAIN: &str = "*";

/// What happened to a credential or a consent flow, as the event stream names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A credential was stored (StoreToken).
    Stored,
    /// The vault refreshed the access token.
    Refreshed,
    /// The provider rejected the grant: the user must authorize again.
    ReauthRequired,
    /// Credentials were deleted by Revoke (no tool: every tool of the user).
    Revoked,
    /// A credential's vault TTL passed and the sweeper deleted it.
    Expired,
    /// A consent flow began.
    AuthorizationBegun,
    /// The provider sent the browser back with a code.
    AuthorizationCallback,
    /// The consent flow completed: the credential is stored.
    AuthorizationCompleted,
    /// Consent, or the code, was refused.
    AuthorizationDenied,
    /// The consent flow was not completed in time.
    AuthorizationExpired,
    /// Another agent or user tried to complete the flow, which burned it.
    AuthorizationMismatched,
}

/// The event `record` is, if it is one. Failed calls are not events, except where the failure
/// is the event (a refresh the provider refused, a flow that ended badly).
pub fn event_kind(record: &AuditRecord) -> Option<EventKind> {
    let ok = record.outcome == Outcome::Ok;
    match record.action.as_str() {
        "StoreToken" if ok => Some(EventKind::Stored),
        "refresh" => match &record.outcome {
            Outcome::Ok => Some(EventKind::Refreshed),
            Outcome::Failed(reason) if reason == "REAUTH_REQUIRED" => {
                Some(EventKind::ReauthRequired)
            }
            Outcome::Failed(_) => None,
        },
        "Revoke" if ok => Some(EventKind::Revoked),
        "sweep.expired" if ok => Some(EventKind::Expired),
        "BeginAuthorization" if ok => Some(EventKind::AuthorizationBegun),
        "flow.callback" if ok => Some(EventKind::AuthorizationCallback),
        "CompleteAuthorization" | "flow.completed" if ok => Some(EventKind::AuthorizationCompleted),
        // These record a flow ending badly: whatever outcome they carry, they are the event.
        "flow.denied" => Some(EventKind::AuthorizationDenied),
        "flow.expired" => Some(EventKind::AuthorizationExpired),
        "flow.mismatched" => Some(EventKind::AuthorizationMismatched),
        _ => None,
    }
}

/// The consent flow a record names in its target (`{"authorization_id": "…"}`), if any. A
/// target that is not such an object names no flow.
pub fn authorization_id(record: &AuditRecord) -> Option<String> {
    let target = record.target.as_deref()?;
    let value: serde_json::Value = serde_json::from_str(target).ok()?;
    value.get("authorization_id")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(action: &str, outcome: Outcome) -> AuditRecord {
        AuditRecord {
            action: action.into(),
            outcome,
            ..AuditRecord::default()
        }
    }

    fn failed(reason: &str) -> Outcome {
        Outcome::Failed(reason.into())
    }

    #[test]
    fn successful_writes_and_flow_steps_are_events_and_reads_are_not() {
        for (action, kind) in [
            ("StoreToken", EventKind::Stored),
            ("refresh", EventKind::Refreshed),
            ("Revoke", EventKind::Revoked),
            ("sweep.expired", EventKind::Expired),
            ("BeginAuthorization", EventKind::AuthorizationBegun),
            ("flow.callback", EventKind::AuthorizationCallback),
            ("CompleteAuthorization", EventKind::AuthorizationCompleted),
            ("flow.denied", EventKind::AuthorizationDenied),
            ("flow.expired", EventKind::AuthorizationExpired),
            ("flow.mismatched", EventKind::AuthorizationMismatched),
        ] {
            assert_eq!(
                event_kind(&record(action, Outcome::Ok)),
                Some(kind),
                "{action}"
            );
        }
        for action in ["GetToken", "ListCredentials", "Sweep", "startup", "Refresh"] {
            assert_eq!(event_kind(&record(action, Outcome::Ok)), None, "{action}");
        }
    }

    #[test]
    fn a_failed_call_is_no_event_but_a_refused_refresh_asks_for_reauthorization() {
        for action in [
            "StoreToken",
            "Revoke",
            "BeginAuthorization",
            "CompleteAuthorization",
        ] {
            assert_eq!(
                event_kind(&record(action, failed("PERMISSION_DENIED"))),
                None,
                "{action}"
            );
        }
        assert_eq!(
            event_kind(&record("refresh", failed("REAUTH_REQUIRED"))),
            Some(EventKind::ReauthRequired)
        );
        assert_eq!(
            event_kind(&record("refresh", failed("PROVIDER_UNAVAILABLE"))),
            None
        );
        assert_eq!(
            event_kind(&record("flow.denied", failed("AUTHORIZATION_DENIED"))),
            Some(EventKind::AuthorizationDenied)
        );
    }

    #[test]
    fn the_authorization_id_comes_from_a_json_target_only() {
        let mut flow = record("flow.callback", Outcome::Ok);
        flow.target = Some(r#"{"authorization_id":"abc_123"}"#.into());
        assert_eq!(authorization_id(&flow).as_deref(), Some("abc_123"));
        flow.target = Some(r#"{"agent":"a","user":"u"}"#.into());
        assert_eq!(authorization_id(&flow), None);
        flow.target = Some("agent-b/bob".into());
        assert_eq!(authorization_id(&flow), None);
        flow.target = None;
        assert_eq!(authorization_id(&flow), None);
    }
}
