//! Cgroups: which layout the host uses (pure v2, hybrid, v1), where a process sits in each
//! hierarchy (`/proc/PID/cgroup`), and a cgroup's memory usage against its limit with its OOM
//! kill count, on v1 (`memory.usage_in_bytes`, `memory.limit_in_bytes`, `memory.oom_control`)
//! and v2 (`memory.current`, `memory.max`, `memory.events`).
//! Kernel: `Documentation/admin-guide/cgroup-v2.rst`, `Documentation/admin-guide/cgroup-v1/memory.rst`,
//! `mm/memcontrol.c`, `mm/memcontrol-v1.c`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::disk::{MountEntry, parse_mountinfo};
use super::memory::{Pid, ratio};
use super::{ParseError, PressureError, read_text};

/// How the host mounts its cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// Only cgroup2 (modern systemd hosts): memory, PSI and everything else in one tree.
    V2,
    /// v1 controllers (memory among them) plus a cgroup2 tree without controllers, which still
    /// has per-cgroup PSI.
    Hybrid,
    /// Only v1 controllers: no per-cgroup PSI.
    V1,
}

impl fmt::Display for CgroupMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V2 => "cgroup v2 (unified)",
            Self::Hybrid => "hybrid (cgroup v1 controllers + cgroup v2 tree)",
            Self::V1 => "cgroup v1 (legacy)",
        })
    }
}

/// Where the cgroup hierarchies are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLayout {
    /// The mode these mounts make up.
    pub mode: CgroupMode,
    /// The cgroup2 mount (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
    pub v2_root: Option<PathBuf>,
    /// v1 controller name (`memory`, `cpu`, `name=systemd`) to its hierarchy's mount point.
    pub v1_controllers: BTreeMap<String, PathBuf>,
}

/// Super options of a v1 cgroup mount that are not controller names.
fn is_v1_controller_option(option: &str) -> bool {
    !matches!(
        option,
        "rw" | "ro" | "noprefix" | "clone_children" | "xattr" | "cpuset_v2_mode" | "favordynmods"
    ) && !option.starts_with("release_agent=")
}

