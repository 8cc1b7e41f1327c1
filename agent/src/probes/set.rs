//! [`ProbeSet`]: one loaded copy of the eBPF object, with the selected programs attached.

use std::{fs::File, os::fd::OwnedFd, path::PathBuf, time::Duration};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        BtfTracePoint, CgroupAttachMode, Program, SockOps, TracePoint, sock_ops::SockOpsLinkId,
        tp_btf::BtfTracePointLinkId, trace_point::TracePointLinkId,
    },
};
use interlock_agent_common::{
    counter, inet_sock_set_state, mark_victim, task_struct_globals, tcp_receive_reset,
    tcp_retransmit_skb, tcp_send_reset, tcp_state_globals,
};

use super::{
    ConnectFailures, EBPF_OBJECT, FlowStats, ProbeError, ProcessEvents, TcpCloses, TcpEvents,
    btf::KernelBtf,
    detect_cgroup2_root,
    tracefs::{Tracepoint, check_layout},
};

const INET_SOCK_SET_STATE: Tracepoint = Tracepoint {
    category: "sock",
    name: "inet_sock_set_state",
    fields: &inet_sock_set_state::FIELDS,
};
const MARK_VICTIM: Tracepoint = Tracepoint {
    category: "oom",
    name: "mark_victim",
    fields: &mark_victim::FIELDS,
};
const TCP_RETRANSMIT_SKB: Tracepoint = Tracepoint {
    category: "tcp",
    name: "tcp_retransmit_skb",
    fields: &tcp_retransmit_skb::FIELDS,
};
const TCP_SEND_RESET: Tracepoint = Tracepoint {
    category: "tcp",
    name: "tcp_send_reset",
    fields: &tcp_send_reset::FIELDS,
};
const TCP_RECEIVE_RESET: Tracepoint = Tracepoint {
    category: "tcp",
    name: "tcp_receive_reset",
    fields: &tcp_receive_reset::FIELDS,
};

/// The BTF-enabled tracepoint of the exit program, and the parameters it must have:
/// `(void *__data, struct task_struct *p, bool group_dead)` (`include/trace/events/sched.h`).
const SCHED_PROCESS_EXIT: &str = "sched_process_exit";
const SCHED_PROCESS_EXIT_PARAMS: usize = 3;

/// Which programs to attach and how big their outputs are.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// `tcp_state` on `sock:inet_sock_set_state`: every TCP transition ([`TcpEvents`]) and
    /// failed connects ([`ConnectFailures`]).
    pub tcp_state: bool,
    /// `process_exit` and `oom_mark_victim` ([`ProcessEvents`]).
    pub process: bool,
    /// `tcp_retransmit`, `tcp_reset_sent`, `tcp_reset_received` ([`FlowStats`]).
    pub flows: bool,
    /// `tcp_close`, a `sock_ops` program on the cgroup v2 root: closed connections with their
    /// bytes, RTT and duration ([`TcpCloses`]).
    pub tcp_close: bool,
    /// The cgroup v2 directory `tcp_close` attaches to; `None` finds the root from the mount
    /// table ([`super::detect_cgroup2_root`]). A child cgroup limits it to that subtree.
    pub tcp_close_cgroup: Option<PathBuf>,
    /// The new TCP states whose transitions go to [`TcpEvents`], as `1 << state` bits
    /// (`interlock_agent_common::tcp_state`); all by default. Failed connects are tracked
    /// whatever the mask.
    pub tcp_state_mask: u32,
    /// Ring sizes in bytes: each a power of two and a multiple of the page size.
    pub tcp_ring_bytes: u32,
    pub connect_failure_ring_bytes: u32,
    pub process_ring_bytes: u32,
    pub tcp_close_ring_bytes: u32,
    /// Flows the kernel keeps counters for; the least recently hit are evicted beyond it.
    pub flow_entries: u32,
    /// Turn on the kernel's per-program run statistics (`kernel.bpf_stats_enabled`) for the
    /// life of the set, for [`ProbeSet::program_stats`]. Costs a little on every program run
    /// machine-wide: for tests and benchmarks.
    pub run_stats: bool,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            tcp_state: true,
            process: true,
            flows: true,
            tcp_close: true,
            tcp_close_cgroup: None,
            tcp_state_mask: u32::MAX,
            tcp_ring_bytes: 256 * 1024,
            connect_failure_ring_bytes: 64 * 1024,
            process_ring_bytes: 64 * 1024,
            tcp_close_ring_bytes: 256 * 1024,
            flow_entries: 4096,
            run_stats: false,
        }
    }
}

