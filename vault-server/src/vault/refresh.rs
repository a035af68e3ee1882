//! Refresh, fenced: exactly one provider call per stale credential, however many callers and
//! replicas ask at once.
//!
//! Three fences, each covering what the previous cannot:
//! 1. in-process: one gate per (agent, user, tool), so concurrent callers in one replica queue
//!    and the later ones find the new generation instead of calling the provider;
//! 2. across replicas: a short lease on the credential row, taken only on the generation the
//!    caller saw and only outside a backoff window (expiring, so a crashed holder cannot wedge it);
//! 3. on write: a compare-and-swap on the generation, so a refresh never overwrites a newer
//!    StoreToken; the loser re-reads, never overwrites, never deletes.
//!
//! The provider call and the write run in a spawned task: a caller that hangs up mid-refresh
//! must not drop a rotated refresh token on the floor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tracing::Instrument as _;

use super::{IssuedToken, Opened, Vault, VaultError};
use crate::auth::Caller;
use crate::crypto::{Binding, seal_credential};
use crate::ids::{AgentId, Generation, IssuerId, Tool, UserId};
use crate::oauth::{Provider, ProviderError, Providers};
use crate::secret::TokenSet;
use crate::store::{NewCredential, RefreshLease};

type Key = (IssuerId, AgentId, UserId, Tool);

/// One async mutex per credential being refreshed; entries vanish when nobody holds them.
#[derive(Default)]
pub(super) struct Gates(Mutex<HashMap<Key, Weak<tokio::sync::Mutex<()>>>>);

impl Gates {
    fn get(&self, key: Key) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(gate) = map.get(&key).and_then(Weak::upgrade) {
            return gate;
        }
        if map.len() > 1024 {
            map.retain(|_, gate| gate.strong_count() > 0);
        }
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        map.insert(key, Arc::downgrade(&gate));
        gate
    }
}

/// Refresh outcomes since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefreshCounts {
    /// Provider calls that produced a new token.
    pub refreshed: u64,
    /// Callers served a token another caller (or replica) had just refreshed.
    pub coalesced: u64,
    /// Provider rejections of the grant.
    pub reauth_required: u64,
    /// Transient provider failures.
    pub provider_unavailable: u64,
    /// Calls refused without a provider call because of a backoff window.
    pub backed_off: u64,
    /// Refreshes whose write lost to a newer StoreToken.
    pub superseded: u64,
}

/// Refresh outcomes, kept here for [`Vault::refresh_counts`] and exported as the OpenTelemetry
/// counter `vault.refresh.outcomes` (attribute `outcome`) through the global meter provider.
pub(super) struct Counters {
    refreshed: AtomicU64,
    coalesced: AtomicU64,
    reauth_required: AtomicU64,
    provider_unavailable: AtomicU64,
    backed_off: AtomicU64,
    superseded: AtomicU64,
    exported: opentelemetry::metrics::Counter<u64>,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            refreshed: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            reauth_required: AtomicU64::new(0),
            provider_unavailable: AtomicU64::new(0),
            backed_off: AtomicU64::new(0),
            superseded: AtomicU64::new(0),
            exported: opentelemetry::global::meter(crate::telemetry::SCOPE)
                .u64_counter("vault.refresh.outcomes")
                .with_description("Refresh attempts by outcome")
                .build(),
        }
    }
}

impl Counters {
    fn bump(&self, counter: &AtomicU64, outcome: &'static str) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.exported
            .add(1, &[opentelemetry::KeyValue::new("outcome", outcome)]);
        tracing::info!(outcome, "refresh");
    }

    pub(super) fn snapshot(&self) -> RefreshCounts {
        RefreshCounts {
            refreshed: self.refreshed.load(Ordering::Relaxed),
            coalesced: self.coalesced.load(Ordering::Relaxed),
            reauth_required: self.reauth_required.load(Ordering::Relaxed),
            provider_unavailable: self.provider_unavailable.load(Ordering::Relaxed),
            backed_off: self.backed_off.load(Ordering::Relaxed),
            superseded: self.superseded.load(Ordering::Relaxed),
        }
    }
}

/// How often a caller waiting on another replica's lease looks again.
const LEASE_POLL: Duration = Duration::from_millis(100);

impl Vault {
    /// Refreshes the credential the caller saw at `observed`, or returns the newer one someone
    /// else stored or refreshed meanwhile.
    pub(super) async fn refresh_fenced(
        self: &Arc<Self>,
        caller: &Caller,
        tool: &Tool,
        observed: Generation,
        provider: Arc<Provider>,
    ) -> Result<IssuedToken, VaultError> {
        let this = Arc::clone(self);
        let caller = caller.clone();
        let tool = tool.clone();
        // The detached task stays in the caller's span, so its trace shows the provider call.
        tokio::spawn(
            async move {
                this.refresh_detached(&caller, &tool, observed, &provider)
                    .await
            }
            .instrument(tracing::Span::current()),
        )
        .await
        .map_err(|err| VaultError::Unexpected(anyhow::anyhow!("refresh task failed: {err}")))?
    }

