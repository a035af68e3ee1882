//! Rows as both backends return them, and their checked conversion into the store's records.
//!
//! Each backend's SQL selects these exact column names and types (integers as 64-bit, times as
//! unix milliseconds), so one decoder serves PostgreSQL and SQLite and the invariants on stored
//! data (positive generations, known states, valid ids) are checked in one place.

use chrono::{DateTime, Utc};

use super::{
    AgentRecord, CredentialState, CredentialSummary, Flow, FlowStatus, NextRoot, OutboxEntry,
    Registration, RootKeyRecord, StoreError, StoredCredential,
};
use crate::audit::chain::Hash;
use crate::audit::{Anchor, AuditRecord, Outcome, SignedHead, Stored};
use crate::crypto::{KdfParams, SealedCredential};
use crate::ids::{AgentId, Generation, IssuerId, Tool, UserId};

/// A time stored (or selected) as unix milliseconds.
pub(super) fn from_ms(value: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(value).unwrap_or_default()
}

pub(super) fn generation_of(value: i64) -> Result<Generation, StoreError> {
    u64::try_from(value)
        .ok()
        .and_then(Generation::new)
        .ok_or_else(|| StoreError::Corrupt(format!("non-positive generation {value}")))
}

fn u32_of(value: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} out of range: {value}")))
}

fn sealed(
    key_version: i64,
    wrapped_data_key: Vec<u8>,
    ciphertext: Vec<u8>,
) -> Result<SealedCredential, StoreError> {
    Ok(SealedCredential {
        wrapped_data_key,
        ciphertext,
        key_version: u32_of(key_version, "key version")?,
    })
}

/// `issuer, agent_id, namespace, wrapped_key, key_version, next_wrapped_key,
/// retiring_wrapped_key, retiring_key_version` of the agent registry.
#[derive(sqlx::FromRow)]
pub(super) struct AgentRow {
    issuer: String,
    agent_id: String,
    namespace: String,
    wrapped_key: Vec<u8>,
    key_version: i64,
    next_wrapped_key: Option<Vec<u8>>,
    retiring_wrapped_key: Option<Vec<u8>>,
    retiring_key_version: Option<i64>,
}

impl TryFrom<AgentRow> for AgentRecord {
    type Error = StoreError;

    fn try_from(row: AgentRow) -> Result<Self, StoreError> {
        Ok(Self {
            issuer: IssuerId::parse(row.issuer)
                .map_err(|err| StoreError::Corrupt(format!("issuer in registry: {err}")))?,
            agent: AgentId::parse(row.agent_id)
                .map_err(|err| StoreError::Corrupt(format!("agent id in registry: {err}")))?,
            namespace: row.namespace,
            wrapped_key: row.wrapped_key,
            key_version: u32_of(row.key_version, "agent key version")?,
            next_wrapped_key: row.next_wrapped_key,
            retiring: match (row.retiring_key_version, row.retiring_wrapped_key) {
                (Some(version), Some(wrapped_key)) => Some(crate::store::RetiringKey {
                    version: u32_of(version, "retiring agent key version")?,
                    wrapped_key,
                }),
                (None, None) => None,
                _ => {
                    return Err(StoreError::Corrupt(
                        "a retiring agent key without its version (or the reverse)".into(),
                    ));
                }
            },
        })
    }
}

/// `agent_id, key_version, wrapped_key` of an agent from before issuer-bound identities.
#[derive(sqlx::FromRow)]
pub(super) struct LegacyAgentRow {
    agent_id: String,
    key_version: i64,
    wrapped_key: Vec<u8>,
}

impl TryFrom<LegacyAgentRow> for (AgentId, u32, Vec<u8>) {
    type Error = StoreError;

    fn try_from(row: LegacyAgentRow) -> Result<Self, StoreError> {
        Ok((
            AgentId::parse(row.agent_id)
                .map_err(|err| StoreError::Corrupt(format!("agent id in registry: {err}")))?,
            u32_of(row.key_version, "agent key version")?,
            row.wrapped_key,
        ))
    }
}

