//! The five measured workloads and the seeded population they draw from.
//!
//! - `echo`: a bare unary tonic call sized like GetToken — the RPC floor.
//! - `select`: GetToken's one point SELECT through sqlx, same pool size — the storage floor.
//! - `insert`: one durable auto-commit INSERT of an audit-record-sized row through sqlx, same
//!   pool — the floor of a read that must also write its audit record.
//! - `get_token`, `store_token`: the real server, real EdDSA caller JWTs, through `vault-client`.
//!
//! Every call is checked, so a fast wrong answer counts as an error rather than a good number.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use base64::Engine as _;
use prost::Message as _;
use sqlx::{PgPool, Row as _};
use tonic::transport::{Channel, Endpoint};
use vault_client::proto::{
    AccessToken, GetTokenRequest, GetTokenResponse, OAuthToken, StoreTokenRequest,
};
use vault_client::{Client, RawClient, TokenSet};

use crate::issuer::Issuer;
use crate::load::{Phases, Sample, drive, drive_while};
use crate::proto::EchoRequest;
use crate::proto::echo_client::EchoClient;

/// The one tool every credential is for.
pub const TOOL: &str = "jira";
/// Concurrent tasks sharing one HTTP/2 connection: enough multiplexing to matter, few enough
/// connections that the bench measures the server, not connection setup.
pub const TASKS_PER_CHANNEL: usize = 16;
/// How far ahead stored access tokens expire: far enough that GetToken never refreshes.
pub const ACCESS_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Caller-token lifetime: longer than any run, within the vault's 24 h maximum.
pub const CALLER_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Bytes of random material in an access or refresh token (64 characters in base64url).
const TOKEN_BYTES: usize = 48;

/// One seeded credential: who calls, and the JWT proving it.
#[derive(Debug, Clone)]
pub struct Credential {
    /// Index into [`Population::agents`].
    pub agent: usize,
    /// The user id (the JWT's `sub`).
    pub user: Arc<str>,
    /// The caller JWT for this (agent, user).
    pub jwt: Arc<str>,
}

/// Every seeded (agent, user) pair, with `TOOL`.
#[derive(Debug, Clone)]
pub struct Population {
    /// Agent ids, `agent-000`….
    pub agents: Vec<String>,
    /// `agents × users` credentials.
    pub credentials: Arc<[Credential]>,
}

impl Population {
    /// `agents × users` callers with freshly signed JWTs.
    pub fn new(issuer: &Issuer, agents: usize, users: usize) -> anyhow::Result<Self> {
        Self::with_agents(
            issuer,
            (0..agents).map(|a| format!("agent-{a:03}")).collect(),
            users,
        )
    }

    /// `users` callers for each of `agent_ids`, with freshly signed JWTs.
    pub fn with_agents(
        issuer: &Issuer,
        agent_ids: Vec<String>,
        users: usize,
    ) -> anyhow::Result<Self> {
        let agents = agent_ids.len();
        let mut credentials = Vec::with_capacity(agents * users);
        for (agent, agent_id) in agent_ids.iter().enumerate() {
            for user in 0..users {
                let user = format!("user-{user:04}");
                let jwt = issuer.token(agent_id, &user, CALLER_TOKEN_LIFETIME)?;
                credentials.push(Credential {
                    agent,
                    user: user.into(),
                    jwt: jwt.into(),
                });
            }
        }
        Ok(Self {
            agents: agent_ids,
            credentials: credentials.into(),
        })
    }

