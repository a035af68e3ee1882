//! Upkeep of the audit chains (DESIGN §10): signing each chain's head under a key derived from
//! the root key, so that `audit verify` can tell a cut tail from a quiet chain, and retention,
//! which deletes each chain's records older than the retention period as a prefix.
//!
//! Both walk the control chain and then every agent's chain, a page of agents at a time. One
//! chain failing (a schema a migration has not reached yet, say) is logged and skipped so it
//! cannot stop the others from being signed or trimmed; only failing to list the agents ends a
//! pass early.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::audit::HeadKey;
use crate::store::{AgentPages, Chain, Store, StoreError};

/// The head signer's lease name in the leases table.
pub const LEASE: &str = "audit-heads";

/// Agents read from the registry at a time.
const AGENT_PAGE: u32 = 500;

/// Signs the audit chains' heads every `interval`.
pub struct HeadSigner {
    /// Where the chains are.
    pub store: Store,
    /// The key heads are signed with ([`HeadKey::derive`] of the root key).
    pub key: HeadKey,
    /// Time between passes (`VAULT_AUDIT_SIGN_INTERVAL_SECONDS`).
    pub interval: Duration,
}

impl std::fmt::Debug for HeadSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of every log.
        f.debug_struct("HeadSigner")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl HeadSigner {
    /// Signs until `shutdown` fires. One replica signs at a time (a lease); should two ever
    /// overlap, the store keeps the further head, so nothing is lost but the work.
    pub async fn run(self, shutdown: CancellationToken) {
        let holder = uuid::Uuid::new_v4();
        // Held across two intervals so the holder renews it before anyone else may take it.
        let lease = (self.interval * 2).max(Duration::from_secs(10));
        super::every(self.interval, &shutdown, || async {
            match self.store.leases.try_lease(LEASE, holder, lease).await {
                Ok(true) => match sign_pass(&self.store, &self.key, &shutdown).await {
                    Ok(0) => {}
                    Ok(signed) => tracing::debug!(signed, "signed audit chain heads"),
                    Err(err) => tracing::warn!(error = %err, "signing audit heads failed"),
                },
                Ok(false) => tracing::debug!("another replica holds the audit signing lease"),
                Err(err) => tracing::warn!(error = %err, "could not take the audit signing lease"),
            }
        })
        .await;
    }
}

/// One signing pass over every chain: each chain whose head is past its signed head (or that
/// has records and no signed head) gets its head signed and saved. Returns how many were.
pub async fn sign_heads(store: &Store, key: &HeadKey) -> Result<u64, StoreError> {
    sign_pass(store, key, &CancellationToken::new()).await
}

async fn sign_pass(
    store: &Store,
    key: &HeadKey,
    shutdown: &CancellationToken,
) -> Result<u64, StoreError> {
    let mut signed = 0;
    let mut sign = async |chain: Chain<'_>| match sign_chain(store, key, chain).await {
        Ok(true) => signed += 1,
        Ok(false) => {}
        Err(err) => {
            tracing::warn!(chain = chain.key(), error = %err, "could not sign an audit head")
        }
    };
    if shutdown.is_cancelled() {
        return Ok(0);
    }
    sign(Chain::Control).await;
    let mut pages = AgentPages::new(store.keys.as_ref(), AGENT_PAGE);
    while let Some(page) = pages.next().await? {
        for agent in &page {
            if shutdown.is_cancelled() {
                break;
            }
            sign(Chain::Agent(agent)).await;
        }
        if shutdown.is_cancelled() {
            break;
        }
    }
    Ok(signed)
}

/// Signs `chain`'s head if it moved past the signed one; whether it did.
async fn sign_chain(store: &Store, key: &HeadKey, chain: Chain<'_>) -> Result<bool, StoreError> {
    let head = store.audit.head(chain).await?;
    if head.sequence == 0 {
        return Ok(false);
    }
    let signed = store.audit.signed_head(chain).await?;
    if signed.is_some_and(|signed| signed.sequence >= head.sequence) {
        return Ok(false);
    }
    // Signed under the chain's key (`control` or the agent's namespace), which is unique across
    // issuers: a head signed for one chain does not verify as another's.
    let head = key.sign(chain.key(), head.sequence, &head.hash);
    store.audit.save_head(chain, &head).await?;
    Ok(true)
}

/// Retention: deletes, chain by chain, the records older than `retention` in statements of at
/// most `batch`, until a chain has none left that old or `shutdown` fires. Each chain keeps its
/// anchor, so what is left verifies. Returns how many records were deleted.
pub async fn retain(
    store: &Store,
    retention: Duration,
    batch: u32,
    shutdown: &CancellationToken,
) -> Result<u64, StoreError> {
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let before_ms = chrono::Utc::now()
        .timestamp_millis()
        .saturating_sub(retention_ms);
    let batch = batch.max(1);
    let mut deleted = 0;
    let mut trim = async |chain: Chain<'_>| {
        while !shutdown.is_cancelled() {
            match store.audit.delete_before(chain, before_ms, batch).await {
                Ok(n) => {
                    deleted += n;
                    if n < u64::from(batch) {
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(chain = chain.key(), error = %err, "audit retention failed");
                    break;
                }
            }
        }
    };
    trim(Chain::Control).await;
    let mut pages = AgentPages::new(store.keys.as_ref(), AGENT_PAGE);
    while let Some(page) = pages.next().await? {
        for agent in &page {
            trim(Chain::Agent(agent)).await;
        }
        if shutdown.is_cancelled() {
            break;
        }
    }
    Ok(deleted)
}
