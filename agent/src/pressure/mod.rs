//! Resource pressure: PSI (system-wide and per cgroup, readings and low-latency triggers),
//! memory (`/proc/meminfo`, per-process RSS), disk space and inodes per mount, and cgroup
//! memory usage against its limit on cgroup v1, v2 and hybrid hosts.
//!
//! This is the only agent module that reads procfs or sysfs for pressure. Each file pairs pure
//! parsers (text in, values out; unit-tested on text copied from a real kernel 6.18 host) with a
//! thin reader that does the I/O. Detectors never call these readers directly: they get the
//! values through the [`PressureSource`] port ([`HostPressure`] on a real host, [`FakePressure`]
//! in unit tests), so they stay free of I/O. This module must not import `aya` (that is
//! `probes`), nor anything from `detect`.
//!
//! A reader error names the file that failed and what to change; a process or mount that
//! vanishes between listing and reading is not an error (it reads as `None` or as a skipped
//! mount), because on a busy host that is the normal case.

pub mod cgroup;
pub mod disk;
pub mod memory;
pub mod psi;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use cgroup::{
    CgroupLayout, CgroupMemory, CgroupMode, MemoryLimit, ProcessCgroups, detect_layout,
    read_cgroup_memory, read_process_cgroups,
};
pub use disk::{DiskReport, DiskUsage, FsStats, MountEntry, MountFilter, SkippedMount, read_disks};
pub use memory::{MemInfo, Pid, ProcStat, read_meminfo, read_proc_stat, read_process_rss};
pub use psi::{
    Psi, PsiEvent, PsiLine, PsiResource, PsiTrigger, PsiTriggerSpec, StallKind, read_cgroup_psi,
    read_system_psi,
};

/// A parser's complaint about text that does not have the kernel's shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// 1-based line number in the parsed text (0 when the text as a whole is wrong).
    pub line: usize,
    /// What was expected there.
    pub message: String,
}

impl ParseError {
    pub(crate) fn new(line: usize, message: impl Into<String>) -> Self {
        Self {
            line,
            message: message.into(),
        }
    }
}

/// Everything that can go wrong reading pressure from the host.
#[derive(Debug, thiserror::Error)]
pub enum PressureError {
    /// A procfs/sysfs file could not be read.
    #[error(
        "cannot read {path}: {source}; check that procfs/sysfs are mounted and the agent runs as root"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file was read but its text did not have the expected shape.
    #[error(
        "unexpected content in {path}: {source}; this kernel's format is not supported, report it with the file's content"
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        source: ParseError,
    },
    /// PSI is not available (kernel built without `CONFIG_PSI` or booted with `psi=0`).
    #[error("PSI is not available at {path}; boot the kernel with psi=1 (CONFIG_PSI=y)")]
    PsiUnavailable {
        /// The missing pressure file.
        path: PathBuf,
    },
    /// A trigger specification the kernel would refuse.
    #[error("invalid PSI trigger: {0}")]
    InvalidTrigger(String),
    /// The kernel refused a trigger.
    #[error("the kernel refused PSI trigger {spec:?} on {path}: {source}; {hint}")]
    Trigger {
        /// The pressure file.
        path: PathBuf,
        /// The trigger text written.
        spec: String,
        /// The OS error.
        source: std::io::Error,
        /// What to change.
        hint: &'static str,
    },
    /// The trigger's cgroup was removed; the trigger will never fire again.
    #[error("PSI trigger on {path} is gone (its cgroup was removed); create a new trigger")]
    TriggerGone {
        /// The pressure file.
        path: PathBuf,
    },
    /// No cgroup filesystem is mounted.
    #[error(
        "no cgroup filesystem is mounted (looked in {mountinfo}); mount cgroup2 at /sys/fs/cgroup"
    )]
    NoCgroupFs {
        /// The mountinfo file that was read.
        mountinfo: PathBuf,
    },
    /// The memory accounting the caller asked for does not exist on this host.
    #[error("no memory controller for cgroup {cgroup:?}: {why}")]
    NoMemoryController {
        /// The cgroup path (relative to its hierarchy root).
        cgroup: String,
        /// Why, and what to change.
        why: &'static str,
    },
}

