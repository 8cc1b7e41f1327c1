//! Process exits and OOM kills: the `PROCESS_EVENTS` ring, which wakes its consumer.

use std::os::fd::{AsRawFd, RawFd};

use aya::maps::{MapData, RingBuf};
use interlock_agent_common::{ProcessEvent, process_event_kind};
use tokio::io::{Interest, unix::AsyncFd};

use super::{ProbeError, comm_string, drain_ring, read_record};

/// How a process ended, decoded from the kernel's wait status (`task_struct::exit_code`, as
/// `do_exit` in `kernel/exit.c` stores it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)` or a return from `main`.
    Exited(i32),
    /// Killed by a signal, possibly after dumping core.
    Signaled { signal: i32, core_dumped: bool },
}

impl ExitStatus {
    pub fn from_wait_status(status: i32) -> Self {
        let signal = status & 0x7f;
        if signal == 0 {
            Self::Exited((status >> 8) & 0xff)
        } else {
            Self::Signaled {
                signal,
                core_dumped: status & 0x80 != 0,
            }
        }
    }
}

/// A thread group (process) ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitRecord {
    /// Kernel monotonic time of the exit (`bpf_ktime_get_ns`).
    pub ts_ns: u64,
    pub pid: u32,
    /// The thread whose exit ended the group (the pid unless a thread outlived the leader).
    pub tid: u32,
    pub comm: String,
    pub status: ExitStatus,
}

/// The OOM killer chose a victim (its exit follows as an [`ExitRecord`] with `SIGKILL`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OomKillRecord {
    pub ts_ns: u64,
    /// The victim.
    pub pid: u32,
    pub comm: String,
    pub uid: u32,
    pub total_vm_kb: u64,
    pub anon_rss_kb: u64,
    pub file_rss_kb: u64,
    pub shmem_rss_kb: u64,
    pub oom_score_adj: i16,
    /// The thread that ran the OOM killer (often an allocating task, not the victim).
    pub killer_tid: u32,
}

/// One record of the `PROCESS_EVENTS` ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessRecord {
    Exit(ExitRecord),
    OomKill(OomKillRecord),
    /// A kind this agent does not know (an object newer than the agent); never expected.
    Unknown(u32),
}

impl ProcessRecord {
    /// The pid the record is about.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Self::Exit(exit) => Some(exit.pid),
            Self::OomKill(kill) => Some(kill.pid),
            Self::Unknown(_) => None,
        }
    }
}

impl From<&ProcessEvent> for ProcessRecord {
    fn from(event: &ProcessEvent) -> Self {
        let ProcessEvent {
            ts_ns,
            kind,
            pid,
            tid,
            exit_code,
            uid,
            oom_score_adj,
            _pad,
            total_vm_kb,
            anon_rss_kb,
            file_rss_kb,
            shmem_rss_kb,
            comm,
        } = *event;
        match kind {
            process_event_kind::EXIT => Self::Exit(ExitRecord {
                ts_ns,
                pid,
                tid,
                comm: comm_string(&comm),
                status: ExitStatus::from_wait_status(exit_code),
            }),
            process_event_kind::OOM_KILL => Self::OomKill(OomKillRecord {
                ts_ns,
                pid,
                comm: comm_string(&comm),
                uid,
                total_vm_kb,
                anon_rss_kb,
                file_rss_kb,
                shmem_rss_kb,
                oom_score_adj,
                killer_tid: tid,
            }),
            other => Self::Unknown(other),
        }
    }
}

/// The ring's fd, borrowed for tokio's reactor; the ring owns and closes it.
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Exits and OOM kills, as they happen. The kernel wakes a waiting consumer, so
/// [`ProcessEvents::next`] returns within microseconds of the event.
pub struct ProcessEvents {
    // Declared before `ring`: deregisters from the reactor before the ring closes the fd.
    readiness: Option<AsyncFd<RingFd>>,
    ring: RingBuf<MapData>,
}

impl std::fmt::Debug for ProcessEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessEvents").finish_non_exhaustive()
    }
}

impl ProcessEvents {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Self {
        Self {
            readiness: None,
            ring,
        }
    }

    /// Moves every waiting record into `out`; returns how many.
    pub fn drain(&mut self, out: &mut Vec<ProcessRecord>) -> usize {
        drain_ring(&mut self.ring, out, |event: ProcessEvent| {
            ProcessRecord::from(&event)
        })
    }

    /// Waits for the next record. Must run inside a tokio runtime (with I/O enabled).
    pub async fn next(&mut self) -> Result<ProcessRecord, ProbeError> {
        if let Some(record) = pop(&mut self.ring) {
            return Ok(record);
        }
        if self.readiness.is_none() {
            let fd = RingFd(self.ring.as_raw_fd());
            // SAFETY: the fd belongs to `self.ring`, which stays open and unchanged for as long
            // as `self.readiness` lives (it is declared first, so it is dropped first).
            let registered = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) };
            self.readiness = Some(
                registered.map_err(|e| ProbeError::Ebpf(format!("polling PROCESS_EVENTS: {e}")))?,
            );
        }
        let readiness = self.readiness.as_ref().expect("set above");
        loop {
            let mut guard = readiness
                .readable()
                .await
                .map_err(|e| ProbeError::Ebpf(format!("polling PROCESS_EVENTS: {e}")))?;
            match pop(&mut self.ring) {
                Some(record) => return Ok(record),
                // Clears readiness only if no wake-up arrived since the guard was taken, so a
                // record queued after the pop above is not missed.
                None => guard.clear_ready(),
            }
        }
    }
}

fn pop(ring: &mut RingBuf<MapData>) -> Option<ProcessRecord> {
    loop {
        let item = ring.next()?;
        if let Some(event) = read_record::<ProcessEvent>(&item) {
            return Some(ProcessRecord::from(&event));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_decode() {
        assert_eq!(ExitStatus::from_wait_status(3 << 8), ExitStatus::Exited(3));
        assert_eq!(ExitStatus::from_wait_status(0), ExitStatus::Exited(0));
        assert_eq!(
            ExitStatus::from_wait_status(9),
            ExitStatus::Signaled {
                signal: 9,
                core_dumped: false
            }
        );
        assert_eq!(
            ExitStatus::from_wait_status(0x80 | 11),
            ExitStatus::Signaled {
                signal: 11,
                core_dumped: true
            }
        );
    }
}
