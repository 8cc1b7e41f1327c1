//! Host memory (`/proc/meminfo`) and the resident set size of watched processes
//! (`/proc/PID/status`, `VmRSS`; kernel: `fs/proc/task_mmu.c`, `fs/proc/meminfo.c`).

use std::fmt;
use std::path::Path;

use super::{ParseError, PressureError, read_text};

/// A process id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pid(pub u32);

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The parts of `/proc/meminfo` the agent uses, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    /// `MemTotal`.
    pub total: u64,
    /// `MemAvailable`: the kernel's estimate of what can be allocated without swapping.
    pub available: u64,
    /// `SwapTotal`.
    pub swap_total: u64,
    /// `SwapFree`.
    pub swap_free: u64,
}

impl MemInfo {
    /// Share of memory not available (0.0–1.0); 0.0 when `MemTotal` is 0.
    pub fn used_ratio(&self) -> f64 {
        ratio(self.total.saturating_sub(self.available), self.total)
    }

    /// Share of swap in use (0.0–1.0); 0.0 without swap.
    pub fn swap_used_ratio(&self) -> f64 {
        ratio(
            self.swap_total.saturating_sub(self.swap_free),
            self.swap_total,
        )
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "ratios of byte counts need no more than f64's 52-bit precision"
)]
pub(crate) fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Parses one `Key:   1234 kB` line's value into bytes.
fn kib_value(line_no: usize, key: &str, rest: &str) -> Result<u64, ParseError> {
    let mut parts = rest.split_ascii_whitespace();
    let number = parts
        .next()
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| ParseError::new(line_no, format!("{key}: expected a number")))?;
    match parts.next() {
        Some("kB") => number
            .checked_mul(1024)
            .ok_or_else(|| ParseError::new(line_no, format!("{key}: value overflows"))),
        None => Ok(number),
        Some(unit) => Err(ParseError::new(
            line_no,
            format!("{key}: unknown unit {unit:?}"),
        )),
    }
}

/// Parses `/proc/meminfo`. `MemTotal` and `MemAvailable` are required (the latter exists since
/// Linux 3.14); swap lines default to 0.
pub fn parse_meminfo(text: &str) -> Result<MemInfo, ParseError> {
    let (mut total, mut available, mut swap_total, mut swap_free) = (None, None, None, None);
    for (index, line) in text.lines().enumerate() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let slot = match key {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut available,
            "SwapTotal" => &mut swap_total,
            "SwapFree" => &mut swap_free,
            _ => continue,
        };
        *slot = Some(kib_value(index + 1, key, rest)?);
    }
    Ok(MemInfo {
        total: total.ok_or_else(|| ParseError::new(0, "no MemTotal line"))?,
        available: available.ok_or_else(|| ParseError::new(0, "no MemAvailable line"))?,
        swap_total: swap_total.unwrap_or(0),
        swap_free: swap_free.unwrap_or(0),
    })
}

/// Reads `/proc/meminfo` (or a file of the same shape).
pub fn read_meminfo(path: &Path) -> Result<MemInfo, PressureError> {
    parse_meminfo(&read_text(path)?).map_err(|e| PressureError::parse(path, e))
}

/// `VmRSS` from `/proc/PID/status` in bytes. `None` when the line is absent, as for kernel
/// threads and zombies, which own no user memory.
pub fn parse_status_rss(text: &str) -> Result<Option<u64>, ParseError> {
    for (index, line) in text.lines().enumerate() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            return kib_value(index + 1, "VmRSS", rest).map(Some);
        }
    }
    Ok(None)
}

/// RSS of `pid` in bytes from `/proc`. `Ok(None)` when the process is gone (or is a zombie or
/// kernel thread): watched processes exit all the time and that is not an error.
pub fn read_process_rss(pid: Pid) -> Result<Option<u64>, PressureError> {
    read_process_rss_at(Path::new("/proc"), pid)
}

