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
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tracing::Instrument as _;

use super::{AgentEntry, IssuedToken, Opened, Vault, VaultError};
use crate::audit::Outcome;
use crate::auth::Caller;
use crate::crypto::{Binding, seal_credential};
use crate::ids::{AgentId, Generation, IssuerId, Tool, UserId};
use crate::oauth::{Provider, ProviderError};
use crate::secret::TokenSet;
use crate::store::{CredentialKey, NewCredential, RefreshLease, StoreError};

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

/// Refresh outcomes, logged and exported as the OpenTelemetry counter `vault.refresh.outcomes`
/// (attribute `outcome`) through the global meter provider.
pub(super) struct Outcomes(opentelemetry::metrics::Counter<u64>);

impl Default for Outcomes {
    fn default() -> Self {
        Self(
            opentelemetry::global::meter(crate::telemetry::SCOPE)
                .u64_counter("vault.refresh.outcomes")
                .with_description("Refresh attempts by outcome")
                .build(),
        )
    }
}

impl Outcomes {
    fn record(&self, outcome: &'static str) {
        self.0
            .add(1, &[opentelemetry::KeyValue::new("outcome", outcome)]);
        tracing::info!(outcome, "refresh");
    }
}

/// How long to wait after the `failures + 1`th consecutive transient failure of a refresh:
/// exponential from `base` and capped at `cap`, but never less than the provider's Retry-After,
/// which is honoured up to an hour.
pub fn refresh_backoff(
    failures: u32,
    retry_after: Option<Duration>,
    base: Duration,
    cap: Duration,
) -> Duration {
    let exponential = base.saturating_mul(1u32 << failures.min(30)).min(cap);
    exponential.max(
        retry_after
            .unwrap_or_default()
            .min(Duration::from_secs(3600)),
    )
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
        deadline: Option<Instant>,
    ) -> Result<IssuedToken, VaultError> {
        super::before(deadline, "the refresh")?;
        let this = Arc::clone(self);
        let caller = caller.clone();
        let tool = tool.clone();
        // The detached task stays in the caller's span, so its trace shows the provider call.
        self.detached
            .spawn(
                async move {
                    this.refresh_detached(&caller, &tool, observed, &provider, deadline)
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
        caller_deadline: Option<Instant>,
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
            let current = self.open_current(caller, tool, None, None).await?;
            if current.generation > observed {
                self.outcomes.record("coalesced");
                return Ok(Self::issue(current.tokens, current.generation, true));
            }
            // Checked before the lease: a refusal must not leave the row leased.
            let check = provider
                .check_bound(current.tokens.provider.as_deref())
                .await;
            if let Err(
                ProviderError::Unavailable { message, .. } | ProviderError::Paused { message, .. },
            ) = &check
            {
                return Err(VaultError::ProviderUnavailable(message.clone()));
            }
            if check.is_err() {
                // The tool's authorization server changed since the credential was stored:
                // its refresh token belongs to the old one and is never sent to the new one.
                tracing::warn!(%tool, "the tool's provider changed since the credential was stored; not refreshing");
                return Err(VaultError::ReauthRequired(format!(
                    "tool {tool} now names a different authorization server than the one this credential was issued by; the user must authorize again"
                )));
            }
            // The wait for the gate or another replica's lease may have outlasted the caller:
            // no provider call starts for a caller that is gone (one that started continues,
            // so a rotated refresh token is never dropped).
            super::before(caller_deadline, "the provider call")?;
            let key = CredentialKey {
                agent: &current.entry.record,
                user: &caller.user,
                tool,
            };
            let lease = self
                .store
                .leases
                .try_refresh_lease(
                    key,
                    current.generation,
                    self.instance,
                    self.options.refresh_lease,
                )
                .await?;
            match lease {
                RefreshLease::Acquired { failures } => {
                    return self
                        .refresh_now(caller, tool, provider, current, failures)
                        .await;
                }
                RefreshLease::BackingOff { until } => {
                    self.outcomes.record("backed_off");
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

    /// Holding the lease: call the provider once and record the outcome. `failures` is how
    /// many transient failures came before this attempt.
    async fn refresh_now(
        &self,
        caller: &Caller,
        tool: &Tool,
        provider: &Provider,
        current: Opened,
        failures: u32,
    ) -> Result<IssuedToken, VaultError> {
        let Opened {
            entry,
            tokens,
            generation,
            ..
        } = current;
        let key = CredentialKey {
            agent: &entry.record,
            user: &caller.user,
            tool,
        };
        let Some(refresh_token) = tokens.refresh_token.clone() else {
            return Err(VaultError::ReauthRequired(format!(
                "no refresh token is stored for tool {tool}"
            )));
        };
        // Checked again inside the call, against the endpoints it sends to: discovery may have
        // changed its answer since the check before the lease.
        match provider
            .refresh(&refresh_token, tokens.provider.as_deref())
            .await
        {
            Ok((fresh, binding)) => {
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
                let next = self
                    .store
                    .credentials
                    .next_generation(&entry.record)
                    .await?;
                let binding = Binding {
                    agent: &caller.agent,
                    user: &caller.user,
                    tool,
                    generation: next,
                };
                let mut fresh: Option<Arc<AgentEntry>> = None;
                let mut attempts = 0;
                let written = loop {
                    let current = fresh.as_deref().unwrap_or(&entry);
                    let sealed = seal_credential(&current.key, binding, &renewed);
                    let swapped = self
                        .store
                        .credentials
                        .complete_refresh(
                            CredentialKey {
                                agent: &current.record,
                                ..key
                            },
                            generation,
                            NewCredential {
                                generation: next,
                                sealed: &sealed,
                                access_expires_at: renewed
                                    .expires_at
                                    .and_then(|s| DateTime::from_timestamp(s, 0)),
                                ttl_seconds: 0,
                            },
                            vec![refresh_event(caller, tool, Some(next), Outcome::Ok)],
                        )
                        .await;
                    match swapped {
                        // The agent key was rotated while the provider answered: the rotated
                        // refresh token must not be lost, so seal again under the new version.
                        Err(StoreError::AgentKeyRotated) if attempts < super::RESEAL_ATTEMPTS => {
                            attempts += 1;
                            fresh = Some(self.reload_entry(current).await?);
                        }
                        other => break other?,
                    }
                };
                if written {
                    self.recorder.changes().publish(&entry.record.namespace);
                    self.outcomes.record("refreshed");
                    return Ok(Self::issue(renewed, next, true));
                }
                // A StoreToken replaced the credential while the provider answered: the user's
                // newer consent wins, and this refresh result is dropped.
                self.outcomes.record("superseded");
                let latest = self.open_current(caller, tool, None, None).await?;
                Ok(Self::issue(latest.tokens, latest.generation, false))
            }
            Err(ProviderError::ServerChanged(message)) => {
                // Nothing was sent; release the lease at once and keep the credential as it
                // is (its access token may still be good where it belongs).
                self.store
                    .leases
                    .record_refresh_failure(key, generation, Duration::ZERO, false)
                    .await?;
                self.record_event(
                    &entry.record,
                    refresh_event(
                        caller,
                        tool,
                        Some(generation),
                        Outcome::Failed("REAUTH_REQUIRED".into()),
                    ),
                )
                .await;
                Err(VaultError::ReauthRequired(format!(
                    "{message}; the user must authorize again"
                )))
            }
            Err(ProviderError::GrantRejected(code)) => {
                self.store
                    .credentials
                    .mark_reauth_required(
                        key,
                        generation,
                        vec![refresh_event(
                            caller,
                            tool,
                            Some(generation),
                            Outcome::Failed("REAUTH_REQUIRED".into()),
                        )],
                    )
                    .await?;
                self.recorder.changes().publish(&entry.record.namespace);
                self.outcomes.record("reauth_required");
                Err(VaultError::ReauthRequired(format!(
                    "the provider rejected the refresh token for tool {tool} ({code}); the user must authorize again"
                )))
            }
            Err(ProviderError::Paused {
                message,
                retry_after,
            }) => {
                // The vault's guard held the call back: the provider said nothing about this
                // credential, so its backoff neither starts nor grows; the next attempt waits
                // only for the guard.
                self.store
                    .leases
                    .record_refresh_failure(key, generation, retry_after.unwrap_or_default(), false)
                    .await?;
                self.outcomes.record("provider_paused");
                Err(VaultError::ProviderUnavailable(message))
            }
            Err(ProviderError::Unavailable {
                message,
                retry_after,
            }) => {
                let wait = refresh_backoff(
                    failures,
                    retry_after,
                    self.options.backoff_base,
                    self.options.backoff_cap,
                );
                let until = self
                    .store
                    .leases
                    .record_refresh_failure(key, generation, wait, true)
                    .await?;
                self.outcomes.record("provider_unavailable");
                self.record_event(
                    &entry.record,
                    refresh_event(
                        caller,
                        tool,
                        Some(generation),
                        Outcome::Failed("PROVIDER_UNAVAILABLE".into()),
                    ),
                )
                .await;
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

/// The action of a refresh at the provider, whatever its outcome.
pub const REFRESH: &str = "refresh";

/// The audit record of a refresh of `caller`'s credential for `tool`.
fn refresh_event(
    caller: &Caller,
    tool: &Tool,
    generation: Option<Generation>,
    outcome: Outcome,
) -> crate::audit::AuditRecord {
    crate::audit::AuditRecord {
        generation: generation.map(Generation::get),
        outcome,
        ..crate::audit::event(REFRESH, &caller.agent, &caller.user, Some(tool))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_per_failure_up_to_its_cap() {
        let (base, cap) = (Duration::from_secs(1), Duration::from_secs(300));
        let waits: Vec<u64> = (0..10)
            .map(|n| refresh_backoff(n, None, base, cap).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        assert_eq!(refresh_backoff(u32::MAX, None, base, cap), cap);
    }

    #[test]
    fn retry_after_lengthens_the_backoff_up_to_an_hour_but_never_shortens_it() {
        let (base, cap) = (Duration::from_secs(1), Duration::from_secs(300));
        let wait = |failures, after| refresh_backoff(failures, Some(after), base, cap);
        assert_eq!(wait(0, Duration::from_secs(7)), Duration::from_secs(7));
        assert_eq!(wait(5, Duration::from_secs(7)), Duration::from_secs(32));
        assert_eq!(
            wait(0, Duration::from_secs(86_400)),
            Duration::from_secs(3600)
        );
    }
}
