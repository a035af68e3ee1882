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

/// Whose credentials an admin call acts on, instead of the caller's: a revoke deletes them, a
/// list shows them. Admins only.
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

/// What CompleteAuthorization answered: the credential it stored, as [`Stored`] (what
/// StoreToken answers), and the scopes the provider granted. The scopes sit beside `Stored`
/// rather than in it: StoreToken's reply has none, and `Stored` stays `Copy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The stored credential's generation and vault expiry.
    pub stored: Stored,
    /// The scopes the provider granted, which may differ from those asked for.
    pub scopes: Vec<String>,
}

/// What BeginAuthorization answered. Neither the URL nor the id is a secret: the URL carries
/// only the PKCE challenge and a single-use state, and the id only names the flow to its own
/// (agent, user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationStart {
    /// The provider's authorization endpoint: send the user's browser here.
    pub authorization_url: String,
    /// Names the flow in [`Client::get_authorization`](crate::Client::get_authorization) and
    /// [`Client::complete_authorization`](crate::Client::complete_authorization).
    pub authorization_id: String,
    /// After this the flow can no longer complete.
    pub expires_at: SystemTime,
}

/// Where a consent flow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthorizationState {
    /// Waiting for the user at the provider.
    Pending,
    /// The provider redirected back with a code: complete the flow now.
    CallbackReceived,
    /// The credential is stored.
    Completed,
    /// The user or the provider refused consent.
    Denied,
    /// Not completed in time.
    Expired,
    /// Ended without a credential: the code was refused, or the caller did not match.
    Failed,
    /// A state this client does not know, from a newer vault, with its wire value. Kept
    /// rather than refused so that polling a flow does not fail when the vault adds a state;
    /// it is not [`final`](Self::is_final), so a poll goes on until the flow's `expires_at`.
    Unknown(i32),
}

impl AuthorizationState {
    /// Whether the flow has ended and will not change again: `Completed`, `Denied`,
    /// `Expired` or `Failed`.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Denied | Self::Expired | Self::Failed
        )
    }
}

/// What GetAuthorization answered: one consent flow of the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// The flow's id, as BeginAuthorization returned it.
    pub authorization_id: String,
    /// The tool the flow is for.
    pub tool: String,
    /// Where it stands.
    pub state: AuthorizationState,
    /// After this the flow can no longer complete.
    pub expires_at: SystemTime,
    /// Why the flow ended in `Denied` or `Failed`; never a code or token.
    pub error: Option<String>,
}

/// Where a stored credential stands, as ListCredentials reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConnectionState {
    /// Usable: GetToken serves (or refreshes) it.
    Active,
    /// The provider rejected the grant: the user must consent again.
    ReauthRequired,
    /// Past its vault TTL, not yet swept.
    Expired,
    /// A state this client does not know, from a newer vault, exactly as it was sent.
    Unknown(String),
}

impl ConnectionState {
    /// The wire string: `ACTIVE`, `REAUTH_REQUIRED`, `EXPIRED`, or the unknown one as sent.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Active => "ACTIVE",
            Self::ReauthRequired => "REAUTH_REQUIRED",
            Self::Expired => "EXPIRED",
            Self::Unknown(other) => other,
        }
    }
}

impl From<String> for ConnectionState {
    fn from(wire: String) -> Self {
        match wire.as_str() {
            "ACTIVE" => Self::Active,
            "REAUTH_REQUIRED" => Self::ReauthRequired,
            "EXPIRED" => Self::Expired,
            _ => Self::Unknown(wire),
        }
    }
}

impl std::fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One of the caller's connections, as ListCredentials answered it. Holds no token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialInfo {
    /// The tool.
    pub tool: String,
    /// Whether it is usable.
    pub state: ConnectionState,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// When the current access token expires, if the provider said.
    pub access_expires_at: Option<SystemTime>,
    /// When the vault will delete the credential.
    pub ttl_expires_at: SystemTime,
    /// The credential version.
    pub generation: u64,
    /// When it was last stored or refreshed.
    pub updated_at: SystemTime,
    /// Whether the vault can refresh it without the user.
    pub has_refresh_token: bool,
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

/// `field`, which the vault always sets, as an instant.
fn required(timestamp: Option<prost_types::Timestamp>, field: &str) -> Result<SystemTime, Error> {
    instant(timestamp.ok_or_else(|| Error::malformed(&format!("no {field}")))?)
}