/// The root key record's columns ([`ROOT_KEY_COLUMNS`]).
#[derive(sqlx::FromRow)]
pub(super) struct RootKeyRow {
    key_check: Vec<u8>,
    kdf_salt: Option<Vec<u8>>,
    kdf_m_cost: Option<i64>,
    kdf_t_cost: Option<i64>,
    kdf_p_cost: Option<i64>,
    wrapped_control_key: Option<Vec<u8>>,
    next_key_check: Option<Vec<u8>>,
    next_kdf_salt: Option<Vec<u8>>,
    next_kdf_m_cost: Option<i64>,
    next_kdf_t_cost: Option<i64>,
    next_kdf_p_cost: Option<i64>,
    next_wrapped_control_key: Option<Vec<u8>>,
}

/// What [`RootKeyRow`] reads, the same in both stores (PostgreSQL's integers cast to int8).
pub(super) fn root_key_columns(int8: &str) -> String {
    let cost = |name: &str| format!("{name}{int8} AS {name}");
    format!(
        "key_check, kdf_salt, {}, {}, {}, wrapped_control_key, next_key_check, next_kdf_salt, \
         {}, {}, {}, next_wrapped_control_key",
        cost("kdf_m_cost"),
        cost("kdf_t_cost"),
        cost("kdf_p_cost"),
        cost("next_kdf_m_cost"),
        cost("next_kdf_t_cost"),
        cost("next_kdf_p_cost"),
    )
}

/// Argon2id salt and costs from their columns; `None` without a salt.
fn kdf_of(
    salt: Option<Vec<u8>>,
    costs: [(Option<i64>, &str); 3],
) -> Result<Option<(Vec<u8>, KdfParams)>, StoreError> {
    let Some(salt) = salt else {
        return Ok(None);
    };
    let [m, t, p] = costs.map(|(value, name)| {
        value
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| StoreError::Corrupt(format!("root_key.{name} missing")))
    });
    Ok(Some((
        salt,
        KdfParams {
            m_cost: m?,
            t_cost: t?,
            p_cost: p?,
        },
    )))
}

impl TryFrom<RootKeyRow> for RootKeyRecord {
    type Error = StoreError;

    fn try_from(row: RootKeyRow) -> Result<Self, StoreError> {
        let kdf = kdf_of(
            row.kdf_salt,
            [
                (row.kdf_m_cost, "kdf_m_cost"),
                (row.kdf_t_cost, "kdf_t_cost"),
                (row.kdf_p_cost, "kdf_p_cost"),
            ],
        )?;
        let next = match (row.next_key_check, row.next_wrapped_control_key) {
            (None, _) => None,
            (Some(key_check), Some(wrapped_control_key)) => Some(NextRoot {
                key_check,
                kdf: kdf_of(
                    row.next_kdf_salt,
                    [
                        (row.next_kdf_m_cost, "next_kdf_m_cost"),
                        (row.next_kdf_t_cost, "next_kdf_t_cost"),
                        (row.next_kdf_p_cost, "next_kdf_p_cost"),
                    ],
                )?,
                wrapped_control_key,
            }),
            (Some(_), None) => {
                return Err(StoreError::Corrupt(
                    "root_key.next_wrapped_control_key missing".into(),
                ));
            }
        };
        Ok(Self {
            key_check: row.key_check,
            kdf,
            wrapped_control_key: row.wrapped_control_key,
            next,
        })
    }
}

/// `generation, state, key_version, wrapped_data_key, ciphertext` of a credential.
#[derive(sqlx::FromRow)]
pub(super) struct CredentialRow {
    generation: i64,
    state: i64,
    key_version: i64,
    wrapped_data_key: Vec<u8>,
    ciphertext: Vec<u8>,
}

impl TryFrom<CredentialRow> for StoredCredential {
    type Error = StoreError;

    fn try_from(row: CredentialRow) -> Result<Self, StoreError> {
        Ok(Self {
            generation: generation_of(row.generation)?,
            state: match row.state {
                0 => CredentialState::Active,
                1 => CredentialState::ReauthRequired,
                other => return Err(StoreError::Corrupt(format!("unknown state {other}"))),
            },
            sealed: sealed(row.key_version, row.wrapped_data_key, row.ciphertext)?,
        })
    }
}

