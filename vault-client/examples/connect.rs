//! An agent connecting a user to a tool through the vault's own consent flow: begin it, print
//! the URL for the user, and watch the flow until it ends.
//!
//! This example never calls CompleteAuthorization. A bound flow (with a return URL) must be
//! completed by the gateway's handler of that URL, as the user whose browser arrived there:
//! that is what binds the credential to the person who consented. Completing a flow as soon as
//! polling shows its callback would store whoever consented under the caller that began it,
//! which is exactly the account-swap the binding exists to stop.
//!
//! ```sh
//! # with `vault-server dev` running and an OAuth provider configured for the tool, and the
//! # VAULT_ADDR and VAULT_TOKEN it prints exported:
//! cargo run --release -p vault-client --example connect -- jira [RETURN_URL] [SCOPE...]
//! ```
//! Without a return URL the vault's callback completes the flow itself, where the vault allows
//! that (`dev` does); with one, the gateway serving that URL completes it.

use std::time::{Duration, SystemTime};

use vault_client::{AuthorizationState, Client};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let tool = args.next().unwrap_or_else(|| "jira".into());
    let return_url = args.next().filter(|u| !u.is_empty());
    let scopes: Vec<String> = args.collect();
    // Names a missing VAULT_ADDR or VAULT_TOKEN, and where to get them.
    let env = vault_client::env::from_env()?;
    let vault = Client::builder(env.address.clone())
        .token(env.token_source()?)
        .connect()
        .await?;

    let flow = vault
        .begin_authorization(&tool, &scopes, return_url.as_deref())
        .await?;
    println!(
        "open this in a browser before {}:\n{}",
        vault_client::rfc3339(flow.expires_at),
        flow.authorization_url
    );

    // Poll until the flow can complete or has ended, and never past its own expiry.
    loop {
        let status = vault.get_authorization(&flow.authorization_id).await?;
        match status.state {
            AuthorizationState::Completed => {
                println!("connected {tool}");
                return Ok(());
            }
            state if state.is_final() => {
                let why = status.error.unwrap_or_default();
                return Err(format!("{tool} not connected: {state:?} {why}").into());
            }
            _ if SystemTime::now() >= flow.expires_at => {
                return Err(format!("{tool} not connected: the flow expired").into());
            }
            // Waiting for the user, or for the gateway's return-URL handler to complete it (or a
            // state a newer vault added): ask again shortly.
            _ => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    }
}
