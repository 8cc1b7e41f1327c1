//! The leader's in-memory picture of the store: hosts, live leases by scope, budgets, freezes,
//! mode overrides and approvals, plus the key layout under the configured prefix.
//!
//! Pure: it decodes key/value data handed to it and answers questions about it; it never
//! reads the store, a clock or a file. The engine keeps it current by applying what it
//! commits and what the store's watch reports (expiries). Because only the leader writes and
//! expiries only remove entries, the view can hold *more* than the store (until the watch
//! catches up) but never less: admission on it errs towards denying.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{
    admission::{BudgetState, FreezeRecord, HostId, UnixMillis},
    policy::Mode,
    store::Kv,
};

/// Where everything lives under the prefix. All keys are built here and nowhere else.
#[derive(Clone, Debug)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// `prefix` such as `/interlock` or `/tenant-a/interlock`; a trailing `/` is ignored.
    pub fn new(prefix: &str) -> Self {
        Self {
            root: prefix.trim_end_matches('/').to_owned(),
        }
    }

    pub fn root(&self) -> String {
        format!("{}/", self.root)
    }
    /// Every prefix the view is built from (everything but the audit log and the election).
    pub fn state_prefixes(&self) -> [String; 7] {
        [
            "hosts/",
            "slots/",
            "budget/",
            "freeze/",
            "mode/",
            "approvals/",
            "policy",
        ]
        .map(|p| format!("{}/{p}", self.root))
    }
    pub fn election(&self) -> String {
        format!("{}/leader", self.root)
    }
    pub fn hosts(&self) -> String {
        format!("{}/hosts/", self.root)
    }
    pub fn host(&self, host: &str) -> String {
        format!("{}/hosts/{host}", self.root)
    }
    pub fn slots(&self) -> String {
        format!("{}/slots/", self.root)
    }
    pub fn slot(&self, scope: &Scope, slot: u32) -> String {
        format!(
            "{}/slots/{}/{}/{slot:04}",
            self.root, scope.class, scope.service
        )
    }
    pub fn budget(&self, class: &str) -> String {
        format!("{}/budget/{class}", self.root)
    }
    pub fn kill_switch(&self) -> String {
        format!("{}/freeze/all", self.root)
    }
    pub fn class_freeze(&self, class: &str) -> String {
        format!("{}/freeze/class/{class}", self.root)
    }
    pub fn host_block(&self, class: &str, host: &str) -> String {
        format!("{}/freeze/host/{class}/{host}", self.root)
    }
    pub fn mode(&self, class: &str) -> String {
        format!("{}/mode/{class}", self.root)
    }
    pub fn approvals(&self) -> String {
        format!("{}/approvals/", self.root)
    }
    pub fn approval(&self, id: &str) -> String {
        format!("{}/approvals/{id}", self.root)
    }
    pub fn audit(&self) -> String {
        format!("{}/audit/", self.root)
    }
    /// Zero-padded so that key order is sequence order.
    pub fn audit_record(&self, seq: u64) -> String {
        format!("{}/audit/{seq:020}", self.root)
    }
    pub fn policy(&self) -> String {
        format!("{}/policy", self.root)
    }
    /// A join token, by the hash of the token (`interlock certs token`).
    pub fn join_token(&self, hash: &str) -> String {
        format!("{}/join/{hash}", self.root)
    }
    /// The state seal (see `seal`).
    pub fn seal(&self) -> String {
        format!("{}/seal", self.root)
    }
}

/// What a cap counts over: one action class in one service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope {
    pub class: String,
    pub service: String,
}

/// A registered host, as stored under `hosts/`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub labels: BTreeMap<String, String>,
    pub registered_at: UnixMillis,
}

impl HostRecord {
    pub fn service(&self) -> Option<&str> {
        self.labels.get("service").map(String::as_str)
    }
}

