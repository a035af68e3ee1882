//! The credentials table (all agents, keyed by namespace) and each agent's generation counter.

use std::time::Duration;

use super::agent_keys::fence;
use super::audit::append_in;
use super::{SqliteStore, e, ms, now_ms};
use crate::audit::AuditRecord;
use crate::ids::{Generation, Tool, UserId};
use crate::store::credentials::swept_record;
use crate::store::rows::{CredentialRow, CredentialSummaryRow, all, from_ms, generation_of};
use crate::store::{
    AgentRecord, CredentialKey, CredentialStore, CredentialSummary, NewCredential, StoreError,
    StoredCredential, SweepOutcome, Upserted,
};

#[async_trait::async_trait]
impl CredentialStore for SqliteStore {
    #[tracing::instrument(skip_all)]
    async fn next_generation(&self, agent: &AgentRecord) -> Result<Generation, StoreError> {
        let value: i64 = sqlx::query_scalar(
            "UPDATE agents SET next_generation = next_generation + 1 WHERE namespace = ?
             RETURNING next_generation - 1",
        )
        .bind(&agent.namespace)
        .fetch_one(&self.pool)
        .await
        .map_err(e)?;
        generation_of(value)
    }

    #[tracing::instrument(skip_all)]
    async fn upsert(
        &self,
        key: CredentialKey<'_>,
        new: NewCredential<'_>,
        audit: Vec<AuditRecord>,
    ) -> Result<Upserted, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(e)?;
        let ttl_expires_at = now.saturating_add(ms(Duration::from_secs(new.ttl_seconds)));
        let written: Option<i64> = sqlx::query_scalar(
            "INSERT INTO credentials AS c
                 (namespace, user_id, tool, generation, state, key_version, wrapped_data_key, ciphertext,
                  access_expires_at, ttl_expires_at, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?7, ?8, ?9, ?10, ?10)
             ON CONFLICT (namespace, user_id, tool) DO UPDATE SET
                 generation = excluded.generation, state = 0, key_version = excluded.key_version,
                 wrapped_data_key = excluded.wrapped_data_key, ciphertext = excluded.ciphertext,
                 access_expires_at = excluded.access_expires_at, ttl_expires_at = excluded.ttl_expires_at,
                 refresh_lease_owner = NULL, refresh_lease_until = NULL, refresh_failures = 0,
                 refresh_not_before = NULL, updated_at = excluded.updated_at
             WHERE c.generation < excluded.generation
             RETURNING ttl_expires_at",
        )
        .bind(&key.agent.namespace)
        .bind(key.user.as_str())
        .bind(key.tool.as_str())
        .bind(new.generation.get() as i64)
        .bind(i64::from(new.sealed.key_version))
        .bind(&new.sealed.wrapped_data_key)
        .bind(&new.sealed.ciphertext)
        .bind(new.access_expires_at.map(|t| t.timestamp_millis()))
        .bind(ttl_expires_at)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await
        .map_err(e)?;
        // After the write, which holds the write lock: whether or not a newer generation won,
        // nothing sealed under a retired key version commits.
        fence(&mut tx, &key.agent.namespace, new.sealed.key_version).await?;
        append_in(&mut tx, &key.agent.namespace, audit).await?;
        tx.commit().await.map_err(e)?;
        Ok(match written {
            Some(at) => Upserted::Written {
                ttl_expires_at: from_ms(at),
            },
            None => Upserted::Superseded,
        })
    }

    #[tracing::instrument(skip_all)]
    async fn load(&self, key: CredentialKey<'_>) -> Result<Option<StoredCredential>, StoreError> {
        let row: Option<CredentialRow> = sqlx::query_as(
            "SELECT generation, state, key_version, wrapped_data_key, ciphertext FROM credentials
             WHERE namespace = ? AND user_id = ? AND tool = ? AND ttl_expires_at > ?",
        )
        .bind(&key.agent.namespace)
        .bind(key.user.as_str())
        .bind(key.tool.as_str())
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await
        .map_err(e)?;
        row.map(StoredCredential::try_from).transpose()
    }

    #[tracing::instrument(skip_all)]
    async fn list(
        &self,
        agent: &AgentRecord,
        user: &UserId,
    ) -> Result<Vec<CredentialSummary>, StoreError> {
        let rows: Vec<CredentialSummaryRow> = sqlx::query_as(
            "SELECT tool, generation, state, key_version, wrapped_data_key, ciphertext,
                    access_expires_at AS access_expires_at_ms, ttl_expires_at AS ttl_expires_at_ms,
                    updated_at AS updated_at_ms
             FROM credentials WHERE namespace = ? AND user_id = ? ORDER BY tool",
        )
        .bind(&agent.namespace)
        .bind(user.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        all(rows)
    }

    #[tracing::instrument(skip_all)]
    async fn delete(
        &self,
        agent: &AgentRecord,
        user: &UserId,
        tool: Option<&Tool>,
        audit: Vec<AuditRecord>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await.map_err(e)?;
        let result = sqlx::query(
            "DELETE FROM credentials WHERE namespace = ?1 AND user_id = ?2 AND (?3 IS NULL OR tool = ?3)",
        )
        .bind(&agent.namespace)
        .bind(user.as_str())
        .bind(tool.map(Tool::as_str))
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        append_in(&mut tx, &agent.namespace, audit).await?;
        tx.commit().await.map_err(e)?;
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
        let mut tx = self.pool.begin().await.map_err(e)?;
        let written = sqlx::query(
            "UPDATE credentials SET generation = ?5, key_version = ?6, wrapped_data_key = ?7, ciphertext = ?8,
                 access_expires_at = ?9, refresh_lease_owner = NULL, refresh_lease_until = NULL,
                 refresh_failures = 0, refresh_not_before = NULL, updated_at = ?10
             WHERE namespace = ?1 AND user_id = ?2 AND tool = ?3 AND generation = ?4",
        )
        .bind(&key.agent.namespace)
        .bind(key.user.as_str())
        .bind(key.tool.as_str())
        .bind(old.get() as i64)
        .bind(new.generation.get() as i64)
        .bind(i64::from(new.sealed.key_version))
        .bind(&new.sealed.wrapped_data_key)
        .bind(&new.sealed.ciphertext)
        .bind(new.access_expires_at.map(|t| t.timestamp_millis()))
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(e)?
        .rows_affected();
        // After the write, which holds the write lock, as in `upsert`.
        fence(&mut tx, &key.agent.namespace, new.sealed.key_version).await?;
        if written == 1 {
            append_in(&mut tx, &key.agent.namespace, audit).await?;
        }
        tx.commit().await.map_err(e)?;
        Ok(written == 1)
    }

    #[tracing::instrument(skip_all)]
    async fn mark_reauth_required(
        &self,
        key: CredentialKey<'_>,
        generation: Generation,
        audit: Vec<AuditRecord>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(e)?;
        let marked = sqlx::query(
            "UPDATE credentials SET state = 1, refresh_lease_owner = NULL, refresh_lease_until = NULL, updated_at = ?5
             WHERE namespace = ?1 AND user_id = ?2 AND tool = ?3 AND generation = ?4",
        )
        .bind(&key.agent.namespace)
        .bind(key.user.as_str())
        .bind(key.tool.as_str())
        .bind(generation.get() as i64)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(e)?
        .rows_affected();
        if marked == 1 {
            append_in(&mut tx, &key.agent.namespace, audit).await?;
        }
        tx.commit().await.map_err(e)?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    async fn sweep(
        &self,
        limit: u32,
        dry_run: bool,
        revoke: bool,
    ) -> Result<SweepOutcome, StoreError> {
        let now = now_ms();
        let swept = if dry_run {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM (SELECT 1 FROM credentials WHERE ttl_expires_at <= ? LIMIT ?)",
            )
            .bind(now)
            .bind(i64::from(limit))
            .fetch_one(&self.pool)
            .await
            .map_err(e)?;
            n as u64
        } else {
            // One transaction (SQLite has one writer): what is queued for revocation, deleted
            // and recorded is the same set of rows.
            let mut tx = self.pool.begin().await.map_err(e)?;
            if revoke {
                sqlx::query(
                    "INSERT INTO revocation_outbox
                         (namespace, user_id, tool, generation, key_version, wrapped_data_key,
                          ciphertext, created_at, next_attempt_at)
                     SELECT namespace, user_id, tool, generation, key_version, wrapped_data_key,
                            ciphertext, ?1, ?1
                     FROM credentials WHERE ttl_expires_at <= ?1
                     ORDER BY ttl_expires_at LIMIT ?2",
                )
                .bind(now)
                .bind(i64::from(limit))
                .execute(&mut *tx)
                .await
                .map_err(e)?;
            }
            let gone: Vec<(String, String, String, String, i64)> = sqlx::query_as(
                "DELETE FROM credentials WHERE (namespace, user_id, tool) IN (
                     SELECT namespace, user_id, tool FROM credentials WHERE ttl_expires_at <= ?1
                     ORDER BY ttl_expires_at LIMIT ?2)
                 RETURNING namespace,
                     (SELECT agent_id FROM agents WHERE agents.namespace = credentials.namespace),
                     user_id, tool, generation",
            )
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(e)?;
            let deleted = gone.len() as u64;
            let mut by_chain: std::collections::BTreeMap<String, Vec<AuditRecord>> =
                std::collections::BTreeMap::new();
            for (namespace, agent, user, tool, generation) in gone {
                by_chain
                    .entry(namespace)
                    .or_default()
                    .push(swept_record(&agent, &user, &tool, generation));
            }
            for (namespace, records) in by_chain {
                append_in(&mut tx, &namespace, records).await?;
            }
            tx.commit().await.map_err(e)?;
            deleted
        };
        Ok(SweepOutcome::of(swept, limit))
    }
}
