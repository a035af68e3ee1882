//! Caller-token verification.
//!
//! Accepted: a JWS whose `iss` is one of the configured issuers (a string, never an array),
//! signed by a key from *that issuer's* key set under the one algorithm the key's type allows
//! (EdDSA, ES256 or RS256; never HS*, never `none`), whose `aud` contains the vault's audience
//! exactly, whose `exp` (and `nbf`, `iat` when present) are sane NumericDates within the
//! leeway, whose lifetime is no longer than the maximum, with a `sub` and the agent claim.
//!
//! Issuer keys are re-loaded periodically ([`crate::jobs::JwksRefresh`]) and when an unknown `kid`
//! arrives. A key that disappears from its issuer's set stops verifying at once, and every
//! cached verification made with it is forgotten. Keys whose re-fetch keeps failing are trusted
//! for a bounded time, then the issuer's tokens are refused (fail closed).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Validation, decode, decode_header};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::jwks::{KeySet, VerificationKey};
use super::{ADMIN_SCOPE, AuthError, Caller};
use crate::config::{JwksSource, JwtSettings, TrustedIssuer};
use crate::http::{HttpError, Origin, Outbound};
use crate::ids::{AgentId, IssuerId, UserId};

/// Most verified tokens remembered at once; past it the oldest are evicted.
const CACHE_CAPACITY: usize = 16_384;
/// Longest caller token accepted.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Largest JWKS document read.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Latest NumericDate accepted (9999-12-31T23:59:59Z). Bounding every time claim keeps all the
/// arithmetic below far from overflow, and no honest token names a later time.
const MAX_NUMERIC_DATE: i64 = 253_402_300_799;
/// Shortest periodic re-fetch interval a `Cache-Control: max-age` may ask for.
const MIN_JWKS_REFRESH: Duration = Duration::from_secs(10);

/// A verified token's caller, remembered until the token's `exp`.
struct Verified {
    caller: Caller,
    exp: i64,
    /// The key that verified it: withdrawing the key forgets the entry.
    kid: String,
}

/// Verified tokens by SHA-256 of the whole token, so a signature is checked once per token
/// rather than once per call. Any change to the token changes the digest; an entry is never
/// used past `exp`; withdrawing a key forgets the entries it verified. Bounded: when full, the
/// expired entries go first, then the oldest.
#[derive(Default)]
struct VerifiedCache(Mutex<CacheInner>);

#[derive(Default)]
struct CacheInner {
    map: HashMap<[u8; 32], Verified>,
    /// Insertion order, for eviction. May hold digests already removed from `map`.
    order: VecDeque<[u8; 32]>,
}

impl VerifiedCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, digest: &[u8; 32], now: i64) -> Option<Caller> {
        let inner = self.lock();
        inner
            .map
            .get(digest)
            .filter(|v| v.exp > now)
            .map(|v| v.caller.clone())
    }

    /// Inserts unless `still_current` says the keys changed since the verification began (a
    /// concurrent key withdrawal must not be undone by a late insert).
    fn insert(
        &self,
        digest: [u8; 32],
        verified: Verified,
        now: i64,
        still_current: impl FnOnce() -> bool,
    ) {
        let mut inner = self.lock();
        if !still_current() {
            return;
        }
        if inner.map.len() >= CACHE_CAPACITY {
            inner.map.retain(|_, v| v.exp > now);
        }
        while inner.map.len() >= CACHE_CAPACITY {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.map.remove(&oldest);
        }
        if inner.order.len() >= 2 * CACHE_CAPACITY {
            let CacheInner { map, order } = &mut *inner;
            order.retain(|d| map.contains_key(d));
        }
        if inner.map.insert(digest, verified).is_none() {
            inner.order.push_back(digest);
        }
    }

    /// Forgets what `issuer`'s keys `kids` verified; `None` forgets all of the issuer's.
    fn forget(&self, issuer: &IssuerId, kids: Option<&[String]>) {
        let mut inner = self.lock();
        inner.map.retain(|_, v| {
            v.caller.issuer != *issuer || kids.is_some_and(|kids| !kids.contains(&v.kid))
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().map.len()
    }
}

/// One trusted issuer's keys and when they were loaded.
struct IssuerKeys {
    trusted: TrustedIssuer,
    keys: RwLock<Arc<KeySet>>,
    /// Bumped on every change of `keys`; a verification that began under another generation
    /// is not cached.
    generation: AtomicU64,
    /// When the keys were last loaded successfully.
    loaded_at: Mutex<Instant>,
    /// When the periodic refresh is next due.
    next_refresh: Mutex<Instant>,
    /// When an unknown `kid` last triggered a re-fetch; bounds how often a stream of bogus
    /// tokens can make the vault hit the issuer.
    last_refetch: tokio::sync::Mutex<Option<Instant>>,
}

impl IssuerKeys {
    fn key(&self, kid: &str) -> Option<Arc<VerificationKey>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).get(kid)
    }

    fn stale_for(&self) -> Duration {
        self.loaded_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }
}

