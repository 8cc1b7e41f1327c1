//! What every program shares: the per-CPU `COUNTERS` array and direct tracepoint field reads.

use aya_ebpf::{EbpfContext as _, macros::map, maps::PerCpuArray, programs::TracePointContext};
use interlock_agent_common::counter;

/// Per-CPU counters (bpfel has no atomic read-modify-write), indexed by `counter::*`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

/// Adds one to `COUNTERS[index]` on this CPU.
#[inline(always)]
pub(crate) fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

/// Reads a field straight from the tracepoint record. Direct context reads are allowed for
/// tracepoint programs and cost far fewer instructions than one probe-read helper per field.
/// Every field read must be naturally aligned in the record (the kernel's
/// `tp_prog_is_valid_access` refuses `off % size != 0`), so this is one load with a constant
/// offset: the verifier refuses loads through a ctx pointer that was moved (as a byte-wise
/// copy loop would do).
#[inline(always)]
pub(crate) fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: the offset is within the tracepoint record and aligned for `T` (the agent checks
    // the kernel's format file before loading), and the verifier rejects the program otherwise.
    unsafe { core::ptr::read((ctx.as_ptr() as *const u8).add(offset) as *const T) }
}

/// A 4-byte IPv4 address at a 2-byte aligned offset, as two 16-bit loads, placed in the first
/// four bytes of a 16-byte address.
#[inline(always)]
pub(crate) fn addr4_u16(ctx: &TracePointContext, offset: usize) -> [u8; 16] {
    let hi: u16 = field(ctx, offset);
    let lo: u16 = field(ctx, offset + 2);
    let mut out = [0u8; 16];
    out[..2].copy_from_slice(&hi.to_ne_bytes());
    out[2..4].copy_from_slice(&lo.to_ne_bytes());
    out
}

/// A 4-byte IPv4 address at a 4-byte aligned offset, in the first four bytes.
#[inline(always)]
pub(crate) fn addr4(ctx: &TracePointContext, offset: usize) -> [u8; 16] {
    let word: u32 = field(ctx, offset);
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&word.to_ne_bytes());
    out
}

/// A 16-byte IPv6 address at any offset, with one probe read (unaligned fields cannot be
/// loaded directly; IPv6 failures are rare enough for the helper's cost).
#[inline(always)]
pub(crate) fn addr16_probe(ctx: &TracePointContext, offset: usize) -> [u8; 16] {
    // SAFETY: the offset lies within the record (checked against the format file); a failed
    // read leaves an all-zero address.
    unsafe { ctx.read_at::<[u8; 16]>(offset) }.unwrap_or([0u8; 16])
}

/// Low 32 bits (the thread id) and high 32 bits (the thread-group id) of
/// `bpf_get_current_pid_tgid()`.
#[inline(always)]
pub(crate) fn split_pid_tgid(pid_tgid: u64) -> (u32, u32) {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the helper packs two u32s into one u64"
    )]
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}
