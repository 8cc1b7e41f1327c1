//! The deny list file (`interlock serve --deny-file FILE`): identities refused everything,
//! re-read when the file changes, without a restart. A host newly on the list also loses its
//! live leases (revoked and audited, owned by `deny-list:<file>`).
//!
//! Owns the file polling and the revocations it causes; the rules (what a line may say, who a
//! new entry affects, the refusal) are `identity`'s. A file that becomes unreadable or invalid
//! keeps the list last loaded (an error a human must fix must not un-deny anyone).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use tokio::sync::watch;

use crate::{
    engine::Engine,
    identity::{self, Identity, Refusal},
    view::View,
};

/// How often the file is looked at; a denial takes effect within about this long.
pub const POLL: Duration = Duration::from_secs(1);

/// The deny list in force, shared by the server's handlers and the watcher.
#[derive(Debug, Clone, Default)]
pub struct DenyList {
    inner: Arc<RwLock<BTreeSet<String>>>,
    source: Arc<str>,
}

#[derive(Debug, thiserror::Error)]
pub enum DenyError {
    #[error("cannot read the deny list {path}: {source}; check --deny-file")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the deny list {path} has bad lines:\n  {}", .lines.join("\n  "))]
    Invalid { path: PathBuf, lines: Vec<String> },
}

fn load(path: &Path) -> Result<BTreeSet<String>, DenyError> {
    let text = std::fs::read_to_string(path).map_err(|source| DenyError::Read {
        path: path.to_owned(),
        source,
    })?;
    identity::parse_deny_list(&text).map_err(|lines| DenyError::Invalid {
        path: path.to_owned(),
        lines,
    })
}

impl DenyList {
    /// Reads the file now: a bad file stops the coordinator before it serves.
    pub fn from_file(path: &Path) -> Result<Self, DenyError> {
        Ok(Self {
            inner: Arc::new(RwLock::new(load(path)?)),
            source: path.display().to_string().into(),
        })
    }

    pub fn refusal(&self, identity: &Identity) -> Option<Refusal> {
        let set = self.inner.read().unwrap_or_else(|p| p.into_inner());
        identity::deny_refusal(identity, &set, &self.source)
    }

    fn current(&self) -> BTreeSet<String> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replace(&self, new: BTreeSet<String>) -> BTreeSet<String> {
        let mut set = self.inner.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *set, new)
    }
}

/// The live leases these hosts hold, as (host, lease id): what a deny must revoke.
fn leases_of(view: &View, hosts: &BTreeSet<String>) -> Vec<(String, String)> {
    view.leases
        .values()
        .filter(|l| hosts.contains(&l.record.host))
        .map(|l| (l.record.host.clone(), l.record.lease_id.clone()))
        .collect()
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Watches `path` until `stop`: on every change, loads it, swaps the list in, and revokes the
/// live leases of hosts newly on it (on the leader; followers hold no leases to revoke).
pub async fn watch_file(
    path: PathBuf,
    list: DenyList,
    engine: Engine,
    mut stop: watch::Receiver<bool>,
) {
    let owner = format!("deny-list:{}", path.display());
    let mut last = stamp(&path);
    // Hosts denied when the coordinator starts lose their leases too.
    let mut pending_hosts: BTreeSet<String> =
        identity::newly_denied_hosts(&BTreeSet::new(), &list.current())
            .into_iter()
            .collect();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(POLL) => {}
        }
        let now = stamp(&path);
        if now != last {
            last = now;
            match load(&path) {
                Ok(new) => {
                    let old = list.replace(new.clone());
                    let hosts = identity::newly_denied_hosts(&old, &new);
                    tracing::warn!(file = %path.display(), entries = new.len(), newly_denied_hosts = ?hosts, "deny list reloaded");
                    pending_hosts.extend(hosts);
                }
                Err(e) => {
                    tracing::error!(error = %e, "deny list not reloaded; the list last loaded stays in force");
                }
            }
        }
        // Leases granted to a denied host (including any that raced the reload) are revoked;
        // a host stays pending while it is denied.
        pending_hosts.retain(|h| list.refusal(&Identity::Host(h.clone())).is_some());
        let snap = engine.snapshot();
        if !snap.leader {
            continue;
        }
        for (host, lease_id) in leases_of(&snap.view, &pending_hosts) {
            let reason = format!("host:{host} is on the deny list");
            match engine
                .revoke_as(lease_id.clone(), reason, owner.clone())
                .await
            {
                Ok(()) => tracing::warn!(host, lease_id, "lease of a denied host revoked"),
                Err(e) => {
                    tracing::warn!(host, lease_id, error = %e, "cannot revoke yet; retrying")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        admission::UnixMillis,
        view::{LeaseEntry, LeaseRecord},
    };

    fn lease(id: &str, host: &str) -> (String, LeaseEntry) {
        (
            id.to_owned(),
            LeaseEntry {
                record: LeaseRecord {
                    lease_id: id.to_owned(),
                    host: host.to_owned(),
                    class: "c".into(),
                    service: "s".into(),
                    target: "/t".into(),
                    slot: 0,
                    granted_at: UnixMillis(0),
                    ttl_ms: 1000,
                    verification_window_ms: 1000,
                    approver: None,
                },
                token: 1,
                store_lease: 1,
            },
        )
    }

    #[test]
    fn only_the_denied_hosts_leases_are_chosen() {
        let view = View {
            leases: [
                lease("l1", "web-1"),
                lease("l2", "web-2"),
                lease("l3", "web-1"),
            ]
            .into_iter()
            .collect(),
            ..View::default()
        };
        let denied: BTreeSet<String> = ["web-1".to_owned()].into();
        let mut got = leases_of(&view, &denied);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("web-1".to_owned(), "l1".to_owned()),
                ("web-1".to_owned(), "l3".to_owned())
            ]
        );
        assert!(leases_of(&view, &BTreeSet::new()).is_empty());
    }
}
