//! The PostgreSQL store: control schema `vault` plus one schema per agent, each table group in
//! its own file with the same names as the SQLite store's.
//!
//! Schema names come only from [`namespace_for`] (a hash of the agent id) and are re-checked by
//! [`quoted`] before they are spliced into SQL; every value is a bind parameter.

mod agent_keys;
mod audit;
mod credentials;
mod flows;
mod keys;
mod lanes;
mod leases;
mod listen;
mod outbox;
mod registrations;
mod schema;
mod wakeups;

use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor as _};

use super::StoreError;
use crate::config::DatabaseSettings;
use crate::ids::{AgentId, IssuerId};
use lanes::ReadLanes;
pub use listen::{AUDIT_CHANNEL, AuditListener};

/// The schema of an agent: `agent_` and 40 hex digits of SHA-256 of the issuer and the id. Fits
/// PostgreSQL's 63-byte identifier limit, and no agent id can inject anything through it.
/// (Agents registered before issuers were part of the identity keep the schema they were given,
/// a hash of the id alone: the registry stores each agent's schema name.)
pub fn namespace_for(issuer: &IssuerId, agent: &AgentId) -> String {
    format!(
        "agent_{}",
        &hex::encode(identity_digest(issuer, agent))[..40]
    )
}

/// SHA-256 of the length-prefixed issuer followed by the agent id, so no two (issuer, agent)
/// pairs hash the same input.
fn identity_digest(issuer: &IssuerId, agent: &AgentId) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update((issuer.as_str().len() as u32).to_be_bytes());
    hash.update(issuer.as_str().as_bytes());
    hash.update(agent.as_str().as_bytes());
    hash.finalize().into()
}

/// The schema name quoted for SQL, after checking it is one [`namespace_for`] could have made.
fn quoted(namespace: &str) -> Result<String, StoreError> {
    let ok = namespace.len() == 46
        && namespace.starts_with("agent_")
        && namespace[6..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !ok {
        return Err(StoreError::Corrupt(format!(
            "schema name {namespace:?} is not a vault agent schema"
        )));
    }
    Ok(format!("\"{namespace}\""))
}

/// Drops a vault database and the roles it made (roles are cluster-wide and outlive the
/// database): `database_url` names the vault database, `admin` is a connection to another
/// database of the same server with the right to drop both.
pub async fn drop_database_and_roles(
    admin: &mut sqlx::PgConnection,
    database_url: &str,
    name: &str,
) -> Result<(), sqlx::Error> {
    let prefix: Option<String> = match sqlx::PgConnection::connect(database_url).await {
        Ok(mut conn) => {
            let prefix = sqlx::query_scalar("SELECT role_prefix FROM vault.instance WHERE id = 1")
                .fetch_optional(&mut conn)
                .await
                .ok()
                .flatten();
            let _ = conn.close().await;
            prefix
        }
        Err(_) => None,
    };
    let quoted_name = format!("\"{}\"", name.replace('"', "\"\""));
    admin
        .execute(format!("DROP DATABASE IF EXISTS {quoted_name} WITH (FORCE)").as_str())
        .await?;
    if let Some(prefix) = prefix {
        let roles: Vec<String> =
            sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1)")
                .bind(format!("{prefix}_"))
                .fetch_all(&mut *admin)
                .await?;
        for role in roles {
            admin
                .execute(format!("DROP ROLE IF EXISTS \"{}\"", role.replace('"', "\"\"")).as_str())
                .await?;
        }
    }
    Ok(())
}

/// A transaction-scoped advisory lock key for one agent.
fn agent_lock_key(issuer: &IssuerId, agent: &AgentId) -> i64 {
    let digest = identity_digest(issuer, agent);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

fn e(err: sqlx::Error) -> StoreError {
    StoreError::from_sqlx(err)
}

/// The smallest statement cache whose filling up closes a pool connection: far more than the
/// vault's own control statements, so only agents' statements can fill it.
const RECYCLE_AT_LEAST: usize = 256;

/// PostgreSQL-backed [`Store`](super::Store).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    reads: std::sync::Arc<ReadLanes>,
    /// Per-agent roles (DESIGN §4): every statement on an agent schema runs under that agent's
    /// own role, which holds rights on that schema alone.
    agent_roles: bool,
    /// This vault's role-name prefix (`vault.instance`), known once the control schema is.
    role_prefix: std::sync::Arc<std::sync::OnceLock<String>>,
    /// A login role that `migrate` makes a member of the serving group.
    serving_role: Option<String>,
    /// Where this process last saw each audit chain end (a guess every append checks).
    heads: std::sync::Arc<audit::Heads>,
    /// What `migrate` records as the audit retention floor.
    audit_retention_days: u32,
    /// Notified by each registration, which may have taken a spare schema.
    spare_taken: std::sync::Arc<tokio::sync::Notify>,
    /// Chains with new records, for other replicas' watchers: sent after the records commit.
    peers: wakeups::PeerWakeups,
}

