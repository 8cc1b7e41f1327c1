//! Kernel probes: loading the eBPF object built from `agent-ebpf`, attaching its programs and
//! draining what they report. Record layouts come from `interlock-agent-common`.
//!
//! This module owns every `aya` call of the agent; nothing else in the agent imports `aya`.

mod tcp;

pub use tcp::{TcpProbe, TcpProbeOptions, TcpStateRecord};

use thiserror::Error;

/// The eBPF object built by `build.rs`, aligned as the ELF parser requires.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interlock-agent-ebpf"));

/// Why a probe could not be started.
#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("loading eBPF programs needs root (or CAP_BPF and CAP_PERFMON); run the agent as root")]
    NotPermitted,
    #[error(
        "the kernel's {tracepoint} tracepoint has an unexpected layout ({detail}); this kernel is not supported yet"
    )]
    UnexpectedLayout {
        tracepoint: &'static str,
        detail: String,
    },
    #[error(
        "cannot read {path}: {source}; mount tracefs with `mount -t tracefs tracefs /sys/kernel/tracing`"
    )]
    Tracefs {
        path: String,
        source: std::io::Error,
    },
    #[error("eBPF: {0}")]
    Ebpf(String),
}

impl ProbeError {
    pub(crate) fn ebpf(context: &str, err: impl std::fmt::Display) -> Self {
        let text = err.to_string();
        if text.contains("Operation not permitted") || text.contains("EPERM") {
            Self::NotPermitted
        } else {
            Self::Ebpf(format!("{context}: {text}"))
        }
    }
}
