//! The Interlock host agent as a library: `main.rs` only parses flags and calls into here.
//!
//! - `probes`: kernel probes (the only module that imports `aya`).
//! - `pressure`: PSI, memory, disk and cgroup readers (procfs/sysfs).
//! - `detect`: pure detectors (data and `now` in, findings out).
//! - `demo`: the demo service (`interlock-agent demo-service`) the quickstart and tests restart.
//! - `finding`: the finding type shared by detectors, reporting and actions.
//! - `config`, `run`, `report`, `metrics`, `doctor`, `flows`: the runtime around them (the
//!   `agent.toml` file, the observing loop, the coordinator link, the Prometheus endpoint, the
//!   `doctor` and `flows` commands).
//!
//! Decision logic stays free of I/O (see ARCHITECTURE.md).

pub mod act;
pub mod actions;
pub mod config;
pub mod demo;
pub mod detect;
pub mod doctor;
pub mod enrol;
pub mod finding;
pub mod flows;
pub mod metrics;
pub mod pressure;
pub mod probes;
pub mod report;
pub mod run;
