//! Space and inodes per mounted filesystem: the mount table from `/proc/self/mountinfo`
//! (format in `Documentation/filesystems/proc.rst`, written by `fs/proc_namespace.c`), pseudo
//! filesystems skipped, then `statvfs(2)` on each mount point.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::memory::ratio;
use super::{ParseError, PressureError, read_text};

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Unique mount id.
    pub mount_id: u32,
    /// Id of the parent mount.
    pub parent_id: u32,
    /// `major:minor` of the device.
    pub device: String,
    /// Root of the mount within its filesystem.
    pub root: PathBuf,
    /// Where it is mounted (octal escapes such as `\040` decoded).
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,relatime`).
    pub mount_options: String,
    /// Filesystem type (`ext4`, `tmpfs`, `cgroup2`, …).
    pub fs_type: String,
    /// Mount source (`/dev/vda`, `tmpfs`, …).
    pub source: String,
    /// Per-superblock options (`rw,memory` for a v1 memory cgroup hierarchy).
    pub super_options: String,
}

impl MountEntry {
    /// Whether the superblock options contain `option` exactly (`memory` in `rw,memory`).
    pub fn has_super_option(&self, option: &str) -> bool {
        self.super_options.split(',').any(|o| o == option)
    }
}

/// Decodes the kernel's octal escapes of space, tab, newline and backslash (`\040` …).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = u32::from(bytes[i + 1] - b'0') * 64
                + u32::from(bytes[i + 2] - b'0') * 8
                + u32::from(bytes[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mountinfo`.
pub fn parse_mountinfo(text: &str) -> Result<Vec<MountEntry>, ParseError> {
    let mut mounts = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            return Err(ParseError::new(line_no, "no ` - ` separator"));
        };
        if dash < 6 || fields.len() < dash + 4 {
            return Err(ParseError::new(
                line_no,
                "expected 6 fields before ` - ` and 3 after",
            ));
        }
        let id = |i: usize, what: &str| {
            fields[i]
                .parse::<u32>()
                .map_err(|_| ParseError::new(line_no, format!("bad {what} {:?}", fields[i])))
        };
        mounts.push(MountEntry {
            mount_id: id(0, "mount id")?,
            parent_id: id(1, "parent id")?,
            device: fields[2].to_owned(),
            root: PathBuf::from(unescape(fields[3])),
            mount_point: PathBuf::from(unescape(fields[4])),
            mount_options: fields[5].to_owned(),
            fs_type: fields[dash + 1].to_owned(),
            source: unescape(fields[dash + 2]),
            super_options: fields[dash + 3].to_owned(),
        });
    }
    Ok(mounts)
}

/// Filesystems that hold no user data: their space and inodes mean nothing to an operator.
const PSEUDO_FILESYSTEMS: &[&str] = &[
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "bpf",
    "tracefs",
    "debugfs",
    "devpts",
    "mqueue",
    "securityfs",
    "pstore",
    "configfs",
    "fusectl",
    "hugetlbfs",
    "nsfs",
    "autofs",
    "binfmt_misc",
    "efivarfs",
    "rpc_pipefs",
    "selinuxfs",
];

/// Which mounts the disk reader reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MountFilter {
    /// Report overlay mounts (container root filesystems). Their space is the upper layer's
    /// filesystem, usually reported already, so the default leaves them out.
    pub include_overlay: bool,
}

impl MountFilter {
    /// Whether a mount is worth a `statvfs`.
    pub fn wants(&self, mount: &MountEntry) -> bool {
        let fs = mount.fs_type.as_str();
        if PSEUDO_FILESYSTEMS.contains(&fs) || fs.starts_with("cgroup") {
            return false;
        }
        if fs == "overlay" {
            return self.include_overlay;
        }
        true
    }

    /// The mounts to measure: filtered, and for a mount point mounted over more than once only
    /// the last (visible) one, in mount-point order.
    pub fn select<'a>(&self, mounts: &'a [MountEntry]) -> Vec<&'a MountEntry> {
        let mut visible: BTreeMap<&Path, &MountEntry> = BTreeMap::new();
        for mount in mounts {
            visible.insert(&mount.mount_point, mount);
        }
        visible.into_values().filter(|m| self.wants(m)).collect()
    }
}

/// The numbers of one `statvfs(2)` call, as the kernel gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    /// `f_frsize`: the unit of the block counts.
    pub fragment_size: u64,
    /// `f_blocks`.
    pub blocks: u64,
    /// `f_bfree`: free blocks, including those reserved for root.
    pub blocks_free: u64,
    /// `f_bavail`: free blocks for unprivileged users.
    pub blocks_available: u64,
    /// `f_files`: total inodes (0 for filesystems without an inode limit).
    pub files: u64,
    /// `f_ffree`: free inodes.
    pub files_free: u64,
}

