//! The pure admission core: given a class's policy, the effective mode, freeze state,
//! budget state and scope occupancy at `now`, decide whether a lease request is granted,
//! denied (naming the check), pending approval, or only observed.
//!
//! It owns the order of checks (kill switch → class freeze → host block → already held →
//! mode → fleet budget → host budget → cap → grant), the cap arithmetic
//! ([`effective_cap`]), the sliding-window budget state ([`BudgetState`]) and the freeze
//! records that budget exhaustion produces ([`Effect`]). Callers persist the effects and the
//! grant in one transaction.
//!
//! It never reads a clock, env var, file or socket: `now` is an argument. It must not import
//! tokio, etcd, gRPC, the filesystem or the `audit` module; it uses only `crate::policy`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::policy::{BudgetSpec, CapSpec, ClassPolicy, Mode};

/// Milliseconds since the Unix epoch, as read by the caller's clock.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// `self + d`, saturating at the end of time.
    pub fn plus(self, d: Duration) -> UnixMillis {
        UnixMillis(self.0.saturating_add(duration_millis(d)))
    }
}

impl fmt::Display for UnixMillis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Formatting a given instant reads no clock.
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(self.0);
        write!(f, "{}", humantime::format_rfc3339_millis(at))
    }
}

fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A host's id, as configured on the agent.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HostId(pub String);

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who or what put a freeze in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FreezeCause {
    Operator,
    FleetBudget,
    HostBudget,
}

/// A kill switch, class freeze or host block; stored as JSON until an operator lifts it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeRecord {
    pub reason: String,
    /// Operator identity, or the policy owner (`policy:NAME@VERSION`) for budget freezes.
    pub owner: String,
    pub since: UnixMillis,
    pub cause: FreezeCause,
}

impl fmt::Display for FreezeRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let FreezeRecord {
            reason,
            owner,
            since,
            cause: _,
        } = self;
        write!(f, "since {since} by {owner}: {reason}")
    }
}

/// How finely a budget window is divided. A grant is tallied in the slot it falls in, and a
/// slot counts while any part of it is inside the window, so a grant keeps counting for at most
/// one slot (1/600 of the window: 6 s of an hour) longer than the window, never shorter: the
/// budget can only err towards fewer grants. It keeps the stored state at most 601 entries per
/// tally whatever the budget's `max` (an exact list of timestamps grows with `max`).
pub const SLOTS_PER_WINDOW: u64 = 600;

/// Grants per time slot, oldest first: `(slot start, grants in it)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Tally(pub Vec<(UnixMillis, u32)>);

impl Tally {
    fn count(&self, window_start: UnixMillis, spec: &BudgetSpec, now: UnixMillis) -> u32 {
        let width = slot_width(spec);
        self.0
            .iter()
            .filter(|(start, _)| counts(*start, width, window_start, spec, now))
            .fold(0u32, |acc, (_, n)| acc.saturating_add(*n))
    }

    fn add(&mut self, now: UnixMillis, spec: &BudgetSpec) {
        let width = slot_width(spec);
        let start = UnixMillis(now.0 - now.0 % width);
        match self.0.last_mut() {
            Some((last, n)) if *last == start => *n = n.saturating_add(1),
            _ => {
                self.0.push((start, 1));
                self.0.sort_unstable_by_key(|(s, _)| *s);
            }
        }
    }

    fn prune(&mut self, window_start: UnixMillis, spec: &BudgetSpec, now: UnixMillis) {
        let width = slot_width(spec);
        self.0
            .retain(|(start, _)| counts(*start, width, window_start, spec, now));
    }
}

fn slot_width(spec: &BudgetSpec) -> u64 {
    (duration_ms(spec.window) / SLOTS_PER_WINDOW).max(1)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A slot `[start, start + width)` counts at `now` while it overlaps the window
/// `(now - window, now]` and ends after `window_start`. Slots stamped after `now` (another
/// replica's clock running ahead) still count, which errs on the side of fewer grants.
fn counts(
    start: UnixMillis,
    width: u64,
    window_start: UnixMillis,
    spec: &BudgetSpec,
    now: UnixMillis,
) -> bool {
    let end = start.0.saturating_add(width);
    end > window_start.0 && end.saturating_add(duration_ms(spec.window)) > now.0
}

/// Grants of one class inside the current budget windows. Stored per class as JSON.
///
/// Invariant kept by [`BudgetState::record_grant`]: no tally holds a slot that no longer
/// counts, so the stored state stays bounded (see [`SLOTS_PER_WINDOW`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetState {
    /// Set when the class is unfrozen: grants before it no longer count.
    pub window_start: UnixMillis,
    pub fleet: Tally,
    pub hosts: BTreeMap<HostId, Tally>,
}