/// A credential as a connection list shows it: `tool`, the [`CredentialRow`] columns, and
/// `access_expires_at_ms, ttl_expires_at_ms, updated_at_ms`.
#[derive(sqlx::FromRow)]
pub(super) struct CredentialSummaryRow {
    tool: String,
    #[sqlx(flatten)]
    credential: CredentialRow,
    access_expires_at_ms: Option<i64>,
    ttl_expires_at_ms: i64,
    updated_at_ms: i64,
}

impl TryFrom<CredentialSummaryRow> for CredentialSummary {
    type Error = StoreError;

    fn try_from(row: CredentialSummaryRow) -> Result<Self, StoreError> {
        let stored = StoredCredential::try_from(row.credential)?;
        Ok(Self {
            tool: Tool::parse(row.tool)
                .map_err(|err| StoreError::Corrupt(format!("credential tool: {err}")))?,
            generation: stored.generation,
            state: stored.state,
            sealed: stored.sealed,
            access_expires_at: row.access_expires_at_ms.map(from_ms),
            ttl_expires_at: from_ms(row.ttl_expires_at_ms),
            updated_at: from_ms(row.updated_at_ms),
        })
    }
}

/// `id, issuer, agent_id, namespace, user_id, tool, scopes, return_url, redirect_uri,
/// provider_binding, status, error, sealed_verifier, sealed_code, expires_at_ms, created_at_ms`
/// of a consent flow.
#[derive(sqlx::FromRow)]
pub(super) struct FlowRow {
    id: String,
    issuer: String,
    agent_id: String,
    namespace: String,
    user_id: String,
    tool: String,
    scopes: String,
    return_url: Option<String>,
    redirect_uri: String,
    provider_binding: Option<String>,
    status: i64,
    error: Option<String>,
    sealed_verifier: Option<Vec<u8>>,
    sealed_code: Option<Vec<u8>>,
    expires_at_ms: i64,
    created_at_ms: i64,
}

/// Scopes are stored space-separated, as OAuth's `scope` parameter carries them; a scope token
/// never contains a space (RFC 6749 §3.3), and one that did could not be read back.
pub(super) fn joined_scopes(scopes: &[String]) -> Result<String, StoreError> {
    if let Some(bad) = scopes
        .iter()
        .find(|s| s.is_empty() || s.contains(char::is_whitespace))
    {
        return Err(StoreError::Corrupt(format!(
            "scope {bad:?} cannot be stored: empty or contains whitespace"
        )));
    }
    Ok(scopes.join(" "))
}

impl TryFrom<FlowRow> for Flow {
    type Error = StoreError;

    fn try_from(row: FlowRow) -> Result<Self, StoreError> {
        let status = i16::try_from(row.status)
            .map_err(|_| StoreError::Corrupt(format!("unknown flow status {}", row.status)))
            .and_then(FlowStatus::from_code)?;
        Ok(Self {
            id: row.id,
            issuer: IssuerId::parse(row.issuer)
                .map_err(|err| StoreError::Corrupt(format!("flow issuer: {err}")))?,
            agent: AgentId::parse(row.agent_id)
                .map_err(|err| StoreError::Corrupt(format!("flow agent: {err}")))?,
            namespace: row.namespace,
            user: UserId::parse(row.user_id)
                .map_err(|err| StoreError::Corrupt(format!("flow user: {err}")))?,
            tool: Tool::parse(row.tool)
                .map_err(|err| StoreError::Corrupt(format!("flow tool: {err}")))?,
            scopes: row
                .scopes
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            return_url: row.return_url,
            redirect_uri: row.redirect_uri,
            provider_binding: row.provider_binding,
            status,
            error: row.error,
            sealed_verifier: row.sealed_verifier,
            sealed_code: row.sealed_code,
            expires_at: from_ms(row.expires_at_ms),
            created_at: from_ms(row.created_at_ms),
        })
    }
}

/// `tool, issuer, client_id, sealed_secret, auth_method, secret_expires_at_ms, redirect_uris,
/// registered_at_ms` of a client registration.
#[derive(sqlx::FromRow)]
pub(super) struct RegistrationRow {
    tool: String,
    issuer: String,
    client_id: String,
    sealed_secret: Option<Vec<u8>>,
    auth_method: String,
    secret_expires_at_ms: Option<i64>,
    redirect_uris: String,
    registered_at_ms: i64,
}

