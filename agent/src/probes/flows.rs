//! Per-flow TCP failure counters: the `TCP_FLOWS` LRU per-CPU hash map.

use std::net::SocketAddr;

use aya::maps::{MapData, PerCpuHashMap};
use interlock_agent_common::{FlowCounters, FlowKey};

use super::{ProbeError, socket_addr};

/// Failure counters of one TCP flow, summed over CPUs, since the kernel created its entry (or
/// since the last [`FlowStats::drain`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowRecord {
    /// This host's end.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub retransmits: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    /// Kernel monotonic time of the latest hit.
    pub last_ns: u64,
}

/// Reads the kernel's per-flow counters. The map is bounded (LRU): flows that have not been
/// hit for the longest are evicted first when it is full.
pub struct FlowStats {
    map: PerCpuHashMap<MapData, FlowKey, FlowCounters>,
}

impl std::fmt::Debug for FlowStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowStats").finish_non_exhaustive()
    }
}

impl FlowStats {
    pub(crate) fn new(map: PerCpuHashMap<MapData, FlowKey, FlowCounters>) -> Self {
        Self { map }
    }

    /// Every flow's counters, leaving them in place (they keep growing).
    pub fn read(&self) -> Result<Vec<FlowRecord>, ProbeError> {
        Ok(self.read_keyed()?.into_iter().map(|(_, r)| r).collect())
    }

    /// Every flow's counters, then removes the flows read: the next call reports only what
    /// happened since. A hit that lands between the read and the removal of its flow is lost;
    /// with a drain every few seconds that window is microseconds.
    pub fn drain(&mut self) -> Result<Vec<FlowRecord>, ProbeError> {
        let flows = self.read_keyed()?;
        for (key, _) in &flows {
            // Already gone (evicted) is fine.
            let _ = self.map.remove(key);
        }
        Ok(flows.into_iter().map(|(_, r)| r).collect())
    }

    fn read_keyed(&self) -> Result<Vec<(FlowKey, FlowRecord)>, ProbeError> {
        let mut out = Vec::new();
        for entry in self.map.iter() {
            let (key, values) = match entry {
                Ok(entry) => entry,
                // The LRU evicted the key between listing and lookup.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(ProbeError::ebpf("reading TCP_FLOWS", e)),
            };
            let mut sum = FlowCounters::default();
            for value in values.iter() {
                sum.retransmits += value.retransmits;
                sum.resets_sent += value.resets_sent;
                sum.resets_received += value.resets_received;
                sum.last_ns = sum.last_ns.max(value.last_ns);
            }
            let FlowKey {
                family,
                sport,
                dport,
                _pad,
                saddr,
                daddr,
            } = key;
            out.push((
                key,
                FlowRecord {
                    local: socket_addr(family, saddr, sport),
                    remote: socket_addr(family, daddr, dport),
                    retransmits: sum.retransmits,
                    resets_sent: sum.resets_sent,
                    resets_received: sum.resets_received,
                    last_ns: sum.last_ns,
                },
            ));
        }
        Ok(out)
    }
}
