//! Hash-chained audit records (invariant I8): who decided what, when, under which token.
//!
//! This module owns the record shape, the chain head ([`AuditChain`]) that numbers and links
//! new records, and [`verify_chain`], which finds a gap, an edit, a reordering or a broken
//! link in stored records. Each record's hash is
//! `hex(sha256(prev_hash || canonical JSON of the record with an empty hash field))`, where
//! canonical JSON sorts object keys at every level, so the hash does not depend on
//! serde_json's map ordering feature.
//!
//! It is pure: the caller supplies `at` and persists records. It must not import tokio, etcd,
//! gRPC, the filesystem, or `policy`/`admission` decision logic; it uses only
//! `crate::admission::UnixMillis`.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::admission::UnixMillis;

/// `prev_hash` of the first record ever written.
pub const GENESIS_PREV_HASH: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";

/// What an audit record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    Grant,
    Deny,
    WouldGrant,
    WouldDeny,
    Pending,
    Approve,
    /// An operator turned down a pending approval.
    Reject,
    ApprovalExpired,
    Freeze,
    Unfreeze,
    ModeChange,
    Revoke,
    Release,
    Outcome,
    /// A lease ran out without being released.
    Expired,
    PolicyLoad,
    Alert,
    /// A call refused because of who made it (I9); the owner is the presented identity.
    Refused,
    /// A loading replica found keys it would not trust (undecodable, or not backed by the
    /// audit's seal) and kept the safer value in their place; the detail names each key.
    Quarantine,
    /// The seal was written again because the audit record it named was about to be trimmed.
    Reseal,
    /// The break-glass credential was used; the record precedes the action it allowed.
    BreakGlass,
    /// An operator made a join token for a host (its hash is in the detail).
    JoinToken,
    /// A host enrolled with a join token (the token is used up in the same transaction).
    Enrol,
    /// A host renewed its certificate over mutual TLS.
    CertRenewed,
}

impl AuditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::Grant => "grant",
            AuditKind::Deny => "deny",
            AuditKind::WouldGrant => "would_grant",
            AuditKind::WouldDeny => "would_deny",
            AuditKind::Pending => "pending",
            AuditKind::Approve => "approve",
            AuditKind::Reject => "reject",
            AuditKind::ApprovalExpired => "approval_expired",
            AuditKind::Freeze => "freeze",
            AuditKind::Unfreeze => "unfreeze",
            AuditKind::ModeChange => "mode_change",
            AuditKind::Revoke => "revoke",
            AuditKind::Release => "release",
            AuditKind::Outcome => "outcome",
            AuditKind::Expired => "expired",
            AuditKind::PolicyLoad => "policy_load",
            AuditKind::Alert => "alert",
            AuditKind::Refused => "refused",
            AuditKind::Quarantine => "quarantine",
            AuditKind::Reseal => "reseal",
            AuditKind::BreakGlass => "break_glass",
            AuditKind::JoinToken => "join_token",
            AuditKind::Enrol => "enrol",
            AuditKind::CertRenewed => "cert_renewed",
        }
    }
}

impl fmt::Display for AuditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One stored audit record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub at: UnixMillis,
    pub kind: AuditKind,
    /// `policy:NAME@VERSION` for automated decisions, otherwise the operator's identity.
    pub owner: String,
    pub class: Option<String>,
    pub host: Option<String>,
    pub target: Option<String>,
    pub lease_id: Option<String>,
    pub token: Option<u64>,
    pub reason: Option<String>,
    pub detail: Value,
    /// The digest of the state seal written in the same transaction (see `seal`); absent on
    /// records whose transaction changed no sealed key, so older records hash as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<String>,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditRecord {
    /// The hash this record should carry, given its contents and `prev_hash`.
    pub fn computed_hash(&self) -> String {
        let mut unsealed = self.clone();
        unsealed.hash = String::new();
        // Serialising a struct of strings, integers and a `Value` cannot fail.
        let value = serde_json::to_value(&unsealed).unwrap_or(Value::Null);
        let mut canonical = String::new();
        write_canonical(&value, &mut canonical);
        let mut hasher = Sha256::new();
        hasher.update(self.prev_hash.as_bytes());
        hasher.update(canonical.as_bytes());
        hex::encode(hasher.finalize())
    }
}

/// JSON with object keys sorted at every level and no whitespace.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        leaf => out.push_str(&leaf.to_string()),
    }
}

/// A record's contents before the chain numbers, stamps and links it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditDraft {
    pub kind: AuditKind,
    pub owner: String,
    pub class: Option<String>,
    pub host: Option<String>,
    pub target: Option<String>,
    pub lease_id: Option<String>,
    pub token: Option<u64>,
    pub reason: Option<String>,
    pub detail: Value,
    /// Set by the commit that also writes the state seal.
    pub seal: Option<String>,
}