pub(crate) fn read_process_rss_at(
    proc_root: &Path,
    pid: Pid,
) -> Result<Option<u64>, PressureError> {
    let path = proc_root.join(pid.0.to_string()).join("status");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        // ENOENT: gone before open. ESRCH: gone between open and read (fs/proc/array.c).
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ESRCH) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(PressureError::read(&path, e)),
    };
    parse_status_rss(&text).map_err(|e| PressureError::parse(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head of `/proc/meminfo` on the kernel 6.18 test machine (no swap).
    const MEMINFO: &str = "MemTotal:       24684096 kB\n\
MemFree:        19903564 kB\n\
MemAvailable:   23775032 kB\n\
Buffers:            6136 kB\n\
Cached:          3894896 kB\n\
SwapCached:            0 kB\n\
Active(anon):       1552 kB\n\
SwapTotal:             0 kB\n\
SwapFree:              0 kB\n\
HugePages_Total:       0\n\
Hugepagesize:       2048 kB\n";

    /// `/proc/self/status` of a shell on the same machine (trimmed).
    const STATUS: &str = "Name:\tcat\nUmask:\t0022\nState:\tR (running)\nTgid:\t1234\n\
VmPeak:\t    3060 kB\nVmSize:\t    3060 kB\nVmLck:\t       0 kB\nVmHWM:\t    1752 kB\n\
VmRSS:\t    1752 kB\nRssAnon:\t     112 kB\nRssFile:\t    1640 kB\nThreads:\t1\n";

    /// A kernel thread's status has no Vm* lines.
    const KTHREAD_STATUS: &str =
        "Name:\tkthreadd\nUmask:\t0000\nState:\tS (sleeping)\nThreads:\t1\n";

    #[test]
    fn parses_meminfo_in_bytes() {
        let info = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(info.total, 24_684_096 * 1024);
        assert_eq!(info.available, 23_775_032 * 1024);
        assert_eq!(info.swap_total, 0);
        assert_eq!(info.swap_used_ratio(), 0.0);
        let used = info.used_ratio();
        assert!((used - (1.0 - 23_775_032.0 / 24_684_096.0)).abs() < 1e-12);
    }

    #[test]
    fn meminfo_requires_total_and_available() {
        let err = parse_meminfo("MemTotal: 10 kB\n").unwrap_err();
        assert!(err.to_string().contains("MemAvailable"), "{err}");
        let err = parse_meminfo("MemTotal: x kB\nMemAvailable: 1 kB\n").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn parses_vmrss() {
        assert_eq!(parse_status_rss(STATUS).unwrap(), Some(1752 * 1024));
        assert_eq!(parse_status_rss(KTHREAD_STATUS).unwrap(), None);
    }

    #[test]
    fn a_missing_process_reads_as_none() {
        let dir = std::env::temp_dir().join(format!("interlock-no-proc-{}", std::process::id()));
        assert_eq!(read_process_rss_at(&dir, Pid(1)).unwrap(), None);
    }
}

/// The fields of `/proc/PID/stat` the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// `R`, `S`, `D`, `Z` (zombie), `X` (dead), ...
    pub state: char,
    /// Start time in clock ticks after boot: with the pid, it names one process for good.
    pub starttime: u64,
}

impl ProcStat {
    /// Running in the sense of not yet exited (a zombie has exited, it only awaits its parent).
    pub fn alive(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses the text of `/proc/PID/stat`. The comm (field 2) may hold spaces and parentheses,
/// so the fields are counted from its last `)`.
pub fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let mut fields = text.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3), the start time is field 22.
    let starttime = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { state, starttime })
}

/// `/proc/PID/stat` of a live (or zombie) process; `None` once it is gone.
pub fn read_proc_stat(pid: u32) -> Option<ProcStat> {
    parse_proc_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

#[cfg(test)]
mod stat_tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis_of_the_comm() {
        let text = "4242 (we ird) (x)) Z 1 4242 4242 0 -1 4194560 100 0 0 0 3 1 0 0 20 0 1 0 \
                    987654 1000000 200 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        assert_eq!(
            parse_proc_stat(text),
            Some(ProcStat {
                state: 'Z',
                starttime: 987_654
            })
        );
        assert!(!parse_proc_stat(text).expect("parsed").alive());
        assert_eq!(parse_proc_stat("12 (short) R 1"), None);
    }
}