    /// The credential a random `pick` lands on.
    fn pick(&self, pick: u64) -> &Credential {
        &self.credentials[(pick % self.credentials.len() as u64) as usize]
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    fastrand::fill(&mut bytes);
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// A token set as a gateway stores it after consent; the access token expires in an hour.
pub fn oauth_token() -> TokenSet {
    // Whole seconds, as the vault stores them, so the echo shape matches GetToken's reply.
    let expires_at = unix_now() as u64 + ACCESS_TOKEN_LIFETIME.as_secs();
    TokenSet {
        access_token: random_token("at_"),
        refresh_token: Some(random_token("rt_")),
        token_type: "Bearer".into(),
        expires_at: Some(UNIX_EPOCH + Duration::from_secs(expires_at)),
        scopes: vec!["read:jira-work".into(), "offline_access".into()],
    }
}

/// Encoded sizes of a GetToken request and response for the seeded token shape, and the echo
/// request that reproduces both.
#[derive(Debug, Clone)]
pub struct EchoShape {
    /// Bytes of an encoded `GetTokenRequest`.
    pub request_len: usize,
    /// Bytes of an encoded `GetTokenResponse`.
    pub response_len: usize,
    /// Encodes to `request_len` bytes and asks for a `response_len`-byte response.
    pub request: EchoRequest,
}

impl EchoShape {
    /// Sizes the echo call after GetToken for a token set like [`oauth_token`] at about
    /// generation `generation`.
    pub fn like_get_token(generation: u64) -> Self {
        let sample = OAuthToken::from(oauth_token());
        let request_len = GetTokenRequest {
            tool: TOOL.into(),
            min_valid_seconds: 0,
        }
        .encoded_len();
        let response_len = GetTokenResponse {
            token: Some(AccessToken {
                access_token: sample.access_token,
                token_type: sample.token_type,
                expires_at: sample.expires_at,
                scopes: sample.scopes,
                generation,
            }),
            refreshed: false,
        }
        .encoded_len();
        // The response payload k encodes to tag + varint(k) + k; find the k that matches.
        let response_size = (0..=response_len)
            .find(|&k| {
                crate::proto::EchoResponse {
                    payload: vec![0; k],
                }
                .encoded_len()
                    == response_len
            })
            .unwrap_or(response_len);
        let request = (0..=request_len)
            .map(|n| EchoRequest {
                payload: vec![0; n],
                response_size: response_size as u32,
            })
            .find(|r| r.encoded_len() >= request_len)
            .unwrap_or_default();
        Self {
            request_len,
            response_len,
            request,
        }
    }
}

/// `count` HTTP/2 connections to `endpoint`, opened now and kept for the whole run.
pub async fn connect(endpoint: &str, count: usize) -> anyhow::Result<Arc<[Channel]>> {
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        let channel = Endpoint::from_shared(endpoint.to_owned())?
            .tcp_nodelay(true)
            .connect()
            .await?;
        channels.push(channel);
    }
    Ok(channels.into())
}

/// How many connections `concurrency` tasks share.
pub fn channels_for(concurrency: usize) -> usize {
    concurrency.div_ceil(TASKS_PER_CHANNEL)
}

/// The connection task `task` uses: [`TASKS_PER_CHANNEL`] consecutive tasks share one.
pub(crate) fn channel_of(channels: &[Channel], task: usize) -> Channel {
    channels[(task / TASKS_PER_CHANNEL) % channels.len()].clone()
}

/// Stores one credential per pair in `population`, `concurrency` at a time. Each agent's first
/// credential goes first, so schema creation does not race with the bulk of the writes.
pub async fn seed(
    channels: Arc<[Channel]>,
    population: &Population,
    users: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let firsts: Arc<[Credential]> = population
        .credentials
        .iter()
        .step_by(users)
        .cloned()
        .collect();
    let rest: Arc<[Credential]> = population
        .credentials
        .iter()
        .enumerate()
        .filter(|(i, _)| i % users != 0)
        .map(|(_, c)| c.clone())
        .collect();
    for batch in [firsts, rest] {
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..concurrency {
            let batch = Arc::clone(&batch);
            let next = Arc::clone(&next);
            let channel = channel_of(&channels, task);
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(credential) = batch.get(i) else {
                        return Ok::<_, anyhow::Error>(());
                    };
                    let client =
                        Client::from_channel(channel.clone()).with_bearer(&credential.jwt)?;
                    client
                        .store_token(TOOL, oauth_token(), None)
                        .await
                        .map_err(|e| anyhow::anyhow!("seeding StoreToken failed: {e}"))?;
                }
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined??;
        }
    }
    Ok(())
}