/// A live host may register again (an agent restart), but not move to another service: that
/// would move it, and its caps, to another scope without anyone deciding so. It may once its
/// registration has expired.
pub fn check_reregistration(
    host: &str,
    existing: Option<&HostRecord>,
    labels: &BTreeMap<String, String>,
) -> Result<(), String> {
    let (Some(old), Some(new)) = (
        existing.and_then(HostRecord::service),
        labels.get("service"),
    ) else {
        return Ok(());
    };
    if old == new {
        return Ok(());
    }
    Err(format!(
        "host {host} is registered in service {old:?}; a live host cannot move to {new:?}: stop \
         its agent and register again once its registration expires (the coordinator's \
         --host-ttl)"
    ))
}

/// A registered host in the view, with the store lease that keeps it alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostEntry {
    pub record: HostRecord,
    pub store_lease: i64,
    /// Store revision of the registration, to tell its deletion from an older one's.
    pub revision: i64,
}

/// A live lease, as stored in its slot key. The fencing token is the slot key's
/// `mod_revision` (the slot is written once), so it is not part of the value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub lease_id: String,
    pub host: String,
    pub class: String,
    pub service: String,
    pub target: String,
    pub slot: u32,
    pub granted_at: UnixMillis,
    pub ttl_ms: u64,
    pub verification_window_ms: u64,
    #[serde(default)]
    pub approver: Option<String>,
}

/// A live lease in the view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseEntry {
    pub record: LeaseRecord,
    pub token: u64,
    pub store_lease: i64,
}

/// Where an assist-mode request stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ApprovalState {
    Pending,
    /// The token is the lease's (read from its slot), so it is not repeated here.
    Granted {
        lease_id: String,
        ttl_ms: u64,
        verification_window_ms: u64,
        granted_at: UnixMillis,
        approver: String,
    },
    /// Approved, but admission (run again at approval time) denied it.
    Denied {
        check: String,
        reason: String,
    },
    Rejected {
        by: String,
        reason: String,
    },
}

/// An approval request, as stored under `approvals/` (attached to a store lease that makes
/// it expire).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    pub id: String,
    pub host: String,
    pub class: String,
    pub service: String,
    pub target: String,
    pub evidence: String,
    pub requested_at: UnixMillis,
    pub expires_at: UnixMillis,
    pub state: ApprovalState,
}

/// The whole picture.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub hosts: BTreeMap<String, HostEntry>,
    /// Live leases by lease id.
    pub leases: BTreeMap<String, LeaseEntry>,
    /// Budget state per class, with the `mod_revision` it was read or written at.
    pub budgets: BTreeMap<String, BudgetState>,
    pub kill_switch: Option<FreezeRecord>,
    pub class_freezes: BTreeMap<String, FreezeRecord>,
    pub host_blocks: BTreeMap<(String, String), FreezeRecord>,
    pub modes: BTreeMap<String, Mode>,
    /// Approvals by id, with the store lease that makes them expire.
    pub approvals: BTreeMap<String, (ApprovalRecord, i64)>,
    /// The policy owner and text hash last recorded in the store.
    pub policy_loaded: Option<String>,
}

/// A key under the prefix that did not decode; reported, never silently dropped, and
/// quarantined: the view takes the safer value in its place (`kept` says which).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Undecodable {
    pub key: String,
    pub error: String,
    pub kept: String,
}

/// Who owns the safe values a quarantine puts in the view.
pub const QUARANTINE_OWNER: &str = "store-quarantine";

impl View {
    /// Builds the view from every key under the prefix (one range read). Audit records and
    /// the election are not part of the view. Keys that fail to decode are returned so the
    /// caller can log them; a corrupt budget or freeze key must not be taken as "absent".
    pub fn load(keys: &Keys, kvs: &[Kv]) -> (View, Vec<Undecodable>) {
        View::load_checked(keys, kvs, &[])
    }

