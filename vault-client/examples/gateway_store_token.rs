//! A gateway storing the token set a user just granted, at the end of an OAuth2 consent flow.
//!
//! ```sh
//! # with `vault-server dev` running and its `export VAULT_ADDR=…` line pasted:
//! export VAULT_TOKEN=$(cargo run --release -q -p vault-server -- token --store)   # a gateway token: StoreToken needs vault:store
//! cargo run --release -p vault-client --example gateway_store_token -- jira ACCESS REFRESH 3600
//! ```
//! `VAULT_TOKEN_FILE` (a file holding the gateway's token) is used instead of `VAULT_TOKEN` when
//! set; it is read here, before any call, not inside one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vault_client::{Client, ErrorReason, TokenSet, TokenSource};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: gateway_store_token TOOL ACCESS_TOKEN [REFRESH_TOKEN] [EXPIRES_IN_SECONDS]";
    let tool = args.next().ok_or(usage)?;
    let access_token = args.next().ok_or(usage)?;
    let refresh_token = args.next().filter(|t| !t.is_empty());
    let expires_in =
        Duration::from_secs(args.next().map(|s| s.parse()).transpose()?.unwrap_or(3600));

    let endpoint = std::env::var("VAULT_ADDR").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let jwt = match std::env::var("VAULT_TOKEN_FILE") {
        Ok(path) => tokio::fs::read_to_string(path).await?,
        Err(_) => std::env::var("VAULT_TOKEN")?,
    };
    let vault = Client::builder(endpoint)
        .token(TokenSource::fixed(&jwt)?)
        .connect()
        .await?;

    // The provider's token response, as the gateway received it from the token endpoint.
    let token = TokenSet {
        refresh_token,
        expires_at: Some(SystemTime::now() + expires_in),
        ..TokenSet::bearer(access_token)
    };
    // Keep it for a day at most; `None` would take the vault's default.
    let stored = match vault
        .store_token(&tool, token, Some(Duration::from_secs(24 * 3600)))
        .await
    {
        Ok(stored) => stored,
        Err(refused) if refused.reason() == ErrorReason::StoreRefreshTokenDenied => {
            eprintln!(
                "this vault runs its own consent flow for refreshable credentials: {refused}"
            );
            return Err(refused.into());
        }
        Err(other) => return Err(other.into()),
    };
    let kept_until = stored.ttl_expires_at.duration_since(UNIX_EPOCH)?.as_secs();
    println!(
        "stored {tool}: generation {}, kept until {kept_until} (unix seconds)",
        stored.generation
    );

    // A clone shares the connection and methods take `&self`, so another task needs no lock.
    // Here it deletes what was just stored when `UNDO_STORE` is set: the flow, without a
    // credential left behind.
    if std::env::var_os("UNDO_STORE").is_some() {
        let undo = vault.clone();
        let revoked = tokio::spawn(async move { undo.revoke(Some(&tool), false).await }).await??;
        println!("undone: {} credential(s) deleted", revoked.revoked);
    }
    Ok(())
}
