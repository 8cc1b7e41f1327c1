//! TCP lifecycle from the `sock:inet_sock_set_state` tracepoint.
//!
//! Field offsets come from `interlock_agent_common::inet_sock_set_state`; the agent checks the
//! running kernel's tracepoint format file against them before it loads this program, so a
//! kernel with another layout is refused with a clear error instead of producing garbage.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use interlock_agent_common::{
    IPPROTO_TCP, TcpStateEvent, counter,
    inet_sock_set_state::{
        DADDR, DADDR_V6, DPORT, FAMILY, NEWSTATE, OLDSTATE, PROTOCOL, SADDR, SADDR_V6, SKADDR,
        SPORT,
    },
};

/// Discrete events for user space. Its size is overridden by the loader (`set_max_entries`).
#[map]
static TCP_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Per-CPU counters (bpfel has no atomic read-modify-write), indexed by `counter::*`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

#[tracepoint]
pub fn tcp_state(ctx: TracePointContext) -> u32 {
    match try_tcp_state(&ctx) {
        Ok(code) | Err(code) => code,
    }
}

/// Reads a field straight from the tracepoint record. Direct context reads are allowed for
/// tracepoint programs and cost far fewer instructions than one probe-read helper per field.
/// Every field read is naturally aligned in the record, so this is one load with a constant
/// offset: the verifier refuses loads through a ctx pointer that was moved (as a byte-wise
/// copy loop would do).
#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: the offset is within the tracepoint record and aligned for `T` (the agent checks
    // the kernel's format file before loading), and the verifier rejects the program otherwise.
    unsafe { core::ptr::read((ctx.as_ptr() as *const u8).add(offset) as *const T) }
}

/// A 16-byte IPv6 address field, read as two aligned 8-byte loads.
#[inline(always)]
fn addr16(ctx: &TracePointContext, offset: usize) -> [u8; 16] {
    let hi: u64 = field(ctx, offset);
    let lo: u64 = field(ctx, offset + 8);
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&hi.to_ne_bytes());
    out[8..].copy_from_slice(&lo.to_ne_bytes());
    out
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

fn try_tcp_state(ctx: &TracePointContext) -> Result<u32, u32> {
    let protocol: u16 = field(ctx, PROTOCOL);
    if protocol != IPPROTO_TCP {
        return Ok(0);
    }
    let Some(mut entry) = TCP_EVENTS.reserve::<TcpStateEvent>(0) else {
        bump(counter::EVENTS_DROPPED);
        return Err(1);
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let family: u16 = field(ctx, FAMILY);
    let (saddr, daddr) = if family == interlock_agent_common::AF_INET6 {
        (addr16(ctx, SADDR_V6), addr16(ctx, DADDR_V6))
    } else {
        let s: u32 = field(ctx, SADDR);
        let d: u32 = field(ctx, DADDR);
        let mut saddr = [0u8; 16];
        let mut daddr = [0u8; 16];
        saddr[..4].copy_from_slice(&s.to_ne_bytes());
        daddr[..4].copy_from_slice(&d.to_ne_bytes());
        (saddr, daddr)
    };
    let event = TcpStateEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        skaddr: field(ctx, SKADDR),
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        oldstate: field(ctx, OLDSTATE),
        newstate: field(ctx, NEWSTATE),
        sport: field(ctx, SPORT),
        dport: field(ctx, DPORT),
        family,
        protocol,
        saddr,
        daddr,
        comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
    };
    entry.write(event);
    // Frequent events do not wake the consumer: user space drains the ring on a short timer.
    // Waking on every event costs several times more than the probe itself
    // (../shared/TOOLCHAIN.md, "Cost of eBPF events").
    entry.submit(BPF_RB_NO_WAKEUP as u64);
    bump(counter::EVENTS_SENT);
    Ok(0)
}
