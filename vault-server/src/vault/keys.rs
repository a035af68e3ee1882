//! Unlocking the root key at startup: checking it against the vault's key check (or the key
//! check of the root a rotation in progress moves to), and opening the control key it wraps.

use secrecy::{ExposeSecret, SecretString};

use crate::crypto::{ControlKey, KdfParams, RootError, RootKey, RootKeySource};
use crate::store::{RootKeyRecord, Store, StoreError};

/// The root key could not be established; `serve` must not start.
#[derive(Debug, thiserror::Error)]
pub enum UnlockError {
    /// The configured key is neither the vault's root key nor the one a rotation in progress
    /// moves to.
    #[error(
        "the root key does not match this vault (key check failed); refusing to start. If the root key was rotated (rotate-root), start with the new one"
    )]
    WrongRootKey,
    /// A key was configured where the vault's root is a passphrase, or the reverse.
    #[error("this vault's root key is a {expected}; configure that kind of root key")]
    WrongKind {
        /// What the vault expects.
        expected: &'static str,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Argon2 refused its parameters.
    #[error("deriving the root key from the passphrase failed: {0}")]
    Kdf(argon2::Error),
    /// The root key's device failed, or the control key does not open under a root key that
    /// passed the key check.
    #[error("the root key cannot be used: {0}")]
    Root(#[from] RootError),
}

/// The root key, checked against the vault, with the control key it wraps.
#[derive(Debug)]
pub struct UnlockedRoot {
    /// The root key.
    pub root: RootKey,
    /// The control key (audit head signatures, registered client secrets).
    pub control: ControlKey,
    /// The stored key check this root verified: agents are registered only while it is the
    /// vault's current one.
    pub key_check: Vec<u8>,
    /// This is the root a rotation in progress moves to, not yet the current one.
    pub pending: bool,
}

/// One root the vault accepts: the current one, or the next during a rotation.
struct Accepted<'a> {
    key_check: &'a [u8],
    kdf: Option<&'a (Vec<u8>, KdfParams)>,
    wrapped_control_key: Option<&'a [u8]>,
    pending: bool,
}

fn accepted(record: &RootKeyRecord) -> Vec<Accepted<'_>> {
    let mut roots = vec![Accepted {
        key_check: &record.key_check,
        kdf: record.kdf.as_ref(),
        wrapped_control_key: record.wrapped_control_key.as_deref(),
        pending: false,
    }];
    if let Some(next) = &record.next {
        roots.push(Accepted {
            key_check: &next.key_check,
            kdf: next.kdf.as_ref(),
            wrapped_control_key: Some(&next.wrapped_control_key),
            pending: true,
        });
    }
    roots
}

/// What a vault's first start records: the key check of `root`, and a new control key wrapped
/// by it.
fn first_record(
    root: &RootKey,
    kdf: Option<(Vec<u8>, KdfParams)>,
) -> Result<RootKeyRecord, RootError> {
    Ok(RootKeyRecord {
        key_check: root.key_check()?,
        kdf,
        wrapped_control_key: Some(root.wrap_control_key(&ControlKey::generate())?),
        next: None,
    })
}

/// Checks the configured root key against the key-check value in the control schema, or
/// records it (with a new control key) when this is the vault's first start. During a root
/// rotation the root it moves to is accepted too (`pending`).
pub async fn unlock_root_key(
    store: &Store,
    source: RootKeySource,
) -> Result<UnlockedRoot, UnlockError> {
    let keys = store.keys.as_ref();
    let record = match keys.root_key().await? {
        Some(record) => record,
        None => {
            let first = match &source {
                RootKeySource::Key(key) => first_record(key, None)?,
                RootKeySource::Passphrase(phrase) => {
                    let mut salt = vec![0u8; 16];
                    crate::crypto::random_bytes(&mut salt);
                    let params = KdfParams::default();
                    first_record(&derive(phrase, &salt, params)?, Some((salt, params)))?
                }
            };
            // Another replica may initialise first: then its record (and control key) wins.
            keys.init_root_key(&first).await?
        }
    };
    let candidates = accepted(&record);
    let mut found = None;
    for candidate in &candidates {
        let derived = match (&source, candidate.kdf) {
            (RootKeySource::Key(_), None) => None,
            (RootKeySource::Passphrase(phrase), Some((salt, params))) => {
                Some(derive(phrase, salt, *params)?)
            }
            // Of the other kind: not this one.
            _ => continue,
        };
        let root = match (&derived, &source) {
            (Some(derived), _) => derived,
            (None, RootKeySource::Key(key)) => key,
            (None, RootKeySource::Passphrase(_)) => continue,
        };
        if !root.verifies(candidate.key_check)? {
            continue;
        }
        let control = match candidate.wrapped_control_key {
            Some(wrapped) => root.unwrap_control_key(wrapped)?,
            // A vault from before the control key, whose root was never rotated (a rotation
            // wraps one): its control key is the root key's bytes.
            None => root.legacy_control_key().ok_or(RootError::DoesNotOpen)?,
        };
        found = Some((
            derived,
            control,
            candidate.key_check.to_vec(),
            candidate.pending,
        ));
        break;
    }
    let Some((derived, control, key_check, pending)) = found else {
        let passphrase = matches!(source, RootKeySource::Passphrase(_));
        return Err(
            if candidates.iter().any(|c| c.kdf.is_some() == passphrase) {
                UnlockError::WrongRootKey
            } else if passphrase {
                UnlockError::WrongKind {
                    expected: "key (VAULT_ROOT_KEY, VAULT_ROOT_KEY_FILE or VAULT_ROOT_PKCS11_*)",
                }
            } else {
                UnlockError::WrongKind {
                    expected: "passphrase (VAULT_ROOT_PASSPHRASE)",
                }
            },
        );
    };
    let root = match (derived, source) {
        (Some(derived), _) => derived,
        (None, RootKeySource::Key(key)) => key,
        // A passphrase candidate always derived a key above.
        (None, RootKeySource::Passphrase(_)) => return Err(UnlockError::WrongRootKey),
    };
    if pending {
        tracing::warn!(
            "started with the root key a rotation in progress moves to: agents not yet re-wrapped under it are unavailable on this replica until rotate-root finishes"
        );
    }
    Ok(UnlockedRoot {
        root,
        control,
        key_check,
        pending,
    })
}

pub(crate) fn derive(
    phrase: &SecretString,
    salt: &[u8],
    params: KdfParams,
) -> Result<RootKey, UnlockError> {
    RootKey::from_passphrase(phrase.expose_secret().as_bytes(), salt, params)
        .map_err(UnlockError::Kdf)
}
