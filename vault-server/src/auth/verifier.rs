//! Caller-token verification.
//!
//! Accepted: a JWS whose header names a known `kid`, signed with the one algorithm that key's
//! type allows (EdDSA, ES256 or RS256; never HS*, never `none`), whose `iss` is configured, whose
//! `aud` contains the vault's audience, with `exp` (and `nbf`, `iat` when present) within the
//! leeway, a lifetime no longer than the maximum, a `sub`, and the agent claim.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Validation, decode, decode_header};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, RwLock};

use super::jwks::KeySet;
use super::{ADMIN_SCOPE, AuthError, Caller};
use crate::config::{JwksSource, JwtSettings};
use crate::ids::{AgentId, UserId};

/// Most verified tokens remembered at once.
const CACHE_CAPACITY: usize = 16_384;

/// A verified token's caller, remembered until the token's `exp`.
struct Verified {
    caller: Caller,
    exp: i64,
}

/// Verified tokens by SHA-256 of the whole token, so a signature is checked once per token
/// rather than once per call. Any change to the token changes the digest; an entry is never
/// used past `exp`; re-loading issuer keys forgets everything (a key may have been withdrawn).
#[derive(Default)]
struct VerifiedCache(std::sync::Mutex<HashMap<[u8; 32], Verified>>);