/// `echo`: the RPC floor.
pub async fn echo(
    channels: Arc<[Channel]>,
    shape: &EchoShape,
    concurrency: usize,
    phases: Phases,
) -> Sample {
    let clients: Arc<[EchoClient<Channel>]> =
        channels.iter().cloned().map(EchoClient::new).collect();
    let request = shape.request.clone();
    let expected = request.response_size as usize;
    drive(concurrency, phases, move |task, _| {
        let mut client = clients[(task / TASKS_PER_CHANNEL) % clients.len()].clone();
        let request = request.clone();
        async move {
            let response = client
                .echo(request)
                .await
                .map_err(|s| format!("Echo: {s}"))?;
            if response.get_ref().payload.len() != expected {
                return Err("Echo: wrong payload size".into());
            }
            Ok(())
        }
    })
    .await
}

/// The SELECT GetToken runs, per agent schema: each agent's schema as the registry names it (a
/// spare schema taken at registration has a random name, not the identity's hash).
pub async fn select_statements(
    pool: &PgPool,
    issuer: &Issuer,
    population: &Population,
) -> anyhow::Result<Arc<[Arc<str>]>> {
    let mut statements = Vec::with_capacity(population.agents.len());
    for agent in population.agents.iter() {
        let schema: String = sqlx::query_scalar(
            "SELECT schema_name FROM vault.agents WHERE issuer = $1 AND agent_id = $2",
        )
        .bind(issuer.iss.as_str())
        .bind(agent.as_str())
        .fetch_one(pool)
        .await
        .with_context(|| format!("agent {agent} is not registered"))?;
        statements.push(
            format!(
                "SELECT generation, state, key_version, wrapped_data_key, ciphertext \
                 FROM \"{schema}\".credentials \
                 WHERE user_id = $1 AND tool = $2 AND ttl_expires_at > now()"
            )
            .into(),
        );
    }
    Ok(statements.into())
}

/// `select`: the storage floor, decoded the way the server decodes it.
pub async fn select(
    pool: PgPool,
    statements: Arc<[Arc<str>]>,
    population: Population,
    concurrency: usize,
    phases: Phases,
) -> Sample {
    drive(concurrency, phases, move |_, pick| {
        let credential = population.pick(pick);
        let sql = Arc::clone(&statements[credential.agent]);
        let user = Arc::clone(&credential.user);
        let pool = pool.clone();
        async move {
            // Persistent (prepared, cached per connection) by default, like the server's query.
            let row = sqlx::query(&sql)
                .bind(&*user)
                .bind(TOOL)
                .fetch_optional(&pool)
                .await
                .map_err(|e| format!("SELECT: {e}"))?
                .ok_or_else(|| format!("SELECT: no row for {user}"))?;
            let decoded = (|| {
                let generation: i64 = row.try_get(0)?;
                let state: i16 = row.try_get(1)?;
                let _key_version: i32 = row.try_get(2)?;
                let wrapped: Vec<u8> = row.try_get(3)?;
                let ciphertext: Vec<u8> = row.try_get(4)?;
                Ok::<_, sqlx::Error>(
                    generation > 0 && state == 0 && !wrapped.is_empty() && !ciphertext.is_empty(),
                )
            })()
            .map_err(|e| format!("SELECT decode: {e}"))?;
            if !decoded {
                return Err("SELECT: unexpected row".into());
            }
            Ok(())
        }
    })
    .await
}

/// The `insert` floor's table: bench-owned, created by [`create_audit_floor`] in the run's own
/// database and dropped by [`drop_audit_floor`]. Its columns are a subset of an agent's
/// `audit_log` (same types, a `bigint` primary key that only grows), sized so a row is about
/// 200 bytes on disk; it has none of the log's chain or rights, because the floor is the write
/// alone.
pub const AUDIT_FLOOR_TABLE: &str = "vault_bench_audit_floor";

/// Creates [`AUDIT_FLOOR_TABLE`], empty.
pub async fn create_audit_floor(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(&format!(
        "DROP TABLE IF EXISTS {AUDIT_FLOOR_TABLE};
         CREATE TABLE {AUDIT_FLOOR_TABLE} (
             sequence    bigint PRIMARY KEY,
             at          timestamptz NOT NULL,
             action      text NOT NULL,
             agent       text,
             user_id     text,
             tool        text,
             outcome     text NOT NULL,
             caller_iss  text,
             caller_jti  text,
             trace_id    text,
             hash        bytea NOT NULL
         )"
    ))
    .execute(pool)
    .await?;
    Ok(())
}

