//! The Interlock host agent as a library: `main.rs` only parses flags and calls into here.
//!
//! Owns the kernel probes (`probes`) today; detectors, pressure readers and actions join as
//! they are built. Decision logic added here must stay free of I/O (see ARCHITECTURE.md).

pub mod probes;
