//! Each agent schema's `credentials` table and its generation sequence.

use chrono::{DateTime, Utc};
use sqlx::FromRow as _;

use super::audit::append_agent;
use super::{AT_LEAST_DAILY, PgStore, e, quoted};
use crate::audit::AuditRecord;
use crate::ids::{Generation, Tool, UserId};
use crate::store::rows::{CredentialRow, CredentialSummaryRow, generation_of};
use crate::store::{
    AgentRecord, CredentialKey, CredentialStore, CredentialSummary, NewCredential, NextCredential,
    StoreError, StoredCredential, SweepOutcome, Upserted,
};

#[async_trait::async_trait]
impl CredentialStore for PgStore {
    #[tracing::instrument(skip_all)]
    async fn next_generation(&self, agent: &AgentRecord) -> Result<Generation, StoreError> {
        let sql = format!(
            "SELECT nextval('{}.generation_seq')",
            quoted(&agent.namespace)?
        );
        let mut tx = self.agent_tx(&agent.namespace).await?;
        let value: i64 = sqlx::query_scalar(&sql)
            .fetch_one(&mut *tx)
            .await
            .map_err(e)?;
        tx.commit().await.map_err(e)?;
        generation_of(value)
    }

    #[tracing::instrument(skip_all)]
    async fn upsert(
        &self,
        key: CredentialKey<'_>,
        new: NewCredential<'_>,
        audit: Vec<AuditRecord>,
    ) -> Result<Upserted, StoreError> {
        let (tx, sweep_ahead) = self
            .sealing_tx(&key.agent.namespace, new.sealed.key_version)
            .await?;
        self.write_credential_in(tx, sweep_ahead, key, new, audit)
            .await
    }

    /// The generation is taken in the write's transaction, after its key fence: one transaction
    /// and one commit per write (a sequence's first value is a logged, flushed commit of its own
    /// otherwise, which every new agent's first store paid).
    #[tracing::instrument(skip_all)]
    async fn upsert_next(
        &self,
        key: CredentialKey<'_>,
        next: NextCredential<'_>,
        mut audit: Vec<AuditRecord>,
    ) -> Result<(Generation, Upserted), StoreError> {
        let (mut tx, sweep_ahead) = self
            .sealing_tx(&key.agent.namespace, next.key_version)
            .await?;
        let value: i64 = sqlx::query_scalar(&format!(
            "SELECT nextval('{}.generation_seq')",
            quoted(&key.agent.namespace)?
        ))
        .fetch_one(&mut *tx)
        .await
        .map_err(e)?;
        let generation = generation_of(value)?;
        if let Some(record) = audit.last_mut() {
            record.generation = Some(generation.get());
        }
        let sealed = (next.seal)(generation);
        if sealed.key_version != next.key_version {
            // The fence above checked `key_version`; a seal under another must not commit.
            return Err(StoreError::AgentKeyRotated);
        }
        let new = NewCredential {
            generation,
            sealed: &sealed,
            access_expires_at: next.access_expires_at,
            ttl_seconds: next.ttl_seconds,
        };
        let upserted = self
            .write_credential_in(tx, sweep_ahead, key, new, audit)
            .await?;
        Ok((generation, upserted))
    }

    #[tracing::instrument(skip_all)]
    async fn load(&self, key: CredentialKey<'_>) -> Result<Option<StoredCredential>, StoreError> {
        let sql = format!(
            "SELECT generation, state::int8 AS state, key_version::int8 AS key_version,
                    wrapped_data_key, ciphertext
             FROM {}.credentials
             WHERE user_id = $1 AND tool = $2 AND ttl_expires_at > now()",
            quoted(&key.agent.namespace)?
        );
        let role = if self.agent_roles {
            Some(self.agent_role(&key.agent.namespace)?)
        } else {
            None
        };
        let row = self
            .reads
            .fetch_optional(
                role.as_deref(),
                sqlx::query(&sql)
                    .bind(key.user.as_str())
                    .bind(key.tool.as_str()),
            )
            .await
            .map_err(e)?;
        row.map(|row| StoredCredential::try_from(CredentialRow::from_row(&row).map_err(e)?))
            .transpose()
    }