/// The average size of a row of [`AUDIT_FLOOR_TABLE`] as PostgreSQL stores it (tuple header
/// included), in bytes; 0 while it is empty.
pub async fn audit_floor_row_bytes(pool: &PgPool) -> anyhow::Result<f64> {
    let bytes: Option<f64> = sqlx::query_scalar(&format!(
        "SELECT avg(pg_column_size(t.*))::float8 FROM {AUDIT_FLOOR_TABLE} t"
    ))
    .fetch_one(pool)
    .await?;
    Ok(bytes.unwrap_or(0.0))
}

/// Drops [`AUDIT_FLOOR_TABLE`], so its rows and any autovacuum of them stay out of the cells
/// that follow.
pub async fn drop_audit_floor(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {AUDIT_FLOOR_TABLE}"))
        .execute(pool)
        .await?;
    Ok(())
}

/// What the server decides about commit durability, as `(synchronous_commit, fsync)`: the
/// `insert` floor leaves both at the database's settings, so the report says what they were.
pub async fn commit_durability(pool: &PgPool) -> anyhow::Result<(String, String)> {
    let synchronous_commit: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(pool)
        .await?;
    let fsync: String = sqlx::query_scalar("SHOW fsync").fetch_one(pool).await?;
    Ok((synchronous_commit, fsync))
}

