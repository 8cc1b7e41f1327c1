//! TCP connections that end, with what they carried: a `sock_ops` program attached to the
//! cgroup v2 root, so it sees every TCP socket of every process on the host.
//!
//! When a connection is established (`BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB` for connects,
//! `BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB` for accepts; `tcp_init_transfer` in
//! `net/ipv4/tcp_input.c`) the program asks for state callbacks on that socket
//! (`BPF_SOCK_OPS_STATE_CB_FLAG`) and remembers the time in `ESTABLISHED_AT`, keyed by socket
//! cookie. `tcp_set_state` (`net/ipv4/tcp.c`) then calls it with `BPF_SOCK_OPS_STATE_CB` before
//! each state change; on the change to `TCP_CLOSE` (also reached from TIME_WAIT through
//! `tcp_done`) the socket is still whole, and the program queues a `TcpCloseEvent` with the
//! kernel's byte, RTT and retransmit counters to the `TCP_CLOSES` ring, without waking user
//! space (closes are as frequent as connections; user space drains on a timer).
//!
//! The context fields are read through `struct bpf_sock_ops` (`include/uapi/linux/bpf.h`),
//! which the verifier rewrites into loads from the socket: no offsets to check here.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_RB_NO_WAKEUP, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{map, sock_ops},
    maps::{LruHashMap, RingBuf},
    programs::SockOpsContext,
};
use interlock_agent_common::{AF_INET, AF_INET6, TcpCloseEvent, counter};

use crate::shared::bump;

/// Closed connections for user space. Its size is overridden by the loader.
#[map]
static TCP_CLOSES: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// When a socket was established and by which side. Kernel-only.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Established {
    at_ns: u64,
    active_open: u8,
    _pad: [u8; 7],
}

/// Established sockets by cookie. LRU so that closes the program never sees (a socket freed
/// without reaching `tcp_set_state(TCP_CLOSE)`) can never fill it; an evicted socket still
/// reports its close, with a zero duration.
#[map]
static ESTABLISHED_AT: LruHashMap<u64, Established> = LruHashMap::with_max_entries(65536, 0);

/// A `sock_ops` program must return 1 (`SK_PASS`-like "carry on"); the verifier refuses
/// anything outside 0..=1 for cgroup programs.
const CONTINUE: u32 = 1;

// The function is not called `sockops`: that is its ELF section, and bpf-linker refuses a
// symbol that shares its section's name.
#[sock_ops]
pub fn tcp_close(ctx: SockOpsContext) -> u32 {
    // The outcome only matters for the counters, which `try_tcp_close` keeps itself.
    let _ = try_tcp_close(&ctx);
    CONTINUE
}

fn try_tcp_close(ctx: &SockOpsContext) -> Result<u32, u32> {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return established(ctx, op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB);
    }
    // args[0] is the old state, args[1] the new one.
    if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        return closed(ctx);
    }
    Ok(0)
}

#[inline(always)]
fn established(ctx: &SockOpsContext, active: bool) -> Result<u32, u32> {
    // Keep any flag another program of ours set, add the state callback.
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    ctx.set_cb_flags(flags.cast_signed()).map_err(|_| 2u32)?;
    // SAFETY: `ctx` is this program's sock_ops context, as the helper expects.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let start = Established {
        // SAFETY: no preconditions.
        at_ns: unsafe { bpf_ktime_get_ns() },
        active_open: u8::from(active),
        _pad: [0; 7],
    };
    if ESTABLISHED_AT
        .insert(cookie, start, u64::from(BPF_ANY))
        .is_err()
    {
        bump(counter::MAP_UPDATE_FAILED);
        return Err(3);
    }
    Ok(0)
}

/// One `u32` context field, loaded straight from the context pointer at a constant offset:
/// the verifier refuses loads through a moved context pointer ("dereference of modified ctx
/// ptr"), which LLVM produces when it copies an array field such as `local_ip6` as a whole.
#[inline(always)]
fn ctx_u32(field: *const u32) -> u32 {
    // SAFETY: `field` points into this program's `bpf_sock_ops` context; volatile keeps the
    // load a single 4-byte load at the field's own offset.
    unsafe { core::ptr::read_volatile(field) }
}

/// A network-order IPv6 address (four `u32` context fields) as 16 bytes.
#[inline(always)]
fn address6(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, word) in words.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    out
}

/// A network-order IPv4 address in the first four bytes.
#[inline(always)]
fn address4(word: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&word.to_ne_bytes());
    out
}

#[inline(always)]
fn closed(ctx: &SockOpsContext) -> Result<u32, u32> {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: as in `established`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let (duration_ns, active_open) = match ESTABLISHED_AT.get_ptr(cookie) {
        Some(start) => {
            // SAFETY: a live map value, copied out at once.
            let start = unsafe { *start };
            (now.saturating_sub(start.at_ns), start.active_open)
        }
        None => (0, 0),
    };
    let _ = ESTABLISHED_AT.remove(cookie);

    let ops = ctx.ops;
    // SAFETY: `ops` is the context pointer; each field is one load the verifier rewrites.
    let (bytes_received, bytes_acked, srtt_us_x8, total_retrans) = unsafe {
        (
            (*ops).bytes_received,
            (*ops).bytes_acked,
            (*ops).srtt_us,
            (*ops).total_retrans,
        )
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the family is a u16 in struct sock_common"
    )]
    let family = ctx.family() as u16;
    if family != AF_INET && family != AF_INET6 {
        return Err(4);
    }
    let (saddr, daddr) = if family == AF_INET6 {
        // SAFETY: only the fields' addresses are taken here; `ctx_u32` loads them.
        let (local, remote) = unsafe {
            (
                [
                    ctx_u32(&raw const (*ops).local_ip6[0]),
                    ctx_u32(&raw const (*ops).local_ip6[1]),
                    ctx_u32(&raw const (*ops).local_ip6[2]),
                    ctx_u32(&raw const (*ops).local_ip6[3]),
                ],
                [
                    ctx_u32(&raw const (*ops).remote_ip6[0]),
                    ctx_u32(&raw const (*ops).remote_ip6[1]),
                    ctx_u32(&raw const (*ops).remote_ip6[2]),
                    ctx_u32(&raw const (*ops).remote_ip6[3]),
                ],
            )
        };
        (address6(local), address6(remote))
    } else {
        (address4(ctx.local_ip4()), address4(ctx.remote_ip4()))
    };
    // `local_port` is in host order; `remote_port` holds the network-order port in its first
    // two bytes (the kernel loads `skc_dport` and shifts it up on little-endian hosts).
    #[expect(
        clippy::cast_possible_truncation,
        reason = "ports are 16-bit; the upper bits are zero"
    )]
    let (sport, dport) = (
        ctx.local_port() as u16,
        u32::from_be(ctx.remote_port()) as u16,
    );

    let Some(mut entry) = TCP_CLOSES.reserve::<TcpCloseEvent>(0) else {
        bump(counter::TCP_CLOSES_DROPPED);
        return Err(1);
    };
    entry.write(TcpCloseEvent {
        ts_ns: now,
        cookie,
        duration_ns,
        bytes_received,
        bytes_acked,
        srtt_us_x8,
        total_retrans,
        sport,
        dport,
        family,
        active_open,
        _pad: 0,
        saddr,
        daddr,
    });
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
    bump(counter::TCP_CLOSES_SENT);
    Ok(0)
}
