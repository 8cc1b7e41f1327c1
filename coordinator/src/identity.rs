//! Who is calling and what they may do: identities taken from verified certificates, operator
//! roles, and the rules that bind a host to its own requests (I9).
//!
//! Pure: it parses SAN URIs that the TLS layer (`tls`) has already verified and decides from
//! data; it imports no tonic, rustls, store or filesystem. The server asks it before every call.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::policy::Mode;

/// The operator the break-glass token acts as (`tokens`): admin whatever the policy says, every
/// use audited and alerted. No certificate may claim this name.
pub const BREAK_GLASS: &str = "break-glass";

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Identity {
    /// An agent: `spiffe://<trust-domain>/host/<host_id>`.
    Host(String),
    /// A person or automation: `spiffe://<trust-domain>/operator/<name>`.
    Operator(String),
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Host(h) => write!(f, "host:{h}"),
            Identity::Operator(o) => write!(f, "operator:{o}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate has no URI SAN; issue it with `interlock certs issue host|operator`")]
    NoUri,
    #[error(
        "the certificate's URI SAN {0:?} is not spiffe://{1}/host/<id> or spiffe://{1}/operator/<name>"
    )]
    Unparsable(String, String),
    #[error("the certificate names trust domain {got:?}, but this coordinator trusts {want:?}")]
    TrustDomain { got: String, want: String },
}

/// The one identity in a certificate's URI SANs. A certificate with several Interlock
/// identities is refused: it would let one key speak for two principals.
pub fn from_uris(uris: &[String], trust_domain: &str) -> Result<Identity, IdentityError> {
    let mut found = Vec::new();
    let mut last_err = None;
    for uri in uris {
        match parse_spiffe(uri, trust_domain) {
            Ok(id) => found.push(id),
            Err(e) => last_err = Some(e),
        }
    }
    if found.contains(&Identity::Operator(BREAK_GLASS.to_owned())) {
        return Err(IdentityError::Unparsable(
            format!("{} (reserved for the break-glass token)", uris.join(", ")),
            trust_domain.to_owned(),
        ));
    }
    match (found.len(), last_err) {
        (1, _) => Ok(found.remove(0)),
        (0, Some(e)) => Err(e),
        (0, None) => Err(IdentityError::NoUri),
        _ => Err(IdentityError::Unparsable(
            uris.join(", "),
            trust_domain.to_owned(),
        )),
    }
}

/// A host id or operator name: 1–253 bytes of `[A-Za-z0-9._-]`, the same rule the engine
/// applies to host ids.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `spiffe://<td>/host/<id>` or `spiffe://<td>/operator/<name>` (names as [`valid_name`]).
pub fn parse_spiffe(uri: &str, trust_domain: &str) -> Result<Identity, IdentityError> {
    let bad = || IdentityError::Unparsable(uri.to_owned(), trust_domain.to_owned());
    let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
    let (domain, path) = rest.split_once('/').ok_or_else(bad)?;
    if domain != trust_domain {
        return Err(IdentityError::TrustDomain {
            got: domain.to_owned(),
            want: trust_domain.to_owned(),
        });
    }
    let (kind, name) = path.split_once('/').ok_or_else(bad)?;
    if !valid_name(name) {
        return Err(bad());
    }
    match kind {
        "host" => Ok(Identity::Host(name.to_owned())),
        "operator" => Ok(Identity::Operator(name.to_owned())),
        _ => Err(bad()),
    }
}

/// The SAN URI `interlock certs issue` writes for an identity.
pub fn spiffe_uri(identity: &Identity, trust_domain: &str) -> String {
    match identity {
        Identity::Host(h) => format!("spiffe://{trust_domain}/host/{h}"),
        Identity::Operator(o) => format!("spiffe://{trust_domain}/operator/{o}"),
    }
}

/// Operator roles, each including the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read-only commands.
    Viewer,
    /// And approve / reject pending requests.
    Approver,
    /// And freeze / unfreeze / revoke, mode → observe or assist.
    Operator,
    /// And mode → autonomous.
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Approver => "approver",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

