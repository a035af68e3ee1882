//! Root and agent keys: how they are made, wrapped and checked.

use std::fmt;

use argon2::{Algorithm, Argon2, Params, Version};
use secrecy::{ExposeSecret, SecretBox};

use super::{OpenError, associated_data, open, random_bytes, seal};
use crate::ids::{AgentId, IssuerId};

/// Argon2id cost parameters; stored beside the salt so they can be raised without breaking
/// existing installations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// RFC 9106's second recommended option (64 MiB, 3 passes, 4 lanes), at one lane because the
    /// service runs on small machines.
    fn default() -> Self {
        Self {
            m_cost: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

/// The 32-byte root key that wraps every agent key. Redacted and zeroized.
pub struct RootKey(SecretBox<[u8; 32]>);

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RootKey([REDACTED])")
    }
}

const KEY_CHECK_LABEL: &str = "root-key-check";
const KEY_CHECK_PLAINTEXT: &[u8] = b"credential vault root key check";

impl RootKey {
    /// Takes exactly 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(SecretBox::new(Box::new(bytes)))
    }

    /// A fresh random key (for `keygen`).
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        random_bytes(&mut bytes);
        Self::from_bytes(bytes)
    }

    /// Derives the key from a passphrase with Argon2id.
    pub fn from_passphrase(
        passphrase: &[u8],
        salt: &[u8],
        params: KdfParams,
    ) -> Result<Self, argon2::Error> {
        let params = Params::new(params.m_cost, params.t_cost, params.p_cost, Some(32))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let mut out = Box::new([0u8; 32]);
        argon.hash_password_into(passphrase, salt, out.as_mut())?;
        Ok(Self(SecretBox::new(out)))
    }

    /// The raw bytes, for writing a key file.
    pub fn expose_bytes(&self) -> &[u8; 32] {
        self.0.expose_secret()
    }

    /// A key-check value: a seal of a constant that only this key opens. Stored in the control
    /// schema, it lets startup refuse a wrong root key before it touches any credential.
    pub fn key_check(&self) -> Vec<u8> {
        seal(
            self.0.expose_secret(),
            &associated_data(KEY_CHECK_LABEL, &[]),
            KEY_CHECK_PLAINTEXT,
        )
    }

    /// Whether `kcv` was made by [`RootKey::key_check`] with this key.
    pub fn verifies(&self, kcv: &[u8]) -> bool {
        open(
            self.0.expose_secret(),
            &associated_data(KEY_CHECK_LABEL, &[]),
            kcv,
        )
        .is_ok_and(|p| p.as_slice() == KEY_CHECK_PLAINTEXT)
    }

    /// Wraps an agent key, bound to the issuer, the agent and the agent key's version.
    pub fn wrap_agent_key(&self, issuer: &IssuerId, agent: &AgentId, key: &AgentKey) -> Vec<u8> {
        seal(
            self.0.expose_secret(),
            &agent_key_aad(Some(issuer), agent, key.version),
            key.key.expose_secret(),
        )
    }

    /// Opens what [`RootKey::wrap_agent_key`] made for this issuer, agent and version.
    pub fn unwrap_agent_key(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
        version: u32,
        wrapped: &[u8],
    ) -> Result<AgentKey, OpenError> {
        self.unwrap_with(
            &agent_key_aad(Some(issuer), agent, version),
            version,
            wrapped,
        )
    }

    /// Wraps an agent key the way the vault did before identities named their issuer. Only for
    /// tests that build a database as an older version left it.
    #[doc(hidden)]
    pub fn wrap_legacy_agent_key(&self, agent: &AgentId, key: &AgentKey) -> Vec<u8> {
        seal(
            self.0.expose_secret(),
            &agent_key_aad(None, agent, key.version),
            key.key.expose_secret(),
        )
    }

    /// Opens an agent key wrapped before identities named their issuer (bound to the agent and
    /// version only), so that startup can re-wrap it for the issuer that adopts it.
    pub fn unwrap_legacy_agent_key(
        &self,
        agent: &AgentId,
        version: u32,
        wrapped: &[u8],
    ) -> Result<AgentKey, OpenError> {
        self.unwrap_with(&agent_key_aad(None, agent, version), version, wrapped)
    }

    fn unwrap_with(&self, aad: &[u8], version: u32, wrapped: &[u8]) -> Result<AgentKey, OpenError> {
        let bytes = open(self.0.expose_secret(), aad, wrapped)?;
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| OpenError)?;
        Ok(AgentKey {
            key: SecretBox::new(Box::new(key)),
            version,
        })
    }
}

