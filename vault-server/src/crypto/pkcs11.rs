//! A root key held in a PKCS#11 token (an HSM, or SoftHSM2 in tests): it seals and opens with
//! AES-256-GCM inside the token, so the key's bytes never enter this process.
//!
//! The sealed layout is the software root's (`nonce(12) || ciphertext || tag(16)`, see
//! [`super::seal`]); the nonce is drawn in this process from the operating system's RNG and
//! handed to the token, because tokens differ in whether and how they generate GCM IVs.
//!
//! PKCS#11 state that belongs to the process, not to a session, lives in one registry here:
//! a library is initialised once per process, and a user login belongs to the application (every
//! session on the token shares it), so a second root over the same token must neither
//! initialise the library again nor be let in on the strength of the first root's login.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{NONCE_LEN, random_bytes};

/// GCM tag length in bytes; the software seal uses the same.
const TAG_LEN: usize = 16;
/// The root is AES-256 and nothing weaker.
const KEY_LEN: usize = 32;

/// Sealed by [`Pkcs11Root::open`] as a self-test, and opened again whenever the token rejects a
/// blob with an unspecific error, to tell a blob that does not authenticate from a device that
/// does not work (see [`Pkcs11Root::open_sealed`]). Neither value is secret.
const CANARY_AAD: &[u8] = b"vault.v1/pkcs11-root-self-test";
const CANARY_PLAINTEXT: &[u8] = b"pkcs11 root key self-test";

/// Where the root key lives in a PKCS#11 token.
pub struct Pkcs11Settings {
    /// The PKCS#11 module (shared library) to load (`VAULT_ROOT_PKCS11_MODULE`).
    pub module: PathBuf,
    /// The label of the token holding the key (`VAULT_ROOT_PKCS11_TOKEN_LABEL`).
    pub token_label: String,
    /// The label of the AES-256 key inside the token (`VAULT_ROOT_PKCS11_KEY_LABEL`).
    pub key_label: String,
    /// The token's user PIN (`VAULT_ROOT_PKCS11_PIN` or `VAULT_ROOT_PKCS11_PIN_FILE`).
    pub pin: SecretString,
}

impl fmt::Debug for Pkcs11Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Settings")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("key_label", &self.key_label)
            .field("pin", &"[REDACTED]")
            .finish()
    }
}

/// Why a PKCS#11 root could not be opened, generated, or used. Each message is one line and
/// names the setting at fault; none contains the PIN or any plaintext.
#[derive(Debug, thiserror::Error)]
pub enum Pkcs11Error {
    /// The module could not be loaded or initialised.
    #[error("VAULT_ROOT_PKCS11_MODULE: cannot load {}: {reason}", path.display())]
    Module {
        /// The module as configured.
        path: PathBuf,
        /// What the loader or `C_Initialize` said.
        reason: String,
    },
    /// A label setting is empty.
    #[error("{setting}: must not be empty")]
    EmptySetting {
        /// The setting's environment variable.
        setting: &'static str,
    },
    /// No initialised token carries the label.
    #[error("VAULT_ROOT_PKCS11_TOKEN_LABEL: no token labelled {label:?} (tokens: {available})")]
    NoToken {
        /// The label looked for.
        label: String,
        /// The labels of the tokens there are, comma-separated, or `none`.
        available: String,
    },
    /// More than one token carries the label, so which one holds the root is ambiguous.
    #[error("VAULT_ROOT_PKCS11_TOKEN_LABEL: {count} tokens are labelled {label:?}")]
    AmbiguousToken {
        /// The label looked for.
        label: String,
        /// How many tokens carry it.
        count: usize,
    },
    /// The token does not offer a mechanism the root needs.
    #[error("VAULT_ROOT_PKCS11_TOKEN_LABEL: token {label:?} does not support {mechanism}")]
    Unsupported {
        /// The token's label.
        label: String,
        /// The missing mechanism, e.g. `CKM_AES_GCM`.
        mechanism: String,
    },
    /// The token refused the user PIN.
    #[error("VAULT_ROOT_PKCS11_PIN: the token refused the PIN")]
    PinRefused,
    /// The token will not take any user PIN now (locked, expired, never set).
    #[error("VAULT_ROOT_PKCS11_PIN: the token {0}")]
    PinUnusable(&'static str),
    /// No AES key carries the label in the token.
    #[error("VAULT_ROOT_PKCS11_KEY_LABEL: no AES key labelled {key:?} in token {token:?}")]
    NoKey {
        /// The key label looked for.
        key: String,
        /// The token searched.
        token: String,
    },
    /// More than one AES key carries the label.
    #[error(
        "VAULT_ROOT_PKCS11_KEY_LABEL: {count} AES keys are labelled {key:?} in token {token:?}"
    )]
    AmbiguousKey {
        /// The key label looked for.
        key: String,
        /// The token searched.
        token: String,
        /// How many keys carry it.
        count: usize,
    },
    /// The key is AES, but not AES-256.
    #[error(
        "VAULT_ROOT_PKCS11_KEY_LABEL: the key labelled {key:?} in token {token:?} is AES-{bits}; the root must be AES-256"
    )]
    WeakKey {
        /// The key label.
        key: String,
        /// The token holding it.
        token: String,
        /// The key's length in bits.
        bits: usize,
    },
    /// `keygen --pkcs11` found a key with the label already and did not make another.
    #[error(
        "VAULT_ROOT_PKCS11_KEY_LABEL: a key labelled {key:?} exists already in token {token:?}"
    )]
    KeyExists {
        /// The key label asked for.
        key: String,
        /// The token searched.
        token: String,
    },
    /// The blob does not open under this key and associated data: wrong key, wrong aad,
    /// tampered, or too short. Deliberately says no more.
    #[error("ciphertext does not open under the token's root key and binding")]
    DoesNotOpen,
    /// The token, its session or its library failed.
    #[error("PKCS#11 device: {0}")]
    Device(String),
}

