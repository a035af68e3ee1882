//! Agent key rotation in PostgreSQL: the registry's side runs in the owner's functions
//! (`vault.begin_agent_key_rotation`, `vault.finish_agent_key_rotation`, and the write fence
//! `vault.fence_agent_key`, in migrations/control/0011_agent_key_rotation.sql); the agent's
//! rows are read and re-sealed under the agent's own role, and its flows on the pool.

use super::audit::append_agent;
use super::{PgStore, e, quoted};
use crate::audit::AuditRecord;
use crate::crypto::SealedCredential;
use crate::ids::{Tool, UserId};
use crate::store::rows::generation_of;
use crate::store::{AgentKeyStore, AgentRecord, SealedRow, StoreError};

/// SQLSTATE `vault.begin_agent_key_rotation` raises while a root rotation is in progress.
const ROOT_ROTATION_IN_PROGRESS: &str = "V0002";

/// `user_id, tool, generation, key_version, wrapped_data_key, ciphertext` (and the outbox id).
type SealedColumns = (i64, String, String, i64, i64, Vec<u8>, Vec<u8>);

fn sealed_row(columns: SealedColumns, revocation: bool) -> Result<SealedRow, StoreError> {
    let (id, user, tool, generation, key_version, wrapped_data_key, ciphertext) = columns;
    let user = UserId::parse(user).map_err(|err| StoreError::Corrupt(format!("user: {err}")))?;
    let tool = Tool::parse(tool).map_err(|err| StoreError::Corrupt(format!("tool: {err}")))?;
    let generation = generation_of(generation)?;
    let sealed = SealedCredential {
        wrapped_data_key,
        ciphertext,
        key_version: u32::try_from(key_version)
            .map_err(|_| StoreError::Corrupt(format!("key version {key_version}")))?,
    };
    Ok(if revocation {
        SealedRow::Revocation {
            id,
            user,
            tool,
            generation,
            sealed,
        }
    } else {
        SealedRow::Credential {
            user,
            tool,
            generation,
            sealed,
        }
    })
}

/// The first four bytes of a flow secret: the version that sealed it.
fn version_prefix(version: u32) -> [u8; 4] {
    version.to_be_bytes()
}

#[async_trait::async_trait]
impl AgentKeyStore for PgStore {
    #[tracing::instrument(skip_all)]
    async fn begin_agent_key_rotation(
        &self,
        agent: &AgentRecord,
        wrapped_key: &[u8],
        key_version: u32,
        audit: Vec<AuditRecord>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(e)?;
        let started: bool =
            sqlx::query_scalar("SELECT vault.begin_agent_key_rotation($1, $2, $3, $4, $5)")
                .bind(&agent.namespace)
                .bind(agent.key_version as i32)
                .bind(&agent.wrapped_key)
                .bind(wrapped_key)
                .bind(key_version as i32)
                .fetch_one(&mut *tx)
                .await
                .map_err(|err| match &err {
                    sqlx::Error::Database(db)
                        if db.code().as_deref() == Some(ROOT_ROTATION_IN_PROGRESS) =>
                    {
                        StoreError::KeyRotationInProgress(
                            "a root key rotation is in progress; finish it (rotate-root) or abort it (rotate-root --abort) first".into(),
                        )
                    }
                    _ => e(err),
                })?;
        if started {
            let appended = append_agent(self, &mut tx, &agent.namespace, audit).await?;
            self.commit_appended(tx, &agent.namespace, &appended)
                .await?;
        }
        Ok(started)
    }

    #[tracing::instrument(skip_all)]
    async fn sealed_under(
        &self,
        agent: &AgentRecord,
        version: u32,
        limit: u32,
    ) -> Result<Vec<SealedRow>, StoreError> {
        let schema = quoted(&agent.namespace)?;
        let mut rows = Vec::new();
        let mut tx = self.agent_tx(&agent.namespace).await?;
        let credentials: Vec<SealedColumns> = sqlx::query_as(&format!(
            "SELECT 0::int8, user_id, tool, generation, key_version::int8, wrapped_data_key,
                    ciphertext
             FROM {schema}.credentials WHERE key_version = $1
             ORDER BY user_id, tool LIMIT $2"
        ))
        .bind(version as i32)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(e)?;
        for columns in credentials {
            rows.push(sealed_row(columns, false)?);
        }
        let left = i64::from(limit) - rows.len() as i64;
        if left > 0 {
            let revocations: Vec<SealedColumns> = sqlx::query_as(&format!(
                "SELECT id, user_id, tool, generation, key_version::int8, wrapped_data_key,
                        ciphertext
                 FROM {schema}.revocation_outbox WHERE key_version = $1 ORDER BY id LIMIT $2"
            ))
            .bind(version as i32)
            .bind(left)
            .fetch_all(&mut *tx)
            .await
            .map_err(e)?;
            for columns in revocations {
                rows.push(sealed_row(columns, true)?);
            }
        }
        tx.commit().await.map_err(e)?;
        let left = i64::from(limit) - rows.len() as i64;
        if left > 0 {
            let flows: Vec<(String, String, String, Option<Vec<u8>>, Option<Vec<u8>>)> =
                sqlx::query_as(
                    "SELECT id, user_id, tool, sealed_verifier, sealed_code
                     FROM vault.authorization_flows
                     WHERE issuer = $1 AND agent_id = $2
                       AND (substring(sealed_verifier FROM 1 FOR 4) = $3
                            OR substring(sealed_code FROM 1 FOR 4) = $3)
                     ORDER BY id LIMIT $4",
                )
                .bind(agent.issuer.as_str())
                .bind(agent.agent.as_str())
                .bind(version_prefix(version).as_slice())
                .bind(left)
                .fetch_all(&self.pool)
                .await
                .map_err(e)?;
            for (id, user, tool, verifier, code) in flows {
                rows.push(SealedRow::Flow {
                    id,
                    user: UserId::parse(user)
                        .map_err(|err| StoreError::Corrupt(format!("flow user: {err}")))?,
                    tool: Tool::parse(tool)
                        .map_err(|err| StoreError::Corrupt(format!("flow tool: {err}")))?,
                    verifier,
                    code,
                });
            }
        }
        Ok(rows)
    }

