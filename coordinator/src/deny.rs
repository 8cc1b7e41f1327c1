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

    fn replace(&self, new: BTreeSet<String>) -> BTreeSet<String> {
        let mut set = self.inner.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *set, new)
    }
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
    let mut pending_hosts: Vec<String> = Vec::new();
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
        // a host stays in `pending_hosts` while it is denied and holds leases.
        pending_hosts.retain(|h| list.refusal(&Identity::Host(h.clone())).is_some());
        for host in &pending_hosts {
            let snap = engine.snapshot();
            if !snap.leader {
                continue;
            }
            let leases: Vec<String> = snap
                .view
                .leases
                .values()
                .filter(|l| &l.record.host == host)
                .map(|l| l.record.lease_id.clone())
                .collect();
            for lease_id in leases {
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
}
