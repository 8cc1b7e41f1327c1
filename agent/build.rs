//! Builds the eBPF programs (`agent-ebpf`) for `bpfel-unknown-none` and puts the object in
//! `OUT_DIR`, where `src/probes` embeds it.
//!
//! `INTERLOCK_EBPF_OBJECT=/path/to/object` skips the nested build and copies that object
//! instead: `cargo xtask ci` builds the object from source once, then reuses it for clippy and
//! the tests, because each distinct OUT_DIR would otherwise redo a 1-2 minute nested build.

use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, anyhow, bail};

const EBPF_PACKAGE: &str = "interlock-agent-ebpf";
const PREBUILT: &str = "INTERLOCK_EBPF_OBJECT";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={PREBUILT}");
    let out_dir = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR not set")?);
    if let Some(object) = env::var_os(PREBUILT) {
        let object = PathBuf::from(object);
        println!("cargo:rerun-if-changed={}", object.display());
        fs::copy(&object, out_dir.join(EBPF_PACKAGE)).with_context(|| {
            format!(
                "{PREBUILT}={} cannot be copied; unset it to build the eBPF object from source",
                object.display()
            )
        })?;
        return Ok(());
    }
    check_prerequisites()?;
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("agent has no parent directory"))?
        .join("agent-ebpf");
    let root_dir = root_dir
        .to_str()
        .ok_or_else(|| anyhow!("workspace path is not UTF-8"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// Fails with one line naming the command that installs whatever is missing, instead of a
/// page of nested cargo output.
fn check_prerequisites() -> anyhow::Result<()> {
    const FIX: &str = "run `cargo xtask setup`";
    let nightly = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output();
    let sysroot = match nightly {
        Ok(out) if out.status.success() => PathBuf::from(String::from_utf8(out.stdout)?.trim()),
        _ => bail!(
            "the nightly toolchain is missing (the eBPF programs need it): {FIX}, which runs `rustup toolchain install nightly`"
        ),
    };
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        bail!(
            "rust-src for nightly is missing: {FIX}, or `rustup component add rust-src --toolchain nightly`"
        );
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !matches!(linker, Ok(out) if out.status.success()) {
        bail!(
            "bpf-linker is missing or does not run: {FIX} (it installs bpf-linker 0.13.0 linked against nightly's LLVM)"
        );
    }
    Ok(())
}
