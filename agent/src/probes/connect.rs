//! Failed connects: the `CONNECT_FAILURES` ring (no wake-up; drain on a timer).

use std::net::SocketAddr;

use aya::maps::{MapData, RingBuf};
use interlock_agent_common::ConnectFailureEvent;

use super::{comm_string, drain_ring, socket_addr};

/// A connect that never reached ESTABLISHED, attributed to the task that called `connect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectFailureRecord {
    /// Kernel monotonic time the socket closed.
    pub ts_ns: u64,
    /// Kernel monotonic time the connect started (SYN_SENT).
    pub started_ns: u64,
    /// Kernel address of the socket.
    pub socket: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// The local address when the socket closed (port 0 if it was never bound).
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The peer answered with a RST (connection refused); otherwise the connect timed out,
    /// was unreachable, or was abandoned by the application.
    pub refused: bool,
}

impl From<&ConnectFailureEvent> for ConnectFailureRecord {
    fn from(event: &ConnectFailureEvent) -> Self {
        let ConnectFailureEvent {
            ts_ns,
            started_ns,
            skaddr,
            tgid,
            tid,
            sport,
            dport,
            family,
            reset_received,
            _pad,
            saddr,
            daddr,
            comm,
        } = *event;
        Self {
            ts_ns,
            started_ns,
            socket: skaddr,
            pid: tgid,
            tid,
            comm: comm_string(&comm),
            local: socket_addr(family, saddr, sport),
            remote: socket_addr(family, daddr, dport),
            refused: reset_received != 0,
        }
    }
}

/// Failed connects. The kernel does not wake us for these (they come in storms when a backend
/// dies): drain on a short timer.
pub struct ConnectFailures {
    ring: RingBuf<MapData>,
}

impl std::fmt::Debug for ConnectFailures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectFailures").finish_non_exhaustive()
    }
}

impl ConnectFailures {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// Moves every waiting record into `out`; returns how many.
    pub fn drain(&mut self, out: &mut Vec<ConnectFailureRecord>) -> usize {
        drain_ring(&mut self.ring, out, |event: ConnectFailureEvent| {
            ConnectFailureRecord::from(&event)
        })
    }
}