/// The wrap of an agent key names its issuer; keys wrapped before that (`None`) keep the old
/// label until startup re-wraps them.
fn agent_key_aad(issuer: Option<&IssuerId>, agent: &AgentId, version: u32) -> Vec<u8> {
    match issuer {
        Some(issuer) => associated_data(
            "agent-key/2",
            &[
                issuer.as_str().as_bytes(),
                agent.as_str().as_bytes(),
                &version.to_be_bytes(),
            ],
        ),
        None => associated_data(
            "agent-key",
            &[agent.as_str().as_bytes(), &version.to_be_bytes()],
        ),
    }
}

/// One agent's key: wraps the data key of each of that agent's credentials.
pub struct AgentKey {
    pub(super) key: SecretBox<[u8; 32]>,
    /// Bound into every data-key wrap, so rotating the agent key cannot be confused with the old.
    pub version: u32,
}

impl fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentKey(version {}, [REDACTED])", self.version)
    }
}

impl AgentKey {
    /// A fresh random agent key.
    pub fn generate(version: u32) -> Self {
        let mut key = Box::new([0u8; 32]);
        random_bytes(key.as_mut());
        Self {
            key: SecretBox::new(key),
            version,
        }
    }
}

/// How the root key is obtained, once `startup` has read it.
pub enum RootKeySource {
    /// The key itself (`VAULT_ROOT_KEY` or `VAULT_ROOT_KEY_FILE`).
    Key(RootKey),
    /// A passphrase (`VAULT_ROOT_PASSPHRASE`), derived with Argon2id and the salt kept in the
    /// control schema.
    Passphrase(secrecy::SecretString),
}

impl fmt::Debug for RootKeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Key(_) => f.write_str("Key([REDACTED])"),
            Self::Passphrase(_) => f.write_str("Passphrase([REDACTED])"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str) -> AgentId {
        AgentId::parse(id).unwrap()
    }

    fn issuer(iss: &str) -> IssuerId {
        IssuerId::parse(iss).unwrap()
    }

    #[test]
    fn a_key_check_value_verifies_only_its_own_key() {
        let root = RootKey::generate();
        let kcv = root.key_check();
        assert!(root.verifies(&kcv));
        assert!(!RootKey::generate().verifies(&kcv));
    }

    #[test]
    fn an_agent_key_wrapped_for_one_agent_does_not_unwrap_for_another() {
        let root = RootKey::generate();
        let key = AgentKey::generate(1);
        let i = issuer("https://a.example");
        let wrapped = root.wrap_agent_key(&i, &agent("a"), &key);
        assert!(root.unwrap_agent_key(&i, &agent("a"), 1, &wrapped).is_ok());
        assert_eq!(
            root.unwrap_agent_key(&i, &agent("b"), 1, &wrapped)
                .unwrap_err(),
            OpenError
        );
        assert!(root.unwrap_agent_key(&i, &agent("a"), 2, &wrapped).is_err());
    }

    #[test]
    fn an_agent_key_wrapped_under_one_issuer_does_not_unwrap_under_another() {
        let root = RootKey::generate();
        let key = AgentKey::generate(1);
        let wrapped = root.wrap_agent_key(&issuer("https://a.example"), &agent("a"), &key);
        assert!(
            root.unwrap_agent_key(&issuer("https://b.example"), &agent("a"), 1, &wrapped)
                .is_err()
        );
        assert!(
            root.unwrap_legacy_agent_key(&agent("a"), 1, &wrapped)
                .is_err()
        );
    }

    #[test]
    fn a_passphrase_derives_the_same_key_from_the_same_salt_only() {
        let cheap = KdfParams {
            m_cost: 1024,
            t_cost: 1,
            p_cost: 1,
        };
        let a = RootKey::from_passphrase(b"correct horse", b"0123456789abcdef", cheap).unwrap();
        let b = RootKey::from_passphrase(b"correct horse", b"0123456789abcdef", cheap).unwrap();
        let c = RootKey::from_passphrase(b"correct horse", b"fedcba9876543210", cheap).unwrap();
        assert_eq!(a.expose_bytes(), b.expose_bytes());
        assert_ne!(a.expose_bytes(), c.expose_bytes());
        assert!(a.verifies(&b.key_check()));
    }

    #[test]
    fn keys_do_not_show_in_debug_output() {
        let root = RootKey::from_bytes([0xAB; 32]);
        assert_eq!(format!("{root:?}"), "RootKey([REDACTED])");
        assert!(!format!("{:?}", AgentKey::generate(3)).contains("171"));
    }
}