/// Verifies caller tokens; shared by every request.
pub struct Verifier {
    settings: JwtSettings,
    issuers: HashMap<String, IssuerKeys>,
    verified: VerifiedCache,
    http: Outbound,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
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
    /// Loads every issuer's keys once; fails if any cannot be loaded.
    /// JWKS URLs are configured: fetched through `http` on its configured path.
    pub async fn new(settings: JwtSettings, http: Outbound) -> anyhow::Result<Self> {
        let mut issuers = HashMap::new();
        for trusted in &settings.issuers {
            let (keys, max_age) = fetch(&trusted.jwks, &http)
                .await
                .map_err(|e| anyhow::anyhow!("issuer {}: {e:#}", trusted.issuer))?;
            tracing::info!(issuer = %trusted.issuer, keys = keys.len(), "loaded issuer keys");
            let now = Instant::now();
            issuers.insert(
                trusted.issuer.as_str().to_string(),
                IssuerKeys {
                    trusted: trusted.clone(),
                    keys: RwLock::new(Arc::new(keys)),
                    generation: AtomicU64::new(0),
                    loaded_at: Mutex::new(now),
                    next_refresh: Mutex::new(now + refresh_interval(&settings, max_age)),
                    last_refetch: tokio::sync::Mutex::new(None),
                },
            );
        }
        Ok(Self {
            settings,
            issuers,
            verified: VerifiedCache::default(),
            http,
        })
    }

