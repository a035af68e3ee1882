//! Agent key rotation in the embedded store: the registry's retiring key in `agents`, and the
//! agent's rows still sealed under a version in `credentials`, `revocation_outbox` and
//! `authorization_flows` (each keyed by the agent's namespace). The same rules as PostgreSQL's
//! functions in migrations/control/0011_agent_key_rotation.sql, enforced under SQLite's single
//! write lock instead of row locks.
//!
//! The write fence ([`fence`]) is what makes a rotation complete: every write of a new seal
//! checks, inside its own transaction and after its write took the write lock, that the
//! agent's key is still the version it sealed under. A rotation's switch takes the same lock,
//! so a write either commits before the switch (and its row is then found and re-sealed) or
//! sees the new version and rolls back: no row appears under a retiring key behind the
//! rotation's back.

use sqlx::SqliteConnection;
use sqlx::sqlite::SqliteExecutor;

use super::audit::append_in;
use super::{SqliteStore, e};
use crate::audit::AuditRecord;
use crate::crypto::SealedCredential;
use crate::ids::{Tool, UserId};
use crate::store::rows::generation_of;
use crate::store::{AgentKeyStore, AgentRecord, SealedRow, StoreError};

type Tx = sqlx::Transaction<'static, sqlx::Sqlite>;

/// The message refusing an agent key rotation while a root rotation is in progress.
const ROOT_ROTATION_IN_PROGRESS: &str = "a root key rotation is in progress; finish it \
     (rotate-root) or abort it (rotate-root --abort) first";

/// The most bytes a wrapped agent key may have, as PostgreSQL's `begin_agent_key_rotation`
/// checks.
const MAX_WRAPPED_KEY: usize = 1024;

/// The agent key version a flow secret was sealed under: its first four bytes, big-endian.
pub(super) fn sealed_version(sealed: &[u8]) -> Result<u32, StoreError> {
    sealed
        .first_chunk::<4>()
        .map(|version| u32::from_be_bytes(*version))
        .ok_or_else(|| StoreError::Corrupt("a flow secret without its key version".into()))
}

/// The write fence, inside the writing transaction `tx` and after its write (which holds
/// SQLite's one write lock, so no rotation can switch the key before the commit): passes while
/// the agent of `namespace` still has key `version`, and answers
/// [`StoreError::AgentKeyRotated`] once a rotation made another version current or the agent
/// is gone (as PostgreSQL's `vault.fence_agent_key`). The caller then drops `tx`, which rolls
/// its write back.
pub(super) async fn fence(
    tx: &mut SqliteConnection,
    namespace: &str,
    version: u32,
) -> Result<(), StoreError> {
    let current: Option<i64> =
        sqlx::query_scalar("SELECT key_version FROM agents WHERE namespace = ?")
            .bind(namespace)
            .fetch_optional(tx)
            .await
            .map_err(e)?;
    if current == Some(i64::from(version)) {
        Ok(())
    } else {
        Err(StoreError::AgentKeyRotated)
    }
}

/// Begins a transaction holding SQLite's write lock (an update that changes nothing), so what
/// it reads cannot change before it commits, and no write fenced by [`fence`] commits
/// meanwhile.
async fn write_tx(store: &SqliteStore) -> Result<Tx, StoreError> {
    let mut tx = store.pool.begin().await.map_err(e)?;
    sqlx::query("UPDATE root_key SET id = id WHERE id = 1")
        .execute(&mut *tx)
        .await
        .map_err(e)?;
    Ok(tx)
}

/// How many of the rows of `namespace` are sealed under `version`, in one statement: a
/// revocation queued meanwhile (a credential moved to the outbox) is counted in exactly one
/// place.
async fn count_in(
    executor: impl SqliteExecutor<'_>,
    namespace: &str,
    version: u32,
) -> Result<u64, StoreError> {
    let count: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM credentials WHERE namespace = ?1 AND key_version = ?2)
              + (SELECT count(*) FROM revocation_outbox WHERE namespace = ?1 AND key_version = ?2)
              + (SELECT count(*) FROM authorization_flows
                 WHERE namespace = ?1
                   AND (substr(sealed_verifier, 1, 4) = ?3 OR substr(sealed_code, 1, 4) = ?3))",
    )
    .bind(namespace)
    .bind(i64::from(version))
    .bind(version.to_be_bytes().as_slice())
    .fetch_one(executor)
    .await
    .map_err(e)?;
    Ok(count.max(0) as u64)
}

