//! TCP lifecycle from the `sock:inet_sock_set_state` tracepoint: every transition goes to the
//! `TCP_EVENTS` ring buffer, and connects that never reach ESTABLISHED go to the
//! `CONNECT_FAILURES` ring buffer with the pid of the task that called `connect`.
//!
//! Field offsets come from `interlock_agent_common::inet_sock_set_state`; the agent checks the
//! running kernel's tracepoint format file against them before it loads this program, so a
//! kernel with another layout is refused with a clear error instead of producing garbage.
//!
//! Failed connects: `tcp_v4_connect`/`tcp_v6_connect` (`net/ipv4/tcp_ipv4.c`) move the socket
//! CLOSE -> SYN_SENT in the caller's context, so the caller is remembered in `CONNECTING`,
//! keyed by the socket's address. The socket later goes SYN_SENT -> ESTABLISHED (forgotten) or
//! SYN_SENT -> CLOSE (a failed connect, often in softirq context where the current task is
//! unrelated: the remembered task is reported). The SYN_SENT -> ESTABLISHED event also carries
//! the remembered task (pid, comm, cgroup), so an established active open names the process
//! that connected even when the SYN-ACK was handled in softirq context.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
    },
    macros::map,
    macros::tracepoint,
    maps::{LruHashMap, RingBuf},
    programs::TracePointContext,
};
use interlock_agent_common::{
    AF_INET6, COMM_LEN, ConnectFailureEvent, IPPROTO_TCP, TcpStateEvent, counter,
    inet_sock_set_state::{
        DADDR, DADDR_V6, DPORT, FAMILY, NEWSTATE, OLDSTATE, PROTOCOL, SADDR, SADDR_V6, SKADDR,
        SPORT,
    },
    tcp_state,
};

use crate::shared::{addr4, bump, field, split_pid_tgid};

/// Discrete events for user space. Its size is overridden by the loader (`map_max_entries`).
#[map]
static TCP_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Failed connects for user space. Its size is overridden by the loader.
#[map]
static CONNECT_FAILURES: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// Who started a connect that is still in SYN_SENT. Kernel-only; never read by user space.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct ConnectStart {
    started_ns: u64,
    cgroup_id: u64,
    tgid: u32,
    tid: u32,
    comm: [u8; COMM_LEN],
    reset_received: u8,
    _pad: [u8; 7],
}

/// Sockets in SYN_SENT, keyed by socket address. LRU so that a missed CLOSE (e.g. the program
/// attached mid-connect) can never fill it.
#[map]
static CONNECTING: LruHashMap<u64, ConnectStart> = LruHashMap::with_max_entries(8192, 0);

/// Called by the `tcp_receive_reset` program: the connect on `skaddr` (if any) was refused.
#[inline(always)]
pub(crate) fn mark_connect_reset(skaddr: u64) {
    if let Some(start) = CONNECTING.get_ptr_mut(skaddr) {
        // SAFETY: a live map value; a racing writer could only set the same flag.
        unsafe { (*start).reset_received = 1 };
    }
}

#[tracepoint]
pub fn tcp_state(ctx: TracePointContext) -> u32 {
    match try_tcp_state(&ctx) {
        Ok(code) | Err(code) => code,
    }
}

/// A 16-byte IPv6 address field at an 8-byte aligned offset, read as two aligned 8-byte loads.
#[inline(always)]
fn addr16(ctx: &TracePointContext, offset: usize) -> [u8; 16] {
    let hi: u64 = field(ctx, offset);
    let lo: u64 = field(ctx, offset + 8);
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&hi.to_ne_bytes());
    out[8..].copy_from_slice(&lo.to_ne_bytes());
    out
}

/// Which new states are queued to `TCP_EVENTS`, as `1 << state` bits; set by the loader
/// (`interlock_agent_common::tcp_state_globals::STATE_MASK`), every state by default.
#[unsafe(no_mangle)]
static TCP_STATE_MASK: u32 = u32::MAX;