impl Pkcs11Error {
    /// The setting to look at: the one each message begins with.
    pub fn setting(&self) -> &'static str {
        match self {
            Self::EmptySetting { setting } => setting,
            Self::NoToken { .. } | Self::AmbiguousToken { .. } | Self::Unsupported { .. } => {
                "VAULT_ROOT_PKCS11_TOKEN_LABEL"
            }
            Self::PinRefused | Self::PinUnusable(_) => "VAULT_ROOT_PKCS11_PIN",
            Self::NoKey { .. }
            | Self::AmbiguousKey { .. }
            | Self::WeakKey { .. }
            | Self::KeyExists { .. } => "VAULT_ROOT_PKCS11_KEY_LABEL",
            Self::Module { .. } | Self::DoesNotOpen | Self::Device(_) => "VAULT_ROOT_PKCS11_MODULE",
        }
    }
}

/// The root key inside a token: wraps and unwraps with AES-256-GCM inside the token; the key
/// never enters the process.
///
/// One session serves every caller, behind a mutex: a PKCS#11 session runs one operation at a
/// time, and the root is used when an agent key is unwrapped, not per request. Calls block the
/// calling thread for the token's round trip. A session the token has lost (the HSM restarted,
/// the login was dropped) is replaced, logged in again, and the call retried once.
pub struct Pkcs11Root {
    live: Mutex<Live>,
    module: Module,
    slot: Slot,
    /// Kept for logging in again on a new session; redacted and zeroized.
    pin: SecretString,
    /// Sealed at open by this key; see [`CANARY_AAD`].
    canary: Vec<u8>,
    operations: AtomicU64,
    token_label: String,
    key_label: String,
}

impl fmt::Debug for Pkcs11Root {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Root")
            .field("token_label", &self.token_label)
            .field("key_label", &self.key_label)
            .field("operations", &self.operations())
            .finish_non_exhaustive()
    }
}

/// The session in use and the key's handle in it.
struct Live {
    session: Session,
    key: ObjectHandle,
}

/// The token answered as if the session, its login or its objects were gone: a new session may
/// work where this one cannot.
fn session_lost(error: &CkError) -> bool {
    matches!(
        error,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::UserNotLoggedIn
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid,
            _
        )
    )
}

/// A read-only session on `slot`, logged in, and the key's handle in it.
fn connect(
    module: &Module,
    slot: Slot,
    pin: &SecretString,
    labels: &Pkcs11Settings,
) -> Result<Live, Pkcs11Error> {
    let session = module
        .pkcs11
        .open_ro_session(slot)
        .map_err(|e| device("opening a session", e))?;
    login(module, slot, &session, pin)?;
    let key = find_key(&session, labels)?;
    Ok(Live { session, key })
}

impl Pkcs11Root {
    /// Loads the module, finds the token by label, logs in as user with the PIN, finds the AES
    /// secret key by label (exactly one), and checks that it seals and opens.
    pub fn open(settings: &Pkcs11Settings) -> Result<Self, Pkcs11Error> {
        check_labels(settings)?;
        let module = load(&settings.module)?;
        let slot = find_token(&module.pkcs11, &settings.token_label)?;
        require_mechanism(
            &module.pkcs11,
            slot,
            &settings.token_label,
            MechanismType::AES_GCM,
        )?;
        let live = connect(&module, slot, &settings.pin, settings)?;

        // Fails now, at start-up, rather than at the first unwrap: a key without CKA_ENCRYPT or
        // CKA_DECRYPT, or a token whose GCM does not round-trip.
        let canary = gcm_seal(&live.session, live.key, CANARY_AAD, CANARY_PLAINTEXT)
            .map_err(|e| device("self-test seal", e))
            .and_then(|sealed| sealed_length(sealed, CANARY_PLAINTEXT.len()))?;
        match gcm_open(&live.session, live.key, CANARY_AAD, &canary) {
            Ok(plaintext) if plaintext.as_slice() == CANARY_PLAINTEXT => {}
            Ok(_) => {
                return Err(Pkcs11Error::Device(
                    "self-test: the key opened its own seal into other bytes".into(),
                ));
            }
            Err(e) => return Err(device("self-test open", e)),
        }

        tracing::info!(
            token = %settings.token_label,
            key = %settings.key_label,
            "opened the PKCS#11 root key"
        );
        Ok(Self {
            live: Mutex::new(live),
            module,
            slot,
            pin: settings.pin.clone(),
            canary,
            operations: AtomicU64::new(0),
            token_label: settings.token_label.clone(),
            key_label: settings.key_label.clone(),
        })
    }