impl CgroupLayout {
    /// Derives the layout from the mount table. Prefers `/sys/fs/cgroup` when cgroup2 is
    /// mounted more than once.
    pub fn from_mounts(mounts: &[MountEntry]) -> Option<Self> {
        let mut v2_root: Option<PathBuf> = None;
        let mut v1_controllers = BTreeMap::new();
        for mount in mounts {
            match mount.fs_type.as_str() {
                "cgroup2" => {
                    let preferred = mount.mount_point == Path::new("/sys/fs/cgroup");
                    if v2_root.is_none() || preferred {
                        v2_root = Some(mount.mount_point.clone());
                    }
                }
                "cgroup" => {
                    for option in mount.super_options.split(',') {
                        if is_v1_controller_option(option) {
                            v1_controllers
                                .entry(option.to_owned())
                                .or_insert_with(|| mount.mount_point.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        let mode = match (v2_root.is_some(), v1_controllers.is_empty()) {
            (true, true) => CgroupMode::V2,
            (true, false) => CgroupMode::Hybrid,
            (false, false) => CgroupMode::V1,
            (false, true) => return None,
        };
        Some(Self {
            mode,
            v2_root,
            v1_controllers,
        })
    }

    /// The hierarchy that accounts memory: the v1 `memory` controller if mounted, else v2.
    pub fn memory_hierarchy(&self) -> Option<MemoryHierarchy> {
        if let Some(root) = self.v1_controllers.get("memory") {
            return Some(MemoryHierarchy::V1(root.clone()));
        }
        self.v2_root.clone().map(MemoryHierarchy::V2)
    }
}

/// The mount of the hierarchy that accounts memory, and its file names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryHierarchy {
    /// The v1 `memory` controller's mount.
    V1(PathBuf),
    /// The cgroup2 mount.
    V2(PathBuf),
}

/// Reads the mount table and derives the layout; logs nothing (the caller says which mode it
/// runs in, once).
pub fn detect_layout(mountinfo: &Path) -> Result<CgroupLayout, PressureError> {
    let mounts =
        parse_mountinfo(&read_text(mountinfo)?).map_err(|e| PressureError::parse(mountinfo, e))?;
    CgroupLayout::from_mounts(&mounts).ok_or_else(|| PressureError::NoCgroupFs {
        mountinfo: mountinfo.to_path_buf(),
    })
}

/// `root` joined with a cgroup path as the kernel prints it (`/a/b`, `/` for the root).
pub fn join_cgroup(root: &Path, cgroup: &str) -> PathBuf {
    let relative = cgroup.trim_start_matches('/');
    if relative.is_empty() {
        root.to_path_buf()
    } else {
        root.join(relative)
    }
}

/// A process's place in every hierarchy, from `/proc/PID/cgroup`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessCgroups {
    /// Path in the cgroup2 tree (the `0::/path` line).
    pub v2: Option<String>,
    /// v1 controller (`memory`, `name=systemd`, …) to the path in its hierarchy.
    pub v1: BTreeMap<String, String>,
}

/// Parses `/proc/PID/cgroup` (`hierarchy-id:controller-list:path` per line).
pub fn parse_proc_cgroup(text: &str) -> Result<ProcessCgroups, ParseError> {
    let mut cgroups = ProcessCgroups::default();
    for (index, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(ParseError::new(
                index + 1,
                "expected hierarchy-id:controllers:path",
            ));
        };
        // Paths may end in " (deleted)" when the cgroup was removed under the process.
        let path = path.to_owned();
        if id == "0" && controllers.is_empty() {
            cgroups.v2 = Some(path);
        } else {
            for controller in controllers.split(',').filter(|c| !c.is_empty()) {
                cgroups.v1.insert(controller.to_owned(), path.clone());
            }
        }
    }
    Ok(cgroups)
}

/// `/proc/PID/cgroup` of a process; `Ok(None)` when it is gone.
pub fn read_process_cgroups(pid: Pid) -> Result<Option<ProcessCgroups>, PressureError> {
    let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_proc_cgroup(&text)
            .map(Some)
            .map_err(|e| PressureError::parse(&path, e)),
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ESRCH) =>
        {
            Ok(None)
        }
        Err(e) => Err(PressureError::read(&path, e)),
    }
}

/// A cgroup's memory limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryLimit {
    /// No limit (`max` on v2, `PAGE_COUNTER_MAX` pages on v1).
    Unlimited,
    /// At most this many bytes.
    Bytes(u64),
}

/// v1 reports "no limit" as `PAGE_COUNTER_MAX * PAGE_SIZE` (9223372036854771712 with 4 KiB
/// pages; other page sizes round differently). No real limit comes near 2^62 bytes.
const V1_UNLIMITED_FLOOR: u64 = 1 << 62;

/// Parses a limit file: `max` (v2) or a byte count (v1 and v2).
pub fn parse_memory_limit(text: &str) -> Result<MemoryLimit, ParseError> {
    let value = text.trim();
    if value == "max" {
        return Ok(MemoryLimit::Unlimited);
    }
    let bytes = value.parse::<u64>().map_err(|_| {
        ParseError::new(
            1,
            format!("expected a byte count or `max`, found {value:?}"),
        )
    })?;
    Ok(if bytes >= V1_UNLIMITED_FLOOR {
        MemoryLimit::Unlimited
    } else {
        MemoryLimit::Bytes(bytes)
    })
}

/// Parses a single-number file (`memory.current`, `memory.usage_in_bytes`).
pub fn parse_bytes(text: &str) -> Result<u64, ParseError> {
    let value = text.trim();
    value
        .parse::<u64>()
        .map_err(|_| ParseError::new(1, format!("expected a byte count, found {value:?}")))
}

