//! Waiting for the standard gRPC health check (`grpc.health.v1.Health/Check`) to answer
//! SERVING, through tonic-health's client.

use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The vault's gRPC service, as it registers it with its health service.
pub const VAULT_SERVICE: &str = "vault.v1.CredentialVault";
/// How long to wait between two checks that were not SERVING yet.
const POLL_INTERVAL: Duration = Duration::from_millis(2);

/// Asks once whether `service` is SERVING.
pub async fn is_serving(channel: Channel, service: &str) -> Result<bool, tonic::Status> {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(response.get_ref().status() == ServingStatus::Serving)
}

/// Checks `endpoint` until it reports `service` SERVING, or fails at `deadline` with the last
/// answer. A refused connection or an error counts as not yet serving.
pub async fn wait_serving(endpoint: &str, service: &str, deadline: Instant) -> anyhow::Result<()> {
    let endpoint = Endpoint::from_shared(endpoint.to_owned())?.tcp_nodelay(true);
    let mut channel = None;
    loop {
        let last = match &channel {
            Some(channel) => match is_serving(Channel::clone(channel), service).await {
                Ok(true) => return Ok(()),
                Ok(false) => "not SERVING".to_string(),
                Err(status) => format!("{status}"),
            },
            None => match endpoint.connect().await {
                Ok(connected) => {
                    channel = Some(connected);
                    continue;
                }
                Err(err) => format!("cannot connect: {err}"),
            },
        };
        if Instant::now() >= deadline {
            anyhow::bail!("{service} was not SERVING by the deadline; last: {last}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