    /// Like [`View::load`], with the keys the audit's seal does not back (see `seal::check`)
    /// quarantined like undecodable ones: present or not, each gets the safer value.
    pub fn load_checked(
        keys: &Keys,
        kvs: &[Kv],
        unbacked: &[crate::seal::Unbacked],
    ) -> (View, Vec<Undecodable>) {
        let mut view = View::default();
        let mut bad = Vec::new();
        let refused: BTreeMap<&str, &crate::seal::Unbacked> =
            unbacked.iter().map(|u| (u.key.as_str(), u)).collect();
        for kv in kvs {
            if let Some(u) = refused.get(kv.key.as_str()) {
                let error = u.problem.describe();
                let kept = view.quarantine(keys, kv, "not backed by the audit");
                bad.push(Undecodable {
                    key: kv.key.clone(),
                    error,
                    kept,
                });
                continue;
            }
            if let Err(error) = view.apply_put(keys, kv) {
                let kept = view.quarantine(keys, kv, "undecodable");
                bad.push(Undecodable {
                    key: kv.key.clone(),
                    error,
                    kept,
                });
            }
        }
        // Unbacked keys that are not in the store (deleted behind the coordinator's back, or
        // the kill switch turned on because the seal cannot be trusted).
        for u in unbacked {
            if kvs.iter().any(|kv| kv.key == u.key) {
                continue;
            }
            let gone = Kv {
                key: u.key.clone(),
                value: Vec::new(),
                create_revision: 0,
                mod_revision: 0,
                lease: 0,
            };
            let kept = view.quarantine(keys, &gone, "not backed by the audit");
            bad.push(Undecodable {
                key: u.key.clone(),
                error: u.problem.describe(),
                kept,
            });
        }
        (view, bad)
    }