/// The value of `key` in a flat-keyed file (`memory.events`: `oom_kill 3`; v1
/// `memory.oom_control`: `oom_kill 3`); `None` when the key is absent (older kernels).
pub fn parse_flat_key(text: &str, key: &str) -> Result<Option<u64>, ParseError> {
    for (index, line) in text.lines().enumerate() {
        let mut parts = line.split_ascii_whitespace();
        if parts.next() == Some(key) {
            let value = parts.next().unwrap_or_default();
            return value.parse::<u64>().map(Some).map_err(|_| {
                ParseError::new(
                    index + 1,
                    format!("{key}: expected a number, found {value:?}"),
                )
            });
        }
    }
    Ok(None)
}

/// A cgroup's memory usage against its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupMemory {
    /// Bytes charged to the cgroup (page cache included).
    pub usage_bytes: u64,
    /// Its limit.
    pub limit: MemoryLimit,
    /// OOM kills inside the cgroup since it was created; `None` on kernels that do not count.
    pub oom_kills: Option<u64>,
}

impl CgroupMemory {
    /// usage / limit; `None` without a limit.
    pub fn usage_ratio(&self) -> Option<f64> {
        match self.limit {
            MemoryLimit::Unlimited => None,
            MemoryLimit::Bytes(limit) => Some(ratio(self.usage_bytes, limit)),
        }
    }
}

fn read_parsed<T>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, ParseError>,
) -> Result<T, PressureError> {
    parse(&read_text(path)?).map_err(|e| PressureError::parse(path, e))
}

/// Reads the memory of one cgroup directory of the given hierarchy kind.
pub fn read_memory_dir(dir: &Path, v1: bool) -> Result<CgroupMemory, PressureError> {
    let (usage, limit, events) = if v1 {
        (
            "memory.usage_in_bytes",
            "memory.limit_in_bytes",
            "memory.oom_control",
        )
    } else {
        ("memory.current", "memory.max", "memory.events")
    };
    Ok(CgroupMemory {
        usage_bytes: read_parsed(&dir.join(usage), parse_bytes)?,
        limit: read_parsed(&dir.join(limit), parse_memory_limit)?,
        oom_kills: read_parsed(&dir.join(events), |t| parse_flat_key(t, "oom_kill"))?,
    })
}

