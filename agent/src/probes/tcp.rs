//! The TCP lifecycle probe: `sock:inet_sock_set_state` → ring buffer → [`TcpStateRecord`].
//!
//! The kernel program submits without waking us (frequent events), so the owner of a
//! [`TcpProbe`] drains it on a short timer.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use interlock_agent_common::{AF_INET6, TcpStateEvent, counter, inet_sock_set_state};

use super::{EBPF_OBJECT, ProbeError};

const CATEGORY: &str = "sock";
const NAME: &str = "inet_sock_set_state";
const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// How to size the probe.
#[derive(Clone, Debug)]
pub struct TcpProbeOptions {
    /// Ring buffer size in bytes: a power of two and a multiple of the page size.
    pub ring_bytes: u32,
}

impl Default for TcpProbeOptions {
    fn default() -> Self {
        Self {
            ring_bytes: 256 * 1024,
        }
    }
}

/// One TCP state transition, decoded for user space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpStateRecord {
    /// Kernel monotonic time of the transition (`bpf_ktime_get_ns`).
    pub ts_ns: u64,
    /// Kernel address of the socket; stable for the socket's lifetime.
    pub socket: u64,
    /// The process (thread group) that was running; see `TcpStateEvent` for when it is right.
    pub pid: u32,
    pub comm: String,
    pub old_state: i32,
    pub new_state: i32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl From<&TcpStateEvent> for TcpStateRecord {
    fn from(event: &TcpStateEvent) -> Self {
        let TcpStateEvent {
            ts_ns,
            skaddr,
            tgid,
            tid: _,
            oldstate,
            newstate,
            sport,
            dport,
            family,
            protocol: _,
            saddr,
            daddr,
            comm,
        } = *event;
        let ip = |bytes: [u8; 16]| -> IpAddr {
            if family == AF_INET6 {
                IpAddr::V6(Ipv6Addr::from(bytes))
            } else {
                IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
            }
        };
        let comm_len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
        Self {
            ts_ns,
            socket: skaddr,
            pid: tgid,
            comm: String::from_utf8_lossy(&comm[..comm_len]).into_owned(),
            old_state: oldstate,
            new_state: newstate,
            local: SocketAddr::new(ip(saddr), sport),
            remote: SocketAddr::new(ip(daddr), dport),
        }
    }
}

/// The loaded and attached TCP probe. Dropping it detaches the program.
pub struct TcpProbe {
    // Keeps the programs attached for as long as the probe lives.
    _ebpf: Ebpf,
    ring: RingBuf<MapData>,
    counters: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for TcpProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpProbe").finish_non_exhaustive()
    }
}

impl TcpProbe {
    /// Checks the kernel's tracepoint layout, loads the program and attaches it.
    pub fn load(options: &TcpProbeOptions) -> Result<Self, ProbeError> {
        let tracefs = check_layout()?;
        tracing::debug!(tracefs, "inet_sock_set_state layout matches");
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("TCP_EVENTS", options.ring_bytes)
            .load(EBPF_OBJECT)
            .map_err(|e| ProbeError::ebpf("loading the eBPF object", e))?;
        let program: &mut TracePoint = ebpf
            .program_mut("tcp_state")
            .ok_or_else(|| ProbeError::Ebpf("program tcp_state missing from the object".into()))?
            .try_into()
            .map_err(|e| ProbeError::ebpf("tcp_state", e))?;
        program
            .load()
            .map_err(|e| ProbeError::ebpf("verifying tcp_state", e))?;
        program
            .attach(CATEGORY, NAME)
            .map_err(|e| ProbeError::ebpf("attaching tcp_state", e))?;
        let ring = RingBuf::try_from(
            ebpf.take_map("TCP_EVENTS")
                .ok_or_else(|| ProbeError::Ebpf("map TCP_EVENTS missing".into()))?,
        )
        .map_err(|e| ProbeError::ebpf("TCP_EVENTS", e))?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map("COUNTERS")
                .ok_or_else(|| ProbeError::Ebpf("map COUNTERS missing".into()))?,
        )
        .map_err(|e| ProbeError::ebpf("COUNTERS", e))?;
        Ok(Self {
            _ebpf: ebpf,
            ring,
            counters,
        })
    }

    /// Moves every event waiting in the ring buffer into `out`; returns how many.
    pub fn drain(&mut self, out: &mut Vec<TcpStateRecord>) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            if item.len() < size_of::<TcpStateEvent>() {
                continue;
            }
            // SAFETY: the kernel program writes exactly one `TcpStateEvent` per record, the
            // length is checked above, and the type is plain old data (read unaligned).
            let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<TcpStateEvent>()) };
            out.push(TcpStateRecord::from(&event));
            n += 1;
        }
        n
    }

    /// Events the kernel sent and dropped (ring full), summed over CPUs.
    pub fn counts(&self) -> Result<(u64, u64), ProbeError> {
        let sum = |index: u32| -> Result<u64, ProbeError> {
            let values = self
                .counters
                .get(&index, 0)
                .map_err(|e| ProbeError::ebpf("reading COUNTERS", e))?;
            Ok(values.iter().sum())
        };
        Ok((sum(counter::EVENTS_SENT)?, sum(counter::EVENTS_DROPPED)?))
    }
}

