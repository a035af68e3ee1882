//! A gateway storing the token set a user just granted, at the end of an OAuth2 consent flow.
//!
//! ```sh
//! # with `vault-server dev` running, and the VAULT_ADDR and VAULT_TOKEN it prints exported (its
//! # token has vault:store, which StoreToken needs: a gateway's token, not an agent's):
//! cargo run --release -p vault-client --example gateway_store_token -- jira ACCESS REFRESH 3600
//! ```
//! `VAULT_TOKEN_FILE` (a file holding the gateway's token) is used instead of `VAULT_TOKEN` when
//! set; it is read here, before any call, not inside one.

use std::time::{Duration, SystemTime};

use vault_client::env::CallerToken;
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

    // Names a missing VAULT_ADDR or VAULT_TOKEN, and where to get them.
    let env = vault_client::env::from_env()?;
    let jwt = match &env.token {
        CallerToken::File(path) => tokio::fs::read_to_string(path).await?,
        CallerToken::Fixed(jwt) => jwt.clone(),
    };
    let vault = Client::builder(env.address.clone())
        .token(TokenSource::fixed(jwt.trim())?)
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
    println!(
        "stored {tool}: generation {}, kept until {}",
        stored.generation,
        vault_client::rfc3339(stored.ttl_expires_at)
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
