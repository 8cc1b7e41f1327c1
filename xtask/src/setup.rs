//! `cargo xtask setup`: installs every prerequisite, idempotently, and says what it installs.
//!
//! Each step checks first and does nothing when the prerequisite is already there, so a second
//! run takes a second or two.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::run_cmd;

/// Debian packages: etcd for the store and the tests, protoc for tonic/etcd-client code
/// generation, iproute2/iptables for network-namespace fault tests.
const APT_PACKAGES: [&str; 5] = [
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    "iproute2",
    "iptables",
];
/// bpf-linker version that links against the nightly's LLVM 22 (../shared/TOOLCHAIN.md).
const BPF_LINKER_VERSION: &str = "0.13.0";

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
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        eprintln!("xtask: apt packages present: {}", APT_PACKAGES.join(" "));
        return Ok(());
    }
    apt_install(&missing)
}

/// Debian packages only one benchmark needs, installed when it runs rather than by `setup`.
pub fn bench_packages(bench: &str) -> anyhow::Result<()> {
    let wanted: &[&str] = match bench {
        // The restart comparison runs its own foreground monit (never the system service).
        "actions" => &["monit"],
        _ => &[],
    };
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        return Ok(());
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

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn rust_components() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        eprintln!("xtask: rust-src for nightly present");
    } else {
        eprintln!("xtask: installing rust-src for nightly");
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let has = |tool: &str| {
        Command::new("cargo")
            .args([tool, "--version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    for (tool, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        if has(tool) {
            eprintln!("xtask: {component} present");
        } else {
            eprintln!("xtask: installing {component}");
            run_cmd(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    Ok(())
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
fn nightly_llvm_major() -> anyhow::Result<String> {
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

fn mounts() -> anyhow::Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    for (fstype, target) in [("tracefs", "/sys/kernel/tracing"), ("bpf", "/sys/fs/bpf")] {
        let mounted = mounts.lines().any(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, ty) = (f.next(), f.next(), f.next());
            dir == Some(target) && ty == Some(fstype)
        });
        if mounted {
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
