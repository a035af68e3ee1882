//! Provider revocation (RFC 7009) through a durable outbox.
//!
//! Revoke deletes the credentials and queues their revocation in one transaction, then tries to
//! deliver at once; whatever the provider does not confirm stays queued and
//! [`crate::jobs::OutboxDelivery`] retries it with backoff, on any replica, across restarts, until delivered or too old.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{AgentEntry, Revoked, Vault, VaultError};
use crate::audit::{AuditRecord, Call, Outcome};
use crate::crypto::Binding;
use crate::ids::{Tool, UserId};
use crate::oauth::{ProviderError, TokenKind};
use crate::store::{AgentRecord, OutboxEntry};

/// How long a delivery attempt holds an outbox entry before another replica may take it.
const DELIVERY_LEASE: Duration = Duration::from_secs(60);
/// Most entries one background pass claims.
const CLAIM_BATCH: u32 = 100;

/// How long after the `attempts + 1`th failed delivery the next one is tried: doubling from a
/// second, at most an hour apart.
pub fn outbox_backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(12)).min(Duration::from_secs(3600))
}

/// The audit action of a revocation the provider confirmed.
pub const DELIVERED: &str = "revocation.delivered";
/// The audit action of a revocation given up: past its maximum age, or with nothing to send
/// it to.
pub const ABANDONED: &str = "revocation.abandoned";

/// Why one delivery attempt did not get through.
enum Undelivered {
    /// The provider failed or refused it.
    Failed(String),
    /// The vault's own guard for the provider did not send it (breaker open, or calls in flight
    /// at the cap): nothing is known about this revocation, so it is not counted as a failure.
    Paused {
        message: String,
        retry_after: Option<Duration>,
    },
}

impl Undelivered {
    fn message(&self) -> &str {
        match self {
            Self::Failed(message) | Self::Paused { message, .. } => message,
        }
    }
}

/// What one delivery attempt achieved.
enum Delivery {
    /// The provider confirmed the revocation of every token.
    Revoked,
    /// Nothing to revoke at a provider (no provider, or no revocation endpoint, for the tool).
    NotApplicable,
}

impl Vault {
    pub(super) async fn revoke_at_provider(
        self: &Arc<Self>,
        entry: Arc<AgentEntry>,
        user: &UserId,
        tool: Option<&Tool>,
        call: &Call,
    ) -> Result<Revoked, VaultError> {
        let queued = self
            .store
            .outbox
            .delete_into_outbox(
                &entry.record,
                user,
                tool,
                self.instance,
                DELIVERY_LEASE,
                vec![call.for_write()],
            )
            .await?;
        call.written();
        self.recorder.changes().publish(&entry.record.namespace);
        let revoked = u32::try_from(queued.len()).unwrap_or(u32::MAX);
        // Detached, like refresh: the deletion is committed, and a caller hanging up must not
        // leave an entry half-delivered.
        let this = Arc::clone(self);
        let provider_revoked = self
            .detached
            .spawn(
                async move {
                    let mut delivered = 0u32;
                    for item in queued {
                        if this.settle(&entry, item).await {
                            delivered += 1;
                        }
                    }
                    delivered
                }
                .instrument(tracing::Span::current()),
            )
            .await
            .map_err(|err| {
                VaultError::Unexpected(anyhow::anyhow!("revocation task failed: {err}"))
            })?;
        Ok(Revoked {
            revoked,
            provider_revoked,
        })
    }

