//! Resource pressure readers against real cgroups, mounts and processes (as root).
//!
//! Every test bounds its waits and cleans up what it creates through guards whose `Drop` runs
//! on panic too: children are killed by pid and reaped, cgroups removed, mounts unmounted.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use interlock_agent::pressure::{
    CgroupMode, MemoryLimit, MountFilter, Pid, PsiResource, PsiTrigger, PsiTriggerSpec, StallKind,
    detect_layout, disk, read_cgroup_memory, read_cgroup_psi, read_disks, read_meminfo,
    read_process_cgroups, read_process_rss, read_system_psi,
};
use interlock_tests::require_root;

const MIB: u64 = 1 << 20;
const MIB_USIZE: usize = 1 << 20;

/// A child process that is killed (by pid) and reaped when the guard drops, with its stdout
/// lines delivered on a channel so the test can wait for them with a deadline.
struct ChildGuard {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl ChildGuard {
    /// Runs a Python program that reads its go-ahead from stdin and reports on stdout.
    fn python(program: &str) -> Self {
        // Debian's python3, which setup installs (`setup --verify` proves where it came from).
        let python = "/usr/bin/python3";
        assert!(
            Path::new(python).exists(),
            "{python} is needed to make memory pressure; run `cargo xtask setup`"
        );
        let mut child = Command::new(python)
            .arg("-c")
            .arg(program)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python3");
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    fn pid(&self) -> Pid {
        Pid(self.child.id())
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").expect("write to child");
        stdin.flush().expect("flush child stdin");
    }

    fn expect_line(&self, want: &str, within: Duration) {
        match self.lines.recv_timeout(within) {
            Ok(line) => assert_eq!(line, want, "unexpected output from the child"),
            Err(e) => panic!("child did not print {want:?} within {within:?}: {e}"),
        }
    }

    /// Closes stdin (the programs exit on EOF) and reaps the child within `within`.
    fn finish(&mut self, within: Duration) {
        drop(self.stdin.take());
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.child.try_wait().expect("try_wait").is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("child {} did not exit within {within:?}", self.child.id());
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Kill by pid (no-op if it already exited) and reap, so cgroups can be removed.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cgroup directory the test created; removed on drop (after its processes are gone).
struct CgroupGuard(PathBuf);

impl CgroupGuard {
    fn create(path: PathBuf) -> Self {
        // A leftover from a killed earlier run would make mkdir fail; remove it first.
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        Self(path)
    }

    fn write(&self, file: &str, value: &str) {
        let path = self.0.join(file);
        std::fs::write(&path, value)
            .unwrap_or_else(|e| panic!("write {value:?} to {}: {e}", path.display()));
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        // rmdir fails with EBUSY until the last task has been reaped; retry for a bounded time.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.0).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A tmpfs mounted on a fresh temporary directory; unmounted on drop.
struct TmpfsGuard {
    mount_point: PathBuf,
    // Dropped after `drop` below has unmounted it.
    _dir: tempfile::TempDir,
}

impl TmpfsGuard {
    fn mount(options: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mount_point = dir.path().join("mnt");
        std::fs::create_dir(&mount_point).expect("create mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "interlock-test"])
            .arg(&mount_point)
            .status()
            .expect("run mount(8); install util-linux");
        assert!(status.success(), "mount -t tmpfs failed: {status}");
        Self {
            mount_point,
            _dir: dir,
        }
    }
}

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mount_point)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mount_point)
                .status();
        }
    }
}

/// `stat -f` (coreutils) of a path: an independent statvfs to compare the reader against.
fn stat_f(path: &Path) -> [u64; 6] {
    let out = Command::new("stat")
        .args(["-f", "-c", "%S %b %f %a %c %d"])
        .arg(path)
        .output()
        .expect("run stat(1)");
    assert!(out.status.success(), "stat -f failed");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let numbers: Vec<u64> = text
        .split_whitespace()
        .map(|n| n.parse().expect("number"))
        .collect();
    numbers.try_into().expect("six numbers")
}

#[test]
fn disk_reader_sees_a_nearly_full_tmpfs_as_statvfs_does() {
    require_root("mounting a tmpfs");
    let tmpfs = TmpfsGuard::mount("size=16m,nr_inodes=1000");
    // 15 MiB of real data (93.75 % of 16 MiB) plus a few small files to use inodes.
    let chunk = vec![0xa5_u8; MIB_USIZE];
    let mut big = std::fs::File::create(tmpfs.mount_point.join("fill")).expect("create fill");
    for _ in 0..15 {
        big.write_all(&chunk).expect("fill the tmpfs");
    }
    big.sync_all().expect("sync");
    for i in 0..9 {
        std::fs::write(tmpfs.mount_point.join(format!("small-{i}")), b"x").expect("small file");
    }

    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mounts = disk::parse_mountinfo(&mountinfo).expect("parse real mountinfo");
    let entry = mounts
        .iter()
        .find(|m| m.mount_point == tmpfs.mount_point)
        .expect("the test's tmpfs is in the parsed mountinfo");
    assert_eq!(entry.fs_type, "tmpfs");
    assert_eq!(entry.source, "interlock-test");

    let report =
        read_disks(Path::new("/proc/self/mountinfo"), MountFilter::default()).expect("read disks");
    let usage = report
        .get(&tmpfs.mount_point)
        .unwrap_or_else(|| panic!("tmpfs not in report: {report:#?}"));
    let [block, blocks, free, avail, files, files_free] = stat_f(&tmpfs.mount_point);
    assert_eq!(usage.total_bytes, blocks * block);
    assert_eq!(usage.total_bytes, 16 * MIB);
    assert_eq!(usage.used_bytes, (blocks - free) * block);
    assert_eq!(usage.avail_bytes, avail * block);
    let df_ratio = (blocks - free) as f64 / ((blocks - free) + avail) as f64;
    assert!((usage.used_ratio() - df_ratio).abs() < 1e-9);
    assert!(
        usage.used_ratio() > 0.90,
        "used ratio {} should be past 90 %",
        usage.used_ratio()
    );
    assert_eq!(usage.total_inodes, files);
    assert_eq!(usage.total_inodes, 1000);
    assert_eq!(usage.free_inodes, files_free);
    // The root directory, `fill` and nine small files.
    assert!(usage.used_inodes >= 11, "used inodes {}", usage.used_inodes);
    assert!(usage.inode_used_ratio().expect("tmpfs has an inode limit") > 0.0);
    // Pseudo filesystems are not reported.
    assert!(
        report
            .disks
            .iter()
            .all(|d| d.fs_type != "proc" && d.fs_type != "sysfs")
    );
    eprintln!(
        "tmpfs: {} of {} bytes used ({:.4}), {} of {} inodes",
        usage.used_bytes,
        usage.total_bytes,
        usage.used_ratio(),
        usage.used_inodes,
        usage.total_inodes
    );
}

/// Allocates 40 MiB of anonymous memory, then writes and re-reads a 96 MiB file through a
/// mapping: in a 64 MiB cgroup without swap, the file's pages are reclaimed and refault in a
/// loop, which the kernel counts as memory stall (workingset refaults, `mm/filemap.c`).
const THRASH: &str = r#"
import mmap, os, sys, time
sys.stdin.readline()
anon = bytearray(b"\x01") * (40 << 20)
with open(PATH, "wb") as f:
    for _ in range(96):
        f.write(os.urandom(1 << 20))
f = open(PATH, "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
print("thrashing", flush=True)
end = time.time() + 60
while time.time() < end:
    s = 0
    for off in range(0, len(m), 4096):
        s += m[off]
"#;

#[tokio::test]
async fn psi_trigger_fires_on_memory_pressure_in_a_test_cgroup() {
    require_root("creating cgroups and PSI triggers");
    let layout = detect_layout(Path::new("/proc/self/mountinfo")).expect("detect cgroups");
    eprintln!("cgroup mode: {}", layout.mode);
    let v2_root = layout
        .v2_root
        .clone()
        .expect("per-cgroup PSI needs cgroup2 mounted (pure v2 or hybrid)");

    // System-wide PSI parses for every resource.
    for resource in PsiResource::ALL {
        let psi = read_system_psi(resource).expect("system-wide PSI (boot with psi=1)");
        assert!(psi.some.avg10 >= 0.0 && psi.some.avg10 <= 100.0);
    }

    let limit = 64 * MIB;
    let name = format!("interlock-test-pressure-{}", std::process::id());
    let work = tempfile::tempdir().expect("temp dir");
    let thrash_file = work.path().join("thrash");

    // Guards drop in reverse order: the child first, then the cgroups.
    let v2 = CgroupGuard::create(v2_root.join(&name));
    let v1 = match layout.mode {
        CgroupMode::V2 => {
            // Pure v2: the limit lives on the same cgroup (the root must delegate memory).
            v2.write("memory.max", &limit.to_string());
            v2.write("memory.swap.max", "0");
            None
        }
        CgroupMode::Hybrid | CgroupMode::V1 => {
            let root = layout.v1_controllers.get("memory").expect(
                "hybrid host without a v1 memory hierarchy: mount it at /sys/fs/cgroup/memory",
            );
            let v1 = CgroupGuard::create(root.join(&name));
            v1.write("memory.limit_in_bytes", &limit.to_string());
            // Without swap accounting memory.memsw.* may be absent; swap is off here anyway.
            if v1.0.join("memory.memsw.limit_in_bytes").exists() {
                let _ = std::fs::write(v1.0.join("memory.memsw.limit_in_bytes"), limit.to_string());
            }
            Some(v1)
        }
    };

    let program = THRASH.replace("PATH", &format!("{:?}", thrash_file.display().to_string()));
    let mut child = ChildGuard::python(&program);
    let pid = child.pid();
    v2.write("cgroup.procs", &pid.to_string());
    if let Some(v1) = &v1 {
        v1.write("cgroup.procs", &pid.to_string());
    }
    let cgroups = read_process_cgroups(pid)
        .expect("read /proc/PID/cgroup")
        .expect("child is alive");
    assert_eq!(cgroups.v2.as_deref(), Some(format!("/{name}").as_str()));
    if v1.is_some() {
        assert_eq!(
            cgroups.v1.get("memory").map(String::as_str),
            Some(format!("/{name}").as_str())
        );
    }

    // 100 ms of stall in any 2 s window. Sub-2 s windows need CAP_SYS_RESOURCE, which root in
    // this machine's container does not have (the kernel answers EINVAL).
    let spec = PsiTriggerSpec {
        kind: StallKind::Some,
        stall: Duration::from_millis(100),
        window: Duration::from_secs(2),
    };
    let mut trigger =
        PsiTrigger::open(&v2.0.join("memory.pressure"), spec).expect("install PSI trigger");
    let started = Instant::now();
    child.send("go");
    let event = trigger
        .wait_for(Duration::from_secs(20))
        .await
        .expect("trigger error")
        .expect("PSI trigger on the cgroup's memory.pressure did not fire within 20 s");
    let latency = event.seen_at.duration_since(started);
    eprintln!("PSI trigger fired {latency:?} after the child started allocating");
    assert_eq!(event.sequence, 1);

    // The kernel rate-limits events to one per window; a second one follows while it thrashes.
    let second = trigger
        .wait_for(Duration::from_secs(10))
        .await
        .expect("trigger error")
        .expect("a second trigger event within 10 s");
    let gap = second.seen_at.duration_since(event.seen_at);
    eprintln!("second PSI event {gap:?} after the first");
    assert!(
        gap >= Duration::from_millis(1500),
        "events closer than the 2 s window: {gap:?}"
    );

    child.expect_line("thrashing", Duration::from_secs(20));
    let memory_cgroup = cgroups
        .v1
        .get("memory")
        .cloned()
        .or_else(|| cgroups.v2.clone())
        .expect("memory cgroup path");
    let memory = read_cgroup_memory(&layout, &memory_cgroup).expect("cgroup memory");
    eprintln!("cgroup memory: {memory:?}");
    assert_eq!(memory.limit, MemoryLimit::Bytes(limit));
    assert!(
        memory.usage_bytes >= limit * 9 / 10 && memory.usage_bytes <= limit,
        "usage {} should be close to the {limit}-byte limit",
        memory.usage_bytes
    );
    assert!(memory.oom_kills.is_some(), "this kernel counts oom_kill");

    let psi = read_cgroup_psi(&v2.0, PsiResource::Memory).expect("cgroup PSI");
    eprintln!("cgroup memory PSI: {psi:?}");
    assert!(
        psi.some.total > Duration::ZERO,
        "the cgroup recorded memory stall"
    );

    // The thrasher runs until killed: kill and reap it (by pid), then drop the trigger, then
    // the guards remove the cgroups.
    drop(child);
    drop(trigger);
}

/// Reports its baseline, then allocates and touches 50 MiB and reports again; exits on EOF.
const ALLOCATE_50_MIB: &str = r#"
import sys
print("base", flush=True)
sys.stdin.readline()
block = bytearray(b"\x01") * (50 << 20)
print("ready", flush=True)
sys.stdin.read()
"#;

#[test]
fn process_rss_follows_a_50_mib_allocation_and_reads_none_after_exit() {
    require_root("reading other processes' /proc/PID/status");
    let meminfo = read_meminfo(Path::new("/proc/meminfo")).expect("meminfo");
    assert!(meminfo.total > 0 && meminfo.available <= meminfo.total);

    let mut child = ChildGuard::python(ALLOCATE_50_MIB);
    let pid = child.pid();
    child.expect_line("base", Duration::from_secs(10));
    let base = read_process_rss(pid)
        .expect("read rss")
        .expect("child is alive");
    child.send("go");
    child.expect_line("ready", Duration::from_secs(10));
    let grown = read_process_rss(pid)
        .expect("read rss")
        .expect("child is alive");
    let delta = grown.saturating_sub(base);
    eprintln!("rss: base {base} bytes, after 50 MiB {grown} bytes, delta {delta} bytes");
    assert!(
        delta.abs_diff(50 * MIB) <= 4 * MIB,
        "RSS grew by {delta} bytes, expected 50 MiB ± 4 MiB"
    );
    assert!(
        (50 * MIB..=80 * MIB).contains(&grown),
        "absolute RSS {grown}"
    );

    child.finish(Duration::from_secs(10));
    assert_eq!(
        read_process_rss(pid).expect("no error for a gone process"),
        None
    );
}
