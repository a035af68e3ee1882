//! The audit log (issue 15): one hash chain per agent and one for the control plane, each with
//! a head recording how far it went, where retention left it (the anchor) and the latest head
//! signed under the root key.
//!
//! The store assigns sequences and computes hashes itself, and moves a chain's head only from
//! where it found it (a compare-and-set, or under the head's lock), so records appended
//! concurrently by many tasks and replicas still form one gap-free chain: the caller hands over
//! records, never sequences. What to record, and when to sign a head, is the
//! caller's business.

use super::{AgentRecord, StoreError};
use crate::audit::{Anchor, AuditRecord, SignedHead, Stored};

/// One audit chain.
#[derive(Debug, Clone, Copy)]
pub enum Chain<'a> {
    /// The control plane's: key events, startup and shutdown, admin calls not on one agent.
    Control,
    /// An agent's (on PostgreSQL, in that agent's schema).
    Agent(&'a AgentRecord),
}

impl Chain<'_> {
    /// The chain's key where chains share a table (SQLite): `control`, or the agent's
    /// namespace. Namespaces start with `agent_`, so no agent can be the control chain.
    pub fn key(&self) -> &str {
        match self {
            Self::Control => "control",
            Self::Agent(agent) => &agent.namespace,
        }
    }
}

/// Audit chains.
#[async_trait::async_trait]
pub trait AuditStore: Send + Sync + 'static {
    /// Appends `records` to `chain`, all or none: each gets the next sequence after the chain's
    /// head (whatever `sequence` it came with) and its hash linked to the one before; returns
    /// them as stored. Concurrent appends to one chain are serialised on its head.
    async fn append(
        &self,
        chain: Chain<'_>,
        records: Vec<AuditRecord>,
    ) -> Result<Vec<Stored>, StoreError>;

    /// Appends each batch to its chain, as [`Self::append`] would: what group commit uses.
    /// Each batch is stored or not on its own, so one broken chain fails only its own records;
    /// the answers come in the batches' order. The default appends chain by chain (a store
    /// with one writer gains nothing from more).
    async fn append_batches(
        &self,
        batches: Vec<(Chain<'_>, Vec<AuditRecord>)>,
    ) -> Vec<Result<(), StoreError>> {
        let mut results = Vec::with_capacity(batches.len());
        for (chain, records) in batches {
            results.push(self.append(chain, records).await.map(drop));
        }
        results
    }

    /// At most `limit` records of `chain` with a sequence above `after`, in sequence order.
    async fn records(
        &self,
        chain: Chain<'_>,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Stored>, StoreError>;

    /// Where `chain` ends: its last sequence and hash ([`Anchor::START`] before its first
    /// record).
    async fn head(&self, chain: Chain<'_>) -> Result<Anchor, StoreError>;

    /// Where the kept part of `chain` starts: [`Anchor::START`] unless retention deleted a
    /// prefix.
    async fn anchor(&self, chain: Chain<'_>) -> Result<Anchor, StoreError>;

    /// Deletes the oldest records of `chain`, at most `limit`, stopping at the first one not
    /// older than `before_ms` (a prefix: a record is never deleted while an older-sequenced one
    /// is kept, whatever the clocks said), and moves the anchor to the last one deleted, in one
    /// transaction. Returns how many were deleted.
    async fn delete_before(
        &self,
        chain: Chain<'_>,
        before_ms: i64,
        limit: u32,
    ) -> Result<u64, StoreError>;

    /// Keeps `head` as `chain`'s latest signed head, unless one further along is kept already
    /// (two signers racing never move it back).
    async fn save_head(&self, chain: Chain<'_>, head: &SignedHead) -> Result<(), StoreError>;

    /// The latest signed head of `chain`, if one was saved.
    async fn signed_head(&self, chain: Chain<'_>) -> Result<Option<SignedHead>, StoreError>;
}

/// Numbers `records` on from `head` and links each to the one before: what an append stores.
pub(super) fn chained(head: Anchor, records: Vec<AuditRecord>) -> Vec<Stored> {
    let mut last = head;
    records
        .into_iter()
        .map(|mut record| {
            record.sequence = last.sequence + 1;
            let hash = crate::audit::link(&last.hash, &record);
            last = Anchor {
                sequence: record.sequence,
                hash,
            };
            Stored { record, hash }
        })
        .collect()
}

/// A sequence or generation as the databases' signed 64-bit integers.
pub(super) fn db_int(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} out of range: {value}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::GENESIS;
    use crate::audit::verify;

    #[test]
    fn chained_records_continue_the_head_whatever_sequence_they_came_with() {
        let first = chained(
            Anchor::START,
            vec![AuditRecord {
                sequence: 99,
                action: "startup".into(),
                ..AuditRecord::default()
            }],
        );
        assert_eq!(first[0].record.sequence, 1);
        let head = Anchor {
            sequence: 1,
            hash: first[0].hash,
        };
        let more = chained(head, vec![AuditRecord::default(), AuditRecord::default()]);
        assert_eq!(
            more.iter().map(|s| s.record.sequence).collect::<Vec<_>>(),
            [2, 3]
        );
        let whole: Vec<_> = first.iter().chain(&more).collect();
        assert_eq!(verify(Anchor::START, whole, None).unwrap().sequence, 3);
        assert_ne!(more[0].hash, GENESIS);
    }
}