impl BudgetState {
    /// Grants counted against the fleet budget at `now`.
    pub fn fleet_used(&self, spec: &BudgetSpec, now: UnixMillis) -> u32 {
        self.fleet.count(self.window_start, spec, now)
    }

    /// Grants to `host` counted against the host budget at `now`.
    pub fn host_used(&self, host: &HostId, spec: &BudgetSpec, now: UnixMillis) -> u32 {
        self.hosts
            .get(host)
            .map_or(0, |t| t.count(self.window_start, spec, now))
    }

    /// Records a grant to `host` at `now` and prunes everything that no longer counts.
    pub fn record_grant(&mut self, host: &HostId, now: UnixMillis, class: &ClassPolicy) {
        let BudgetState {
            window_start,
            fleet,
            hosts,
        } = self;
        let budget = class.budget;
        fleet.add(now, &budget.fleet);
        fleet.prune(*window_start, &budget.fleet, now);
        hosts
            .entry(host.clone())
            .or_default()
            .add(now, &budget.host);
        for tally in hosts.values_mut() {
            tally.prune(*window_start, &budget.host, now);
        }
        hosts.retain(|_, t| !t.0.is_empty());
    }

    /// Forgets one host's grants (used when an operator unblocks that host).
    pub fn reset_host(&mut self, host: &HostId) {
        self.hosts.remove(host);
    }

    /// Starts a fresh window at `now` (used by unfreeze): earlier grants stop counting.
    pub fn reset(&mut self, now: UnixMillis) {
        *self = BudgetState {
            window_start: now,
            fleet: Tally::default(),
            hosts: BTreeMap::new(),
        };
    }
}

/// The cap of a scope with `live_hosts` live hosts: `Absolute(n)` → n;
/// `Percent` → ⌊percent × live_hosts / 100⌋, but at least `min`.
pub fn effective_cap(spec: &CapSpec, live_hosts: u32) -> u32 {
    match *spec {
        CapSpec::Absolute(n) => n,
        CapSpec::Percent { percent, min } => {
            let share = u64::from(percent) * u64::from(live_hosts) / 100;
            u32::try_from(share).unwrap_or(u32::MAX).max(min)
        }
    }
}

/// The kill switch, class freeze and host block that apply to one request.
#[derive(Clone, Copy, Debug, Default)]
pub struct FreezeState<'a> {
    pub kill_switch: Option<&'a FreezeRecord>,
    pub class: Option<&'a FreezeRecord>,
    /// The block of this (class, host), if any.
    pub host: Option<&'a FreezeRecord>,
}

/// Live leases of the scope (class, service) the request falls in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScopeOccupancy {
    /// Live leases currently held in the scope.
    pub holders: u32,
    /// Live hosts of the service, which a percentage cap is taken of.
    pub live_hosts: u32,
}

/// Everything admission needs to decide one request.
#[derive(Clone, Copy, Debug)]
pub struct AdmissionRequest<'a> {
    pub now: UnixMillis,
    pub class: &'a ClassPolicy,
    /// The policy's owner (`policy:NAME@VERSION`), who owns budget freezes.
    pub policy_owner: &'a str,
    /// The policy's mode, or the operator's override of it.
    pub mode: Mode,
    pub freeze: FreezeState<'a>,
    pub budget: &'a BudgetState,
    pub host: &'a HostId,
    pub scope: ScopeOccupancy,
    /// This host already holds a live lease for the same class and target.
    pub already_held: bool,
    /// This is the re-run when an operator approves an assist-mode request.
    pub approved: bool,
}

/// Why a request was (or would be) denied; each variant names the check that refused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DenyReason {
    KillSwitch {
        record: FreezeRecord,
    },
    ClassFrozen {
        record: FreezeRecord,
    },
    HostBlocked {
        record: FreezeRecord,
    },
    FleetBudgetExhausted {
        used: u32,
        max: u32,
        window: Duration,
    },
    HostBudgetExhausted {
        host: HostId,
        used: u32,
        max: u32,
        window: Duration,
    },
    CapFull {
        holders: u32,
        cap: u32,
        live_hosts: u32,
    },
    AlreadyHeld,
}

