//! What a small program run from a shell (such as this crate's examples) needs to reach the
//! vault: its address from `VAULT_ADDR` and the caller's JWT from `VAULT_TOKEN` or
//! `VAULT_TOKEN_FILE`. A missing one is named, with where to get it, instead of the bare
//! `NotPresent` that `std::env::var` gives.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let env = vault_client::env::from_env()?;
//! let vault = vault_client::Client::builder(env.address.clone())
//!     .token(env.token_source()?)
//!     .connect()
//!     .await?;
//! # Ok(()) }
//! ```

use std::path::PathBuf;

use crate::{Error, TokenSource};

/// The vault's address, such as `http://127.0.0.1:50051`.
pub const ADDR: &str = "VAULT_ADDR";
/// The caller's JWT.
pub const TOKEN: &str = "VAULT_TOKEN";
/// A file holding the caller's JWT; used instead of [`TOKEN`] when set.
pub const TOKEN_FILE: &str = "VAULT_TOKEN_FILE";

/// Where to get both, said with every missing variable.
const WHERE: &str = "`vault-server dev` prints both VAULT_ADDR and VAULT_TOKEN, ready to export";

/// The caller token, as the environment gives it.
#[derive(Clone, PartialEq, Eq)]
pub enum CallerToken {
    /// `VAULT_TOKEN`: the JWT itself.
    Fixed(String),
    /// `VAULT_TOKEN_FILE`: a file holding it.
    File(PathBuf),
}

impl std::fmt::Debug for CallerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(_) => f.write_str("Fixed([REDACTED])"),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// The vault's address and the caller token, read from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// `VAULT_ADDR`.
    pub address: String,
    /// `VAULT_TOKEN_FILE` when set, else `VAULT_TOKEN`.
    pub token: CallerToken,
}

impl Env {
    /// Reads through `lookup` (the environment, in [`from_env`]); an empty value counts as
    /// unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let set = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());
        let address = set(ADDR).ok_or(EnvError::Missing {
            name: ADDR,
            what: "the vault's address, such as http://127.0.0.1:50051",
        })?;
        let token = match (set(TOKEN_FILE), set(TOKEN)) {
            (Some(path), _) => CallerToken::File(path.into()),
            (None, Some(jwt)) => CallerToken::Fixed(jwt.trim().to_string()),
            (None, None) => {
                return Err(EnvError::Missing {
                    name: TOKEN,
                    what: "the caller's JWT (or VAULT_TOKEN_FILE, a file holding it)",
                });
            }
        };
        Ok(Self { address, token })
    }

    /// The token source for [`crate::ClientBuilder::token`]: the fixed token, or the file,
    /// re-read when it changes.
    pub fn token_source(&self) -> Result<TokenSource, Error> {
        match &self.token {
            CallerToken::Fixed(jwt) => TokenSource::fixed(jwt),
            CallerToken::File(path) => Ok(TokenSource::file(path.clone())),
        }
    }
}

/// Reads [`Env`] from the process environment.
pub fn from_env() -> Result<Env, EnvError> {
    Env::from_lookup(|name| std::env::var(name).ok())
}

/// A variable the program needs is not set.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// `name` is unset or empty.
    #[error("{name} is not set: {what}; {WHERE}")]
    Missing {
        /// The variable.
        name: &'static str,
        /// What it holds.
        what: &'static str,
    },
}

/// The message, not the structure: `main` returning `Err` prints the error with `Debug`, and
/// that is what a user of the examples reads.
impl std::fmt::Debug for EnvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn read(pairs: &[(&str, &str)]) -> Result<Env, EnvError> {
        let vars: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn a_missing_address_is_named_with_where_to_get_it() {
        let message = format!("{:?}", read(&[("VAULT_TOKEN", "jwt")]).unwrap_err());
        assert!(message.starts_with("VAULT_ADDR is not set"), "{message}");
        assert!(
            message.contains("`vault-server dev` prints both"),
            "{message}"
        );
        assert!(!message.contains("NotPresent"), "{message}");
    }

    #[test]
    fn a_missing_token_is_named_with_where_to_get_it() {
        for pairs in [
            &[("VAULT_ADDR", "http://127.0.0.1:50051")][..],
            &[
                ("VAULT_ADDR", "http://127.0.0.1:50051"),
                ("VAULT_TOKEN", " "),
            ][..],
        ] {
            let message = read(pairs).unwrap_err().to_string();
            assert!(message.starts_with("VAULT_TOKEN is not set"), "{message}");
            assert!(message.contains("VAULT_TOKEN_FILE"), "{message}");
            assert!(
                message.contains("`vault-server dev` prints both"),
                "{message}"
            );
        }
    }

    #[test]
    fn a_token_file_is_preferred_to_a_token_and_a_token_never_shows_in_debug() {
        let both = read(&[
            ("VAULT_ADDR", "http://vault:50051"),
            ("VAULT_TOKEN", "secret-jwt"),
            ("VAULT_TOKEN_FILE", "/run/token"),
        ])
        .unwrap();
        assert_eq!(both.token, CallerToken::File("/run/token".into()));
        let fixed = read(&[
            ("VAULT_ADDR", "http://vault:50051"),
            ("VAULT_TOKEN", "secret-jwt"),
        ])
        .unwrap();
        assert_eq!(fixed.address, "http://vault:50051");
        assert_eq!(fixed.token, CallerToken::Fixed("secret-jwt".into()));
        assert!(!format!("{fixed:?}").contains("secret-jwt"));
    }
}
