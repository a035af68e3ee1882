//! One exhaustive mapping from use-case errors to gRPC status codes with a machine-readable
//! `google.rpc.ErrorInfo` reason, and logging by status class.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::ERROR_DOMAIN;
use super::proto::ErrorReason;
use crate::auth::AuthError;
use crate::vault::VaultError;

fn with_reason(code: Code, reason: ErrorReason, message: impl Into<String>) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason.as_str_name(), ERROR_DOMAIN, HashMap::new()),
    )
}

/// INVALID_ARGUMENT naming the field, with a `BadRequest` field violation.
pub fn invalid_argument(field: &str, problem: &str) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(
        ErrorReason::InvalidArgument.as_str_name(),
        ERROR_DOMAIN,
        HashMap::from([("field".to_string(), field.to_string())]),
    );
    details.add_bad_request_violation(field, problem);
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {problem}"),
        details,
    )
}

/// A request message over the size limit. RESOURCE_EXHAUSTED rather than tonic's OUT_OF_RANGE:
/// the gRPC status-code guide names RESOURCE_EXHAUSTED for a message larger than the configured
/// maximum (gRPC's own implementations send it), while OUT_OF_RANGE means a value past the end
/// of a range the caller iterates, which a client would read as a bad field.
pub fn request_too_large(limit: usize, size: usize) -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        format!(
            "the request message is {size} bytes; the vault accepts at most {limit} bytes ({} KiB)",
            limit / 1024
        ),
        ErrorDetails::with_error_info(
            ErrorReason::RequestTooLarge.as_str_name(),
            ERROR_DOMAIN,
            HashMap::from([
                ("limit_bytes".to_string(), limit.to_string()),
                ("size_bytes".to_string(), size.to_string()),
            ]),
        ),
    )
}

/// A call shed at the concurrency limit: RESOURCE_EXHAUSTED, reason `OVERLOADED`, and a short
/// `RetryInfo` (another replica, or this one a moment later, will serve it).
pub fn overloaded(limit: usize, retry_after: std::time::Duration) -> Status {
    overloaded_at(
        ("limit", limit),
        format!("the vault is serving as many calls as it may at once ({limit}); retry shortly"),
        retry_after,
    )
}

/// A request refused because the unfinished requests held at once are at
/// `VAULT_MAX_BUFFERED_REQUEST_BYTES` (or the calling agent's share of it): RESOURCE_EXHAUSTED,
/// reason `OVERLOADED`, with a short `RetryInfo`.
pub fn over_budget(capacity: usize, retry_after: std::time::Duration) -> Status {
    overloaded_at(
        ("buffered_request_bytes", capacity),
        "the vault is holding as many unfinished requests as it may (VAULT_MAX_BUFFERED_REQUEST_BYTES, a quarter of it per agent); retry shortly".to_owned(),
        retry_after,
    )
}

/// RESOURCE_EXHAUSTED, reason `OVERLOADED`, naming the bound that was reached in its metadata.
fn overloaded_at(
    (bound, value): (&str, usize),
    message: String,
    retry_after: std::time::Duration,
) -> Status {
    let mut details = ErrorDetails::with_error_info(
        ErrorReason::Overloaded.as_str_name(),
        ERROR_DOMAIN,
        HashMap::from([(bound.to_string(), value.to_string())]),
    );
    details.set_retry_info(Some(retry_after));
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

impl From<AuthError> for Status {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Missing
            | AuthError::Malformed(_)
            | AuthError::Refused(_)
            | AuthError::WrongAudience { .. }
            | AuthError::UntrustedIssuer { .. }
            | AuthError::AgentClaim { .. } => with_reason(
                Code::Unauthenticated,
                ErrorReason::Unauthenticated,
                err.to_string(),
            ),
            AuthError::KeysUnavailable => with_reason(
                Code::Unavailable,
                ErrorReason::IssuerKeysUnavailable,
                "the issuer's keys could not be loaded to check this token; retry later",
            ),
        }
    }
}

