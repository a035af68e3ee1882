//! Compiles `proto/bench/v1/echo.proto` with protox (pure Rust, no system `protoc`) into the
//! echo server and client stubs, the same way `vault-proto/build.rs` compiles the vault API.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = "proto";
    let proto = "proto/bench/v1/echo.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], [proto_dir])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
