//! The state seal: what the audit says the safety state is, so that a change made behind the
//! coordinator's back (an `etcdctl put` or `del` on a freeze, mode, budget, approval or policy
//! key) is found when a replica loads the store instead of silently taking effect.
//!
//! Every transaction that writes a sealed key also rewrites one key, `<prefix>/seal`, holding
//! the SHA-256 of every sealed key's value and the sequence and hash of an audit record
//! written in the same transaction; that record's `seal` field is the digest of those entries.
//! So each sealed key is backed by the audit record of the transaction that last wrote it or
//! any sealed key. A loading replica checks the seal against its audit record and every sealed
//! key against the seal. A key whose value differs, a key the seal does not list and a key the
//! seal lists that is gone are *unbacked*: the view keeps the safer value in their place (a
//! freeze stays on, a mode means observe, a budget freezes its class, an approval is ignored)
//! and the replica audits and alerts naming each key. A seal that is missing or does not
//! match its audit record, on a store that has audit records, turns the kill switch on: it
//! cannot tell which stop was lifted.
//!
//! What it guards against is a write that bypasses the coordinator, not an adversary who also
//! forges audit records that chain correctly (there is no secret in the chain); etcd
//! authentication (`interlock etcd-bootstrap`) keeps such writers out.
//!
//! Pure: no store, clock or file. Approval keys expire with their store lease, so an approval
//! the seal lists but the store lacks is simply gone (absent is the safe value), not unbacked.
//! Host and slot keys are not sealed: hosts come and go with their own leases, and a slot
//! that should not be there only makes a cap deny more.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    audit::AuditRecord,
    store::{Kv, Op},
    view::Keys,
};

/// Whether a key (relative to the prefix) is part of the sealed safety state.
pub fn is_sealed(rel: &str) -> bool {
    rel == "policy"
        || ["freeze/", "mode/", "budget/", "approvals/"]
            .iter()
            .any(|p| rel.starts_with(p))
}

fn hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The sealed keys (relative to the prefix) and the hash of each one's value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    pub entries: BTreeMap<String, String>,
}

/// The stored form of the seal key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealValue {
    pub audit_seq: u64,
    pub audit_hash: String,
    pub entries: BTreeMap<String, String>,
}

impl Seal {
    /// The digest an audit record carries: over every `key NUL hash` line, in key order.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for (key, value_hash) in &self.entries {
            h.update(key.as_bytes());
            h.update([0]);
            h.update(value_hash.as_bytes());
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }

    /// Applies a transaction's writes; returns whether any sealed key changed.
    pub fn apply(&mut self, keys: &Keys, ops: &[Op]) -> bool {
        let root = keys.root();
        let mut changed = false;
        for op in ops {
            match op {
                Op::Put { key, value, .. } => {
                    if let Some(rel) = key.strip_prefix(&root)
                        && is_sealed(rel)
                    {
                        let h = hash(value);
                        changed |= self.entries.insert(rel.to_owned(), h.clone()) != Some(h);
                    }
                }
                Op::Delete { key } => {
                    if let Some(rel) = key.strip_prefix(&root) {
                        changed |= self.entries.remove(rel).is_some();
                    }
                }
                Op::DeletePrefix { prefix } => {
                    if let Some(rel) = prefix.strip_prefix(&root) {
                        let before = self.entries.len();
                        self.entries.retain(|k, _| !k.starts_with(rel));
                        changed |= self.entries.len() != before;
                    }
                }
            }
        }
        changed
    }

    /// Forgets a key that left the store on its own (an approval whose lease ended).
    pub fn forget(&mut self, keys: &Keys, key: &str) {
        if let Some(rel) = key.strip_prefix(&keys.root()) {
            self.entries.remove(rel);
        }
    }

    /// The stored value, backed by audit record `record`.
    pub fn value(&self, record: &AuditRecord) -> Vec<u8> {
        serde_json::to_vec(&SealValue {
            audit_seq: record.seq,
            audit_hash: record.hash.clone(),
            entries: self.entries.clone(),
        })
        .expect("seals serialise")
    }
}

