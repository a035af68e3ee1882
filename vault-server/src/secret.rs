//! Secret values: the OAuth token set as the vault holds it, and raw key bytes. Both redact
//! `Debug` and zeroize on drop (through `secrecy`), so a secret cannot reach a log by accident.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

/// The whole OAuth2 token set of one credential. It is what the envelope seals; it is only ever
/// in memory in clear while a request uses it.
#[derive(Debug, Clone)]
pub struct TokenSet {
    /// The bearer token handed to callers.
    pub access_token: SecretString,
    /// Never leaves the vault.
    pub refresh_token: Option<SecretString>,
    /// `Bearer` unless the provider said otherwise.
    pub token_type: String,
    /// Unix seconds when the access token expires, if the provider said.
    pub expires_at: Option<i64>,
    /// Scopes granted.
    pub scopes: Vec<String>,
    /// The authorization server the credential was stored for ([`crate::oauth::Provider::binding`]):
    /// its refresh token is only ever sent there, even if the tool's configuration changes.
    /// `None` for credentials stored before this was recorded, or while no provider was
    /// configured for the tool; the first refresh binds them.
    pub provider: Option<String>,
    /// Unix seconds when the vault received this access token (StoreToken or refresh); the
    /// refresh cooldown counts from here. `None` for credentials stored before it was recorded.
    pub obtained_at: Option<i64>,
}

/// The serialized form; borrowed, so the clear text exists once, inside a zeroizing buffer.
#[derive(Serialize)]
struct SealedForm<'a> {
    v: u8,
    at: &'a str,
    rt: Option<&'a str>,
    tt: &'a str,
    exp: Option<i64>,
    sc: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    pv: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ob: Option<i64>,
}

#[derive(Deserialize)]
struct OpenedForm {
    v: u8,
    at: String,
    rt: Option<String>,
    tt: String,
    exp: Option<i64>,
    sc: Vec<String>,
    #[serde(default)]
    pv: Option<String>,
    #[serde(default)]
    ob: Option<i64>,
}

/// A token set could not be decoded from its opened plaintext.
#[derive(Debug, thiserror::Error)]
#[error("sealed token set is malformed")]
pub struct MalformedTokenSet;

impl TokenSet {
    /// The plaintext the envelope seals.
    pub fn to_plaintext(&self) -> Zeroizing<Vec<u8>> {
        let form = SealedForm {
            v: 1,
            at: self.access_token.expose_secret(),
            rt: self.refresh_token.as_ref().map(|t| t.expose_secret()),
            tt: &self.token_type,
            exp: self.expires_at,
            sc: &self.scopes,
            pv: self.provider.as_deref(),
            ob: self.obtained_at,
        };
        // Serializing a struct of strings and integers to a Vec cannot fail.
        Zeroizing::new(serde_json::to_vec(&form).expect("token set serializes"))
    }

    /// Decodes what [`TokenSet::to_plaintext`] produced.
    pub fn from_plaintext(plaintext: &[u8]) -> Result<Self, MalformedTokenSet> {
        let mut form: OpenedForm =
            serde_json::from_slice(plaintext).map_err(|_| MalformedTokenSet)?;
        if form.v != 1 {
            form.at.zeroize();
            if let Some(rt) = form.rt.as_mut() {
                rt.zeroize();
            }
            return Err(MalformedTokenSet);
        }
        Ok(Self {
            access_token: SecretString::from(form.at),
            refresh_token: form.rt.map(SecretString::from),
            token_type: form.tt,
            expires_at: form.exp,
            scopes: form.sc,
            provider: form.pv,
            obtained_at: form.ob,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_tokens() {
        let set = TokenSet {
            access_token: SecretString::from("at-very-secret"),
            refresh_token: Some(SecretString::from("rt-very-secret")),
            token_type: "Bearer".into(),
            expires_at: Some(1),
            scopes: vec!["read".into()],
            provider: None,
            obtained_at: None,
        };
        let shown = format!("{set:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
    }

    #[test]
    fn a_token_set_survives_the_plaintext_round_trip() {
        let set = TokenSet {
            access_token: SecretString::from("at"),
            refresh_token: None,
            token_type: "Bearer".into(),
            expires_at: None,
            scopes: vec![],
            provider: Some("https://as.example".into()),
            obtained_at: Some(1_700_000_000),
        };
        let back = TokenSet::from_plaintext(&set.to_plaintext()).unwrap();
        assert_eq!(back.access_token.expose_secret(), "at");
        assert!(back.refresh_token.is_none());
        assert_eq!(back.provider.as_deref(), Some("https://as.example"));
        assert_eq!(back.obtained_at, Some(1_700_000_000));
    }
}
