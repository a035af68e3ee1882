//! Envelope encryption (DESIGN §5): root key → agent key → data key → sealed token set, and the
//! keyring that holds the unwrapped agent keys.
//!
//! Every layer is AES-256-GCM with a random 96-bit nonce, and every seal binds associated data
//! naming exactly where the ciphertext belongs, so a ciphertext moved to another row, agent,
//! generation or key version fails to open instead of decrypting into the wrong place.

mod envelope;
mod flow;
mod keyring;
mod keys;
mod pkcs11;
mod registration;

pub use envelope::{Binding, SealedCredential, open_credential, seal_credential};
pub use flow::{FlowBinding, FlowSecret, flow_secret_version, open_flow_secret, seal_flow_secret};
pub use keyring::{Keyring, Unlocked};
pub use keys::{AgentKey, ControlKey, KdfParams, RootError, RootKey, RootKeySource};
pub use pkcs11::{Pkcs11Error, Pkcs11Root, Pkcs11Settings};
pub use registration::{open_client_secret, seal_client_secret};

/// A seal did not open: wrong key, wrong binding, or tampered bytes. Deliberately says no more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("ciphertext does not open under this key and binding")]
pub struct OpenError;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

const NONCE_LEN: usize = 12;

/// Fills `buf` from the operating system's CSPRNG.
pub(crate) fn random_bytes(buf: &mut [u8]) {
    // The OS RNG failing means the machine cannot do cryptography at all; continuing would be
    // worse than stopping.
    getrandom::fill(buf).expect("operating system random number generator failed");
}

/// Associated data: a domain label and length-prefixed fields, so no two different field lists
/// encode to the same bytes.
pub(crate) fn associated_data(label: &str, fields: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + fields.iter().map(|f| f.len() + 4).sum::<usize>());
    out.extend_from_slice(b"vault.v1/");
    out.extend_from_slice(label.as_bytes());
    for field in fields {
        out.extend_from_slice(&(field.len() as u32).to_be_bytes());
        out.extend_from_slice(field);
    }
    out
}

/// `nonce || ciphertext || tag`.
pub(crate) fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.into());
    let mut nonce = [0u8; NONCE_LEN];
    random_bytes(&mut nonce);
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        // AES-GCM encryption fails only for plaintexts over 64 GiB.
        .expect("AES-GCM seal of a bounded plaintext");
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

pub(crate) fn open(
    key: &[u8; 32],
    aad: &[u8],
    blob: &[u8],
) -> Result<Zeroizing<Vec<u8>>, OpenError> {
    if blob.len() < NONCE_LEN + 16 {
        return Err(OpenError);
    }
    let (nonce, sealed) = blob.split_at(NONCE_LEN);
    let cipher = Aes256Gcm::new(key.into());
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
        .map(Zeroizing::new)
        .map_err(|_| OpenError)
}