impl PressureError {
    pub(crate) fn read(path: &Path, source: std::io::Error) -> Self {
        Self::Read {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn parse(path: &Path, source: ParseError) -> Self {
        Self::Parse {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Reads a whole procfs/sysfs file into a string, naming the path on error.
pub(crate) fn read_text(path: &Path) -> Result<String, PressureError> {
    std::fs::read_to_string(path).map_err(|e| PressureError::read(path, e))
}

/// The port through which detectors get pressure readings. One call, one fresh reading.
pub trait PressureSource {
    /// System-wide PSI for one resource (`/proc/pressure/<resource>`).
    fn system_psi(&self, resource: PsiResource) -> Result<Psi, PressureError>;
    /// PSI of one cgroup v2 directory (path relative to the v2 hierarchy root, `/` = root).
    fn cgroup_psi(&self, cgroup: &str, resource: PsiResource) -> Result<Psi, PressureError>;
    /// `/proc/meminfo`.
    fn meminfo(&self) -> Result<MemInfo, PressureError>;
    /// Resident set size of a process in bytes; `None` once the process is gone.
    fn process_rss(&self, pid: Pid) -> Result<Option<u64>, PressureError>;
    /// Space and inodes of every real (non-pseudo) filesystem.
    fn disks(&self) -> Result<DiskReport, PressureError>;
    /// Memory usage against limit of one cgroup (path relative to the hierarchy that has the
    /// memory controller: v2 on pure v2 hosts, the v1 `memory` hierarchy otherwise).
    fn cgroup_memory(&self, cgroup: &str) -> Result<CgroupMemory, PressureError>;
}

/// The real host: procfs at `/proc`, cgroups where `/proc/self/mountinfo` says they are.
#[derive(Debug, Clone)]
pub struct HostPressure {
    proc_root: PathBuf,
    layout: CgroupLayout,
    filter: MountFilter,
}

impl HostPressure {
    /// Detects the cgroup layout from `/proc/self/mountinfo`. The caller logs
    /// [`CgroupLayout::mode`] once at start-up (`tracing::info!` does it here too).
    pub fn detect() -> Result<Self, PressureError> {
        let proc_root = PathBuf::from("/proc");
        let layout = detect_layout(&proc_root.join("self/mountinfo"))?;
        tracing::info!(mode = %layout.mode, "pressure: cgroup layout detected");
        Ok(Self {
            proc_root,
            layout,
            filter: MountFilter::default(),
        })
    }

    /// The cgroup layout found at start-up.
    pub fn layout(&self) -> &CgroupLayout {
        &self.layout
    }

    /// Sets which mounts [`PressureSource::disks`] reports.
    pub fn with_mount_filter(mut self, filter: MountFilter) -> Self {
        self.filter = filter;
        self
    }
}

impl PressureSource for HostPressure {
    fn system_psi(&self, resource: PsiResource) -> Result<Psi, PressureError> {
        psi::read_psi_file(&self.proc_root.join("pressure").join(resource.file_stem()))
    }

    fn cgroup_psi(&self, cgroup: &str, resource: PsiResource) -> Result<Psi, PressureError> {
        let Some(v2) = &self.layout.v2_root else {
            return Err(PressureError::PsiUnavailable {
                path: PathBuf::from(format!("<cgroup2>/{cgroup}")),
            });
        };
        read_cgroup_psi(&cgroup::join_cgroup(v2, cgroup), resource)
    }

    fn meminfo(&self) -> Result<MemInfo, PressureError> {
        read_meminfo(&self.proc_root.join("meminfo"))
    }

    fn process_rss(&self, pid: Pid) -> Result<Option<u64>, PressureError> {
        memory::read_process_rss_at(&self.proc_root, pid)
    }

    fn disks(&self) -> Result<DiskReport, PressureError> {
        read_disks(&self.proc_root.join("self/mountinfo"), self.filter)
    }

    fn cgroup_memory(&self, cgroup: &str) -> Result<CgroupMemory, PressureError> {
        read_cgroup_memory(&self.layout, cgroup)
    }
}

/// An in-memory [`PressureSource`] for unit tests of detectors: set the fields, read them back.
/// A missing entry reads as the error or `None` the real host would give.
#[derive(Debug, Clone, Default)]
pub struct FakePressure {
    /// System-wide PSI per resource.
    pub system: BTreeMap<PsiResource, Psi>,
    /// Per-cgroup PSI, keyed by (cgroup path, resource).
    pub cgroups: BTreeMap<(String, PsiResource), Psi>,
    /// `/proc/meminfo`.
    pub meminfo: Option<MemInfo>,
    /// RSS per live process.
    pub rss: BTreeMap<Pid, u64>,
    /// Disk usage report.
    pub disks: DiskReport,
    /// Memory per cgroup.
    pub cgroup_memory: BTreeMap<String, CgroupMemory>,
}

impl FakePressure {
    fn missing(what: &str) -> PressureError {
        PressureError::Read {
            path: PathBuf::from(format!("<fake>/{what}")),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }
    }
}

impl PressureSource for FakePressure {
    fn system_psi(&self, resource: PsiResource) -> Result<Psi, PressureError> {
        self.system
            .get(&resource)
            .copied()
            .ok_or_else(|| Self::missing(resource.file_stem()))
    }

    fn cgroup_psi(&self, cgroup: &str, resource: PsiResource) -> Result<Psi, PressureError> {
        self.cgroups
            .get(&(cgroup.to_owned(), resource))
            .copied()
            .ok_or_else(|| Self::missing(cgroup))
    }

    fn meminfo(&self) -> Result<MemInfo, PressureError> {
        self.meminfo.ok_or_else(|| Self::missing("meminfo"))
    }

    fn process_rss(&self, pid: Pid) -> Result<Option<u64>, PressureError> {
        Ok(self.rss.get(&pid).copied())
    }

    fn disks(&self) -> Result<DiskReport, PressureError> {
        Ok(self.disks.clone())
    }

    fn cgroup_memory(&self, cgroup: &str) -> Result<CgroupMemory, PressureError> {
        self.cgroup_memory
            .get(cgroup)
            .copied()
            .ok_or_else(|| Self::missing(cgroup))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_reads_back_what_was_set_and_none_for_gone_processes() {
        let mut fake = FakePressure::default();
        fake.rss.insert(Pid(42), 1 << 20);
        assert_eq!(fake.process_rss(Pid(42)).unwrap(), Some(1 << 20));
        assert_eq!(fake.process_rss(Pid(43)).unwrap(), None);
        assert!(fake.meminfo().is_err());
        assert!(fake.system_psi(PsiResource::Memory).is_err());
    }
}
