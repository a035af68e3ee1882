//! The one error type of the client: variants by what the caller should do, and
//! [`Error::reason`] for the exact `ErrorInfo` reason the vault sent.

use tonic::{Code, Status};
use tonic_types::StatusExt;
use vault_proto::ErrorReason;

/// What a vault call can fail with, by what the caller should do.
///
/// Variants that only one [`ErrorReason`] leads to carry the vault's message; variants that
/// several reasons share carry the reason too. [`Error::reason`] answers for all of them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No credential for this tool: start an OAuth consent flow and store the result.
    #[error("no credential stored for this tool")]
    CredentialNotFound,
    /// The provider rejected the grant (or the vault cannot refresh it): the user must consent
    /// again.
    #[error("re-authorization required: {0}")]
    ReauthRequired(String),
    /// No consent flow of the caller has this `authorization_id` (a typo, or another caller's
    /// id): begin a new flow.
    #[error("no consent flow of the caller has this authorization id")]
    AuthorizationNotFound,
    /// The user has not come back from the provider yet: poll
    /// [`Client::get_authorization`](crate::Client::get_authorization), then complete.
    #[error("authorization pending: {0}")]
    AuthorizationPending(String),
    /// The consent flow can no longer complete: it expired or already ended
    /// ([`ErrorReason::AuthorizationExpired`]), or consent or the code was refused
    /// ([`ErrorReason::AuthorizationDenied`]). Begin a new flow.
    #[error("authorization ended: {message}")]
    AuthorizationEnded {
        /// Why it ended.
        reason: ErrorReason,
        /// The server's explanation.
        message: String,
    },
    /// The provider is unreachable; the credential is kept. Retry later.
    #[error("provider unavailable: {0}")]
    ProviderUnavailable(String),
    /// The caller token was missing or refused.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller may not do this.
    #[error("permission denied: {message}")]
    PermissionDenied {
        /// Why, such as [`ErrorReason::StoreRefreshTokenDenied`], or
        /// [`ErrorReason::AuthorizationMismatch`] for a consent flow another agent or user began
        /// (which can then no longer complete).
        reason: ErrorReason,
        /// The server's explanation.
        message: String,
    },
    /// A request field is invalid; `field` names it as in the proto.
    #[error("invalid argument {field}: {message}")]
    InvalidArgument {
        /// The offending field, such as `tool` or `token.access_token`.
        field: String,
        /// The server's explanation.
        message: String,
    },
    /// A limit was hit (request size, rate, load).
    #[error("resource exhausted: {message}")]
    ResourceExhausted {
        /// [`ErrorReason::RateLimited`] (the caller's own rate), [`ErrorReason::Overloaded`]
        /// (the replica shed the call), [`ErrorReason::AgentCreationRateLimited`], or
        /// [`ErrorReason::RequestTooLarge`] for a request over the vault's size limit (the
        /// message names the limit; do not retry).
        reason: ErrorReason,
        /// The server's explanation.
        message: String,
        /// When a retry may be admitted (`google.rpc.RetryInfo`), if the vault said.
        retry_after: Option<std::time::Duration>,
    },
    /// The vault or its storage is unavailable (after retries, for idempotent calls).
    #[error("vault unavailable: {message}")]
    Unavailable {
        /// Which part is unavailable; unspecified when the vault could not be reached at all.
        reason: ErrorReason,
        /// The server's (or the transport's) explanation.
        message: String,
    },
    /// The call's deadline passed.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// Any other status.
    #[error("vault error: {0}")]
    Other(Status),
    /// The connection could not be configured or made.
    #[error("cannot connect to the vault: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The caller token is not valid as a header value.
    #[error("the caller token is not a valid header value")]
    InvalidToken,
    /// The token source failed (unreadable file, failing callback).
    #[error("caller token unavailable: {0}")]
    TokenSource(String),
}

impl Error {
    /// The `google.rpc.ErrorInfo` reason behind this error. [`ErrorReason::Unspecified`] when
    /// the failure did not come from the vault (transport, token source, a local deadline) or
    /// the vault sent no reason the client knows.
    pub fn reason(&self) -> ErrorReason {
        match self {
            Self::CredentialNotFound => ErrorReason::CredentialNotFound,
            Self::ReauthRequired(_) => ErrorReason::ReauthRequired,
            Self::AuthorizationNotFound => ErrorReason::AuthorizationNotFound,
            Self::AuthorizationPending(_) => ErrorReason::AuthorizationPending,
            Self::ProviderUnavailable(_) => ErrorReason::ProviderUnavailable,
            Self::Unauthenticated(_) => ErrorReason::Unauthenticated,
            Self::InvalidArgument { .. } => ErrorReason::InvalidArgument,
            Self::PermissionDenied { reason, .. }
            | Self::AuthorizationEnded { reason, .. }
            | Self::ResourceExhausted { reason, .. }
            | Self::Unavailable { reason, .. } => *reason,
            Self::Other(status) => reason_of(status),
            Self::DeadlineExceeded(_)
            | Self::Transport(_)
            | Self::InvalidToken
            | Self::TokenSource(_) => ErrorReason::Unspecified,
        }
    }