/// `insert`: the audit-write floor. One auto-commit INSERT per call, so each call waits for its
/// own commit (durable unless the database's `synchronous_commit` or `fsync` says otherwise).
/// `sequence` hands out the primary keys and must not repeat across cells of one table.
pub async fn insert(
    pool: PgPool,
    population: Population,
    iss: Arc<str>,
    sequence: Arc<AtomicI64>,
    concurrency: usize,
    phases: Phases,
) -> Sample {
    // `at` is the database's `now()` where the server binds its own clock: the same column and
    // round trip, without a date-time crate in the bench.
    let sql: Arc<str> = format!(
        "INSERT INTO {AUDIT_FLOOR_TABLE} \
         (sequence, at, action, agent, user_id, tool, outcome, caller_iss, caller_jti, trace_id, hash) \
         VALUES ($1, now(), $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    )
    .into();
    drive(concurrency, phases, move |_, pick| {
        let credential = population.pick(pick);
        let agent = population.agents[credential.agent].clone();
        let user = Arc::clone(&credential.user);
        let iss = Arc::clone(&iss);
        let sequence = sequence.fetch_add(1, Ordering::Relaxed);
        // What a release record carries: a token id, a trace id and a 32-byte chain hash, fresh
        // per call as a real record's are.
        let jti = uuid::Uuid::from_u64_pair(pick, fastrand::u64(..)).to_string();
        let trace_id = format!("{:032x}", fastrand::u128(..));
        let mut hash = [0u8; 32];
        fastrand::fill(&mut hash);
        let sql = Arc::clone(&sql);
        let pool = pool.clone();
        async move {
            // Persistent (prepared, cached per connection) by default, like the server's.
            let done = sqlx::query(&sql)
                .bind(sequence)
                .bind("get_token")
                .bind(agent)
                .bind(&*user)
                .bind(TOOL)
                .bind("OK")
                .bind(&*iss)
                .bind(jti)
                .bind(trace_id)
                .bind(&hash[..])
                .execute(&pool)
                .await
                .map_err(|e| format!("INSERT: {e}"))?;
            if done.rows_affected() != 1 {
                return Err(format!("INSERT: {} rows", done.rows_affected()));
            }
            Ok(())
        }
    })
    .await
}

/// A generated client for `channel` that sends `jwt` on every call. The raw client, not the
/// typed methods: those retry UNAVAILABLE, and a retried call must count as a failure here,
/// not as one slow success.
pub(crate) fn raw_client(channel: Channel, jwt: &str) -> Result<RawClient, String> {
    // A client is a channel handle plus an interceptor; making one per call costs well under
    // a microsecond and lets every call carry its own caller's JWT.
    Client::from_channel(channel)
        .with_bearer(jwt)
        .map(|client| client.raw())
        .map_err(|e| e.to_string())
}

/// `get_token`: GetToken through the real server for a random seeded caller.
pub async fn get_token(
    channels: Arc<[Channel]>,
    population: Population,
    concurrency: usize,
    phases: Phases,
) -> Sample {
    let count = population.credentials.len() as u64;
    get_token_picking(channels, population, concurrency, phases, move |pick| {
        (pick % count) as usize
    })
    .await
}

/// GetToken as [`get_token`] does, uniformly over `population`, until `running` turns false:
/// the reads of existing agents beside another workload.
pub async fn get_token_while(
    channels: Arc<[Channel]>,
    population: Population,
    concurrency: usize,
    running: Arc<AtomicBool>,
) -> Sample {
    let count = population.credentials.len() as u64;
    drive_while(concurrency, running, move |task, pick| {
        let credential = &population.credentials[(pick % count) as usize];
        checked_get_token(channel_of(&channels, task), Arc::clone(&credential.jwt))
    })
    .await
}

/// GetToken through the real server for the caller `choose(pick)` names (an index into
/// [`Population::credentials`]) for each random `pick`: how the calls spread over the callers
/// is the caller's to decide.
pub async fn get_token_picking<C>(
    channels: Arc<[Channel]>,
    population: Population,
    concurrency: usize,
    phases: Phases,
    choose: C,
) -> Sample
where
    C: Fn(u64) -> usize + Send + Sync + 'static,
{
    drive(concurrency, phases, move |task, pick| {
        let credential = &population.credentials[choose(pick)];
        checked_get_token(channel_of(&channels, task), Arc::clone(&credential.jwt))
    })
    .await
}

/// One GetToken over `channel` as the caller `jwt` proves, checked: it must return the stored
/// access token without refreshing it.
pub(crate) async fn checked_get_token(channel: Channel, jwt: Arc<str>) -> Result<(), String> {
    let response = raw_client(channel, &jwt)?
        .get_token(GetTokenRequest {
            tool: TOOL.into(),
            min_valid_seconds: 0,
        })
        .await
        .map_err(|s| format!("GetToken: {}", vault_client::Error::from(s)))?
        .into_inner();
    if response.refreshed {
        return Err("GetToken refreshed a token that expires in an hour".into());
    }
    match response.token {
        Some(token) if token.access_token.starts_with("at_") => Ok(()),
        _ => Err("GetToken returned no or an unexpected access token".into()),
    }
}

/// `store_token`: StoreToken through the real server, overwriting a random seeded credential
/// with a new token set of the same shape.
pub async fn store_token(
    channels: Arc<[Channel]>,
    population: Population,
    concurrency: usize,
    phases: Phases,
) -> Sample {
    // Converted once, outside the timed calls.
    let token = OAuthToken::from(oauth_token());
    drive(concurrency, phases, move |task, pick| {
        let client = raw_client(channel_of(&channels, task), &population.pick(pick).jwt);
        let request = StoreTokenRequest {
            tool: TOOL.into(),
            token: Some(token.clone()),
            ttl_seconds: 0,
        };
        async move {
            let response = client?
                .store_token(request)
                .await
                .map_err(|s| format!("StoreToken: {}", vault_client::Error::from(s)))?
                .into_inner();
            if response.generation == 0 {
                return Err("StoreToken returned generation 0".into());
            }
            Ok(())
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn the_echo_call_has_get_tokens_encoded_sizes() {
        let shape = EchoShape::like_get_token(12_345);
        assert_eq!(shape.request.encoded_len(), shape.request_len);
        let response = crate::proto::EchoResponse {
            payload: vec![0; shape.request.response_size as usize],
        };
        assert_eq!(response.encoded_len(), shape.response_len);
    }

    #[test]
    fn sixteen_tasks_share_a_connection() {
        assert_eq!(channels_for(1), 1);
        assert_eq!(channels_for(16), 1);
        assert_eq!(channels_for(17), 2);
        assert_eq!(channels_for(64), 4);
    }
}
