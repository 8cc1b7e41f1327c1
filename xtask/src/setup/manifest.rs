//! What `setup` installs, and what of it the build, the tests, the quickstart and the benchmarks
//! use. One list, read by both the installer (`setup`) and the provenance check
//! (`setup --verify`), so the two cannot disagree. This module is data only: it runs nothing.

/// Debian packages `setup` installs when absent (`apt-get install --no-install-recommends`).
///
/// Every package is named explicitly, including the base system's (coreutils, dash, …) and the
/// C toolchain that links every Rust binary: naming a package the image happens to ship costs a
/// `dpkg-query` call, while leaving one out is how `libprotobuf-dev` went missing (it is only a
/// *Recommends* of `protobuf-compiler`, and setup does not install recommends).
pub const APT_PACKAGES: &[AptPackage] = &[
    AptPackage::new(
        "gcc",
        "the linker `cc` that rustc drives for every host binary",
    ),
    AptPackage::new(
        "libc6-dev",
        "crt objects and libc for linking host binaries",
    ),
    AptPackage::new(
        "protobuf-compiler",
        "`protoc` for tonic/prost code generation",
    ),
    AptPackage::new(
        "libprotobuf-dev",
        "the well-known .proto files (google/protobuf/*.proto) that etcd-client's protos import",
    ),
    AptPackage::new(
        "etcd-server",
        "`etcd` for the store conformance suite and every fencing test",
    ),
    AptPackage::new("etcd-client", "`etcdctl`, to inspect a test's etcd by hand"),
    AptPackage::new("iproute2", "`ip` for network-namespace tests"),
    AptPackage::new(
        "iptables",
        "packet drops inside test network namespaces (there is no netem)",
    ),
    AptPackage::new(
        "python3",
        "memory-pressure, OOM and listener helper processes in the tests",
    ),
    AptPackage::new("monit", "the baseline of `cargo xtask bench actions`"),
    AptPackage::new(
        "coreutils",
        "`sleep`, `stat`, `timeout`, `id`, `chmod` in tests and setup",
    ),
    AptPackage::new("util-linux", "`setsid` in the restart benchmark"),
    AptPackage::new(
        "mount",
        "`mount`/`umount` for tmpfs test disks and tracefs/bpffs",
    ),
    AptPackage::new("procps", "`kill` for processes the tests started"),
    AptPackage::new(
        "findutils",
        "`find -delete`, the cleanup benchmark's baseline",
    ),
    AptPackage::new(
        "dash",
        "`/bin/sh` for test helper processes (never used by the product)",
    ),
    AptPackage::new(
        "dpkg",
        "`dpkg-query`/`dpkg -S`, which setup and `setup --verify` run",
    ),
    AptPackage::new(
        "apt",
        "`apt-get`, which setup installs everything else with",
    ),
];

/// A Debian package setup installs, with the reason it is on the list.
#[derive(Debug, Clone, Copy)]
pub struct AptPackage {
    pub name: &'static str,
    pub why: &'static str,
}

impl AptPackage {
    const fn new(name: &'static str, why: &'static str) -> Self {
        Self { name, why }
    }
}

/// How a program is found when it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locate {
    /// Looked up on `PATH`, as `Command::new("name")` does.
    Path(&'static str),
    /// Run by absolute path.
    Absolute(&'static str),
}

/// A program something in the repository runs, and the package in [`APT_PACKAGES`] that must
/// provide it.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    pub locate: Locate,
    pub package: &'static str,
}

const fn on_path(name: &'static str, package: &'static str) -> Program {
    Program {
        locate: Locate::Path(name),
        package,
    }
}

const fn absolute(path: &'static str, package: &'static str) -> Program {
    Program {
        locate: Locate::Absolute(path),
        package,
    }
}

/// Every external program the build, the tests, the quickstart, the benchmarks and setup itself
/// run. A unit test scans the workspace for `Command::new("…")` and for absolute program paths
/// in the tests, so a new one cannot be used without being listed here.
pub const PROGRAMS: &[Program] = &[
    on_path("cc", "gcc"),
    on_path("protoc", "protobuf-compiler"),
    absolute("/usr/bin/etcd", "etcd-server"),
    on_path("etcdctl", "etcd-client"),
    on_path("ip", "iproute2"),
    on_path("iptables", "iptables"),
    absolute("/usr/bin/python3", "python3"),
    on_path("monit", "monit"),
    on_path("mount", "mount"),
    on_path("umount", "mount"),
    on_path("kill", "procps"),
    on_path("sleep", "coreutils"),
    absolute("/bin/sleep", "coreutils"),
    absolute("/bin/true", "coreutils"),
    on_path("stat", "coreutils"),
    on_path("timeout", "coreutils"),
    on_path("id", "coreutils"),
    on_path("chmod", "coreutils"),
    on_path("find", "findutils"),
    absolute("/usr/bin/setsid", "util-linux"),
    on_path("sh", "dash"),
    absolute("/bin/sh", "dash"),
    on_path("dpkg-query", "dpkg"),
    on_path("apt-get", "apt"),
];