/// Redirect URIs are stored one per line, in order. A URI never contains a line break (RFC 3986
/// has no unescaped whitespace), and an empty one could not be told from none, so either is
/// refused rather than stored to read back as something else.
pub(super) fn joined_redirect_uris(uris: &[String]) -> Result<String, StoreError> {
    if let Some(bad) = uris
        .iter()
        .find(|u| u.is_empty() || u.contains(['\n', '\r']))
    {
        return Err(StoreError::Corrupt(format!(
            "redirect URI {bad:?} cannot be stored: empty or contains a line break"
        )));
    }
    Ok(uris.join("\n"))
}

impl TryFrom<RegistrationRow> for Registration {
    type Error = StoreError;

    fn try_from(row: RegistrationRow) -> Result<Self, StoreError> {
        Ok(Self {
            tool: Tool::parse(row.tool)
                .map_err(|err| StoreError::Corrupt(format!("registration tool: {err}")))?,
            issuer: row.issuer,
            client_id: row.client_id,
            sealed_secret: row.sealed_secret,
            auth_method: row.auth_method,
            secret_expires_at: row.secret_expires_at_ms.map(from_ms),
            redirect_uris: row
                .redirect_uris
                .split('\n')
                .filter(|u| !u.is_empty())
                .map(str::to_string)
                .collect(),
            registered_at: from_ms(row.registered_at_ms),
        })
    }
}

/// What a refused refresh lease finds on the row: `generation, state`, `held` (1 while an
/// unexpired lease is on it) and `not_before_ms` (set while a backoff runs).
#[derive(sqlx::FromRow)]
pub(super) struct LeaseProbe {
    pub(super) generation: i64,
    pub(super) state: i64,
    pub(super) held: i64,
    pub(super) not_before_ms: Option<i64>,
}

/// `id, user_id, tool, generation, key_version, wrapped_data_key, ciphertext, attempts,
/// created_at_ms` of an outbox entry.
#[derive(sqlx::FromRow)]
pub(super) struct OutboxRow {
    id: i64,
    user_id: String,
    tool: String,
    generation: i64,
    key_version: i64,
    wrapped_data_key: Vec<u8>,
    ciphertext: Vec<u8>,
    attempts: i64,
    created_at_ms: i64,
}

impl TryFrom<OutboxRow> for OutboxEntry {
    type Error = StoreError;

    fn try_from(row: OutboxRow) -> Result<Self, StoreError> {
        Ok(Self {
            id: row.id,
            user: UserId::parse(row.user_id)
                .map_err(|err| StoreError::Corrupt(format!("outbox user: {err}")))?,
            tool: Tool::parse(row.tool)
                .map_err(|err| StoreError::Corrupt(format!("outbox tool: {err}")))?,
            generation: generation_of(row.generation)?,
            sealed: sealed(row.key_version, row.wrapped_data_key, row.ciphertext)?,
            attempts: u32_of(row.attempts, "outbox attempts")?,
            created_at: from_ms(row.created_at_ms),
        })
    }
}

/// Converts every row, failing on the first that breaks an invariant.
pub(super) fn all<R, T>(rows: Vec<R>) -> Result<Vec<T>, StoreError>
where
    T: TryFrom<R, Error = StoreError>,
{
    rows.into_iter().map(T::try_from).collect()
}

/// The columns of an audit row as [`AuditRow`] names them, for a backend whose time column is
/// already unix milliseconds (SQLite); PostgreSQL selects `at_ms` from its `timestamptz`.
pub(super) const AUDIT_VALUE_COLUMNS: &str = "action, agent, user_id, tool, outcome, generation,
    caller_iss, caller_jti, caller_digest, verified, peer, trace_id, target, hash";

/// `sequence, at_ms`, then [`AUDIT_VALUE_COLUMNS`], of an audit record.
#[derive(sqlx::FromRow)]
pub(super) struct AuditRow {
    sequence: i64,
    at_ms: i64,
    action: String,
    agent: Option<String>,
    user_id: Option<String>,
    tool: Option<String>,
    outcome: String,
    generation: Option<i64>,
    caller_iss: Option<String>,
    caller_jti: Option<String>,
    caller_digest: Option<Vec<u8>>,
    verified: bool,
    peer: Option<String>,
    trace_id: Option<String>,
    target: Option<String>,
    hash: Vec<u8>,
}

