//! Pressure stall information (PSI): readings of `/proc/pressure/{cpu,memory,io}` and of a
//! cgroup v2 directory's `*.pressure` files, and PSI triggers that wake us when stalls cross a
//! threshold, without polling (kernel: `Documentation/accounting/psi.rst`, `kernel/sched/psi.c`).

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::{ParseError, PressureError, read_text};

/// The resource a PSI file describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PsiResource {
    /// CPU.
    Cpu,
    /// Memory (reclaim, refaults, swap-in).
    Memory,
    /// Block I/O.
    Io,
}

impl PsiResource {
    /// All three resources.
    pub const ALL: [Self; 3] = [Self::Cpu, Self::Memory, Self::Io];

    /// `cpu`, `memory` or `io`: the file name under `/proc/pressure`.
    pub fn file_stem(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Memory => "memory",
            Self::Io => "io",
        }
    }

    /// `cpu.pressure`, …: the file name in a cgroup v2 directory.
    pub fn cgroup_file(self) -> &'static str {
        match self {
            Self::Cpu => "cpu.pressure",
            Self::Memory => "memory.pressure",
            Self::Io => "io.pressure",
        }
    }
}

/// One line of a PSI file: the share of wall time (percent) some/all tasks stalled, averaged
/// over 10 s, 60 s and 300 s, and the total stall time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PsiLine {
    /// Percent of the last 10 s.
    pub avg10: f64,
    /// Percent of the last 60 s.
    pub avg60: f64,
    /// Percent of the last 300 s.
    pub avg300: f64,
    /// Total stall time since boot (the kernel counts microseconds).
    pub total: Duration,
}

/// A whole PSI file. `full` is absent for system-wide CPU before Linux 5.13; at the root of a
/// cgroup v2 hierarchy (and system-wide) the kernel reports `full` for CPU as zeros.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Psi {
    /// Some task stalled.
    pub some: PsiLine,
    /// All non-idle tasks stalled at once.
    pub full: Option<PsiLine>,
}

/// Parses a PSI file's text (`some avg10=0.00 avg60=0.00 avg300=0.00 total=0` and the same for
/// `full`).
pub fn parse_psi(text: &str) -> Result<Psi, ParseError> {
    let mut some = None;
    let mut full = None;
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_ascii_whitespace();
        let kind = fields.next().unwrap_or_default();
        let slot = match kind {
            "some" => &mut some,
            "full" => &mut full,
            other => {
                return Err(ParseError::new(
                    line_no,
                    format!("expected `some` or `full`, found {other:?}"),
                ));
            }
        };
        let (mut avg10, mut avg60, mut avg300, mut total) = (None, None, None, None);
        for field in fields {
            let Some((key, value)) = field.split_once('=') else {
                return Err(ParseError::new(
                    line_no,
                    format!("expected key=value, found {field:?}"),
                ));
            };
            let bad = |what: &str| ParseError::new(line_no, format!("bad {what} value {value:?}"));
            match key {
                "avg10" => avg10 = Some(value.parse::<f64>().map_err(|_| bad(key))?),
                "avg60" => avg60 = Some(value.parse::<f64>().map_err(|_| bad(key))?),
                "avg300" => avg300 = Some(value.parse::<f64>().map_err(|_| bad(key))?),
                "total" => total = Some(value.parse::<u64>().map_err(|_| bad(key))?),
                // Newer kernels may add fields; ignore what we do not know.
                _ => {}
            }
        }
        let missing = |what: &str| ParseError::new(line_no, format!("{kind} line lacks {what}"));
        *slot = Some(PsiLine {
            avg10: avg10.ok_or_else(|| missing("avg10"))?,
            avg60: avg60.ok_or_else(|| missing("avg60"))?,
            avg300: avg300.ok_or_else(|| missing("avg300"))?,
            total: Duration::from_micros(total.ok_or_else(|| missing("total"))?),
        });
    }
    let some = some.ok_or_else(|| ParseError::new(0, "no `some` line"))?;
    Ok(Psi { some, full })
}

/// Reads and parses one PSI file; a missing file means PSI is off.
pub(crate) fn read_psi_file(path: &Path) -> Result<Psi, PressureError> {
    let text = read_text(path).map_err(|e| match e {
        PressureError::Read { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound
                || source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
        {
            PressureError::PsiUnavailable {
                path: path.to_path_buf(),
            }
        }
        other => other,
    })?;
    parse_psi(&text).map_err(|e| PressureError::parse(path, e))
}

/// System-wide PSI of one resource (`/proc/pressure/<resource>`).
pub fn read_system_psi(resource: PsiResource) -> Result<Psi, PressureError> {
    read_psi_file(&Path::new("/proc/pressure").join(resource.file_stem()))
}

/// PSI of one resource for a cgroup v2 directory (absolute path of the directory).
pub fn read_cgroup_psi(cgroup_dir: &Path, resource: PsiResource) -> Result<Psi, PressureError> {
    read_psi_file(&cgroup_dir.join(resource.cgroup_file()))
}

/// Which stall a trigger watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallKind {
    /// At least one task stalled.
    Some,
    /// All non-idle tasks stalled at once.
    Full,
}