/// Programs named in the code that are not prerequisites of the build or the tests, each with
/// the reason. The scan in the tests accepts these and nothing else unlisted.
#[cfg(test)]
pub const NOT_PREREQUISITES: &[(&str, &str)] = &[
    (
        "cargo",
        "rustup's proxy, part of the machine's toolchain; checked as a toolchain",
    ),
    (
        "rustc",
        "rustup's proxy, part of the machine's toolchain; checked as a toolchain",
    ),
    (
        "rustup",
        "the machine's toolchain manager; setup adds components, never toolchains",
    ),
    (
        "bpf-linker",
        "a cargo tool setup installs; checked as a cargo tool",
    ),
    (
        "systemctl",
        "production hosts only: the agent's systemd port; tests use its fake (PID 1 is not systemd)",
    ),
    ("/usr/bin/demo", "an example path in a config error message"),
    (
        "/usr/bin/check",
        "an example path in a config error message",
    ),
    (
        "/usr/bin/api",
        "an example path in a bad-input test's config",
    ),
];

/// The cargo tool setup installs: bpf-linker, linked against the nightly's own LLVM
/// (../shared/TOOLCHAIN.md: a plain `cargo install` finds Debian's LLVM 14).
pub const BPF_LINKER: &str = "bpf-linker";
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Rustup components setup adds: (toolchain, component, who needs it).
pub const RUST_COMPONENTS: &[(&str, &str, &str)] = &[
    (
        "nightly",
        "rust-src",
        "building the eBPF programs with -Z build-std=core",
    ),
    ("stable", "rustfmt", "`cargo fmt --check` in ci"),
    ("stable", "clippy", "`cargo clippy -D warnings` in ci"),
];

/// Kernel filesystems setup mounts: (fstype, mount point).
pub const MOUNTS: &[(&str, &str)] = &[("tracefs", "/sys/kernel/tracing"), ("bpf", "/sys/fs/bpf")];

/// Link libraries rustc passes to `cc` for a std binary on x86_64-unknown-linux-gnu; the check
/// links a trivial program with them under `ld --trace` to learn every file the linker reads.
pub const LINK_LIBS: &[&str] = &["gcc_s", "util", "rt", "pthread", "m", "dl", "c"];

pub fn apt_names() -> Vec<&'static str> {
    APT_PACKAGES.iter().map(|p| p.name).collect()
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, fs};

    use super::*;

    /// Every `.rs` file of the workspace outside `target/`, with its path relative to the root.
    fn sources() -> Vec<(String, String)> {
        let root = crate::root();
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            assert!(
                out.len() < 5_000,
                "the scan is bounded; the workspace grew past it"
            );
            for entry in fs::read_dir(&dir).expect("read_dir").flatten() {
                let path = entry.path();
                let rel = path.strip_prefix(&root).expect("under root").to_owned();
                let name = rel.to_string_lossy().into_owned();
                if entry.file_type().expect("file type").is_dir() {
                    if !matches!(name.as_str(), "target" | ".git") {
                        stack.push(path);
                    }
                } else if name.ends_with(".rs") {
                    out.push((name, fs::read_to_string(&path).expect("read source")));
                }
            }
        }
        out
    }

    /// The string literal that starts at `text` (just after its opening quote).
    fn literal(text: &str) -> &str {
        let end = text.find(['"', ' ', '\\']).unwrap_or(text.len());
        &text[..end]
    }

    #[test]
    fn every_program_the_code_runs_is_listed() {
        let listed: BTreeSet<&str> = PROGRAMS
            .iter()
            .map(|p| match p.locate {
                Locate::Path(name) | Locate::Absolute(name) => name,
            })
            .chain(NOT_PREREQUISITES.iter().map(|(name, _)| *name))
            .collect();
        let mut unlisted = BTreeSet::new();
        let mut seen = 0;
        for (file, text) in sources() {
            // The manifest and the check's own tables name paths as data.
            if file.starts_with("xtask/src/setup/") {
                continue;
            }
            for (at, _) in text.match_indices("Command::new(\"") {
                let name = literal(&text[at + "Command::new(\"".len()..]);
                seen += 1;
                if !listed.contains(name) {
                    unlisted.insert(format!("{name} ({file})"));
                }
            }
            // Programs run by absolute path, in the tests and xtask (product code names
            // example paths in its messages).
            if file.starts_with("tests/") || file.starts_with("xtask/") {
                for prefix in [
                    "\"/bin/",
                    "\"/usr/bin/",
                    "\"/sbin/",
                    "\"/usr/sbin/",
                    "\"/usr/local/",
                ] {
                    for (at, _) in text.match_indices(prefix) {
                        let path = literal(&text[at + 1..]);
                        seen += 1;
                        if !listed.contains(path) {
                            unlisted.insert(format!("{path} ({file})"));
                        }
                    }
                }
            }
        }
        assert!(
            seen > 20,
            "the scan found only {seen} program uses: is it reading the sources?"
        );
        assert!(
            unlisted.is_empty(),
            "programs used but not in xtask/src/setup/manifest.rs (add each to PROGRAMS with the \
             Debian package that provides it, and that package to APT_PACKAGES): {unlisted:?}"
        );
    }

    #[test]
    fn every_program_names_a_package_setup_installs() {
        let names = apt_names();
        for p in PROGRAMS {
            assert!(
                names.contains(&p.package),
                "{:?} names {}, which is not in APT_PACKAGES",
                p.locate,
                p.package
            );
        }
        let unique: BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(
            unique.len(),
            names.len(),
            "APT_PACKAGES lists a package twice"
        );
    }
}
