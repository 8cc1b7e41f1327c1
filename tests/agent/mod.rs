//! The agent against the real kernel (as root): probes, pressure readers and detectors fed by
//! real processes, files, mounts and cgroups.

mod cleanup;
mod findings;
mod pressure;
mod probes;
mod restart;
mod runtime;
