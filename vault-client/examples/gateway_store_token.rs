//! A gateway storing the token set a user just granted, at the end of an OAuth2 consent flow.
//!
//! ```sh
//! # with `vault-server dev` running:
//! export VAULT_TOKEN=$(cargo run -q -p vault-server -- token --store)   # a gateway token: StoreToken needs vault:store
//! cargo run -p vault-client --example gateway_store_token -- jira ACCESS REFRESH 3600
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use vault_client::{Client, OAuthToken, TokenSource};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: gateway_store_token TOOL ACCESS_TOKEN [REFRESH_TOKEN] [EXPIRES_IN_SECONDS]";
    let tool = args.next().ok_or(usage)?;
    let access_token = args.next().ok_or(usage)?;
    let refresh_token = args.next().unwrap_or_default();
    let expires_in: i64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3600);

    let endpoint = std::env::var("VAULT_ADDR").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let mut vault = Client::builder(endpoint)
        .token(TokenSource::fixed(&std::env::var("VAULT_TOKEN")?)?)
        .connect()
        .await?;

    // The provider's token response, as the gateway received it from the token endpoint.
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    let token = OAuthToken {
        access_token,
        refresh_token,
        token_type: "Bearer".into(),
        expires_at: Some(prost_types::Timestamp {
            seconds: now + expires_in,
            nanos: 0,
        }),
        scopes: vec![],
    };
    let stored = vault.store_token(&tool, token, 0).await?;
    println!(
        "stored {tool}: generation {}, kept until {}",
        stored.generation, stored.ttl_expires_at
    );
    Ok(())
}