    /// Puts the safer value in place of a key that did not decode, so one bad write can
    /// neither stop the coordinator from leading nor lift a safety stop: a freeze key freezes,
    /// a mode key means observe, a budget key freezes its class, a slot key stays held (its
    /// store lease still ends it), a host or approval key counts as absent (fewer live hosts
    /// only shrink a percentage cap; an unreadable approval cannot be approved). Returns what
    /// was kept, for the operator.
    fn quarantine(&mut self, keys: &Keys, kv: &Kv, why: &str) -> String {
        let key = kv.key.as_str();
        let Some(rest) = key.strip_prefix(&keys.root()) else {
            return "ignored (outside the prefix)".into();
        };
        let frozen = |what: &str| FreezeRecord {
            reason: format!(
                "{what} key {key} quarantined ({why}); check what changed it, then unfreeze \
                 (the coordinator writes it again)"
            ),
            owner: QUARANTINE_OWNER.to_owned(),
            since: UnixMillis(0),
            cause: crate::admission::FreezeCause::Operator,
        };
        let mut parts = rest.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("freeze"), Some("all"), None, None) => {
                self.kill_switch = Some(frozen("kill-switch"));
                "kill switch on".into()
            }
            (Some("freeze"), Some("class"), Some(class), None) => {
                self.class_freezes
                    .insert(class.to_owned(), frozen("freeze"));
                format!("class {class} frozen")
            }
            (Some("freeze"), Some("host"), Some(class), Some(host)) => {
                self.host_blocks
                    .insert((class.to_owned(), host.to_owned()), frozen("host block"));
                format!("host {host} blocked for {class}")
            }
            (Some("budget"), Some(class), None, None) => {
                self.class_freezes
                    .insert(class.to_owned(), frozen("budget"));
                format!("class {class} frozen")
            }
            (Some("mode"), Some(class), None, None) => {
                self.modes.insert(class.to_owned(), Mode::Observe);
                format!("class {class} in observe mode")
            }
            (Some("slots"), Some(class), Some(service), Some(slot)) => {
                let slot: u32 = slot.parse().unwrap_or(u32::MAX);
                let id = format!("quarantined:{key}");
                self.leases.insert(
                    id.clone(),
                    LeaseEntry {
                        record: LeaseRecord {
                            lease_id: id,
                            host: QUARANTINE_OWNER.to_owned(),
                            class: class.to_owned(),
                            service: service.to_owned(),
                            target: String::new(),
                            slot,
                            granted_at: UnixMillis(0),
                            ttl_ms: 0,
                            verification_window_ms: 0,
                            approver: None,
                        },
                        token: u64::try_from(kv.mod_revision).unwrap_or(0),
                        store_lease: kv.lease,
                    },
                );
                format!("slot {slot} of {class}/{service} counted as held")
            }
            (Some("hosts"), Some(host), None, None) => format!("host {host} not counted as live"),
            (Some("approvals"), Some(id), None, None) => format!("approval {id} ignored"),
            _ => "ignored".into(),
        }
    }

    /// Applies one stored key (from a load or a watch).
    pub fn apply_put(&mut self, keys: &Keys, kv: &Kv) -> Result<(), String> {
        let Some(rest) = kv.key.strip_prefix(&keys.root()) else {
            return Ok(());
        };
        let json = |v: &[u8]| -> Result<serde_json::Value, String> {
            serde_json::from_slice(v).map_err(|e| e.to_string())
        };
        let mut parts = rest.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("hosts"), Some(host), None, None) => {
                let record: HostRecord =
                    serde_json::from_slice(&kv.value).map_err(|e| e.to_string())?;
                self.hosts.insert(
                    host.to_owned(),
                    HostEntry {
                        record,
                        store_lease: kv.lease,
                        revision: kv.mod_revision,
                    },
                );
            }
            (Some("slots"), Some(_), Some(_), Some(_)) => {
                let record: LeaseRecord =
                    serde_json::from_slice(&kv.value).map_err(|e| e.to_string())?;
                self.leases.insert(
                    record.lease_id.clone(),
                    LeaseEntry {
                        record,
                        token: u64::try_from(kv.mod_revision).unwrap_or(0),
                        store_lease: kv.lease,
                    },
                );
            }
            (Some("budget"), Some(class), None, None) => {
                let state: BudgetState =
                    serde_json::from_slice(&kv.value).map_err(|e| e.to_string())?;
                self.budgets.insert(class.to_owned(), state);
            }
            (Some("freeze"), Some("all"), None, None) => {
                self.kill_switch =
                    Some(serde_json::from_value(json(&kv.value)?).map_err(|e| e.to_string())?);
            }
            (Some("freeze"), Some("class"), Some(class), None) => {
                let record = serde_json::from_slice(&kv.value).map_err(|e| e.to_string())?;
                self.class_freezes.insert(class.to_owned(), record);
            }
            (Some("freeze"), Some("host"), Some(class), Some(host)) => {
                let record = serde_json::from_slice(&kv.value).map_err(|e| e.to_string())?;
                self.host_blocks
                    .insert((class.to_owned(), host.to_owned()), record);
            }
            (Some("mode"), Some(class), None, None) => {
                let text = String::from_utf8_lossy(&kv.value);
                let mode: Mode = text.parse().map_err(|e| format!("{e}"))?;
                self.modes.insert(class.to_owned(), mode);
            }
            (Some("approvals"), Some(_), None, None) => {
                let record: ApprovalRecord =
                    serde_json::from_slice(&kv.value).map_err(|e| e.to_string())?;
                self.approvals.insert(record.id.clone(), (record, kv.lease));
            }
            (Some("policy"), None, None, None) => {
                self.policy_loaded = Some(String::from_utf8_lossy(&kv.value).into_owned());
            }
            _ => {}
        }
        Ok(())
    }

    /// Applies a deletion seen by the watch at store revision `revision`. Returns what
    /// disappeared, so the engine can audit a lease that ran out or an approval that expired.
    ///
    /// A key can be deleted and written again before the watch reports the deletion (a slot
    /// released and granted anew, a host registering again), so only an entry written
    /// *before* the deletion is removed.
    pub fn apply_delete(&mut self, keys: &Keys, key: &str, revision: i64) -> Option<Removed> {
        let rest = key.strip_prefix(&keys.root())?;
        let mut parts = rest.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("hosts"), Some(host), None, None) => {
                if self.hosts.get(host)?.revision >= revision {
                    return None;
                }
                self.hosts
                    .remove(host)
                    .map(|_| Removed::Host(host.to_owned()))
            }
            (Some("slots"), Some(class), Some(service), Some(slot)) => {
                let slot: u32 = slot.parse().ok()?;
                let id = self
                    .leases
                    .values()
                    .find(|l| {
                        l.record.class == class
                            && l.record.service == service
                            && l.record.slot == slot
                            && i64::try_from(l.token).unwrap_or(i64::MAX) < revision
                    })?
                    .record
                    .lease_id
                    .clone();
                self.leases.remove(&id).map(Removed::Lease)
            }
            (Some("approvals"), Some(id), None, None) => self
                .approvals
                .remove(id)
                .map(|(record, _)| Removed::Approval(record)),
            _ => None,
        }
    }

    /// Live hosts whose `service` label is `service`.
    pub fn live_hosts(&self, service: &str) -> u32 {
        let n = self
            .hosts
            .values()
            .filter(|h| h.record.service() == Some(service))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Slots held in a scope.
    pub fn held_slots(&self, scope: &Scope) -> BTreeSet<u32> {
        self.leases
            .values()
            .filter(|l| l.record.class == scope.class && l.record.service == scope.service)
            .map(|l| l.record.slot)
            .collect()
    }

    /// The lowest slot index nobody holds. With fewer holders than the cap there is always one
    /// below the cap, even after the cap shrank below slots still held.
    pub fn free_slot(&self, scope: &Scope) -> u32 {
        let held = self.held_slots(scope);
        (0..).find(|i| !held.contains(i)).unwrap_or(0)
    }

    pub fn holds(&self, host: &str, class: &str, target: &str) -> bool {
        self.leases
            .values()
            .any(|l| l.record.host == host && l.record.class == class && l.record.target == target)
    }

    pub fn budget(&self, class: &str) -> BudgetState {
        self.budgets.get(class).cloned().unwrap_or_default()
    }

    pub fn host_id(host: &str) -> HostId {
        HostId(host.to_owned())
    }
}