/// Space and inodes of one mount, in bytes and counts.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskUsage {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Filesystem type.
    pub fs_type: String,
    /// Mount source.
    pub source: String,
    /// Size of the filesystem.
    pub total_bytes: u64,
    /// Bytes in use (total minus free, reserved blocks not counted as used).
    pub used_bytes: u64,
    /// Bytes an unprivileged user can still write.
    pub avail_bytes: u64,
    /// Total inodes (0 when the filesystem has no fixed inode table).
    pub total_inodes: u64,
    /// Inodes in use.
    pub used_inodes: u64,
    /// Free inodes.
    pub free_inodes: u64,
}

impl DiskUsage {
    /// Builds the usage of `mount` from its `statvfs` numbers.
    pub fn from_stats(mount: &MountEntry, stats: FsStats) -> Self {
        let FsStats {
            fragment_size,
            blocks,
            blocks_free,
            blocks_available,
            files,
            files_free,
        } = stats;
        Self {
            mount_point: mount.mount_point.clone(),
            fs_type: mount.fs_type.clone(),
            source: mount.source.clone(),
            total_bytes: blocks.saturating_mul(fragment_size),
            used_bytes: blocks
                .saturating_sub(blocks_free)
                .saturating_mul(fragment_size),
            avail_bytes: blocks_available.saturating_mul(fragment_size),
            total_inodes: files,
            used_inodes: files.saturating_sub(files_free),
            free_inodes: files_free,
        }
    }

    /// Used share of the space a user can have, as `df` computes it: used / (used + avail).
    /// Blocks reserved for root count neither way, so a full disk reads 1.0 even with a reserve.
    pub fn used_ratio(&self) -> f64 {
        ratio(
            self.used_bytes,
            self.used_bytes.saturating_add(self.avail_bytes),
        )
    }

    /// Used share of the inodes; `None` when the filesystem has no inode limit (`f_files` 0).
    pub fn inode_used_ratio(&self) -> Option<f64> {
        (self.total_inodes > 0).then(|| ratio(self.used_inodes, self.total_inodes))
    }
}

/// A mount the reader could not measure, and why. Not an error: mounts come and go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedMount {
    /// Where it was mounted.
    pub mount_point: PathBuf,
    /// The `statvfs` error (ENOENT when it vanished, EACCES when unreadable, …).
    pub reason: String,
}

/// The result of one pass over the mount table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiskReport {
    /// Measured mounts, in mount-point order.
    pub disks: Vec<DiskUsage>,
    /// Mounts that could not be measured this time.
    pub skipped: Vec<SkippedMount>,
}

impl DiskReport {
    /// The usage of the mount at `mount_point`, if it was measured.
    pub fn get(&self, mount_point: &Path) -> Option<&DiskUsage> {
        self.disks.iter().find(|d| d.mount_point == mount_point)
    }
}

/// `statvfs(2)` of one path.
pub fn statvfs(path: &Path) -> Result<FsStats, nix::Error> {
    let stat = nix::sys::statvfs::statvfs(path)?;
    Ok(FsStats {
        fragment_size: stat.fragment_size(),
        blocks: stat.blocks(),
        blocks_free: stat.blocks_free(),
        blocks_available: stat.blocks_available(),
        files: stat.files(),
        files_free: stat.files_free(),
    })
}

