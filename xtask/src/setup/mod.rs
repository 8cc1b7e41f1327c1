//! `cargo xtask setup [--verify]`: installs every prerequisite, idempotently, and says what it
//! installs; `--verify` proves each one came from a step of setup (see `verify`).
//!
//! Each step checks first and does nothing when the prerequisite is already there, so a second
//! run takes a second or two. What is installed is listed once, in `manifest`.

mod manifest;
pub mod verify;

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::run_cmd;
use manifest::BPF_LINKER_VERSION;

/// `cargo xtask setup [--verify]`.
pub fn command(args: &[String]) -> anyhow::Result<()> {
    match args {
        [] => run(),
        [flag] if flag == "--verify" => verify::run(),
        _ => bail!("usage: cargo xtask setup [--verify]"),
    }
}

pub fn run() -> anyhow::Result<()> {
    apt_packages()?;
    rust_components()?;
    bpf_linker()?;
    mounts()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

pub fn is_root() -> bool {
    // `id -u` keeps xtask free of a libc dependency.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub fn require_root(why: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("this needs root ({why}); run it as root, e.g. `sudo -E cargo xtask ...`");
    }
    Ok(())
}

fn apt_packages() -> anyhow::Result<()> {
    let wanted = manifest::apt_names();
    let dpkg = verify::Dpkg::load()?;
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|pkg| !dpkg.installed(pkg))
        .collect();
    if missing.is_empty() {
        eprintln!("xtask: apt packages present: {}", wanted.join(" "));
        return Ok(());
    }
    for pkg in manifest::APT_PACKAGES {
        if missing.contains(&pkg.name) {
            eprintln!("xtask: will install {}: {}", pkg.name, pkg.why);
        }
    }
    apt_install(&missing)
}

/// `apt-get install` without starting any service the packages ship: while it runs,
/// `/usr/sbin/policy-rc.d` answers 101 ("action forbidden", invoke-rc.d(8)) unless the host
/// already has its own policy, which is then left as it is.
fn apt_install(missing: &[&str]) -> anyhow::Result<()> {
    require_root(&format!("installing {}", missing.join(" ")))?;
    eprintln!("xtask: installing apt packages: {}", missing.join(" "));
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        fs::write(
            policy,
            "#!/bin/sh\n# Written by cargo xtask for one apt-get install.\nexit 101\n",
        )
        .with_context(|| format!("write {}", policy.display()))?;
        run_cmd(Command::new("chmod").arg("0755").arg(policy))?;
    }
    let result = run_cmd(Command::new("apt-get").args(["update", "-qq"])).and_then(|()| {
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    });
    if ours {
        let _ = fs::remove_file(policy);
    }
    result
}

/// Adds each rustup component in the manifest that its toolchain lacks. "Present" means what
/// `--verify` checks: rustup lists it as installed, not merely that its files exist.
fn rust_components() -> anyhow::Result<()> {
    nightly_sysroot()?;
    for (toolchain, component, why) in manifest::RUST_COMPONENTS {
        if has_component(&installed_components(toolchain)?, component) {
            eprintln!("xtask: rustup component {component} ({toolchain}) present");
            continue;
        }
        eprintln!("xtask: adding rustup component {component} ({toolchain}): {why}");
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            component,
            "--toolchain",
            toolchain,
        ]))?;
    }
    Ok(())
}

/// Whether `rustup component list --installed` output names `component`, which rustup writes
/// with its target (`rustfmt-x86_64-…`) or without one (`rust-src`).
pub(super) fn has_component(installed: &[String], component: &str) -> bool {
    installed
        .iter()
        .any(|c| c == component || c.starts_with(&format!("{component}-")))
}

/// `rustup component list --installed --toolchain T`, one name a line.
pub(super) fn installed_components(toolchain: &str) -> anyhow::Result<Vec<String>> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", toolchain])
        .output()
        .context("cannot run rustup")?;
    if !out.status.success() {
        bail!(
            "the {toolchain} toolchain is missing (rustup: {}); it is part of the machine image",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .collect())
}

/// The nightly toolchain is part of the machine image; setup adds components to it but never
/// installs or updates a toolchain (aya and bpf-linker are pinned to its LLVM).
fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("cannot run rustc")?;
    if !out.status.success() {
        bail!(
            "the nightly toolchain is missing; the eBPF programs need it (install it with \
             `rustup toolchain install nightly`, matching the LLVM major of bpf-linker's feature)"
        );
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// The LLVM major version of nightly rustc, from `rustc +nightly -vV` ("LLVM version: 22.1.4").
pub(super) fn nightly_llvm_major() -> anyhow::Result<String> {
    let out = Command::new("rustc").args(["+nightly", "-vV"]).output()?;
    let text = String::from_utf8(out.stdout)?;
    text.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_owned)
        .context("`rustc +nightly -vV` does not name its LLVM version")
}

fn bpf_linker() -> anyhow::Result<()> {
    let works = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if works {
        eprintln!("xtask: bpf-linker present");
        return Ok(());
    }
    // A plain `cargo install bpf-linker` finds Debian's LLVM 14 and defaults to a newer LLVM
    // than the nightly's. Link it against the nightly's own libLLVM instead: a prefix directory
    // whose lib/ holds `libLLVM.so` (and the original name) pointing into the sysroot.
    let sysroot = nightly_sysroot()?;
    let major = nightly_llvm_major()?;
    let lib = fs::read_dir(sysroot.join("lib"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .context("nightly's sysroot has no libLLVM.so.*; reinstall the nightly toolchain")?;
    let prefix = llvm_prefix_dir()?;
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in [
        "libLLVM.so".to_owned(),
        lib.file_name().unwrap().to_string_lossy().into_owned(),
    ] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {major} (3-5 minutes)"
    );
    run_cmd(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
    )?;
    Ok(())
}

/// Where the LLVM prefix lives. bpf-linker's RUNPATH points into it, so it must stay.
fn llvm_prefix_dir() -> anyhow::Result<PathBuf> {
    let home = env::var_os("HOME").context("HOME is not set")?;
    Ok(Path::new(&home).join(".cache/interlock/llvm"))
}

/// Whether `/proc/mounts` text has `fstype` mounted at `target`.
pub(super) fn is_mounted(proc_mounts: &str, fstype: &str, target: &str) -> bool {
    proc_mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, ty) = (f.next(), f.next(), f.next());
        dir == Some(target) && ty == Some(fstype)
    })
}

fn mounts() -> anyhow::Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    for (fstype, target) in manifest::MOUNTS {
        if is_mounted(&mounts, fstype, target) {
            eprintln!("xtask: {fstype} mounted at {target}");
            continue;
        }
        if !is_root() {
            eprintln!(
                "xtask: {fstype} is not mounted at {target}; mount it as root for the probes"
            );
            continue;
        }
        eprintln!("xtask: mounting {fstype} at {target}");
        fs::create_dir_all(target).ok();
        run_cmd(Command::new("mount").args(["-t", fstype, fstype, target]))?;
    }
    Ok(())
}