impl DenyReason {
    /// Stable name of the check, for the wire, metrics and audit records.
    pub fn check_name(&self) -> &'static str {
        match self {
            DenyReason::KillSwitch { .. } => "kill_switch",
            DenyReason::ClassFrozen { .. } => "frozen",
            DenyReason::HostBlocked { .. } => "host_blocked",
            DenyReason::FleetBudgetExhausted { .. } => "fleet_budget",
            DenyReason::HostBudgetExhausted { .. } => "host_budget",
            DenyReason::CapFull { .. } => "cap",
            DenyReason::AlreadyHeld => "already_held",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::KillSwitch { record } => {
                write!(f, "the fleet kill switch is on ({record})")
            }
            DenyReason::ClassFrozen { record } => {
                write!(f, "this action class is frozen ({record})")
            }
            DenyReason::HostBlocked { record } => {
                write!(f, "this host is blocked for this action class ({record})")
            }
            DenyReason::FleetBudgetExhausted { used, max, window } => write!(
                f,
                "fleet budget exhausted: {used} of {max} grants used in the last {}",
                humantime::format_duration(*window)
            ),
            DenyReason::HostBudgetExhausted {
                host,
                used,
                max,
                window,
            } => write!(
                f,
                "host budget exhausted for {host}: {used} of {max} grants used in the last {}",
                humantime::format_duration(*window)
            ),
            DenyReason::CapFull {
                holders,
                cap,
                live_hosts,
            } => write!(
                f,
                "cap reached: {holders} live leases held in this scope, cap is {cap} (with {live_hosts} live hosts)"
            ),
            DenyReason::AlreadyHeld => {
                f.write_str("this host already holds a live lease for this action class and target")
            }
        }
    }
}

/// What observe mode reports instead of acting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WouldBe {
    Grant { cap: u32, holders_after: u32 },
    Deny(DenyReason),
}

/// The outcome of one admission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Write the lease; `cap` is the scope's cap at admission and `holders_after` the scope's
    /// live leases including this one.
    Grant {
        cap: u32,
        holders_after: u32,
    },
    Deny(DenyReason),
    /// Assist mode: wait for an operator, then admit again with `approved: true`.
    Pending,
    /// Observe mode: nothing is granted; this is what would have happened.
    Observed {
        would: WouldBe,
    },
}

/// An alert for a human (sent to the policy's webhook).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub class: String,
    pub host: Option<HostId>,
    pub message: String,
}

/// A state change admission asks the caller to persist with its decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Freeze the whole class until an operator unfreezes it.
    FreezeClass(FreezeRecord),
    /// Block one host for this class until an operator unblocks it.
    BlockHost {
        host: HostId,
        record: FreezeRecord,
    },
    Alert(Alert),
}

/// A decision and the effects that must be persisted with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admission {
    pub decision: Decision,
    pub effects: Vec<Effect>,
}

impl Admission {
    fn without_effects(decision: Decision) -> Admission {
        Admission {
            decision,
            effects: Vec::new(),
        }
    }
}

/// Decides one lease request. Order: kill switch → class freeze → host block → already
/// held → mode → fleet budget → host budget → cap → grant.
pub fn admit(req: &AdmissionRequest<'_>) -> Admission {
    let AdmissionRequest {
        now,
        class,
        policy_owner,
        mode,
        freeze:
            FreezeState {
                kill_switch,
                class: class_freeze,
                host: host_block,
            },
        budget,
        host,
        scope,
        already_held,
        approved,
    } = *req;

    let deny = |reason| Admission::without_effects(Decision::Deny(reason));
    if let Some(record) = kill_switch {
        return deny(DenyReason::KillSwitch {
            record: record.clone(),
        });
    }
    if let Some(record) = class_freeze {
        return deny(DenyReason::ClassFrozen {
            record: record.clone(),
        });
    }
    if let Some(record) = host_block {
        return deny(DenyReason::HostBlocked {
            record: record.clone(),
        });
    }
    if already_held {
        return deny(DenyReason::AlreadyHeld);
    }

    let limits = check_limits(now, class, budget, host, scope);
    match mode {
        Mode::Observe => {
            let would = match limits {
                Ok(Granted { cap, holders_after }) => WouldBe::Grant { cap, holders_after },
                Err(reason) => WouldBe::Deny(reason),
            };
            Admission::without_effects(Decision::Observed { would })
        }
        Mode::Assist if !approved => Admission::without_effects(Decision::Pending),
        Mode::Assist | Mode::Autonomous => match limits {
            Ok(Granted { cap, holders_after }) => {
                Admission::without_effects(Decision::Grant { cap, holders_after })
            }
            Err(reason) => {
                let effects = exhaustion_effects(now, class, policy_owner, host, &reason);
                Admission {
                    decision: Decision::Deny(reason),
                    effects,
                }
            }
        },
    }
}

struct Granted {
    cap: u32,
    holders_after: u32,
}

