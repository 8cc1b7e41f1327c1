//! The one integration test binary: every module below talks to real components (etcd,
//! coordinator processes or servers, kernel probes). Run as root, as CI does.

mod agent;
mod coordinator;
mod ebpf_tcp;
mod etcd_harness;
mod grpc_ping;
mod store;
