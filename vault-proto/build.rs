//! Compiles `proto/vault/v1/vault.proto` once, with protox (pure Rust, no system `protoc`), into
//! the server and client stubs, and writes the encoded descriptor set that server reflection
//! serves. The server and the client both take their code from here, so they cannot drift.
//!
//! The descriptor set also holds `google/rpc/status.proto` and `google/rpc/error_details.proto`
//! (vendored under `proto/google/rpc/`, Apache-2.0, as tonic-types ships them): every error
//! status carries a `google.rpc.ErrorInfo`, and `grpcurl` or `buf curl` decode it only when
//! reflection can name its type; otherwise they print the details as base64. No code is
//! generated for them: tonic-types has the Rust types.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = "../proto";
    let proto = "../proto/vault/v1/vault.proto";
    let error_types = [
        "../proto/google/rpc/status.proto",
        "../proto/google/rpc/error_details.proto",
    ];
    println!("cargo:rerun-if-changed={proto}");
    for file in error_types {
        println!("cargo:rerun-if-changed={file}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let reflected = protox::compile(std::iter::once(proto).chain(error_types), [proto_dir])?;
    std::fs::write(
        out_dir.join("vault_descriptor.bin"),
        prost::Message::encode_to_vec(&reflected),
    )?;
    let fds = protox::compile([proto], [proto_dir])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
