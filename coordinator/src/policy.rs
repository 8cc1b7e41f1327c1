//! The coordinator's policy file: the action classes and their safety cases.
//!
//! This module owns parsing and validating the TOML policy in two stages (serde into raw
//! structs with `deny_unknown_fields`, then validation into typed [`Policy`] values that
//! reports every problem with its path at once), and the autonomy rule I4: a red-tier class,
//! or one whose safety case is incomplete, may never be autonomous ([`check_mode_change`]).
//!
//! It is pure: it takes the file's text, never a path, and must not import tokio, the
//! filesystem, etcd, gRPC, or the `admission` and `audit` modules (they depend on this one).

use crate::identity::{Access, Role};
use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// etcd refuses lease TTLs below this, so a shorter `lease_ttl` could never be honoured.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);
/// A lease is meant to be renewed while working; a longer TTL would hold a cap slot for
/// too long after its holder dies.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(60 * 60);
/// Default time an operator has to approve an assist-mode request.
pub const DEFAULT_APPROVAL_TTL: Duration = Duration::from_secs(10 * 60);
/// Shorter approval windows expire before a human can reasonably react.
pub const MIN_APPROVAL_TTL: Duration = Duration::from_secs(10);
/// Budgets are counted in milliseconds; a window under a second is almost surely a typo.
pub const MIN_BUDGET_WINDOW: Duration = Duration::from_secs(1);

/// Risk tier of an action class; red-tier classes may never be autonomous.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Green,
    Yellow,
    Red,
}

/// Autonomy mode of an action class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Shadow: admission is evaluated and recorded, nothing is ever granted.
    Observe,
    /// Every lease needs a human approval.
    Assist,
    /// Leases are granted without a human, inside caps and budgets.
    Autonomous,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Green => "green",
            Tier::Yellow => "yellow",
            Tier::Red => "red",
        }
    }
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Observe => "observe",
            Mode::Assist => "assist",
            Mode::Autonomous => "autonomous",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that is not a tier or mode name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseEnumError {
    #[error("unknown tier {0:?}; use one of \"green\", \"yellow\", \"red\"")]
    Tier(String),
    #[error("unknown mode {0:?}; use one of \"observe\", \"assist\", \"autonomous\"")]
    Mode(String),
}

impl FromStr for Tier {
    type Err = ParseEnumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "green" => Ok(Tier::Green),
            "yellow" => Ok(Tier::Yellow),
            "red" => Ok(Tier::Red),
            other => Err(ParseEnumError::Tier(other.to_owned())),
        }
    }
}

impl FromStr for Mode {
    type Err = ParseEnumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "observe" => Ok(Mode::Observe),
            "assist" => Ok(Mode::Assist),
            "autonomous" => Ok(Mode::Autonomous),
            other => Err(ParseEnumError::Mode(other.to_owned())),
        }
    }
}

/// A validated action class name: `[a-z][a-z0-9_]{0,63}`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClassName(String);

/// A string that is not a valid action class name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "{0:?} is not a valid class name; use 1 to 64 characters of a-z, 0-9 and _, starting with a letter"
)]
pub struct ClassNameError(pub String);

impl ClassName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ClassName {
    type Err = ClassNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut chars = s.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if first_ok && rest_ok && s.len() <= 64 {
            Ok(ClassName(s.to_owned()))
        } else {
            Err(ClassNameError(s.to_owned()))
        }
    }
}

impl fmt::Display for ClassName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// Lets `policy.classes.get("disk_cleanup")` work; the derived `Ord` on the single field
// agrees with `str`'s, which `Borrow` requires.
impl Borrow<str> for ClassName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// How many leases a scope (class, service) may hold at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapSpec {
    /// At most this many, whatever the size of the service.
    Absolute(u32),
    /// At most ⌊percent × live hosts / 100⌋, but never fewer than `min`.
    Percent { percent: u32, min: u32 },
}

/// At most `max` grants in any sliding `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetSpec {
    pub max: u32,
    pub window: Duration,
}

/// The fleet-wide and per-host budgets of one class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budgets {
    pub fleet: BudgetSpec,
    pub host: BudgetSpec,
}

/// How long undoing the action takes: a duration, or free text such as "none".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TimeToReverse {
    Duration(Duration),
    Text(String),
}

/// The safety-case fields that do not steer admission directly but must all be filled in
/// before a class may be autonomous. Missing fields are `None` or empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SafetyCase {
    pub trigger: String,
    pub false_positives: Vec<String>,
    pub reversible: Option<bool>,
    pub time_to_reverse: Option<TimeToReverse>,
    pub verification_window: Option<Duration>,
}

