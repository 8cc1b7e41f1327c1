//! Process exits (`tp_btf/sched_process_exit`) and OOM kills (`oom:mark_victim`): rare, urgent
//! events for the `PROCESS_EVENTS` ring buffer, submitted so that they wake the consumer.
//!
//! `task_struct::exit_code` is read at an offset the agent takes from the running kernel's BTF
//! and passes as the global `TASK_EXIT_CODE_OFFSET` (no CO-RE relocations in Rust objects).
//! The tracepoint is called from `do_exit` (`kernel/exit.c`) in the exiting task's context, so
//! pid, tgid and comm come from the current-task helpers.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes,
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::RingBuf,
    programs::{BtfTracePointContext, TracePointContext},
};
use interlock_agent_common::{COMM_LEN, ProcessEvent, counter, mark_victim, process_event_kind};

use crate::shared::{bump, field, split_pid_tgid};

/// Exits and OOM kills. Its size is overridden by the loader.
#[map]
static PROCESS_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// Offset of `exit_code` in `struct task_struct`; set by the agent from BTF before loading.
/// Zero means "not set", and the program then reports nothing rather than garbage.
#[unsafe(no_mangle)]
static TASK_EXIT_CODE_OFFSET: u64 = 0;

#[btf_tracepoint(function = "sched_process_exit")]
pub fn process_exit(ctx: BtfTracePointContext) -> u32 {
    match try_process_exit(&ctx) {
        Ok(code) | Err(code) => code,
    }
}

fn try_process_exit(ctx: &BtfTracePointContext) -> Result<u32, u32> {
    // TP_PROTO(struct task_struct *p, bool group_dead) in include/trace/events/sched.h: only
    // the exit of a whole thread group is reported, which keeps the event rare.
    let group_dead: u64 = ctx.arg(1);
    if group_dead & 0xff == 0 {
        return Ok(0);
    }
    // SAFETY: a read-only global that the loader may have overwritten before loading.
    let offset = unsafe { core::ptr::read_volatile(&TASK_EXIT_CODE_OFFSET) };
    if offset == 0 {
        return Err(1);
    }
    let offset = usize::try_from(offset).map_err(|_| 2u32)?;
    let task: *const u8 = ctx.arg(0);
    // SAFETY: `task` is the exiting task and `offset` lies within `task_struct` (from BTF);
    // the helper fails cleanly on a bad address.
    let exit_code: i32 = unsafe {
        bpf_probe_read_kernel(task.wrapping_add(offset).cast::<i32>()).map_err(|_| 3u32)?
    };
    let (tgid, tid) = split_pid_tgid(bpf_get_current_pid_tgid());
    let event = ProcessEvent {
        // SAFETY: no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        kind: process_event_kind::EXIT,
        pid: tgid,
        tid,
        exit_code,
        uid: 0,
        oom_score_adj: 0,
        _pad: [0; 2],
        total_vm_kb: 0,
        anon_rss_kb: 0,
        file_rss_kb: 0,
        shmem_rss_kb: 0,
        comm: bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]),
    };
    submit_waking(&event)
}

#[tracepoint]
pub fn oom_mark_victim(ctx: TracePointContext) -> u32 {
    match try_oom_mark_victim(&ctx) {
        Ok(code) | Err(code) => code,
    }
}

fn try_oom_mark_victim(ctx: &TracePointContext) -> Result<u32, u32> {
    let pid: i32 = field(ctx, mark_victim::PID);
    let (_, tid) = split_pid_tgid(bpf_get_current_pid_tgid());
    // `__data_loc char[] comm`: low 16 bits are the string's offset inside the record.
    let comm_loc: u32 = field(ctx, mark_victim::COMM);
    let mut comm = [0u8; COMM_LEN];
    // SAFETY: the offset comes from the record itself and stays within it; a failed read
    // leaves the comm empty.
    let _ = unsafe {
        bpf_probe_read_kernel_str_bytes(
            (ctx.as_ptr() as *const u8).wrapping_add((comm_loc & 0xffff) as usize),
            &mut comm,
        )
    };
    let event = ProcessEvent {
        // SAFETY: no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        kind: process_event_kind::OOM_KILL,
        pid: pid.cast_unsigned(),
        tid,
        exit_code: 0,
        uid: field(ctx, mark_victim::UID),
        oom_score_adj: field(ctx, mark_victim::OOM_SCORE_ADJ),
        _pad: [0; 2],
        total_vm_kb: field(ctx, mark_victim::TOTAL_VM),
        anon_rss_kb: field(ctx, mark_victim::ANON_RSS),
        file_rss_kb: field(ctx, mark_victim::FILE_RSS),
        shmem_rss_kb: field(ctx, mark_victim::SHMEM_RSS),
        comm,
    };
    submit_waking(&event)
}

/// Queues `event` and lets the kernel wake a waiting consumer (flags 0: the ring's adaptive
/// wake-up). Exits and OOM kills are rare and urgent, so the wake-up cost is worth paying.
#[inline(always)]
fn submit_waking(event: &ProcessEvent) -> Result<u32, u32> {
    let Some(mut entry) = PROCESS_EVENTS.reserve::<ProcessEvent>(0) else {
        bump(counter::PROCESS_DROPPED);
        return Err(1);
    };
    entry.write(*event);
    entry.submit(0);
    bump(counter::PROCESS_SENT);
    Ok(0)
}