    #[tracing::instrument(skip_all)]
    async fn load_releasing(
        &self,
        key: CredentialKey<'_>,
        release: &crate::store::Release,
    ) -> Result<(Option<StoredCredential>, Option<u64>), StoreError> {
        super::audit::load_releasing(self, key, release).await
    }

    #[tracing::instrument(skip_all)]
    async fn list(
        &self,
        agent: &AgentRecord,
        user: &UserId,
    ) -> Result<Vec<CredentialSummary>, StoreError> {
        // Byte order of tool names (COLLATE "C"), the order SQLite gives too.
        let sql = format!(
            "SELECT tool, generation, state::int8 AS state, key_version::int8 AS key_version,
                    wrapped_data_key, ciphertext,
                    floor(extract(epoch FROM access_expires_at) * 1000)::int8 AS access_expires_at_ms,
                    floor(extract(epoch FROM ttl_expires_at) * 1000)::int8 AS ttl_expires_at_ms,
                    floor(extract(epoch FROM updated_at) * 1000)::int8 AS updated_at_ms
             FROM {}.credentials
             WHERE user_id = $1
             ORDER BY tool COLLATE \"C\"",
            quoted(&agent.namespace)?
        );
        let role = if self.agent_roles {
            Some(self.agent_role(&agent.namespace)?)
        } else {
            None
        };
        let rows = self
            .reads
            .fetch_all(role.as_deref(), sqlx::query(&sql).bind(user.as_str()))
            .await
            .map_err(e)?;
        rows.iter()
            .map(|row| CredentialSummary::try_from(CredentialSummaryRow::from_row(row).map_err(e)?))
            .collect()
    }

    #[tracing::instrument(skip_all)]
    async fn delete(
        &self,
        agent: &AgentRecord,
        user: &UserId,
        tool: Option<&Tool>,
        audit: Vec<AuditRecord>,
    ) -> Result<u64, StoreError> {
        let schema = quoted(&agent.namespace)?;
        let mut tx = self.agent_tx(&agent.namespace).await?;
        let result = match tool {
            Some(tool) => {
                sqlx::query(&format!(
                    "DELETE FROM {schema}.credentials WHERE user_id = $1 AND tool = $2"
                ))
                .bind(user.as_str())
                .bind(tool.as_str())
                .execute(&mut *tx)
                .await
            }
            None => {
                sqlx::query(&format!(
                    "DELETE FROM {schema}.credentials WHERE user_id = $1"
                ))
                .bind(user.as_str())
                .execute(&mut *tx)
                .await
            }
        }
        .map_err(e)?;
        let appended = append_agent(self, &mut tx, &agent.namespace, audit).await?;
        self.commit_appended(tx, &agent.namespace, &appended)
            .await?;
        Ok(result.rows_affected())
    }

    #[tracing::instrument(skip_all)]
    async fn complete_refresh(
        &self,
        key: CredentialKey<'_>,
        old: Generation,
        new: NewCredential<'_>,
        audit: Vec<AuditRecord>,
    ) -> Result<bool, StoreError> {
        let schema = quoted(&key.agent.namespace)?;
        // A refresh keeps the row's TTL: the schedule needs no lowering.
        let (mut tx, _) = self
            .sealing_tx(&key.agent.namespace, new.sealed.key_version)
            .await?;
        // Compare-and-swap on the generation read before the provider call: if a StoreToken
        // (or anything else) wrote meanwhile, its newer value stands and this write is dropped.
        let written = sqlx::query(&format!(
            "UPDATE {schema}.credentials
             SET generation = $4, key_version = $5, wrapped_data_key = $6, ciphertext = $7,
                 access_expires_at = $8, refresh_lease_owner = NULL, refresh_lease_until = NULL,
                 refresh_failures = 0, refresh_not_before = NULL, updated_at = now()
             WHERE user_id = $1 AND tool = $2 AND generation = $3"
        ))
        .bind(key.user.as_str())
        .bind(key.tool.as_str())
        .bind(old.get() as i64)
        .bind(new.generation.get() as i64)
        .bind(new.sealed.key_version as i32)
        .bind(&new.sealed.wrapped_data_key)
        .bind(&new.sealed.ciphertext)
        .bind(new.access_expires_at)
        .execute(&mut *tx)
        .await
        .map_err(e)?
        .rows_affected();
        let appended = if written == 1 {
            append_agent(self, &mut tx, &key.agent.namespace, audit).await?
        } else {
            Vec::new()
        };
        self.commit_appended(tx, &key.agent.namespace, &appended)
            .await?;
        Ok(written == 1)
    }

