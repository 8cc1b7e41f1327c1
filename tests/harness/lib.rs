//! Test harness shared by the integration tests and benchmarks: real etcd processes on
//! loopback, prerequisite checks that fail loudly, and small helpers.
//!
//! Nothing here fakes a component: it starts real ones and stops them, by pid, when the
//! handle drops (also on panic).

pub mod agent;
pub mod client;
pub mod coordinator;
pub mod etcd;
pub mod webhook;

pub use coordinator::{ADMIN, BASIC_POLICY, CertDir, Coordinator, CoordinatorOptions};
pub use etcd::{Etcd, EtcdTls};

/// Panics unless the test runs as root; eBPF and cgroup tests need it and CI runs as root.
/// A missing prerequisite fails the test; it never skips.
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc_geteuid() };
    assert_eq!(
        euid, 0,
        "{what} needs root (eBPF programs, mounts, cgroups); run the tests as root, as CI does"
    );
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// A fresh key prefix, so tests sharing one etcd never see each other's keys.
pub fn fresh_prefix(test: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("/interlock-test/{test}/{}-{n}", std::process::id())
}
