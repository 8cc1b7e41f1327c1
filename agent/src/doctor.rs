//! `interlock-agent doctor`: what this host offers the agent (kernel, BTF, tracefs, bpffs,
//! cgroup mode, PSI), whether each probe loads (and why not), and whether the configured
//! coordinator answers. Read-only: it loads and immediately drops the probes.
//!
//! It gathers facts into a [`DoctorReport`] and renders it as text or JSON; it holds no
//! decisions beyond "ok or not".

use std::path::Path;

use interlock_proto::v1 as pb;
use interlock_proto::v1::coordinator_client::CoordinatorClient;
use serde_json::{Value, json};

use crate::pressure::{PsiResource, detect_layout, disk::parse_mountinfo, read_system_psi};
use crate::probes::{ProbeOptions, ProbeSet};
use crate::report::connect;

/// One checked fact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// The value found, or what is wrong and what to change.
    pub detail: String,
}

impl Check {
    fn new(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok,
            detail: detail.into(),
        }
    }
}

/// Everything `doctor` found.
#[derive(Clone, Debug, Default)]
pub struct DoctorReport {
    pub checks: Vec<Check>,
}

impl DoctorReport {
    /// True when every check passed.
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!(
                "{:<4} {:<24} {}\n",
                if c.ok { "ok" } else { "FAIL" },
                c.name,
                c.detail
            ));
        }
        out
    }

    pub fn to_json(&self) -> Value {
        json!({
            "ok": self.ok(),
            "checks": self.checks.iter().map(|c| json!({
                "name": c.name, "ok": c.ok, "detail": c.detail,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Inspects the host; with `coordinators`, also pings each replica.
pub async fn diagnose(
    coordinators: &[String],
    tls: Option<&interlock_proto::tls::TlsFiles>,
) -> DoctorReport {
    let mut checks = Vec::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned());
    checks.push(match kernel {
        Ok(k) => Check::new("kernel", true, k),
        Err(e) => Check::new(
            "kernel",
            false,
            format!("cannot read /proc/sys/kernel/osrelease: {e}"),
        ),
    });
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    checks.push(Check::new(
        "btf",
        btf,
        if btf {
            "/sys/kernel/btf/vmlinux present"
        } else {
            "/sys/kernel/btf/vmlinux missing; use a kernel built with CONFIG_DEBUG_INFO_BTF=y"
        },
    ));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|t| parse_mountinfo(&t).ok())
        .unwrap_or_default();
    for (name, fs, fix) in [
        (
            "tracefs",
            "tracefs",
            "mount -t tracefs tracefs /sys/kernel/tracing",
        ),
        ("bpffs", "bpf", "mount -t bpf bpf /sys/fs/bpf"),
    ] {
        let at = mounts
            .iter()
            .find(|m| m.fs_type == fs)
            .map(|m| m.mount_point.display().to_string());
        checks.push(match at {
            Some(at) => Check::new(name, true, format!("mounted at {at}")),
            None => Check::new(name, false, format!("not mounted; {fix}")),
        });
    }
    let layout = detect_layout(Path::new("/proc/self/mountinfo"));
    match &layout {
        Ok(l) => checks.push(Check::new("cgroup", true, l.mode.to_string())),
        Err(e) => checks.push(Check::new("cgroup", false, e.to_string())),
    }
    for resource in PsiResource::ALL {
        let name = format!("psi.{}", resource.file_stem());
        checks.push(match read_system_psi(resource) {
            Ok(psi) => Check::new(name, true, format!("some avg10 {:.2}%", psi.some.avg10)),
            Err(e) => Check::new(name, false, e.to_string()),
        });
    }
    if let Ok(l) = &layout {
        let check = match &l.v2_root {
            Some(root) => {
                let file = root.join(PsiResource::Memory.cgroup_file());
                if file.exists() {
                    Check::new("psi.cgroup", true, format!("{} readable", file.display()))
                } else {
                    Check::new(
                        "psi.cgroup",
                        false,
                        format!(
                            "{} missing; boot with psi=1 on a cgroup v2 tree",
                            file.display()
                        ),
                    )
                }
            }
            None => Check::new(
                "psi.cgroup",
                false,
                "no cgroup v2 tree, so no per-cgroup PSI; mount cgroup2",
            ),
        };
        checks.push(check);
    }
    for (name, options) in [
        (
            "probe.tcp",
            ProbeOptions {
                tcp_state: true,
                ..ProbeOptions::none()
            },
        ),
        (
            "probe.process",
            ProbeOptions {
                process: true,
                ..ProbeOptions::none()
            },
        ),
        (
            "probe.flows",
            ProbeOptions {
                flows: true,
                ..ProbeOptions::none()
            },
        ),
        (
            "probe.tcp_close",
            ProbeOptions {
                tcp_close: true,
                ..ProbeOptions::none()
            },
        ),
    ] {
        checks.push(match ProbeSet::load(&options) {
            Ok(set) => Check::new(name, true, format!("loads: {}", set.programs().join(", "))),
            Err(e) => Check::new(name, false, e.to_string()),
        });
    }
    let tls_config = match tls.map(|f| f.client_config()).transpose() {
        Ok(c) => c,
        Err(e) => {
            checks.push(Check::new("tls", false, e.to_string()));
            None
        }
    };
    for url in coordinators {
        let name = format!("coordinator {url}");
        let check = match connect(url, tls_config.as_ref()).await {
            Err(e) => Check::new(name, false, format!("unreachable: {e}")),
            Ok(channel) => {
                let reply = CoordinatorClient::new(channel)
                    .ping(pb::PingRequest {
                        caller: "interlock-agent doctor".to_owned(),
                    })
                    .await;
                match reply {
                    Ok(r) => {
                        let r = r.into_inner();
                        Check::new(
                            name,
                            true,
                            format!(
                                "answers: version {}, store {}, {}",
                                r.version,
                                r.store,
                                if r.leader {
                                    "leader".to_owned()
                                } else {
                                    format!("follower (leader {})", r.leader_addr)
                                }
                            ),
                        )
                    }
                    Err(s) => Check::new(name, false, format!("ping failed: {}", s.message())),
                }
            }
        };
        checks.push(check);
    }
    DoctorReport { checks }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_renders_and_summarises() {
        let r = DoctorReport {
            checks: vec![
                Check::new("btf", true, "present"),
                Check::new("bpffs", false, "not mounted"),
            ],
        };
        assert!(!r.ok());
        assert!(r.to_text().contains("FAIL bpffs"));
        assert_eq!(r.to_json()["checks"][0]["name"], "btf");
    }
}