impl From<VaultError> for Status {
    fn from(err: VaultError) -> Self {
        // Exhaustive on purpose: a new variant must decide its status here.
        match err {
            VaultError::NotFound => with_reason(
                Code::NotFound,
                ErrorReason::CredentialNotFound,
                "no credential is stored for this tool; start a consent flow",
            ),
            VaultError::ReauthRequired(message) => with_reason(
                Code::FailedPrecondition,
                ErrorReason::ReauthRequired,
                message,
            ),
            VaultError::ProviderUnavailable(message) => {
                with_reason(Code::Unavailable, ErrorReason::ProviderUnavailable, message)
            }
            VaultError::PermissionDenied(message) => with_reason(
                Code::PermissionDenied,
                ErrorReason::PermissionDenied,
                message,
            ),
            VaultError::RefreshTokenDenied => with_reason(
                Code::PermissionDenied,
                ErrorReason::StoreRefreshTokenDenied,
                err.to_string(),
            ),
            VaultError::InvalidArgument { field, problem } => invalid_argument(field, &problem),
            VaultError::RateLimited {
                message,
                retry_after,
            } => {
                let mut details = ErrorDetails::with_error_info(
                    ErrorReason::AgentCreationRateLimited.as_str_name(),
                    ERROR_DOMAIN,
                    HashMap::new(),
                );
                details.set_retry_info(Some(retry_after));
                Status::with_error_details(Code::ResourceExhausted, message, details)
            }
            VaultError::CallerRateLimited {
                bucket,
                retry_after,
            } => {
                let mut details = ErrorDetails::with_error_info(
                    ErrorReason::RateLimited.as_str_name(),
                    ERROR_DOMAIN,
                    HashMap::from([("bucket".to_string(), bucket.to_string())]),
                );
                details.set_retry_info(Some(retry_after));
                Status::with_error_details(Code::ResourceExhausted, err.to_string(), details)
            }
            VaultError::PolicyDenied { rule, message } => Status::with_error_details(
                Code::PermissionDenied,
                message,
                ErrorDetails::with_error_info(
                    ErrorReason::PolicyDenied.as_str_name(),
                    ERROR_DOMAIN,
                    HashMap::from([("rule".to_string(), rule)]),
                ),
            ),
            VaultError::DeadlineExceeded(_) => with_reason(
                Code::DeadlineExceeded,
                ErrorReason::DeadlineExceeded,
                err.to_string(),
            ),
            VaultError::AuthorizationNotFound => with_reason(
                Code::NotFound,
                ErrorReason::AuthorizationNotFound,
                err.to_string(),
            ),
            VaultError::AuthorizationExpired(message) => with_reason(
                Code::FailedPrecondition,
                ErrorReason::AuthorizationExpired,
                message,
            ),
            VaultError::AuthorizationDenied(message) => with_reason(
                Code::FailedPrecondition,
                ErrorReason::AuthorizationDenied,
                message,
            ),
            VaultError::AuthorizationMismatch => with_reason(
                Code::PermissionDenied,
                ErrorReason::AuthorizationMismatch,
                err.to_string(),
            ),
            VaultError::AuthorizationPending => with_reason(
                Code::FailedPrecondition,
                ErrorReason::AuthorizationPending,
                err.to_string(),
            ),
            VaultError::AgentNotFound => {
                with_reason(Code::NotFound, ErrorReason::AgentNotFound, err.to_string())
            }
            VaultError::KeyRotationRefused(message) => with_reason(
                Code::FailedPrecondition,
                ErrorReason::KeyRotationRefused,
                message,
            ),
            VaultError::Unavailable(_) => with_reason(
                Code::Unavailable,
                ErrorReason::StoreUnavailable,
                "storage is temporarily unavailable; retry",
            ),
            VaultError::KeyUnavailable(message) => {
                with_reason(Code::Unavailable, ErrorReason::KeyUnavailable, message)
            }
            VaultError::AuditUnavailable(_) => audit_unavailable(),
            VaultError::Unexpected(_) => {
                with_reason(Code::Internal, ErrorReason::Internal, "internal error")
            }
        }
    }
}

/// UNAVAILABLE with reason `AUDIT_UNAVAILABLE`: the call's record could not be written, so the
/// call did nothing.
pub fn audit_unavailable() -> Status {
    with_reason(
        Code::Unavailable,
        ErrorReason::AuditUnavailable,
        "the audit log could not record this call, so it was not carried out; retry",
    )
}

/// The ErrorInfo reason of a status the vault sent, or the code's name for one without
/// (as tonic makes for transport and decoding failures): what the audit log records.
pub fn reason_of(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_else(|| format!("{:?}", status.code()).to_uppercase())
}

/// Logs a failed call by class: what the caller can fix at `info`, server trouble at `error`
/// with its cause chain. Never logs request contents.
pub fn log_failure(rpc: &'static str, err: &VaultError) {
    match err {
        VaultError::NotFound
        | VaultError::ReauthRequired(_)
        | VaultError::PermissionDenied(_)
        | VaultError::RefreshTokenDenied
        | VaultError::RateLimited { .. }
        | VaultError::CallerRateLimited { .. }
        | VaultError::PolicyDenied { .. }
        | VaultError::DeadlineExceeded(_)
        | VaultError::InvalidArgument { .. }
        | VaultError::AuthorizationNotFound
        | VaultError::AuthorizationExpired(_)
        | VaultError::AuthorizationDenied(_)
        | VaultError::AuthorizationPending
        | VaultError::AgentNotFound
        | VaultError::KeyRotationRefused(_) => {
            tracing::info!(rpc, error = %err, "call refused");
        }
        VaultError::AuthorizationMismatch => {
            tracing::warn!(rpc, error = %err, "consent flow completed by another caller; refused and burned");
        }
        VaultError::ProviderUnavailable(_) => {
            tracing::warn!(rpc, error = %err, "provider unavailable")
        }
        VaultError::Unavailable(source) => {
            tracing::error!(rpc, error = %crate::telemetry::error_chain(source), "storage unavailable");
        }
        VaultError::KeyUnavailable(_) => {
            tracing::warn!(rpc, error = %err, "agent key unavailable on this replica")
        }
        VaultError::AuditUnavailable(source) => {
            tracing::error!(rpc, error = %crate::telemetry::error_chain(source), "audit log unavailable; the call failed");
        }
        VaultError::Unexpected(source) => tracing::error!(rpc, error = ?source, "call failed"),
    }
}