    #[tracing::instrument(skip_all)]
    async fn count_sealed_under(
        &self,
        agent: &AgentRecord,
        version: u32,
    ) -> Result<u64, StoreError> {
        let schema = quoted(&agent.namespace)?;
        let mut tx = self.agent_tx(&agent.namespace).await?;
        let rows: i64 = sqlx::query_scalar(&format!(
            "SELECT (SELECT count(*) FROM {schema}.credentials WHERE key_version = $1)
                  + (SELECT count(*) FROM {schema}.revocation_outbox WHERE key_version = $1)"
        ))
        .bind(version as i32)
        .fetch_one(&mut *tx)
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        let flows: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM vault.authorization_flows
             WHERE issuer = $1 AND agent_id = $2
               AND (substring(sealed_verifier FROM 1 FOR 4) = $3
                    OR substring(sealed_code FROM 1 FOR 4) = $3)",
        )
        .bind(agent.issuer.as_str())
        .bind(agent.agent.as_str())
        .bind(version_prefix(version).as_slice())
        .fetch_one(&self.pool)
        .await
        .map_err(e)?;
        Ok((rows + flows).max(0) as u64)
    }

    #[tracing::instrument(skip_all)]
    async fn reseal(
        &self,
        agent: &AgentRecord,
        old: &SealedRow,
        new: &SealedRow,
    ) -> Result<bool, StoreError> {
        let schema = quoted(&agent.namespace)?;
        let changed = match (old, new) {
            (
                SealedRow::Credential {
                    user,
                    tool,
                    generation,
                    sealed: before,
                },
                SealedRow::Credential { sealed: after, .. },
            ) => {
                let mut tx = self.agent_tx(&agent.namespace).await?;
                // The generation and the seal read are the compare: a write meanwhile (always
                // sealed under the new version) stands, and this one is dropped.
                let done = sqlx::query(&format!(
                    "UPDATE {schema}.credentials
                     SET key_version = $4, wrapped_data_key = $5, ciphertext = $6
                     WHERE user_id = $1 AND tool = $2 AND generation = $3
                       AND key_version = $7 AND wrapped_data_key = $8"
                ))
                .bind(user.as_str())
                .bind(tool.as_str())
                .bind(generation.get() as i64)
                .bind(after.key_version as i32)
                .bind(&after.wrapped_data_key)
                .bind(&after.ciphertext)
                .bind(before.key_version as i32)
                .bind(&before.wrapped_data_key)
                .execute(&mut *tx)
                .await
                .map_err(e)?
                .rows_affected();
                tx.commit().await.map_err(e)?;
                done
            }
            (
                SealedRow::Revocation {
                    id, sealed: before, ..
                },
                SealedRow::Revocation { sealed: after, .. },
            ) => {
                let mut tx = self.agent_tx(&agent.namespace).await?;
                let done = sqlx::query(&format!(
                    "UPDATE {schema}.revocation_outbox
                     SET key_version = $2, wrapped_data_key = $3, ciphertext = $4
                     WHERE id = $1 AND key_version = $5 AND wrapped_data_key = $6"
                ))
                .bind(id)
                .bind(after.key_version as i32)
                .bind(&after.wrapped_data_key)
                .bind(&after.ciphertext)
                .bind(before.key_version as i32)
                .bind(&before.wrapped_data_key)
                .execute(&mut *tx)
                .await
                .map_err(e)?
                .rows_affected();
                tx.commit().await.map_err(e)?;
                done
            }
            (
                SealedRow::Flow {
                    id, verifier, code, ..
                },
                SealedRow::Flow {
                    verifier: new_verifier,
                    code: new_code,
                    ..
                },
            ) => sqlx::query(
                "UPDATE vault.authorization_flows
                 SET sealed_verifier = $3, sealed_code = $4
                 WHERE id = $1 AND namespace = $2
                   AND sealed_verifier IS NOT DISTINCT FROM $5
                   AND sealed_code IS NOT DISTINCT FROM $6",
            )
            .bind(id)
            .bind(&agent.namespace)
            .bind(new_verifier)
            .bind(new_code)
            .bind(verifier)
            .bind(code)
            .execute(&self.pool)
            .await
            .map_err(e)?
            .rows_affected(),
            _ => {
                return Err(StoreError::Corrupt(
                    "a row re-sealed as another kind of row".into(),
                ));
            }
        };
        Ok(changed == 1)
    }

    #[tracing::instrument(skip_all)]
    async fn finish_agent_key_rotation(
        &self,
        agent: &AgentRecord,
        retiring_version: u32,
        audit: Vec<AuditRecord>,
    ) -> Result<Option<u64>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(e)?;
        let left: i64 = sqlx::query_scalar("SELECT vault.finish_agent_key_rotation($1, $2)")
            .bind(&agent.namespace)
            .bind(retiring_version as i32)
            .fetch_one(&mut *tx)
            .await
            .map_err(e)?;
        if left == 0 {
            let appended = append_agent(self, &mut tx, &agent.namespace, audit).await?;
            self.commit_appended(tx, &agent.namespace, &appended)
                .await?;
        }
        Ok(u64::try_from(left).ok())
    }
}
