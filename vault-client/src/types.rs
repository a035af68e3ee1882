//! What the client's calls take and answer, in Rust terms: `SystemTime` for instants,
//! `Duration` for lifetimes, `Option` where the proto uses an empty value to mean "none". The
//! conversions to and from the generated messages live here, in one place.

use std::time::{Duration, SystemTime};

use vault_proto as proto;

use crate::Error;

/// A token set a gateway received from the provider, to store with
/// [`Client::store_token`](crate::Client::store_token).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TokenSet {
    /// The access token.
    pub access_token: String,
    /// The refresh token, when the provider gave one.
    pub refresh_token: Option<String>,
    /// Usually `Bearer`; empty means `Bearer`.
    pub token_type: String,
    /// When the access token expires; `None` when the provider gave no expiry.
    pub expires_at: Option<SystemTime>,
    /// Granted scopes.
    pub scopes: Vec<String>,
}

impl TokenSet {
    /// A `Bearer` access token with no refresh token, expiry or scopes yet.
    pub fn bearer(access_token: impl Into<String>) -> Self {
        Self {
            access_token: access_token.into(),
            token_type: "Bearer".into(),
            ..Self::default()
        }
    }
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSet")
            .field("access_token", &"[REDACTED]")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[REDACTED]"),
            )
            .field("token_type", &self.token_type)
            .field("expires_at", &self.expires_at)
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// For calls made through [`Client::raw`](crate::Client::raw).
impl From<TokenSet> for proto::OAuthToken {
    fn from(token: TokenSet) -> Self {
        Self {
            access_token: token.access_token,
            refresh_token: token.refresh_token.unwrap_or_default(),
            token_type: token.token_type,
            expires_at: token.expires_at.map(prost_types::Timestamp::from),
            scopes: token.scopes,
        }
    }
}

/// Which credentials of someone other than the caller a revoke deletes: admins only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    /// Another agent; `None` is the caller's agent.
    pub agent_id: Option<String>,
    /// Another user of that agent; `None` is the caller's user.
    pub user_id: Option<String>,
}

/// What StoreToken answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The credential's new generation.
    pub generation: u64,
    /// When the vault will delete it.
    pub ttl_expires_at: SystemTime,
}

/// What GetToken and Refresh answered.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// The access token to send to the tool.
    pub access_token: String,
    /// Usually `Bearer`.
    pub token_type: String,
    /// When the access token expires, if the provider said.
    pub expires_at: Option<SystemTime>,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// The credential version.
    pub generation: u64,
    /// Whether the vault refreshed it for this call.
    pub refreshed: bool,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("access_token", &"[REDACTED]")
            .field("token_type", &self.token_type)
            .field("expires_at", &self.expires_at)
            .field("scopes", &self.scopes)
            .field("generation", &self.generation)
            .field("refreshed", &self.refreshed)
            .finish()
    }
}

/// What Revoke answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoked {
    /// Credentials deleted from the vault.
    pub revoked: u32,
    /// Tokens revoked at the provider before the reply.
    pub provider_revoked: u32,
}

/// What Sweep answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Credentials deleted (or counted, in a dry run).
    pub swept: u64,
    /// More expired credentials may remain.
    pub more: bool,
}

/// Whole seconds for the wire, rounded up: a short but non-zero duration must not become 0,
/// which the vault reads as "its default TTL" or "no margin".
pub(crate) fn seconds(duration: Duration) -> i64 {
    let whole = duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0));
    i64::try_from(whole).unwrap_or(i64::MAX)
}

fn instant(timestamp: prost_types::Timestamp) -> Result<SystemTime, Error> {
    SystemTime::try_from(timestamp).map_err(|_| Error::malformed("timestamp out of range"))
}

pub(crate) fn stored_from(response: proto::StoreTokenResponse) -> Result<Stored, Error> {
    let ttl_expires_at = response
        .ttl_expires_at
        .ok_or_else(|| Error::malformed("no ttl_expires_at"))?;
    Ok(Stored {
        generation: response.generation,
        ttl_expires_at: instant(ttl_expires_at)?,
    })
}

pub(crate) fn token_from(
    token: Option<proto::AccessToken>,
    refreshed: bool,
) -> Result<Token, Error> {
    let token = token.ok_or_else(|| Error::malformed("no token"))?;
    Ok(Token {
        access_token: token.access_token,
        token_type: token.token_type,
        expires_at: token.expires_at.map(instant).transpose()?,
        scopes: token.scopes,
        generation: token.generation,
        refreshed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fraction_of_a_second_rounds_up_so_it_never_reads_as_zero() {
        assert_eq!(seconds(Duration::ZERO), 0);
        assert_eq!(seconds(Duration::from_millis(1)), 1);
        assert_eq!(seconds(Duration::from_secs(60)), 60);
        assert_eq!(seconds(Duration::from_millis(60_500)), 61);
        assert_eq!(seconds(Duration::MAX), i64::MAX);
    }

    #[test]
    fn a_token_set_goes_on_the_wire_with_empty_strings_for_none() {
        let expires_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let wire = proto::OAuthToken::from(TokenSet {
            expires_at: Some(expires_at),
            ..TokenSet::bearer("at")
        });
        assert_eq!(wire.refresh_token, "");
        assert_eq!(wire.token_type, "Bearer");
        assert_eq!(wire.expires_at.map(|t| t.seconds), Some(1_700_000_000));
    }

    #[test]
    fn debug_never_shows_a_token() {
        let token = TokenSet {
            refresh_token: Some("rt-secret".into()),
            ..TokenSet::bearer("at-secret")
        };
        let shown = format!("{token:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }
}