impl ProbeOptions {
    /// Nothing selected: a starting point for `ProbeOptions { process: true, ..ProbeOptions::none() }`.
    pub fn none() -> Self {
        Self {
            tcp_state: false,
            process: false,
            flows: false,
            tcp_close: false,
            ..Self::default()
        }
    }
}

/// Events one ring buffer queued and dropped (ring full), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingCounts {
    pub sent: u64,
    pub dropped: u64,
}

/// The kernel-side counters of a [`ProbeSet`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeCounters {
    pub tcp_events: RingCounts,
    pub connect_failures: RingCounts,
    pub process_events: RingCounts,
    pub tcp_closes: RingCounts,
    /// `inet_sock_set_state` runs for other protocols than TCP (no event by design).
    pub not_tcp: u64,
    /// Per-socket or per-flow map updates the kernel refused (counts may be low by this much).
    pub map_update_failed: u64,
}

/// Per-program run statistics (only counted while `ProbeOptions::run_stats` is on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: String,
    pub run_count: u64,
    pub run_time: Duration,
    pub verified_instructions: Option<u32>,
}

/// One loaded copy of the eBPF object with the selected programs attached. Dropping it (or
/// [`ProbeSet::detach`]) detaches them; handles taken from it keep their maps.
pub struct ProbeSet {
    // Declared first so the programs detach before the statistics fd closes.
    ebpf: Ebpf,
    /// Programs loaded (verified); they stay loaded until the set drops.
    loaded: Vec<&'static str>,
    links: Vec<AttachedLink>,
    counters: PerCpuArray<MapData, u64>,
    tcp_events: Option<TcpEvents>,
    connect_failures: Option<ConnectFailures>,
    process_events: Option<ProcessEvents>,
    flows: Option<FlowStats>,
    tcp_closes: Option<TcpCloses>,
    _run_stats: Option<OwnedFd>,
}

impl std::fmt::Debug for ProbeSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeSet")
            .field("loaded", &self.loaded)
            .finish_non_exhaustive()
    }
}