    /// `keygen --pkcs11`: generates a new AES-256 key in the token with CKA_TOKEN=true,
    /// CKA_SENSITIVE=true, CKA_EXTRACTABLE=false, CKA_ENCRYPT/DECRYPT=true and the label; refuses
    /// if a key with that label exists already. Returns the opened root.
    ///
    /// PKCS#11 has no unique labels: two `keygen`s racing on one token can both pass the check.
    /// [`Pkcs11Root::open`] then refuses the label as ambiguous rather than pick one.
    pub fn generate(settings: &Pkcs11Settings) -> Result<Self, Pkcs11Error> {
        check_labels(settings)?;
        let module = load(&settings.module)?;
        let slot = find_token(&module.pkcs11, &settings.token_label)?;
        for mechanism in [MechanismType::AES_KEY_GEN, MechanismType::AES_GCM] {
            require_mechanism(&module.pkcs11, slot, &settings.token_label, mechanism)?;
        }
        {
            let session = module
                .pkcs11
                .open_rw_session(slot)
                .map_err(|e| device("opening a read-write session", e))?;
            login(&module, slot, &session, &settings.pin)?;

            let label = settings.key_label.as_bytes().to_vec();
            let existing = session
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Label(label.clone()),
                ])
                .map_err(|e| device("looking for the key label", e))?;
            if !existing.is_empty() {
                return Err(Pkcs11Error::KeyExists {
                    key: settings.key_label.clone(),
                    token: settings.token_label.clone(),
                });
            }
            session
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen((KEY_LEN as u64).into()),
                        Attribute::Label(label),
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                        Attribute::Wrap(false),
                        Attribute::Unwrap(false),
                        Attribute::Derive(false),
                    ],
                )
                .map_err(|e| device("generating the key", e))?;
            tracing::info!(
                token = %settings.token_label,
                key = %settings.key_label,
                "generated a PKCS#11 root key"
            );
            // The read-write session closes here: serving needs only a read-only one.
        }
        Self::open(settings)
    }

    /// AES-256-GCM inside the token (CKM_AES_GCM) with a random 12-byte IV generated in the
    /// process, a 128-bit tag and `aad` as additional authenticated data. Returns
    /// `nonce(12) || ciphertext || tag(16)`, the layout of the software seal.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, Pkcs11Error> {
        let mut live = self.live();
        self.operations.fetch_add(1, Ordering::Relaxed);
        self.attempt(&mut live, |live| {
            gcm_seal(&live.session, live.key, aad, plaintext)
        })
        .map_err(|e| device("seal: C_Encrypt", e))
        .and_then(|sealed| sealed_length(sealed, plaintext.len()))
    }

    /// Opens what [`Pkcs11Root::seal`] made. A blob that does not authenticate (wrong key, wrong
    /// aad, tampered, too short) is [`Pkcs11Error::DoesNotOpen`]; a device or session failure
    /// is [`Pkcs11Error::Device`].
    pub fn open_sealed(&self, aad: &[u8], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, Pkcs11Error> {
        if blob.len() < NONCE_LEN + TAG_LEN {
            return Err(Pkcs11Error::DoesNotOpen);
        }
        let mut live = self.live();
        self.operations.fetch_add(1, Ordering::Relaxed);
        let error = match self.attempt(&mut live, |live| {
            gcm_open(&live.session, live.key, aad, blob)
        }) {
            Ok(plaintext) if plaintext.len() + NONCE_LEN + TAG_LEN == blob.len() => {
                return Ok(plaintext);
            }
            Ok(plaintext) => {
                return Err(Pkcs11Error::Device(format!(
                    "open: C_Decrypt returned {} bytes for a {}-byte blob",
                    plaintext.len(),
                    blob.len()
                )));
            }
            Err(error) => error,
        };
        match error {
            CkError::Pkcs11(RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange, _) => {
                Err(Pkcs11Error::DoesNotOpen)
            }
            // SoftHSM2 (2.6) answers a GCM tag mismatch with CKR_GENERAL_ERROR, which a failing
            // device also returns. Opening the self-test blob tells them apart: if the token
            // still opens that, it is working and this blob does not authenticate.
            CkError::Pkcs11(RvError::GeneralError | RvError::FunctionFailed, _) => {
                match gcm_open(&live.session, live.key, CANARY_AAD, &self.canary) {
                    Ok(canary) if canary.as_slice() == CANARY_PLAINTEXT => {
                        Err(Pkcs11Error::DoesNotOpen)
                    }
                    _ => Err(device("open", error)),
                }
            }
            other => Err(device("open", other)),
        }
    }

    /// How many seal and open calls this root has sent to the token since it was opened (one
    /// per call, whatever it took inside; blobs rejected in the process are not counted).
    pub fn operations(&self) -> u64 {
        self.operations.load(Ordering::Relaxed)
    }

    fn live(&self) -> MutexGuard<'_, Live> {
        // Every operation is a single `C_*Init` + `C_Encrypt`/`C_Decrypt` pair that finishes or
        // fails as a whole, so a panic elsewhere while the lock was held leaves the session
        // usable.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `op` on the live session; if the token has lost that session, replaces it with a
    /// new one (logged in again) and runs `op` once more.
    fn attempt<T>(
        &self,
        live: &mut Live,
        op: impl Fn(&Live) -> Result<T, CkError>,
    ) -> Result<T, CkError> {
        match op(live) {
            Err(error) if session_lost(&error) => {
                let labels = Pkcs11Settings {
                    module: self.module.path.clone(),
                    token_label: self.token_label.clone(),
                    key_label: self.key_label.clone(),
                    pin: self.pin.clone(),
                };
                match connect(&self.module, self.slot, &self.pin, &labels) {
                    Ok(fresh) => {
                        tracing::warn!(
                            token = %self.token_label,
                            lost = ?error,
                            "the PKCS#11 session was lost; opened and logged in to a new one"
                        );
                        *live = fresh;
                        op(live)
                    }
                    Err(reconnect) => {
                        tracing::error!(
                            token = %self.token_label,
                            error = %reconnect,
                            "the PKCS#11 session was lost and a new one cannot be opened"
                        );
                        Err(error)
                    }
                }
            }
            other => other,
        }
    }
}