impl AuditDraft {
    /// A draft with only a kind and an owner; set other fields with struct update syntax.
    pub fn new(kind: AuditKind, owner: impl Into<String>) -> AuditDraft {
        AuditDraft {
            kind,
            owner: owner.into(),
            class: None,
            host: None,
            target: None,
            lease_id: None,
            token: None,
            reason: None,
            detail: Value::Null,
            seal: None,
        }
    }
}

/// The head of the chain: the next sequence number and the hash new records link to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditChain {
    next_seq: u64,
    last_hash: String,
}

impl Default for AuditChain {
    fn default() -> Self {
        AuditChain::genesis()
    }
}

impl AuditChain {
    /// An empty chain; its first record gets seq 1 and `prev_hash` [`GENESIS_PREV_HASH`].
    pub fn genesis() -> AuditChain {
        AuditChain {
            next_seq: 1,
            last_hash: GENESIS_PREV_HASH.to_owned(),
        }
    }

    /// Continues after the last stored record, refusing one whose hash does not match its
    /// contents (building on an edited record would make the edit look legitimate).
    pub fn resume(last: &AuditRecord) -> Result<AuditChain, ChainError> {
        if last.computed_hash() != last.hash {
            return Err(ChainError::Altered { seq: last.seq });
        }
        Ok(AuditChain {
            next_seq: last.seq.saturating_add(1),
            last_hash: last.hash.clone(),
        })
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn last_hash(&self) -> &str {
        &self.last_hash
    }

    /// The record `append` would produce, without moving the head. Useful when the write may
    /// fail: persist it, then `append` the same draft or `resume` from what was stored.
    pub fn prepare(&self, draft: AuditDraft, at: UnixMillis) -> AuditRecord {
        let AuditDraft {
            kind,
            owner,
            class,
            host,
            target,
            lease_id,
            token,
            reason,
            detail,
            seal,
        } = draft;
        let mut record = AuditRecord {
            seq: self.next_seq,
            at,
            kind,
            owner,
            class,
            host,
            target,
            lease_id,
            token,
            reason,
            detail,
            seal,
            prev_hash: self.last_hash.clone(),
            hash: String::new(),
        };
        record.hash = record.computed_hash();
        record
    }

    /// Numbers, links and hashes a new record and moves the head past it. The caller must
    /// persist the record before the decision it describes takes effect.
    pub fn append(&mut self, draft: AuditDraft, at: UnixMillis) -> AuditRecord {
        let record = self.prepare(draft, at);
        self.next_seq = record.seq.saturating_add(1);
        self.last_hash.clone_from(&record.hash);
        record
    }
}

/// What [`verify_chain`] found wrong, naming the record.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChainError {
    #[error("audit record {seq} was altered: its hash does not match its contents")]
    Altered { seq: u64 },
    #[error("audit records are missing: expected seq {expected} after {after}, found {found}")]
    Gap {
        after: u64,
        expected: u64,
        found: u64,
    },
    #[error("audit records are out of order: seq {found} follows seq {after}")]
    OutOfOrder { after: u64, found: u64 },
    #[error(
        "audit record {seq} does not link to record {after}: its prev_hash is not that record's hash"
    )]
    BrokenLink { after: u64, seq: u64 },
}