    /// Attempts one entry and records the outcome; true if the provider confirmed it.
    async fn settle(&self, entry: &Arc<AgentEntry>, item: OutboxEntry) -> bool {
        let outcome = match self
            .entry_for(Arc::clone(entry), item.sealed.key_version)
            .await
        {
            Ok(entry) => self.deliver(&entry, &item).await,
            Err(err) => Err(Undelivered::Failed(format!(
                "the agent key for the queued credential: {err}"
            ))),
        };
        let record = &entry.record;
        let age = Utc::now() - item.created_at;
        let abandoned =
            outcome.is_err() && age.to_std().unwrap_or_default() > self.options.revocation_max_age;
        let event = |action: &str, outcome: Outcome| AuditRecord {
            generation: Some(item.generation.get()),
            outcome,
            ..crate::audit::event(action, &record.agent, &item.user, Some(&item.tool))
        };
        let bookkeeping = match &outcome {
            Ok(Delivery::Revoked) => self
                .store
                .outbox
                .finish_outbox(record, item.id)
                .await
                .map(|()| true),
            Ok(Delivery::NotApplicable) => {
                tracing::warn!(tool = %item.tool, "no provider revocation endpoint for this tool; deleted locally only");
                self.store
                    .outbox
                    .finish_outbox(record, item.id)
                    .await
                    .map(|()| false)
            }
            Err(undelivered) => {
                let message = undelivered.message();
                if abandoned {
                    tracing::error!(tool = %item.tool, attempts = item.attempts, %message, "giving up on a provider revocation past its maximum age");
                    self.store
                        .outbox
                        .finish_outbox(record, item.id)
                        .await
                        .map(|()| false)
                } else {
                    // A pause is waited out, as the guard says, without lengthening the backoff.
                    let (wait, counted) = match undelivered {
                        Undelivered::Failed(_) => (outbox_backoff(item.attempts), true),
                        Undelivered::Paused { retry_after, .. } => {
                            (retry_after.unwrap_or(outbox_backoff(0)), false)
                        }
                    };
                    tracing::warn!(tool = %item.tool, attempts = item.attempts, %message, "provider revocation failed; will retry");
                    self.store
                        .outbox
                        .retry_outbox(record, item.id, wait, message, counted)
                        .await
                        .map(|()| false)
                }
            }
        };
        let recorded = match (&outcome, &bookkeeping) {
            (Ok(Delivery::Revoked), Ok(_)) => Some(event(DELIVERED, Outcome::Ok)),
            (Ok(Delivery::NotApplicable), Ok(_)) => Some(event(
                ABANDONED,
                Outcome::Failed("NO_PROVIDER_REVOCATION".into()),
            )),
            (Err(_), Ok(false)) if abandoned => Some(event(
                ABANDONED,
                Outcome::Failed("PROVIDER_UNAVAILABLE".into()),
            )),
            _ => None,
        };
        if let Some(recorded) = recorded {
            self.record_event(record, recorded).await;
        }
        bookkeeping.unwrap_or_else(|err| {
            tracing::error!(error = %crate::telemetry::error_chain(&err), "could not update the revocation outbox");
            false
        })
    }

    async fn deliver(
        &self,
        entry: &AgentEntry,
        item: &OutboxEntry,
    ) -> Result<Delivery, Undelivered> {
        let Some(provider) = self.providers.get(&item.tool) else {
            return Ok(Delivery::NotApplicable);
        };
        if !provider.can_revoke().await {
            return Ok(Delivery::NotApplicable);
        }
        let binding = Binding {
            agent: &entry.record.agent,
            user: &item.user,
            tool: &item.tool,
            generation: item.generation,
        };
        let tokens = super::open_sealed(entry, binding, &item.sealed).map_err(|_| {
            Undelivered::Failed("the queued credential does not open for its binding".into())
        })?;
        // Its tokens belong to the authorization server (and client) the credential was stored
        // for; each call checks that against where it would send them, and sends nothing
        // elsewhere.
        let bound = tokens.provider.as_deref();
        let provider = &provider;
        let revoke = |token, kind| async move {
            match provider.revoke(token, kind, bound).await {
                Ok(()) => Ok(true),
                Err(ProviderError::ServerChanged(_)) => {
                    tracing::warn!(tool = %item.tool, "the tool's provider changed since the credential was stored; not revoking there");
                    Ok(false)
                }
                Err(ProviderError::Paused {
                    message,
                    retry_after,
                }) => Err(Undelivered::Paused {
                    message,
                    retry_after,
                }),
                Err(e) => Err(Undelivered::Failed(e.to_string())),
            }
        };
        // The refresh token first: RFC 7009 lets the server revoke the whole grant with it.
        if let Some(refresh) = &tokens.refresh_token
            && !revoke(refresh, TokenKind::Refresh).await?
        {
            return Ok(Delivery::NotApplicable);
        }
        if !revoke(&tokens.access_token, TokenKind::Access).await? {
            return Ok(Delivery::NotApplicable);
        }
        Ok(Delivery::Revoked)
    }

    /// Claims the revocations due now, on any agent, and delivers them one by one until none
    /// is left in this batch or `shutdown` fires (an entry being delivered is settled first).
    pub async fn deliver_due_revocations(&self, shutdown: &CancellationToken) {
        let claimed = match self
            .store
            .outbox
            .claim_outbox(self.instance, DELIVERY_LEASE, CLAIM_BATCH)
            .await
        {
            Ok(claimed) => claimed,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the revocation outbox");
                return;
            }
        };
        for (record, item) in claimed {
            if shutdown.is_cancelled() {
                break;
            }
            self.deliver_claimed(record, item).await;
        }
    }

    async fn deliver_claimed(&self, record: AgentRecord, item: OutboxEntry) {
        match self.agent_entry(&record.issuer, &record.agent, false).await {
            Ok(Some(entry)) => {
                self.settle(&entry, item).await;
            }
            Ok(None) => tracing::error!("outbox entry of an agent missing from the registry"),
            Err(err) => {
                tracing::warn!(error = %err, "cannot load the agent key for a queued revocation")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_are_retried_doubling_from_a_second_to_at_most_an_hour() {
        let waits: Vec<u64> = [0, 1, 2, 11, 12, 13, 40]
            .into_iter()
            .map(|n| outbox_backoff(n).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 2048, 3600, 3600, 3600]);
    }
}
