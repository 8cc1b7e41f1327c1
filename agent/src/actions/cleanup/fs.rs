//! The filesystem side of `disk_cleanup`: surveys roots and carries out a [`Plan`] through held
//! directory fds only, re-checking every file just before it is touched.
//!
//! Containment (I7) rests on these rules, each enforced here and exercised by
//! `tests/agent/cleanup.rs`:
//! - A root is opened with `openat2(RESOLVE_NO_SYMLINKS)` + `O_NOFOLLOW`; it must be a directory,
//!   never world-writable, and group-writable only when the root allows it.
//! - Subdirectories are opened one component at a time from their parent's fd with
//!   `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV` and must keep the root's `st_dev`;
//!   files are examined with `fstatat(AT_SYMLINK_NOFOLLOW)`. No path is ever built from
//!   untrusted names: every call takes one entry name and a held fd.
//! - Just before a step, the held directory is proven to still sit at its place under the root
//!   (re-opened component by component from the configured root path, same dev+ino), and the
//!   entry is proven to be the planned inode (dev, ino, size, mtime), a regular file with one
//!   link. Any difference is a race caught: the step is skipped.
//! - Delete is `unlinkat(dirfd, name, 0)`. Removing a name never destroys data reachable by
//!   another name, so an entry swapped in after the check (a symlink or a hard link to a file
//!   outside) costs that outside file nothing. Truncation (open files, where allowed) goes
//!   through an fd opened with `openat2` + `O_NOFOLLOW` on the held dirfd and re-checked with
//!   `fstat` (same inode, one link) before `ftruncate`; it never opens with `O_TRUNC`.
//! - Residual window, stated rather than hidden: a directory can be renamed out of the root
//!   between the re-check and the `unlinkat` (Linux has no way to pin a directory's place). The
//!   only file that can then go is the planned inode itself (one link, seen inside the root),
//!   and the re-check after the step counts such cases in `moved_during_step`.
//! - Open files are found by `stat`ing `/proc/*/fd/*` once per survey; a file opened after that
//!   is deleted like any other (safe; its space returns when it is closed). Memory mappings
//!   without an fd (`/proc/*/map_files`) are not scanned.
//!
//! Must not import the decision logic beyond the plan's data types, nor any shell or process
//! spawning.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{FileStat, SFlag, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, ftruncate, unlinkat};

use super::config::CleanupConfig;
use super::plan::{FileIdentity, FsSpace, ListedFile, Plan, SkipReason, StepKind, Survey};

/// Subdirectories deeper than this under a root are not walked.
pub const MAX_DEPTH: usize = 16;
/// Directory fds held per survey (all roots); beyond it, subdirectories are skipped.
pub const MAX_DIRS: usize = 256;

/// Why a survey or execution could not run on a root. Each says what to change.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error(
        "cannot open cleanup root {path}: {errno}; create it or fix the path (symlinks are refused)"
    )]
    OpenRoot { path: PathBuf, errno: Errno },
    #[error(
        "cleanup root {path} is not a directory (symbolic links are refused); point the root at the real directory"
    )]
    NotDirectory { path: PathBuf },
    #[error(
        "cleanup root {path} is world-writable (mode {mode:o}); anyone could plant files there: chmod o-w it"
    )]
    WorldWritable { path: PathBuf, mode: u32 },
    #[error(
        "cleanup root {path} is group-writable (mode {mode:o}); chmod g-w it or set allow_group_writable = true"
    )]
    GroupWritable { path: PathBuf, mode: u32 },
    #[error("cannot read cleanup root {path}: {errno}")]
    Read { path: PathBuf, errno: Errno },
    #[error("stopped before any step: the lease no longer allows acting")]
    Stopped,
}

/// What happened to entries that were not acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Skipped {
    /// The plan left it (see [`SkipReason`]).
    Plan(SkipReason),
    /// A symbolic link: never followed, never deleted.
    Symlink,
    /// Not a regular file or directory (fifo, socket, device).
    NotRegular,
    /// A directory on another filesystem (a mount point, bind mounts included).
    MountPoint,
    /// A subdirectory writable by others than its owner (where not allowed).
    WritableDir,
    /// Past [`MAX_DEPTH`] or [`MAX_DIRS`].
    DirLimit,
}