impl SafetyCase {
    /// Names of the fields still missing, in file order.
    pub fn missing_fields(&self) -> Vec<&'static str> {
        let SafetyCase {
            trigger,
            false_positives,
            reversible,
            time_to_reverse,
            verification_window,
        } = self;
        let mut missing = Vec::new();
        if trigger.trim().is_empty() {
            missing.push("trigger");
        }
        if false_positives.is_empty() {
            missing.push("false_positives");
        }
        if reversible.is_none() {
            missing.push("reversible");
        }
        if time_to_reverse.is_none() {
            missing.push("time_to_reverse");
        }
        if verification_window.is_none() {
            missing.push("verification_window");
        }
        missing
    }
}

/// One validated action class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassPolicy {
    pub name: ClassName,
    pub tier: Tier,
    /// The mode the policy sets; an operator override may replace it at run time.
    pub mode: Mode,
    pub safety_case: SafetyCase,
    pub cap: CapSpec,
    pub lease_ttl: Duration,
    pub budget: Budgets,
}

impl ClassPolicy {
    /// `Err` lists the safety-case fields that are missing.
    pub fn safety_case_complete(&self) -> Result<(), Vec<&'static str>> {
        let missing = self.safety_case.missing_fields();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing)
        }
    }
}

/// A validated policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub version: u64,
    pub alert_webhook: Option<String>,
    pub approval_ttl: Duration,
    pub classes: BTreeMap<ClassName, ClassPolicy>,
    /// Who may do what on the operator API (with TLS).
    pub access: Access,
}

impl Policy {
    /// The identity that owns automated decisions: `policy:NAME@VERSION`.
    pub fn owner(&self) -> String {
        format!("policy:{}@{}", self.name, self.version)
    }

    pub fn class(&self, name: &str) -> Option<&ClassPolicy> {
        self.classes.get(name)
    }

    /// Parses and validates a policy file's text. `name_for_errors` (usually the file path)
    /// prefixes every reported problem.
    pub fn from_toml_str(name_for_errors: &str, text: &str) -> Result<Policy, PolicyErrors> {
        let raw: RawPolicy = toml::from_str(text).map_err(|err| PolicyErrors {
            file: name_for_errors.to_owned(),
            problems: vec![syntax_problem(text, &err)],
        })?;
        let mut problems = Problems::default();
        let policy = validate_policy(raw, &mut problems);
        match policy {
            Some(policy) if problems.0.is_empty() => Ok(policy),
            _ => Err(PolicyErrors {
                file: name_for_errors.to_owned(),
                problems: problems.0,
            }),
        }
    }
}

/// Why a class may not be switched to a mode (rule I4).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ModeError {
    #[error("class {class} is red-tier and may never be autonomous; use \"assist\" or \"observe\"")]
    RedTierAutonomous { class: String },
    #[error(
        "class {class} may not be autonomous while its safety case is incomplete (missing: {}); fill in those fields or use \"assist\" or \"observe\"",
        .missing.join(", ")
    )]
    IncompleteSafetyCase {
        class: String,
        missing: Vec<&'static str>,
    },
}

/// Applies rule I4 to a requested mode change (used by `interlock mode`).
pub fn check_mode_change(class: &ClassPolicy, new: Mode) -> Result<(), ModeError> {
    match autonomy_violations(
        class.name.as_str(),
        new,
        class.tier,
        class.safety_case.missing_fields(),
    )
    .into_iter()
    .next()
    {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

fn autonomy_violations(
    class: &str,
    mode: Mode,
    tier: Tier,
    missing: Vec<&'static str>,
) -> Vec<ModeError> {
    let mut errors = Vec::new();
    if mode != Mode::Autonomous {
        return errors;
    }
    if tier == Tier::Red {
        errors.push(ModeError::RedTierAutonomous {
            class: class.to_owned(),
        });
    }
    if !missing.is_empty() {
        errors.push(ModeError::IncompleteSafetyCase {
            class: class.to_owned(),
            missing,
        });
    }
    errors
}

/// One problem in a policy file, located by its key path (or line, for syntax errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyProblem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in one policy file; displays one problem per line.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}", render_problems(.file, .problems))]
pub struct PolicyErrors {
    pub file: String,
    pub problems: Vec<PolicyProblem>,
}

impl PolicyErrors {
    /// True if some problem is located at exactly `path`.
    pub fn has_path(&self, path: &str) -> bool {
        self.problems.iter().any(|p| p.path == path)
    }
}

fn render_problems(file: &str, problems: &[PolicyProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("{file}: {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn syntax_problem(text: &str, err: &toml::de::Error) -> PolicyProblem {
    let path = match err.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line} column {column}")
        }
        None => "file".to_owned(),
    };
    PolicyProblem {
        path,
        message: err.message().trim_end().to_owned(),
    }
}

// ---- stage 1: raw serde structs -------------------------------------------------------
//
// Required fields are `Option` here so that a missing one becomes a validation problem with
// its path, reported together with all others, rather than a serde error that stops at the
// first.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Option<String>,
    version: Option<i64>,
    alert_webhook: Option<String>,
    approval_ttl: Option<String>,
    #[serde(default)]
    classes: BTreeMap<String, RawClass>,
    #[serde(default)]
    access: RawAccess,
}

