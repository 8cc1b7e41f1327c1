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
/// is in the first four bytes of `saddr`/`daddr`. `tgid`/`tid`/`comm`/`cgroup_id` are those of
/// the task running when the transition happened, except for `SYN_SENT -> ESTABLISHED` and
/// `SYN_SENT -> CLOSE`, which carry the task that called `connect` (captured in process
/// context at `CLOSE -> SYN_SENT`). Other softirq-driven transitions (the passive side) carry
/// whoever delivered the packet, so consumers attribute them by socket (`skaddr`), not by pid.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpStateEvent {
    /// `bpf_ktime_get_ns()` at the transition.
    pub ts_ns: u64,
    /// Kernel address of the socket: a stable id for the socket's lifetime.
    pub skaddr: u64,
    /// `bpf_get_current_cgroup_id()`: the task's cgroup v2 id (1 for the root).
    pub cgroup_id: u64,
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

/// Indexes into the per-CPU `COUNTERS` array that the eBPF programs keep. Every ring buffer has
/// a `*_SENT` and a `*_DROPPED` counter, so that for each ring
/// `received by user space + dropped == generated` can be checked.
pub mod counter {
    /// Events written to the `TCP_EVENTS` ring buffer.
    pub const EVENTS_SENT: u32 = 0;
    /// Events lost because `TCP_EVENTS` was full (`bpf_ringbuf_reserve` failed).
    pub const EVENTS_DROPPED: u32 = 1;
    /// Events written to the `PROCESS_EVENTS` ring buffer (exits and OOM kills).
    pub const PROCESS_SENT: u32 = 2;
    /// Events lost because `PROCESS_EVENTS` was full.
    pub const PROCESS_DROPPED: u32 = 3;
    /// Events written to the `CONNECT_FAILURES` ring buffer.
    pub const CONNECT_FAILURES_SENT: u32 = 4;
    /// Events lost because `CONNECT_FAILURES` was full.
    pub const CONNECT_FAILURES_DROPPED: u32 = 5;
    /// `inet_sock_set_state` runs for another protocol than TCP (ignored, no event).
    pub const NOT_TCP: u32 = 6;
    /// Updates of the `CONNECTING`, `TCP_FLOWS` or `ESTABLISHED_AT` maps the kernel refused.
    pub const MAP_UPDATE_FAILED: u32 = 7;
    /// Records written to the `TCP_CLOSES` ring buffer.
    pub const TCP_CLOSES_SENT: u32 = 8;
    /// Records lost because `TCP_CLOSES` was full.
    pub const TCP_CLOSES_DROPPED: u32 = 9;
    /// Number of counters; the size of the `COUNTERS` map.
    pub const LEN: u32 = 10;
}

/// What a [`ProcessEvent`] reports.
pub mod process_event_kind {
    /// A thread group ended (`tp_btf/sched_process_exit` with `group_dead`).
    pub const EXIT: u32 = 1;
    /// The OOM killer chose a victim (`oom:mark_victim`).
    pub const OOM_KILL: u32 = 2;
}

/// A process exit or an OOM kill: rare, urgent events that wake user space.
///
/// For `EXIT`, `exit_code` is `task_struct::exit_code` in wait-status form: the low 7 bits are
/// the fatal signal (0 if none), bit 7 says a core was dumped, bits 8..16 are the exit status.
/// The OOM-only fields are in KiB as the tracepoint reports them and zero for exits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessEvent {
    /// `bpf_ktime_get_ns()` when the event happened.
    pub ts_ns: u64,
    /// One of `process_event_kind::*`.
    pub kind: u32,
    /// Thread-group id (the user-visible pid) of the process that exited or was chosen.
    pub pid: u32,
    /// For `EXIT`, the thread whose exit ended the group; for `OOM_KILL`, the task that ran
    /// the OOM killer (often not the victim).
    pub tid: u32,
    pub exit_code: i32,
    /// For `OOM_KILL`: the victim's uid.
    pub uid: u32,
    /// For `OOM_KILL`: the victim's `oom_score_adj`.
    pub oom_score_adj: i16,
    pub _pad: [u8; 2],
    pub total_vm_kb: u64,
    pub anon_rss_kb: u64,
    pub file_rss_kb: u64,
    pub shmem_rss_kb: u64,
    pub comm: [u8; COMM_LEN],
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, `Copy`, integers and byte arrays only, explicit padding (size test below).
unsafe impl aya::Pod for ProcessEvent {}

/// Names of the globals through which the agent configures the `tcp_state` program.
pub mod tcp_state_globals {
    /// Bit `1 << newstate` set: the `tcp_state` program queues transitions into that state to
    /// `TCP_EVENTS`. All bits by default; the agent asks only for the states it uses, so the
    /// ring carries a fraction of the transitions. Failed-connect tracking sees every
    /// transition whatever the mask.
    pub const STATE_MASK: &str = "TCP_STATE_MASK";
}

