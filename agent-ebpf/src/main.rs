//! The agent's eBPF programs.
//!
//! Built for `bpfel-unknown-none` by the agent's `build.rs` (aya-build) and embedded in the
//! agent binary. On the host target this file compiles to an empty `main` so that
//! `cargo build --workspace` and `cargo clippy --workspace` work. It may import only `core`,
//! `aya-ebpf` and `interlock-agent-common`: every record it writes is defined there.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod close;
#[cfg(target_arch = "bpf")]
mod flows;
#[cfg(target_arch = "bpf")]
mod process;
#[cfg(target_arch = "bpf")]
mod shared;
#[cfg(target_arch = "bpf")]
mod tcp;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves every program terminates; a panic path is never taken at run time.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
