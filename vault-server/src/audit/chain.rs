//! The audit log's tamper evidence: each chain (one per agent, one for the control plane) is a
//! sequence of records where every record's hash covers the previous hash and the record's
//! canonical encoding, so editing, deleting, reordering or inserting a record breaks the chain
//! at that record. A head signed with a key derived from the root key (HMAC) records how far
//! the chain went, so cutting its tail is detected too; an anchor (the hash and sequence just
//! before the oldest kept record) lets retention delete a prefix and keep the rest verifiable.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::record::AuditRecord;
use crate::crypto::ControlKey;

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// The hash before a chain's first record.
pub const GENESIS: Hash = [0; 32];

/// `SHA-256(previous ‖ canonical encoding of record)`.
pub fn link(previous: &Hash, record: &AuditRecord) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(previous);
    hasher.update(record.canonical());
    hasher.finalize().into()
}

/// A record as stored: the record, and the hash the writer computed for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The record (its `sequence` included).
    pub record: AuditRecord,
    /// Its hash as written.
    pub hash: Hash,
}

/// Where a kept chain starts: the sequence and hash of the last record before it (deleted by
/// retention), or sequence 0 and [`GENESIS`] for a chain kept whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// The sequence of the last deleted record (0: none).
    pub sequence: u64,
    /// Its hash.
    pub hash: Hash,
}

impl Anchor {
    /// The anchor of a chain nothing was deleted from.
    pub const START: Self = Self {
        sequence: 0,
        hash: GENESIS,
    };
}

/// A signed statement of how far a chain went: its last sequence and hash when signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHead {
    /// The chain (`control`, or the agent's id).
    pub chain: String,
    /// The last sequence signed.
    pub sequence: u64,
    /// That record's hash.
    pub hash: Hash,
    /// HMAC-SHA256 over the three, under the head key.
    pub mac: Vec<u8>,
}

/// The key heads are signed with: derived from the control key (which the root key wraps), for
/// this purpose only.
pub struct HeadKey(Hmac<Sha256>);

impl HeadKey {
    /// Derives the head key from the control key.
    pub fn derive(control: &ControlKey) -> Self {
        let mut derive = <Hmac<Sha256> as Mac>::new_from_slice(control.expose_bytes())
            .expect("HMAC takes a key of any length");
        derive.update(b"vault.v1/audit-head-key");
        let key = derive.finalize().into_bytes();
        Self(<Hmac<Sha256> as Mac>::new_from_slice(&key).expect("HMAC takes a key of any length"))
    }

    fn mac(&self, chain: &str, sequence: u64, hash: &Hash) -> Hmac<Sha256> {
        let mut mac = self.0.clone();
        mac.update(&crate::crypto::associated_data(
            "audit-head",
            &[chain.as_bytes(), &sequence.to_be_bytes(), hash],
        ));
        mac
    }

    /// Signs `chain`'s head at (`sequence`, `hash`).
    pub fn sign(&self, chain: &str, sequence: u64, hash: &Hash) -> SignedHead {
        SignedHead {
            chain: chain.to_string(),
            sequence,
            hash: *hash,
            mac: self
                .mac(chain, sequence, hash)
                .finalize()
                .into_bytes()
                .to_vec(),
        }
    }

    /// Whether `head` was signed by this key (constant time).
    pub fn verifies(&self, head: &SignedHead) -> bool {
        self.mac(&head.chain, head.sequence, &head.hash)
            .verify_slice(&head.mac)
            .is_ok()
    }
}

/// The first thing wrong with a chain; `sequence` names the record (or the signed head's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    /// A record's hash is not what its content and the previous hash give: it was edited, or a
    /// record before it was replaced.
    #[error(
        "record {sequence}: its hash does not match its content and the record before it (edited or replaced)"
    )]
    Edited {
        /// The record.
        sequence: u64,
    },
    /// The sequence jumps: records between were deleted.
    #[error("record {sequence}: expected sequence {expected}; records were deleted before it")]
    Gap {
        /// The record found.
        sequence: u64,
        /// The sequence that should have come.
        expected: u64,
    },
    /// The sequence repeats or goes back: a record was inserted or the order changed.
    #[error("record {sequence}: out of order after {previous} (inserted or reordered)")]
    OutOfOrder {
        /// The record found.
        sequence: u64,
        /// The one before it.
        previous: u64,
    },
    /// The signed head names a record the log no longer has, or one with another hash: the tail
    /// was cut or rewritten.
    #[error("record {sequence}: the signed head names it, but the log {problem}")]
    Truncated {
        /// The signed head's sequence.
        sequence: u64,
        /// What the log has instead.
        problem: &'static str,
    },
    /// The signed head's signature does not verify: it was forged or replaced.
    #[error("the signed head of chain {chain} does not verify under this root key")]
    ForgedHead {
        /// The chain.
        chain: String,
    },
}