/// Why a key is unbacked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// Its value is not the one the audit sealed.
    Changed,
    /// The seal does not list it: written outside the coordinator.
    Unlisted,
    /// The seal lists it but it is gone.
    Deleted,
    /// The seal itself cannot be trusted (missing, unreadable, or not matching its audit
    /// record); carried by the kill switch key, which is turned on.
    Seal(String),
}

impl Problem {
    pub fn describe(&self) -> String {
        match self {
            Problem::Changed => "changed behind the coordinator's back (its value is not the one \
                                 the audit sealed)"
                .into(),
            Problem::Unlisted => "written behind the coordinator's back (the audit's seal does \
                                  not list it)"
                .into(),
            Problem::Deleted => {
                "deleted behind the coordinator's back (the audit's seal lists it)".into()
            }
            Problem::Seal(why) => format!("cannot be trusted: {why}"),
        }
    }
}

/// One key that the audit does not back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unbacked {
    /// The full key.
    pub key: String,
    pub problem: Problem,
}

/// What a load found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// The state the audit backs, which the replica goes on sealing from: an unbacked key
    /// stays unbacked at the next load until the coordinator writes it again.
    pub attested: Seal,
    pub unbacked: Vec<Unbacked>,
}

/// The seal as read: the stored value, and the audit record it names (if it exists).
#[derive(Debug)]
pub struct Stored<'a> {
    pub value: Option<&'a [u8]>,
    pub record: Option<&'a AuditRecord>,
    /// Whether the store holds any audit record at all (a fresh store has none, and no seal).
    pub audit_empty: bool,
}

/// Parses the seal key's value.
pub fn parse(value: &[u8]) -> Result<SealValue, String> {
    serde_json::from_slice(value).map_err(|e| format!("the seal key does not decode: {e}"))
}

/// Checks every sealed key in `kvs` (a load of the state prefixes) against the stored seal.
pub fn check(keys: &Keys, stored: &Stored<'_>, kvs: &[Kv]) -> Checked {
    let root = keys.root();
    let mut unbacked = Vec::new();
    let present: BTreeMap<&str, &Kv> = kvs
        .iter()
        .filter_map(|kv| {
            let rel = kv.key.strip_prefix(&root)?;
            is_sealed(rel).then_some((rel, kv))
        })
        .collect();
    let attested = match trusted_seal(stored) {
        Ok(seal) => seal,
        Err(why) => {
            // A fresh store has neither audit nor seal; anything sealed it holds is still
            // unlisted below. A store with audit records always has a seal.
            if !stored.audit_empty {
                unbacked.push(Unbacked {
                    key: keys.kill_switch(),
                    problem: Problem::Seal(why),
                });
            }
            Seal::default()
        }
    };
    for (rel, kv) in &present {
        match attested.entries.get(*rel) {
            Some(h) if *h == hash(&kv.value) => {}
            Some(_) => unbacked.push(Unbacked {
                key: kv.key.clone(),
                problem: Problem::Changed,
            }),
            None => unbacked.push(Unbacked {
                key: kv.key.clone(),
                problem: Problem::Unlisted,
            }),
        }
    }
    for rel in attested.entries.keys() {
        if !present.contains_key(rel.as_str()) && !rel.starts_with("approvals/") {
            unbacked.push(Unbacked {
                key: format!("{root}{rel}"),
                problem: Problem::Deleted,
            });
        }
    }
    // Approvals that expired are gone for good: stop sealing them.
    let mut attested = attested;
    attested
        .entries
        .retain(|rel, _| !rel.starts_with("approvals/") || present.contains_key(rel.as_str()));
    Checked { attested, unbacked }
}