/// `[access]`: operator roles (`[access.operators] alice = "admin"`) and a deny list of
/// identities (`deny = ["operator:mallory", "host:web-9"]`). Only used with TLS: without it
/// nobody is verified, so nobody has a role to check.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    #[serde(default)]
    operators: BTreeMap<String, String>,
    #[serde(default)]
    deny: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    tier: Option<String>,
    mode: Option<String>,
    trigger: Option<String>,
    false_positives: Option<Vec<String>>,
    reversible: Option<bool>,
    time_to_reverse: Option<String>,
    /// An integer or a percentage string; checked in stage 2 for a better message.
    cap: Option<toml::Value>,
    cap_min: Option<i64>,
    lease_ttl: Option<String>,
    verification_window: Option<String>,
    budget: Option<RawBudgets>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudgets {
    fleet: Option<RawBudget>,
    host: Option<RawBudget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    max: Option<i64>,
    window: Option<String>,
}

// ---- stage 2: validation --------------------------------------------------------------

#[derive(Default)]
struct Problems(Vec<PolicyProblem>);

impl Problems {
    fn push(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(PolicyProblem {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    fn missing(&mut self, path: &str, example: &str) {
        self.push(path, format!("is required; add it, e.g. {example}"));
    }
}

fn show(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

fn parse_duration(problems: &mut Problems, path: &str, text: &str) -> Option<Duration> {
    match humantime::parse_duration(text.trim()) {
        Ok(d) => Some(d),
        Err(err) => {
            problems.push(
                path,
                format!(
                    "{text:?} is not a duration ({err}); write it like \"30s\", \"5m\" or \"1h\""
                ),
            );
            None
        }
    }
}

fn validate_policy(raw: RawPolicy, problems: &mut Problems) -> Option<Policy> {
    let RawPolicy {
        name,
        version,
        alert_webhook,
        approval_ttl,
        classes,
        access,
    } = raw;
    let access = validate_access(access, problems);

    let name = match name {
        None => {
            problems.missing("name", "name = \"prod\"");
            None
        }
        Some(n) if valid_policy_name(&n) => Some(n),
        Some(n) => {
            problems.push(
                "name",
                format!(
                    "{n:?} is not a valid policy name; use 1 to 64 characters of a-z, 0-9, _ and -"
                ),
            );
            None
        }
    };

    let version = match version {
        None => {
            problems.missing("version", "version = 1");
            None
        }
        Some(v) if v >= 1 => u64::try_from(v).ok(),
        Some(v) => {
            problems.push(
                "version",
                format!("{v} is not a valid version; use an integer of at least 1"),
            );
            None
        }
    };

    let alert_webhook = match alert_webhook {
        Some(url) if !(url.starts_with("http://") || url.starts_with("https://")) => {
            problems.push(
                "alert_webhook",
                format!(
                    "{url:?} is not an http(s) URL; it must start with \"http://\" or \"https://\""
                ),
            );
            None
        }
        other => other,
    };

    let approval_ttl = match approval_ttl {
        None => Some(DEFAULT_APPROVAL_TTL),
        Some(text) => match parse_duration(problems, "approval_ttl", &text) {
            Some(d) if d < MIN_APPROVAL_TTL => {
                problems.push(
                    "approval_ttl",
                    format!(
                        "{} is too short for a human to approve; set at least \"{}\"",
                        show(d),
                        show(MIN_APPROVAL_TTL)
                    ),
                );
                None
            }
            other => other,
        },
    };

    if classes.is_empty() {
        problems.push(
            "classes",
            "no action classes are defined; add at least one [classes.NAME] table",
        );
    }
    let mut valid_classes = BTreeMap::new();
    let mut all_classes_valid = true;
    for (class_name, raw_class) in classes {
        match validate_class(&class_name, raw_class, problems) {
            Some(class) => {
                valid_classes.insert(class.name.clone(), class);
            }
            None => all_classes_valid = false,
        }
    }

    match (name, version, approval_ttl, all_classes_valid) {
        (Some(name), Some(version), Some(approval_ttl), true) => Some(Policy {
            name,
            version,
            alert_webhook,
            approval_ttl,
            classes: valid_classes,
            access,
        }),
        _ => None,
    }
}

fn validate_access(raw: RawAccess, problems: &mut Problems) -> Access {
    let RawAccess { operators, deny } = raw;
    let mut access = Access::default();
    for (name, role) in operators {
        let path = format!("access.operators.{name}");
        if !crate::identity::valid_name(&name) {
            problems.push(
                &path,
                "an operator name is 1-253 characters of letters, digits, '.', '_' or '-'",
            );
            continue;
        }
        match role.as_str() {
            "viewer" => access.operators.insert(name, Role::Viewer),
            "approver" => access.operators.insert(name, Role::Approver),
            "operator" => access.operators.insert(name, Role::Operator),
            "admin" => access.operators.insert(name, Role::Admin),
            other => {
                problems.push(
                    &path,
                    format!(
                        "unknown role {other:?}; use \"viewer\", \"approver\", \"operator\" or \"admin\""
                    ),
                );
                None
            }
        };
    }
    for (i, who) in deny.into_iter().enumerate() {
        let ok = who.split_once(':').is_some_and(|(kind, name)| {
            matches!(kind, "host" | "operator") && crate::identity::valid_name(name)
        });
        if ok {
            access.deny.insert(who);
        } else {
            problems.push(
                &format!("access.deny[{i}]"),
                format!("{who:?} is not an identity; write \"host:<id>\" or \"operator:<name>\""),
            );
        }
    }
    access
}

fn valid_policy_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn validate_class(name: &str, raw: RawClass, problems: &mut Problems) -> Option<ClassPolicy> {
    let base = format!("classes.{name}");
    let path = |field: &str| format!("{base}.{field}");
    let before = problems.0.len();

    let class_name = match name.parse::<ClassName>() {
        Ok(n) => Some(n),
        Err(err) => {
            problems.push(&base, err.to_string());
            None
        }
    };

    let RawClass {
        tier,
        mode,
        trigger,
        false_positives,
        reversible,
        time_to_reverse,
        cap,
        cap_min,
        lease_ttl,
        verification_window,
        budget,
    } = raw;

    let tier = match tier {
        None => {
            problems.missing(&path("tier"), "tier = \"green\"");
            None
        }
        Some(t) => t
            .parse::<Tier>()
            .map_err(|err| problems.push(&path("tier"), err.to_string()))
            .ok(),
    };
    let mode = match mode {
        None => {
            problems.missing(&path("mode"), "mode = \"observe\"");
            None
        }
        Some(m) => m
            .parse::<Mode>()
            .map_err(|err| problems.push(&path("mode"), err.to_string()))
            .ok(),
    };

    // Safety-case fields are optional at load; only autonomy requires them.
    let false_positives = false_positives.unwrap_or_default();
    for (i, fp) in false_positives.iter().enumerate() {
        if fp.trim().is_empty() {
            problems.push(
                &format!("{base}.false_positives[{i}]"),
                "is empty; describe the false-positive mode or remove the entry",
            );
        }
    }
    let time_to_reverse = time_to_reverse.filter(|t| !t.trim().is_empty()).map(|t| {
        match humantime::parse_duration(t.trim()) {
            Ok(d) => TimeToReverse::Duration(d),
            Err(_) => TimeToReverse::Text(t),
        }
    });
    let verification_window_missing = verification_window.is_none();
    let verification_window = verification_window.and_then(|text| {
        match parse_duration(problems, &path("verification_window"), &text) {
            Some(d) if d.is_zero() => {
                problems.push(
                    &path("verification_window"),
                    "must be longer than zero; set how long the outcome takes to show, e.g. \"2m\"",
                );
                None
            }
            other => other,
        }
    });
    let safety_case = SafetyCase {
        trigger: trigger.unwrap_or_default(),
        false_positives,
        reversible,
        time_to_reverse,
        verification_window,
    };

    let cap = validate_cap(&path("cap"), &path("cap_min"), cap, cap_min, problems);

    let lease_ttl = match lease_ttl {
        None => {
            problems.missing(&path("lease_ttl"), "lease_ttl = \"30s\"");
            None
        }
        Some(text) => match parse_duration(problems, &path("lease_ttl"), &text) {
            Some(d) if d < MIN_LEASE_TTL => {
                problems.push(
                    &path("lease_ttl"),
                    format!(
                        "{} is below etcd's minimum lease TTL of {}; set at least \"{}\"",
                        show(d),
                        show(MIN_LEASE_TTL),
                        show(MIN_LEASE_TTL)
                    ),
                );
                None
            }
            Some(d) if d > MAX_LEASE_TTL => {
                problems.push(
                    &path("lease_ttl"),
                    format!(
                        "{} is above the maximum lease TTL of {}; set at most \"{}\" and renew while working",
                        show(d),
                        show(MAX_LEASE_TTL),
                        show(MAX_LEASE_TTL)
                    ),
                );
                None
            }
            other => other,
        },
    };

    let budget = match budget {
        None => {
            problems.missing(
                &path("budget"),
                &format!("[{base}.budget] with fleet = {{ max = 20, window = \"1h\" }} and host = {{ max = 3, window = \"1h\" }}"),
            );
            None
        }
        Some(RawBudgets { fleet, host }) => {
            let fleet = validate_budget(&path("budget.fleet"), fleet, problems);
            let host = validate_budget(&path("budget.host"), host, problems);
            match (fleet, host) {
                (Some(fleet), Some(host)) => Some(Budgets { fleet, host }),
                _ => None,
            }
        }
    };

    // Rule I4, judged on which safety-case fields are absent from the file; a field that is
    // present but invalid was reported above and is not reported again as missing.
    if let (Some(tier), Some(mode)) = (tier, mode) {
        let mut missing = safety_case.missing_fields();
        if !verification_window_missing {
            missing.retain(|f| *f != "verification_window");
        }
        for err in autonomy_violations(name, mode, tier, missing) {
            problems.push(&path("mode"), err.to_string());
        }
    }

    if problems.0.len() != before {
        return None;
    }
    Some(ClassPolicy {
        name: class_name?,
        tier: tier?,
        mode: mode?,
        safety_case,
        cap: cap?,
        lease_ttl: lease_ttl?,
        budget: budget?,
    })
}

fn validate_cap(
    cap_path: &str,
    min_path: &str,
    cap: Option<toml::Value>,
    cap_min: Option<i64>,
    problems: &mut Problems,
) -> Option<CapSpec> {
    let min = match cap_min {
        None => Some(1),
        Some(m) => match u32::try_from(m) {
            Ok(m) => Some(m),
            Err(_) => {
                problems.push(
                    min_path,
                    format!("{m} is not a valid minimum; use an integer of at least 0"),
                );
                None
            }
        },
    };
    match cap {
        None => {
            problems.missing(cap_path, "cap = 2 or cap = \"25%\"");
            None
        }
        Some(toml::Value::Integer(n)) => {
            if cap_min.is_some() {
                problems.push(
                    min_path,
                    "only applies to a percentage cap; remove it or make cap a percentage like \"25%\"",
                );
            }
            match u32::try_from(n) {
                Ok(n) => Some(CapSpec::Absolute(n)),
                Err(_) => {
                    problems.push(
                        cap_path,
                        format!("{n} is not a valid cap; use an integer of at least 0 or a percentage like \"25%\""),
                    );
                    None
                }
            }
        }
        Some(toml::Value::String(text)) => {
            let percent = text
                .trim()
                .strip_suffix('%')
                .and_then(|p| p.trim().parse::<u32>().ok())
                .filter(|p| (1..=100).contains(p));
            match percent {
                Some(percent) => Some(CapSpec::Percent { percent, min: min? }),
                None => {
                    problems.push(
                        cap_path,
                        format!("{text:?} is not a valid percentage cap; use a whole percentage from \"1%\" to \"100%\""),
                    );
                    None
                }
            }
        }
        Some(other) => {
            problems.push(
                cap_path,
                format!(
                    "a {} is not a valid cap; use an integer like 2 or a percentage like \"25%\"",
                    other.type_str()
                ),
            );
            None
        }
    }
}

fn validate_budget(
    base: &str,
    raw: Option<RawBudget>,
    problems: &mut Problems,
) -> Option<BudgetSpec> {
    let Some(RawBudget { max, window }) = raw else {
        problems.missing(base, "{ max = 3, window = \"1h\" }");
        return None;
    };
    let max_path = format!("{base}.max");
    let window_path = format!("{base}.window");
    let max = match max {
        None => {
            problems.missing(&max_path, "max = 3");
            None
        }
        Some(m) => match u32::try_from(m) {
            Ok(m) if m >= 1 => Some(m),
            _ => {
                problems.push(
                    &max_path,
                    format!("{m} is not a valid budget; use an integer of at least 1 (set mode = \"observe\" to stop granting)"),
                );
                None
            }
        },
    };
    let window = match window {
        None => {
            problems.missing(&window_path, "window = \"1h\"");
            None
        }
        Some(text) => match parse_duration(problems, &window_path, &text) {
            Some(d) if d < MIN_BUDGET_WINDOW => {
                problems.push(
                    &window_path,
                    format!(
                        "{} is too short a budget window; set at least \"{}\"",
                        show(d),
                        show(MIN_BUDGET_WINDOW)
                    ),
                );
                None
            }
            other => other,
        },
    };
    Some(BudgetSpec {
        max: max?,
        window: window?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
name = "prod"
version = 3
alert_webhook = "http://127.0.0.1:9000/alert"
approval_ttl = "15m"

[classes.disk_cleanup]
tier = "green"
mode = "autonomous"
trigger = "disk used above 90% or full within 1h"
false_positives = ["batch job that writes then deletes"]
reversible = false
time_to_reverse = "none"
cap = "25%"
cap_min = 0
lease_ttl = "30s"
verification_window = "2m"
[classes.disk_cleanup.budget]
fleet = { max = 20, window = "1h" }
host = { max = 3, window = "1h" }

[classes.process_restart]
tier = "yellow"
mode = "assist"
cap = 2
lease_ttl = "1m"
[classes.process_restart.budget]
fleet = { max = 10, window = "30m" }
host = { max = 1, window = "1h" }
"#;

    fn load(text: &str) -> Result<Policy, PolicyErrors> {
        Policy::from_toml_str("test.toml", text)
    }

    /// A minimal valid class with one field replaced or added.
    fn one_class(extra: &str) -> String {
        format!(
            r#"
name = "p"
version = 1
[classes.c]
tier = "green"
mode = "observe"
cap = 1
lease_ttl = "30s"
{extra}
[classes.c.budget]
fleet = {{ max = 5, window = "1h" }}
host = {{ max = 1, window = "1h" }}
"#
        )
    }

    #[test]
    fn valid_full_example_loads_with_typed_fields() {
        let policy = load(FULL).expect("full example is valid");
        assert_eq!(policy.owner(), "policy:prod@3");
        assert_eq!(policy.approval_ttl, Duration::from_secs(15 * 60));
        assert_eq!(
            policy.alert_webhook.as_deref(),
            Some("http://127.0.0.1:9000/alert")
        );
        let disk = policy.class("disk_cleanup").expect("class present");
        assert_eq!(disk.tier, Tier::Green);
        assert_eq!(disk.mode, Mode::Autonomous);
        assert_eq!(
            disk.cap,
            CapSpec::Percent {
                percent: 25,
                min: 0
            }
        );
        assert_eq!(disk.lease_ttl, Duration::from_secs(30));
        assert_eq!(
            disk.budget.fleet,
            BudgetSpec {
                max: 20,
                window: Duration::from_secs(3600)
            }
        );
        assert_eq!(disk.budget.host.max, 3);
        assert_eq!(
            disk.safety_case.time_to_reverse,
            Some(TimeToReverse::Text("none".into()))
        );
        assert_eq!(
            disk.safety_case.verification_window,
            Some(Duration::from_secs(120))
        );
        assert_eq!(disk.safety_case_complete(), Ok(()));

        let restart = policy.class("process_restart").expect("class present");
        assert_eq!(restart.cap, CapSpec::Absolute(2));
        assert_eq!(
            restart.safety_case_complete(),
            Err(vec![
                "trigger",
                "false_positives",
                "reversible",
                "time_to_reverse",
                "verification_window"
            ])
        );
    }

    #[test]
    fn access_roles_and_deny_list_load_and_their_errors_name_the_path() {
        let text = FULL.to_owned()
            + "\n[access]\ndeny = [\"host:web-9\"]\n[access.operators]\nalice = \"admin\"\nbob = \"viewer\"\n";
        let policy = load(&text).expect("valid");
        assert_eq!(policy.access.operators["alice"], Role::Admin);
        assert_eq!(policy.access.operators["bob"], Role::Viewer);
        assert!(policy.access.deny.contains("host:web-9"));
        // No [access]: nobody has a role (default deny).
        assert!(load(FULL).expect("valid").access.operators.is_empty());

        let bad = FULL.to_owned()
            + "\n[access]\ndeny = [\"web-9\"]\n[access.operators]\nalice = \"root\"\n";
        let err = load(&bad).expect_err("bad access");
        assert!(err.has_path("access.operators.alice"), "{err}");
        assert!(err.has_path("access.deny[0]"), "{err}");
        assert!(
            err.to_string().contains("\"viewer\", \"approver\""),
            "{err}"
        );
    }

    #[test]
    fn defaults_apply_when_optional_fields_are_absent() {
        let policy =
            load(&one_class("cap_min = 1\ncap = \"10%\"").replace("cap = 1\n", "")).expect("valid");
        let c = policy.class("c").expect("class present");
        assert_eq!(
            c.cap,
            CapSpec::Percent {
                percent: 10,
                min: 1
            }
        );
        assert_eq!(policy.approval_ttl, DEFAULT_APPROVAL_TTL);
        assert_eq!(policy.alert_webhook, None);

        let policy = load(&one_class("").replace("cap = 1", "cap = \"10%\"")).expect("valid");
        assert_eq!(
            policy.class("c").map(|c| c.cap),
            Some(CapSpec::Percent {
                percent: 10,
                min: 1
            }),
            "cap_min defaults to 1"
        );
    }

    #[test]
    fn time_to_reverse_accepts_a_duration() {
        let policy = load(&one_class("time_to_reverse = \"5m\"")).expect("valid");
        assert_eq!(
            policy
                .class("c")
                .and_then(|c| c.safety_case.time_to_reverse.clone()),
            Some(TimeToReverse::Duration(Duration::from_secs(300)))
        );
    }

    #[test]
    fn each_kind_of_error_is_reported_at_its_path() {
        // (case, file text, path expected, fragment of the message)
        let cases: Vec<(&str, String, &str, &str)> = vec![
            (
                "lease ttl below etcd minimum",
                one_class("").replace("\"30s\"", "\"1s\""),
                "classes.c.lease_ttl",
                "1s is below etcd's minimum lease TTL of 2s; set at least \"2s\"",
            ),
            (
                "lease ttl above maximum",
                one_class("").replace("\"30s\"", "\"2h\""),
                "classes.c.lease_ttl",
                "above the maximum lease TTL of 1h",
            ),
            (
                "lease ttl not a duration",
                one_class("").replace("\"30s\"", "\"soon\""),
                "classes.c.lease_ttl",
                "\"soon\" is not a duration",
            ),
            (
                "missing lease ttl",
                one_class("").replace("lease_ttl = \"30s\"", ""),
                "classes.c.lease_ttl",
                "is required",
            ),
            (
                "bad policy name",
                one_class("").replace("name = \"p\"", "name = \"Prod!\""),
                "name",
                "not a valid policy name",
            ),
            (
                "missing name",
                one_class("").replace("name = \"p\"", ""),
                "name",
                "is required",
            ),
            (
                "version zero",
                one_class("").replace("version = 1", "version = 0"),
                "version",
                "at least 1",
            ),
            (
                "missing version",
                one_class("").replace("version = 1", ""),
                "version",
                "is required",
            ),
            (
                "webhook not http",
                one_class("").replace("version = 1", "version = 1\nalert_webhook = \"ftp://x\""),
                "alert_webhook",
                "must start with \"http://\" or \"https://\"",
            ),
            (
                "approval ttl too short",
                one_class("").replace("version = 1", "version = 1\napproval_ttl = \"5s\""),
                "approval_ttl",
                "set at least \"10s\"",
            ),
            (
                "bad class name",
                one_class("").replace("classes.c", "classes.Disk"),
                "classes.Disk",
                "not a valid class name",
            ),
            (
                "unknown tier",
                one_class("").replace("\"green\"", "\"blue\""),
                "classes.c.tier",
                "unknown tier \"blue\"",
            ),
            (
                "unknown mode",
                one_class("").replace("\"observe\"", "\"yolo\""),
                "classes.c.mode",
                "unknown mode \"yolo\"",
            ),
            (
                "missing tier",
                one_class("").replace("tier = \"green\"", ""),
                "classes.c.tier",
                "is required",
            ),
            (
                "negative cap",
                one_class("").replace("cap = 1", "cap = -1"),
                "classes.c.cap",
                "at least 0",
            ),
            (
                "percent above 100",
                one_class("").replace("cap = 1", "cap = \"150%\""),
                "classes.c.cap",
                "not a valid percentage cap",
            ),
            (
                "zero percent",
                one_class("").replace("cap = 1", "cap = \"0%\""),
                "classes.c.cap",
                "not a valid percentage cap",
            ),
            (
                "cap of wrong type",
                one_class("").replace("cap = 1", "cap = true"),
                "classes.c.cap",
                "a boolean is not a valid cap",
            ),
            (
                "cap_min with absolute cap",
                one_class("cap_min = 2"),
                "classes.c.cap_min",
                "only applies to a percentage cap",
            ),
            (
                "negative cap_min",
                one_class("cap_min = -2").replace("cap = 1", "cap = \"10%\""),
                "classes.c.cap_min",
                "at least 0",
            ),
            (
                "missing cap",
                one_class("").replace("cap = 1", ""),
                "classes.c.cap",
                "is required",
            ),
            (
                "budget max zero",
                one_class("").replace("max = 5", "max = 0"),
                "classes.c.budget.fleet.max",
                "at least 1",
            ),
            (
                "budget window too short",
                one_class("").replace("max = 1, window = \"1h\"", "max = 1, window = \"10ms\""),
                "classes.c.budget.host.window",
                "set at least \"1s\"",
            ),
            (
                "budget window missing",
                one_class("").replace("max = 1, window = \"1h\"", "max = 1"),
                "classes.c.budget.host.window",
                "is required",
            ),
            (
                "host budget missing",
                one_class("").replace("host = { max = 1, window = \"1h\" }", ""),
                "classes.c.budget.host",
                "is required",
            ),
            (
                "budget table missing",
                one_class("")
                    .replace("[classes.c.budget]", "")
                    .replace("fleet = { max = 5, window = \"1h\" }", "")
                    .replace("host = { max = 1, window = \"1h\" }", ""),
                "classes.c.budget",
                "is required",
            ),
            (
                "zero verification window",
                one_class("verification_window = \"0s\""),
                "classes.c.verification_window",
                "longer than zero",
            ),
            (
                "empty false positive",
                one_class("false_positives = [\"\"]"),
                "classes.c.false_positives[0]",
                "is empty",
            ),
            (
                "no classes",
                "name = \"p\"\nversion = 1\n".to_owned(),
                "classes",
                "add at least one [classes.NAME] table",
            ),
        ];
        for (case, text, path, fragment) in cases {
            let errs = load(&text).expect_err(case);
            let problem = errs
                .problems
                .iter()
                .find(|p| p.path == path)
                .unwrap_or_else(|| panic!("{case}: no problem at {path}; got:\n{errs}"));
            assert!(
                problem.message.contains(fragment),
                "{case}: message {:?} lacks {fragment:?}",
                problem.message
            );
            assert_eq!(
                errs.problems.len(),
                1,
                "{case}: exactly one problem:\n{errs}"
            );
        }
    }

    #[test]
    fn several_errors_are_all_reported_in_one_load_one_per_line() {
        let text = one_class("")
            .replace("version = 1", "version = 0")
            .replace("\"30s\"", "\"1s\"")
            .replace("cap = 1", "cap = \"200%\"")
            .replace("max = 5", "max = 0");
        let errs = load(&text).expect_err("four problems");
        for path in [
            "version",
            "classes.c.lease_ttl",
            "classes.c.cap",
            "classes.c.budget.fleet.max",
        ] {
            assert!(errs.has_path(path), "missing {path} in:\n{errs}");
        }
        let shown = errs.to_string();
        assert_eq!(shown.lines().count(), 4, "{shown}");
        assert!(
            shown.lines().all(|l| l.starts_with("test.toml: ")),
            "{shown}"
        );
        assert!(shown.contains(
            "test.toml: classes.c.lease_ttl: 1s is below etcd's minimum lease TTL of 2s; set at least \"2s\""
        ));
    }

    #[test]
    fn red_tier_autonomous_is_refused_at_load() {
        let complete = FULL.replace("tier = \"green\"", "tier = \"red\"");
        let errs = load(&complete).expect_err("red may not be autonomous");
        assert_eq!(errs.problems.len(), 1, "{errs}");
        assert_eq!(errs.problems[0].path, "classes.disk_cleanup.mode");
        assert!(errs.problems[0].message.contains("red-tier"), "{errs}");
    }

    #[test]
    fn incomplete_safety_case_autonomous_is_refused_naming_missing_fields() {
        let text = FULL.replace("reversible = false\n", "").replace(
            "trigger = \"disk used above 90% or full within 1h\"",
            "trigger = \"\"",
        );
        let errs = load(&text).expect_err("incomplete may not be autonomous");
        assert_eq!(errs.problems.len(), 1, "{errs}");
        let p = &errs.problems[0];
        assert_eq!(p.path, "classes.disk_cleanup.mode");
        assert!(p.message.contains("missing: trigger, reversible"), "{p}");
    }

    #[test]
    fn invalid_safety_case_field_is_not_also_reported_as_missing() {
        let text = FULL.replace(
            "verification_window = \"2m\"",
            "verification_window = \"x\"",
        );
        let errs = load(&text).expect_err("bad duration");
        assert_eq!(errs.problems.len(), 1, "{errs}");
        assert_eq!(
            errs.problems[0].path,
            "classes.disk_cleanup.verification_window"
        );
    }

    #[test]
    fn unknown_field_is_refused_with_its_name() {
        for (case, text) in [
            (
                "top level",
                FULL.replace("version = 3", "version = 3\ncolour = 1"),
            ),
            (
                "in a class",
                FULL.replace("tier = \"green\"", "tier = \"green\"\nblast = 3"),
            ),
            (
                "in a budget",
                FULL.replace("fleet = { max = 20", "fleet = { maxx = 4, max = 20"),
            ),
        ] {
            let errs = load(&text).expect_err(case);
            let shown = errs.to_string();
            let name = ["colour", "blast", "maxx"]
                .into_iter()
                .find(|n| text.contains(n))
                .unwrap_or_default();
            assert!(
                shown.contains(&format!("unknown field `{name}`")),
                "{case}: {shown}"
            );
            assert!(shown.starts_with("test.toml: line "), "{case}: {shown}");
        }
    }

    #[test]
    fn mode_change_applies_rule_i4() {
        let policy = load(FULL).expect("valid");
        let disk = policy.class("disk_cleanup").expect("present").clone();
        let restart = policy.class("process_restart").expect("present").clone();
        let red = ClassPolicy {
            tier: Tier::Red,
            ..disk.clone()
        };
        // (case, class, new mode, expected)
        let cases = [
            (
                "complete green may be autonomous",
                &disk,
                Mode::Autonomous,
                Ok(()),
            ),
            ("anything may observe", &red, Mode::Observe, Ok(())),
            ("incomplete may assist", &restart, Mode::Assist, Ok(())),
            (
                "red may not be autonomous",
                &red,
                Mode::Autonomous,
                Err(ModeError::RedTierAutonomous {
                    class: "disk_cleanup".into(),
                }),
            ),
            (
                "incomplete may not be autonomous",
                &restart,
                Mode::Autonomous,
                Err(ModeError::IncompleteSafetyCase {
                    class: "process_restart".into(),
                    missing: vec![
                        "trigger",
                        "false_positives",
                        "reversible",
                        "time_to_reverse",
                        "verification_window",
                    ],
                }),
            ),
        ];
        for (case, class, mode, expected) in cases {
            assert_eq!(check_mode_change(class, mode), expected, "{case}");
        }
    }

    #[test]
    fn mode_and_tier_round_trip_through_strings() {
        for mode in [Mode::Observe, Mode::Assist, Mode::Autonomous] {
            assert_eq!(mode.to_string().parse::<Mode>(), Ok(mode));
        }
        for tier in [Tier::Green, Tier::Yellow, Tier::Red] {
            assert_eq!(tier.to_string().parse::<Tier>(), Ok(tier));
        }
        assert_eq!(
            "Observe".parse::<Mode>(),
            Err(ParseEnumError::Mode("Observe".into()))
        );
    }
}