/// What an operator call does, for the role check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorAction {
    Read,
    Approve,
    Reject,
    Freeze,
    Unfreeze,
    Revoke,
    SetMode(Mode),
    /// Make a join token: it mints a host identity, so it needs admin.
    IssueJoinToken,
}

impl OperatorAction {
    pub fn required_role(self) -> Role {
        match self {
            OperatorAction::Read => Role::Viewer,
            OperatorAction::Approve | OperatorAction::Reject => Role::Approver,
            OperatorAction::Freeze
            | OperatorAction::Unfreeze
            | OperatorAction::Revoke
            | OperatorAction::SetMode(Mode::Observe | Mode::Assist) => Role::Operator,
            OperatorAction::SetMode(Mode::Autonomous) | OperatorAction::IssueJoinToken => {
                Role::Admin
            }
        }
    }

    pub fn describe(self) -> String {
        match self {
            OperatorAction::Read => "read fleet state".into(),
            OperatorAction::Approve => "approve a request".into(),
            OperatorAction::Reject => "reject a request".into(),
            OperatorAction::Freeze => "freeze".into(),
            OperatorAction::Unfreeze => "unfreeze".into(),
            OperatorAction::Revoke => "revoke a lease".into(),
            OperatorAction::SetMode(m) => format!("switch a class to {m}"),
            OperatorAction::IssueJoinToken => "make a join token for a host".into(),
        }
    }
}

/// Who may do what: the policy's `[access]` table. Default deny: an operator not listed has no
/// role; a listed deny wins over any role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    pub operators: BTreeMap<String, Role>,
    /// Identities refused everything, as `host:<id>` or `operator:<name>`.
    pub deny: BTreeSet<String>,
}

/// A refused call: what to tell the caller (and audit), and the counter label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: String,
    /// `wrong_kind`, `denied`, `role`, `other_host`.
    pub check: &'static str,
}

impl Refusal {
    fn new(check: &'static str, reason: String) -> Self {
        Self { reason, check }
    }
}

impl Access {
    fn denied(&self, identity: &Identity) -> Option<Refusal> {
        deny_refusal(identity, &self.deny, "[access] deny in the policy")
    }

    /// An operator call: the caller must be an operator whose role covers the action. Returns
    /// the operator's name, the owner the audit records.
    pub fn authorize_operator(
        &self,
        identity: &Identity,
        action: OperatorAction,
    ) -> Result<String, Refusal> {
        if let Some(r) = self.denied(identity) {
            return Err(r);
        }
        let name = match identity {
            Identity::Operator(name) => name,
            Identity::Host(_) => {
                return Err(Refusal::new(
                    "wrong_kind",
                    format!(
                        "{identity} is an agent's certificate; the operator API needs an operator \
                         certificate (`interlock certs issue operator NAME`)"
                    ),
                ));
            }
        };
        let need = action.required_role();
        let role = if name == BREAK_GLASS {
            Some(&Role::Admin)
        } else {
            self.operators.get(name)
        };
        match role {
            Some(role) if *role >= need => Ok(name.clone()),
            Some(role) => Err(Refusal::new(
                "role",
                format!(
                    "{identity} has role {role}; to {} it needs {need} ([access.operators] in the policy)",
                    action.describe()
                ),
            )),
            None => Err(Refusal::new(
                "role",
                format!(
                    "{identity} has no role; add `{name} = \"{need}\"` (or higher) under \
                     [access.operators] in the policy"
                ),
            )),
        }
    }

    /// An agent call on behalf of `claimed` (the host the message names; empty means the
    /// caller's own). Returns the host id the call acts for: always the certificate's.
    pub fn authorize_host(&self, identity: &Identity, claimed: &str) -> Result<String, Refusal> {
        if let Some(r) = self.denied(identity) {
            return Err(r);
        }
        match identity {
            Identity::Host(host) if claimed.is_empty() || claimed == host => Ok(host.clone()),
            Identity::Host(_) => Err(Refusal::new(
                "other_host",
                format!("{identity} cannot act for host {claimed}: a host acts only for itself"),
            )),
            Identity::Operator(_) => Err(Refusal::new(
                "wrong_kind",
                format!(
                    "{identity} is an operator's certificate; the agent API needs the host's own \
                     certificate (`interlock certs issue host HOST`)"
                ),
            )),
        }
    }
}