/// AES-256-GCM seal in the token: `nonce || ciphertext || tag` (its length checked by
/// [`sealed_length`]).
fn gcm_seal(
    session: &Session,
    key: ObjectHandle,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CkError> {
    let mut iv = [0u8; NONCE_LEN];
    random_bytes(&mut iv);
    let params = GcmParams::new(&mut iv, aad, ((TAG_LEN * 8) as u64).into())?;
    let sealed = session.encrypt(&Mechanism::AesGcm(params), key, plaintext)?;
    // Read after the call: the IV buffer is the one the token saw (a token may write to it).
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&iv);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// A seal of `plaintext_len` bytes is the nonce, as many bytes of ciphertext and the tag.
fn sealed_length(sealed: Vec<u8>, plaintext_len: usize) -> Result<Vec<u8>, Pkcs11Error> {
    if sealed.len() == NONCE_LEN + plaintext_len + TAG_LEN {
        Ok(sealed)
    } else {
        Err(Pkcs11Error::Device(format!(
            "C_Encrypt returned {} bytes for a {plaintext_len}-byte plaintext; expected ciphertext and a {TAG_LEN}-byte tag",
            sealed.len() - NONCE_LEN
        )))
    }
}

/// AES-256-GCM open in the token of a blob at least `NONCE_LEN + TAG_LEN` long.
fn gcm_open(
    session: &Session,
    key: ObjectHandle,
    aad: &[u8],
    blob: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CkError> {
    let (nonce, sealed) = blob.split_at(NONCE_LEN);
    let mut iv = [0u8; NONCE_LEN];
    iv.copy_from_slice(nonce);
    let params = GcmParams::new(&mut iv, aad, ((TAG_LEN * 8) as u64).into())?;
    // Wrapped at once: the buffer is sized once by cryptoki and only truncated, so wiping it
    // (over its whole capacity) wipes every copy of the plaintext this process holds.
    session
        .decrypt(&Mechanism::AesGcm(params), key, sealed)
        .map(Zeroizing::new)
}

fn check_labels(settings: &Pkcs11Settings) -> Result<(), Pkcs11Error> {
    if settings.token_label.is_empty() {
        return Err(Pkcs11Error::EmptySetting {
            setting: "VAULT_ROOT_PKCS11_TOKEN_LABEL",
        });
    }
    if settings.key_label.is_empty() {
        return Err(Pkcs11Error::EmptySetting {
            setting: "VAULT_ROOT_PKCS11_KEY_LABEL",
        });
    }
    Ok(())
}

/// A device error, one line: `context: C_Function: RvError` for a PKCS#11 return value.
fn device(context: &str, error: CkError) -> Pkcs11Error {
    match error {
        CkError::Pkcs11(rv, function) => {
            Pkcs11Error::Device(format!("{context}: C_{function:?}: {rv:?}"))
        }
        other => Pkcs11Error::Device(format!("{context}: {other}")),
    }
}

/// The process-wide PKCS#11 state.
struct Registry {
    /// One initialised library per module, by canonical path, never finalised: `C_Initialize`
    /// may run once per process, and unloading a library that other roots' sessions use would
    /// pull it from under them.
    modules: HashMap<PathBuf, Pkcs11>,
    /// Per (module, slot): a salted digest of the PIN that logged the user in. Login state is
    /// the application's, so a second `C_Login` answers `CKR_USER_ALREADY_LOGGED_IN` without
    /// looking at its PIN; this is what checks that PIN instead.
    logins: HashMap<(PathBuf, u64), [u8; 32]>,
    /// Random per process, so the digests above are worthless outside it.
    salt: [u8; 32],
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| {
    let mut salt = [0u8; 32];
    random_bytes(&mut salt);
    Mutex::new(Registry {
        modules: HashMap::new(),
        logins: HashMap::new(),
        salt,
    })
});

fn registry() -> MutexGuard<'static, Registry> {
    // Every update to the registry is a single insert, so a panic while it was held cannot
    // leave it half-written.
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A loaded, initialised module.
struct Module {
    /// The registry's key for it.
    path: PathBuf,
    pkcs11: Pkcs11,
}

fn load(path: &Path) -> Result<Module, Pkcs11Error> {
    let fail = |reason: String| Pkcs11Error::Module {
        path: path.to_owned(),
        reason,
    };
    let canonical = path.canonicalize().map_err(|e| fail(e.to_string()))?;
    let mut registry = registry();
    let pkcs11 = match registry.modules.entry(canonical.clone()) {
        Entry::Occupied(entry) => entry.get().clone(),
        Entry::Vacant(entry) => {
            let pkcs11 = Pkcs11::new(&canonical).map_err(|e| match e {
                CkError::LibraryLoading(e) => fail(e.to_string()),
                other => fail(other.to_string()),
            })?;
            match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
                // Something else in the process initialised it (the same library under
                // another handle); it is ready for use all the same.
                Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
                Err(CkError::Pkcs11(rv, _)) => return Err(fail(format!("C_Initialize: {rv:?}"))),
                Err(other) => return Err(fail(format!("C_Initialize: {other}"))),
            }
            entry.insert(pkcs11).clone()
        }
    };
    Ok(Module {
        path: canonical,
        pkcs11,
    })
}

fn find_token(pkcs11: &Pkcs11, label: &str) -> Result<Slot, Pkcs11Error> {
    let slots = pkcs11
        .get_slots_with_initialized_token()
        .map_err(|e| device("listing tokens", e))?;
    let mut labels = Vec::with_capacity(slots.len());
    let mut matching = Vec::new();
    for slot in slots {
        let info = pkcs11
            .get_token_info(slot)
            .map_err(|e| device("reading token information", e))?;
        if info.label() == label {
            matching.push(slot);
        }
        labels.push(info.label().to_owned());
    }
    match matching.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(Pkcs11Error::NoToken {
            label: label.to_owned(),
            available: if labels.is_empty() {
                "none".to_owned()
            } else {
                labels.join(", ")
            },
        }),
        many => Err(Pkcs11Error::AmbiguousToken {
            label: label.to_owned(),
            count: many.len(),
        }),
    }
}

