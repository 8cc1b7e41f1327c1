//! The provenance rules on tables, then the real check on this machine's dpkg, PATH and files
//! for the three cases it exists to catch: a prerequisite owned by a package outside setup's
//! list, a file owned by no package, and a tool missing entirely.

use std::os::unix::fs::PermissionsExt as _;

use super::*;
use crate::setup::manifest::{Locate, Program};

const DPKG: &str = "\
gcc\tii \tcpp (= 4:12.2.0-3), gcc-12 (>= 12.2.0-1~)\t\tc-compiler, gcc-x86-64-linux-gnu (= 4:12.2.0-3)
gcc-12\tii \tcpp-12 (= 12.2.0-14), libgcc-12-dev (= 12.2.0-14), binutils-x86-64-linux-gnu | binutils\t\t
libgcc-12-dev\tii \tlibgcc-s1 (>= 12.2.0-14)\t\t
libgcc-s1\tii \t\tlibc6 (>= 2.35)\tlibgcc1
libc6\tii \t\t\t
cpp\tii \tcpp-12\t\t
cpp-12\tii \t\t\t
binutils\tii \tbinutils-x86-64-linux-gnu\t\t
binutils-x86-64-linux-gnu\tii \t\t\t
protobuf-compiler\tii \tlibprotoc32 (= 3.21.12-3), libc6 (>= 2.34)\t\t
libprotoc32\tii \tlibprotobuf32\t\t
libprotobuf32\tii \t\t\t
libprotobuf-dev\tii \tlibprotobuf32\t\t
needs-virtual\tii \tc-compiler\t\t
removed\trc \tlibc6\t\t
";