/// Reads the mount table at `mountinfo` and measures every mount `filter` wants.
pub fn read_disks(mountinfo: &Path, filter: MountFilter) -> Result<DiskReport, PressureError> {
    let mounts =
        parse_mountinfo(&read_text(mountinfo)?).map_err(|e| PressureError::parse(mountinfo, e))?;
    let mut report = DiskReport::default();
    for mount in filter.select(&mounts) {
        match statvfs(&mount.mount_point) {
            Ok(stats) => report.disks.push(DiskUsage::from_stats(mount, stats)),
            Err(errno) => report.skipped.push(SkippedMount {
                mount_point: mount.mount_point.clone(),
                reason: errno.desc().to_owned(),
            }),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/self/mountinfo` on the kernel 6.18 test machine (hybrid cgroups), plus a mount
    /// point with a space and an overlay.
    const MOUNTINFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=12334524k,nr_inodes=3083631,mode=755
25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24684096k
26 24 0:24 / /dev/pts rw,relatime - devpts devpts rw,mode=600,ptmxmode=000
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard,resv_strict,resuid=65534,resgid=65534
29 26 0:26 / /dev/pts rw,relatime - devpts devpts rw,mode=600,ptmxmode=000
30 25 0:27 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24684096k
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 23 0:13 / /sys/kernel/tracing rw,relatime - tracefs tracefs rw
43 23 0:39 / /sys/fs/bpf rw,relatime - bpf bpf rw
50 27 0:40 / /srv/my\\040data rw,relatime shared:7 master:2 - xfs /dev/vdb1 rw
51 27 0:41 / /var/lib/docker/overlay2/x/merged rw - overlay overlay rw,lowerdir=/a
";

    #[test]
    fn parses_fields_optional_tags_and_escapes() {
        let mounts = parse_mountinfo(MOUNTINFO).unwrap();
        assert_eq!(mounts.len(), 15);
        let root = &mounts[5];
        assert_eq!(root.mount_id, 27);
        assert_eq!(root.parent_id, 1);
        assert_eq!(root.device, "254:0");
        assert_eq!(root.mount_point, Path::new("/"));
        assert_eq!(root.fs_type, "ext4");
        assert_eq!(root.source, "/dev/vda");
        let memory = &mounts[9];
        assert!(memory.has_super_option("memory"));
        assert!(!memory.has_super_option("mem"));
        let spaced = &mounts[13];
        assert_eq!(spaced.mount_point, Path::new("/srv/my data"));
        assert_eq!(spaced.fs_type, "xfs");
        assert_eq!(spaced.mount_options, "rw,relatime");
    }

    #[test]
    fn rejects_lines_without_separator() {
        let err = parse_mountinfo("22 27 0:21 / /proc rw proc proc rw\n").unwrap_err();
        assert_eq!(err.line, 1);
        let err = parse_mountinfo("x 27 0:21 / /proc rw - proc proc rw\n").unwrap_err();
        assert!(err.message.contains("mount id"), "{err}");
    }

    #[test]
    fn selects_real_filesystems_once_per_mount_point() {
        let mounts = parse_mountinfo(MOUNTINFO).unwrap();
        let pick = |filter: MountFilter| -> Vec<String> {
            filter
                .select(&mounts)
                .iter()
                .map(|m| format!("{}:{}", m.mount_point.display(), m.mount_id))
                .collect()
        };
        assert_eq!(
            pick(MountFilter::default()),
            [
                "/:27",
                "/dev:24",
                "/dev/shm:30",
                "/srv/my data:50",
                "/sys/fs/cgroup:31"
            ]
        );
        let with_overlay = pick(MountFilter {
            include_overlay: true,
        });
        assert!(with_overlay.contains(&"/var/lib/docker/overlay2/x/merged:51".to_owned()));
    }

    #[test]
    fn usage_matches_df_arithmetic() {
        let mount = &parse_mountinfo(MOUNTINFO).unwrap()[5];
        // A 16 MiB tmpfs with 15 MiB written: 4096-byte blocks, no reserve.
        let usage = DiskUsage::from_stats(
            mount,
            FsStats {
                fragment_size: 4096,
                blocks: 4096,
                blocks_free: 256,
                blocks_available: 256,
                files: 1000,
                files_free: 990,
            },
        );
        assert_eq!(usage.total_bytes, 16 << 20);
        assert_eq!(usage.used_bytes, 15 << 20);
        assert_eq!(usage.avail_bytes, 1 << 20);
        assert_eq!(usage.used_ratio(), 15.0 / 16.0);
        assert_eq!(usage.used_inodes, 10);
        assert_eq!(usage.inode_used_ratio(), Some(0.01));
        // ext4 with a 5% root reserve: used / (used + avail).
        let reserved = DiskUsage::from_stats(
            mount,
            FsStats {
                fragment_size: 4096,
                blocks: 100,
                blocks_free: 10,
                blocks_available: 5,
                files: 0,
                files_free: 0,
            },
        );
        assert_eq!(reserved.used_ratio(), 90.0 / 95.0);
        assert_eq!(reserved.inode_used_ratio(), None);
    }

    #[test]
    fn a_vanished_mount_is_skipped_not_an_error() {
        let dir = tempfile_dir();
        let mountinfo = dir.join("mountinfo");
        std::fs::write(
            &mountinfo,
            format!(
                "27 1 254:0 / / rw - ext4 /dev/vda rw\n90 27 0:99 / {}/gone rw - ext4 /dev/vdz rw\n",
                dir.display()
            ),
        )
        .unwrap();
        let report = read_disks(&mountinfo, MountFilter::default()).unwrap();
        assert!(report.get(Path::new("/")).is_some());
        assert_eq!(report.skipped.len(), 1);
        assert_eq!(report.skipped[0].mount_point, dir.join("gone"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("interlock-disk-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