/// Parses a deny list file: one identity a line (`host:<id>` or `operator:<name>`), blank lines
/// and `#` comments ignored. Every bad line is reported, with its number.
pub fn parse_deny_list(text: &str) -> Result<BTreeSet<String>, Vec<String>> {
    let mut out = BTreeSet::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let ok = line
            .split_once(':')
            .is_some_and(|(kind, name)| matches!(kind, "host" | "operator") && valid_name(name));
        if ok {
            out.insert(line.to_owned());
        } else {
            bad.push(format!(
                "line {}: {line:?} is not \"host:<id>\" or \"operator:<name>\"",
                i + 1
            ));
        }
    }
    if bad.is_empty() { Ok(out) } else { Err(bad) }
}

/// The refusal for an identity on a deny list loaded from `source`, if it is on it.
pub fn deny_refusal(identity: &Identity, deny: &BTreeSet<String>, source: &str) -> Option<Refusal> {
    let key = identity.to_string();
    deny.contains(&key).then(|| {
        Refusal::new(
            "denied",
            format!("{key} is on the coordinator's deny list ({source})"),
        )
    })
}

/// Hosts on `new` that were not on `old`: their live leases are revoked.
pub fn newly_denied_hosts(old: &BTreeSet<String>, new: &BTreeSet<String>) -> Vec<String> {
    new.difference(old)
        .filter_map(|k| k.strip_prefix("host:").map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_certificate_can_claim_the_break_glass_name_but_the_token_is_admin() {
        let uri = spiffe_uri(&Identity::Operator(BREAK_GLASS.into()), "td");
        assert!(from_uris(&[uri], "td").is_err());
        let access = Access::default();
        let glass = Identity::Operator(BREAK_GLASS.into());
        assert_eq!(
            access.authorize_operator(&glass, OperatorAction::SetMode(Mode::Autonomous)),
            Ok(BREAK_GLASS.to_owned())
        );
        assert!(access.authorize_host(&glass, "").is_err(), "never a host");
    }

    const TD: &str = "interlock";

    #[test]
    fn spiffe_uris_parse_to_identities() {
        assert_eq!(
            parse_spiffe("spiffe://interlock/host/web-1", TD),
            Ok(Identity::Host("web-1".into()))
        );
        assert_eq!(
            parse_spiffe("spiffe://interlock/operator/alice", TD),
            Ok(Identity::Operator("alice".into()))
        );
        for bad in [
            "https://interlock/host/web-1",
            "spiffe://interlock/host/",
            "spiffe://interlock/host/a/b",
            "spiffe://interlock/admin/alice",
            "spiffe://interlock",
            "spiffe://interlock/host/web 1",
        ] {
            assert!(
                matches!(parse_spiffe(bad, TD), Err(IdentityError::Unparsable(..))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_spiffe("spiffe://other/host/web-1", TD),
            Err(IdentityError::TrustDomain { .. })
        ));
        let id = Identity::Host("web-1".into());
        assert_eq!(parse_spiffe(&spiffe_uri(&id, TD), TD), Ok(id));
    }

    #[test]
    fn a_certificate_names_exactly_one_identity() {
        assert_eq!(from_uris(&[], TD), Err(IdentityError::NoUri));
        let two = [
            "spiffe://interlock/host/a".to_owned(),
            "spiffe://interlock/operator/a".to_owned(),
        ];
        assert!(matches!(
            from_uris(&two, TD),
            Err(IdentityError::Unparsable(..))
        ));
        let one_good = [
            "https://example.invalid/x".to_owned(),
            "spiffe://interlock/host/a".to_owned(),
        ];
        assert_eq!(from_uris(&one_good, TD), Ok(Identity::Host("a".into())));
    }

    fn access() -> Access {
        Access {
            operators: [
                ("vic", Role::Viewer),
                ("erin", Role::Approver),
                ("carol", Role::Operator),
                ("ada", Role::Admin),
                ("mallory", Role::Admin),
            ]
            .into_iter()
            .map(|(n, r)| (n.to_owned(), r))
            .collect(),
            deny: ["operator:mallory".to_owned(), "host:web-9".to_owned()]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn operator_roles_table() {
        use OperatorAction as A;
        let a = access();
        let op = |n: &str| Identity::Operator(n.to_owned());
        // (who, action, allowed)
        let table = [
            ("vic", A::Read, true),
            ("vic", A::Freeze, false),
            ("vic", A::Approve, false),
            ("vic", A::SetMode(Mode::Observe), false),
            ("erin", A::Approve, true),
            ("erin", A::Reject, true),
            ("erin", A::Freeze, false),
            ("erin", A::SetMode(Mode::Autonomous), false),
            ("carol", A::Freeze, true),
            ("carol", A::Unfreeze, true),
            ("carol", A::Revoke, true),
            ("carol", A::SetMode(Mode::Assist), true),
            ("carol", A::SetMode(Mode::Autonomous), false),
            ("ada", A::SetMode(Mode::Autonomous), true),
            ("ada", A::Read, true),
            // Default deny: not listed.
            ("nobody", A::Read, false),
            // A deny wins over admin.
            ("mallory", A::Read, false),
        ];
        for (who, action, allowed) in table {
            let got = a.authorize_operator(&op(who), action);
            assert_eq!(got.is_ok(), allowed, "{who} {action:?}: {got:?}");
            if let Ok(owner) = got {
                assert_eq!(owner, who);
            }
        }
        let r = a
            .authorize_operator(&op("nobody"), A::Freeze)
            .expect_err("no role");
        assert!(r.reason.contains("nobody = \"operator\""), "{}", r.reason);
        assert_eq!(
            a.authorize_operator(&op("mallory"), A::Read)
                .expect_err("denied")
                .check,
            "denied"
        );
    }

    #[test]
    fn deny_lists_parse_every_bad_line_and_diff_to_new_hosts() {
        let text = "# revoked 2026-12-03\nhost:web-9\n\noperator:mallory  # left\n";
        let deny = parse_deny_list(text).expect("valid");
        assert_eq!(deny.len(), 2);
        let err = parse_deny_list("host:\nweb-1\nhost:ok\nuser:x\n").expect_err("bad");
        assert_eq!(err.len(), 3, "{err:?}");
        assert!(err[0].starts_with("line 1:"), "{err:?}");
        let old = parse_deny_list("host:a\n").expect("valid");
        let new = parse_deny_list("host:a\nhost:b\noperator:c\n").expect("valid");
        assert_eq!(newly_denied_hosts(&old, &new), vec!["b".to_owned()]);
        let r = deny_refusal(&Identity::Host("b".into()), &new, "/etc/deny").expect("denied");
        assert!(r.reason.contains("/etc/deny"));
        assert!(deny_refusal(&Identity::Host("z".into()), &new, "x").is_none());
    }

    #[test]
    fn hosts_act_only_for_themselves_and_kinds_never_cross() {
        let a = access();
        let web1 = Identity::Host("web-1".into());
        assert_eq!(a.authorize_host(&web1, "web-1"), Ok("web-1".into()));
        assert_eq!(a.authorize_host(&web1, ""), Ok("web-1".into()));
        let r = a.authorize_host(&web1, "web-2").expect_err("other host");
        assert_eq!(r.check, "other_host");
        // An operator, even an admin, cannot act as a host.
        let r = a
            .authorize_host(&Identity::Operator("ada".into()), "web-1")
            .expect_err("operator as host");
        assert_eq!(r.check, "wrong_kind");
        // A host certificate cannot call the operator API, even for a read.
        let r = a
            .authorize_operator(&web1, OperatorAction::Read)
            .expect_err("host as operator");
        assert_eq!(r.check, "wrong_kind");
        // A denied host is refused for itself too.
        let r = a
            .authorize_host(&Identity::Host("web-9".into()), "web-9")
            .expect_err("denied");
        assert_eq!(r.check, "denied");
    }
}