impl ProbeSet {
    /// Checks the kernel (tracepoint layouts, BTF), loads the object once and attaches the
    /// selected programs.
    pub fn load(options: &ProbeOptions) -> Result<Self, ProbeError> {
        let ProbeOptions {
            tcp_state,
            process,
            flows,
            tcp_close,
            ref tcp_close_cgroup,
            tcp_state_mask,
            tcp_ring_bytes,
            connect_failure_ring_bytes,
            process_ring_bytes,
            tcp_close_ring_bytes,
            flow_entries,
            run_stats,
        } = *options;
        let mut tracepoints = Vec::new();
        if tcp_state {
            tracepoints.push(INET_SOCK_SET_STATE);
        }
        if process {
            tracepoints.push(MARK_VICTIM);
        }
        if flows {
            tracepoints.extend([TCP_RETRANSMIT_SKB, TCP_SEND_RESET, TCP_RECEIVE_RESET]);
        }
        for tracepoint in &tracepoints {
            let root = check_layout(tracepoint)?;
            tracing::debug!(
                root,
                tracepoint = tracepoint.name,
                "tracepoint layout matches"
            );
        }
        let exit_code_offset = if process { exit_code_offset()? } else { 0 };
        // Opened before loading so a missing cgroup2 mount is reported as such.
        let close_cgroup = if tcp_close {
            let path = match tcp_close_cgroup {
                Some(path) => path.clone(),
                None => detect_cgroup2_root()?,
            };
            let dir = File::open(&path).map_err(|e| {
                ProbeError::Cgroup(format!(
                    "cannot open {}: {e}; set tcp_close_cgroup to a cgroup v2 directory",
                    path.display()
                ))
            })?;
            tracing::debug!(cgroup = %path.display(), "tcp_close attaches here");
            Some(dir)
        } else {
            None
        };

        let run_stats = if run_stats {
            Some(
                aya::sys::enable_stats(aya::sys::Stats::RunTime)
                    .map_err(|e| ProbeError::ebpf("enabling run statistics", e))?,
            )
        } else {
            None
        };
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("TCP_EVENTS", tcp_ring_bytes)
            .map_max_entries("CONNECT_FAILURES", connect_failure_ring_bytes)
            .map_max_entries("PROCESS_EVENTS", process_ring_bytes)
            .map_max_entries("TCP_CLOSES", tcp_close_ring_bytes)
            .map_max_entries("TCP_FLOWS", flow_entries)
            .override_global(
                task_struct_globals::EXIT_CODE_OFFSET,
                &exit_code_offset,
                true,
            )
            .override_global(tcp_state_globals::STATE_MASK, &tcp_state_mask, true)
            .load(EBPF_OBJECT)
            .map_err(|e| ProbeError::ebpf("loading the eBPF object", e))?;

        let mut loaded = Vec::new();
        let mut links = Vec::new();
        if tcp_state {
            links.push(attach_tracepoint(
                &mut ebpf,
                "tcp_state",
                &INET_SOCK_SET_STATE,
            )?);
            loaded.push("tcp_state");
        }
        if process {
            let btf = Btf::from_sys_fs().map_err(|e| ProbeError::Btf(e.to_string()))?;
            let program: &mut BtfTracePoint = program(&mut ebpf, "process_exit")?
                .try_into()
                .map_err(|e| ProbeError::ebpf("process_exit", e))?;
            program
                .load(SCHED_PROCESS_EXIT, &btf)
                .map_err(|e| ProbeError::ebpf("verifying process_exit", e))?;
            let link = program
                .attach()
                .map_err(|e| ProbeError::ebpf("attaching process_exit", e))?;
            links.push(AttachedLink::BtfTracePoint("process_exit", link));
            loaded.push("process_exit");
            links.push(attach_tracepoint(
                &mut ebpf,
                "oom_mark_victim",
                &MARK_VICTIM,
            )?);
            loaded.push("oom_mark_victim");
        }
        if flows {
            for (name, tracepoint) in [
                ("tcp_retransmit", TCP_RETRANSMIT_SKB),
                ("tcp_reset_sent", TCP_SEND_RESET),
                ("tcp_reset_received", TCP_RECEIVE_RESET),
            ] {
                links.push(attach_tracepoint(&mut ebpf, name, &tracepoint)?);
                loaded.push(name);
            }
        }

        if let Some(cgroup) = &close_cgroup {
            let program: &mut SockOps = program(&mut ebpf, "tcp_close")?
                .try_into()
                .map_err(|e| ProbeError::ebpf("tcp_close", e))?;
            program
                .load()
                .map_err(|e| ProbeError::ebpf("verifying tcp_close", e))?;
            // The default mode: `AllowMultiple` is refused with EINVAL for a link on this
            // kind of kernel, and links on one cgroup coexist anyway (../shared/TOOLCHAIN.md).
            let link = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(|e| ProbeError::ebpf("attaching tcp_close", e))?;
            links.push(AttachedLink::SockOps("tcp_close", link));
            loaded.push("tcp_close");
        }

        let counters = PerCpuArray::try_from(take_map(&mut ebpf, "COUNTERS")?)
            .map_err(|e| ProbeError::ebpf("COUNTERS", e))?;
        let ring = |ebpf: &mut Ebpf, name: &'static str| -> Result<RingBuf<MapData>, ProbeError> {
            RingBuf::try_from(take_map(ebpf, name)?).map_err(|e| ProbeError::ebpf(name, e))
        };
        let tcp_events = if tcp_state {
            Some(TcpEvents::new(ring(&mut ebpf, "TCP_EVENTS")?))
        } else {
            None
        };
        let connect_failures = if tcp_state {
            Some(ConnectFailures::new(ring(&mut ebpf, "CONNECT_FAILURES")?))
        } else {
            None
        };
        let process_events = if process {
            Some(ProcessEvents::new(ring(&mut ebpf, "PROCESS_EVENTS")?))
        } else {
            None
        };
        let flows = if flows {
            let map = PerCpuHashMap::try_from(take_map(&mut ebpf, "TCP_FLOWS")?)
                .map_err(|e| ProbeError::ebpf("TCP_FLOWS", e))?;
            Some(FlowStats::new(map))
        } else {
            None
        };
        let tcp_closes = if tcp_close {
            Some(TcpCloses::new(ring(&mut ebpf, "TCP_CLOSES")?))
        } else {
            None
        };
        Ok(Self {
            ebpf,
            loaded,
            links,
            counters,
            tcp_events,
            connect_failures,
            process_events,
            flows,
            tcp_closes,
            _run_stats: run_stats,
        })
    }

    /// Every TCP state transition (needs `tcp_state`).
    pub fn take_tcp_events(&mut self) -> Result<TcpEvents, ProbeError> {
        self.tcp_events
            .take()
            .ok_or(ProbeError::NotSelected("tcp_state (TcpEvents)"))
    }

    /// Failed connects (needs `tcp_state`).
    pub fn take_connect_failures(&mut self) -> Result<ConnectFailures, ProbeError> {
        self.connect_failures
            .take()
            .ok_or(ProbeError::NotSelected("tcp_state (ConnectFailures)"))
    }

    /// Exits and OOM kills (needs `process`).
    pub fn take_process_events(&mut self) -> Result<ProcessEvents, ProbeError> {
        self.process_events
            .take()
            .ok_or(ProbeError::NotSelected("process (ProcessEvents)"))
    }

    /// Per-flow retransmit and reset counters (needs `flows`).
    pub fn take_flow_stats(&mut self) -> Result<FlowStats, ProbeError> {
        self.flows
            .take()
            .ok_or(ProbeError::NotSelected("flows (FlowStats)"))
    }

    /// Closed TCP connections with their totals (needs `tcp_close`).
    pub fn take_tcp_closes(&mut self) -> Result<TcpCloses, ProbeError> {
        self.tcp_closes
            .take()
            .ok_or(ProbeError::NotSelected("tcp_close (TcpCloses)"))
    }

    /// Names of the loaded programs (attached unless [`ProbeSet::detach`] ran).
    pub fn programs(&self) -> &[&'static str] {
        &self.loaded
    }

    /// Detaches every program; they stay loaded (for [`ProbeSet::program_stats`]) and maps
    /// (and handles) stay readable, so counters are final and queued events can be drained.
    pub fn detach(&mut self) -> Result<(), ProbeError> {
        for link in std::mem::take(&mut self.links) {
            match link {
                AttachedLink::TracePoint(name, id) => {
                    let program: &mut TracePoint = program(&mut self.ebpf, name)?
                        .try_into()
                        .map_err(|e| ProbeError::ebpf(name, e))?;
                    program.detach(id).map_err(|e| ProbeError::ebpf(name, e))?;
                }
                AttachedLink::BtfTracePoint(name, id) => {
                    let program: &mut BtfTracePoint = program(&mut self.ebpf, name)?
                        .try_into()
                        .map_err(|e| ProbeError::ebpf(name, e))?;
                    program.detach(id).map_err(|e| ProbeError::ebpf(name, e))?;
                }
                AttachedLink::SockOps(name, id) => {
                    let program: &mut SockOps = program(&mut self.ebpf, name)?
                        .try_into()
                        .map_err(|e| ProbeError::ebpf(name, e))?;
                    program.detach(id).map_err(|e| ProbeError::ebpf(name, e))?;
                }
            }
        }
        Ok(())
    }

    /// The kernel's counters, summed over CPUs.
    pub fn counters(&self) -> Result<ProbeCounters, ProbeError> {
        let sum = |index: u32| -> Result<u64, ProbeError> {
            let values = self
                .counters
                .get(&index, 0)
                .map_err(|e| ProbeError::ebpf("reading COUNTERS", e))?;
            Ok(values.iter().sum())
        };
        let ring = |sent, dropped| -> Result<RingCounts, ProbeError> {
            Ok(RingCounts {
                sent: sum(sent)?,
                dropped: sum(dropped)?,
            })
        };
        Ok(ProbeCounters {
            tcp_events: ring(counter::EVENTS_SENT, counter::EVENTS_DROPPED)?,
            connect_failures: ring(
                counter::CONNECT_FAILURES_SENT,
                counter::CONNECT_FAILURES_DROPPED,
            )?,
            process_events: ring(counter::PROCESS_SENT, counter::PROCESS_DROPPED)?,
            tcp_closes: ring(counter::TCP_CLOSES_SENT, counter::TCP_CLOSES_DROPPED)?,
            not_tcp: sum(counter::NOT_TCP)?,
            map_update_failed: sum(counter::MAP_UPDATE_FAILED)?,
        })
    }

    /// Run statistics of every attached program (zero unless `run_stats` was on).
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>, ProbeError> {
        self.loaded
            .iter()
            .map(|&name| {
                let program = self
                    .ebpf
                    .program(name)
                    .ok_or_else(|| ProbeError::Ebpf(format!("program {name} missing")))?;
                let info = program.info().map_err(|e| ProbeError::ebpf(name, e))?;
                Ok(ProgramStats {
                    name: name.to_owned(),
                    run_count: info.run_count(),
                    run_time: info.run_time(),
                    verified_instructions: info.verified_instruction_count(),
                })
            })
            .collect()
    }
}