/// What a deletion removed from the view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removed {
    Host(String),
    Lease(LeaseEntry),
    Approval(ApprovalRecord),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: serde_json::Value, mod_revision: i64, lease: i64) -> Kv {
        Kv {
            key: key.to_owned(),
            value: serde_json::to_vec(&value).unwrap(),
            create_revision: mod_revision,
            mod_revision,
            lease,
        }
    }

    fn lease_value(id: &str, service: &str, slot: u32) -> serde_json::Value {
        serde_json::json!({
            "lease_id": id, "host": "h1", "class": "disk_cleanup", "service": service,
            "target": "/var/log", "slot": slot, "granted_at": 1000, "ttl_ms": 30000,
            "verification_window_ms": 60000
        })
    }

    #[test]
    fn a_live_host_cannot_change_its_service() {
        let labels = |s: &str| BTreeMap::from([("service".to_owned(), s.to_owned())]);
        let api = HostRecord {
            labels: labels("api"),
            registered_at: UnixMillis(1),
        };
        assert!(check_reregistration("h", None, &labels("db")).is_ok());
        assert!(check_reregistration("h", Some(&api), &labels("api")).is_ok());
        let e = check_reregistration("h", Some(&api), &labels("db")).expect_err("moves");
        assert!(e.contains("\"api\"") && e.contains("\"db\""), "{e}");
    }

    #[test]
    fn undecodable_keys_are_quarantined_with_the_safer_value() {
        let keys = Keys::new("/p");
        let garbage = |key: String| Kv {
            key,
            value: b"\xff not json".to_vec(),
            create_revision: 7,
            mod_revision: 7,
            lease: 42,
        };
        let root = keys.root();
        let kvs = vec![
            garbage(format!("{root}freeze/all")),
            garbage(format!("{root}mode/process_restart")),
            garbage(format!("{root}budget/disk_cleanup")),
            garbage(format!("{root}slots/disk_cleanup/web/0")),
            garbage(format!("{root}hosts/web-1")),
            garbage(format!("{root}approvals/a1")),
        ];
        let (view, bad) = View::load(&keys, &kvs);
        assert_eq!(bad.len(), 6, "every bad key is reported: {bad:?}");
        assert!(view.kill_switch.is_some(), "a corrupt kill switch stays on");
        assert_eq!(view.modes["process_restart"], Mode::Observe);
        assert!(view.class_freezes.contains_key("disk_cleanup"));
        let scope = Scope {
            class: "disk_cleanup".into(),
            service: "web".into(),
        };
        assert_eq!(view.held_slots(&scope), [0].into_iter().collect());
        assert!(view.hosts.is_empty() && view.approvals.is_empty());
        assert!(
            bad.iter()
                .all(|b| !b.kept.is_empty() && !b.error.is_empty())
        );
        assert!(
            view.class_freezes["disk_cleanup"]
                .reason
                .contains("budget/disk_cleanup"),
            "the freeze names the key"
        );
    }

    #[test]
    fn keys_the_audit_does_not_back_get_the_safer_value_present_or_not() {
        use crate::seal::{Problem, Unbacked};
        let keys = Keys::new("/p");
        let kvs = vec![Kv {
            key: keys.mode("process_restart"),
            value: b"autonomous".to_vec(),
            create_revision: 3,
            mod_revision: 3,
            lease: 0,
        }];
        let unbacked = vec![
            Unbacked {
                key: keys.mode("process_restart"),
                problem: Problem::Changed,
            },
            Unbacked {
                key: keys.kill_switch(),
                problem: Problem::Deleted,
            },
            Unbacked {
                key: keys.budget("disk_cleanup"),
                problem: Problem::Deleted,
            },
        ];
        let (view, bad) = View::load_checked(&keys, &kvs, &unbacked);
        assert_eq!(
            view.modes["process_restart"],
            Mode::Observe,
            "not autonomous"
        );
        assert!(view.kill_switch.is_some(), "a deleted kill switch stays on");
        assert!(view.class_freezes.contains_key("disk_cleanup"));
        assert_eq!(bad.len(), 3);
        assert!(bad.iter().any(|b| b.error.contains("deleted behind")));
    }

    #[test]
    fn load_reads_hosts_leases_with_their_token_and_freezes() {
        let keys = Keys::new("/p/");
        let slot_key = keys.slot(
            &Scope {
                class: "disk_cleanup".into(),
                service: "web".into(),
            },
            1,
        );
        let kvs = vec![
            kv(
                &keys.host("h1"),
                serde_json::json!({"labels": {"service": "web"}, "registered_at": 5}),
                3,
                77,
            ),
            kv(&slot_key, lease_value("a1", "web", 1), 42, 99),
            kv(
                &keys.class_freeze("disk_cleanup"),
                serde_json::json!({"reason": "r", "owner": "operator:o", "since": 1, "cause": "operator"}),
                50,
                0,
            ),
        ];
        let (view, bad) = View::load(&keys, &kvs);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(view.live_hosts("web"), 1);
        assert_eq!(view.live_hosts("db"), 0);
        let lease = &view.leases["a1"];
        assert_eq!(lease.token, 42, "the token is the slot's mod_revision");
        assert_eq!(lease.store_lease, 99);
        assert!(view.class_freezes.contains_key("disk_cleanup"));
        assert!(view.holds("h1", "disk_cleanup", "/var/log"));
    }

    #[test]
    fn a_corrupt_key_is_reported_not_ignored() {
        let keys = Keys::new("/p");
        let mut bad_kv = kv(&keys.budget("x"), serde_json::json!(1), 2, 0);
        bad_kv.value = b"{not json".to_vec();
        let (_, bad) = View::load(&keys, &[bad_kv]);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].key, "/p/budget/x");
    }

    #[test]
    fn free_slot_fills_gaps_and_delete_removes_the_lease_in_that_slot() {
        let keys = Keys::new("/p");
        let scope = Scope {
            class: "disk_cleanup".into(),
            service: "web".into(),
        };
        let kvs = vec![
            kv(&keys.slot(&scope, 0), lease_value("a0", "web", 0), 10, 1),
            kv(&keys.slot(&scope, 3), lease_value("a3", "web", 3), 11, 2),
        ];
        let (mut view, _) = View::load(&keys, &kvs);
        assert_eq!(view.free_slot(&scope), 1);
        assert_eq!(
            view.apply_delete(&keys, &keys.slot(&scope, 3), 11),
            None,
            "a deletion older than the lease in the slot (a previous holder's) removes nothing"
        );
        let removed = view.apply_delete(&keys, &keys.slot(&scope, 3), 12);
        assert!(matches!(removed, Some(Removed::Lease(l)) if l.record.lease_id == "a3"));
        assert_eq!(view.held_slots(&scope), BTreeSet::from([0]));
        assert_eq!(
            view.apply_delete(&keys, &keys.slot(&scope, 3), 13),
            None,
            "a second delete of the same slot removes nothing"
        );
    }
}