pub(super) fn hash_of(bytes: Vec<u8>, what: &str) -> Result<Hash, StoreError> {
    Hash::try_from(bytes.as_slice()).map_err(|_| {
        StoreError::Corrupt(format!(
            "{what} is {} bytes, not a SHA-256 hash",
            bytes.len()
        ))
    })
}

fn u64_of(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} out of range: {value}")))
}

impl TryFrom<AuditRow> for Stored {
    type Error = StoreError;

    // Values are read back as they are, not checked against the id rules: a record edited in
    // the database must reach `audit::verify`, which names it, rather than fail to load.
    fn try_from(row: AuditRow) -> Result<Self, StoreError> {
        Ok(Self {
            record: AuditRecord {
                sequence: u64_of(row.sequence, "audit sequence")?,
                at_ms: row.at_ms,
                action: row.action,
                agent: row.agent,
                user: row.user_id,
                tool: row.tool,
                outcome: match row.outcome.as_str() {
                    "OK" => Outcome::Ok,
                    _ => Outcome::Failed(row.outcome),
                },
                generation: row
                    .generation
                    .map(|g| u64_of(g, "audit generation"))
                    .transpose()?,
                caller_iss: row.caller_iss,
                caller_jti: row.caller_jti,
                caller_digest: row
                    .caller_digest
                    .map(|d| hash_of(d, "caller digest"))
                    .transpose()?,
                verified: row.verified,
                peer: row.peer,
                trace_id: row.trace_id,
                target: row.target,
            },
            hash: hash_of(row.hash, "audit hash")?,
        })
    }
}

/// `anchor_sequence, anchor_hash` of a chain's head.
#[derive(sqlx::FromRow)]
pub(super) struct AnchorRow {
    anchor_sequence: i64,
    anchor_hash: Vec<u8>,
}

impl TryFrom<AnchorRow> for Anchor {
    type Error = StoreError;

    fn try_from(row: AnchorRow) -> Result<Self, StoreError> {
        Ok(Self {
            sequence: u64_of(row.anchor_sequence, "audit anchor")?,
            hash: hash_of(row.anchor_hash, "audit anchor hash")?,
        })
    }
}

/// `last_sequence, last_hash` of a chain's head: where the next append links on.
#[derive(sqlx::FromRow)]
pub(super) struct LastRow {
    pub(super) last_sequence: i64,
    pub(super) last_hash: Vec<u8>,
}

impl TryFrom<LastRow> for Anchor {
    type Error = StoreError;

    fn try_from(row: LastRow) -> Result<Self, StoreError> {
        Ok(Self {
            sequence: u64_of(row.last_sequence, "audit head")?,
            hash: hash_of(row.last_hash, "audit head hash")?,
        })
    }
}

/// `signed_chain, signed_sequence, signed_hash, signed_mac` of a chain's head, all NULL until a
/// head is saved.
#[derive(sqlx::FromRow)]
pub(super) struct SignedHeadRow {
    signed_chain: Option<String>,
    signed_sequence: Option<i64>,
    signed_hash: Option<Vec<u8>>,
    signed_mac: Option<Vec<u8>>,
}

impl TryFrom<SignedHeadRow> for Option<SignedHead> {
    type Error = StoreError;

    fn try_from(row: SignedHeadRow) -> Result<Self, StoreError> {
        match (
            row.signed_chain,
            row.signed_sequence,
            row.signed_hash,
            row.signed_mac,
        ) {
            (Some(chain), Some(sequence), Some(hash), Some(mac)) => Ok(Some(SignedHead {
                chain,
                sequence: u64_of(sequence, "signed head")?,
                hash: hash_of(hash, "signed head hash")?,
                mac,
            })),
            (None, None, None, None) => Ok(None),
            _ => Err(StoreError::Corrupt(
                "a signed audit head is partly stored".into(),
            )),
        }
    }
}