fn pkgs(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn closure_follows_depends_and_pre_depends_but_not_recommends() {
    let dpkg = Dpkg::parse(DPKG);
    let via = dpkg.closure(&["gcc", "protobuf-compiler"]);
    assert_eq!(via["gcc"], Vec::<String>::new());
    assert_eq!(via["libgcc-12-dev"], pkgs(&["gcc", "gcc-12"]));
    // Pre-Depends count: libgcc-s1 pre-depends on libc6.
    assert!(via.contains_key("libc6"));
    // An alternative clause takes whichever alternatives are installed.
    assert!(via.contains_key("binutils-x86-64-linux-gnu"));
    assert!(via.contains_key("binutils"));
    // protobuf-compiler only recommends libprotobuf-dev: setup installs without recommends.
    assert!(!via.contains_key("libprotobuf-dev"), "{via:?}");
}

#[test]
fn closure_resolves_virtual_packages_and_ignores_removed_ones() {
    let dpkg = Dpkg::parse(DPKG);
    let via = dpkg.closure(&["needs-virtual"]);
    assert_eq!(via["gcc"], pkgs(&["needs-virtual"]));
    assert!(!dpkg.installed("removed"));
    assert!(dpkg.closure(&["removed"]).is_empty());
    // A listed package that is not installed pulls in nothing.
    assert!(dpkg.closure(&["etcd-server"]).is_empty());
}

#[test]
fn dpkg_search_output_is_parsed_with_arch_suffixes_diversions_and_shared_paths() {
    let asked: BTreeSet<PathBuf> = [
        "/bin/sh",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/share/doc",
        "/usr/bin/ip",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    let text = "diversion by dash from: /bin/sh\n\
                diversion by dash to: /bin/sh.distrib\n\
                dash: /bin/sh\n\
                libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6\n\
                base-files, coreutils: /usr/share/doc\n\
                iproute2: /bin/ip\n";
    let owners = parse_dpkg_search(text, &asked);
    assert_eq!(owners[Path::new("/bin/sh")], pkgs(&["dash"]));
    assert_eq!(
        owners[Path::new("/lib/x86_64-linux-gnu/libc.so.6")],
        pkgs(&["libc6"])
    );
    assert_eq!(
        owners[Path::new("/usr/share/doc")],
        pkgs(&["base-files", "coreutils"])
    );
    // /bin/ip was not asked about; /usr/bin/ip was, and dpkg owns no such spelling.
    assert!(!owners.contains_key(Path::new("/usr/bin/ip")));
    assert_eq!(owners.len(), 3);
}

#[test]
fn usrmerge_aliases_cover_both_spellings() {
    let a = usrmerge_aliases(Path::new("/usr/bin/ip"));
    assert!(a.contains(&PathBuf::from("/bin/ip")));
    let b = usrmerge_aliases(Path::new("/lib/x86_64-linux-gnu/libc.so.6"));
    assert!(b.contains(&PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6")));
    assert_eq!(
        usrmerge_aliases(Path::new("/etc/x")),
        vec![PathBuf::from("/etc/x")]
    );
}

fn located(subject: &str, expected: Option<&str>, hops: &[&str]) -> Located {
    Located {
        subject: subject.to_owned(),
        expected: expected.map(str::to_owned),
        hops: hops.iter().map(PathBuf::from).collect(),
        searched: "in any PATH directory".to_owned(),
    }
}

fn owners(pairs: &[(&str, &str)]) -> BTreeMap<PathBuf, Vec<String>> {
    pairs
        .iter()
        .map(|(p, o)| (PathBuf::from(p), pkgs(&[o])))
        .collect()
}

fn failed(v: &Verdict) -> &str {
    match &v.outcome {
        Outcome::Failed(why) => why,
        Outcome::Proven(how) => panic!("{} was proven ({how}), expected a failure", v.subject),
    }
}

fn proven(v: &Verdict) -> &str {
    match &v.outcome {
        Outcome::Proven(how) => how,
        Outcome::Failed(why) => panic!("{} failed ({why}), expected it proven", v.subject),
    }
}

#[test]
fn judging_located_files() {
    let dpkg = Dpkg::parse(DPKG);
    let allowed = dpkg.closure(&["gcc", "protobuf-compiler"]);
    let own = owners(&[
        ("/usr/bin/gcc", "gcc"),
        ("/bin/protoc", "protobuf-compiler"),
        (
            "/usr/include/google/protobuf/descriptor.proto",
            "libprotobuf-dev",
        ),
        (
            "/usr/lib/gcc/x86_64-linux-gnu/12/libgcc_s.so",
            "libgcc-12-dev",
        ),
    ]);

    // The alternatives chain: neither /usr/bin/cc nor /etc/alternatives/cc is owned; gcc is.
    let cc = located(
        "program cc",
        Some("gcc"),
        &["/usr/bin/cc", "/etc/alternatives/cc", "/usr/bin/gcc"],
    );
    assert!(proven(&judge_located(&cc, &own, &allowed)).contains("← gcc"));

    // Found as /usr/bin/protoc, recorded by dpkg as /bin/protoc.
    let protoc = located(
        "program protoc",
        Some("protobuf-compiler"),
        &["/usr/bin/protoc"],
    );
    assert!(proven(&judge_located(&protoc, &own, &allowed)).contains("protobuf-compiler"));

    // A dependency of a listed package says through which.
    let libgcc = located(
        "linker input",
        None,
        &["/usr/lib/gcc/x86_64-linux-gnu/12/libgcc_s.so"],
    );
    assert!(proven(&judge_located(&libgcc, &own, &allowed)).contains("through gcc → gcc-12"));

    // The defect this check exists for: a file owned by a package setup does not install.
    let wkt = located(
        "protoc include",
        None,
        &["/usr/include/google/protobuf/descriptor.proto"],
    );
    let why = judge_located(&wkt, &own, &allowed);
    assert!(
        failed(&why).contains("add \"libprotobuf-dev\" to APT_PACKAGES"),
        "{why:?}"
    );

    // Owned by nobody.
    let by_hand = located(
        "program etcd",
        Some("etcd-server"),
        &["/usr/local/bin/etcd"],
    );
    let why = judge_located(&by_hand, &own, &allowed);
    assert!(
        failed(&why).contains("owned by no Debian package"),
        "{why:?}"
    );
    assert!(failed(&why).contains("etcd-server"), "{why:?}");

    // Missing entirely.
    let missing = located("program etcd", Some("etcd-server"), &[]);
    let why = judge_located(&missing, &own, &allowed);
    assert!(
        failed(&why).contains("not found (in any PATH directory)"),
        "{why:?}"
    );
    assert!(failed(&why).contains("`etcd-server`"), "{why:?}");
    assert!(failed(&why).contains("cargo xtask setup"), "{why:?}");

    // A copy from another package found before the listed package's own file.
    let own2 = owners(&[("/opt/x/bin/gcc", "other-gcc")]);
    let shadow = located("program cc", Some("gcc"), &["/opt/x/bin/gcc"]);
    let why = judge_located(&shadow, &own2, &allowed);
    assert!(
        failed(&why).contains("setup's `gcc` is installed"),
        "{why:?}"
    );
}

#[test]
fn listed_packages_must_be_installed() {
    let dpkg = Dpkg::parse(DPKG);
    let v = judge_listed_installed(&["gcc", "etcd-server"], &dpkg);
    proven(&v[0]);
    assert!(failed(&v[1]).contains("cargo xtask setup"));
}

#[test]
fn dependency_files_and_linker_traces_are_parsed() {
    let deps =
        "/tmp/set: interlock/v1/coordinator.proto \\\n /usr/include/google/protobuf/any.proto\n";
    assert_eq!(
        parse_dependency_file(deps),
        vec![
            "interlock/v1/coordinator.proto".to_owned(),
            "/usr/include/google/protobuf/any.proto".to_owned()
        ]
    );
    // protoc's own spelling: the continuation backslash glued to the file name.
    let glued = "set: a.proto\\\n /usr/include/google/protobuf/struct.proto\\\n b.proto\n";
    assert_eq!(
        parse_dependency_file(glued),
        vec![
            "a.proto".to_owned(),
            "/usr/include/google/protobuf/struct.proto".to_owned(),
            "b.proto".to_owned()
        ]
    );
    let trace = "/usr/bin/ld: mode elf_x86_64\n\
                 /usr/lib/gcc/x86_64-linux-gnu/12/../../../x86_64-linux-gnu/Scrt1.o\n\
                 /tmp/ccX.o\n\
                 -lgcc_s (/usr/lib/gcc/x86_64-linux-gnu/12/libgcc_s.so)\n\
                 /lib/x86_64-linux-gnu/libc.so.6\n";
    let files = parse_ld_trace(trace);
    assert_eq!(
        files,
        vec![
            PathBuf::from("/usr/lib/gcc/x86_64-linux-gnu/12/../../../x86_64-linux-gnu/Scrt1.o"),
            PathBuf::from("/tmp/ccX.o"),
            PathBuf::from("/usr/lib/gcc/x86_64-linux-gnu/12/libgcc_s.so"),
            PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
        ]
    );
}

const CRATES2: &str = r#"{"installs":{
 "bpf-linker 0.13.0 (registry+https://github.com/rust-lang/crates.io-index)":{"version_req":"=0.13.0","bins":["bpf-linker"],"features":["llvm-22"],"all_features":false,"no_default_features":true,"profile":"release"},
 "ripgrep 14.1.0 (registry+https://github.com/rust-lang/crates.io-index)":{"features":[],"no_default_features":false}
}}"#;

fn linker(record: Option<(String, Vec<String>, bool)>) -> CargoTool {
    CargoTool {
        found: Some(PathBuf::from("/root/.cargo/bin/bpf-linker")),
        cargo_bin: Some(PathBuf::from("/root/.cargo/bin")),
        record,
        runs: true,
        llvm_major: Some("22".to_owned()),
    }
}

#[test]
fn the_cargo_tool_must_be_the_one_setup_installs() {
    let record = crates2_record(CRATES2, "bpf-linker");
    assert_eq!(
        record,
        Some(("0.13.0".to_owned(), pkgs(&["llvm-22"]), true))
    );
    assert_eq!(crates2_record(CRATES2, "bpf"), None);
    proven(&judge_bpf_linker(&linker(record.clone())));

    // Not on PATH at all.
    let none = CargoTool {
        found: None,
        ..linker(record.clone())
    };
    assert!(failed(&judge_bpf_linker(&none)).contains("not found on PATH"));
    // Somewhere else first on PATH.
    let elsewhere = CargoTool {
        found: Some(PathBuf::from("/usr/local/bin/bpf-linker")),
        ..linker(record.clone())
    };
    assert!(failed(&judge_bpf_linker(&elsewhere)).contains("remove that copy"));
    // Copied by hand into cargo's bin: no install record.
    assert!(failed(&judge_bpf_linker(&linker(None))).contains("no record"));
    // Installed by cargo, but not the way setup does it.
    let default_llvm = Some(("0.13.0".to_owned(), pkgs(&["llvm-21"]), false));
    assert!(failed(&judge_bpf_linker(&linker(default_llvm))).contains("cargo uninstall"));
    // Recorded but broken.
    let broken = CargoTool {
        runs: false,
        ..linker(record)
    };
    assert!(failed(&judge_bpf_linker(&broken)).contains("--version` fails"));
}

#[test]
fn components_and_mounts() {
    let installed = pkgs(&[
        "cargo-x86_64-unknown-linux-gnu",
        "rust-src",
        "rustfmt-x86_64-unknown-linux-gnu",
    ]);
    proven(&judge_component("nightly", "rust-src", &installed));
    proven(&judge_component("stable", "rustfmt", &installed));
    assert!(
        failed(&judge_component("stable", "clippy", &installed)).contains("component add clippy")
    );
    // "rust-std-…" is not "rust-src".
    let std_only = pkgs(&["rust-std-x86_64-unknown-linux-gnu"]);
    failed(&judge_component("nightly", "rust-src", &std_only));

    let mounts = "tracefs /sys/kernel/tracing tracefs rw 0 0\nnone /sys/fs/bpf tmpfs rw 0 0\n";
    let v = judge_mounts(mounts);
    proven(&v[0]);
    // Something is mounted at /sys/fs/bpf, but not bpffs.
    failed(&v[1]);
}

// ---- the real check on this machine ---------------------------------------------------------

/// This machine's package database; the check only means something on Debian, so its absence
/// fails loudly.
fn real_dpkg() -> Dpkg {
    let dpkg = Dpkg::load().expect("dpkg-query is needed: these tests run on Debian");
    for pkg in ["coreutils", "findutils", "gcc"] {
        assert!(dpkg.installed(pkg), "Debian's {pkg} is needed by this test");
    }
    dpkg
}

fn path_of(dirs: &[&Path]) -> OsString {
    env::join_paths(dirs).expect("join PATH")
}

#[test]
fn a_program_from_a_package_outside_the_list_fails_naming_the_package() {
    let dpkg = real_dpkg();
    // `find` is findutils'; a list with only coreutils must say to add findutils.
    let v = check_programs(
        &[Program {
            locate: Locate::Path("find"),
            package: "coreutils",
        }],
        &["coreutils"],
        &path_of(&[Path::new("/usr/bin")]),
        &dpkg,
    )
    .expect("check");
    let why = failed(&v[0]);
    assert!(why.contains("add \"findutils\" to APT_PACKAGES"), "{why}");
    // The same program with its package on the list is proven, through dpkg's /usr/bin record.
    let ok = check_programs(
        &[Program {
            locate: Locate::Path("find"),
            package: "findutils",
        }],
        &["findutils"],
        &path_of(&[Path::new("/usr/bin")]),
        &dpkg,
    )
    .expect("check");
    assert!(proven(&ok[0]).contains("findutils"));
}

#[test]
fn the_c_compiler_is_proven_through_its_alternatives_chain_and_usrmerge() {
    let dpkg = real_dpkg();
    let v = check_programs(
        &[
            Program {
                locate: Locate::Path("cc"),
                package: "gcc",
            },
            // /usr/bin/sleep is recorded by dpkg as /bin/sleep.
            Program {
                locate: Locate::Path("sleep"),
                package: "coreutils",
            },
        ],
        &["gcc", "coreutils"],
        &path_of(&[Path::new("/usr/bin")]),
        &dpkg,
    )
    .expect("check");
    assert!(proven(&v[0]).contains("gcc"), "{v:?}");
    assert!(proven(&v[1]).contains("coreutils"), "{v:?}");
}

#[test]
fn a_program_owned_by_no_package_fails() {
    let dpkg = real_dpkg();
    let dir = tempfile::tempdir().expect("tempdir");
    let tool = dir.path().join("protoc");
    fs::write(&tool, "#!/bin/sh\nexit 0\n").expect("write");
    fs::set_permissions(&tool, fs::Permissions::from_mode(0o755)).expect("chmod");
    // Found first on PATH, before any Debian protoc.
    let v = check_programs(
        &[Program {
            locate: Locate::Path("protoc"),
            package: "protobuf-compiler",
        }],
        &["protobuf-compiler"],
        &path_of(&[dir.path(), Path::new("/usr/bin")]),
        &dpkg,
    )
    .expect("check");
    let why = failed(&v[0]);
    assert!(why.contains("owned by no Debian package"), "{why}");
    assert!(why.contains(&tool.display().to_string()), "{why}");
}

#[test]
fn a_missing_tool_fails_naming_the_package_setup_installs_it_with() {
    let dpkg = real_dpkg();
    let empty = tempfile::tempdir().expect("tempdir");
    let v = check_programs(
        &[
            Program {
                locate: Locate::Path("etcd"),
                package: "etcd-server",
            },
            Program {
                locate: Locate::Absolute("/nonexistent/interlock/etcdctl"),
                package: "etcd-client",
            },
        ],
        &["etcd-server", "etcd-client"],
        &path_of(&[empty.path()]),
        &dpkg,
    )
    .expect("check");
    assert!(failed(&v[0]).contains("not found"), "{v:?}");
    assert!(failed(&v[0]).contains("`etcd-server`"), "{v:?}");
    assert!(failed(&v[1]).contains("`etcd-client`"), "{v:?}");
}

#[test]
fn protoc_reads_well_known_protos_that_setup_must_name() {
    // The defect that hid behind a green CI: without libprotobuf-dev on the list, the includes
    // etcd-client's protos read must fail, naming it; with the real list they are proven.
    let dpkg = real_dpkg();
    assert!(
        dpkg.installed("protobuf-compiler") && dpkg.installed("libprotobuf-dev"),
        "run `cargo xtask setup` first: this test runs the real protoc"
    );
    let path = env::var_os("PATH").unwrap_or_default();
    let without: Vec<&str> = manifest::apt_names()
        .into_iter()
        .filter(|p| *p != "libprotobuf-dev")
        .collect();
    let v = check_protoc_includes(&without, &path, &dpkg).expect("check");
    let bad: Vec<&Verdict> = v.iter().filter(|v| v.is_failed()).collect();
    assert!(
        bad.iter()
            .any(|v| v.subject.contains("google/protobuf/descriptor.proto")),
        "{v:?}"
    );
    assert!(
        bad.iter()
            .all(|v| failed(v).contains("add \"libprotobuf-dev\"")),
        "{bad:?}"
    );
    let v = check_protoc_includes(&manifest::apt_names(), &path, &dpkg).expect("check");
    assert!(v.iter().all(|v| !v.is_failed()), "{v:?}");
    assert!(v.len() > 1, "protoc reported reading no system file: {v:?}");
}