pub(crate) fn completed_from(
    response: proto::CompleteAuthorizationResponse,
) -> Result<Completed, Error> {
    Ok(Completed {
        stored: Stored {
            generation: response.generation,
            ttl_expires_at: required(response.ttl_expires_at, "ttl_expires_at")?,
        },
        scopes: response.scopes,
    })
}

pub(crate) fn start_from(
    response: proto::BeginAuthorizationResponse,
) -> Result<AuthorizationStart, Error> {
    if response.authorization_url.is_empty() || response.authorization_id.is_empty() {
        return Err(Error::malformed("no authorization_url or authorization_id"));
    }
    Ok(AuthorizationStart {
        authorization_url: response.authorization_url,
        authorization_id: response.authorization_id,
        expires_at: required(response.expires_at, "expires_at")?,
    })
}

/// The wire state as an [`AuthorizationState`]. `STATE_UNSPECIFIED` is what an unset field
/// reads as, and the vault never sends it, so it is a malformed reply; any other unknown value
/// is a state from a newer vault.
fn state_from(wire: i32) -> Result<AuthorizationState, Error> {
    use proto::authorization::State;
    Ok(match State::try_from(wire) {
        Ok(State::Unspecified) => return Err(Error::malformed("no authorization state")),
        Ok(State::Pending) => AuthorizationState::Pending,
        Ok(State::CallbackReceived) => AuthorizationState::CallbackReceived,
        Ok(State::Completed) => AuthorizationState::Completed,
        Ok(State::Denied) => AuthorizationState::Denied,
        Ok(State::Expired) => AuthorizationState::Expired,
        Ok(State::Failed) => AuthorizationState::Failed,
        Err(_) => AuthorizationState::Unknown(wire),
    })
}

pub(crate) fn authorization_from(response: proto::Authorization) -> Result<Authorization, Error> {
    Ok(Authorization {
        state: state_from(response.state)?,
        expires_at: required(response.expires_at, "expires_at")?,
        error: Some(response.error).filter(|e| !e.is_empty()),
        authorization_id: response.authorization_id,
        tool: response.tool,
    })
}

