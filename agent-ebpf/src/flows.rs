//! Per-flow TCP failure counters: retransmits (`tcp:tcp_retransmit_skb`) and resets sent
//! (`tcp:tcp_send_reset`) or received (`tcp:tcp_receive_reset`), aggregated in the kernel in
//! the `TCP_FLOWS` LRU per-CPU hash map. User space reads (and drains) it on a timer: no event
//! per packet ever reaches a ring buffer.
//!
//! Field offsets come from `interlock_agent_common::{tcp_retransmit_skb, tcp_send_reset,
//! tcp_receive_reset}`; the agent checks them against the kernel's format files before loading.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::{map, tracepoint},
    maps::LruPerCpuHashMap,
    programs::TracePointContext,
};
use interlock_agent_common::{
    AF_INET, AF_INET6, FlowCounters, FlowKey, counter, tcp_receive_reset, tcp_retransmit_skb,
    tcp_send_reset,
};

use crate::{
    shared::{addr4, addr4_u16, addr16_probe, bump, field},
    tcp::mark_connect_reset,
};

/// Failure counters per flow. LRU: the least recently hit flows make room for new ones, so the
/// map stays bounded; per-CPU: plain increments are exact without atomics.
#[map]
static TCP_FLOWS: LruPerCpuHashMap<FlowKey, FlowCounters> =
    LruPerCpuHashMap::with_max_entries(4096, 0);

#[derive(Clone, Copy)]
enum Hit {
    Retransmit,
    ResetSent,
    ResetReceived,
}

#[inline(always)]
fn add(counters: &mut FlowCounters, hit: Hit, now: u64) {
    match hit {
        Hit::Retransmit => counters.retransmits += 1,
        Hit::ResetSent => counters.resets_sent += 1,
        Hit::ResetReceived => counters.resets_received += 1,
    }
    counters.last_ns = now;
}

/// Counts one hit for `key` on this CPU, creating the flow's entry if needed.
#[inline(always)]
fn count(key: &FlowKey, hit: Hit) {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(counters) = TCP_FLOWS.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of a per-CPU map value; only this CPU writes it now.
        add(unsafe { &mut *counters }, hit, now);
        return;
    }
    let mut fresh = FlowCounters::default();
    add(&mut fresh, hit, now);
    if TCP_FLOWS.insert(key, fresh, u64::from(BPF_NOEXIST)).is_ok() {
        return;
    }
    // Another CPU created the entry between our lookup and insert: count in our slot of it.
    match TCP_FLOWS.get_ptr_mut(key) {
        // SAFETY: as above.
        Some(counters) => add(unsafe { &mut *counters }, hit, now),
        None => bump(counter::MAP_UPDATE_FAILED),
    }
}

/// Builds a key from a record with `sport`, `dport`, `family` and address fields laid out like
/// `tcp_retransmit_skb` and `tcp_receive_reset` (IPv4 addresses 2-byte aligned).
#[inline(always)]
fn key_from_ports_record(
    ctx: &TracePointContext,
    sport: usize,
    dport: usize,
    family: usize,
    addrs: (usize, usize, usize, usize),
) -> Option<FlowKey> {
    let (saddr4, daddr4, saddr6, daddr6) = addrs;
    let family: u16 = field(ctx, family);
    let (saddr, daddr) = match family {
        AF_INET => (addr4_u16(ctx, saddr4), addr4_u16(ctx, daddr4)),
        AF_INET6 => (addr16_probe(ctx, saddr6), addr16_probe(ctx, daddr6)),
        _ => return None,
    };
    Some(FlowKey {
        family,
        sport: field(ctx, sport),
        dport: field(ctx, dport),
        _pad: 0,
        saddr,
        daddr,
    })
}

#[tracepoint]
pub fn tcp_retransmit(ctx: TracePointContext) -> u32 {
    match try_tcp_retransmit(&ctx) {
        Ok(code) | Err(code) => code,
    }
}

fn try_tcp_retransmit(ctx: &TracePointContext) -> Result<u32, u32> {
    use tcp_retransmit_skb::{DADDR, DADDR_V6, DPORT, FAMILY, SADDR, SADDR_V6, SPORT};
    let key = key_from_ports_record(
        ctx,
        SPORT,
        DPORT,
        FAMILY,
        (SADDR, DADDR, SADDR_V6, DADDR_V6),
    )
    .ok_or(1u32)?;
    count(&key, Hit::Retransmit);
    Ok(0)
}

#[tracepoint]
pub fn tcp_reset_received(ctx: TracePointContext) -> u32 {
    match try_tcp_reset_received(&ctx) {
        Ok(code) | Err(code) => code,
    }
}

fn try_tcp_reset_received(ctx: &TracePointContext) -> Result<u32, u32> {
    use tcp_receive_reset::{DADDR, DADDR_V6, DPORT, FAMILY, SADDR, SADDR_V6, SKADDR, SPORT};
    // A connect ended by a RST is a refused connect: tell the failed-connect tracker.
    mark_connect_reset(field(ctx, SKADDR));
    let key = key_from_ports_record(
        ctx,
        SPORT,
        DPORT,
        FAMILY,
        (SADDR, DADDR, SADDR_V6, DADDR_V6),
    )
    .ok_or(1u32)?;
    count(&key, Hit::ResetReceived);
    Ok(0)
}

#[tracepoint]
pub fn tcp_reset_sent(ctx: TracePointContext) -> u32 {
    match try_tcp_reset_sent(&ctx) {
        Ok(code) | Err(code) => code,
    }
}

fn try_tcp_reset_sent(ctx: &TracePointContext) -> Result<u32, u32> {
    use tcp_send_reset::{DADDR, SA_ADDR4, SA_ADDR6, SA_FAMILY, SA_PORT, SADDR};
    let family: u16 = field(ctx, SADDR + SA_FAMILY);
    let (saddr, daddr) = match family {
        // SADDR and DADDR are 4-byte aligned, so the IPv4 address at +4 is too.
        AF_INET => (addr4(ctx, SADDR + SA_ADDR4), addr4(ctx, DADDR + SA_ADDR4)),
        AF_INET6 => (
            addr16_probe(ctx, SADDR + SA_ADDR6),
            addr16_probe(ctx, DADDR + SA_ADDR6),
        ),
        // Neither a socket nor a packet to take the addresses from (include/trace/events/tcp.h).
        _ => return Err(1),
    };
    let sport: u16 = field(ctx, SADDR + SA_PORT);
    let dport: u16 = field(ctx, DADDR + SA_PORT);
    let key = FlowKey {
        family,
        // `sin_port` is in network byte order.
        sport: u16::from_be(sport),
        dport: u16::from_be(dport),
        _pad: 0,
        saddr,
        daddr,
    };
    count(&key, Hit::ResetSent);
    Ok(0)
}
