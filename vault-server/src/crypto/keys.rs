//! Root and agent keys: how they are made, wrapped and checked.

use std::fmt;
use std::sync::Arc;

use argon2::{Algorithm, Argon2, Params, Version};
use secrecy::{ExposeSecret, SecretBox};
use zeroize::Zeroizing;

use super::pkcs11::{Pkcs11Error, Pkcs11Root};
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

/// The root key: wraps every agent key and the control key, and nothing else. Its bytes live
/// in this process (a key file, or derived from a passphrase) or never leave an HSM (PKCS#11);
/// either way it only seals and opens with AES-256-GCM, so both behave alike.
pub struct RootKey(Backend);

enum Backend {
    /// 32 bytes in memory, redacted and zeroized.
    Software(SecretBox<[u8; 32]>),
    /// An AES-256 key inside a PKCS#11 token; each seal and open is a call to the token.
    Pkcs11(Arc<Pkcs11Root>),
}

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Backend::Software(_) => f.write_str("RootKey(software, [REDACTED])"),
            Backend::Pkcs11(root) => write!(f, "RootKey({root:?})"),
        }
    }
}

/// The root key could not seal or open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RootError {
    /// The ciphertext does not open under this root key and binding.
    #[error("ciphertext does not open under this root key and binding")]
    DoesNotOpen,
    /// The device holding the root key failed (the HSM, its session, its library).
    #[error("the root key's device failed: {0}")]
    Device(String),
}

impl From<OpenError> for RootError {
    fn from(_: OpenError) -> Self {
        Self::DoesNotOpen
    }
}

impl From<Pkcs11Error> for RootError {
    fn from(error: Pkcs11Error) -> Self {
        match error {
            Pkcs11Error::DoesNotOpen => Self::DoesNotOpen,
            other => Self::Device(other.to_string()),
        }
    }
}

const KEY_CHECK_LABEL: &str = "root-key-check";
const KEY_CHECK_PLAINTEXT: &[u8] = b"credential vault root key check";
const CONTROL_KEY_LABEL: &str = "control-key";

impl RootKey {
    /// Takes exactly 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Backend::Software(SecretBox::new(Box::new(bytes))))
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
        Ok(Self(Backend::Software(SecretBox::new(out))))
    }

    /// The key inside a PKCS#11 token: it never enters this process.
    pub fn from_pkcs11(root: Pkcs11Root) -> Self {
        Self(Backend::Pkcs11(Arc::new(root)))
    }

    /// The raw bytes of a key held in this process (for writing a key file); `None` for a key
    /// that never leaves its device.
    pub fn software_bytes(&self) -> Option<&[u8; 32]> {
        match &self.0 {
            Backend::Software(key) => Some(key.expose_secret()),
            Backend::Pkcs11(_) => None,
        }
    }

    /// What kind of key this is, for messages: `software` or `pkcs11`.
    pub fn kind(&self) -> &'static str {
        match &self.0 {
            Backend::Software(_) => "software",
            Backend::Pkcs11(_) => "pkcs11",
        }
    }

    fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, RootError> {
        match &self.0 {
            Backend::Software(key) => Ok(seal(key.expose_secret(), aad, plaintext)),
            Backend::Pkcs11(root) => {
                device_calls().add(1, &[]);
                Ok(root.seal(aad, plaintext)?)
            }
        }
    }

    fn open(&self, aad: &[u8], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, RootError> {
        match &self.0 {
            Backend::Software(key) => Ok(open(key.expose_secret(), aad, blob)?),
            Backend::Pkcs11(root) => {
                device_calls().add(1, &[]);
                Ok(root.open_sealed(aad, blob)?)
            }
        }
    }

    /// A key-check value: a seal of a constant that only this key opens. Stored in the control
    /// schema, it lets startup refuse a wrong root key before it touches any credential.
    pub fn key_check(&self) -> Result<Vec<u8>, RootError> {
        self.seal(&associated_data(KEY_CHECK_LABEL, &[]), KEY_CHECK_PLAINTEXT)
    }

    /// Whether `kcv` was made by [`RootKey::key_check`] with this key. Only a device failure
    /// is an error; a key check of another key is `Ok(false)`.
    pub fn verifies(&self, kcv: &[u8]) -> Result<bool, RootError> {
        match self.open(&associated_data(KEY_CHECK_LABEL, &[]), kcv) {
            Ok(plaintext) => Ok(plaintext.as_slice() == KEY_CHECK_PLAINTEXT),
            Err(RootError::DoesNotOpen) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Wraps the control key.
    pub fn wrap_control_key(&self, key: &ControlKey) -> Result<Vec<u8>, RootError> {
        self.seal(
            &associated_data(CONTROL_KEY_LABEL, &[]),
            key.0.expose_secret(),
        )
    }

    /// Opens what [`RootKey::wrap_control_key`] made.
    pub fn unwrap_control_key(&self, wrapped: &[u8]) -> Result<ControlKey, RootError> {
        let bytes = self.open(&associated_data(CONTROL_KEY_LABEL, &[]), wrapped)?;
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| RootError::DoesNotOpen)?;
        Ok(ControlKey::from_bytes(key))
    }

    /// The control key of a vault initialised before there was one: the root key's own bytes,
    /// which is what heads were signed and registrations sealed with. Only a key held in this
    /// process has them (such a vault never had another kind).
    pub fn legacy_control_key(&self) -> Option<ControlKey> {
        self.software_bytes()
            .map(|bytes| ControlKey::from_bytes(*bytes))
    }

    /// Wraps an agent key, bound to the issuer, the agent and the agent key's version.
    pub fn wrap_agent_key(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
        key: &AgentKey,
    ) -> Result<Vec<u8>, RootError> {
        self.seal(
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
    ) -> Result<AgentKey, RootError> {
        self.unwrap_with(
            &agent_key_aad(Some(issuer), agent, version),
            version,
            wrapped,
        )
    }

    /// Wraps an agent key the way the vault did before identities named their issuer. Only for
    /// tests that build a database as an older version left it.
    #[doc(hidden)]
    pub fn wrap_legacy_agent_key(
        &self,
        agent: &AgentId,
        key: &AgentKey,
    ) -> Result<Vec<u8>, RootError> {
        self.seal(
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
    ) -> Result<AgentKey, RootError> {
        self.unwrap_with(&agent_key_aad(None, agent, version), version, wrapped)
    }

    fn unwrap_with(&self, aad: &[u8], version: u32, wrapped: &[u8]) -> Result<AgentKey, RootError> {
        let bytes = self.open(aad, wrapped)?;
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| RootError::DoesNotOpen)?;
        Ok(AgentKey {
            key: SecretBox::new(Box::new(key)),
            version,
        })
    }
}

/// `vault.root_key.device_calls`: every seal and open sent to the root key's device. Unwrapped
/// agent keys are cached, so after warm-up it stays flat; a climbing count means the cache is
/// missing and each miss is a round trip to the HSM. Built per call: calls are rare, and the
/// meter provider is installed after the root key is opened.
fn device_calls() -> opentelemetry::metrics::Counter<u64> {
    opentelemetry::global::meter(crate::telemetry::SCOPE)
        .u64_counter("vault.root_key.device_calls")
        .with_description("seal and open calls sent to the root key's PKCS#11 token")
        .build()
}

/// The control key: 32 random bytes, wrapped by the root key and kept beside its key check,
/// for what the vault protects under no agent: the audit head signatures (HMAC) and dynamically
/// registered client secrets. Rotating the root re-wraps it; nothing sealed under it changes.
pub struct ControlKey(SecretBox<[u8; 32]>);

impl fmt::Debug for ControlKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ControlKey([REDACTED])")
    }
}

