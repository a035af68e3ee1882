//! Compiles `proto/vault/v1/vault.proto` once, with protox (pure Rust, no system `protoc`), into
//! the server and client stubs, and writes the encoded descriptor set that server reflection
//! serves. The server and the client both take their code from here, so they cannot drift.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = "../proto";
    let proto = "../proto/vault/v1/vault.proto";
    println!("cargo:rerun-if-changed={proto}");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile([proto], [proto_dir])?;
    std::fs::write(
        out_dir.join("vault_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