fn trusted_seal(stored: &Stored<'_>) -> Result<Seal, String> {
    let Some(value) = stored.value else {
        return Err(if stored.audit_empty {
            "no seal on a fresh store".into()
        } else {
            "the seal key is missing".into()
        });
    };
    let value = parse(value)?;
    let seal = Seal {
        entries: value.entries,
    };
    let Some(record) = stored.record else {
        return Err(format!(
            "the seal names audit record {}, which is not in the store",
            value.audit_seq
        ));
    };
    if record.seq != value.audit_seq
        || record.hash != value.audit_hash
        || record.computed_hash() != record.hash
    {
        return Err(format!(
            "audit record {} is not the one the seal names, or was edited",
            value.audit_seq
        ));
    }
    if record.seal.as_deref() != Some(seal.digest().as_str()) {
        return Err(format!(
            "audit record {} does not carry this seal's digest",
            value.audit_seq
        ));
    }
    Ok(seal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        admission::UnixMillis,
        audit::{AuditChain, AuditDraft, AuditKind},
    };

    fn put(key: String, value: &str) -> Op {
        Op::Put {
            key,
            value: value.as_bytes().to_vec(),
            lease: 0,
        }
    }

    fn kv(key: String, value: &str) -> Kv {
        Kv {
            key,
            value: value.as_bytes().to_vec(),
            create_revision: 1,
            mod_revision: 1,
            lease: 0,
        }
    }

    /// Seals `ops` the way a commit does; returns the seal's stored value and its record.
    fn commit(keys: &Keys, seal: &mut Seal, ops: &[Op]) -> (Vec<u8>, AuditRecord) {
        seal.apply(keys, ops);
        let mut draft = AuditDraft::new(AuditKind::Freeze, "operator:carol");
        draft.seal = Some(seal.digest());
        let record = AuditChain::genesis().append(draft, UnixMillis(5));
        (seal.value(&record), record)
    }

    fn sealed_store(keys: &Keys) -> (Vec<u8>, AuditRecord, Vec<Kv>) {
        let ops = vec![
            put(keys.kill_switch(), r#"{"on":1}"#),
            put(keys.mode("process_restart"), "assist"),
            put(keys.budget("disk_cleanup"), "{}"),
            put(keys.approval("a1"), "{}"),
            put(keys.host("web-1"), "{}"),
        ];
        let mut seal = Seal::default();
        let (value, record) = commit(keys, &mut seal, &ops);
        let kvs = ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value, .. } => kv(key.clone(), std::str::from_utf8(value).unwrap()),
                _ => unreachable!(),
            })
            .collect();
        (value, record, kvs)
    }

    fn problems(c: &Checked) -> Vec<(String, Problem)> {
        c.unbacked
            .iter()
            .map(|u| (u.key.clone(), u.problem.clone()))
            .collect()
    }

    #[test]
    fn only_safety_keys_are_sealed() {
        for rel in [
            "policy",
            "freeze/all",
            "freeze/class/x",
            "freeze/host/x/h",
            "mode/x",
            "budget/x",
            "approvals/a",
        ] {
            assert!(is_sealed(rel), "{rel}");
        }
        for rel in ["hosts/h", "slots/x/web/0000", "audit/1", "leader/1", "seal"] {
            assert!(!is_sealed(rel), "{rel}");
        }
    }

    #[test]
    fn a_store_written_only_by_the_coordinator_checks_clean() {
        let keys = Keys::new("/p");
        let (value, record, kvs) = sealed_store(&keys);
        let stored = Stored {
            value: Some(&value),
            record: Some(&record),
            audit_empty: false,
        };
        let c = check(&keys, &stored, &kvs);
        assert!(c.unbacked.is_empty(), "{:?}", c.unbacked);
        assert_eq!(c.attested.entries.len(), 4, "hosts are not sealed");
    }

    #[test]
    fn keys_changed_added_or_deleted_behind_its_back_are_named() {
        let keys = Keys::new("/p");
        let (value, record, mut kvs) = sealed_store(&keys);
        let stored = Stored {
            value: Some(&value),
            record: Some(&record),
            audit_empty: false,
        };
        // `etcdctl del /p/freeze/all`, `put /p/mode/process_restart autonomous`, a new freeze
        // lifted elsewhere is not at issue; a class freeze put by hand; an approval expired.
        kvs.retain(|kv| kv.key != keys.kill_switch() && kv.key != keys.approval("a1"));
        for kv in &mut kvs {
            if kv.key == keys.mode("process_restart") {
                kv.value = b"autonomous".to_vec();
            }
        }
        kvs.push(kv(keys.class_freeze("x"), "{}"));
        let c = check(&keys, &stored, &kvs);
        let got = problems(&c);
        assert_eq!(
            got,
            vec![
                (keys.class_freeze("x"), Problem::Unlisted),
                (keys.mode("process_restart"), Problem::Changed),
                (keys.kill_switch(), Problem::Deleted),
            ],
            "an expired approval is not a problem"
        );
        assert!(
            !c.attested.entries.contains_key("approvals/a1"),
            "the expired approval is no longer sealed"
        );
        assert!(
            c.attested.entries.contains_key("freeze/all"),
            "the deleted kill switch stays sealed, so the next load finds it again"
        );
    }

    #[test]
    fn a_seal_that_is_missing_or_does_not_match_its_record_turns_the_kill_switch_on() {
        let keys = Keys::new("/p");
        let (value, record, kvs) = sealed_store(&keys);
        let mut edited = record.clone();
        edited.seal = Some("0".repeat(64));
        edited.hash = edited.computed_hash();
        let mut other = value.clone();
        other.extend_from_slice(b"x");
        let cases: Vec<(Stored<'_>, &str)> = vec![
            (
                Stored {
                    value: None,
                    record: None,
                    audit_empty: false,
                },
                "missing",
            ),
            (
                Stored {
                    value: Some(&value),
                    record: None,
                    audit_empty: false,
                },
                "not in the store",
            ),
            (
                Stored {
                    value: Some(&value),
                    record: Some(&edited),
                    audit_empty: false,
                },
                "is not the one",
            ),
            (
                Stored {
                    value: Some(&other),
                    record: Some(&record),
                    audit_empty: false,
                },
                "does not decode",
            ),
        ];
        for (stored, why) in cases {
            let c = check(&keys, &stored, &kvs);
            let first = &c.unbacked[0];
            assert_eq!(first.key, keys.kill_switch(), "{why}");
            assert!(
                matches!(&first.problem, Problem::Seal(w) if w.contains(why)),
                "{why}: {:?}",
                first.problem
            );
            assert!(
                c.unbacked[1..]
                    .iter()
                    .all(|u| u.problem == Problem::Unlisted),
                "with no trusted seal every sealed key is unlisted"
            );
            assert_eq!(c.unbacked.len(), 1 + 4, "{why}");
        }
        // A record whose digest is not this seal's (hash recomputed, so only the digest differs).
        let mut wrong_digest = record.clone();
        wrong_digest.seal = Some("1".repeat(64));
        wrong_digest.hash = wrong_digest.computed_hash();
        let forged = Seal {
            entries: BTreeMap::new(),
        }
        .value(&wrong_digest);
        let stored = Stored {
            value: Some(&forged),
            record: Some(&wrong_digest),
            audit_empty: false,
        };
        let c = check(&keys, &stored, &kvs);
        assert!(
            matches!(&c.unbacked[0].problem, Problem::Seal(w) if w.contains("digest")),
            "{:?}",
            c.unbacked
        );
    }

    #[test]
    fn a_fresh_store_needs_no_seal_but_its_sealed_keys_are_unlisted() {
        let keys = Keys::new("/p");
        let fresh = Stored {
            value: None,
            record: None,
            audit_empty: true,
        };
        assert!(check(&keys, &fresh, &[]).unbacked.is_empty());
        let c = check(&keys, &fresh, &[kv(keys.mode("x"), "autonomous")]);
        assert_eq!(problems(&c), vec![(keys.mode("x"), Problem::Unlisted)]);
    }

    #[test]
    fn apply_tracks_puts_and_deletes_of_sealed_keys_only() {
        let keys = Keys::new("/p");
        let mut seal = Seal::default();
        assert!(!seal.apply(&keys, &[put(keys.host("h"), "{}")]));
        assert!(seal.apply(&keys, &[put(keys.mode("x"), "assist")]));
        assert!(
            !seal.apply(&keys, &[put(keys.mode("x"), "assist")]),
            "same value"
        );
        let before = seal.digest();
        assert!(seal.apply(&keys, &[put(keys.mode("x"), "observe")]));
        assert_ne!(seal.digest(), before);
        assert!(seal.apply(
            &keys,
            &[Op::Delete {
                key: keys.mode("x")
            }]
        ));
        assert!(seal.entries.is_empty());
        seal.apply(&keys, &[put(keys.approval("a"), "{}")]);
        seal.forget(&keys, &keys.approval("a"));
        assert!(seal.entries.is_empty());
    }
}
