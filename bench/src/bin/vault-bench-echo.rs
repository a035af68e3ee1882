//! `vault-bench-echo`: the RPC floor. A tonic server with one unary method that does no work
//! beyond answering with the requested number of bytes, so GetToken minus echo is what the vault
//! itself adds on top of tonic, HTTP/2 and the loopback.
//!
//! It binds `127.0.0.1:0` (or `--listen ADDR`), prints
//! `vault-bench-echo listening local_addr=IP:PORT` on stderr, and exits cleanly on SIGTERM or
//! Ctrl-C.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use vault_bench::proto::echo_server::{Echo, EchoServer};
use vault_bench::proto::{EchoRequest, EchoResponse};

/// The largest answer it will make; GetToken responses are far smaller.
const MAX_RESPONSE_BYTES: u32 = 1024 * 1024;

/// A bare tonic unary server: the floor vault-bench compares GetToken with.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Where to listen; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Leave Nagle's algorithm on for accepted connections (TCP_NODELAY off), to see what it
    /// costs a server that forgets to turn it off.
    #[arg(long)]
    nagle: bool,
}

/// The echo service.
#[derive(Debug, Default)]
struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let size = request.get_ref().response_size.min(MAX_RESPONSE_BYTES) as usize;
        Ok(Response::new(EchoResponse {
            payload: vec![0; size],
        }))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match serve(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("vault-bench-echo: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    // Socket options must be set on the incoming stream itself: `Server::tcp_nodelay` is
    // ignored by `serve_with_incoming*`.
    let incoming = TcpIncoming::bind(cli.listen)?.with_nodelay(Some(!cli.nagle));
    let local_addr = incoming.local_addr()?;
    eprintln!("vault-bench-echo listening local_addr={local_addr}");
    Server::builder()
        .add_service(EchoServer::new(EchoService))
        .serve_with_incoming_shutdown(incoming, shutdown_signal())
        .await?;
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
