//! The gRPC edge: generated types, the auth layer, request validation, and the mapping of
//! [`crate::vault::VaultError`] to `tonic::Status`. Nothing below this module knows tonic.

mod auth_layer;
mod service;
mod shed;
mod size_limit;
mod status;
mod watch;

pub use auth_layer::AuthLayer;
pub use service::CredentialVaultService;
pub use shed::{RETRY_AFTER as SHED_RETRY_AFTER, ShedLayer};
pub use size_limit::{Budget, SizeLimitLayer};
pub use watch::{MAX_WATCHERS_PER_CALLER, WATCH_AFTER_HEADER, Watchers};

/// The generated API, from the `vault-proto` crate; the descriptor set for reflection is
/// `proto::FILE_DESCRIPTOR_SET`.
pub use vault_proto as proto;

/// The error domain in every `google.rpc.ErrorInfo` this service returns.
pub use vault_proto::ERROR_DOMAIN;