/// Budgets, then cap. Pure evaluation shared by observe and the granting modes.
fn check_limits(
    now: UnixMillis,
    class: &ClassPolicy,
    budget: &BudgetState,
    host: &HostId,
    scope: ScopeOccupancy,
) -> Result<Granted, DenyReason> {
    let fleet = class.budget.fleet;
    let used = budget.fleet_used(&fleet, now);
    if used >= fleet.max {
        return Err(DenyReason::FleetBudgetExhausted {
            used,
            max: fleet.max,
            window: fleet.window,
        });
    }
    let host_spec = class.budget.host;
    let used = budget.host_used(host, &host_spec, now);
    if used >= host_spec.max {
        return Err(DenyReason::HostBudgetExhausted {
            host: host.clone(),
            used,
            max: host_spec.max,
            window: host_spec.window,
        });
    }
    let ScopeOccupancy {
        holders,
        live_hosts,
    } = scope;
    let cap = effective_cap(&class.cap, live_hosts);
    if holders >= cap {
        return Err(DenyReason::CapFull {
            holders,
            cap,
            live_hosts,
        });
    }
    Ok(Granted {
        cap,
        holders_after: holders.saturating_add(1),
    })
}

/// Budget exhaustion freezes (fleet) or blocks (host) and pages a human (rule I3).
fn exhaustion_effects(
    now: UnixMillis,
    class: &ClassPolicy,
    policy_owner: &str,
    host: &HostId,
    reason: &DenyReason,
) -> Vec<Effect> {
    let record = |cause| FreezeRecord {
        reason: reason.to_string(),
        owner: policy_owner.to_owned(),
        since: now,
        cause,
    };
    match reason {
        DenyReason::FleetBudgetExhausted { .. } => vec![
            Effect::FreezeClass(record(FreezeCause::FleetBudget)),
            Effect::Alert(Alert {
                class: class.name.to_string(),
                host: None,
                message: format!(
                    "action class {} frozen fleet-wide: {reason}; unfreeze it once the cause is understood",
                    class.name
                ),
            }),
        ],
        DenyReason::HostBudgetExhausted { .. } => vec![
            Effect::BlockHost {
                host: host.clone(),
                record: record(FreezeCause::HostBudget),
            },
            Effect::Alert(Alert {
                class: class.name.to_string(),
                host: Some(host.clone()),
                message: format!(
                    "host {host} blocked for action class {}: {reason}; unblock it once the cause is understood",
                    class.name
                ),
            }),
        ],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Budgets, ClassName, SafetyCase, Tier};

    const MIN: u64 = 60_000;
    const HOUR: Duration = Duration::from_secs(3600);
    const NOW: UnixMillis = UnixMillis(10 * 3_600_000);
    const OWNER: &str = "policy:prod@3";

    fn class(cap: CapSpec, fleet_max: u32, host_max: u32) -> ClassPolicy {
        ClassPolicy {
            name: "disk_cleanup".parse::<ClassName>().expect("valid name"),
            tier: Tier::Green,
            mode: Mode::Autonomous,
            safety_case: SafetyCase {
                trigger: "disk full".into(),
                false_positives: vec!["batch".into()],
                reversible: Some(false),
                time_to_reverse: None,
                verification_window: Some(Duration::from_secs(120)),
            },
            cap,
            lease_ttl: Duration::from_secs(30),
            budget: Budgets {
                fleet: BudgetSpec {
                    max: fleet_max,
                    window: HOUR,
                },
                host: BudgetSpec {
                    max: host_max,
                    window: HOUR,
                },
            },
        }
    }

    fn host(name: &str) -> HostId {
        HostId(name.into())
    }

    fn operator_freeze() -> FreezeRecord {
        FreezeRecord {
            reason: "incident 42".into(),
            owner: "alice".into(),
            since: UnixMillis(1),
            cause: FreezeCause::Operator,
        }
    }

    /// Budget state with `fleet` grants by other hosts and `mine` grants by h1, all at `at`.
    fn budget_with(fleet: u32, mine: u32, at: UnixMillis) -> BudgetState {
        let mut state = BudgetState::default();
        let big = class(CapSpec::Absolute(100), 1000, 1000);
        for i in 0..fleet.saturating_sub(mine) {
            state.record_grant(&host(&format!("other{i}")), at, &big);
        }
        for _ in 0..mine {
            state.record_grant(&host("h1"), at, &big);
        }
        state
    }

    /// A request that, by default, is granted in autonomous mode.
    struct Case {
        name: &'static str,
        mode: Mode,
        kill: bool,
        frozen: bool,
        blocked: bool,
        already_held: bool,
        approved: bool,
        cap: CapSpec,
        holders: u32,
        live_hosts: u32,
        fleet_used: u32,
        host_used: u32,
        expect: Decision,
        expect_effects: &'static [&'static str],
    }

    const BASE: Case = Case {
        name: "",
        mode: Mode::Autonomous,
        kill: false,
        frozen: false,
        blocked: false,
        already_held: false,
        approved: false,
        cap: CapSpec::Absolute(2),
        holders: 0,
        live_hosts: 10,
        fleet_used: 0,
        host_used: 0,
        expect: Decision::Pending,
        expect_effects: &[],
    };

    fn effect_names(effects: &[Effect]) -> Vec<&'static str> {
        effects
            .iter()
            .map(|e| match e {
                Effect::FreezeClass(r) => {
                    assert_eq!(r.cause, FreezeCause::FleetBudget);
                    assert_eq!(r.owner, OWNER);
                    assert_eq!(r.since, NOW);
                    "freeze_class"
                }
                Effect::BlockHost { host: h, record } => {
                    assert_eq!(record.cause, FreezeCause::HostBudget);
                    assert_eq!(h, &host("h1"));
                    "block_host"
                }
                Effect::Alert(_) => "alert",
            })
            .collect()
    }

    fn fleet_exhausted(used: u32) -> DenyReason {
        DenyReason::FleetBudgetExhausted {
            used,
            max: 5,
            window: HOUR,
        }
    }

    fn host_exhausted(used: u32) -> DenyReason {
        DenyReason::HostBudgetExhausted {
            host: host("h1"),
            used,
            max: 2,
            window: HOUR,
        }
    }

    fn cap_full(holders: u32, cap: u32, live_hosts: u32) -> DenyReason {
        DenyReason::CapFull {
            holders,
            cap,
            live_hosts,
        }
    }

    #[test]
    fn admission_table() {
        let freeze = operator_freeze();
        let grant = |cap, holders_after| Decision::Grant { cap, holders_after };
        let cases = [
            Case {
                name: "autonomous within limits grants",
                expect: grant(2, 1),
                ..BASE
            },
            Case {
                name: "kill switch beats everything",
                kill: true,
                frozen: true,
                blocked: true,
                already_held: true,
                fleet_used: 5,
                holders: 9,
                expect: Decision::Deny(DenyReason::KillSwitch {
                    record: freeze.clone(),
                }),
                ..BASE
            },
            Case {
                name: "kill switch denies even in observe mode",
                mode: Mode::Observe,
                kill: true,
                expect: Decision::Deny(DenyReason::KillSwitch {
                    record: freeze.clone(),
                }),
                ..BASE
            },
            Case {
                name: "frozen class denies",
                frozen: true,
                blocked: true,
                expect: Decision::Deny(DenyReason::ClassFrozen {
                    record: freeze.clone(),
                }),
                ..BASE
            },
            Case {
                name: "frozen class denies before assist pending",
                mode: Mode::Assist,
                frozen: true,
                expect: Decision::Deny(DenyReason::ClassFrozen {
                    record: freeze.clone(),
                }),
                ..BASE
            },
            Case {
                name: "blocked host denies",
                blocked: true,
                expect: Decision::Deny(DenyReason::HostBlocked {
                    record: freeze.clone(),
                }),
                ..BASE
            },
            Case {
                name: "already held denies",
                already_held: true,
                expect: Decision::Deny(DenyReason::AlreadyHeld),
                ..BASE
            },
            Case {
                name: "observe reports would-grant and grants nothing",
                mode: Mode::Observe,
                expect: Decision::Observed {
                    would: WouldBe::Grant {
                        cap: 2,
                        holders_after: 1,
                    },
                },
                ..BASE
            },
            Case {
                name: "observe reports would-deny on cap without effects",
                mode: Mode::Observe,
                holders: 2,
                expect: Decision::Observed {
                    would: WouldBe::Deny(cap_full(2, 2, 10)),
                },
                ..BASE
            },
            Case {
                name: "observe reports would-deny on fleet budget without freezing",
                mode: Mode::Observe,
                fleet_used: 5,
                expect: Decision::Observed {
                    would: WouldBe::Deny(fleet_exhausted(5)),
                },
                ..BASE
            },
            Case {
                name: "observe ignores approval",
                mode: Mode::Observe,
                approved: true,
                expect: Decision::Observed {
                    would: WouldBe::Grant {
                        cap: 2,
                        holders_after: 1,
                    },
                },
                ..BASE
            },
            Case {
                name: "assist unapproved is pending",
                mode: Mode::Assist,
                expect: Decision::Pending,
                ..BASE
            },
            Case {
                name: "assist unapproved is pending even if the cap is full now",
                mode: Mode::Assist,
                holders: 2,
                expect: Decision::Pending,
                ..BASE
            },
            Case {
                name: "assist approved grants",
                mode: Mode::Assist,
                approved: true,
                holders: 1,
                expect: grant(2, 2),
                ..BASE
            },
            Case {
                name: "assist approved re-runs the cap check",
                mode: Mode::Assist,
                approved: true,
                holders: 2,
                expect: Decision::Deny(cap_full(2, 2, 10)),
                ..BASE
            },
            Case {
                name: "assist approved re-runs the budget check and freezes",
                mode: Mode::Assist,
                approved: true,
                fleet_used: 5,
                expect: Decision::Deny(fleet_exhausted(5)),
                expect_effects: &["freeze_class", "alert"],
                ..BASE
            },
            Case {
                name: "fleet exhaustion denies, freezes the class and alerts",
                fleet_used: 5,
                expect: Decision::Deny(fleet_exhausted(5)),
                expect_effects: &["freeze_class", "alert"],
                ..BASE
            },
            Case {
                name: "one fleet grant left still grants",
                fleet_used: 4,
                expect: grant(2, 1),
                ..BASE
            },
            Case {
                name: "host exhaustion denies, blocks the host and alerts",
                fleet_used: 2,
                host_used: 2,
                expect: Decision::Deny(host_exhausted(2)),
                expect_effects: &["block_host", "alert"],
                ..BASE
            },
            Case {
                name: "fleet budget is checked before host budget",
                fleet_used: 5,
                host_used: 2,
                expect: Decision::Deny(fleet_exhausted(5)),
                expect_effects: &["freeze_class", "alert"],
                ..BASE
            },
            Case {
                name: "budget is checked before cap",
                host_used: 2,
                holders: 2,
                expect: Decision::Deny(host_exhausted(2)),
                expect_effects: &["block_host", "alert"],
                ..BASE
            },
            Case {
                name: "cap full denies without effects",
                holders: 2,
                expect: Decision::Deny(cap_full(2, 2, 10)),
                ..BASE
            },
            Case {
                name: "cap shrunk below holders denies",
                cap: CapSpec::Percent {
                    percent: 50,
                    min: 1,
                },
                live_hosts: 4,
                holders: 3,
                expect: Decision::Deny(cap_full(3, 2, 4)),
                ..BASE
            },
            Case {
                name: "percent cap rounds down: 20 hosts at 10% allows 2",
                cap: CapSpec::Percent {
                    percent: 10,
                    min: 1,
                },
                live_hosts: 20,
                holders: 1,
                expect: grant(2, 2),
                ..BASE
            },
            Case {
                name: "percent cap rounds down: 20 hosts at 10% is full at 2",
                cap: CapSpec::Percent {
                    percent: 10,
                    min: 1,
                },
                live_hosts: 20,
                holders: 2,
                expect: Decision::Deny(cap_full(2, 2, 20)),
                ..BASE
            },
            Case {
                name: "percent cap on 5 hosts at 10% falls back to min 1",
                cap: CapSpec::Percent {
                    percent: 10,
                    min: 1,
                },
                live_hosts: 5,
                expect: grant(1, 1),
                ..BASE
            },
            Case {
                name: "percent cap with min 0 on a small service denies everything",
                cap: CapSpec::Percent {
                    percent: 10,
                    min: 0,
                },
                live_hosts: 5,
                expect: Decision::Deny(cap_full(0, 0, 5)),
                ..BASE
            },
            Case {
                name: "absolute cap 0 denies everything",
                cap: CapSpec::Absolute(0),
                expect: Decision::Deny(cap_full(0, 0, 10)),
                ..BASE
            },
        ];

        for case in cases {
            let Case {
                name,
                mode,
                kill,
                frozen,
                blocked,
                already_held,
                approved,
                cap,
                holders,
                live_hosts,
                fleet_used,
                host_used,
                expect,
                expect_effects,
            } = case;
            let policy = class(cap, 5, 2);
            let budget = budget_with(fleet_used, host_used, UnixMillis(NOW.0 - 10 * MIN));
            let h1 = host("h1");
            let req = AdmissionRequest {
                now: NOW,
                class: &policy,
                policy_owner: OWNER,
                mode,
                freeze: FreezeState {
                    kill_switch: kill.then_some(&freeze),
                    class: frozen.then_some(&freeze),
                    host: blocked.then_some(&freeze),
                },
                budget: &budget,
                host: &h1,
                scope: ScopeOccupancy {
                    holders,
                    live_hosts,
                },
                already_held,
                approved,
            };
            let Admission { decision, effects } = admit(&req);
            assert_eq!(decision, expect, "{name}");
            assert_eq!(effect_names(&effects), expect_effects, "{name}");
        }
    }

    #[test]
    fn effective_cap_table() {
        // (case, spec, live hosts, expected cap)
        let cases = [
            ("absolute ignores hosts", CapSpec::Absolute(3), 100, 3),
            (
                "10% of 20 is 2",
                CapSpec::Percent {
                    percent: 10,
                    min: 1,
                },
                20,
                2,
            ),
            (
                "25% of 7 rounds down to 1",
                CapSpec::Percent {
                    percent: 25,
                    min: 0,
                },
                7,
                1,
            ),
            (
                "10% of 5 falls back to min 1",
                CapSpec::Percent {
                    percent: 10,
                    min: 1,
                },
                5,
                1,
            ),
            (
                "min 0 allows a cap of 0",
                CapSpec::Percent {
                    percent: 10,
                    min: 0,
                },
                5,
                0,
            ),
            (
                "no live hosts gives min",
                CapSpec::Percent {
                    percent: 50,
                    min: 1,
                },
                0,
                1,
            ),
            (
                "100% of everything",
                CapSpec::Percent {
                    percent: 100,
                    min: 1,
                },
                u32::MAX,
                u32::MAX,
            ),
        ];
        for (case, spec, live, expected) in cases {
            assert_eq!(effective_cap(&spec, live), expected, "{case}");
        }
    }

    #[test]
    fn budget_window_slides() {
        let policy = class(CapSpec::Absolute(1), 5, 5);
        let spec = policy.budget.fleet;
        let t = UnixMillis(1_000_000);
        let mut state = BudgetState::default();
        state.record_grant(&host("h1"), t, &policy);
        let window_ms = duration_millis(HOUR);
        // (case, now, expected fleet used, expected host used)
        let cases = [
            ("counted at grant time", t, 1, 1),
            (
                "counted just before window end",
                UnixMillis(t.0 + window_ms - 1),
                1,
                1,
            ),
            (
                "counted at t + window while its slot overlaps the window",
                UnixMillis(t.0 + window_ms),
                1,
                1,
            ),
            (
                "not counted one slot after t + window",
                UnixMillis(t.0 + window_ms + window_ms / SLOTS_PER_WINDOW),
                0,
                0,
            ),
            (
                "counted when stamped in the future",
                UnixMillis(t.0 - 5),
                1,
                1,
            ),
        ];
        for (case, now, fleet, host_used) in cases {
            assert_eq!(state.fleet_used(&spec, now), fleet, "{case}: fleet");
            assert_eq!(
                state.host_used(&host("h1"), &policy.budget.host, now),
                host_used,
                "{case}: host"
            );
            assert_eq!(
                state.host_used(&host("h2"), &policy.budget.host, now),
                0,
                "{case}: other host"
            );
        }
    }

    #[test]
    fn expired_grant_frees_the_budget_for_admission() {
        let policy = class(CapSpec::Absolute(5), 1, 1);
        let t = UnixMillis(1_000_000);
        let mut budget = BudgetState::default();
        budget.record_grant(&host("h1"), t, &policy);
        let h1 = host("h1");
        let at = |now| {
            admit(&AdmissionRequest {
                now,
                class: &policy,
                policy_owner: OWNER,
                mode: Mode::Autonomous,
                freeze: FreezeState::default(),
                budget: &budget,
                host: &h1,
                scope: ScopeOccupancy {
                    holders: 0,
                    live_hosts: 10,
                },
                already_held: false,
                approved: false,
            })
            .decision
        };
        assert!(matches!(
            at(UnixMillis(t.0 + 1)),
            Decision::Deny(DenyReason::FleetBudgetExhausted { .. })
        ));
        assert_eq!(
            at(t.plus(HOUR).plus(HOUR / 600)),
            Decision::Grant {
                cap: 5,
                holders_after: 1
            }
        );
    }

    #[test]
    fn reset_makes_old_grants_not_count() {
        let policy = class(CapSpec::Absolute(1), 2, 2);
        let mut state = BudgetState::default();
        let t = UnixMillis(1_000_000);
        state.record_grant(&host("h1"), t, &policy);
        state.record_grant(&host("h1"), UnixMillis(t.0 + 1), &policy);
        let now = UnixMillis(t.0 + 2);
        assert_eq!(state.fleet_used(&policy.budget.fleet, now), 2);
        state.reset(now);
        assert_eq!(state.window_start, now);
        assert_eq!(state.fleet_used(&policy.budget.fleet, now), 0);
        assert_eq!(state.host_used(&host("h1"), &policy.budget.host, now), 0);
        state.record_grant(&host("h1"), now, &policy);
        assert_eq!(
            state.fleet_used(&policy.budget.fleet, now),
            1,
            "a grant at the reset instant counts"
        );
    }

    #[test]
    fn window_start_excludes_earlier_grants_even_if_still_stored() {
        let policy = class(CapSpec::Absolute(1), 5, 5);
        // An hour's slots are 6 s wide: a slot that ended before the window start is out.
        let state = BudgetState {
            window_start: UnixMillis(20_000),
            fleet: Tally(vec![(UnixMillis(6_000), 1), (UnixMillis(18_000), 1)]),
            hosts: BTreeMap::from([(host("h1"), Tally(vec![(UnixMillis(6_000), 1)]))]),
        };
        assert_eq!(
            state.fleet_used(&policy.budget.fleet, UnixMillis(30_000)),
            1
        );
        assert_eq!(
            state.host_used(&host("h1"), &policy.budget.host, UnixMillis(30_000)),
            0
        );
    }

    #[test]
    fn record_grant_prunes_expired_slots_and_stays_bounded_whatever_the_max() {
        let policy = class(CapSpec::Absolute(1), 1_000_000, 1_000_000);
        let mut state = BudgetState::default();
        let t = UnixMillis(1_000_000);
        state.record_grant(&host("old"), t, &policy);
        let later = t.plus(HOUR).plus(HOUR);
        // Ten thousand grants over two hours: one every 720 ms.
        for i in 0..10_000u64 {
            state.record_grant(&host("h1"), UnixMillis(later.0 + i * 720), &policy);
        }
        let now = UnixMillis(later.0 + 9_999 * 720);
        assert!(
            state.fleet.0.len() <= 601,
            "bounded by the slots of one window: {}",
            state.fleet.0.len()
        );
        assert_eq!(
            state.hosts.keys().collect::<Vec<_>>(),
            vec![&host("h1")],
            "expired host entries are dropped"
        );
        let used = state.fleet_used(&policy.budget.fleet, now);
        // 5,000 grants fell in the last hour; at most one 6 s slot (9 grants) more is counted.
        assert!((5_000..=5_009).contains(&used), "{used}");
    }

    #[test]
    fn serialised_state_round_trips_as_json() {
        let policy = class(CapSpec::Absolute(1), 3, 2);
        let mut state = BudgetState::default();
        state.record_grant(&host("h1"), UnixMillis(7), &policy);
        let json = serde_json::to_string(&state).expect("serialises");
        assert_eq!(
            json,
            r#"{"window_start":0,"fleet":[[0,1]],"hosts":{"h1":[[0,1]]}}"#
        );
        let back: BudgetState = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, state);

        let record = FreezeRecord {
            cause: FreezeCause::FleetBudget,
            ..operator_freeze()
        };
        let json = serde_json::to_string(&record).expect("serialises");
        assert!(json.contains(r#""cause":"fleet_budget""#), "{json}");
        let back: FreezeRecord = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, record);
    }

    #[test]
    fn deny_reasons_name_their_check_and_numbers() {
        let freeze = operator_freeze();
        // (reason, check name, fragments of the sentence)
        let cases: [(DenyReason, &str, &[&str]); 7] = [
            (
                DenyReason::KillSwitch {
                    record: freeze.clone(),
                },
                "kill_switch",
                &["kill switch", "alice", "incident 42"],
            ),
            (
                DenyReason::ClassFrozen {
                    record: freeze.clone(),
                },
                "frozen",
                &["frozen", "alice"],
            ),
            (
                DenyReason::HostBlocked { record: freeze },
                "host_blocked",
                &["blocked", "incident 42"],
            ),
            (fleet_exhausted(5), "fleet_budget", &["5 of 5", "1h"]),
            (host_exhausted(2), "host_budget", &["h1", "2 of 2", "1h"]),
            (
                cap_full(3, 2, 4),
                "cap",
                &["3 live leases", "cap is 2", "4 live hosts"],
            ),
            (DenyReason::AlreadyHeld, "already_held", &["already holds"]),
        ];
        for (reason, check, fragments) in cases {
            assert_eq!(reason.check_name(), check);
            let sentence = reason.to_string();
            for fragment in fragments {
                assert!(
                    sentence.contains(fragment),
                    "{check}: {sentence:?} lacks {fragment:?}"
                );
            }
        }
    }
}