/// Walks one chain in stored order from `anchor`: every record must follow the previous by
/// exactly one and carry the hash its content gives. With a signed `head`, the log must reach
/// at least that record, with that hash. Returns the last sequence and hash.
pub fn verify<'a>(
    anchor: Anchor,
    records: impl IntoIterator<Item = &'a Stored>,
    head: Option<(&HeadKey, &SignedHead)>,
) -> Result<Anchor, Broken> {
    let mut last = anchor;
    let mut signed_seen = false;
    for stored in records {
        let sequence = stored.record.sequence;
        if sequence <= last.sequence {
            return Err(Broken::OutOfOrder {
                sequence,
                previous: last.sequence,
            });
        }
        if sequence != last.sequence + 1 {
            return Err(Broken::Gap {
                sequence,
                expected: last.sequence + 1,
            });
        }
        if link(&last.hash, &stored.record) != stored.hash {
            return Err(Broken::Edited { sequence });
        }
        last = Anchor {
            sequence,
            hash: stored.hash,
        };
        if let Some((_, head)) = head
            && head.sequence == sequence
        {
            if head.hash != stored.hash {
                return Err(Broken::Truncated {
                    sequence,
                    problem: "has another record there",
                });
            }
            signed_seen = true;
        }
    }
    if let Some((key, head)) = head {
        if !key.verifies(head) {
            return Err(Broken::ForgedHead {
                chain: head.chain.clone(),
            });
        }
        // A head at or before the anchor was signed before retention deleted that prefix.
        if !signed_seen && head.sequence > anchor.sequence {
            return Err(Broken::Truncated {
                sequence: head.sequence,
                problem: "ends before it",
            });
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::Outcome;

    fn record(sequence: u64) -> AuditRecord {
        AuditRecord {
            sequence,
            at_ms: 1_700_000_000_000 + sequence as i64,
            action: "GetToken".into(),
            agent: Some("agent-a".into()),
            user: Some("alice".into()),
            tool: Some("jira".into()),
            outcome: Outcome::Ok,
            generation: Some(sequence),
            ..AuditRecord::default()
        }
    }

    fn chain(n: u64) -> Vec<Stored> {
        let mut previous = GENESIS;
        (1..=n)
            .map(|sequence| {
                let record = record(sequence);
                let hash = link(&previous, &record);
                previous = hash;
                Stored { record, hash }
            })
            .collect()
    }

    fn key() -> HeadKey {
        HeadKey::derive(&ControlKey::from_bytes([7; 32]))
    }

    #[test]
    fn an_untouched_chain_verifies_to_its_last_record() {
        let log = chain(5);
        let key = key();
        let head = key.sign("agent-a", 5, &log[4].hash);
        let end = verify(Anchor::START, &log, Some((&key, &head))).unwrap();
        assert_eq!(end.sequence, 5);
    }

    #[test]
    fn an_edit_names_the_record() {
        let mut log = chain(5);
        log[2].record.outcome = Outcome::Failed("PERMISSION_DENIED".into());
        assert_eq!(
            verify(Anchor::START, &log, None),
            Err(Broken::Edited { sequence: 3 })
        );
    }

    #[test]
    fn a_deletion_in_the_middle_names_the_record_after_it() {
        let mut log = chain(5);
        log.remove(2);
        assert_eq!(
            verify(Anchor::START, &log, None),
            Err(Broken::Gap {
                sequence: 4,
                expected: 3
            })
        );
    }

    #[test]
    fn a_reordering_and_an_insertion_are_named() {
        let mut reordered = chain(5);
        reordered.swap(1, 2);
        assert!(matches!(
            verify(Anchor::START, &reordered, None),
            Err(Broken::Gap { sequence: 3, .. })
        ));
        let mut inserted = chain(5);
        let forged = Stored {
            record: record(3),
            hash: [1; 32],
        };
        inserted.insert(3, forged);
        assert!(matches!(
            verify(Anchor::START, &inserted, None),
            Err(Broken::OutOfOrder { sequence: 3, .. })
        ));
        // An insertion renumbering everything after it breaks the hashes instead.
        let mut renumbered = chain(4);
        let mut extra = record(3);
        extra.action = "Revoke".into();
        let hash = link(&renumbered[1].hash, &extra);
        renumbered.insert(
            2,
            Stored {
                record: extra,
                hash,
            },
        );
        for (i, stored) in renumbered.iter_mut().enumerate().skip(3) {
            stored.record.sequence = i as u64 + 1;
        }
        assert_eq!(
            verify(Anchor::START, &renumbered, None),
            Err(Broken::Edited { sequence: 4 })
        );
    }

    #[test]
    fn a_cut_tail_is_caught_by_the_signed_head_and_a_forged_head_too() {
        let log = chain(5);
        let key = key();
        let head = key.sign("agent-a", 5, &log[4].hash);
        assert_eq!(
            verify(Anchor::START, &log[..3], Some((&key, &head))),
            Err(Broken::Truncated {
                sequence: 5,
                problem: "ends before it"
            })
        );
        let mut forged = head.clone();
        forged.sequence = 3;
        forged.hash = log[2].hash;
        assert!(matches!(
            verify(Anchor::START, &log[..3], Some((&key, &forged))),
            Err(Broken::ForgedHead { .. })
        ));
        let other_root = HeadKey::derive(&ControlKey::from_bytes([8; 32]));
        assert!(!other_root.verifies(&head));
    }

    #[test]
    fn a_chain_kept_from_an_anchor_verifies_after_retention() {
        let log = chain(6);
        let anchor = Anchor {
            sequence: 3,
            hash: log[2].hash,
        };
        let key = key();
        let old_head = key.sign("agent-a", 2, &log[1].hash);
        assert_eq!(
            verify(anchor, &log[3..], Some((&key, &old_head)))
                .unwrap()
                .sequence,
            6
        );
        assert!(verify(Anchor::START, &log[3..], None).is_err());
    }
}