/// Checks stored records in order. The first record may have any `prev_hash` (retention
/// drops old records); after it, seqs must be contiguous and each record must link to the
/// one before it.
pub fn verify_chain(records: &[AuditRecord]) -> Result<(), ChainError> {
    let mut previous: Option<&AuditRecord> = None;
    for (i, record) in records.iter().enumerate() {
        if record.computed_hash() != record.hash {
            return Err(ChainError::Altered { seq: record.seq });
        }
        if let Some(prev) = previous {
            let expected = prev.seq.saturating_add(1);
            if record.seq != expected {
                // If the expected record turns up later, records were reordered, not lost.
                let reordered =
                    record.seq <= prev.seq || records[i + 1..].iter().any(|r| r.seq == expected);
                return Err(if reordered {
                    ChainError::OutOfOrder {
                        after: prev.seq,
                        found: record.seq,
                    }
                } else {
                    ChainError::Gap {
                        after: prev.seq,
                        expected,
                        found: record.seq,
                    }
                });
            }
            if record.prev_hash != prev.hash {
                return Err(ChainError::BrokenLink {
                    after: prev.seq,
                    seq: record.seq,
                });
            }
        }
        previous = Some(record);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn three() -> Vec<AuditRecord> {
        let mut chain = AuditChain::genesis();
        let grant = AuditDraft {
            class: Some("disk_cleanup".into()),
            host: Some("h1".into()),
            target: Some("/var/log".into()),
            lease_id: Some("L1".into()),
            token: Some(41),
            detail: json!({"cap": 2, "holders_after": 1}),
            ..AuditDraft::new(AuditKind::Grant, "policy:prod@3")
        };
        let deny = AuditDraft {
            class: Some("disk_cleanup".into()),
            host: Some("h2".into()),
            reason: Some("cap".into()),
            ..AuditDraft::new(AuditKind::Deny, "policy:prod@3")
        };
        let freeze = AuditDraft {
            reason: Some("incident 42".into()),
            ..AuditDraft::new(AuditKind::Freeze, "alice")
        };
        vec![
            chain.append(grant, UnixMillis(1_000)),
            chain.append(deny, UnixMillis(2_000)),
            chain.append(freeze, UnixMillis(3_000)),
        ]
    }

    #[test]
    fn append_numbers_links_and_verifies() {
        let records = three();
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(records[0].prev_hash, GENESIS_PREV_HASH);
        assert_eq!(records[1].prev_hash, records[0].hash);
        assert_eq!(records[2].prev_hash, records[1].hash);
        assert_eq!(records[0].hash.len(), 64);
        assert_eq!(verify_chain(&records), Ok(()));
        assert_eq!(verify_chain(&[]), Ok(()));
    }

    #[test]
    fn tampering_is_detected_naming_the_record() {
        // (case, how the stored records are tampered with, expected error)
        type Tamper = fn(&mut Vec<AuditRecord>);
        let cases: [(&str, Tamper, ChainError); 6] = [
            (
                "edited field",
                |r| r[1].host = Some("h9".into()),
                ChainError::Altered { seq: 2 },
            ),
            (
                "edited detail",
                |r| r[0].detail = json!({"cap": 3, "holders_after": 1}),
                ChainError::Altered { seq: 1 },
            ),
            (
                "edited and re-hashed breaks the next link",
                |r| {
                    r[1].reason = Some("budget".into());
                    r[1].hash = r[1].computed_hash();
                },
                ChainError::BrokenLink { after: 2, seq: 3 },
            ),
            (
                "middle record deleted",
                |r| {
                    r.remove(1);
                },
                ChainError::Gap {
                    after: 1,
                    expected: 2,
                    found: 3,
                },
            ),
            (
                "records reordered",
                |r| r.swap(1, 2),
                ChainError::OutOfOrder { after: 1, found: 3 },
            ),
            (
                "record replayed",
                |r| {
                    let again = r[1].clone();
                    r.insert(2, again);
                },
                ChainError::OutOfOrder { after: 2, found: 2 },
            ),
        ];
        for (case, tamper, expected) in cases {
            let mut records = three();
            tamper(&mut records);
            assert_eq!(verify_chain(&records), Err(expected), "{case}");
        }
    }

    #[test]
    fn retention_may_drop_a_prefix() {
        let records = three();
        assert_eq!(verify_chain(&records[1..]), Ok(()));
    }

    #[test]
    fn resume_continues_the_chain_and_refuses_an_altered_head() {
        let records = three();
        let mut chain = AuditChain::resume(&records[2]).expect("intact head");
        assert_eq!(chain.next_seq(), 4);
        let fourth = chain.append(
            AuditDraft::new(AuditKind::Unfreeze, "alice"),
            UnixMillis(4_000),
        );
        let mut all = records.clone();
        all.push(fourth);
        assert_eq!(verify_chain(&all), Ok(()));

        let mut edited = records[2].clone();
        edited.owner = "mallory".into();
        assert_eq!(
            AuditChain::resume(&edited),
            Err(ChainError::Altered { seq: 3 })
        );
    }

    #[test]
    fn prepare_does_not_move_the_head() {
        let mut chain = AuditChain::genesis();
        let draft = AuditDraft::new(AuditKind::PolicyLoad, "policy:prod@3");
        let prepared = chain.prepare(draft.clone(), UnixMillis(5));
        assert_eq!(chain.next_seq(), 1);
        assert_eq!(chain.append(draft, UnixMillis(5)), prepared);
        assert_eq!(chain.next_seq(), 2);
        assert_eq!(chain.last_hash(), prepared.hash);
    }

    #[test]
    fn records_round_trip_through_json_with_snake_case_kinds() {
        let records = three();
        let json = serde_json::to_string(&records[0]).expect("serialises");
        assert!(json.contains(r#""kind":"grant""#), "{json}");
        let back: AuditRecord = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, records[0]);
        assert_eq!(verify_chain(&[back]), Ok(()));
        for (kind, name) in [
            (AuditKind::WouldDeny, "would_deny"),
            (AuditKind::ApprovalExpired, "approval_expired"),
            (AuditKind::PolicyLoad, "policy_load"),
        ] {
            assert_eq!(serde_json::to_value(kind).expect("serialises"), json!(name));
            assert_eq!(kind.to_string(), name);
        }
    }

    #[test]
    fn hash_ignores_detail_key_order() {
        let mut a = three().remove(0);
        a.detail = serde_json::from_str(r#"{"b":1,"a":{"y":2,"x":3}}"#).expect("json");
        let mut b = a.clone();
        b.detail = serde_json::from_str(r#"{"a":{"x":3,"y":2},"b":1}"#).expect("json");
        assert_eq!(a.computed_hash(), b.computed_hash());
    }
}
