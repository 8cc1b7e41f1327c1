//! Record layouts shared by the kernel programs (`agent-ebpf`) and the agent.
//!
//! Every type here is `#[repr(C)]` with explicit padding so that the eBPF side and user space
//! agree byte for byte; they are defined once, here, and never copied by hand. This crate is
//! `no_std` and must not import anything beyond `core` (and `aya` for `Pod` behind `user`).
#![no_std]

/// `AF_INET` from `include/linux/socket.h`.
pub const AF_INET: u16 = 2;
/// `AF_INET6` from `include/linux/socket.h`.
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP` from `include/uapi/linux/in.h`.
pub const IPPROTO_TCP: u16 = 6;

/// TCP states as numbered in `include/net/tcp_states.h`.
pub mod tcp_state {
    pub const ESTABLISHED: i32 = 1;
    pub const SYN_SENT: i32 = 2;
    pub const SYN_RECV: i32 = 3;
    pub const FIN_WAIT1: i32 = 4;
    pub const FIN_WAIT2: i32 = 5;
    pub const TIME_WAIT: i32 = 6;
    pub const CLOSE: i32 = 7;
    pub const CLOSE_WAIT: i32 = 8;
    pub const LAST_ACK: i32 = 9;
    pub const LISTEN: i32 = 10;
    pub const CLOSING: i32 = 11;
    pub const NEW_SYN_RECV: i32 = 12;
}

/// Length of `task_struct::comm` (`TASK_COMM_LEN` in `include/linux/sched.h`).
pub const COMM_LEN: usize = 16;

/// One TCP state transition, from the `sock:inet_sock_set_state` tracepoint
/// (`include/trace/events/sock.h`).
///
/// Ports are in host byte order (the tracepoint converts them). For IPv4 sockets the address
/// is in the first four bytes of `saddr`/`daddr`. `pid`/`tgid`/`comm` are those of the task
/// running when the transition happened: right for the active side of a connect (process
/// context), but whoever delivered the packet for softirq-driven transitions, so consumers
/// attribute passive-side events by socket (`skaddr`), not by pid.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpStateEvent {
    /// `bpf_ktime_get_ns()` at the transition.
    pub ts_ns: u64,
    /// Kernel address of the socket: a stable id for the socket's lifetime.
    pub skaddr: u64,
    /// Thread-group id (the user-visible pid).
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    pub oldstate: i32,
    pub newstate: i32,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub comm: [u8; COMM_LEN],
}

#[cfg(feature = "user")]
// SAFETY: `TcpStateEvent` is `repr(C)`, `Copy`, made only of integers and byte arrays, and has
// no implicit padding (its fields sum to its size, checked by the test below).
unsafe impl aya::Pod for TcpStateEvent {}

/// Offsets of the `sock:inet_sock_set_state` record fields the TCP program reads, as printed by
/// `/sys/kernel/tracing/events/sock/inet_sock_set_state/format` (layout from
/// `include/trace/events/sock.h`). The program reads at these offsets; the agent checks the
/// running kernel's format file against them before loading it.
pub mod inet_sock_set_state {
    pub const SKADDR: usize = 8;
    pub const OLDSTATE: usize = 16;
    pub const NEWSTATE: usize = 20;
    pub const SPORT: usize = 24;
    pub const DPORT: usize = 26;
    pub const FAMILY: usize = 28;
    pub const PROTOCOL: usize = 30;
    pub const SADDR: usize = 32;
    pub const DADDR: usize = 36;
    pub const SADDR_V6: usize = 40;
    pub const DADDR_V6: usize = 56;
    /// Every field with its name in the format file, for the agent's layout check.
    pub const FIELDS: [(&str, usize); 11] = [
        ("skaddr", SKADDR),
        ("oldstate", OLDSTATE),
        ("newstate", NEWSTATE),
        ("sport", SPORT),
        ("dport", DPORT),
        ("family", FAMILY),
        ("protocol", PROTOCOL),
        ("saddr", SADDR),
        ("daddr", DADDR),
        ("saddr_v6", SADDR_V6),
        ("daddr_v6", DADDR_V6),
    ];
}

/// Indexes into the per-CPU `COUNTERS` array that the eBPF programs keep.
pub mod counter {
    /// Events written to the ring buffer.
    pub const EVENTS_SENT: u32 = 0;
    /// Events lost because the ring buffer was full (`bpf_ringbuf_reserve` failed).
    pub const EVENTS_DROPPED: u32 = 1;
    /// Number of counters; the size of the `COUNTERS` map.
    pub const LEN: u32 = 2;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_state_event_has_no_implicit_padding() {
        let fields = 8 + 8 + 4 + 4 + 4 + 4 + 2 * 4 + 16 + 16 + COMM_LEN;
        assert_eq!(size_of::<TcpStateEvent>(), fields);
        assert_eq!(align_of::<TcpStateEvent>(), 8);
    }
}