fn require_mechanism(
    pkcs11: &Pkcs11,
    slot: Slot,
    token_label: &str,
    mechanism: MechanismType,
) -> Result<(), Pkcs11Error> {
    let offered = pkcs11
        .get_mechanism_list(slot)
        .map_err(|e| device("listing mechanisms", e))?;
    if offered.contains(&mechanism) {
        Ok(())
    } else {
        Err(Pkcs11Error::Unsupported {
            label: token_label.to_owned(),
            mechanism: mechanism.to_string(),
        })
    }
}

fn pin_digest(salt: &[u8; 32], slot: Slot, pin: &SecretString) -> [u8; 32] {
    Sha256::new()
        .chain_update(salt)
        .chain_update(slot.id().to_be_bytes())
        .chain_update(pin.expose_secret().as_bytes())
        .finalize()
        .into()
}

/// Logs the user in, or checks the PIN against the login that this process already holds on
/// the token (see [`Registry::logins`]).
fn login(
    module: &Module,
    slot: Slot,
    session: &Session,
    pin: &SecretString,
) -> Result<(), Pkcs11Error> {
    // Held across C_Login so two roots logging in to one token agree on who logged in.
    let mut registry = registry();
    let digest = pin_digest(&registry.salt, slot, pin);
    let at = (module.path.clone(), slot.id());
    match session.login(UserType::User, Some(pin)) {
        Ok(()) => {
            registry.logins.insert(at, digest);
            Ok(())
        }
        Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => match registry.logins.get(&at) {
            // Comparing digests under a random per-process salt: how long the comparison
            // takes says nothing useful about the PIN.
            Some(known) if *known == digest => Ok(()),
            Some(_) => Err(Pkcs11Error::PinRefused),
            None => Err(Pkcs11Error::Device(
                "VAULT_ROOT_PKCS11_PIN: the token is logged in by something else in this process, so the PIN cannot be checked".into(),
            )),
        },
        Err(CkError::Pkcs11(
            RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
            _,
        )) => Err(Pkcs11Error::PinRefused),
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
            Err(Pkcs11Error::PinUnusable("has locked the user PIN"))
        }
        Err(CkError::Pkcs11(RvError::PinExpired, _)) => {
            Err(Pkcs11Error::PinUnusable("says the user PIN has expired"))
        }
        Err(CkError::Pkcs11(RvError::UserPinNotInitialized, _)) => {
            Err(Pkcs11Error::PinUnusable("has no user PIN set"))
        }
        Err(e) => Err(device("logging in", e)),
    }
}