    #[tracing::instrument(skip_all)]
    async fn mark_reauth_required(
        &self,
        key: CredentialKey<'_>,
        generation: Generation,
        audit: Vec<AuditRecord>,
    ) -> Result<(), StoreError> {
        let schema = quoted(&key.agent.namespace)?;
        let mut tx = self.agent_tx(&key.agent.namespace).await?;
        let marked = sqlx::query(&format!(
            "UPDATE {schema}.credentials
             SET state = 1, refresh_lease_owner = NULL, refresh_lease_until = NULL, updated_at = now()
             WHERE user_id = $1 AND tool = $2 AND generation = $3"
        ))
        .bind(key.user.as_str())
        .bind(key.tool.as_str())
        .bind(generation.get() as i64)
        .execute(&mut *tx)
        .await
        .map_err(e)?
        .rows_affected();
        let appended = if marked == 1 {
            append_agent(self, &mut tx, &key.agent.namespace, audit).await?
        } else {
            Vec::new()
        };
        self.commit_appended(tx, &key.agent.namespace, &appended)
            .await?;
        Ok(())
    }

    /// Visits only the agents whose `sweep_due` has passed (control migration 0016), at most
    /// `limit` of them, earliest first.
    #[tracing::instrument(skip_all)]
    async fn sweep(
        &self,
        limit: u32,
        dry_run: bool,
        revoke: bool,
    ) -> Result<SweepOutcome, StoreError> {
        let agents: Vec<(String, String)> =
            // Agents behind this version's per-agent migrations wait for their upgrade (the
            // background job's or their first use's).
            sqlx::query_as(
                "SELECT schema_name, agent_id FROM vault.agents
                 WHERE coalesce(sweep_due, '-infinity') <= now() AND schema_version >= $1
                 ORDER BY coalesce(sweep_due, '-infinity') LIMIT $2",
            )
            .bind(super::schema::latest_agent_version())
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(e)?;
        let all_due_seen = agents.len() < limit as usize;
        let mut swept: u64 = 0;
        for (namespace, agent) in agents {
            let remaining = u64::from(limit) - swept;
            if remaining == 0 {
                break;
            }
            let visit = if dry_run {
                self.count_expired(&namespace, remaining).await
            } else {
                self.sweep_agent(&namespace, &agent, remaining, revoke)
                    .await
            };
            // One agent that fails (its schema damaged, say) must not hold up the others'
            // sweep: it stays due, and is tried again at the next pass.
            match visit {
                Ok(n) => swept += n,
                Err(err) => tracing::error!(
                    error = %crate::telemetry::error_chain(&err),
                    schema = %namespace,
                    "cannot sweep the agent's credentials"
                ),
            }
        }
        Ok(SweepOutcome {
            swept,
            more: swept >= u64::from(limit) || !all_due_seen,
        })
    }
}