    /// Verifies `token` and returns who is calling.
    pub async fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        self.verify_at(token, now_unix()).await
    }

    async fn verify_at(&self, token: &str, now: i64) -> Result<Caller, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed("longer than 16 KiB"));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(caller) = self.verified.get(&digest, now) {
            // Keys past their staleness limit vouch for nothing, cached or not.
            if self
                .issuers
                .get(caller.issuer.as_str())
                .is_some_and(|i| i.stale_for() > self.settings.jwks_max_stale)
            {
                return Err(AuthError::KeysUnavailable);
            }
            return Ok(caller);
        }
        let (issuer, generation, verified) = self.verify_uncached(token, now).await?;
        let caller = verified.caller.clone();
        self.verified.insert(digest, verified, now, || {
            issuer.generation.load(Ordering::Acquire) == generation
        });
        Ok(caller)
    }

    async fn verify_uncached(
        &self,
        token: &str,
        now: i64,
    ) -> Result<(&IssuerKeys, u64, Verified), AuthError> {
        let header = decode_header(token).map_err(|err| match err.kind() {
            ErrorKind::InvalidAlgorithmName => AuthError::Refused("algorithm not allowed"),
            _ => AuthError::Malformed("not a signed JWT"),
        })?;
        let kid = header
            .kid
            .as_deref()
            .ok_or(AuthError::Refused("the header has no kid"))?;
        // The issuer picks the key set, so it is read before the signature is checked; the
        // signed claims are checked against it again below.
        let issuer = self
            .issuers
            .get(unverified_issuer(token)?.as_str())
            .ok_or_else(|| untrusted_issuer(&self.settings))?;
        if issuer.stale_for() > self.settings.jwks_max_stale {
            return Err(AuthError::KeysUnavailable);
        }
        let generation = issuer.generation.load(Ordering::Acquire);
        let key = match issuer.key(kid) {
            Some(key) => key,
            None => self.refetch_for(issuer, kid).await?,
        };
        if header.alg != key.algorithm {
            return Err(AuthError::Refused(
                "algorithm does not match the issuer key",
            ));
        }
        // jsonwebtoken checks the signature only; every claim is checked by `check_claims`.
        let mut validation = Validation::new(key.algorithm);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims = HashSet::new();
        let claims = decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(|err| AuthError::Refused(describe(err.kind())))?
            .claims;
        let (caller, exp) = check_claims(&claims, &issuer.trusted.issuer, &self.settings, now)?;
        Ok((
            issuer,
            generation,
            Verified {
                caller,
                exp,
                kid: kid.to_string(),
            },
        ))
    }

    /// An unknown `kid` may mean the issuer rotated keys: re-load them, at most once per
    /// interval, then look again.
    async fn refetch_for(
        &self,
        issuer: &IssuerKeys,
        kid: &str,
    ) -> Result<Arc<VerificationKey>, AuthError> {
        let mut last = issuer.last_refetch.lock().await;
        // Another request may have re-fetched while this one waited for the lock.
        if let Some(key) = issuer.key(kid) {
            return Ok(key);
        }
        if last.is_some_and(|at| at.elapsed() < self.settings.jwks_refetch_interval) {
            return Err(AuthError::Refused("unknown kid"));
        }
        *last = Some(Instant::now());
        match fetch(&issuer.trusted.jwks, &self.http).await {
            Ok((keys, _)) => {
                self.install(issuer, keys);
                tracing::info!(issuer = %issuer.trusted.issuer, "re-loaded issuer keys for an unknown kid");
                issuer.key(kid).ok_or(AuthError::Refused("unknown kid"))
            }
            Err(err) => {
                tracing::warn!(issuer = %issuer.trusted.issuer, error = %format!("{err:#}"), "re-loading issuer keys failed; keeping the old ones");
                Err(AuthError::KeysUnavailable)
            }
        }
    }

    /// Replaces an issuer's keys; what the withdrawn keys verified is forgotten.
    fn install(&self, issuer: &IssuerKeys, keys: KeySet) {
        let withdrawn = {
            let mut current = issuer.keys.write().unwrap_or_else(|p| p.into_inner());
            let withdrawn = keys.withdrawn_since(&current);
            *current = Arc::new(keys);
            withdrawn
        };
        *issuer.loaded_at.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        if !withdrawn.is_empty() {
            issuer.generation.fetch_add(1, Ordering::AcqRel);
            self.verified
                .forget(&issuer.trusted.issuer, Some(withdrawn.as_slice()));
            tracing::info!(issuer = %issuer.trusted.issuer, withdrawn = ?withdrawn, "issuer keys withdrawn; tokens they signed are refused from now on");
        }
    }

    /// When the next issuer's keys are due for a re-load; `None` with no issuer to refresh.
    pub fn next_refresh(&self) -> Option<Instant> {
        self.issuers
            .values()
            .map(|i| *i.next_refresh.lock().unwrap_or_else(|p| p.into_inner()))
            .min()
    }

    /// Re-loads the keys of every issuer that is due (see [`crate::jobs::JwksRefresh`]).
    pub async fn refresh_due(&self) {
        for issuer in self.issuers.values() {
            let due = *issuer
                .next_refresh
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if due <= Instant::now() {
                self.refresh_one(issuer).await;
            }
        }
    }

    async fn refresh_one(&self, issuer: &IssuerKeys) {
        // The same lock as the unknown-kid re-fetch: a slow fetch must not install an older key
        // set over a newer one (bringing a withdrawn key back).
        let _fetching = issuer.last_refetch.lock().await;
        let max_age = match fetch(&issuer.trusted.jwks, &self.http).await {
            Ok((keys, max_age)) => {
                self.install(issuer, keys);
                max_age
            }
            Err(err) => {
                let stale = issuer.stale_for();
                if stale > self.settings.jwks_max_stale {
                    // Bumped first: a verification in flight must not re-cache afterwards.
                    issuer.generation.fetch_add(1, Ordering::AcqRel);
                    self.verified.forget(&issuer.trusted.issuer, None);
                    tracing::error!(issuer = %issuer.trusted.issuer, error = %format!("{err:#}"), stale_seconds = stale.as_secs(), "issuer keys could not be re-loaded for longer than VAULT_JWKS_MAX_STALE_SECONDS; refusing this issuer's tokens until they load");
                } else {
                    tracing::warn!(issuer = %issuer.trusted.issuer, error = %format!("{err:#}"), stale_seconds = stale.as_secs(), "re-loading issuer keys failed; keeping the old ones for now");
                }
                None
            }
        };
        *issuer
            .next_refresh
            .lock()
            .unwrap_or_else(|p| p.into_inner()) =
            Instant::now() + refresh_interval(&self.settings, max_age);
    }
}

/// The configured refresh period, shortened (never lengthened) by the response's max-age.
fn refresh_interval(settings: &JwtSettings, max_age: Option<Duration>) -> Duration {
    let ceiling = settings.jwks_refresh;
    let floor = MIN_JWKS_REFRESH.min(ceiling);
    max_age.map_or(ceiling, |age| age.clamp(floor, ceiling))
}