/// The outcome of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// No file was touched: the dry-run executor (observe mode).
    pub dry_run: bool,
    pub files_deleted: u64,
    pub bytes_freed: u64,
    pub files_truncated: u64,
    /// Steps the plan held (what a dry run would have done).
    pub planned_deletes: u64,
    pub planned_truncates: u64,
    pub bytes_planned: u64,
    /// Entries or directories that changed between planning and acting (swapped inode, extra
    /// link, symlink, directory moved out of the root): skipped.
    pub races_caught: u64,
    /// Planned entries gone before their step.
    pub vanished: u64,
    /// Steps after which the directory was found moved out of the root (see the module docs).
    pub moved_during_step: u64,
    /// `continue_ok` said no: the run stopped before its next step.
    pub stopped_early: bool,
    pub skipped: BTreeMap<Skipped, u64>,
    /// Errors on single entries (the run went on), e.g. `EACCES`.
    pub errors: u64,
}

impl CleanupReport {
    fn skip(&mut self, why: Skipped) {
        *self.skipped.entry(why).or_default() += 1;
    }
}

/// The I/O port of `disk_cleanup`. `continue_ok` is asked before every step (the caller checks
/// its lease deadline and fencing there); when it says no, nothing more is done.
pub trait CleanupExecutor {
    /// Opens and walks the roots, lists their regular files and their filesystems' space.
    fn survey(
        &mut self,
        config: &CleanupConfig,
        continue_ok: &mut dyn FnMut() -> bool,
    ) -> Result<Survey, CleanupError>;

    /// Carries out `plan` over the last survey.
    fn apply(
        &mut self,
        config: &CleanupConfig,
        survey: &Survey,
        plan: &Plan,
        continue_ok: &mut dyn FnMut() -> bool,
    ) -> CleanupReport;
}

/// A directory held open during a run, with its place under its root.
#[derive(Debug)]
struct HeldDir {
    root: usize,
    fd: OwnedFd,
    dev: u64,
    ino: u64,
    /// Entry names from the root down to this directory (empty for the root).
    chain: Vec<OsString>,
}

/// The real executor: fd-relative, re-checking, never following a link.
#[derive(Debug, Default)]
pub struct FsCleanup {
    dirs: Vec<HeldDir>,
    survey_report: CleanupReport,
}

/// The observe-mode executor: surveys (read-only) like [`FsCleanup`] but touches nothing.
#[derive(Debug, Default)]
pub struct DryRunCleanup {
    inner: FsCleanup,
}

fn how(flags: OFlag, resolve: ResolveFlag) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(resolve)
}

fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_XDEV
}

fn is(st: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == kind
}