fn try_tcp_state(ctx: &TracePointContext) -> Result<u32, u32> {
    let protocol: u16 = field(ctx, PROTOCOL);
    if protocol != IPPROTO_TCP {
        bump(counter::NOT_TCP);
        return Ok(0);
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let (mut tgid, mut tid) = split_pid_tgid(pid_tgid);
    let mut comm = bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]);
    // SAFETY: no preconditions.
    let mut cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let skaddr: u64 = field(ctx, SKADDR);
    let oldstate: i32 = field(ctx, OLDSTATE);
    let newstate: i32 = field(ctx, NEWSTATE);
    let family: u16 = field(ctx, FAMILY);
    let (saddr, daddr) = if family == AF_INET6 {
        (addr16(ctx, SADDR_V6), addr16(ctx, DADDR_V6))
    } else {
        (addr4(ctx, SADDR), addr4(ctx, DADDR))
    };
    let sport: u16 = field(ctx, SPORT);
    let dport: u16 = field(ctx, DPORT);

    // Failed-connect tracking runs before the TCP_EVENTS reservation so that a full ring
    // never hides a failed connect.
    if oldstate == tcp_state::CLOSE && newstate == tcp_state::SYN_SENT {
        let start = ConnectStart {
            started_ns: now,
            cgroup_id,
            tgid,
            tid,
            comm,
            reset_received: 0,
            _pad: [0; 7],
        };
        if CONNECTING
            .insert(skaddr, start, u64::from(BPF_ANY))
            .is_err()
        {
            bump(counter::MAP_UPDATE_FAILED);
        }
    } else if oldstate == tcp_state::SYN_SENT {
        if let Some(start) = CONNECTING.get_ptr(skaddr) {
            // SAFETY: a live map value, copied out at once.
            let start = unsafe { *start };
            // Whatever the socket became, the event names the task that connected.
            tgid = start.tgid;
            tid = start.tid;
            comm = start.comm;
            cgroup_id = start.cgroup_id;
            if newstate == tcp_state::CLOSE {
                report_failed_connect(&ConnectFailureEvent {
                    ts_ns: now,
                    started_ns: start.started_ns,
                    skaddr,
                    tgid,
                    tid,
                    sport,
                    dport,
                    family,
                    reset_received: start.reset_received,
                    _pad: 0,
                    saddr,
                    daddr,
                    comm,
                });
            }
        }
        let _ = CONNECTING.remove(skaddr);
    }

    // Only the transitions user space asked for go to the ring (see `tcp_state_globals`).
    // SAFETY: a plain read of a global the loader may have set; never written here.
    let mask = unsafe { core::ptr::read_volatile(&TCP_STATE_MASK) };
    let bit = u32::try_from(newstate)
        .ok()
        .and_then(|s| 1u32.checked_shl(s))
        .unwrap_or(0);
    if mask & bit == 0 {
        return Ok(0);
    }
    let Some(mut entry) = TCP_EVENTS.reserve::<TcpStateEvent>(0) else {
        bump(counter::EVENTS_DROPPED);
        return Err(1);
    };
    entry.write(TcpStateEvent {
        ts_ns: now,
        skaddr,
        cgroup_id,
        tgid,
        tid,
        oldstate,
        newstate,
        sport,
        dport,
        family,
        protocol,
        saddr,
        daddr,
        comm,
    });
    // Frequent events do not wake the consumer: user space drains the ring on a short timer.
    // Waking on every event costs several times more than the probe itself
    // (../shared/TOOLCHAIN.md, "Cost of eBPF events").
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
    bump(counter::EVENTS_SENT);
    Ok(0)
}

/// Failed connects can come in storms (a dead backend), so they do not wake the consumer.
#[inline(always)]
fn report_failed_connect(event: &ConnectFailureEvent) {
    match CONNECT_FAILURES.reserve::<ConnectFailureEvent>(0) {
        Some(mut entry) => {
            entry.write(*event);
            entry.submit(u64::from(BPF_RB_NO_WAKEUP));
            bump(counter::CONNECT_FAILURES_SENT);
        }
        None => bump(counter::CONNECT_FAILURES_DROPPED),
    }
}
