//! The agent against the real kernel (as root): probes, pressure readers and detectors fed by
//! real processes, files, mounts and cgroups.

mod actions;
mod cert_expiry;
mod cleanup;
mod enrol;
mod findings;
mod fleet;
mod pressure;
mod probes;
mod restart;
mod runtime;
