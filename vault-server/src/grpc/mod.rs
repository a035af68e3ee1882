//! The gRPC edge: generated types, the auth layer, request validation, and the mapping of
//! [`crate::vault::VaultError`] to `tonic::Status`. Nothing below this module knows tonic.

mod auth_layer;
mod service;
mod status;

pub use auth_layer::AuthLayer;
pub use service::CredentialVaultService;

/// Generated from `proto/vault/v1/vault.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("vault.v1");

    /// Encoded descriptor set of the vault API, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/vault_descriptor.bin"));
}

/// The error domain in every `google.rpc.ErrorInfo` this service returns.
pub const ERROR_DOMAIN: &str = "vault.v1";