impl VerifiedCache {
    fn get(&self, digest: &[u8; 32], now: i64) -> Option<Caller> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(digest)
            .filter(|v| v.exp > now)
            .map(|v| v.caller.clone())
    }

    fn insert(&self, digest: [u8; 32], caller: &Caller, exp: i64, now: i64) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= CACHE_CAPACITY {
            map.retain(|_, v| v.exp > now);
            if map.len() >= CACHE_CAPACITY {
                // Still full of live tokens: start over rather than grow without bound.
                map.clear();
            }
        }
        map.insert(
            digest,
            Verified {
                caller: caller.clone(),
                exp,
            },
        );
    }

    fn clear(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Verifies caller tokens; shared by every request.
pub struct Verifier {
    settings: JwtSettings,
    keys: RwLock<Arc<KeySet>>,
    verified: VerifiedCache,
    /// When an unknown `kid` last triggered a re-fetch; bounds how often a stream of bogus
    /// tokens can make the vault hit the issuer.
    last_refetch: Mutex<Option<Instant>>,
    http: reqwest::Client,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuers", &self.settings.issuers)
            .field("audience", &self.settings.audience)
            .finish_non_exhaustive()
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Verifier {
    /// Loads the issuer keys once; fails if they cannot be loaded.
    pub async fn new(settings: JwtSettings) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("credential-vault/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let keys = fetch(&settings.jwks, &http).await?;
        tracing::info!(keys = keys.len(), "loaded issuer keys");
        Ok(Self {
            settings,
            keys: RwLock::new(Arc::new(keys)),
            verified: VerifiedCache::default(),
            last_refetch: Mutex::new(None),
            http,
        })
    }

    /// Verifies `token` and returns who is calling.
    pub async fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        if token.len() > 16 * 1024 {
            return Err(AuthError::Malformed("longer than 16 KiB"));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = now_unix();
        if let Some(caller) = self.verified.get(&digest, now) {
            return Ok(caller);
        }
        let (caller, exp) = self.verify_uncached(token).await?;
        self.verified.insert(digest, &caller, exp, now);
        Ok(caller)
    }

    async fn verify_uncached(&self, token: &str) -> Result<(Caller, i64), AuthError> {
        let header = decode_header(token).map_err(|err| match err.kind() {
            ErrorKind::InvalidAlgorithmName => AuthError::Refused("algorithm not allowed"),
            _ => AuthError::Malformed("not a signed JWT"),
        })?;
        let kid = header
            .kid
            .as_deref()
            .ok_or(AuthError::Refused("the header has no kid"))?;
        // Bound first: a read guard living through the match would deadlock the re-fetch's
        // write lock.
        let cached = self.keys.read().await.get(kid);
        let key = match cached {
            Some(key) => key,
            None => self.refetch_for(kid).await?,
        };
        if header.alg != key.algorithm {
            return Err(AuthError::Refused(
                "algorithm does not match the issuer key",
            ));
        }

        let mut validation = Validation::new(key.algorithm);
        validation.leeway = self.settings.leeway_seconds;
        validation.validate_nbf = true;
        validation.set_audience(&[&self.settings.audience]);
        validation.set_issuer(&self.settings.issuers);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims = decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(|err| AuthError::Refused(describe(err.kind())))?
            .claims;

        let now = now_unix();
        let leeway = self.settings.leeway_seconds as i64;
        let exp = claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or(AuthError::Refused("exp is not a number"))?;
        let max_ttl = self.settings.max_ttl_seconds as i64;
        match claims.get("iat") {
            Some(iat) => {
                let iat = iat
                    .as_i64()
                    .ok_or(AuthError::Refused("iat is not a number"))?;
                if iat > now + leeway {
                    return Err(AuthError::Refused("iat is in the future"));
                }
                if exp - iat > max_ttl {
                    return Err(AuthError::Refused("lifetime exceeds the maximum"));
                }
            }
            // Without iat the lifetime is unknown; bound what is left of it instead.
            None if exp - now > max_ttl => {
                return Err(AuthError::Refused("lifetime exceeds the maximum"));
            }
            None => {}
        }

        let user = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or(AuthError::Refused("sub is missing"))
            .and_then(|s| {
                UserId::parse(s).map_err(|_| AuthError::Refused("sub is not a valid user id"))
            })?;
        let agent = claims
            .get(&self.settings.agent_claim)
            .and_then(Value::as_str)
            .ok_or(AuthError::Refused("the agent claim is missing"))
            .and_then(|s| {
                AgentId::parse(s)
                    .map_err(|_| AuthError::Refused("the agent claim is not a valid agent id"))
            })?;
        let caller = Caller {
            agent,
            user,
            admin: has_admin_scope(&claims),
        };
        Ok((caller, exp))
    }

    /// An unknown `kid` may mean the issuer rotated keys: re-load them, at most once per
    /// interval, then look again.
    async fn refetch_for(&self, kid: &str) -> Result<Arc<super::jwks::VerificationKey>, AuthError> {
        let mut last = self.last_refetch.lock().await;
        // Another request may have re-fetched while this one waited for the lock.
        let cached = self.keys.read().await.get(kid);
        if let Some(key) = cached {
            return Ok(key);
        }
        if last.is_some_and(|at| at.elapsed() < self.settings.jwks_refetch_interval) {
            return Err(AuthError::Refused("unknown kid"));
        }
        *last = Some(Instant::now());
        match fetch(&self.settings.jwks, &self.http).await {
            Ok(keys) => {
                let keys = Arc::new(keys);
                *self.keys.write().await = Arc::clone(&keys);
                self.verified.clear();
                tracing::info!(
                    keys = keys.len(),
                    "re-loaded issuer keys for an unknown kid"
                );
                keys.get(kid).ok_or(AuthError::Refused("unknown kid"))
            }
            Err(err) => {
                tracing::warn!(error = %err, "re-loading issuer keys failed; keeping the old ones");
                Err(AuthError::KeysUnavailable)
            }
        }
    }
}

fn has_admin_scope(claims: &Map<String, Value>) -> bool {
    let in_string = |v: &Value| {
        v.as_str()
            .is_some_and(|s| s.split_whitespace().any(|s| s == ADMIN_SCOPE))
    };
    let in_array = |v: &Value| {
        v.as_array()
            .is_some_and(|a| a.iter().any(|s| s.as_str() == Some(ADMIN_SCOPE)))
    };
    ["scope", "scp"]
        .iter()
        .filter_map(|name| claims.get(*name))
        .any(|v| in_string(v) || in_array(v))
}

fn describe(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "expired",
        ErrorKind::ImmatureSignature => "not yet valid (nbf)",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::InvalidIssuer => "untrusted issuer",
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::InvalidAlgorithm => "algorithm not allowed",
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "exp" => "exp is missing",
            "iss" => "iss is missing",
            "aud" => "aud is missing",
            "sub" => "sub is missing",
            _ => "a required claim is missing",
        },
        ErrorKind::InvalidClaimFormat(_) => "a claim has the wrong type",
        _ => "not a valid JWT",
    }
}