/// A PSI trigger: fire when tasks stalled for at least `stall` within any `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PsiTriggerSpec {
    /// `some` or `full`.
    pub kind: StallKind,
    /// Stall time within the window that fires the trigger.
    pub stall: Duration,
    /// Tracking window; the kernel accepts 500 ms to 10 s, and without CAP_SYS_RESOURCE only
    /// multiples of 2 s.
    pub window: Duration,
}

/// Kernel bounds for the window (`WINDOW_MIN_US`, `WINDOW_MAX_US` in `kernel/sched/psi.c`).
const WINDOW_MIN: Duration = Duration::from_millis(500);
const WINDOW_MAX: Duration = Duration::from_secs(10);
/// Without CAP_SYS_RESOURCE, windows must be multiples of this (`kernel/sched/psi.c`,
/// `psi_trigger_create`). Being root is not enough: a container's root may lack the capability
/// (the test machine's does), so 2 s-multiple windows are the portable choice.
const UNPRIVILEGED_WINDOW_STEP: Duration = Duration::from_secs(2);

impl PsiTriggerSpec {
    /// Checks the spec against the kernel's rules, so a bad config fails at load with a reason.
    pub fn validate(&self) -> Result<(), PressureError> {
        let Self {
            kind: _,
            stall,
            window,
        } = *self;
        if window < WINDOW_MIN || window > WINDOW_MAX {
            return Err(PressureError::InvalidTrigger(format!(
                "window {window:?} is outside the kernel's 500ms..=10s; choose a window in that range"
            )));
        }
        if stall.is_zero() || stall > window {
            return Err(PressureError::InvalidTrigger(format!(
                "stall {stall:?} must be above zero and at most the window {window:?}"
            )));
        }
        Ok(())
    }

    /// The text written to the pressure file: `some 150000 1000000` (µs).
    pub fn to_kernel_text(&self) -> String {
        let kind = match self.kind {
            StallKind::Some => "some",
            StallKind::Full => "full",
        };
        format!(
            "{kind} {} {}",
            self.stall.as_micros(),
            self.window.as_micros()
        )
    }
}

/// One crossing of a trigger's threshold. The kernel reports at most one per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PsiEvent {
    /// When the agent saw the event (monotonic).
    pub seen_at: Instant,
    /// 1 for the first event of this trigger, then 2, 3, …
    pub sequence: u64,
}

/// A live PSI trigger on one pressure file. The kernel keeps the trigger as long as the file
/// descriptor is open; dropping this removes it.
pub struct PsiTrigger {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
    spec: PsiTriggerSpec,
    events: u64,
}