    async fn refresh_detached(
        &self,
        caller: &Caller,
        tool: &Tool,
        observed: Generation,
        provider: &Provider,
    ) -> Result<IssuedToken, VaultError> {
        let gate = self.gates.get((
            caller.issuer.clone(),
            caller.agent.clone(),
            caller.user.clone(),
            tool.clone(),
        ));
        let _turn = gate.lock().await;
        // Waiting on another replica is bounded by one lease period plus slack.
        let deadline = Instant::now() + self.options.refresh_lease + Duration::from_secs(5);
        loop {
            let current = self.open_current(caller, tool).await?;
            if current.generation > observed {
                self.counts.bump(&self.counts.coalesced, "coalesced");
                return Ok(Self::issue(current.tokens, current.generation, true));
            }
            // Checked before the lease: a refusal must not leave the row leased.
            if current
                .tokens
                .provider
                .as_ref()
                .is_some_and(|bound| *bound != Providers::binding(provider))
            {
                // The tool's authorization server changed since the credential was stored:
                // its refresh token belongs to the old one and is never sent to the new one.
                tracing::warn!(%tool, "the tool's provider changed since the credential was stored; not refreshing");
                return Err(VaultError::ReauthRequired(format!(
                    "tool {tool} now names a different authorization server than the one this credential was issued by; the user must authorize again"
                )));
            }
            let lease = self
                .store
                .try_refresh_lease(
                    &current.entry.record,
                    &caller.user,
                    tool,
                    current.generation,
                    self.instance,
                    self.options.refresh_lease,
                )
                .await?;
            match lease {
                RefreshLease::Acquired => {
                    return self.refresh_now(caller, tool, provider, current).await;
                }
                RefreshLease::BackingOff { until } => {
                    self.counts.bump(&self.counts.backed_off, "backed_off");
                    return Err(VaultError::ProviderUnavailable(format!(
                        "the provider failed recently; the next refresh attempt is allowed after {}",
                        until.to_rfc3339()
                    )));
                }
                RefreshLease::Held | RefreshLease::Changed => {
                    if Instant::now() >= deadline {
                        return Err(VaultError::ProviderUnavailable(
                            "another replica is still refreshing this credential; retry".into(),
                        ));
                    }
                    tokio::time::sleep(LEASE_POLL).await;
                }
            }
        }
    }

    /// Holding the lease: call the provider once and record the outcome.
    async fn refresh_now(
        &self,
        caller: &Caller,
        tool: &Tool,
        provider: &Provider,
        current: Opened,
    ) -> Result<IssuedToken, VaultError> {
        let Opened {
            entry,
            tokens,
            generation,
        } = current;
        let Some(refresh_token) = tokens.refresh_token.clone() else {
            return Err(VaultError::ReauthRequired(format!(
                "no refresh token is stored for tool {tool}"
            )));
        };
        let binding = Providers::binding(provider);
        match self.providers.refresh(provider, &refresh_token).await {
            Ok(fresh) => {
                let now = Utc::now().timestamp();
                let renewed = TokenSet {
                    access_token: fresh.access_token,
                    // Rotation: a new refresh token replaces the old one in this same write; a
                    // provider that omits it keeps the old one valid.
                    refresh_token: fresh.refresh_token.or(Some(refresh_token)),
                    token_type: tokens.token_type,
                    expires_at: fresh
                        .expires_in
                        .map(|d| now.saturating_add(d.as_secs() as i64)),
                    scopes: fresh.scopes.unwrap_or(tokens.scopes),
                    provider: Some(binding),
                    obtained_at: Some(now),
                };
                let next = self.store.next_generation(&entry.record).await?;
                let binding = Binding {
                    agent: &caller.agent,
                    user: &caller.user,
                    tool,
                    generation: next,
                };
                let sealed = seal_credential(&entry.key, binding, &renewed);
                let written = self
                    .store
                    .complete_refresh(
                        &entry.record,
                        generation,
                        NewCredential {
                            user: &caller.user,
                            tool,
                            generation: next,
                            sealed: &sealed,
                            access_expires_at: renewed
                                .expires_at
                                .and_then(|s| DateTime::from_timestamp(s, 0)),
                            ttl_seconds: 0,
                        },
                    )
                    .await?;
                if written {
                    self.counts.bump(&self.counts.refreshed, "refreshed");
                    return Ok(Self::issue(renewed, next, true));
                }
                // A StoreToken replaced the credential while the provider answered: the user's
                // newer consent wins, and this refresh result is dropped.
                self.counts.bump(&self.counts.superseded, "superseded");
                let latest = self.open_current(caller, tool).await?;
                Ok(Self::issue(latest.tokens, latest.generation, false))
            }
            Err(ProviderError::GrantRejected(code)) => {
                self.store
                    .mark_reauth_required(&entry.record, &caller.user, tool, generation)
                    .await?;
                self.counts
                    .bump(&self.counts.reauth_required, "reauth_required");
                Err(VaultError::ReauthRequired(format!(
                    "the provider rejected the refresh token for tool {tool} ({code}); the user must authorize again"
                )))
            }
            Err(ProviderError::Unavailable {
                message,
                retry_after,
            }) => {
                let until = self
                    .store
                    .record_refresh_failure(
                        &entry.record,
                        &caller.user,
                        tool,
                        generation,
                        retry_after,
                        self.options.backoff_base,
                        self.options.backoff_cap,
                    )
                    .await?;
                self.counts
                    .bump(&self.counts.provider_unavailable, "provider_unavailable");
                Err(VaultError::ProviderUnavailable(match until {
                    Some(until) => format!(
                        "{message}; the next attempt is allowed after {}",
                        until.to_rfc3339()
                    ),
                    None => message,
                }))
            }
        }
    }
}
