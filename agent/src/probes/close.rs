//! Closed TCP connections: the `sock_ops` program `tcp_close` on the cgroup v2 root → the
//! `TCP_CLOSES` ring (no wake-up; drain on a timer) → [`TcpCloseRecord`].
//!
//! Also where the cgroup v2 root to attach to is found: `/sys/fs/cgroup` on pure v2 hosts,
//! `/sys/fs/cgroup/unified` on hybrid ones, read from the mount table through
//! `crate::pressure::cgroup` (the agent's one cgroup-layout parser).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use aya::maps::{MapData, RingBuf};
use interlock_agent_common::TcpCloseEvent;

use super::{ProbeError, drain_ring, socket_addr};
use crate::pressure::cgroup::{CgroupMode, detect_layout};

/// Where the mount table is read to find the cgroup v2 root.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One TCP connection that ended, with its totals, decoded for user space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpCloseRecord {
    /// Kernel monotonic time of the close (`bpf_ktime_get_ns`).
    pub ts_ns: u64,
    /// The socket cookie: unique for the kernel's uptime.
    pub cookie: u64,
    /// This host's end.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// This host connected (`true`) or accepted (`false`).
    pub active_open: bool,
    /// The kernel's count (sequence space): payload bytes received, plus one for the peer's
    /// FIN if it came.
    pub bytes_received: u64,
    /// The kernel's count (sequence space): payload bytes the peer acknowledged, plus one for
    /// our FIN once acknowledged and, if this host connected, one for its SYN. Kept as the
    /// kernel counts (not corrected): which of those were counted depends on how the
    /// connection ended.
    pub bytes_acked: u64,
    /// The kernel's smoothed RTT (its `srtt_us` divided by 8); zero if never sampled.
    pub srtt: Duration,
    /// Segments retransmitted over the connection's life.
    pub total_retrans: u32,
    /// From established to closed; zero if the program missed the start.
    pub duration: Duration,
}

impl From<&TcpCloseEvent> for TcpCloseRecord {
    fn from(event: &TcpCloseEvent) -> Self {
        let TcpCloseEvent {
            ts_ns,
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
            _pad,
            saddr,
            daddr,
        } = *event;
        Self {
            ts_ns,
            cookie,
            local: socket_addr(family, saddr, sport),
            remote: socket_addr(family, daddr, dport),
            active_open: active_open != 0,
            bytes_received,
            bytes_acked,
            // The kernel keeps eight times the RTT in microseconds: 1000 / 8 = 125 ns a unit.
            srtt: Duration::from_nanos(u64::from(srtt_us_x8) * 125),
            total_retrans,
            duration: Duration::from_nanos(duration_ns),
        }
    }
}

/// Closed connections. The kernel does not wake us for these: drain on a short timer.
pub struct TcpCloses {
    ring: RingBuf<MapData>,
}

impl std::fmt::Debug for TcpCloses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpCloses").finish_non_exhaustive()
    }
}

impl TcpCloses {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// Moves every waiting record into `out`; returns how many.
    pub fn drain(&mut self, out: &mut Vec<TcpCloseRecord>) -> usize {
        drain_ring(&mut self.ring, out, |event: TcpCloseEvent| {
            TcpCloseRecord::from(&event)
        })
    }
}

/// The cgroup v2 root of this host, where the close program attaches so that it sees every
/// socket: `/sys/fs/cgroup/unified` on hybrid hosts, `/sys/fs/cgroup` on pure v2 ones.
pub fn detect_cgroup2_root() -> Result<PathBuf, ProbeError> {
    let layout = detect_layout(std::path::Path::new(MOUNTINFO))
        .map_err(|e| ProbeError::Cgroup(e.to_string()))?;
    let root = layout.v2_root.ok_or_else(|| {
        ProbeError::Cgroup(format!(
            "no cgroup2 mount in {MOUNTINFO} ({}); mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`",
            layout.mode
        ))
    })?;
    if layout.mode == CgroupMode::Hybrid {
        tracing::debug!(root = %root.display(), "hybrid cgroups: TCP closes from the cgroup2 tree");
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_events_decode_srtt_from_the_kernels_eighths() {
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let event = TcpCloseEvent {
            ts_ns: 10,
            cookie: 7,
            duration_ns: 2_000_000,
            bytes_received: 2_346,
            bytes_acked: 100_002,
            srtt_us_x8: 8 * 40,
            total_retrans: 0,
            sport: 40_000,
            dport: 8_080,
            family: interlock_agent_common::AF_INET,
            active_open: 1,
            _pad: 0,
            saddr,
            daddr: saddr,
        };
        let record = TcpCloseRecord::from(&event);
        assert_eq!(record.srtt, Duration::from_micros(40));
        assert_eq!(record.duration, Duration::from_millis(2));
        assert!(record.active_open);
        assert_eq!(record.local, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(record.remote, "127.0.0.1:8080".parse().unwrap());
    }
}