/// How far ahead the background work on an agent is scheduled at most when nothing is due
/// sooner (its `sweep_due` and `outbox_due`, control migrations 0016 and 0017): between half a
/// day and a day, at random, so that idle agents do not fall due all at once. A day is the
/// longest a write that did not move the schedule (its process died between its commit and the
/// move, or it ran an older version) waits for its sweep or its revocation.
const AT_LEAST_DAILY: &str = "interval '12 hours' + random() * interval '12 hours'";

impl PgStore {
    /// Connects a pool. Nothing is created until [`Store::migrate`].
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, StoreError> {
        let crate::config::Database::Postgres(url) = &settings.database else {
            return Err(StoreError::Corrupt(
                "not a PostgreSQL database setting".into(),
            ));
        };
        let options: PgConnectOptions = url
            .expose_secret()
            .parse::<PgConnectOptions>()
            .map_err(StoreError::Database)?
            .application_name("vault-server")
            .statement_cache_capacity(settings.statement_cache);
        // The connection budget is split: half for the hot read lanes, the rest for the pool
        // (writes, leases, the sweeper); each side gets at least one.
        let lanes = (settings.max_connections / 2).max(1);
        let statement_cache = settings.statement_cache.max(1);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections.saturating_sub(lanes).max(1))
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            // A ping per acquire doubles the round trips of a query; a dead connection
            // surfaces as a query error instead, and the pool replaces it.
            .test_before_acquire(false)
            // Each agent's SQL names its schema, so a connection whose statement cache is full
            // has served hundreds of agents, and its backend caches all their catalog entries:
            // it is closed rather than kept, which bounds each backend's memory (the read lanes
            // do the same by counting schemas).
            .after_release(move |conn, _| {
                // A cache too small to hold more than the control statements would fill without
                // any agent, and close every connection: recycling needs room for agents.
                let full = statement_cache >= RECYCLE_AT_LEAST
                    && conn.cached_statements_size() >= statement_cache;
                Box::pin(async move { Ok(!full) })
            })
            .connect_with(options.clone())
            .await
            .map_err(e)?;
        let peers = wakeups::PeerWakeups::new(options.clone());
        let reads = std::sync::Arc::new(ReadLanes::new(
            options,
            lanes,
            settings.schemas_per_connection,
        ));
        Ok(Self {
            pool,
            reads,
            agent_roles: settings.agent_roles,
            role_prefix: std::sync::Arc::default(),
            serving_role: settings.serving_role.clone(),
            heads: std::sync::Arc::default(),
            audit_retention_days: settings.audit_retention_days,
            spare_taken: std::sync::Arc::default(),
            peers,
        })
    }

    /// The role of an agent schema, quoted for SQL: the vault's prefix and the schema's hash.
    fn agent_role(&self, namespace: &str) -> Result<String, StoreError> {
        quoted(namespace)?;
        let prefix = self.role_prefix.get().ok_or_else(|| {
            StoreError::Corrupt("the role prefix is read before any agent query".into())
        })?;
        Ok(format!("\"{prefix}_{}\"", &namespace["agent_".len()..]))
    }

    /// A transaction on one agent's schema. With per-agent roles it runs under that agent's
    /// role (`SET LOCAL ROLE`), so a statement in it cannot touch any other agent's tables,
    /// whatever its SQL says. The switch runs inside the transaction sqlx already tracks: if it
    /// fails, or the caller goes away, dropping the transaction rolls it back, and the
    /// connection never returns to the pool mid-transaction or under an agent's role.
    async fn agent_tx(
        &self,
        namespace: &str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(e)?;
        self.set_agent_role(&mut tx, namespace).await?;
        Ok(tx)
    }

    /// Switches `tx` to the role of the agent schema `namespace`, with per-agent roles on.
    async fn set_agent_role(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        namespace: &str,
    ) -> Result<(), StoreError> {
        if self.agent_roles {
            let role = self.agent_role(namespace)?;
            tx.execute(format!("SET LOCAL ROLE {role}").as_str())
                .await
                .map_err(e)?;
        }
        Ok(())
    }

    /// Switches `tx` back from an agent's role to the serving login, to write the registry.
    async fn reset_role(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    ) -> Result<(), StoreError> {
        if self.agent_roles {
            tx.execute("SET LOCAL ROLE NONE").await.map_err(e)?;
        }
        Ok(())
    }

    /// A transaction on one agent's schema, as [`Self::agent_tx`], for a write of seals made
    /// under the agent key `version`: it first passes the write fence
    /// (`vault.fence_agent_key_scheduled`), which holds the agent's key at `version` until the
    /// transaction ends, or answers [`StoreError::AgentKeyRotated`] when a rotation has made
    /// another version current. With per-agent roles the fence and the switch to the agent's
    /// role are one statement (the fence is the owner's function, which the agent's role may not
    /// call). Also answers the agent's `sweep_due` read under the fence when it is still ahead
    /// (control migration 0018): a credential whose TTL is not earlier needs no lowering of it.
    pub(super) async fn sealing_tx(
        &self,
        namespace: &str,
        version: u32,
    ) -> Result<
        (
            sqlx::Transaction<'static, sqlx::Postgres>,
            Option<DateTime<Utc>>,
        ),
        StoreError,
    > {
        let mut tx = self.pool.begin().await.map_err(e)?;
        let (current, sweep_ahead): (bool, Option<DateTime<Utc>>) = if self.agent_roles {
            let role = self.agent_role(namespace)?;
            // The quoted name is a prefix and a hex hash: no quote inside to unescape.
            let role = role.trim_matches('"');
            // The role is switched only once the fence passed (a refused transaction is dropped
            // and rolled back either way).
            sqlx::query_as(
                "SELECT CASE WHEN f.fenced THEN set_config('role', $3, true) IS NOT NULL
                             ELSE false END,
                        f.sweep_ahead
                 FROM vault.fence_agent_key_scheduled($1, $2) AS f",
            )
            .bind(namespace)
            .bind(version as i32)
            .bind(role)
            .fetch_one(&mut *tx)
            .await
            .map_err(e)?
        } else {
            sqlx::query_as(
                "SELECT f.fenced, f.sweep_ahead FROM vault.fence_agent_key_scheduled($1, $2) AS f",
            )
            .bind(namespace)
            .bind(version as i32)
            .fetch_one(&mut *tx)
            .await
            .map_err(e)?
        };
        if !current {
            return Err(StoreError::AgentKeyRotated);
        }
        Ok((tx, sweep_ahead))
    }

    /// How many statements naming an agent's credentials each hot read lane's connection keeps
    /// prepared (a diagnostic: each agent schema has its own SQL, and all of it should stay
    /// prepared, on the agent's own lane).
    pub async fn prepared_read_statements(&self) -> Result<Vec<i64>, StoreError> {
        self.reads.prepared_agent_statements().await.map_err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schema_name_is_a_fixed_length_hash_whatever_the_agent_id() {
        let issuer = IssuerId::parse("https://issuer.example").unwrap();
        let hostile = AgentId::parse("x\"; DROP SCHEMA vault CASCADE; --").unwrap();
        let name = namespace_for(&issuer, &hostile);
        assert_eq!(name.len(), 46);
        assert!(quoted(&name).is_ok());
        assert_ne!(name, namespace_for(&issuer, &AgentId::parse("y").unwrap()));
        let other = IssuerId::parse("https://other.example").unwrap();
        assert_ne!(
            name,
            namespace_for(&other, &hostile),
            "issuers never share a schema"
        );
    }

    #[test]
    fn a_schema_name_not_made_by_the_hash_is_refused() {
        assert!(quoted("public").is_err());
        assert!(quoted("agent_\"; drop").is_err());
    }
}
