//! Token buckets per agent and per (agent, user), with `governor`'s GCRA: one in-memory cell per
//! caller that called recently, no lock shared across keys, and the time until the next token
//! for the refusal's `RetryInfo`. Keys are verified identities only (the auth layer runs
//! first), and idle cells are dropped by [`Limits::forget_idle`], so memory follows the callers
//! active in the last burst window rather than every caller ever seen.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, RateLimiter};

use crate::auth::Caller;
use crate::ids::{AgentId, IssuerId, UserId};

/// Most tokens a bucket may hold.
const MAX_BURST: u32 = 1_000_000;

/// A rate: `per_second` tokens a second, holding at most `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    per_second: f64,
    burst: u32,
}

impl Quota {
    /// A quota of `per_second` (0.001 to 1,000,000) with a burst of `burst` (default: one
    /// second's worth, at least 1).
    pub fn new(per_second: f64, burst: Option<u32>) -> Result<Self, String> {
        if !(0.001..=1_000_000.0).contains(&per_second) {
            return Err(format!(
                "per_second must be between 0.001 and 1000000, got {per_second}"
            ));
        }
        let burst = burst.unwrap_or_else(|| per_second.ceil() as u32).max(1);
        if burst > MAX_BURST {
            return Err(format!("burst must be at most {MAX_BURST}, got {burst}"));
        }
        Ok(Self { per_second, burst })
    }

    fn governor(self) -> governor::Quota {
        let period = Duration::from_secs_f64(1.0 / self.per_second);
        // `new` keeps per_second ≤ 1e6, so the period is at least a microsecond.
        governor::Quota::with_period(period)
            .expect("a positive rate has a non-zero period")
            .allow_burst(NonZeroU32::new(self.burst).expect("burst is at least 1"))
    }
}

/// Which bucket refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// `"agent"` or `"user"`.
    pub bucket: &'static str,
    /// When the next token is there.
    pub retry_after: Duration,
}

type AgentKey = (IssuerId, AgentId);
type UserKey = (IssuerId, AgentId, UserId);

struct Bucket<K: std::hash::Hash + Eq + Clone> {
    quota: Quota,
    cells: DefaultKeyedRateLimiter<K>,
}

impl<K: std::hash::Hash + Eq + Clone> Bucket<K> {
    fn new(quota: Quota) -> Self {
        Self {
            quota,
            cells: RateLimiter::dashmap(quota.governor()),
        }
    }

    fn take(&self, key: &K, bucket: &'static str) -> Result<(), Limited> {
        self.cells.check_key(key).map_err(|not_until| Limited {
            bucket,
            retry_after: not_until.wait_time_from(self.cells.clock().now()),
        })
    }
}

/// A pair of buckets: per agent and per (agent, user). Either may be off.
pub struct Limits {
    agent: Option<Bucket<AgentKey>>,
    user: Option<Bucket<UserKey>>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("agent", &self.agent.as_ref().map(|b| b.quota))
            .field("user", &self.user.as_ref().map(|b| b.quota))
            .finish()
    }
}

impl Limits {
    /// Buckets at these quotas; `None` is no limit.
    pub fn new(agent: Option<Quota>, user: Option<Quota>) -> Self {
        Self {
            agent: agent.map(Bucket::new),
            user: user.map(Bucket::new),
        }
    }

    /// The quotas, to tell whether a reloaded policy changed them.
    pub fn quotas(&self) -> (Option<Quota>, Option<Quota>) {
        (
            self.agent.as_ref().map(|b| b.quota),
            self.user.as_ref().map(|b| b.quota),
        )
    }

    /// Takes a token for `caller` from each bucket, or says which refused and when to retry.
    /// The (agent, user) bucket is asked first, so one busy user of an agent spends only their
    /// own budget, never the agent's, once refused.
    pub fn take(&self, caller: &Caller) -> Result<(), Limited> {
        if let Some(bucket) = &self.user {
            let key = (
                caller.issuer.clone(),
                caller.agent.clone(),
                caller.user.clone(),
            );
            bucket.take(&key, "user")?;
        }
        if let Some(bucket) = &self.agent {
            let key = (caller.issuer.clone(), caller.agent.clone());
            bucket.take(&key, "agent")?;
        }
        Ok(())
    }

    /// Drops the cells of callers whose buckets have refilled: they are the same as new.
    pub fn forget_idle(&self) {
        if let Some(bucket) = &self.agent {
            bucket.cells.retain_recent();
            bucket.cells.shrink_to_fit();
        }
        if let Some(bucket) = &self.user {
            bucket.cells.retain_recent();
            bucket.cells.shrink_to_fit();
        }
    }

    /// Cells held, for tests of the clean-up.
    pub fn cells(&self) -> usize {
        self.agent.as_ref().map_or(0, |b| b.cells.len())
            + self.user.as_ref().map_or(0, |b| b.cells.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::StepUp;

    fn caller(agent: &str, user: &str) -> Caller {
        Caller {
            issuer: IssuerId::parse("https://issuer.test").unwrap(),
            agent: AgentId::parse(agent).unwrap(),
            user: UserId::parse(user).unwrap(),
            admin: false,
            store: false,
            jti: None,
            step_up: StepUp::default(),
        }
    }

    #[test]
    fn a_burst_passes_then_the_refusal_says_when_to_retry() {
        let limits = Limits::new(None, Some(Quota::new(1.0, Some(2)).unwrap()));
        let alice = caller("a", "alice");
        assert!(limits.take(&alice).is_ok());
        assert!(limits.take(&alice).is_ok());
        let refused = limits.take(&alice).unwrap_err();
        assert_eq!(refused.bucket, "user");
        assert!(
            refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_secs(1),
            "{refused:?}"
        );
        // Another user of the same agent has a bucket of their own.
        assert!(limits.take(&caller("a", "bob")).is_ok());
    }

    #[test]
    fn the_agent_bucket_is_shared_by_its_users() {
        let limits = Limits::new(Some(Quota::new(0.01, Some(2)).unwrap()), None);
        assert!(limits.take(&caller("a", "u1")).is_ok());
        assert!(limits.take(&caller("a", "u2")).is_ok());
        assert_eq!(limits.take(&caller("a", "u3")).unwrap_err().bucket, "agent");
        assert!(limits.take(&caller("b", "u1")).is_ok(), "another agent");
        assert_eq!(limits.cells(), 2);
    }

    #[test]
    fn quotas_out_of_range_are_refused() {
        assert!(Quota::new(0.0, None).is_err());
        assert!(Quota::new(f64::NAN, None).is_err());
        assert!(Quota::new(1.0, Some(MAX_BURST + 1)).is_err());
        assert_eq!(Quota::new(2.5, None).unwrap().burst, 3);
    }
}