impl ControlKey {
    /// Takes exactly 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(SecretBox::new(Box::new(bytes)))
    }

    /// A fresh random key, for a vault's first start.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        random_bytes(&mut bytes);
        Self::from_bytes(bytes)
    }

    /// The key bytes, for the HMAC and AES-GCM that use it.
    pub(crate) fn expose_bytes(&self) -> &[u8; 32] {
        self.0.expose_secret()
    }

    /// A copy, for a component that keeps its own.
    pub fn duplicate(&self) -> Self {
        Self::from_bytes(*self.0.expose_secret())
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
        let kcv = root.key_check().unwrap();
        assert_eq!(root.verifies(&kcv), Ok(true));
        assert_eq!(RootKey::generate().verifies(&kcv), Ok(false));
    }

    #[test]
    fn an_agent_key_wrapped_for_one_agent_does_not_unwrap_for_another() {
        let root = RootKey::generate();
        let key = AgentKey::generate(1);
        let i = issuer("https://a.example");
        let wrapped = root.wrap_agent_key(&i, &agent("a"), &key).unwrap();
        assert!(root.unwrap_agent_key(&i, &agent("a"), 1, &wrapped).is_ok());
        assert_eq!(
            root.unwrap_agent_key(&i, &agent("b"), 1, &wrapped)
                .unwrap_err(),
            RootError::DoesNotOpen
        );
        assert!(root.unwrap_agent_key(&i, &agent("a"), 2, &wrapped).is_err());
    }

    #[test]
    fn an_agent_key_wrapped_under_one_issuer_does_not_unwrap_under_another() {
        let root = RootKey::generate();
        let key = AgentKey::generate(1);
        let wrapped = root
            .wrap_agent_key(&issuer("https://a.example"), &agent("a"), &key)
            .unwrap();
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
        assert_eq!(a.software_bytes(), b.software_bytes());
        assert_ne!(a.software_bytes(), c.software_bytes());
        assert_eq!(a.verifies(&b.key_check().unwrap()), Ok(true));
    }

    #[test]
    fn the_control_key_opens_only_under_the_root_that_wrapped_it() {
        let root = RootKey::generate();
        let control = ControlKey::generate();
        let wrapped = root.wrap_control_key(&control).unwrap();
        let opened = root.unwrap_control_key(&wrapped).unwrap();
        assert_eq!(opened.expose_bytes(), control.expose_bytes());
        assert_eq!(
            RootKey::generate()
                .unwrap_control_key(&wrapped)
                .unwrap_err(),
            RootError::DoesNotOpen
        );
        // Not interchangeable with an agent key's wrap, nor with the key check.
        let i = issuer("https://a.example");
        assert!(root.unwrap_agent_key(&i, &agent("a"), 1, &wrapped).is_err());
        assert_eq!(root.verifies(&wrapped), Ok(false));
    }

    #[test]
    fn keys_do_not_show_in_debug_output() {
        let root = RootKey::from_bytes([0xAB; 32]);
        assert_eq!(format!("{root:?}"), "RootKey(software, [REDACTED])");
        assert!(!format!("{:?}", ControlKey::from_bytes([0xAB; 32])).contains("171"));
        assert!(!format!("{:?}", AgentKey::generate(3)).contains("171"));
    }
}