    /// An answer the vault should never give, such as a reply without its token.
    pub(crate) fn malformed(what: &str) -> Self {
        Self::Other(Status::internal(format!("malformed response: {what}")))
    }
}

/// The reason in `status`'s `ErrorInfo`, if it is one of the vault's.
fn reason_of(status: &Status) -> ErrorReason {
    status
        .get_error_details()
        .error_info()
        .and_then(|info| ErrorReason::from_str_name(&info.reason))
        .unwrap_or(ErrorReason::Unspecified)
}

/// Whether the call certainly never reached a vault: the connection to the replica chosen could
/// not be made (refused: a replica that has just stopped, and a balanced channel may still pick
/// it), or the connection closed while the request was still queued in this client, so hyper
/// cancelled it before writing a byte of it, the server refused its stream, or the transport
/// cancelled it on this side. A vault's own answer is never taken for one of these.
pub(crate) fn never_reached(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>() {
            return true;
        }
        if let Some(hyper) = error.downcast_ref::<hyper::Error>()
            && hyper.is_canceled()
        {
            return true;
        }
        // The server refused the stream (as a draining server does to streams past its
        // GOAWAY): by RFC 9113 §8.7 it did not process any of it.
        if let Some(h2) = error.downcast_ref::<h2::Error>()
            && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return true;
        }
        source = error.source();
    }
    // The transport cancelled the call on this side (the connection went away before the
    // request left, as when a replica closes). A proxy that resets a stream after forwarding
    // it can look the same; see the closing note of issue 16.
    status.code() == Code::Cancelled && never_sent(status)
}