async fn fetch(source: &JwksSource, http: &reqwest::Client) -> anyhow::Result<KeySet> {
    let bytes = match source {
        JwksSource::File(path) => tokio::fs::read(path)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read JWKS file {}: {e}", path.display()))?,
        JwksSource::Url(url) => {
            let response = http.get(url).send().await?.error_for_status()?;
            response.bytes().await?.to_vec()
        }
    };
    Ok(KeySet::from_json(&bytes)?)
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::json;

    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        key: EncodingKey,
        verifier: Verifier,
    }

    async fn fixture(leeway: u64) -> Fixture {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key_raw());
        let dir = tempfile::tempdir().unwrap();
        let jwks = dir.path().join("jwks.json");
        std::fs::write(
            &jwks,
            json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "k1"}]}).to_string(),
        )
        .unwrap();
        let settings = JwtSettings {
            issuers: vec!["https://issuer.test".into()],
            audience: "credential-vault".into(),
            jwks: JwksSource::File(jwks),
            agent_claim: "agent_id".into(),
            leeway_seconds: leeway,
            max_ttl_seconds: 3600,
            jwks_refetch_interval: Duration::from_secs(30),
        };
        Fixture {
            key: EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(),
            verifier: Verifier::new(settings).await.unwrap(),
            _dir: dir,
        }
    }

    fn sign(key: &EncodingKey, claims: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

    fn claims(exp_in: i64) -> serde_json::Value {
        let now = now_unix();
        json!({"iss": "https://issuer.test", "aud": "credential-vault", "sub": "alice", "agent_id": "agent-a",
               "iat": now, "exp": now + exp_in, "scope": "openid vault:admin"})
    }

    #[tokio::test]
    async fn a_valid_token_names_the_agent_the_user_and_the_admin_scope() {
        let f = fixture(0).await;
        let caller = f.verifier.verify(&sign(&f.key, claims(60))).await.unwrap();
        assert_eq!(caller.agent.as_str(), "agent-a");
        assert_eq!(caller.user.as_str(), "alice");
        assert!(caller.admin);
    }

    #[tokio::test]
    async fn a_cached_token_is_refused_once_it_expires() {
        let f = fixture(0).await;
        let token = sign(&f.key, claims(1));
        assert!(f.verifier.verify(&token).await.is_ok());
        assert!(
            f.verifier.verify(&token).await.is_ok(),
            "served from the cache"
        );
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(
            f.verifier.verify(&token).await.unwrap_err(),
            AuthError::Refused("expired")
        );
    }

    #[tokio::test]
    async fn a_token_changed_after_a_cached_verification_is_still_checked() {
        let f = fixture(0).await;
        let token = sign(&f.key, claims(60));
        f.verifier.verify(&token).await.unwrap();
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        let mut forged = claims(60);
        forged["sub"] = json!("mallory");
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(forged.to_string());
        assert_eq!(
            f.verifier.verify(&parts.join(".")).await.unwrap_err(),
            AuthError::Refused("bad signature")
        );
    }

    #[tokio::test]
    async fn scope_may_be_a_string_or_an_array_and_is_matched_exactly() {
        let f = fixture(0).await;
        for (scope, admin) in [
            (json!("vault:admin"), true),
            (json!(["read", "vault:admin"]), true),
            (json!("vault:administrator"), false),
            (json!("openid"), false),
        ] {
            let mut c = claims(60);
            c["scope"] = scope;
            assert_eq!(
                f.verifier.verify(&sign(&f.key, c)).await.unwrap().admin,
                admin
            );
        }
    }

    #[tokio::test]
    async fn the_cache_stays_bounded() {
        let cache = VerifiedCache::default();
        let caller = Caller {
            agent: crate::ids::AgentId::parse("a").unwrap(),
            user: crate::ids::UserId::parse("u").unwrap(),
            admin: false,
        };
        for i in 0..(CACHE_CAPACITY + 10) {
            let mut digest = [0u8; 32];
            digest[..8].copy_from_slice(&(i as u64).to_be_bytes());
            cache.insert(digest, &caller, i64::MAX, 0);
        }
        assert!(cache.0.lock().unwrap().len() <= CACHE_CAPACITY);
    }
}
