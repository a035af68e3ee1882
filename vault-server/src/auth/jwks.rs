//! Issuer public keys: a JWKS document turned into verification keys, each pinned to the one
//! algorithm its key type allows, so a token can never choose how it is verified.

use std::collections::HashMap;
use std::sync::Arc;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};

/// One usable key.
pub struct VerificationKey {
    /// The only algorithm accepted with this key.
    pub algorithm: Algorithm,
    /// The key.
    pub key: DecodingKey,
    /// The JWK as published, to tell a key replaced under the same `kid` from the same key.
    fingerprint: String,
}

/// Keys by `kid`.
#[derive(Default)]
pub struct KeySet {
    keys: HashMap<String, Arc<VerificationKey>>,
}

/// The JWKS document is unusable.
#[derive(Debug, thiserror::Error)]
pub enum KeySetError {
    /// Not JSON, or not a JWKS.
    #[error("not a JWKS document: {0}")]
    Parse(String),
    /// It holds no key the vault accepts.
    #[error("the JWKS holds no usable key (need a `kid` and an Ed25519, P-256 or RSA public key)")]
    Empty,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl KeySet {
    /// Parses a JWKS document, skipping keys the vault does not accept: keys without `kid`,
    /// symmetric keys (a JWKS is public), curves other than P-256 and Ed25519, and keys whose
    /// declared `alg` disagrees with their type.
    pub fn from_json(bytes: &[u8]) -> Result<Self, KeySetError> {
        let set: JwkSet =
            serde_json::from_slice(bytes).map_err(|err| KeySetError::Parse(err.to_string()))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                tracing::warn!("skipping JWKS key without kid");
                continue;
            };
            let algorithm = match &jwk.algorithm {
                AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                    Algorithm::EdDSA
                }
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                _ => {
                    tracing::warn!(%kid, "skipping JWKS key of an unsupported type");
                    continue;
                }
            };
            if let Some(declared) = &jwk.common.key_algorithm {
                let matches = matches!(
                    (declared, algorithm),
                    (KeyAlgorithm::EdDSA, Algorithm::EdDSA)
                        | (KeyAlgorithm::ES256, Algorithm::ES256)
                        | (KeyAlgorithm::RS256, Algorithm::RS256)
                );
                if !matches {
                    tracing::warn!(%kid, "skipping JWKS key whose alg does not fit its type");
                    continue;
                }
            }
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    let fingerprint = serde_json::to_string(jwk).unwrap_or_default();
                    keys.insert(
                        kid,
                        Arc::new(VerificationKey {
                            algorithm,
                            key,
                            fingerprint,
                        }),
                    );
                }
                Err(err) => tracing::warn!(%kid, error = %err, "skipping malformed JWKS key"),
            }
        }
        if keys.is_empty() {
            return Err(KeySetError::Empty);
        }
        Ok(Self { keys })
    }

    /// The key with this `kid`.
    pub fn get(&self, kid: &str) -> Option<Arc<VerificationKey>> {
        self.keys.get(kid).cloned()
    }

    /// The `kid`s of `older` that this set no longer vouches for: removed, or replaced by a
    /// different key under the same `kid`.
    pub fn withdrawn_since(&self, older: &KeySet) -> Vec<String> {
        older
            .keys
            .iter()
            .filter(|(kid, old)| {
                self.keys
                    .get(*kid)
                    .is_none_or(|new| new.fingerprint != old.fingerprint)
            })
            .map(|(kid, _)| kid.clone())
            .collect()
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// No keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}