/// Compares the running kernel's record layout with the offsets the program was built with.
/// Returns the tracefs root that was read.
fn check_layout() -> Result<&'static str, ProbeError> {
    let mut last_err = None;
    for root in TRACEFS_ROOTS {
        let path = format!("{root}/events/{CATEGORY}/{NAME}/format");
        match fs::read_to_string(&path) {
            Ok(format) => {
                let mismatches = layout_mismatches(&format);
                if mismatches.is_empty() {
                    return Ok(root);
                }
                return Err(ProbeError::UnexpectedLayout {
                    tracepoint: "sock:inet_sock_set_state",
                    detail: mismatches.join(", "),
                });
            }
            Err(source) => last_err = Some((path, source)),
        }
    }
    let (path, source) = last_err.expect("TRACEFS_ROOTS is not empty");
    Err(ProbeError::Tracefs { path, source })
}

/// Lists every field whose offset in `format` differs from ours, or that is missing.
fn layout_mismatches(format: &str) -> Vec<String> {
    inet_sock_set_state::FIELDS
        .iter()
        .filter_map(|&(name, want)| match field_offset(format, name) {
            Some(got) if got == want => None,
            Some(got) => Some(format!("{name} at offset {got}, expected {want}")),
            None => Some(format!("{name} missing")),
        })
        .collect()
}

/// Finds `offset:N` of the field called `name` in a tracefs format file, whose lines look like
/// `field:__u16 sport;<TAB>offset:24;<TAB>size:2;<TAB>signed:0;`.
fn field_offset(format: &str, name: &str) -> Option<usize> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let field_name = decl.rsplit([' ', '*']).next()?;
        let field_name = field_name.split('[').next()?;
        if field_name != name {
            return None;
        }
        let offset = rest.trim().strip_prefix("offset:")?.split(';').next()?;
        offset.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: inet_sock_set_state\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;\n\
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;\n\
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;\n\
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;\n\
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;\n\
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;\n\
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;\n\
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;\n\
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;\n\
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;\n";

    #[test]
    fn the_layout_we_compiled_against_is_accepted() {
        assert_eq!(layout_mismatches(FORMAT), Vec::<String>::new());
    }

    #[test]
    fn a_moved_or_missing_field_is_named() {
        let moved = FORMAT.replace("sport;\toffset:24", "sport;\toffset:22");
        assert_eq!(
            layout_mismatches(&moved),
            vec!["sport at offset 22, expected 24"]
        );
        let missing = FORMAT.replace("daddr_v6", "dst_v6");
        assert_eq!(layout_mismatches(&missing), vec!["daddr_v6 missing"]);
    }

    #[test]
    fn ipv4_events_decode_to_socket_addresses() {
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let event = TcpStateEvent {
            ts_ns: 5,
            skaddr: 0xffff_0000,
            tgid: 42,
            tid: 43,
            oldstate: 7,
            newstate: 2,
            sport: 40000,
            dport: 80,
            family: interlock_agent_common::AF_INET,
            protocol: 6,
            saddr,
            daddr,
            comm,
        };
        let record = TcpStateRecord::from(&event);
        assert_eq!(record.pid, 42);
        assert_eq!(record.comm, "curl");
        assert_eq!(record.local, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(record.remote, "127.0.0.2:80".parse().unwrap());
    }
}