/// Names of the globals through which the agent passes `task_struct` offsets, computed from the
/// running kernel's BTF (`/sys/kernel/btf/vmlinux`), to the exit program, which reads the field
/// with `bpf_probe_read_kernel`: Rust eBPF objects carry no CO-RE relocations. pid, tgid and
/// comm need no offsets: the program runs in the exiting task and uses the current-task helpers.
pub mod task_struct_globals {
    pub const EXIT_CODE_OFFSET: &str = "TASK_EXIT_CODE_OFFSET";
}

/// A connect that never reached ESTABLISHED (`SYN_SENT -> CLOSE`): refused, timed out,
/// unreachable, or abandoned by the application. The pid and comm are those of the task that
/// called `connect` (captured at `CLOSE -> SYN_SENT`, in process context), not of whoever
/// handled the packet that ended it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectFailureEvent {
    /// `bpf_ktime_get_ns()` when the socket went to CLOSE.
    pub ts_ns: u64,
    /// `bpf_ktime_get_ns()` when the connect started (SYN_SENT).
    pub started_ns: u64,
    pub skaddr: u64,
    pub tgid: u32,
    pub tid: u32,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    /// 1 if a RST was received for this socket while connecting (`tcp:tcp_receive_reset`).
    pub reset_received: u8,
    pub _pad: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub comm: [u8; COMM_LEN],
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, `Copy`, integers and byte arrays only, explicit padding (size test below).
unsafe impl aya::Pod for ConnectFailureEvent {}

/// A TCP connection that ended (`BPF_SOCK_OPS_STATE_CB` with new state `TCP_CLOSE`, from the
/// `sock_ops` program on the cgroup v2 root), with what it carried over its life.
///
/// Only connections established while the program was attached are reported: the program
/// asks for state callbacks (`BPF_SOCK_OPS_STATE_CB_FLAG`) when the socket is established.
/// The counters are the kernel's `struct tcp_sock` fields (`include/linux/tcp.h`) as exposed
/// by `struct bpf_sock_ops` (`include/uapi/linux/bpf.h`). They count sequence space
/// (`tcp_snd_una_update` and `tcp_rcv_nxt_update` in `net/ipv4/tcp_input.c`), so a FIN counts
/// as one byte once received or acked, and so does the SYN of a connect once acked (an
/// accepted socket is created after the handshake: its SYN-ACK is not counted). Measured on a
/// loopback connection that sent 100,000 bytes and got 2,345 back, graceful close: connecting
/// side acked 100,002 / received 2,346, accepting side acked 2,346 / received 100,001. Ports are in host byte order; IPv4
/// addresses sit in the first four bytes. `saddr:sport` is this host.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpCloseEvent {
    /// `bpf_ktime_get_ns()` at the close.
    pub ts_ns: u64,
    /// `bpf_get_socket_cookie()`: a socket id unique for the kernel's uptime.
    pub cookie: u64,
    /// Nanoseconds since the socket was established; 0 if its start was evicted or missed.
    pub duration_ns: u64,
    /// `tcp_sock::bytes_received`: payload received, plus 1 for the peer's FIN.
    pub bytes_received: u64,
    /// `tcp_sock::bytes_acked`: payload the peer acked, plus 1 for our FIN and, for a
    /// connect, 1 for our SYN.
    pub bytes_acked: u64,
    /// `tcp_sock::srtt_us` exactly as the kernel keeps it: the smoothed RTT in microseconds
    /// **shifted left by 3** (eight times the RTT; `tcp_rtt_estimator` in
    /// `net/ipv4/tcp_input.c`). Zero if no RTT was ever sampled. User space divides by 8.
    pub srtt_us_x8: u32,
    /// `tcp_sock::total_retrans`: segments retransmitted over the connection's life.
    pub total_retrans: u32,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    /// 1 if this host opened the connection (`BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB`), 0 if it
    /// accepted it (`BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB`).
    pub active_open: u8,
    pub _pad: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, `Copy`, integers and byte arrays only, explicit padding (size test below).
unsafe impl aya::Pod for TcpCloseEvent {}

/// A TCP flow as the kernel's tracepoints name it, from the local side: `saddr:sport` is this
/// host. Ports are in host byte order; IPv4 addresses sit in the first four bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub _pad: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, `Copy`, integers and byte arrays only, explicit padding (size test below).
unsafe impl aya::Pod for FlowKey {}

/// Per-flow failure counters in the `TCP_FLOWS` LRU per-CPU hash map; user space sums the
/// per-CPU values.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    /// `tcp:tcp_retransmit_skb` hits.
    pub retransmits: u64,
    /// `tcp:tcp_send_reset` hits (this host sent a RST).
    pub resets_sent: u64,
    /// `tcp:tcp_receive_reset` hits (this host received a RST).
    pub resets_received: u64,
    /// `bpf_ktime_get_ns()` of the latest hit on this CPU.
    pub last_ns: u64,
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, `Copy`, integers only, no padding (size test below).
unsafe impl aya::Pod for FlowCounters {}

