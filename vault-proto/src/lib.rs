//! The credential vault's gRPC contract, `vault.v1`, generated from `proto/vault/v1/vault.proto`:
//! the messages, the `CredentialVault` server and client stubs, the [`ErrorReason`] every error
//! status carries, and the encoded descriptor set that server reflection serves.
//!
//! The proto is compiled here and nowhere else; `vault-server` and `vault-client` both depend
//! on this crate, so the two sides always agree on the contract.

#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod generated {
    tonic::include_proto!("vault.v1");
}

// At the root, so paths read as in the proto: `vault_proto::GetTokenRequest`.
pub use generated::*;

/// Encoded `FileDescriptorSet` of the vault API, for server reflection, with the
/// `google.rpc` error types (`Status`, `ErrorInfo`, `BadRequest`, `RetryInfo`, ...) its error
/// statuses carry, so reflection clients decode an error's details.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/vault_descriptor.bin"));

/// The domain of every `google.rpc.ErrorInfo` the vault returns; its `reason` is an
/// [`ErrorReason`] written with [`ErrorReason::as_str_name`].
pub const ERROR_DOMAIN: &str = "vault.v1";

#[cfg(test)]
mod tests {
    use super::ErrorReason;

    /// The reasons clients already branch on, as they were sent before the enum existed.
    const WIRE_NAMES: [(ErrorReason, &str); 11] = [
        (ErrorReason::CredentialNotFound, "CREDENTIAL_NOT_FOUND"),
        (ErrorReason::ReauthRequired, "REAUTH_REQUIRED"),
        (ErrorReason::ProviderUnavailable, "PROVIDER_UNAVAILABLE"),
        (ErrorReason::Unauthenticated, "UNAUTHENTICATED"),
        (
            ErrorReason::IssuerKeysUnavailable,
            "ISSUER_KEYS_UNAVAILABLE",
        ),
        (ErrorReason::PermissionDenied, "PERMISSION_DENIED"),
        (
            ErrorReason::StoreRefreshTokenDenied,
            "STORE_REFRESH_TOKEN_DENIED",
        ),
        (ErrorReason::InvalidArgument, "INVALID_ARGUMENT"),
        (
            ErrorReason::AgentCreationRateLimited,
            "AGENT_CREATION_RATE_LIMITED",
        ),
        (ErrorReason::StoreUnavailable, "STORE_UNAVAILABLE"),
        (ErrorReason::Internal, "INTERNAL"),
    ];

    #[test]
    fn every_reason_keeps_its_wire_name_both_ways() {
        for (reason, name) in WIRE_NAMES {
            assert_eq!(reason.as_str_name(), name);
            assert_eq!(ErrorReason::from_str_name(name), Some(reason));
        }
    }

    #[test]
    fn the_descriptor_set_describes_the_service_and_the_reasons() {
        let set: prost_types::FileDescriptorSet =
            prost::Message::decode(super::FILE_DESCRIPTOR_SET).expect("build.rs encoded it");
        let file = set
            .file
            .iter()
            .find(|f| f.package() == "vault.v1")
            .expect("the vault file is in the set");
        assert!(file.service.iter().any(|s| s.name() == "CredentialVault"));
        assert!(file.enum_type.iter().any(|e| e.name() == "ErrorReason"));
    }

    #[test]
    fn the_descriptor_set_names_the_error_detail_types_by_their_usual_paths() {
        let set: prost_types::FileDescriptorSet =
            prost::Message::decode(super::FILE_DESCRIPTOR_SET).expect("build.rs encoded it");
        let names: Vec<&str> = set.file.iter().map(|f| f.name()).collect();
        for name in [
            "google/rpc/status.proto",
            "google/rpc/error_details.proto",
            "google/protobuf/any.proto",
            "google/protobuf/duration.proto",
        ] {
            assert!(names.contains(&name), "{name} in {names:?}");
        }
    }
}
