//! An agent fetching the access token for a tool, acting for the user its JWT names.
//!
//! ```sh
//! # with `vault-server dev` running, and the VAULT_ADDR and VAULT_TOKEN it prints exported:
//! cargo run --release -p vault-client --example agent_get_token -- jira
//! ```
//! `VAULT_TOKEN_FILE` (a file re-read when it changes) is used instead of `VAULT_TOKEN` when set.

use std::time::Duration;

use vault_client::{Client, Error};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tool = std::env::args().nth(1).unwrap_or_else(|| "jira".into());
    // Names a missing VAULT_ADDR or VAULT_TOKEN, and where to get them.
    let env = vault_client::env::from_env()?;
    let vault = Client::builder(env.address.clone())
        .token(env.token_source()?)
        .connect()
        .await?;

    // Ask for a token valid at least a minute: long enough for the tool call we are about to make.
    match vault.get_token(&tool, Duration::from_secs(60)).await {
        Ok(token) => {
            // A real agent would now call the tool with `Authorization: Bearer <access_token>`.
            // The token itself is never printed.
            let expires = token
                .expires_at
                .map_or_else(|| "no expiry given".to_string(), vault_client::rfc3339);
            println!(
                "{} token for {tool}: generation {}, expires {expires}{}",
                token.token_type,
                token.generation,
                if token.refreshed {
                    ", refreshed just now"
                } else {
                    ""
                }
            );
        }
        Err(Error::CredentialNotFound) => {
            println!("no credential for {tool}: send the user through consent first")
        }
        Err(Error::ReauthRequired(why)) => println!("the user must authorize {tool} again: {why}"),
        Err(Error::ProviderUnavailable(why)) => {
            println!("{tool}'s provider is down; try later: {why}")
        }
        // Variants group reasons by what to do; the reason itself tells them apart in the log
        // (STORE_UNAVAILABLE and ISSUER_KEYS_UNAVAILABLE are both `Error::Unavailable`).
        Err(other) => {
            eprintln!(
                "GetToken failed ({}): {other}",
                other.reason().as_str_name()
            );
            return Err(other.into());
        }
    }
    Ok(())
}