/// `user_id, tool, generation, key_version, wrapped_data_key, ciphertext` of a credential or a
/// queued revocation, with the outbox `id` (0 for a credential).
#[derive(sqlx::FromRow)]
struct SealedEnvelopeRow {
    id: i64,
    user_id: String,
    tool: String,
    generation: i64,
    key_version: i64,
    wrapped_data_key: Vec<u8>,
    ciphertext: Vec<u8>,
}

impl SealedEnvelopeRow {
    /// The row as a credential, or as a queued revocation when `revocation`.
    fn into_sealed_row(self, revocation: bool) -> Result<SealedRow, StoreError> {
        let user = UserId::parse(self.user_id)
            .map_err(|err| StoreError::Corrupt(format!("sealed row user: {err}")))?;
        let tool = Tool::parse(self.tool)
            .map_err(|err| StoreError::Corrupt(format!("sealed row tool: {err}")))?;
        let generation = generation_of(self.generation)?;
        let sealed = SealedCredential {
            wrapped_data_key: self.wrapped_data_key,
            ciphertext: self.ciphertext,
            key_version: u32::try_from(self.key_version).map_err(|_| {
                StoreError::Corrupt(format!("key version out of range: {}", self.key_version))
            })?,
        };
        Ok(if revocation {
            SealedRow::Revocation {
                id: self.id,
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
}

/// `id, user_id, tool, sealed_verifier, sealed_code` of a consent flow.
#[derive(sqlx::FromRow)]
struct SealedFlowRow {
    id: String,
    user_id: String,
    tool: String,
    sealed_verifier: Option<Vec<u8>>,
    sealed_code: Option<Vec<u8>>,
}

impl TryFrom<SealedFlowRow> for SealedRow {
    type Error = StoreError;

    fn try_from(row: SealedFlowRow) -> Result<Self, StoreError> {
        Ok(Self::Flow {
            id: row.id,
            user: UserId::parse(row.user_id)
                .map_err(|err| StoreError::Corrupt(format!("flow user: {err}")))?,
            tool: Tool::parse(row.tool)
                .map_err(|err| StoreError::Corrupt(format!("flow tool: {err}")))?,
            verifier: row.sealed_verifier,
            code: row.sealed_code,
        })
    }
}

/// The error for a re-seal whose `new` is not the row `old` names, sealed anew.
fn not_the_same_row() -> StoreError {
    StoreError::Corrupt("a re-seal names another row than the one it read".into())
}

#[async_trait::async_trait]
impl AgentKeyStore for SqliteStore {
    #[tracing::instrument(skip_all)]
    async fn begin_agent_key_rotation(
        &self,
        agent: &AgentRecord,
        wrapped_key: &[u8],
        key_version: u32,
        audit: Vec<AuditRecord>,
    ) -> Result<bool, StoreError> {
        if wrapped_key.is_empty()
            || wrapped_key.len() > MAX_WRAPPED_KEY
            || key_version <= agent.key_version
        {
            return Err(StoreError::Corrupt(format!(
                "invalid agent key: version {key_version} after {}, {} bytes wrapped",
                agent.key_version,
                wrapped_key.len()
            )));
        }
        // The write lock first: no fenced write can commit between the switch below and this
        // transaction's commit, and none that committed before is missed by the re-seal.
        let mut tx = write_tx(self).await?;
        let root_rotating: Option<bool> =
            sqlx::query_scalar("SELECT next_key_check IS NOT NULL FROM root_key WHERE id = 1")
                .fetch_optional(&mut *tx)
                .await
                .map_err(e)?;
        if root_rotating == Some(true) {
            return Err(StoreError::KeyRotationInProgress(
                ROOT_ROTATION_IN_PROGRESS.into(),
            ));
        }
        // SET reads the row as it was, so the current key becomes the retiring one.
        let switched = sqlx::query(
            "UPDATE agents
             SET retiring_wrapped_key = wrapped_key, retiring_key_version = key_version,
                 wrapped_key = ?, key_version = ?, next_wrapped_key = NULL
             WHERE namespace = ? AND key_version = ? AND wrapped_key = ?
               AND retiring_key_version IS NULL",
        )
        .bind(wrapped_key)
        .bind(i64::from(key_version))
        .bind(&agent.namespace)
        .bind(i64::from(agent.key_version))
        .bind(&agent.wrapped_key)
        .execute(&mut *tx)
        .await
        .map_err(e)?
        .rows_affected();
        if switched != 1 {
            return Ok(false);
        }
        append_in(&mut tx, &agent.namespace, audit).await?;
        tx.commit().await.map_err(e)?;
        Ok(true)
    }

    #[tracing::instrument(skip_all)]
    async fn sealed_under(
        &self,
        agent: &AgentRecord,
        version: u32,
        limit: u32,
    ) -> Result<Vec<SealedRow>, StoreError> {
        let limit = i64::from(limit);
        let mut rows = Vec::new();
        let credentials: Vec<SealedEnvelopeRow> = sqlx::query_as(
            "SELECT 0 AS id, user_id, tool, generation, key_version, wrapped_data_key, ciphertext
             FROM credentials WHERE namespace = ? AND key_version = ?
             ORDER BY user_id, tool LIMIT ?",
        )
        .bind(&agent.namespace)
        .bind(i64::from(version))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        for row in credentials {
            rows.push(row.into_sealed_row(false)?);
        }
        let left = limit - rows.len() as i64;
        if left > 0 {
            let revocations: Vec<SealedEnvelopeRow> = sqlx::query_as(
                "SELECT id, user_id, tool, generation, key_version, wrapped_data_key, ciphertext
                 FROM revocation_outbox WHERE namespace = ? AND key_version = ?
                 ORDER BY id LIMIT ?",
            )
            .bind(&agent.namespace)
            .bind(i64::from(version))
            .bind(left)
            .fetch_all(&self.pool)
            .await
            .map_err(e)?;
            for row in revocations {
                rows.push(row.into_sealed_row(true)?);
            }
        }
        let left = limit - rows.len() as i64;
        if left > 0 {
            let flows: Vec<SealedFlowRow> = sqlx::query_as(
                "SELECT id, user_id, tool, sealed_verifier, sealed_code FROM authorization_flows
                 WHERE namespace = ?1
                   AND (substr(sealed_verifier, 1, 4) = ?2 OR substr(sealed_code, 1, 4) = ?2)
                 ORDER BY id LIMIT ?3",
            )
            .bind(&agent.namespace)
            .bind(version.to_be_bytes().as_slice())
            .bind(left)
            .fetch_all(&self.pool)
            .await
            .map_err(e)?;
            for row in flows {
                rows.push(SealedRow::try_from(row)?);
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
        count_in(&self.pool, &agent.namespace, version).await
    }

    #[tracing::instrument(skip_all)]
    async fn reseal(
        &self,
        agent: &AgentRecord,
        old: &SealedRow,
        new: &SealedRow,
    ) -> Result<bool, StoreError> {
        // Each arm is a compare-and-set on the seal read: a write meanwhile (sealed under the
        // current version, by the fence) stands, and this re-seal of what it replaced is
        // dropped.
        let changed = match (old, new) {
            (
                SealedRow::Credential {
                    user,
                    tool,
                    generation,
                    sealed: before,
                },
                SealedRow::Credential {
                    user: new_user,
                    tool: new_tool,
                    generation: new_generation,
                    sealed: after,
                },
            ) => {
                if (user, tool, generation) != (new_user, new_tool, new_generation) {
                    return Err(not_the_same_row());
                }
                sqlx::query(
                    "UPDATE credentials SET key_version = ?, wrapped_data_key = ?, ciphertext = ?
                     WHERE namespace = ? AND user_id = ? AND tool = ? AND generation = ?
                       AND key_version = ? AND wrapped_data_key = ? AND ciphertext = ?",
                )
                .bind(i64::from(after.key_version))
                .bind(&after.wrapped_data_key)
                .bind(&after.ciphertext)
                .bind(&agent.namespace)
                .bind(user.as_str())
                .bind(tool.as_str())
                .bind(generation.get() as i64)
                .bind(i64::from(before.key_version))
                .bind(&before.wrapped_data_key)
                .bind(&before.ciphertext)
                .execute(&self.pool)
                .await
                .map_err(e)?
                .rows_affected()
            }
            (
                SealedRow::Revocation {
                    id,
                    user,
                    tool,
                    generation,
                    sealed: before,
                },
                SealedRow::Revocation {
                    id: new_id,
                    user: new_user,
                    tool: new_tool,
                    generation: new_generation,
                    sealed: after,
                },
            ) => {
                if (id, user, tool, generation) != (new_id, new_user, new_tool, new_generation) {
                    return Err(not_the_same_row());
                }
                sqlx::query(
                    "UPDATE revocation_outbox
                     SET key_version = ?, wrapped_data_key = ?, ciphertext = ?
                     WHERE id = ? AND namespace = ?
                       AND key_version = ? AND wrapped_data_key = ? AND ciphertext = ?",
                )
                .bind(i64::from(after.key_version))
                .bind(&after.wrapped_data_key)
                .bind(&after.ciphertext)
                .bind(id)
                .bind(&agent.namespace)
                .bind(i64::from(before.key_version))
                .bind(&before.wrapped_data_key)
                .bind(&before.ciphertext)
                .execute(&self.pool)
                .await
                .map_err(e)?
                .rows_affected()
            }
            (
                SealedRow::Flow {
                    id,
                    user,
                    tool,
                    verifier,
                    code,
                },
                SealedRow::Flow {
                    id: new_id,
                    user: new_user,
                    tool: new_tool,
                    verifier: new_verifier,
                    code: new_code,
                },
            ) => {
                if (id, user, tool) != (new_id, new_user, new_tool) {
                    return Err(not_the_same_row());
                }
                // `IS` compares NULLs too: a secret absent when read must still be absent.
                sqlx::query(
                    "UPDATE authorization_flows SET sealed_verifier = ?, sealed_code = ?
                     WHERE id = ? AND namespace = ?
                       AND sealed_verifier IS ? AND sealed_code IS ?",
                )
                .bind(new_verifier.as_deref())
                .bind(new_code.as_deref())
                .bind(id)
                .bind(&agent.namespace)
                .bind(verifier.as_deref())
                .bind(code.as_deref())
                .execute(&self.pool)
                .await
                .map_err(e)?
                .rows_affected()
            }
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
        // The write lock first: the count and the destruction of the key are one state, and no
        // fenced write commits between them (none seals under the retiring version anyway).
        let mut tx = write_tx(self).await?;
        let retiring: Option<Option<i64>> =
            sqlx::query_scalar("SELECT retiring_key_version FROM agents WHERE namespace = ?")
                .bind(&agent.namespace)
                .fetch_optional(&mut *tx)
                .await
                .map_err(e)?;
        if retiring != Some(Some(i64::from(retiring_version))) {
            return Ok(None);
        }
        let remaining = count_in(&mut *tx, &agent.namespace, retiring_version).await?;
        if remaining == 0 {
            sqlx::query(
                "UPDATE agents SET retiring_wrapped_key = NULL, retiring_key_version = NULL
                 WHERE namespace = ?",
            )
            .bind(&agent.namespace)
            .execute(&mut *tx)
            .await
            .map_err(e)?;
            append_in(&mut tx, &agent.namespace, audit).await?;
            tx.commit().await.map_err(e)?;
        }
        Ok(Some(remaining))
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::ids::{AgentId, Generation, IssuerId};
    use crate::store::credentials::swept_record;
    use crate::store::{
        CredentialKey, CredentialStore as _, FlowChange, FlowStatus, FlowStore as _, KeyStore as _,
        NewCredential, NewFlow, NextRoot, OutboxStore as _, RetiringKey, RootKeyRecord,
        SchemaStore as _, StoredCredential, Upserted,
    };

    const KEY_CHECK: &[u8] = b"agent-keys-kcv";

    /// A migrated in-memory vault with a root key and agent-a, whose key is version 1.
    async fn vault() -> (SqliteStore, AgentRecord) {
        let store = SqliteStore::open_memory()
            .await
            .expect("an in-memory database opens");
        store.migrate().await.expect("the migrations apply");
        store
            .init_root_key(&RootKeyRecord {
                key_check: KEY_CHECK.to_vec(),
                kdf: None,
                wrapped_control_key: None,
                next: None,
            })
            .await
            .expect("a fresh vault takes a root key");
        let agent = store
            .create_agent(
                &IssuerId::parse("https://issuer.test").expect("a valid issuer"),
                &AgentId::parse("agent-a").expect("a valid agent id"),
                b"wrapped-v1",
                1,
                KEY_CHECK,
            )
            .await
            .expect("the agent registers under the current root");
        (store, agent)
    }

    /// The registry entry as stored now.
    async fn reread(store: &SqliteStore, agent: &AgentRecord) -> AgentRecord {
        store
            .agent(&agent.issuer, &agent.agent)
            .await
            .expect("the registry reads")
            .expect("the agent is registered")
    }

    fn user(id: &str) -> UserId {
        UserId::parse(id).expect("a valid user id")
    }

    fn tool(id: &str) -> Tool {
        Tool::parse(id).expect("a valid tool")
    }

    /// An envelope under agent key `version`, told apart by `tag`.
    fn sealed(version: u32, tag: u8) -> SealedCredential {
        SealedCredential {
            wrapped_data_key: vec![tag; 60],
            ciphertext: vec![tag; 90],
            key_version: version,
        }
    }

    /// A flow secret sealed under `version` (its first four bytes), told apart by `tag`.
    fn secret(version: u32, tag: u8) -> Vec<u8> {
        let mut out = version.to_be_bytes().to_vec();
        out.extend_from_slice(&[tag; 40]);
        out
    }

    /// Writes `sealed` as a new generation of `user`'s `tool` credential.
    async fn put(
        store: &SqliteStore,
        agent: &AgentRecord,
        user_id: &str,
        tool_name: &str,
        sealed: &SealedCredential,
        audit: Vec<AuditRecord>,
    ) -> Result<(Generation, Upserted), StoreError> {
        let generation = store
            .next_generation(agent)
            .await
            .expect("the agent hands out generations");
        let (u, t) = (user(user_id), tool(tool_name));
        let written = store
            .upsert(
                CredentialKey {
                    agent,
                    user: &u,
                    tool: &t,
                },
                NewCredential {
                    generation,
                    sealed,
                    access_expires_at: None,
                    ttl_seconds: 3600,
                },
                audit,
            )
            .await?;
        Ok((generation, written))
    }

    /// The stored credential of `user`'s `tool`, if any.
    async fn stored(
        store: &SqliteStore,
        agent: &AgentRecord,
        user_id: &str,
        tool_name: &str,
    ) -> Option<StoredCredential> {
        let (u, t) = (user(user_id), tool(tool_name));
        store
            .load(CredentialKey {
                agent,
                user: &u,
                tool: &t,
            })
            .await
            .expect("credentials read")
    }

    /// Begins the consent flow `id` of alice for jira at `agent` with `verifier`.
    async fn begin_flow(
        store: &SqliteStore,
        agent: &AgentRecord,
        id: &str,
        verifier: &[u8],
    ) -> Result<(), StoreError> {
        let (u, t) = (user("alice"), tool("jira"));
        let mut state_hash = [0u8; 32];
        state_hash[..id.len()].copy_from_slice(id.as_bytes());
        store
            .create_flow(&NewFlow {
                id,
                state_hash: &state_hash,
                issuer: &agent.issuer,
                agent: &agent.agent,
                namespace: &agent.namespace,
                user: &u,
                tool: &t,
                scopes: &["read".to_string()],
                return_url: None,
                redirect_uri: "https://vault.test/oauth/callback",
                provider_binding: None,
                sealed_verifier: verifier,
                expires_at: Utc::now() + chrono::Duration::minutes(10),
            })
            .await
    }

    /// The flow's callback, keeping `code`.
    fn callback(code: &[u8]) -> FlowChange<'_> {
        FlowChange {
            from: FlowStatus::Pending,
            to: FlowStatus::CallbackReceived,
            unexpired: true,
            sealed_code: Some(code),
            error: None,
        }
    }

    /// Starts rotating `agent`'s key from version 1 to 2 and answers the registry entry after.
    async fn rotated(store: &SqliteStore, agent: &AgentRecord) -> AgentRecord {
        assert!(
            store
                .begin_agent_key_rotation(agent, b"wrapped-v2", 2, Vec::new())
                .await
                .expect("the rotation can start"),
            "the rotation starts"
        );
        reread(store, agent).await
    }

    /// `row` as it would be re-sealed under `version` (new bytes, same row).
    fn resealed(row: &SealedRow, version: u32) -> SealedRow {
        let again = |sealed: &SealedCredential| SealedCredential {
            wrapped_data_key: [sealed.wrapped_data_key.as_slice(), b"-again"].concat(),
            ciphertext: [sealed.ciphertext.as_slice(), b"-again"].concat(),
            key_version: version,
        };
        let reseal_secret = |secret: &Option<Vec<u8>>| {
            secret.as_ref().map(|bytes| {
                let mut out = version.to_be_bytes().to_vec();
                out.extend_from_slice(&bytes[4..]);
                out
            })
        };
        match row.clone() {
            SealedRow::Credential {
                user,
                tool,
                generation,
                sealed,
            } => SealedRow::Credential {
                user,
                tool,
                generation,
                sealed: again(&sealed),
            },
            SealedRow::Revocation {
                id,
                user,
                tool,
                generation,
                sealed,
            } => SealedRow::Revocation {
                id,
                user,
                tool,
                generation,
                sealed: again(&sealed),
            },
            SealedRow::Flow {
                id,
                user,
                tool,
                verifier,
                code,
            } => SealedRow::Flow {
                id,
                user,
                tool,
                verifier: reseal_secret(&verifier),
                code: reseal_secret(&code),
            },
        }
    }

    #[tokio::test]
    async fn a_rotation_makes_the_new_key_current_and_the_old_one_retiring_and_starts_once() {
        let (store, agent) = vault().await;

        let after = rotated(&store, &agent).await;

        assert_eq!(after.key_version, 2);
        assert_eq!(after.wrapped_key, b"wrapped-v2");
        assert_eq!(after.next_wrapped_key, None);
        assert_eq!(
            after.retiring,
            Some(RetiringKey {
                version: 1,
                wrapped_key: b"wrapped-v1".to_vec(),
            })
        );
        // From the stale record (version 1), and from the fresh one while version 1 retires.
        for (from, to) in [(&agent, 3), (&after, 3)] {
            assert!(
                !store
                    .begin_agent_key_rotation(from, b"wrapped-v3", to, Vec::new())
                    .await
                    .expect("a refused start is an answer"),
                "a second rotation does not start from version {}",
                from.key_version
            );
        }
        assert_eq!(reread(&store, &agent).await.retiring, after.retiring);
        assert_eq!(reread(&store, &agent).await.key_version, 2);
        assert!(matches!(
            store
                .begin_agent_key_rotation(&after, b"wrapped-v2", 2, Vec::new())
                .await,
            Err(StoreError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn root_and_agent_key_rotations_do_not_start_while_the_other_is_in_progress() {
        let (store, agent) = vault().await;
        let next = NextRoot {
            key_check: b"next-kcv".to_vec(),
            kdf: None,
            wrapped_control_key: b"next-control".to_vec(),
        };
        let root = store
            .begin_root_rotation(&next)
            .await
            .expect("a root rotation starts");
        assert!(root.next.is_some());

        let refused = store
            .begin_agent_key_rotation(&agent, b"wrapped-v2", 2, Vec::new())
            .await;

        assert!(
            matches!(&refused, Err(StoreError::KeyRotationInProgress(message)) if message.contains("root key rotation")),
            "{refused:?}"
        );
        assert_eq!(reread(&store, &agent).await.key_version, 1);

        assert!(store.abort_root_rotation().await.expect("the abort runs"));
        rotated(&store, &agent).await;

        let refused = store.begin_root_rotation(&next).await;

        assert!(
            matches!(&refused, Err(StoreError::KeyRotationInProgress(message)) if message.contains("agent-a")),
            "{refused:?}"
        );
        let root = store
            .root_key()
            .await
            .expect("the root key reads")
            .expect("the vault has a root key");
        assert!(root.next.is_none(), "no root rotation was recorded");
    }

    #[tokio::test]
    async fn rows_under_a_version_are_listed_in_order_counted_and_resealed_once() {
        let (store, agent) = vault().await;
        put(&store, &agent, "bob", "jira", &sealed(1, 1), Vec::new())
            .await
            .expect("a write under the current key");
        put(&store, &agent, "alice", "jira", &sealed(1, 2), Vec::new())
            .await
            .expect("a write under the current key");
        put(&store, &agent, "carol", "jira", &sealed(1, 3), Vec::new())
            .await
            .expect("a write under the current key");
        let queued = store
            .delete_into_outbox(
                &agent,
                &user("carol"),
                None,
                uuid::Uuid::nil(),
                std::time::Duration::from_secs(60),
                Vec::new(),
            )
            .await
            .expect("carol's credential is queued for revocation");
        assert_eq!(queued.len(), 1);
        begin_flow(&store, &agent, "flow-1", &secret(1, 4))
            .await
            .expect("a flow under the current key");
        let agent = rotated(&store, &agent).await;

        let rows = store
            .sealed_under(&agent, 1, 10)
            .await
            .expect("the rows read");

        let kinds: Vec<String> = rows
            .iter()
            .map(|row| match row {
                SealedRow::Credential { user, .. } => format!("credential {}", user.as_str()),
                SealedRow::Revocation { id, .. } => format!("revocation {id}"),
                SealedRow::Flow { id, .. } => format!("flow {id}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "credential alice".to_string(),
                "credential bob".to_string(),
                format!("revocation {}", queued[0].id),
                "flow flow-1".to_string(),
            ]
        );
        assert_eq!(
            store.count_sealed_under(&agent, 1).await.expect("counts"),
            4
        );
        assert_eq!(
            store
                .sealed_under(&agent, 1, 3)
                .await
                .expect("the rows read"),
            rows[..3]
        );
        assert!(
            store
                .sealed_under(&agent, 2, 10)
                .await
                .expect("the rows read")
                .is_empty()
        );

        for row in &rows {
            let new = resealed(row, 2);
            assert!(
                store.reseal(&agent, row, &new).await.expect("re-seals"),
                "{row:?} is re-sealed"
            );
            assert!(
                !store.reseal(&agent, row, &new).await.expect("re-seals"),
                "{row:?} is re-sealed only from what was read"
            );
        }

        assert_eq!(
            store.count_sealed_under(&agent, 1).await.expect("counts"),
            0
        );
        assert_eq!(
            store.count_sealed_under(&agent, 2).await.expect("counts"),
            4
        );
        let alice = stored(&store, &agent, "alice", "jira")
            .await
            .expect("alice's credential is still there");
        assert_eq!(alice.sealed, sealed_of(&resealed(&rows[0], 2)));
        let flow = store
            .flow("flow-1")
            .await
            .expect("flows read")
            .expect("the flow is still there");
        assert_eq!(flow.sealed_verifier, Some(secret(2, 4)));
        assert_eq!(flow.status, FlowStatus::Pending);
    }

    /// The envelope of a credential or revocation row.
    fn sealed_of(row: &SealedRow) -> SealedCredential {
        match row {
            SealedRow::Credential { sealed, .. } | SealedRow::Revocation { sealed, .. } => {
                sealed.clone()
            }
            SealedRow::Flow { .. } => panic!("a flow has no envelope"),
        }
    }

    #[tokio::test]
    async fn a_reseal_of_a_row_that_changed_since_it_was_read_changes_nothing() {
        let (store, agent) = vault().await;
        put(&store, &agent, "alice", "jira", &sealed(1, 1), Vec::new())
            .await
            .expect("a write under the current key");
        begin_flow(&store, &agent, "flow-1", &secret(1, 2))
            .await
            .expect("a flow under the current key");
        let agent = rotated(&store, &agent).await;
        let rows = store
            .sealed_under(&agent, 1, 10)
            .await
            .expect("the rows read");
        assert_eq!(rows.len(), 2);
        // Meanwhile a new token set arrives (sealed under the new key), and the callback keeps
        // a code sealed under the new key.
        let (newer, _) = put(&store, &agent, "alice", "jira", &sealed(2, 9), Vec::new())
            .await
            .expect("a write under the current key");
        assert!(
            store
                .transition("flow-1", callback(&secret(2, 3)))
                .await
                .expect("the callback is recorded")
        );

        for row in &rows {
            assert!(
                !store
                    .reseal(&agent, row, &resealed(row, 2))
                    .await
                    .expect("re-seals"),
                "{row:?} changed since it was read"
            );
        }

        let alice = stored(&store, &agent, "alice", "jira")
            .await
            .expect("alice's credential is there");
        assert_eq!((alice.generation, alice.sealed), (newer, sealed(2, 9)));
        let flow = store
            .flow("flow-1")
            .await
            .expect("flows read")
            .expect("the flow is there");
        assert_eq!(flow.sealed_verifier, Some(secret(1, 2)));
        assert_eq!(flow.sealed_code, Some(secret(2, 3)));
        // The verifier is still under version 1: the flow is read again, as it is now.
        assert_eq!(
            store
                .sealed_under(&agent, 1, 10)
                .await
                .expect("the rows read"),
            [SealedRow::Flow {
                id: "flow-1".into(),
                user: user("alice"),
                tool: tool("jira"),
                verifier: Some(secret(1, 2)),
                code: Some(secret(2, 3)),
            }]
        );
        assert!(matches!(
            store.reseal(&agent, &rows[0], &rows[1]).await,
            Err(StoreError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn finishing_waits_for_the_last_row_then_destroys_the_retiring_key() {
        let (store, agent) = vault().await;
        put(&store, &agent, "alice", "jira", &sealed(1, 1), Vec::new())
            .await
            .expect("a write under the current key");
        begin_flow(&store, &agent, "flow-1", &secret(1, 2))
            .await
            .expect("a flow under the current key");
        let agent = rotated(&store, &agent).await;
        assert_eq!(
            store
                .finish_agent_key_rotation(&agent, 2, Vec::new())
                .await
                .expect("finishes"),
            None,
            "version 2 is not retiring"
        );
        let rows = store
            .sealed_under(&agent, 1, 10)
            .await
            .expect("the rows read");

        for (left, row) in [(2, &rows[0]), (1, &rows[1])] {
            assert_eq!(
                store
                    .finish_agent_key_rotation(&agent, 1, Vec::new())
                    .await
                    .expect("finishes"),
                Some(left)
            );
            assert!(reread(&store, &agent).await.retiring.is_some());
            assert!(
                store
                    .reseal(&agent, row, &resealed(row, 2))
                    .await
                    .expect("re-seals")
            );
        }

        assert_eq!(
            store
                .finish_agent_key_rotation(&agent, 1, Vec::new())
                .await
                .expect("finishes"),
            Some(0)
        );
        let after = reread(&store, &agent).await;
        assert_eq!((after.key_version, &after.retiring), (2, &None));
        assert_eq!(
            store
                .finish_agent_key_rotation(&agent, 1, Vec::new())
                .await
                .expect("finishes"),
            None,
            "another run finished"
        );
        // The next rotation can start, and so can a root rotation.
        assert!(
            store
                .begin_agent_key_rotation(&after, b"wrapped-v3", 3, Vec::new())
                .await
                .expect("starts")
        );
    }

    #[tokio::test]
    async fn a_credential_sealed_under_the_retired_version_is_fenced_and_changes_nothing() {
        let (store, agent) = vault().await;
        let (first, _) = put(&store, &agent, "alice", "jira", &sealed(1, 1), Vec::new())
            .await
            .expect("a write under the current key");
        let agent = rotated(&store, &agent).await;
        let audit_records = || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log")
                .fetch_one(&store.pool)
                .await
                .expect("the audit log reads");
            n
        };

        let audit = vec![swept_record("agent-a", "alice", "jira", 2)];
        let fenced = put(&store, &agent, "alice", "jira", &sealed(1, 2), audit).await;
        let fenced_new = put(&store, &agent, "bob", "jira", &sealed(1, 3), Vec::new()).await;
        let (u, t) = (user("alice"), tool("jira"));
        let refreshed = store
            .complete_refresh(
                CredentialKey {
                    agent: &agent,
                    user: &u,
                    tool: &t,
                },
                first,
                NewCredential {
                    generation: store.next_generation(&agent).await.expect("generations"),
                    sealed: &sealed(1, 4),
                    access_expires_at: None,
                    ttl_seconds: 3600,
                },
                Vec::new(),
            )
            .await;

        assert!(
            matches!(fenced, Err(StoreError::AgentKeyRotated)),
            "{fenced:?}"
        );
        assert!(
            matches!(fenced_new, Err(StoreError::AgentKeyRotated)),
            "{fenced_new:?}"
        );
        assert!(
            matches!(refreshed, Err(StoreError::AgentKeyRotated)),
            "{refreshed:?}"
        );
        let alice = stored(&store, &agent, "alice", "jira")
            .await
            .expect("alice's credential is there");
        assert_eq!((alice.generation, alice.sealed), (first, sealed(1, 1)));
        assert!(stored(&store, &agent, "bob", "jira").await.is_none());
        assert_eq!(
            audit_records().await,
            0,
            "the fenced write's record is gone too"
        );
        assert_eq!(
            store.count_sealed_under(&agent, 1).await.expect("counts"),
            1
        );

        let audit = vec![swept_record("agent-a", "alice", "jira", 9)];
        let (current, written) = put(&store, &agent, "alice", "jira", &sealed(2, 5), audit)
            .await
            .expect("a write under the new key passes the fence");

        assert!(matches!(written, Upserted::Written { .. }));
        let alice = stored(&store, &agent, "alice", "jira")
            .await
            .expect("alice's credential is there");
        assert_eq!((alice.generation, alice.sealed), (current, sealed(2, 5)));
        assert_eq!(audit_records().await, 1);
    }

    #[tokio::test]
    async fn a_flow_secret_sealed_under_the_retired_version_is_fenced_and_changes_nothing() {
        let (store, agent) = vault().await;
        begin_flow(&store, &agent, "flow-1", &secret(1, 1))
            .await
            .expect("a flow under the current key");
        let agent = rotated(&store, &agent).await;

        let fenced_begin = begin_flow(&store, &agent, "flow-2", &secret(1, 2)).await;
        let fenced_callback = store.transition("flow-1", callback(&secret(1, 3))).await;

        assert!(
            matches!(fenced_begin, Err(StoreError::AgentKeyRotated)),
            "{fenced_begin:?}"
        );
        assert!(store.flow("flow-2").await.expect("flows read").is_none());
        assert!(
            matches!(fenced_callback, Err(StoreError::AgentKeyRotated)),
            "{fenced_callback:?}"
        );
        let flow = store
            .flow("flow-1")
            .await
            .expect("flows read")
            .expect("the flow is there");
        assert_eq!((flow.status, flow.sealed_code), (FlowStatus::Pending, None));

        begin_flow(&store, &agent, "flow-2", &secret(2, 2))
            .await
            .expect("a flow under the new key passes the fence");
        assert!(
            store
                .transition("flow-1", callback(&secret(2, 3)))
                .await
                .expect("a code under the new key passes the fence")
        );
        assert!(
            !store
                .transition("flow-1", callback(&secret(2, 4)))
                .await
                .expect("a callback that lost the race is an answer"),
            "the flow already moved"
        );
        let flow = store
            .flow("flow-1")
            .await
            .expect("flows read")
            .expect("the flow is there");
        assert_eq!(
            (flow.status, flow.sealed_code),
            (FlowStatus::CallbackReceived, Some(secret(2, 3)))
        );
        assert!(matches!(
            begin_flow(&store, &agent, "flow-3", b"v2").await,
            Err(StoreError::Corrupt(_))
        ));
    }
}