impl fmt::Debug for PsiTrigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PsiTrigger")
            .field("path", &self.path)
            .field("spec", &self.spec)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl PsiTrigger {
    /// Installs a trigger on `pressure_file` (`/proc/pressure/memory`, or a cgroup v2
    /// directory's `memory.pressure`). Must be called inside a tokio runtime with I/O enabled.
    pub fn open(pressure_file: &Path, spec: PsiTriggerSpec) -> Result<Self, PressureError> {
        spec.validate()?;
        let path = pressure_file.to_path_buf();
        let text = spec.to_kernel_text();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    PressureError::PsiUnavailable { path: path.clone() }
                } else {
                    PressureError::read(&path, e)
                }
            })?;
        // The kernel overwrites the last byte written with a NUL (`psi_write` in
        // kernel/sched/psi.c), so the NUL terminator must be part of the one write.
        let mut bytes = text.clone().into_bytes();
        bytes.push(0);
        file.write_all(&bytes).map_err(|source| {
            let unprivileged_window = !spec
                .window
                .as_micros()
                .is_multiple_of(UNPRIVILEGED_WINDOW_STEP.as_micros());
            let hint = match source.raw_os_error() {
                // Without CAP_SYS_RESOURCE the kernel refuses windows that are not a multiple
                // of 2 s with EINVAL (`psi_trigger_create`); root in a container often lacks
                // that capability.
                Some(libc::EINVAL | libc::EPERM | libc::EACCES) if unprivileged_window => {
                    "without CAP_SYS_RESOURCE (often missing for root in a container) the window must be a multiple of 2s; use a 2s/4s/… window or grant CAP_SYS_RESOURCE"
                }
                Some(libc::EPERM | libc::EACCES) => {
                    "the agent needs write access to the pressure file; run it as root"
                }
                Some(libc::EBUSY) => "a trigger is already installed on this file descriptor",
                Some(libc::EOPNOTSUPP) => "PSI is disabled; boot with psi=1",
                Some(libc::EINVAL) => "check the stall and window values (µs, window 500ms..=10s)",
                _ => "check the kernel log",
            };
            PressureError::Trigger {
                path: path.clone(),
                spec: text.clone(),
                source,
                hint,
            }
        })?;
        // SAFETY: the `OwnedFd` is a valid open descriptor that the `AsyncFd` owns for its whole
        // life; nothing else can close or replace it.
        let fd =
            unsafe { AsyncFd::register_with_interest(OwnedFd::from(file), Interest::PRIORITY) }
                .map_err(|e| PressureError::read(&path, e.into_parts().1))?;
        Ok(Self {
            fd,
            path,
            spec,
            events: 0,
        })
    }

    /// The pressure file this trigger watches.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The trigger's specification.
    pub fn spec(&self) -> PsiTriggerSpec {
        self.spec
    }

    /// Waits for the next threshold crossing (POLLPRI). Cancel-safe.
    pub async fn next_event(&mut self) -> Result<PsiEvent, PressureError> {
        let mut guard = self
            .fd
            .ready(Interest::PRIORITY)
            .await
            .map_err(|e| PressureError::read(&self.path, e))?;
        let ready = guard.ready();
        // The kernel answers POLLERR when the cgroup is gone (`psi_trigger_poll`).
        if ready.is_error() {
            return Err(PressureError::TriggerGone {
                path: self.path.clone(),
            });
        }
        // Edge-triggered: the next wake-up of the kernel's wait queue reports the next event.
        guard.clear_ready();
        self.events += 1;
        Ok(PsiEvent {
            seen_at: Instant::now(),
            sequence: self.events,
        })
    }

    /// Like [`Self::next_event`], but gives up after `timeout` and returns `Ok(None)`.
    pub async fn wait_for(&mut self, timeout: Duration) -> Result<Option<PsiEvent>, PressureError> {
        match tokio::time::timeout(timeout, self.next_event()).await {
            Ok(event) => event.map(Some),
            Err(_elapsed) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/pressure/io` on the kernel 6.18 test machine.
    const SYSTEM_IO: &str = "some avg10=0.02 avg60=1.51 avg300=2.12 total=30203632\n\
                             full avg10=0.00 avg60=0.96 avg300=1.20 total=18249515\n";
    /// `/proc/pressure/cpu` on the same machine (`full` is reported as zeros system-wide).
    const SYSTEM_CPU: &str = "some avg10=7.06 avg60=10.27 avg300=16.31 total=464527258\n\
                              full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
    /// `cpu.pressure` before Linux 5.13: no `full` line.
    const OLD_CPU: &str = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";

    #[test]
    fn parses_system_io() {
        let psi = parse_psi(SYSTEM_IO).unwrap();
        assert_eq!(psi.some.avg10, 0.02);
        assert_eq!(psi.some.avg60, 1.51);
        assert_eq!(psi.some.avg300, 2.12);
        assert_eq!(psi.some.total, Duration::from_micros(30_203_632));
        let full = psi.full.unwrap();
        assert_eq!(full.avg60, 0.96);
        assert_eq!(full.total, Duration::from_micros(18_249_515));
    }

    #[test]
    fn parses_cpu_with_and_without_full() {
        let psi = parse_psi(SYSTEM_CPU).unwrap();
        assert_eq!(psi.some.avg300, 16.31);
        assert_eq!(psi.full.unwrap().total, Duration::ZERO);
        assert_eq!(parse_psi(OLD_CPU).unwrap().full, None);
    }

    #[test]
    fn ignores_unknown_fields_and_rejects_broken_lines() {
        let newer = "some avg10=1.00 avg60=2.00 avg300=3.00 total=4 avg1=9.0\n";
        assert_eq!(parse_psi(newer).unwrap().some.avg10, 1.0);
        for (text, needle) in [
            ("", "no `some` line"),
            ("partial avg10=0.00\n", "expected `some` or `full`"),
            ("some avg10=x avg60=0 avg300=0 total=0\n", "bad avg10"),
            ("some avg10=0 avg60=0 avg300=0\n", "lacks total"),
            ("some avg10\n", "key=value"),
        ] {
            let err = parse_psi(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn trigger_spec_text_and_validation() {
        let spec = PsiTriggerSpec {
            kind: StallKind::Some,
            stall: Duration::from_millis(150),
            window: Duration::from_secs(1),
        };
        assert_eq!(spec.to_kernel_text(), "some 150000 1000000");
        spec.validate().unwrap();
        let full = PsiTriggerSpec {
            kind: StallKind::Full,
            ..spec
        };
        assert_eq!(full.to_kernel_text(), "full 150000 1000000");
        for bad in [
            PsiTriggerSpec {
                window: Duration::from_millis(100),
                ..spec
            },
            PsiTriggerSpec {
                window: Duration::from_secs(11),
                ..spec
            },
            PsiTriggerSpec {
                stall: Duration::from_secs(2),
                ..spec
            },
            PsiTriggerSpec {
                stall: Duration::ZERO,
                ..spec
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
