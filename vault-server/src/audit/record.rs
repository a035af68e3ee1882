//! One audit record and its canonical encoding, the bytes its chain hash covers. The record has
//! no field that could hold a token, code, verifier, secret or JWT: the caller is its issuer,
//! its `jti` and a digest of its token.

use sha2::{Digest, Sha256};

/// How a call or event ended: OK, or the ErrorInfo reason it failed with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded.
    #[default]
    Ok,
    /// It failed with this reason (`PERMISSION_DENIED`, `REAUTH_REQUIRED`, …).
    Failed(String),
}

impl Outcome {
    /// `OK` or the reason, as stored and exported.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Ok => "OK",
            Self::Failed(reason) => reason,
        }
    }
}

/// One audit record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditRecord {
    /// Its place in its chain, from 1.
    pub sequence: u64,
    /// When, in Unix milliseconds.
    pub at_ms: i64,
    /// The RPC (`GetToken`) or background event (`refresh`, `sweep`, `flow.callback`, …).
    pub action: String,
    /// The agent acted for or on.
    pub agent: Option<String>,
    /// The user.
    pub user: Option<String>,
    /// The tool.
    pub tool: Option<String>,
    /// OK or the failure's reason.
    pub outcome: Outcome,
    /// The credential generation read or written.
    pub generation: Option<u64>,
    /// The caller token's `iss`.
    pub caller_iss: Option<String>,
    /// The caller token's `jti`, when it has one.
    pub caller_jti: Option<String>,
    /// [`token_digest`] of the caller's token; never the token.
    pub caller_digest: Option<[u8; 32]>,
    /// Whether the caller's identity was verified (false for an authentication failure
    /// recorded under the identity it claimed).
    pub verified: bool,
    /// The peer address.
    pub peer: Option<String>,
    /// The trace id, when the call was traced.
    pub trace_id: Option<String>,
    /// For admin calls, the agent and user acted on.
    pub target: Option<String>,
}

/// The digest of a caller token recorded in its place: SHA-256 under a domain label, so the
/// holder of a token can find the calls made with it, and nobody can recover the token.
pub fn token_digest(token: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"vault.v1/audit-caller-token\0");
    hasher.update(token.as_bytes());
    hasher.finalize().into()
}

impl AuditRecord {
    /// The canonical encoding: a version label, then every field in a fixed order, each
    /// length-prefixed and optional ones marked present or absent, so no two records encode
    /// alike and no field can shift into another.
    pub fn canonical(&self) -> Vec<u8> {
        let (mut out, after) = self.canonical_around_generation();
        field(
            &mut out,
            self.generation
                .map(u64::to_be_bytes)
                .as_ref()
                .map(|b| &b[..]),
        );
        out.extend_from_slice(&after);
        out
    }

    /// The canonical encoding without its `generation` field: the bytes before it and the
    /// bytes after it. A writer that learns the generation only in the database (a release
    /// audited in the statement that reads the credential) finishes the encoding there, with
    /// [`GENERATION_FIELD`] and the generation's 8 big-endian bytes between the two.
    pub fn canonical_around_generation(&self) -> (Vec<u8>, Vec<u8>) {
        let mut before = Vec::with_capacity(160);
        before.extend_from_slice(b"vault.v1/audit-record");
        field(&mut before, Some(&self.sequence.to_be_bytes()));
        field(&mut before, Some(&self.at_ms.to_be_bytes()));
        field(&mut before, Some(self.action.as_bytes()));
        field(&mut before, self.agent.as_deref().map(str::as_bytes));
        field(&mut before, self.user.as_deref().map(str::as_bytes));
        field(&mut before, self.tool.as_deref().map(str::as_bytes));
        field(&mut before, Some(self.outcome.as_str().as_bytes()));
        let mut after = Vec::with_capacity(160);
        field(&mut after, self.caller_iss.as_deref().map(str::as_bytes));
        field(&mut after, self.caller_jti.as_deref().map(str::as_bytes));
        field(&mut after, self.caller_digest.as_ref().map(|d| &d[..]));
        field(&mut after, Some(&[u8::from(self.verified)]));
        field(&mut after, self.peer.as_deref().map(str::as_bytes));
        field(&mut after, self.trace_id.as_deref().map(str::as_bytes));
        field(&mut after, self.target.as_deref().map(str::as_bytes));
        (before, after)
    }
}

/// How a present generation field starts in the canonical encoding: present (1), then its
/// length (8) as 4 big-endian bytes.
pub const GENERATION_FIELD: [u8; 5] = [1, 0, 0, 0, 8];

/// One field of the canonical encoding: absent (0), or present (1) with its length as 4
/// big-endian bytes, then its bytes.
fn field(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        None => out.push(0),
        Some(bytes) => {
            out.push(1);
            out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            out.extend_from_slice(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoding_around_the_generation_finishes_to_the_whole_encoding() {
        let record = AuditRecord {
            sequence: 7,
            at_ms: 1_700_000_000_123,
            action: "GetToken".into(),
            agent: Some("agent".into()),
            user: Some("user".into()),
            tool: Some("jira".into()),
            generation: Some(0x0102_0304_0506_0708),
            caller_iss: Some("https://issuer".into()),
            caller_digest: Some([9; 32]),
            verified: true,
            peer: Some("127.0.0.1:1".into()),
            ..AuditRecord::default()
        };
        let (before, after) = record.canonical_around_generation();
        let mut finished = before;
        finished.extend_from_slice(&GENERATION_FIELD);
        finished.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        finished.extend_from_slice(&after);
        assert_eq!(finished, record.canonical());
    }

    #[test]
    fn every_field_changes_the_encoding_and_none_can_shift_into_another() {
        let base = AuditRecord {
            sequence: 1,
            action: "StoreToken".into(),
            agent: Some("ab".into()),
            user: Some("c".into()),
            ..AuditRecord::default()
        };
        // The same bytes split differently between two fields encode differently.
        let shifted = AuditRecord {
            agent: Some("a".into()),
            user: Some("bc".into()),
            ..base.clone()
        };
        assert_ne!(base.canonical(), shifted.canonical());
        // Absent and empty differ.
        let empty_tool = AuditRecord {
            tool: Some(String::new()),
            ..base.clone()
        };
        assert_ne!(base.canonical(), empty_tool.canonical());
        let variants = [
            AuditRecord {
                sequence: 2,
                ..base.clone()
            },
            AuditRecord {
                at_ms: 1,
                ..base.clone()
            },
            AuditRecord {
                outcome: Outcome::Failed("PERMISSION_DENIED".into()),
                ..base.clone()
            },
            AuditRecord {
                generation: Some(0),
                ..base.clone()
            },
            AuditRecord {
                verified: true,
                ..base.clone()
            },
            AuditRecord {
                caller_digest: Some(token_digest("x")),
                ..base.clone()
            },
            AuditRecord {
                target: Some("agent-b/bob".into()),
                ..base.clone()
            },
        ];
        for variant in variants {
            assert_ne!(base.canonical(), variant.canonical(), "{variant:?}");
        }
    }

    #[test]
    fn a_token_digest_is_not_the_token_in_any_form() {
        let token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln";
        let digest = token_digest(token);
        assert_eq!(digest, token_digest(token));
        assert_ne!(digest, token_digest("another"));
        let plain: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        assert_ne!(digest, plain, "domain-separated from a bare SHA-256");
    }
}