fn mtime(st: &FileStat) -> SystemTime {
    let nanos = u32::try_from(st.st_mtime_nsec).unwrap_or(0);
    match u64::try_from(st.st_mtime) {
        Ok(secs) => SystemTime::UNIX_EPOCH + Duration::new(secs, nanos),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

fn identity(st: &FileStat) -> FileIdentity {
    FileIdentity {
        dev: st.st_dev,
        ino: st.st_ino,
        size: u64::try_from(st.st_size).unwrap_or(0),
        mtime: mtime(st),
    }
}

/// Opens a root: no symlink anywhere in the configured path, a directory, not writable by
/// others (group only where allowed).
fn open_root(path: &Path, allow_group_writable: bool) -> Result<(OwnedFd, FileStat), CleanupError> {
    let fd = openat2(
        AT_FDCWD,
        path,
        how(
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
            ResolveFlag::RESOLVE_NO_SYMLINKS,
        ),
    )
    .map_err(|errno| match errno {
        Errno::ENOTDIR => CleanupError::NotDirectory { path: path.into() },
        errno => CleanupError::OpenRoot {
            path: path.into(),
            errno,
        },
    })?;
    let st = fstat(&fd).map_err(|errno| CleanupError::Read {
        path: path.into(),
        errno,
    })?;
    if !is(&st, SFlag::S_IFDIR) {
        return Err(CleanupError::NotDirectory { path: path.into() });
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o002 != 0 {
        return Err(CleanupError::WorldWritable {
            path: path.into(),
            mode,
        });
    }
    if mode & 0o020 != 0 && !allow_group_writable {
        return Err(CleanupError::GroupWritable {
            path: path.into(),
            mode,
        });
    }
    Ok((fd, st))
}

/// Opens one subdirectory entry of `parent` (never a symlink, never across a mount).
fn open_subdir(parent: impl AsFd, name: &OsStr, flags: OFlag) -> nix::Result<OwnedFd> {
    openat2(
        parent,
        name,
        how(flags | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW, beneath()),
    )
}

impl FsCleanup {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `dir` still sits at its place under its root: re-opened from the configured root
    /// path, one component at a time, it is the same directory inode.
    fn still_in_root(&self, config: &CleanupConfig, dir: &HeldDir) -> bool {
        let Some(root) = config.roots.get(dir.root) else {
            return false;
        };
        let Ok(mut fd) = openat2(
            AT_FDCWD,
            root.path.as_path(),
            how(
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                ResolveFlag::RESOLVE_NO_SYMLINKS,
            ),
        ) else {
            return false;
        };
        for name in &dir.chain {
            match open_subdir(&fd, name, OFlag::O_PATH) {
                Ok(next) => fd = next,
                Err(_) => return false,
            }
        }
        fstat(&fd).is_ok_and(|st| st.st_dev == dir.dev && st.st_ino == dir.ino)
    }

    fn walk_root(
        &mut self,
        config: &CleanupConfig,
        root_index: usize,
        survey: &mut Survey,
        continue_ok: &mut dyn FnMut() -> bool,
    ) -> Result<(), CleanupError> {
        let root = &config.roots[root_index];
        let (fd, st) = open_root(&root.path, root.allow_group_writable)?;
        let vfs = nix::sys::statvfs::fstatvfs(&fd).map_err(|errno| CleanupError::Read {
            path: root.path.clone(),
            errno,
        })?;
        let frsize = vfs.fragment_size();
        if !survey.filesystems.iter().any(|f| f.dev == st.st_dev) {
            survey.filesystems.push(FsSpace {
                dev: st.st_dev,
                total_bytes: vfs.blocks().saturating_mul(frsize),
                free_bytes: vfs.blocks_available().saturating_mul(frsize),
            });
        }
        let root_dev = st.st_dev;
        let first = self.dirs.len();
        self.dirs.push(HeldDir {
            root: root_index,
            fd,
            dev: st.st_dev,
            ino: st.st_ino,
            chain: Vec::new(),
        });
        let mut next = first;
        while next < self.dirs.len() {
            if !continue_ok() {
                self.survey_report.stopped_early = true;
                return Ok(());
            }
            let dir_index = next;
            next += 1;
            let listed_from = survey.files.len();
            // Reading "." of the held fd lists this very directory, wherever it now is.
            let reader = nix::dir::Dir::openat(
                &self.dirs[dir_index].fd,
                ".",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            );
            let Ok(mut reader) = reader else {
                if dir_index == first {
                    return Err(CleanupError::Read {
                        path: root.path.clone(),
                        errno: reader.err().unwrap_or(Errno::EIO),
                    });
                }
                self.survey_report.errors += 1;
                continue;
            };
            let names: Vec<OsString> = reader
                .iter()
                .filter_map(Result::ok)
                .map(|e| OsStr::from_bytes(e.file_name().to_bytes()).to_owned())
                .filter(|n| n != "." && n != "..")
                .collect();
            drop(reader);
            for name in names {
                self.examine(config, root_dev, dir_index, name, survey);
            }
            // A directory moved out of the root while it was being listed: forget what it held.
            if dir_index != first && !self.still_in_root(config, &self.dirs[dir_index]) {
                survey.files.truncate(listed_from);
                self.survey_report.races_caught += 1;
            }
        }
        Ok(())
    }

    fn examine(
        &mut self,
        config: &CleanupConfig,
        root_dev: u64,
        dir_index: usize,
        name: OsString,
        survey: &mut Survey,
    ) {
        let dir = &self.dirs[dir_index];
        let root = &config.roots[dir.root];
        let st = match fstatat(&dir.fd, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return,
            Err(_) => {
                self.survey_report.errors += 1;
                return;
            }
        };
        if is(&st, SFlag::S_IFREG) {
            if st.st_dev != root_dev {
                self.survey_report.skip(Skipped::MountPoint);
                return;
            }
            survey.files.push(ListedFile {
                root: dir.root,
                dir: dir_index,
                name,
                identity: identity(&st),
                allocated_bytes: u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512),
                nlink: st.st_nlink,
                open: false,
            });
        } else if is(&st, SFlag::S_IFDIR) {
            let writable = if root.allow_group_writable {
                0o002
            } else {
                0o022
            };
            if st.st_dev != root_dev {
                self.survey_report.skip(Skipped::MountPoint);
            } else if st.st_mode & writable != 0 {
                self.survey_report.skip(Skipped::WritableDir);
            } else if dir.chain.len() >= MAX_DEPTH || self.dirs.len() >= MAX_DIRS {
                self.survey_report.skip(Skipped::DirLimit);
            } else {
                match open_subdir(&dir.fd, &name, OFlag::O_RDONLY) {
                    Ok(fd) => match fstat(&fd) {
                        Ok(sub) if sub.st_dev == root_dev && sub.st_ino == st.st_ino => {
                            let mut chain = dir.chain.clone();
                            chain.push(name);
                            let root = dir.root;
                            self.dirs.push(HeldDir {
                                root,
                                fd,
                                dev: sub.st_dev,
                                ino: sub.st_ino,
                                chain,
                            });
                        }
                        _ => self.survey_report.races_caught += 1,
                    },
                    Err(Errno::EXDEV) => self.survey_report.skip(Skipped::MountPoint),
                    // A symlink or non-directory swapped in since the fstatat, or gone.
                    Err(Errno::ELOOP | Errno::ENOTDIR | Errno::ENOENT) => {
                        self.survey_report.races_caught += 1;
                    }
                    Err(_) => self.survey_report.errors += 1,
                }
            }
        } else if is(&st, SFlag::S_IFLNK) {
            self.survey_report.skip(Skipped::Symlink);
        } else {
            self.survey_report.skip(Skipped::NotRegular);
        }
    }

    /// One step, checked before and after. Returns nothing: the report says what happened.
    fn step(
        &self,
        config: &CleanupConfig,
        file: &ListedFile,
        kind: StepKind,
        frees: u64,
        report: &mut CleanupReport,
    ) {
        let Some(dir) = self.dirs.get(file.dir) else {
            report.errors += 1;
            return;
        };
        if !self.still_in_root(config, dir) {
            report.races_caught += 1;
            return;
        }
        let same = |st: &FileStat| {
            is(st, SFlag::S_IFREG) && st.st_nlink == 1 && identity(st) == file.identity
        };
        match fstatat(&dir.fd, file.name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if same(&st) => {}
            Ok(_) => {
                report.races_caught += 1;
                return;
            }
            Err(Errno::ENOENT) => {
                report.vanished += 1;
                return;
            }
            Err(_) => {
                report.errors += 1;
                return;
            }
        }
        match kind {
            StepKind::Delete => {
                match unlinkat(&dir.fd, file.name.as_os_str(), UnlinkatFlags::NoRemoveDir) {
                    Ok(()) => {
                        report.files_deleted += 1;
                        report.bytes_freed += frees;
                    }
                    Err(Errno::ENOENT) => report.vanished += 1,
                    Err(_) => report.errors += 1,
                }
            }
            StepKind::Truncate => {
                let flags =
                    OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
                let fd = match openat2(&dir.fd, file.name.as_os_str(), how(flags, beneath())) {
                    Ok(fd) => fd,
                    Err(Errno::ELOOP | Errno::ENXIO | Errno::EISDIR) => {
                        report.races_caught += 1;
                        return;
                    }
                    Err(Errno::ENOENT) => {
                        report.vanished += 1;
                        return;
                    }
                    Err(_) => {
                        report.errors += 1;
                        return;
                    }
                };
                // The fd pins the inode: check it is the planned one with a single link.
                match fstat(&fd) {
                    Ok(st) if same(&st) => match ftruncate(&fd, 0) {
                        Ok(()) => {
                            report.files_truncated += 1;
                            report.bytes_freed += frees;
                        }
                        Err(_) => report.errors += 1,
                    },
                    Ok(_) => report.races_caught += 1,
                    Err(_) => report.errors += 1,
                }
            }
        }
        if !self.still_in_root(config, dir) {
            report.moved_during_step += 1;
        }
    }
}

/// Inodes (dev, ino) on the given devices that some process holds open, from `/proc/*/fd/*`.
/// `/proc` is trusted; processes vanishing mid-scan are ignored.
fn open_inodes(devs: &HashSet<u64>) -> HashSet<(u64, u64)> {
    let mut open = HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return open;
    };
    for p in procs.filter_map(Result::ok) {
        let name = p.file_name();
        if !name.as_encoded_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.filter_map(Result::ok) {
            if let Ok(m) = std::fs::metadata(fd.path())
                && devs.contains(&m.dev())
            {
                open.insert((m.dev(), m.ino()));
            }
        }
    }
    open
}

impl CleanupExecutor for FsCleanup {
    fn survey(
        &mut self,
        config: &CleanupConfig,
        continue_ok: &mut dyn FnMut() -> bool,
    ) -> Result<Survey, CleanupError> {
        self.dirs.clear();
        self.survey_report = CleanupReport::default();
        let mut survey = Survey::default();
        for i in 0..config.roots.len() {
            if !continue_ok() {
                return Err(CleanupError::Stopped);
            }
            self.walk_root(config, i, &mut survey, continue_ok)?;
        }
        let devs: HashSet<u64> = survey.filesystems.iter().map(|f| f.dev).collect();
        let open = open_inodes(&devs);
        for f in &mut survey.files {
            f.open = open.contains(&(f.identity.dev, f.identity.ino));
        }
        Ok(survey)
    }

    fn apply(
        &mut self,
        config: &CleanupConfig,
        survey: &Survey,
        plan: &Plan,
        continue_ok: &mut dyn FnMut() -> bool,
    ) -> CleanupReport {
        let mut report = std::mem::take(&mut self.survey_report);
        tally_plan(&mut report, plan);
        if report.stopped_early {
            return report;
        }
        for step in &plan.steps {
            if !continue_ok() {
                report.stopped_early = true;
                break;
            }
            if let Some(file) = survey.files.get(step.file) {
                self.step(config, file, step.kind, step.frees, &mut report);
            }
        }
        // Release the directory fds now rather than at the next survey.
        self.dirs.clear();
        report
    }
}

fn tally_plan(report: &mut CleanupReport, plan: &Plan) {
    for (_, why) in &plan.skipped {
        report.skip(Skipped::Plan(*why));
    }
    for step in &plan.steps {
        match step.kind {
            StepKind::Delete => report.planned_deletes += 1,
            StepKind::Truncate => report.planned_truncates += 1,
        }
    }
    report.bytes_planned = plan.bytes_planned;
}

impl DryRunCleanup {
    pub fn new() -> Self {
        Self::default()
    }
}

impl CleanupExecutor for DryRunCleanup {
    fn survey(
        &mut self,
        config: &CleanupConfig,
        continue_ok: &mut dyn FnMut() -> bool,
    ) -> Result<Survey, CleanupError> {
        self.inner.survey(config, continue_ok)
    }

    fn apply(
        &mut self,
        _config: &CleanupConfig,
        _survey: &Survey,
        plan: &Plan,
        _continue_ok: &mut dyn FnMut() -> bool,
    ) -> CleanupReport {
        let mut report = std::mem::take(&mut self.inner.survey_report);
        report.dry_run = true;
        tally_plan(&mut report, plan);
        self.inner.dirs.clear();
        report
    }
}