impl PgStore {
    /// How many of the agent's credentials are past their TTL, counting at most `limit`.
    async fn count_expired(&self, namespace: &str, limit: u64) -> Result<u64, StoreError> {
        let schema = quoted(namespace)?;
        let mut tx = self.agent_tx(namespace).await?;
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM (SELECT 1 FROM {schema}.credentials
             WHERE ttl_expires_at <= now() LIMIT $1) AS expired"
        ))
        .bind(limit as i64)
        .fetch_one(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        Ok(n as u64)
    }

    /// Deletes at most `limit` of the agent's credentials past their TTL (queuing them for
    /// revocation with `revoke`), records each, and moves the agent's `sweep_due` to the
    /// earliest TTL left; how many it deleted. An agent another sweeper holds, or that is no
    /// longer due, is left alone.
    async fn sweep_agent(
        &self,
        namespace: &str,
        agent: &str,
        limit: u64,
        revoke: bool,
    ) -> Result<u64, StoreError> {
        let schema = quoted(namespace)?;
        let mut tx = self.pool.begin().await.map_err(e)?;
        // Held to the commit: a credential written meanwhile lowers `sweep_due` after this
        // sweep's update, not before it (migrations/control/0016_sweep_due.sql). FOR UPDATE
        // also waits out, and keeps out, the stores between their key fence and their commit,
        // which this sweep's snapshot cannot see and which may skip the lowering (0018). A busy
        // agent, with a store in flight, is swept under the weaker lock and left due.
        let quiet = lock_if_due(&mut tx, namespace, "UPDATE").await?;
        if !quiet && !lock_if_due(&mut tx, namespace, "NO KEY UPDATE").await? {
            return Ok(0);
        }
        self.set_agent_role(&mut tx, namespace).await?;
        // SKIP LOCKED: concurrent sweepers (or a request holding a row) split the work instead
        // of queueing; the statement's own rows are what is reported, so a row is counted (and
        // recorded) by exactly the sweeper that removed it. With `revoke`, what is deleted is
        // queued for provider revocation in the same statement.
        let delete = format!(
            "DELETE FROM {schema}.credentials WHERE (user_id, tool) IN (
                 SELECT user_id, tool FROM {schema}.credentials
                 WHERE ttl_expires_at <= now()
                 ORDER BY ttl_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)
             AND ttl_expires_at <= now()"
        );
        let sql = if revoke {
            format!(
                "WITH gone AS ({delete}
                     RETURNING user_id, tool, generation, key_version, wrapped_data_key, ciphertext)
                 INSERT INTO {schema}.revocation_outbox
                     (user_id, tool, generation, key_version, wrapped_data_key, ciphertext)
                 SELECT user_id, tool, generation, key_version, wrapped_data_key, ciphertext
                 FROM gone
                 RETURNING user_id, tool, generation"
            )
        } else {
            format!("{delete} RETURNING user_id, tool, generation")
        };
        let gone: Vec<(String, String, i64)> = sqlx::query_as(&sql)
            .bind(limit as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(e)?;
        // A new snapshot: what is left, including rows skipped above (still past their TTL, so
        // the agent stays due) and writes committed since.
        let next: Option<DateTime<Utc>> = sqlx::query_scalar(&format!(
            "SELECT min(ttl_expires_at) FROM {schema}.credentials"
        ))
        .fetch_one(&mut *tx)
        .await
        .map_err(e)?;
        let records = gone
            .iter()
            .map(|(user, tool, generation)| {
                crate::store::credentials::swept_record(agent, user, tool, *generation)
            })
            .collect();
        let appended = append_agent(self, &mut tx, namespace, records).await?;
        self.reset_role(&mut tx).await?;
        // What was queued for revocation is due now (control migration 0017). A busy agent
        // stays due: the next pass sees what its stores in flight write.
        let ahead = if quiet {
            AT_LEAST_DAILY
        } else {
            "interval '0 seconds'"
        };
        sqlx::query(&format!(
            "UPDATE vault.agents
             SET sweep_due = least($2, now() + {ahead}),
                 outbox_due = CASE WHEN $3 THEN least(coalesce(outbox_due, now()), now())
                                   ELSE outbox_due END
             WHERE schema_name = $1"
        ))
        .bind(namespace)
        .bind(next)
        .bind(revoke && !gone.is_empty())
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        self.commit_appended(tx, namespace, &appended).await?;
        Ok(gone.len() as u64)
    }

    /// Lowers the agent's `sweep_due` to `ttl_expires_at`, the TTL of a credential just
    /// committed, unless it is already as early. Waits for a sweep holding the agent's row.
    async fn lower_sweep_due(
        &self,
        namespace: &str,
        ttl_expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        // A row already due may be held by a sweep that has not seen the credential: the
        // UPDATE must match it to wait for that sweep (READ COMMITTED skips a locked row its
        // WHERE does not match, without waiting), and then sees what the sweep set.
        sqlx::query(
            "UPDATE vault.agents SET sweep_due = least(coalesce(sweep_due, $2), $2)
             WHERE schema_name = $1
               AND (sweep_due IS NULL OR sweep_due > $2 OR sweep_due <= now())",
        )
        .bind(namespace)
        .bind(ttl_expires_at)
        .execute(&self.pool)
        .await
        .map_err(e)?;
        Ok(())
    }

    /// The upsert of [`CredentialStore::upsert`] in `tx` (fenced and in the agent's role), with
    /// `audit` appended, then committed; `sweep_ahead` is what the fence read of the agent's
    /// schedule ([`PgStore::sealing_tx`]).
    async fn write_credential_in(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        sweep_ahead: Option<DateTime<Utc>>,
        key: CredentialKey<'_>,
        new: NewCredential<'_>,
        audit: Vec<AuditRecord>,
    ) -> Result<Upserted, StoreError> {
        let schema = quoted(&key.agent.namespace)?;
        // The WHERE on the conflict arm is the fence: a slower writer holding an older
        // generation can never overwrite a newer one.
        let sql = format!(
            "INSERT INTO {schema}.credentials AS c
                 (user_id, tool, generation, state, key_version, wrapped_data_key, ciphertext,
                  access_expires_at, ttl_expires_at)
             VALUES ($1, $2, $3, 0, $4, $5, $6, $7, now() + make_interval(secs => $8))
             ON CONFLICT (user_id, tool) DO UPDATE SET
                 generation = EXCLUDED.generation, state = 0, key_version = EXCLUDED.key_version,
                 wrapped_data_key = EXCLUDED.wrapped_data_key, ciphertext = EXCLUDED.ciphertext,
                 access_expires_at = EXCLUDED.access_expires_at,
                 ttl_expires_at = EXCLUDED.ttl_expires_at,
                 refresh_lease_owner = NULL, refresh_lease_until = NULL,
                 refresh_failures = 0, refresh_not_before = NULL, updated_at = now()
             WHERE c.generation < EXCLUDED.generation
             RETURNING ttl_expires_at"
        );
        let row: Option<DateTime<Utc>> = sqlx::query_scalar(&sql)
            .bind(key.user.as_str())
            .bind(key.tool.as_str())
            .bind(new.generation.get() as i64)
            .bind(new.sealed.key_version as i32)
            .bind(&new.sealed.wrapped_data_key)
            .bind(&new.sealed.ciphertext)
            .bind(new.access_expires_at)
            .bind(new.ttl_seconds as f64)
            .fetch_optional(&mut *tx)
            .await
            .map_err(e)?;
        let appended = append_agent(self, &mut tx, &key.agent.namespace, audit).await?;
        self.commit_appended(tx, &key.agent.namespace, &appended)
            .await?;
        let Some(ttl_expires_at) = row else {
            return Ok(Upserted::Superseded);
        };
        // The schedule already visits the agent no later than this TTL, and no sweep can have
        // moved it past the TTL since the fence read it: a sweep that would raise it waits for
        // the fence's lock, or leaves the agent due when a store holds it (control migration
        // 0018).
        if sweep_ahead.is_some_and(|due| due <= ttl_expires_at) {
            return Ok(Upserted::Written { ttl_expires_at });
        }
        // After the commit, so that a sweep either saw the credential or is ordered before this
        // (migrations/control/0016_sweep_due.sql). The credential is kept either way: should
        // this fail, the agent's next visit is at most a day away, and it is never served past
        // its TTL meanwhile.
        if let Err(err) = self
            .lower_sweep_due(&key.agent.namespace, ttl_expires_at)
            .await
        {
            tracing::warn!(error = %err, "could not bring the agent's next sweep forward");
        }
        Ok(Upserted::Written { ttl_expires_at })
    }
}

/// Locks the agent's registry row with `strength` (`UPDATE` or `NO KEY UPDATE`) if it is due for
/// a sweep and nobody holds a conflicting lock; whether it did.
async fn lock_if_due(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    namespace: &str,
    strength: &'static str,
) -> Result<bool, StoreError> {
    let held = sqlx::query(&format!(
        "SELECT 1 FROM vault.agents
         WHERE schema_name = $1 AND coalesce(sweep_due, '-infinity') <= now()
         FOR {strength} SKIP LOCKED"
    ))
    .bind(namespace)
    .fetch_optional(&mut **tx)
    .await
    .map_err(e)?;
    Ok(held.is_some())
}