pub(crate) fn credential_from(info: proto::CredentialInfo) -> Result<CredentialInfo, Error> {
    Ok(CredentialInfo {
        state: ConnectionState::from(info.state),
        access_expires_at: info.access_expires_at.map(instant).transpose()?,
        ttl_expires_at: required(info.ttl_expires_at, "ttl_expires_at")?,
        updated_at: required(info.updated_at, "updated_at")?,
        tool: info.tool,
        scopes: info.scopes,
        generation: info.generation,
        has_refresh_token: info.has_refresh_token,
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

/// `at` as RFC 3339 in UTC to the second (`2026-11-30T17:28:07Z`), for printing the times the
/// vault answers with; a time before 1970 prints as 1970.
pub fn rfc3339(at: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(at.max(SystemTime::UNIX_EPOCH))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_rfc_3339_in_utc() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_523_687);
        assert_eq!(rfc3339(at), "2025-11-30T17:28:07Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00Z"
        );
    }

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

    fn at(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    fn unix(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn wire_authorization(state: i32) -> proto::Authorization {
        proto::Authorization {
            authorization_id: "az-1".into(),
            tool: "jira".into(),
            state,
            expires_at: at(1_700_000_600),
            error: String::new(),
        }
    }

    #[test]
    fn every_authorization_state_the_proto_names_has_its_variant() {
        use proto::authorization::State;
        for (wire, state) in [
            (State::Pending, AuthorizationState::Pending),
            (
                State::CallbackReceived,
                AuthorizationState::CallbackReceived,
            ),
            (State::Completed, AuthorizationState::Completed),
            (State::Denied, AuthorizationState::Denied),
            (State::Expired, AuthorizationState::Expired),
            (State::Failed, AuthorizationState::Failed),
        ] {
            let flow = authorization_from(wire_authorization(wire as i32)).unwrap();
            assert_eq!(flow.state, state);
        }
    }

    #[test]
    fn an_authorization_converts_with_an_empty_error_as_none() {
        let flow = authorization_from(wire_authorization(1)).unwrap();
        assert_eq!(
            flow,
            Authorization {
                authorization_id: "az-1".into(),
                tool: "jira".into(),
                state: AuthorizationState::Pending,
                expires_at: unix(1_700_000_600),
                error: None,
            }
        );
        let denied = authorization_from(proto::Authorization {
            error: "access_denied".into(),
            ..wire_authorization(4)
        })
        .unwrap();
        assert_eq!(denied.error.as_deref(), Some("access_denied"));
    }

    #[test]
    fn a_state_from_a_newer_vault_is_kept_and_is_not_final() {
        let flow = authorization_from(wire_authorization(42)).unwrap();
        assert_eq!(flow.state, AuthorizationState::Unknown(42));
        assert!(!flow.state.is_final());
    }

    #[test]
    fn an_unset_authorization_state_or_expiry_is_a_malformed_reply() {
        assert!(matches!(
            authorization_from(wire_authorization(0)),
            Err(Error::Other(_))
        ));
        assert!(matches!(
            authorization_from(proto::Authorization {
                expires_at: None,
                ..wire_authorization(1)
            }),
            Err(Error::Other(_))
        ));
    }

    #[test]
    fn only_ended_flows_are_final() {
        assert!(!AuthorizationState::Pending.is_final());
        assert!(!AuthorizationState::CallbackReceived.is_final());
        for state in [
            AuthorizationState::Completed,
            AuthorizationState::Denied,
            AuthorizationState::Expired,
            AuthorizationState::Failed,
        ] {
            assert!(state.is_final(), "{state:?}");
        }
    }

    #[test]
    fn a_started_flow_needs_its_url_id_and_expiry() {
        let wire = proto::BeginAuthorizationResponse {
            authorization_url: "https://idp.example/authorize?state=s".into(),
            authorization_id: "az-1".into(),
            expires_at: at(1_700_000_600),
        };
        let start = start_from(wire.clone()).unwrap();
        assert_eq!(start.authorization_url, wire.authorization_url);
        assert_eq!(start.authorization_id, "az-1");
        assert_eq!(start.expires_at, unix(1_700_000_600));
        for broken in [
            proto::BeginAuthorizationResponse {
                authorization_url: String::new(),
                ..wire.clone()
            },
            proto::BeginAuthorizationResponse {
                authorization_id: String::new(),
                ..wire.clone()
            },
            proto::BeginAuthorizationResponse {
                expires_at: None,
                ..wire
            },
        ] {
            assert!(start_from(broken).is_err());
        }
    }

    #[test]
    fn a_completed_flow_answers_what_store_token_does_and_the_granted_scopes() {
        let completed = completed_from(proto::CompleteAuthorizationResponse {
            generation: 3,
            ttl_expires_at: at(1_700_086_400),
            scopes: vec!["read".into()],
        })
        .unwrap();
        assert_eq!(
            completed,
            Completed {
                stored: Stored {
                    generation: 3,
                    ttl_expires_at: unix(1_700_086_400),
                },
                scopes: vec!["read".into()],
            }
        );
        assert!(
            completed_from(proto::CompleteAuthorizationResponse {
                ttl_expires_at: None,
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn connection_states_read_from_their_strings_and_unknown_ones_are_kept() {
        for (wire, state) in [
            ("ACTIVE", ConnectionState::Active),
            ("REAUTH_REQUIRED", ConnectionState::ReauthRequired),
            ("EXPIRED", ConnectionState::Expired),
            ("SUSPENDED", ConnectionState::Unknown("SUSPENDED".into())),
        ] {
            let read = ConnectionState::from(wire.to_string());
            assert_eq!(read, state);
            assert_eq!(read.as_str(), wire);
        }
    }

    #[test]
    fn a_credential_converts_with_an_unset_access_expiry_as_none() {
        let wire = proto::CredentialInfo {
            tool: "jira".into(),
            state: "ACTIVE".into(),
            scopes: vec!["read".into(), "write".into()],
            access_expires_at: None,
            ttl_expires_at: at(1_700_086_400),
            generation: 2,
            updated_at: at(1_700_000_000),
            has_refresh_token: true,
        };
        assert_eq!(
            credential_from(wire.clone()).unwrap(),
            CredentialInfo {
                tool: "jira".into(),
                state: ConnectionState::Active,
                scopes: vec!["read".into(), "write".into()],
                access_expires_at: None,
                ttl_expires_at: unix(1_700_086_400),
                generation: 2,
                updated_at: unix(1_700_000_000),
                has_refresh_token: true,
            }
        );
        let expiring = credential_from(proto::CredentialInfo {
            access_expires_at: at(1_700_003_600),
            ..wire.clone()
        })
        .unwrap();
        assert_eq!(expiring.access_expires_at, Some(unix(1_700_003_600)));
        for broken in [
            proto::CredentialInfo {
                ttl_expires_at: None,
                ..wire.clone()
            },
            proto::CredentialInfo {
                updated_at: None,
                ..wire
            },
        ] {
            assert!(credential_from(broken).is_err());
        }
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
