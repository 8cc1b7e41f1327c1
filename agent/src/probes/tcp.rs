//! The TCP lifecycle: `sock:inet_sock_set_state` → the `TCP_EVENTS` ring → [`TcpStateRecord`].
//!
//! The kernel program submits without waking us (frequent events), so the owner of a
//! [`TcpEvents`] drains it on a short timer.

use std::net::SocketAddr;

use aya::maps::{MapData, RingBuf};
use interlock_agent_common::TcpStateEvent;

use super::{ProbeError, ProbeOptions, ProbeSet, comm_string, drain_ring, socket_addr};

/// How to size [`TcpProbe`].
#[derive(Clone, Debug)]
pub struct TcpProbeOptions {
    /// Ring buffer size in bytes: a power of two and a multiple of the page size.
    pub ring_bytes: u32,
}

impl Default for TcpProbeOptions {
    fn default() -> Self {
        Self {
            ring_bytes: ProbeOptions::default().tcp_ring_bytes,
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
    /// The process (thread group) that was running, or for `SYN_SENT -> ESTABLISHED` /
    /// `SYN_SENT -> CLOSE` the one that connected; see `TcpStateEvent` for when it is right.
    pub pid: u32,
    pub comm: String,
    /// The task's cgroup v2 id (as `pid`); 1 is the root.
    pub cgroup_id: u64,
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
            cgroup_id,
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
        Self {
            ts_ns,
            socket: skaddr,
            pid: tgid,
            comm: comm_string(&comm),
            cgroup_id,
            old_state: oldstate,
            new_state: newstate,
            local: socket_addr(family, saddr, sport),
            remote: socket_addr(family, daddr, dport),
        }
    }
}

/// Every TCP state transition, from the `TCP_EVENTS` ring.
pub struct TcpEvents {
    ring: RingBuf<MapData>,
}

impl std::fmt::Debug for TcpEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpEvents").finish_non_exhaustive()
    }
}

impl TcpEvents {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// Moves every event waiting in the ring buffer into `out`; returns how many.
    pub fn drain(&mut self, out: &mut Vec<TcpStateRecord>) -> usize {
        drain_ring(&mut self.ring, out, |event: TcpStateEvent| {
            TcpStateRecord::from(&event)
        })
    }
}

/// A probe set with only the TCP lifecycle program, and its events. Dropping it detaches the
/// program.
#[derive(Debug)]
pub struct TcpProbe {
    set: ProbeSet,
    events: TcpEvents,
}

impl TcpProbe {
    /// Checks the kernel's tracepoint layout, loads the program and attaches it.
    pub fn load(options: &TcpProbeOptions) -> Result<Self, ProbeError> {
        let mut set = ProbeSet::load(&ProbeOptions {
            tcp_state: true,
            tcp_ring_bytes: options.ring_bytes,
            ..ProbeOptions::none()
        })?;
        let events = set.take_tcp_events()?;
        Ok(Self { set, events })
    }

    /// Moves every event waiting in the ring buffer into `out`; returns how many.
    pub fn drain(&mut self, out: &mut Vec<TcpStateRecord>) -> usize {
        self.events.drain(out)
    }

    /// Events the kernel sent and dropped (ring full), summed over CPUs.
    pub fn counts(&self) -> Result<(u64, u64), ProbeError> {
        let counts = self.set.counters()?.tcp_events;
        Ok((counts.sent, counts.dropped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            cgroup_id: 1,
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