/// Memory usage, limit and OOM kills of `cgroup` (a path as `/proc/PID/cgroup` prints it) in
/// the hierarchy that accounts memory on this host.
pub fn read_cgroup_memory(
    layout: &CgroupLayout,
    cgroup: &str,
) -> Result<CgroupMemory, PressureError> {
    match layout.memory_hierarchy() {
        Some(MemoryHierarchy::V1(root)) => read_memory_dir(&join_cgroup(&root, cgroup), true),
        Some(MemoryHierarchy::V2(root)) => {
            if cgroup.trim_start_matches('/').is_empty() {
                // The v2 root has no memory.current/memory.max (cgroup-v2.rst).
                return Err(PressureError::NoMemoryController {
                    cgroup: cgroup.to_owned(),
                    why: "the cgroup v2 root has no memory.current; use /proc/meminfo for the host",
                });
            }
            let dir = join_cgroup(&root, cgroup);
            if !dir.join("memory.current").exists() && dir.exists() {
                return Err(PressureError::NoMemoryController {
                    cgroup: cgroup.to_owned(),
                    why: "memory is not enabled for it; add +memory to its parent's cgroup.subtree_control",
                });
            }
            read_memory_dir(&dir, false)
        }
        None => Err(PressureError::NoMemoryController {
            cgroup: cgroup.to_owned(),
            why: "neither a v1 memory hierarchy nor cgroup2 is mounted",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cgroup mounts of the kernel 6.18 test machine (hybrid).
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    /// A Debian 12 host with systemd: pure v2.
    const PURE_V2: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
33 23 0:28 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
    /// A legacy host: v1 only, cpu and cpuacct co-mounted.
    const PURE_V1: &str = "\
30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";

    fn layout(text: &str) -> Option<CgroupLayout> {
        CgroupLayout::from_mounts(&parse_mountinfo(text).unwrap())
    }

    #[test]
    fn detects_the_three_modes() {
        let hybrid = layout(HYBRID).unwrap();
        assert_eq!(hybrid.mode, CgroupMode::Hybrid);
        assert_eq!(
            hybrid.v2_root.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            hybrid.memory_hierarchy(),
            Some(MemoryHierarchy::V1("/sys/fs/cgroup/memory".into()))
        );
        assert!(hybrid.v1_controllers.contains_key("name=systemd"));

        let v2 = layout(PURE_V2).unwrap();
        assert_eq!(v2.mode, CgroupMode::V2);
        assert_eq!(
            v2.memory_hierarchy(),
            Some(MemoryHierarchy::V2("/sys/fs/cgroup".into()))
        );

        let v1 = layout(PURE_V1).unwrap();
        assert_eq!(v1.mode, CgroupMode::V1);
        assert_eq!(v1.v2_root, None);
        assert_eq!(
            v1.v1_controllers.get("cpuacct").map(PathBuf::as_path),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(layout("27 1 254:0 / / rw - ext4 /dev/vda rw\n"), None);
        assert_eq!(v1.mode.to_string(), "cgroup v1 (legacy)");
    }

    #[test]
    fn parses_proc_pid_cgroup_both_hierarchies() {
        // This machine's /proc/self/cgroup.
        let text = "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/250c3587f8a6e73657abaa697e293c38\n\
                    2:cpu,cpuacct:/a\n0::/\n";
        let cgroups = parse_proc_cgroup(text).unwrap();
        assert_eq!(cgroups.v2.as_deref(), Some("/"));
        assert_eq!(
            cgroups.v1.get("memory").map(String::as_str),
            Some("/process_api/250c3587f8a6e73657abaa697e293c38")
        );
        assert_eq!(cgroups.v1.get("cpuacct").map(String::as_str), Some("/a"));
        assert_eq!(
            cgroups.v1.get("name=systemd").map(String::as_str),
            Some("/")
        );
        let pure_v2 = parse_proc_cgroup("0::/system.slice/etcd.service\n").unwrap();
        assert_eq!(pure_v2.v2.as_deref(), Some("/system.slice/etcd.service"));
        assert!(pure_v2.v1.is_empty());
        assert!(parse_proc_cgroup("garbage\n").is_err());
    }

    #[test]
    fn parses_limits_usage_and_oom_counts() {
        assert_eq!(parse_memory_limit("max\n").unwrap(), MemoryLimit::Unlimited);
        assert_eq!(
            parse_memory_limit("9223372036854771712\n").unwrap(),
            MemoryLimit::Unlimited
        );
        assert_eq!(
            parse_memory_limit("67108864\n").unwrap(),
            MemoryLimit::Bytes(64 << 20)
        );
        assert!(parse_memory_limit("-1\n").is_err());
        assert_eq!(parse_bytes("1234\n").unwrap(), 1234);
        // v1 memory.oom_control on this machine.
        let oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        assert_eq!(parse_flat_key(oom_control, "oom_kill").unwrap(), Some(2));
        // v2 memory.events.
        let events = "low 0\nhigh 0\nmax 17\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_flat_key(events, "oom_kill").unwrap(), Some(1));
        assert_eq!(parse_flat_key(events, "oom_kill_disable").unwrap(), None);
        assert!(parse_flat_key("oom_kill x\n", "oom_kill").is_err());
    }

    #[test]
    fn usage_ratio_needs_a_limit() {
        let memory = CgroupMemory {
            usage_bytes: 48 << 20,
            limit: MemoryLimit::Bytes(64 << 20),
            oom_kills: Some(0),
        };
        assert_eq!(memory.usage_ratio(), Some(0.75));
        let unlimited = CgroupMemory {
            limit: MemoryLimit::Unlimited,
            ..memory
        };
        assert_eq!(unlimited.usage_ratio(), None);
        assert_eq!(
            join_cgroup(Path::new("/sys/fs/cgroup"), "/"),
            Path::new("/sys/fs/cgroup")
        );
        assert_eq!(
            join_cgroup(Path::new("/sys/fs/cgroup"), "/a/b"),
            Path::new("/sys/fs/cgroup/a/b")
        );
    }
}