/// Whether a cancellation was made on this side by the transport (the connection went away
/// before the request left), rather than sent by the vault or caused by a timeout.
fn never_sent(status: &Status) -> bool {
    let mut transport = false;
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::TimeoutExpired>() {
            return false;
        }
        transport |= error.is::<tonic::transport::Error>();
        source = error.source();
    }
    transport
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        let reason = reason_of(&status);
        let message = status.message().to_string();
        match (status.code(), reason) {
            (Code::NotFound, ErrorReason::CredentialNotFound) => Self::CredentialNotFound,
            (Code::FailedPrecondition, ErrorReason::ReauthRequired) => {
                Self::ReauthRequired(message)
            }
            (Code::NotFound, ErrorReason::AuthorizationNotFound) => Self::AuthorizationNotFound,
            (Code::FailedPrecondition, ErrorReason::AuthorizationPending) => {
                Self::AuthorizationPending(message)
            }
            (
                Code::FailedPrecondition,
                ErrorReason::AuthorizationExpired | ErrorReason::AuthorizationDenied,
            ) => Self::AuthorizationEnded { reason, message },
            (Code::Unavailable, ErrorReason::ProviderUnavailable) => {
                Self::ProviderUnavailable(message)
            }
            (Code::Unauthenticated, _) => Self::Unauthenticated(message),
            (Code::PermissionDenied, _) => Self::PermissionDenied { reason, message },
            (Code::InvalidArgument, _) => {
                let details = status.get_error_details();
                let field = details
                    .bad_request()
                    .and_then(|b| b.field_violations.first())
                    .map(|v| v.field.clone())
                    .or_else(|| {
                        details
                            .error_info()
                            .and_then(|i| i.metadata.get("field").cloned())
                    })
                    .unwrap_or_default();
                Self::InvalidArgument { field, message }
            }
            (Code::ResourceExhausted | Code::OutOfRange, _) => Self::ResourceExhausted {
                reason,
                message,
                retry_after: status
                    .get_error_details()
                    .retry_info()
                    .and_then(|info| info.retry_delay),
            },
            (Code::Unavailable, _) => Self::Unavailable { reason, message },
            // The connection closed before the request could be sent (a vault replica going away
            // mid-handshake): the call never reached the vault, so it is as unavailable as a
            // refused connection. A call cancelled by its own timeout is not: it may have.
            (Code::Cancelled, _) if never_sent(&status) => Self::Unavailable { reason, message },
            (Code::DeadlineExceeded, _) => Self::DeadlineExceeded(message),
            _ => Self::Other(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tonic_types::ErrorDetails;

    use super::*;

    fn status(code: Code, reason: ErrorReason) -> Status {
        Status::with_error_details(
            code,
            "why",
            ErrorDetails::with_error_info(
                reason.as_str_name(),
                vault_proto::ERROR_DOMAIN,
                HashMap::new(),
            ),
        )
    }

    #[test]
    fn every_reason_the_vault_sends_comes_back_from_reason() {
        for (code, reason) in [
            (Code::NotFound, ErrorReason::CredentialNotFound),
            (Code::FailedPrecondition, ErrorReason::ReauthRequired),
            (Code::Unavailable, ErrorReason::ProviderUnavailable),
            (Code::Unauthenticated, ErrorReason::Unauthenticated),
            (Code::Unavailable, ErrorReason::IssuerKeysUnavailable),
            (Code::PermissionDenied, ErrorReason::PermissionDenied),
            (Code::PermissionDenied, ErrorReason::StoreRefreshTokenDenied),
            (Code::InvalidArgument, ErrorReason::InvalidArgument),
            (
                Code::ResourceExhausted,
                ErrorReason::AgentCreationRateLimited,
            ),
            (Code::Unavailable, ErrorReason::StoreUnavailable),
            (Code::Internal, ErrorReason::Internal),
            (Code::NotFound, ErrorReason::AuthorizationNotFound),
            (Code::FailedPrecondition, ErrorReason::AuthorizationExpired),
            (Code::FailedPrecondition, ErrorReason::AuthorizationDenied),
            (Code::PermissionDenied, ErrorReason::AuthorizationMismatch),
            (Code::FailedPrecondition, ErrorReason::AuthorizationPending),
            (Code::ResourceExhausted, ErrorReason::RequestTooLarge),
        ] {
            assert_eq!(Error::from(status(code, reason)).reason(), reason);
        }
    }

    #[test]
    fn each_consent_flow_reason_lands_on_the_variant_that_says_what_to_do() {
        assert!(matches!(
            Error::from(status(Code::NotFound, ErrorReason::AuthorizationNotFound)),
            Error::AuthorizationNotFound
        ));
        assert!(matches!(
            Error::from(status(
                Code::FailedPrecondition,
                ErrorReason::AuthorizationPending
            )),
            Error::AuthorizationPending(_)
        ));
        for reason in [
            ErrorReason::AuthorizationExpired,
            ErrorReason::AuthorizationDenied,
        ] {
            assert!(matches!(
                Error::from(status(Code::FailedPrecondition, reason)),
                Error::AuthorizationEnded { reason: r, .. } if r == reason
            ));
        }
        assert!(matches!(
            Error::from(status(
                Code::PermissionDenied,
                ErrorReason::AuthorizationMismatch
            )),
            Error::PermissionDenied {
                reason: ErrorReason::AuthorizationMismatch,
                ..
            }
        ));
    }

    #[test]
    fn the_new_reasons_are_read_from_their_wire_names() {
        for name in [
            "AUTHORIZATION_NOT_FOUND",
            "AUTHORIZATION_EXPIRED",
            "AUTHORIZATION_DENIED",
            "AUTHORIZATION_MISMATCH",
            "AUTHORIZATION_PENDING",
        ] {
            let status = Status::with_error_details(
                Code::Aborted,
                "why",
                ErrorDetails::with_error_info(name, vault_proto::ERROR_DOMAIN, HashMap::new()),
            );
            assert_eq!(Error::from(status).reason().as_str_name(), name);
        }
    }

    #[test]
    fn an_unreachable_vault_is_unavailable_without_a_reason() {
        let error = Error::from(Status::unavailable("connection refused"));
        assert!(matches!(
            error,
            Error::Unavailable {
                reason: ErrorReason::Unspecified,
                ..
            }
        ));
    }

    #[test]
    fn a_reason_this_client_does_not_know_reads_as_unspecified() {
        let status = Status::with_error_details(
            Code::NotFound,
            "why",
            ErrorDetails::with_error_info(
                "SOMETHING_NEW",
                vault_proto::ERROR_DOMAIN,
                HashMap::new(),
            ),
        );
        let error = Error::from(status);
        assert!(matches!(error, Error::Other(_)));
        assert_eq!(error.reason(), ErrorReason::Unspecified);
    }
}