/// The refusal of an `iss` that is not configured, naming the ones that are.
fn untrusted_issuer(settings: &JwtSettings) -> AuthError {
    let accepted: Vec<String> = settings
        .issuers
        .iter()
        .map(|t| format!("{:?}", t.issuer.as_str()))
        .collect();
    AuthError::UntrustedIssuer {
        accepted: accepted.join(", "),
    }
}

/// The `iss` of a token before its signature is checked, to choose the key set. Only a string
/// names an issuer: an array (or anything else) is refused.
fn unverified_issuer(token: &str) -> Result<String, AuthError> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or(AuthError::Malformed("not a signed JWT"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| AuthError::Malformed("not a signed JWT"))?;
    let claims: Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed("not a signed JWT"))?;
    match claims.get("iss") {
        Some(Value::String(iss)) => Ok(iss.clone()),
        Some(_) => Err(AuthError::Refused("iss must be a single string")),
        None => Err(AuthError::Refused("iss is missing")),
    }
}

/// A NumericDate claim (RFC 7519 §2): a JSON number of seconds, possibly fractional, between
/// 1970 and 9999. Anything else is refused rather than guessed at.
fn numeric_date(value: &Value, not_a_number: &'static str) -> Result<i64, AuthError> {
    let Value::Number(number) = value else {
        return Err(AuthError::Refused(not_a_number));
    };
    let seconds = match (number.as_i64(), number.as_f64()) {
        (Some(whole), _) => whole,
        (None, Some(float))
            if float.is_finite() && (0.0..=MAX_NUMERIC_DATE as f64).contains(&float) =>
        {
            float.floor() as i64
        }
        _ => return Err(AuthError::Refused("a time claim is out of range")),
    };
    if !(0..=MAX_NUMERIC_DATE).contains(&seconds) {
        return Err(AuthError::Refused("a time claim is out of range"));
    }
    Ok(seconds)
}

/// Every claim check, on the signature-verified claims of a token that named `issuer`. Pure, so
/// the property tests can throw anything at it.
fn check_claims(
    claims: &Map<String, Value>,
    issuer: &IssuerId,
    settings: &JwtSettings,
    now: i64,
) -> Result<(Caller, i64), AuthError> {
    match claims.get("iss") {
        Some(Value::String(iss)) if iss == issuer.as_str() => {}
        Some(Value::String(_)) => return Err(untrusted_issuer(settings)),
        Some(_) => return Err(AuthError::Refused("iss must be a single string")),
        None => return Err(AuthError::Refused("iss is missing")),
    }
    let audience = settings.audience.as_str();
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => aud == audience,
        Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(audience)),
        Some(_) => false,
        None => return Err(AuthError::Refused("aud is missing")),
    };
    if !audience_ok {
        return Err(AuthError::WrongAudience {
            expected: audience.to_string(),
        });
    }

    let leeway = i64::try_from(settings.leeway_seconds).unwrap_or(i64::MAX);
    let max_ttl = i64::try_from(settings.max_ttl_seconds).unwrap_or(i64::MAX);
    let exp = numeric_date(
        claims
            .get("exp")
            .ok_or(AuthError::Refused("exp is missing"))?,
        "exp is not a number",
    )?;
    let nbf = claims
        .get("nbf")
        .map(|v| numeric_date(v, "nbf is not a number"))
        .transpose()?;
    let iat = claims
        .get("iat")
        .map(|v| numeric_date(v, "iat is not a number"))
        .transpose()?;
    // Every value is within 0..=MAX_NUMERIC_DATE, so none of this can overflow; checked anyway
    // so that a future change of the bounds cannot silently wrap.
    let later = |a: i64, b: i64| {
        a.checked_add(b)
            .ok_or(AuthError::Refused("a time claim is out of range"))
    };
    let span = |a: i64, b: i64| {
        a.checked_sub(b)
            .ok_or(AuthError::Refused("a time claim is out of range"))
    };
    if later(exp, leeway)? <= now {
        return Err(AuthError::Refused("expired"));
    }
    if let Some(nbf) = nbf
        && nbf > later(now, leeway)?
    {
        return Err(AuthError::Refused("not yet valid (nbf)"));
    }
    match iat {
        Some(iat) => {
            if iat > later(now, leeway)? {
                return Err(AuthError::Refused("iat is in the future"));
            }
            if exp < iat {
                return Err(AuthError::Refused("exp is before iat"));
            }
            if span(exp, iat)? > max_ttl {
                return Err(AuthError::Refused("lifetime exceeds the maximum"));
            }
        }
        // Without iat the lifetime is unknown; bound what is left of it instead.
        None if span(exp, now)? > max_ttl => {
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
    let agent_claim = |problem| AuthError::AgentClaim {
        claim: settings.agent_claim.clone(),
        problem,
    };
    let agent = match claims.get(&settings.agent_claim) {
        None => return Err(agent_claim("is missing")),
        Some(Value::String(s)) => {
            AgentId::parse(s).map_err(|_| agent_claim("is not a valid agent id"))?
        }
        Some(_) => return Err(agent_claim("is not a string")),
    };
    let caller = Caller {
        issuer: issuer.clone(),
        agent,
        user,
        admin: has_scope(claims, ADMIN_SCOPE),
        store: has_scope(claims, &settings.store_scope),
        // Recorded as given, so bounded: an id is short and printable.
        jti: claims
            .get("jti")
            .and_then(Value::as_str)
            .filter(|jti| jti.len() <= 256 && jti.chars().all(|c| !c.is_control()))
            .map(str::to_owned),
        step_up: step_up(claims),
    };
    Ok((caller, exp))
}

/// The step-up claims, each kept only when well-formed and short: a policy compares them with
/// its own short lists, so anything else is as good as absent.
fn step_up(claims: &Map<String, Value>) -> super::StepUp {
    let short = |v: &Value| {
        v.as_str()
            .filter(|s| s.len() <= 256 && !s.chars().any(char::is_control))
            .map(str::to_owned)
    };
    super::StepUp {
        acr: claims.get("acr").and_then(short),
        amr: claims
            .get("amr")
            .and_then(Value::as_array)
            .map(|values| values.iter().take(16).filter_map(short).collect())
            .unwrap_or_default(),
        auth_time: claims
            .get("auth_time")
            .and_then(Value::as_i64)
            .filter(|t| (0..=MAX_NUMERIC_DATE).contains(t)),
    }
}

/// Whether `scope` (space-separated string) or `scp` (string or array) grants `wanted` exactly.
fn has_scope(claims: &Map<String, Value>, wanted: &str) -> bool {
    let in_string = |v: &Value| {
        v.as_str()
            .is_some_and(|s| s.split_whitespace().any(|s| s == wanted))
    };
    let in_array = |v: &Value| {
        v.as_array()
            .is_some_and(|a| a.iter().any(|s| s.as_str() == Some(wanted)))
    };
    ["scope", "scp"]
        .iter()
        .filter_map(|name| claims.get(*name))
        .any(|v| in_string(v) || in_array(v))
}

fn describe(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::InvalidAlgorithm => "algorithm not allowed",
        ErrorKind::InvalidClaimFormat(_) | ErrorKind::Json(_) => "the claims are not a JSON object",
        _ => "not a valid JWT",
    }
}

