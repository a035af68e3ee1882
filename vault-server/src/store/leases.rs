//! Leases: the refresh lease on a credential row, which makes one replica call the provider
//! for a stale credential, and named leases in the control schema, which make one replica run a
//! background job. Both expire, so a crashed holder blocks the others for one lease at most.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::rows::LeaseProbe;
use super::{CredentialKey, StoreError};
use crate::ids::Generation;

/// Result of asking for the refresh lease of one credential generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshLease {
    /// This caller may call the provider; nobody else will until the lease expires.
    Acquired {
        /// Transient provider failures recorded on this generation so far.
        failures: u32,
    },
    /// Another caller (another replica) is refreshing it now.
    Held,
    /// A recent transient failure: no provider call before `until`.
    BackingOff {
        /// When the next attempt is allowed.
        until: DateTime<Utc>,
    },
    /// The generation moved on, or the credential needs re-authorization or is gone: re-read.
    Changed,
}

impl RefreshLease {
    /// The lease was taken on a row that has failed `failures` times so far.
    pub(super) fn acquired(failures: i64) -> Self {
        Self::Acquired {
            failures: u32::try_from(failures).unwrap_or(u32::MAX),
        }
    }

    /// Why a lease on `observed` was not taken, from what the row holds now (`None`: no
    /// credential within its TTL).
    pub(super) fn refused(
        observed: Generation,
        now: Option<LeaseProbe>,
    ) -> Result<Self, StoreError> {
        let Some(row) = now else {
            return Ok(Self::Changed);
        };
        if row.generation != observed.get() as i64 || row.state != 0 {
            return Ok(Self::Changed);
        }
        if let Some(until) = row.not_before_ms {
            return Ok(Self::BackingOff {
                until: super::rows::from_ms(until),
            });
        }
        Ok(if row.held != 0 {
            Self::Held
        } else {
            Self::Changed
        })
    }
}

/// Refresh leases and named leases.
#[async_trait::async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// Takes the refresh lease on `generation` for `ttl`, unless someone else holds it, the
    /// credential is backing off, or it has changed.
    async fn try_refresh_lease(
        &self,
        key: CredentialKey<'_>,
        generation: Generation,
        owner: uuid::Uuid,
        ttl: Duration,
    ) -> Result<RefreshLease, StoreError>;

    /// Records a refresh of `generation` that did not happen: releases the lease and allows no
    /// provider call for `wait`; a failure at the provider is `counted` (it lengthens the next
    /// backoff), a call the vault never sent is not. Returns when the next call is allowed, or
    /// `None` when the generation is no longer stored.
    async fn record_refresh_failure(
        &self,
        key: CredentialKey<'_>,
        generation: Generation,
        wait: Duration,
        counted: bool,
    ) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Takes or renews the named lease for `ttl`; true if `holder` has it now.
    async fn try_lease(
        &self,
        name: &str,
        holder: uuid::Uuid,
        ttl: Duration,
    ) -> Result<bool, StoreError>;
}