/// An attachment of a loaded program, to detach it again.
#[derive(Debug)]
enum AttachedLink {
    TracePoint(&'static str, TracePointLinkId),
    BtfTracePoint(&'static str, BtfTracePointLinkId),
    SockOps(&'static str, SockOpsLinkId),
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Program, ProbeError> {
    ebpf.program_mut(name)
        .ok_or_else(|| ProbeError::Ebpf(format!("program {name} missing from the object")))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map, ProbeError> {
    ebpf.take_map(name)
        .ok_or_else(|| ProbeError::Ebpf(format!("map {name} missing from the object")))
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    name: &'static str,
    tracepoint: &Tracepoint,
) -> Result<AttachedLink, ProbeError> {
    let program: &mut TracePoint = program(ebpf, name)?
        .try_into()
        .map_err(|e| ProbeError::ebpf(name, e))?;
    program
        .load()
        .map_err(|e| ProbeError::ebpf(&format!("verifying {name}"), e))?;
    let link = program
        .attach(tracepoint.category, tracepoint.name)
        .map_err(|e| ProbeError::ebpf(&format!("attaching {name}"), e))?;
    Ok(AttachedLink::TracePoint(name, link))
}

/// `task_struct::exit_code`'s offset from the running kernel's BTF, after checking that the
/// exit tracepoint has the prototype the program reads.
fn exit_code_offset() -> Result<u64, ProbeError> {
    let btf = KernelBtf::read_vmlinux().map_err(ProbeError::Btf)?;
    match btf.tracepoint_params(SCHED_PROCESS_EXIT) {
        Some(SCHED_PROCESS_EXIT_PARAMS) => {}
        other => {
            return Err(ProbeError::UnexpectedLayout {
                tracepoint: format!("tp_btf/{SCHED_PROCESS_EXIT}"),
                detail: format!(
                    "{other:?} parameters, expected {SCHED_PROCESS_EXIT_PARAMS} (data, task, group_dead)"
                ),
            });
        }
    }
    match btf.member("task_struct", "exit_code") {
        Some((offset, 4)) => Ok(u64::try_from(offset).expect("u64 holds usize")),
        other => Err(ProbeError::UnexpectedLayout {
            tracepoint: format!("tp_btf/{SCHED_PROCESS_EXIT}"),
            detail: format!("task_struct.exit_code is {other:?}, expected a 4-byte field"),
        }),
    }
}