/// `max-age` of a `Cache-Control` header; `no-store` and `no-cache` count as zero.
fn max_age(header: &str) -> Option<Duration> {
    header.split(',').map(str::trim).find_map(|directive| {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return Some(Duration::ZERO);
        }
        lower
            .strip_prefix("max-age=")
            .and_then(|v| v.trim_matches('"').parse::<u64>().ok())
            .map(Duration::from_secs)
    })
}

/// Loads a key set and, from a URL, the response's max-age. Reads at most [`MAX_JWKS_BYTES`],
/// within the client's timeouts.
async fn fetch(source: &JwksSource, http: &Outbound) -> anyhow::Result<(KeySet, Option<Duration>)> {
    let (bytes, max_age) = match source {
        JwksSource::File(path) => {
            let size = tokio::fs::metadata(path)
                .await
                .map_err(|e| anyhow::anyhow!("cannot read JWKS file {}: {e}", path.display()))?
                .len();
            if size > MAX_JWKS_BYTES as u64 {
                anyhow::bail!("JWKS file {} is larger than 1 MiB", path.display());
            }
            let bytes = tokio::fs::read(path)
                .await
                .map_err(|e| anyhow::anyhow!("cannot read JWKS file {}: {e}", path.display()))?;
            (bytes, None)
        }
        JwksSource::Url(url) => {
            let response = http
                .get(Origin::Configured, url, MAX_JWKS_BYTES)
                .await
                .map_err(|e| match e {
                    HttpError::TooLarge => {
                        anyhow::anyhow!("the JWKS response is larger than 1 MiB")
                    }
                    other => anyhow::anyhow!("JWKS {other}"),
                })?;
            let max_age = response
                .headers
                .get(reqwest::header::CACHE_CONTROL)
                .and_then(|v| v.to_str().ok())
                .and_then(max_age);
            (response.body, max_age)
        }
    };
    Ok((KeySet::from_json(&bytes)?, max_age))
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    const ISSUER: &str = "https://issuer.test";
    const OTHER_ISSUER: &str = "https://other.test";

    /// An Ed25519 key and its public JWK.
    struct TestKey {
        kid: String,
        encoding: EncodingKey,
        jwk: Value,
    }

    impl TestKey {
        fn new(kid: &str) -> Self {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key_raw());
            Self {
                kid: kid.into(),
                encoding: EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(),
                jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid}),
            }
        }

        fn sign(&self, claims: &Value) -> String {
            let mut header = Header::new(Algorithm::EdDSA);
            header.kid = Some(self.kid.clone());
            jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        key: TestKey,
        other_key: TestKey,
        verifier: Verifier,
    }

    fn publish(path: &std::path::Path, keys: &[&TestKey]) {
        let set = json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
        std::fs::write(path, set.to_string()).unwrap();
    }

    fn settings(dir: &std::path::Path, leeway: u64) -> JwtSettings {
        JwtSettings {
            issuers: vec![
                TrustedIssuer {
                    issuer: IssuerId::parse(ISSUER).unwrap(),
                    jwks: JwksSource::File(dir.join("jwks.json")),
                },
                TrustedIssuer {
                    issuer: IssuerId::parse(OTHER_ISSUER).unwrap(),
                    jwks: JwksSource::File(dir.join("other-jwks.json")),
                },
            ],
            audience: "credential-vault".into(),
            agent_claim: "agent_id".into(),
            leeway_seconds: leeway,
            max_ttl_seconds: 3600,
            jwks_refetch_interval: Duration::from_secs(30),
            store_scope: "vault:store".into(),
            jwks_refresh: Duration::from_secs(300),
            jwks_max_stale: Duration::from_secs(3600),
        }
    }

    async fn fixture(leeway: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let key = TestKey::new("k1");
        let other_key = TestKey::new("o1");
        publish(&dir.path().join("jwks.json"), &[&key]);
        publish(&dir.path().join("other-jwks.json"), &[&other_key]);
        let http = Outbound::new(&crate::http::HttpSettings::default()).unwrap();
        let verifier = Verifier::new(settings(dir.path(), leeway), http)
            .await
            .unwrap();
        Fixture {
            dir,
            key,
            other_key,
            verifier,
        }
    }

    impl Fixture {
        fn issuer(&self, iss: &str) -> &IssuerKeys {
            &self.verifier.issuers[iss]
        }
    }

    fn claims(exp_in: i64) -> Value {
        let now = now_unix();
        json!({"iss": ISSUER, "aud": "credential-vault", "sub": "alice", "agent_id": "agent-a",
               "iat": now, "exp": now + exp_in, "scope": "openid vault:admin"})
    }

    #[tokio::test]
    async fn a_valid_token_names_the_issuer_the_agent_the_user_and_the_scopes() {
        let f = fixture(0).await;
        let caller = f.verifier.verify(&f.key.sign(&claims(60))).await.unwrap();
        assert_eq!(caller.issuer.as_str(), ISSUER);
        assert_eq!(caller.agent.as_str(), "agent-a");
        assert_eq!(caller.user.as_str(), "alice");
        assert!(caller.admin);
        assert!(!caller.store);
    }

    #[tokio::test]
    async fn a_cached_token_is_refused_once_it_expires() {
        let f = fixture(0).await;
        let token = f.key.sign(&claims(60));
        let now = now_unix();
        assert!(f.verifier.verify_at(&token, now).await.is_ok());
        assert_eq!(f.verifier.verified.len(), 1, "served from the cache next");
        assert!(f.verifier.verify_at(&token, now + 59).await.is_ok());
        assert_eq!(
            f.verifier.verify_at(&token, now + 61).await.unwrap_err(),
            AuthError::Refused("expired")
        );
    }

    #[tokio::test]
    async fn a_token_changed_after_a_cached_verification_is_still_checked() {
        let f = fixture(0).await;
        let token = f.key.sign(&claims(60));
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
                f.verifier.verify(&f.key.sign(&c)).await.unwrap().admin,
                admin
            );
        }
    }

    #[tokio::test]
    async fn an_issuer_only_verifies_with_its_own_keys() {
        let f = fixture(0).await;
        // Issuer B's key signs a token claiming to be from issuer A: A's key set has no such kid.
        let forged = f.other_key.sign(&claims(60));
        assert!(f.verifier.verify(&forged).await.is_err());
        let mut theirs = claims(60);
        theirs["iss"] = json!(OTHER_ISSUER);
        let caller = f.verifier.verify(&f.other_key.sign(&theirs)).await.unwrap();
        assert_eq!(caller.issuer.as_str(), OTHER_ISSUER);
        // And issuer A's key cannot sign for B.
        assert!(f.verifier.verify(&f.key.sign(&theirs)).await.is_err());
    }

    #[tokio::test]
    async fn iss_must_be_one_string_and_aud_must_contain_the_audience_exactly() {
        let f = fixture(0).await;
        let refused = |patch: Value| {
            let mut c = claims(60);
            for (k, v) in patch.as_object().unwrap() {
                c[k] = v.clone();
            }
            f.key.sign(&c)
        };
        for (patch, why) in [
            (json!({"iss": [ISSUER]}), "iss must be a single string"),
            (
                json!({"iss": [ISSUER, OTHER_ISSUER]}),
                "iss must be a single string",
            ),
        ] {
            assert_eq!(
                f.verifier
                    .verify(&refused(patch.clone()))
                    .await
                    .unwrap_err(),
                AuthError::Refused(why),
                "{patch}"
            );
        }
        for patch in [
            json!({"aud": "credential-vault-2"}),
            json!({"aud": "Credential-Vault"}),
            json!({"aud": ["credential"]}),
            json!({"aud": {"credential-vault": true}}),
        ] {
            assert_eq!(
                f.verifier
                    .verify(&refused(patch.clone()))
                    .await
                    .unwrap_err(),
                AuthError::WrongAudience {
                    expected: "credential-vault".into()
                },
                "{patch}"
            );
        }
        assert!(
            f.verifier
                .verify(&refused(json!({"aud": ["other", "credential-vault"]})))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn an_overflowing_lifetime_is_refused() {
        let f = fixture(300).await;
        for patch in [
            json!({"exp": i64::MAX, "iat": -1}),
            json!({"exp": i64::MAX, "iat": 0}),
            json!({"exp": u64::MAX}),
            json!({"exp": 1e300}),
            json!({"nbf": i64::MIN}),
            json!({"iat": -1}),
        ] {
            let mut c = claims(60);
            for (k, v) in patch.as_object().unwrap() {
                c[k] = v.clone();
            }
            assert!(f.verifier.verify(&f.key.sign(&c)).await.is_err(), "{patch}");
        }
    }

    #[tokio::test]
    async fn a_withdrawn_key_stops_verifying_and_its_cached_tokens_are_forgotten() {
        let f = fixture(0).await;
        let token = f.key.sign(&claims(600));
        f.verifier.verify(&token).await.unwrap();
        let other = {
            let mut c = claims(600);
            c["iss"] = json!(OTHER_ISSUER);
            f.other_key.sign(&c)
        };
        f.verifier.verify(&other).await.unwrap();
        assert_eq!(f.verifier.verified.len(), 2);

        let successor = TestKey::new("k2");
        publish(&f.dir.path().join("jwks.json"), &[&successor]);
        f.verifier.refresh_one(f.issuer(ISSUER)).await;

        assert_eq!(
            f.verifier.verified.len(),
            1,
            "only the other issuer's stays"
        );
        assert!(f.verifier.verify(&token).await.is_err());
        assert!(f.verifier.verify(&other).await.is_ok());
        assert!(
            f.verifier
                .verify(&successor.sign(&claims(600)))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn keys_that_cannot_be_reloaded_are_trusted_for_a_bounded_time_then_refused() {
        let f = fixture(0).await;
        let token = f.key.sign(&claims(600));
        f.verifier.verify(&token).await.unwrap();
        std::fs::remove_file(f.dir.path().join("jwks.json")).unwrap();

        f.verifier.refresh_one(f.issuer(ISSUER)).await;
        assert!(
            f.verifier.verify(&token).await.is_ok(),
            "a failed fetch keeps the keys while they are fresh enough"
        );

        // Pretend the last good load was longer ago than the maximum staleness.
        *f.issuer(ISSUER).loaded_at.lock().unwrap() = Instant::now() - Duration::from_secs(3601);
        f.verifier.refresh_one(f.issuer(ISSUER)).await;
        assert_eq!(
            f.verifier.verify(&token).await.unwrap_err(),
            AuthError::KeysUnavailable
        );
        assert_eq!(
            f.verifier
                .verify(&f.key.sign(&claims(60)))
                .await
                .unwrap_err(),
            AuthError::KeysUnavailable
        );

        publish(&f.dir.path().join("jwks.json"), &[&f.key]);
        f.verifier.refresh_one(f.issuer(ISSUER)).await;
        assert!(f.verifier.verify(&token).await.is_ok(), "and recovers");
    }

    #[test]
    fn max_age_shortens_the_refresh_period_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), 0);
        assert_eq!(refresh_interval(&s, None), Duration::from_secs(300));
        assert_eq!(
            refresh_interval(&s, max_age("public, max-age=60")),
            Duration::from_secs(60)
        );
        assert_eq!(
            refresh_interval(&s, max_age("max-age=86400")),
            Duration::from_secs(300),
            "never longer than configured"
        );
        assert_eq!(
            refresh_interval(&s, max_age("no-store")),
            MIN_JWKS_REFRESH,
            "never a busy loop"
        );
        assert_eq!(max_age("private"), None);
    }

    #[test]
    fn the_cache_stays_bounded_and_evicts_the_oldest_first() {
        let cache = VerifiedCache::default();
        let caller = Caller {
            issuer: IssuerId::parse(ISSUER).unwrap(),
            agent: AgentId::parse("a").unwrap(),
            user: UserId::parse("u").unwrap(),
            admin: false,
            store: false,
            jti: None,
            step_up: super::super::StepUp::default(),
        };
        let digest = |i: usize| {
            let mut digest = [0u8; 32];
            digest[..8].copy_from_slice(&(i as u64).to_be_bytes());
            digest
        };
        for i in 0..(CACHE_CAPACITY + 10) {
            let verified = Verified {
                caller: caller.clone(),
                exp: i64::MAX,
                kid: "k".into(),
            };
            cache.insert(digest(i), verified, 0, || true);
        }
        assert_eq!(cache.len(), CACHE_CAPACITY);
        assert!(cache.get(&digest(0), 0).is_none(), "the oldest went");
        assert!(cache.get(&digest(CACHE_CAPACITY + 9), 0).is_some());
        assert!(cache.get(&digest(10), 0).is_some(), "not wiped");
    }

    /// Values thrown into every time claim: extreme integers, floats, strings, arrays, objects.
    fn hostile_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            Just(Value::from(i64::MAX)),
            Just(Value::from(i64::MIN)),
            Just(Value::from(u64::MAX)),
            Just(json!(-1)),
            Just(json!(0)),
            Just(json!(MAX_NUMERIC_DATE + 1)),
            any::<f64>()
                .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
                .prop_map(Value::from),
            Just(json!(1.7e308)),
            Just(json!(-0.5)),
            ".{0,12}".prop_map(Value::from),
            Just(json!("1700000000")),
            Just(json!([1_700_000_000])),
            Just(json!({"t": 1})),
            Just(Value::Null),
            Just(json!(true)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever the time claims hold, the check never panics, and what it accepts is
        /// genuinely current: not expired, not before nbf, lifetime within the maximum.
        #[test]
        fn time_claims_never_panic_and_accept_only_current_tokens(
            exp in proptest::option::of(hostile_value()),
            nbf in proptest::option::of(hostile_value()),
            iat in proptest::option::of(hostile_value()),
            now in 0i64..=MAX_NUMERIC_DATE,
            leeway in 0u64..=3600,
        ) {
            let dir = std::path::Path::new("/nonexistent");
            let mut s = settings(dir, leeway);
            s.leeway_seconds = leeway;
            let mut c = json!({"iss": ISSUER, "aud": "credential-vault", "sub": "alice", "agent_id": "a"});
            for (name, value) in [("exp", &exp), ("nbf", &nbf), ("iat", &iat)] {
                if let Some(value) = value {
                    c[name] = value.clone();
                }
            }
            let issuer = IssuerId::parse(ISSUER).unwrap();
            let outcome = check_claims(c.as_object().unwrap(), &issuer, &s, now);
            if let Ok((_, accepted_exp)) = outcome {
                let leeway = leeway as i64;
                prop_assert!(accepted_exp + leeway > now);
                prop_assert!(accepted_exp - now <= s.max_ttl_seconds as i64 + leeway);
                let as_date = |v: &Option<Value>| v.as_ref().and_then(|v| v.as_f64());
                if let Some(nbf) = as_date(&nbf) {
                    prop_assert!(nbf <= (now + leeway) as f64 + 1.0);
                }
                if let Some(iat) = as_date(&iat) {
                    prop_assert!(iat >= 0.0 && iat <= (now + leeway) as f64 + 1.0);
                    prop_assert!(accepted_exp as f64 - iat.floor() <= s.max_ttl_seconds as f64);
                }
            }
        }
    }
}