fn find_key(session: &Session, settings: &Pkcs11Settings) -> Result<ObjectHandle, Pkcs11Error> {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(settings.key_label.as_bytes().to_vec()),
        ])
        .map_err(|e| device("looking for the key", e))?;
    let key = match found.as_slice() {
        [key] => *key,
        [] => {
            return Err(Pkcs11Error::NoKey {
                key: settings.key_label.clone(),
                token: settings.token_label.clone(),
            });
        }
        many => {
            return Err(Pkcs11Error::AmbiguousKey {
                key: settings.key_label.clone(),
                token: settings.token_label.clone(),
                count: many.len(),
            });
        }
    };
    // CKA_VALUE_LEN is readable even on a sensitive key.
    let attributes = session
        .get_attributes(key, &[AttributeType::ValueLen])
        .map_err(|e| device("reading the key's length", e))?;
    match attributes.as_slice() {
        [Attribute::ValueLen(len)] if usize::from(*len) == KEY_LEN => Ok(key),
        [Attribute::ValueLen(len)] => Err(Pkcs11Error::WeakKey {
            key: settings.key_label.clone(),
            token: settings.token_label.clone(),
            bits: usize::from(*len) * 8,
        }),
        _ => Err(Pkcs11Error::Device(
            "the token did not give the key's CKA_VALUE_LEN".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    //! Every test here runs against a real SoftHSM2 token. SoftHSM2 reads `SOFTHSM2_CONF` once,
    //! at `C_Initialize`, and only sees the tokens that exist then; setting a variable in this
    //! (threaded) test process needs `unsafe`, which the workspace forbids. So each test makes
    //! its own token directory and re-runs itself, alone, in a child copy of this test binary
    //! whose environment names it: see [`softhsm`].

    use std::path::Path;
    use std::process::Command;
    use std::sync::Arc;

    use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
    use cryptoki::session::UserType;
    use secrecy::SecretString;

    use super::{Pkcs11Error, Pkcs11Root, Pkcs11Settings, find_token, load};

    const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
    const PIN: &str = "user-pin-5678";
    const SO_PIN: &str = "1234";
    /// Set in the child to the label of the token made for it.
    const CHILD_TOKEN: &str = "VAULT_TEST_PKCS11_TOKEN";

    /// In the parent: makes a token directory with a fresh token (and `also` more tokens, with
    /// those labels), runs `test` in a child test process pointed at it, asserts that exactly
    /// that test ran there and passed, and returns `None`. In the child: returns the label of
    /// the token to test against.
    fn softhsm(test: &str, also: &[&str]) -> Option<String> {
        if let Ok(label) = std::env::var(CHILD_TOKEN) {
            return Some(label);
        }
        assert!(
            Path::new(MODULE).exists(),
            "SoftHSM2 is not installed ({MODULE}); `apt-get install softhsm2` (.ci/run does)"
        );
        let dir = tempfile::tempdir().expect("a temporary directory for the test's token");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).expect("creating the token directory");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("writing softhsm2.conf");
        // Unique per test, so a failure message names the test's own token.
        let label: String = test.chars().take(32).collect();
        for token in std::iter::once(label.as_str()).chain(also.iter().copied()) {
            let out = Command::new("softhsm2-util")
                .args(["--init-token", "--free", "--label", token])
                .args(["--so-pin", SO_PIN, "--pin", PIN])
                .env("SOFTHSM2_CONF", &conf)
                .output()
                .expect("softhsm2-util runs (`apt-get install softhsm2`)");
            assert!(
                out.status.success(),
                "softhsm2-util --init-token {token}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        // libtest names a test by its path without the crate.
        let module = module_path!()
            .split_once("::")
            .map_or(module_path!(), |(_, rest)| rest);
        let out = Command::new(std::env::current_exe().expect("the test binary's path"))
            .args([format!("{module}::{test}").as_str(), "--exact"])
            .args(["--test-threads=1", "--color=never"])
            .env("SOFTHSM2_CONF", &conf)
            .env(CHILD_TOKEN, &label)
            .output()
            .expect("running the test binary again");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed;"),
            "{test} in its SoftHSM2 child: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        None
    }

    fn settings(token: &str, key: &str, pin: &str) -> Pkcs11Settings {
        Pkcs11Settings {
            module: MODULE.into(),
            token_label: token.to_owned(),
            key_label: key.to_owned(),
            pin: SecretString::from(pin),
        }
    }

    fn flip(blob: &[u8], at: usize) -> Vec<u8> {
        let mut out = blob.to_vec();
        out[at] ^= 0x01;
        out
    }

    #[test]
    fn a_generated_root_seals_and_opens_and_counts_what_it_sends() {
        let Some(token) = softhsm(
            "a_generated_root_seals_and_opens_and_counts_what_it_sends",
            &[],
        ) else {
            return;
        };
        let root = Pkcs11Root::generate(&settings(&token, "root", PIN)).expect("generate");
        assert_eq!(root.operations(), 0, "the self-test at open is not counted");

        let sealed = root.seal(b"agent-1", b"agent key bytes").expect("seal");
        let opened = root.open_sealed(b"agent-1", &sealed).expect("open");
        assert_eq!(opened.as_slice(), b"agent key bytes");
        assert_eq!(root.operations(), 2);

        let empty = root.seal(b"agent-1", b"").expect("seal nothing");
        assert!(
            root.open_sealed(b"agent-1", &empty)
                .expect("open")
                .is_empty()
        );
        assert_eq!(root.operations(), 4);
    }

    #[test]
    fn a_blob_does_not_open_under_other_aad_or_once_tampered() {
        let Some(token) = softhsm("a_blob_does_not_open_under_other_aad_or_once_tampered", &[])
        else {
            return;
        };
        let root = Pkcs11Root::generate(&settings(&token, "root", PIN)).expect("generate");
        let sealed = root.seal(b"agent-1", b"agent key bytes").expect("seal");
        let before = root.operations();

        let wrong_aad = root.open_sealed(b"agent-2", &sealed);
        assert!(
            matches!(wrong_aad, Err(Pkcs11Error::DoesNotOpen)),
            "{wrong_aad:?}"
        );
        // The nonce, the ciphertext and the tag are each authenticated.
        for at in [
            0,
            11,
            12,
            sealed.len() - 17,
            sealed.len() - 16,
            sealed.len() - 1,
        ] {
            let tampered = root.open_sealed(b"agent-1", &flip(&sealed, at));
            assert!(
                matches!(tampered, Err(Pkcs11Error::DoesNotOpen)),
                "byte {at}: {tampered:?}"
            );
        }
        assert_eq!(root.operations(), before + 7, "one per call sent");

        for short in [&sealed[..0], &sealed[..12], &sealed[..27]] {
            let opened = root.open_sealed(b"agent-1", short);
            assert!(
                matches!(opened, Err(Pkcs11Error::DoesNotOpen)),
                "{opened:?}"
            );
        }
        assert_eq!(
            root.operations(),
            before + 7,
            "too short never reaches the token"
        );

        // Failures leave the session working.
        let opened = root.open_sealed(b"agent-1", &sealed).expect("still opens");
        assert_eq!(opened.as_slice(), b"agent key bytes");
    }

    #[test]
    fn a_second_open_of_the_key_opens_what_the_first_sealed() {
        let Some(token) = softhsm("a_second_open_of_the_key_opens_what_the_first_sealed", &[])
        else {
            return;
        };
        let first = Pkcs11Root::generate(&settings(&token, "root", PIN)).expect("generate");
        let sealed = first.seal(b"aad", b"wrapped by the first").expect("seal");

        let second = Pkcs11Root::open(&settings(&token, "root", PIN)).expect("second open");
        assert_eq!(
            second
                .open_sealed(b"aad", &sealed)
                .expect("open")
                .as_slice(),
            b"wrapped by the first"
        );
        // Dropping one root closes only its own session.
        drop(first);
        let again = second.seal(b"aad", b"wrapped by the second").expect("seal");
        drop(second);

        // No session is left, so the token has logged out: this is a fresh login that finds
        // the key in the token's store.
        let third = Pkcs11Root::open(&settings(&token, "root", PIN)).expect("third open");
        assert_eq!(
            third.open_sealed(b"aad", &sealed).expect("open").as_slice(),
            b"wrapped by the first"
        );
        assert_eq!(
            third.open_sealed(b"aad", &again).expect("open").as_slice(),
            b"wrapped by the second"
        );
    }

    #[test]
    fn a_wrong_pin_is_refused_even_while_another_root_is_logged_in() {
        let Some(token) = softhsm(
            "a_wrong_pin_is_refused_even_while_another_root_is_logged_in",
            &[],
        ) else {
            return;
        };
        // No login yet: the token itself says no.
        let fresh = Pkcs11Root::generate(&settings(&token, "root", "not-the-pin"));
        assert!(matches!(fresh, Err(Pkcs11Error::PinRefused)), "{fresh:?}");

        let root = Pkcs11Root::generate(&settings(&token, "root", PIN)).expect("generate");
        // The token answers CKR_USER_ALREADY_LOGGED_IN to any PIN now.
        let wrong = Pkcs11Root::open(&settings(&token, "root", "not-the-pin"));
        assert!(matches!(wrong, Err(Pkcs11Error::PinRefused)), "{wrong:?}");
        let message = wrong.expect_err("refused").to_string();
        assert_eq!(message, "VAULT_ROOT_PKCS11_PIN: the token refused the PIN");

        // The refused open did not disturb the first root, and the right PIN still opens.
        let sealed = root.seal(b"aad", b"x").expect("seal");
        let right = Pkcs11Root::open(&settings(&token, "root", PIN)).expect("right PIN");
        assert_eq!(
            right.open_sealed(b"aad", &sealed).expect("open").as_slice(),
            b"x"
        );
    }

    #[test]
    fn a_missing_or_weak_key_is_named_in_the_error() {
        let Some(token) = softhsm("a_missing_or_weak_key_is_named_in_the_error", &[]) else {
            return;
        };
        let missing = Pkcs11Root::open(&settings(&token, "root", PIN));
        assert_eq!(
            missing.expect_err("no key yet").to_string(),
            format!(
                "VAULT_ROOT_PKCS11_KEY_LABEL: no AES key labelled \"root\" in token \"{token}\""
            )
        );

        // An AES-128 key under the label, made beside the root's code path.
        let module = load(Path::new(MODULE)).expect("module");
        let slot = find_token(&module.pkcs11, &token).expect("token");
        let session = module.pkcs11.open_rw_session(slot).expect("session");
        session
            .login(UserType::User, Some(&SecretString::from(PIN)))
            .expect("login");
        session
            .generate_key(
                &cryptoki::mechanism::Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(16u64.into()),
                    Attribute::Label(b"small".to_vec()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                ],
            )
            .expect("an AES-128 key");
        let weak = Pkcs11Root::open(&settings(&token, "small", PIN));
        assert!(
            matches!(weak, Err(Pkcs11Error::WeakKey { bits: 128, .. })),
            "{weak:?}"
        );
    }

    #[test]
    fn a_missing_token_is_named_with_the_tokens_there_are() {
        let Some(token) = softhsm(
            "a_missing_token_is_named_with_the_tokens_there_are",
            &["other"],
        ) else {
            return;
        };
        let missing = Pkcs11Root::open(&settings("vault", "root", PIN));
        let message = missing.expect_err("no such token").to_string();
        assert!(
            message.starts_with(
                "VAULT_ROOT_PKCS11_TOKEN_LABEL: no token labelled \"vault\" (tokens: "
            ),
            "{message}"
        );
        assert!(
            message.contains(&token) && message.contains("other"),
            "{message}"
        );
    }

    #[test]
    fn generating_under_a_label_in_use_is_refused() {
        let Some(token) = softhsm("generating_under_a_label_in_use_is_refused", &[]) else {
            return;
        };
        let first = Pkcs11Root::generate(&settings(&token, "root", PIN)).expect("generate");
        let sealed = first.seal(b"aad", b"kept").expect("seal");
        let second = Pkcs11Root::generate(&settings(&token, "root", PIN));
        assert_eq!(
            second.expect_err("refused").to_string(),
            format!(
                "VAULT_ROOT_PKCS11_KEY_LABEL: a key labelled \"root\" exists already in token \"{token}\""
            )
        );
        // The refusal left exactly the first key: a fresh open is not ambiguous and opens its
        // seal.
        drop(first);
        let reopened = Pkcs11Root::open(&settings(&token, "root", PIN)).expect("open");
        assert_eq!(
            reopened
                .open_sealed(b"aad", &sealed)
                .expect("open")
                .as_slice(),
            b"kept"
        );
    }

    #[test]
    fn a_generated_key_is_sensitive_and_never_extractable() {
        let Some(token) = softhsm("a_generated_key_is_sensitive_and_never_extractable", &[]) else {
            return;
        };
        let root = Pkcs11Root::generate(&settings(&token, "root", PIN)).expect("generate");
        let live = root.live();
        let attributes = live
            .session
            .get_attributes(
                live.key,
                &[
                    AttributeType::Token,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                    AttributeType::ValueLen,
                    AttributeType::Value,
                ],
            )
            .expect("attributes");
        for expected in [
            Attribute::Token(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::AlwaysSensitive(true),
            Attribute::NeverExtractable(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::ValueLen(32u64.into()),
        ] {
            assert!(
                attributes.contains(&expected),
                "{expected:?} in {attributes:?}"
            );
        }
        assert!(
            !attributes.iter().any(|a| matches!(a, Attribute::Value(_))),
            "the token handed out the key's value"
        );
    }

    #[test]
    fn a_root_whose_login_the_token_dropped_logs_in_again_and_goes_on() {
        let Some(token) = softhsm(
            "a_root_whose_login_the_token_dropped_logs_in_again_and_goes_on",
            &[],
        ) else {
            return;
        };
        let root = Pkcs11Root::generate(&settings(&token, "root", PIN)).expect("generate");
        let sealed = root.seal(b"aad", b"kept across the loss").expect("seal");

        // Another session of this process logs the user out: the login is the application's,
        // so the root's session loses access to its (private) key, as after an HSM restart.
        let module = load(Path::new(MODULE)).expect("module");
        let slot = find_token(&module.pkcs11, &token).expect("token");
        let other = module.pkcs11.open_ro_session(slot).expect("session");
        other.logout().expect("logout");
        drop(other);

        assert_eq!(
            root.open_sealed(b"aad", &sealed)
                .expect("opens after logging in again")
                .as_slice(),
            b"kept across the loss"
        );
        let again = root.seal(b"aad", b"and seals").expect("seal");
        assert_eq!(
            root.open_sealed(b"aad", &again).expect("open").as_slice(),
            b"and seals"
        );
        assert_eq!(
            root.operations(),
            4,
            "one counted call each, retries included"
        );
    }

    #[test]
    fn a_sealed_blob_is_nonce_then_ciphertext_then_tag() {
        let Some(token) = softhsm("a_sealed_blob_is_nonce_then_ciphertext_then_tag", &[]) else {
            return;
        };
        let root = Pkcs11Root::generate(&settings(&token, "root", PIN)).expect("generate");
        for len in [0, 1, 15, 16, 17, 32, 1000] {
            let plaintext = vec![0x5a; len];
            let one = root.seal(b"aad", &plaintext).expect("seal");
            let two = root.seal(b"aad", &plaintext).expect("seal");
            assert_eq!(one.len(), 12 + len + 16);
            assert_ne!(one[..12], two[..12], "every seal draws a fresh nonce");
            assert_eq!(
                root.open_sealed(b"aad", &one).expect("open").as_slice(),
                plaintext
            );
        }
    }

    #[test]
    fn one_root_serves_many_threads() {
        let Some(token) = softhsm("one_root_serves_many_threads", &[]) else {
            return;
        };
        fn send_and_sync<T: Send + Sync>() {}
        send_and_sync::<Pkcs11Root>();

        let root =
            Arc::new(Pkcs11Root::generate(&settings(&token, "root", PIN)).expect("generate"));
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let root = Arc::clone(&root);
                std::thread::spawn(move || {
                    for i in 0..25u8 {
                        let aad = [t, i];
                        let sealed = root.seal(&aad, &[t; 40]).expect("seal");
                        let opened = root.open_sealed(&aad, &sealed).expect("open");
                        assert_eq!(opened.as_slice(), [t; 40]);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("a sealing thread panicked");
        }
        assert_eq!(root.operations(), 4 * 25 * 2);
    }

    #[test]
    fn neither_debug_nor_errors_show_the_pin() {
        let Some(token) = softhsm("neither_debug_nor_errors_show_the_pin", &[]) else {
            return;
        };
        let pin = "pin-that-must-not-show";
        let wrong = settings(&token, "root", pin);
        let debug = format!("{wrong:?}");
        assert!(
            !debug.contains(pin) && debug.contains("[REDACTED]"),
            "{debug}"
        );

        let error = Pkcs11Root::generate(&wrong).expect_err("wrong PIN");
        assert!(!format!("{error} {error:?}").contains(pin));

        let root = Pkcs11Root::generate(&settings(&token, "root", PIN)).expect("generate");
        let debug = format!("{root:?}");
        assert!(!debug.contains(PIN), "{debug}");
    }

    #[test]
    fn a_module_that_does_not_load_is_named() {
        // Needs no token: the module is the first thing opened.
        let error = Pkcs11Root::open(&settings_with_module("/nonexistent/libfoo.so"))
            .expect_err("no such module");
        let message = error.to_string();
        assert!(
            message.starts_with("VAULT_ROOT_PKCS11_MODULE: cannot load /nonexistent/libfoo.so: "),
            "{message}"
        );

        // A file that is not a shared library at all.
        let not_a_library = tempfile::NamedTempFile::new().expect("a temporary file");
        let error = Pkcs11Root::open(&settings_with_module(not_a_library.path()))
            .expect_err("not a library");
        assert!(
            error
                .to_string()
                .starts_with("VAULT_ROOT_PKCS11_MODULE: cannot load "),
            "{error}"
        );
    }

    fn settings_with_module(module: impl AsRef<Path>) -> Pkcs11Settings {
        Pkcs11Settings {
            module: module.as_ref().to_owned(),
            ..settings("vault", "root", PIN)
        }
    }
}
