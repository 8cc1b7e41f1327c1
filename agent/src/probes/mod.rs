//! Kernel probes: loading the eBPF object built from `agent-ebpf`, attaching its programs and
//! draining what they report. Record layouts come from `interlock-agent-common`.
//!
//! This module owns every `aya` call of the agent; nothing else in the agent imports `aya`.
//!
//! # Shape
//!
//! One [`ProbeSet`] is one loaded copy of the eBPF object: one loader, one set of maps, the
//! programs selected in [`ProbeOptions`] verified and attached. Before loading it checks every
//! tracepoint layout the programs rely on (tracefs format files) and computes the kernel struct
//! offsets they need from BTF, so an unsupported kernel is refused with a message, not misread.
//! The set hands out one consumer handle per output, each owning its map, so each can move to
//! the task that consumes it:
//!
//! | handle | kernel side | delivery |
//! |---|---|---|
//! | [`ProcessEvents`] | `tp_btf/sched_process_exit` (thread-group exits), `oom:mark_victim` | ring `PROCESS_EVENTS`, wakes the consumer: `next().await` or `drain` |
//! | [`ConnectFailures`] | `sock:inet_sock_set_state` (SYN_SENT → CLOSE) | ring `CONNECT_FAILURES`, no wake-up: `drain` on a timer |
//! | [`FlowStats`] | `tcp:tcp_retransmit_skb`, `tcp:tcp_send_reset`, `tcp:tcp_receive_reset` | LRU per-CPU hash `TCP_FLOWS`: `read` or `drain` on a timer |
//! | [`TcpEvents`] | `sock:inet_sock_set_state` (every transition) | ring `TCP_EVENTS`, no wake-up: `drain` on a timer |
//! | [`TcpCloses`] | `sock_ops` on the cgroup v2 root (established → state callback at `TCP_CLOSE`) | ring `TCP_CLOSES`, no wake-up: `drain` on a timer |
//!
//! The programs stay attached as long as the [`ProbeSet`] lives (or until
//! [`ProbeSet::detach`]); the handles keep their maps, so what was queued can still be drained
//! after detaching. [`ProbeSet::counters`] reports, per ring, how many events the kernel queued
//! and how many it dropped because the ring was full: for every ring,
//! `received + dropped == generated`. [`TcpProbe`] is the older one-call bundle of a set with
//! only the TCP lifecycle program and its [`TcpEvents`].

mod btf;
mod close;
mod connect;
mod flows;
mod process;
mod set;
mod tcp;
mod tracefs;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub use close::{TcpCloseRecord, TcpCloses, detect_cgroup2_root};
pub use connect::{ConnectFailureRecord, ConnectFailures};
pub use flows::{FlowRecord, FlowStats};
use interlock_agent_common::AF_INET6;
pub use process::{ExitRecord, ExitStatus, OomKillRecord, ProcessEvents, ProcessRecord};
pub use set::{ProbeCounters, ProbeOptions, ProbeSet, ProgramStats, RingCounts};
pub use tcp::{TcpEvents, TcpProbe, TcpProbeOptions, TcpStateRecord};
use thiserror::Error;

/// The eBPF object built by `build.rs`, aligned as the ELF parser requires.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interlock-agent-ebpf"));

/// Why a probe could not be started or read.
#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("loading eBPF programs needs root (or CAP_BPF and CAP_PERFMON); run the agent as root")]
    NotPermitted,
    #[error(
        "the kernel's {tracepoint} tracepoint has an unexpected layout ({detail}); this kernel is not supported yet"
    )]
    UnexpectedLayout { tracepoint: String, detail: String },
    #[error(
        "cannot read {path}: {source}; mount tracefs with `mount -t tracefs tracefs /sys/kernel/tracing`"
    )]
    Tracefs {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel BTF: {0}")]
    Btf(String),
    #[error("cgroup v2 root for the sock_ops program: {0}")]
    Cgroup(String),
    #[error("{0} was not selected in ProbeOptions or was already taken from the probe set")]
    NotSelected(&'static str),
    #[error("eBPF: {0}")]
    Ebpf(String),
}

impl ProbeError {
    pub(crate) fn ebpf(context: &str, err: impl std::fmt::Display) -> Self {
        let text = err.to_string();
        if text.contains("Operation not permitted") || text.contains("EPERM") {
            Self::NotPermitted
        } else {
            Self::Ebpf(format!("{context}: {text}"))
        }
    }
}

/// The kernel's monotonic clock (`CLOCK_MONOTONIC`) in nanoseconds: the clock of every `ts_ns`
/// in the records (`bpf_ktime_get_ns`), so `monotonic_now_ns() - record.ts_ns` is its age.
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * 1_000_000_000 + nanos
}

/// A NUL-padded kernel `comm` as a string.
pub(crate) fn comm_string(comm: &[u8]) -> String {
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..len]).into_owned()
}

/// A kernel address (IPv4 in the first four bytes unless `family` is `AF_INET6`) and port.
pub(crate) fn socket_addr(family: u16, addr: [u8; 16], port: u16) -> SocketAddr {
    let ip = if family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(addr))
    } else {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    };
    SocketAddr::new(ip, port)
}

/// Pops every record of type `T` waiting in `ring`, converting each with `decode`.
pub(crate) fn drain_ring<T: aya::Pod, R>(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    out: &mut Vec<R>,
    decode: impl Fn(T) -> R,
) -> usize {
    let mut n = 0;
    while let Some(item) = ring.next() {
        if let Some(record) = read_record::<T>(&item) {
            out.push(decode(record));
            n += 1;
        }
    }
    n
}

/// One ring-buffer record as a `T`, if it is long enough.
pub(crate) fn read_record<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: the kernel program writes exactly one `T` per record, the length is checked
    // above, and `T: Pod` is plain old data (read unaligned).
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}