/// Offsets in the `oom:mark_victim` record (`include/trace/events/oom.h`), checked against the
/// running kernel's format file before loading.
pub mod mark_victim {
    pub const PID: usize = 8;
    /// `__data_loc char[] comm`: a u32 whose low 16 bits are the string's offset in the record.
    pub const COMM: usize = 12;
    pub const TOTAL_VM: usize = 16;
    pub const ANON_RSS: usize = 24;
    pub const FILE_RSS: usize = 32;
    pub const SHMEM_RSS: usize = 40;
    pub const UID: usize = 48;
    pub const OOM_SCORE_ADJ: usize = 64;
    pub const FIELDS: [(&str, usize); 8] = [
        ("pid", PID),
        ("comm", COMM),
        ("total_vm", TOTAL_VM),
        ("anon_rss", ANON_RSS),
        ("file_rss", FILE_RSS),
        ("shmem_rss", SHMEM_RSS),
        ("uid", UID),
        ("oom_score_adj", OOM_SCORE_ADJ),
    ];
}

/// Offsets in the `tcp:tcp_retransmit_skb` record (`include/trace/events/tcp.h`). The IPv4
/// addresses are only 2-byte aligned, so the program reads them as two 16-bit loads.
pub mod tcp_retransmit_skb {
    pub const SPORT: usize = 28;
    pub const DPORT: usize = 30;
    pub const FAMILY: usize = 32;
    pub const SADDR: usize = 34;
    pub const DADDR: usize = 38;
    pub const SADDR_V6: usize = 42;
    pub const DADDR_V6: usize = 58;
    pub const FIELDS: [(&str, usize); 7] = [
        ("sport", SPORT),
        ("dport", DPORT),
        ("family", FAMILY),
        ("saddr", SADDR),
        ("daddr", DADDR),
        ("saddr_v6", SADDR_V6),
        ("daddr_v6", DADDR_V6),
    ];
}

/// Offsets in the `tcp:tcp_send_reset` record (`include/trace/events/tcp.h`). Its `saddr` and
/// `daddr` are `struct sockaddr_in6`-sized blobs holding a `sockaddr_in` or `sockaddr_in6`
/// (family, big-endian port, address), already oriented so that `saddr` is this host.
pub mod tcp_send_reset {
    pub const SKADDR: usize = 16;
    pub const SADDR: usize = 32;
    pub const DADDR: usize = 60;
    /// Within a sockaddr: `sin_family`, `sin_port`, `sin_addr`, `sin6_addr`.
    pub const SA_FAMILY: usize = 0;
    pub const SA_PORT: usize = 2;
    pub const SA_ADDR4: usize = 4;
    pub const SA_ADDR6: usize = 8;
    pub const FIELDS: [(&str, usize); 3] = [("skaddr", SKADDR), ("saddr", SADDR), ("daddr", DADDR)];
}

/// Offsets in the `tcp:tcp_receive_reset` record (`include/trace/events/tcp.h`).
pub mod tcp_receive_reset {
    pub const SKADDR: usize = 8;
    pub const SPORT: usize = 16;
    pub const DPORT: usize = 18;
    pub const FAMILY: usize = 20;
    pub const SADDR: usize = 22;
    pub const DADDR: usize = 26;
    pub const SADDR_V6: usize = 30;
    pub const DADDR_V6: usize = 46;
    pub const FIELDS: [(&str, usize); 8] = [
        ("skaddr", SKADDR),
        ("sport", SPORT),
        ("dport", DPORT),
        ("family", FAMILY),
        ("saddr", SADDR),
        ("daddr", DADDR),
        ("saddr_v6", SADDR_V6),
        ("daddr_v6", DADDR_V6),
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_state_event_has_no_implicit_padding() {
        let fields = 8 * 3 + 4 + 4 + 4 + 4 + 2 * 4 + 16 + 16 + COMM_LEN;
        assert_eq!(size_of::<TcpStateEvent>(), fields);
        assert_eq!(align_of::<TcpStateEvent>(), 8);
    }

    #[test]
    fn tcp_close_event_has_no_implicit_padding() {
        let fields = 8 * 5 + 4 * 2 + 2 * 3 + 1 + 1 + 16 + 16;
        assert_eq!(size_of::<TcpCloseEvent>(), fields);
        assert_eq!(align_of::<TcpCloseEvent>(), 8);
    }

    #[test]
    fn process_event_has_no_implicit_padding() {
        let fields = 8 + 4 * 5 + 2 + 2 + 8 * 4 + COMM_LEN;
        assert_eq!(size_of::<ProcessEvent>(), fields);
        assert_eq!(align_of::<ProcessEvent>(), 8);
    }

    #[test]
    fn connect_failure_event_has_no_implicit_padding() {
        let fields = 8 * 3 + 4 * 2 + 2 * 3 + 1 + 1 + 16 + 16 + COMM_LEN;
        assert_eq!(size_of::<ConnectFailureEvent>(), fields);
        assert_eq!(align_of::<ConnectFailureEvent>(), 8);
    }

    #[test]
    fn flow_records_have_no_implicit_padding() {
        assert_eq!(size_of::<FlowKey>(), 2 * 4 + 16 + 16);
        assert_eq!(size_of::<FlowCounters>(), 8 * 4);
    }
}
