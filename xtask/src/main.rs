//! Developer tasks: `cargo xtask setup | ci | run | bench | chaos`.
//!
//! xtask must build on a machine where `setup` has not run yet, so it depends only on
//! `anyhow`; arguments are parsed with a `match` (a handful of flags do not justify clap's
//! build time here), and cargo's JSON messages are searched as text for the one field we need.

mod quickstart;
mod setup;

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, bail};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  setup          install every prerequisite (apt packages, rust-src, bpf-linker, mounts); idempotent
  setup --verify prove every prerequisite came from a step of setup (dpkg, cargo, rustup)
  ci             setup, setup --verify, fmt check, clippy -D warnings, eBPF object once, every test, run --once
  run [--once]   set up and run Interlock on this host: coordinator (embedded store) + agent (root)
  bench NAME     run a benchmark
  chaos NAME     run a fault-injection scenario";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::command(&args[1..]),
        Some("ci") => ci(),
        Some("run") => run(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("chaos") => chaos(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Runs a command in the workspace root, echoing it, and fails if it fails.
pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot start {}", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", describe(cmd));
    }
    Ok(())
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn ci() -> anyhow::Result<()> {
    setup::run()?;
    // Before anything builds: a prerequisite present only by hand fails here, naming the step
    // setup lacks, instead of passing CI on this machine and failing on a fresh one.
    setup::verify::run().context("cargo xtask setup --verify")?;
    run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))?;
    let object = build_ebpf_object()?;
    // Every later cargo invocation reuses this object instead of redoing the nested eBPF build
    // in its own OUT_DIR (1-2 minutes each on 2 cores).
    let with_object = |cmd: &mut Command| {
        cmd.env("INTERLOCK_EBPF_OBJECT", &object);
    };
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]);
    with_object(&mut clippy);
    run_cmd(&mut clippy)?;
    let mut test = cargo();
    test.args([
        "test",
        "--workspace",
        "--all-targets",
        "--locked",
        "--no-fail-fast",
    ]);
    with_object(&mut test);
    let summary = run_tests(&mut test)?;
    // The closing line CI's log readers look for.
    println!("ci: {} passed, {} failed", summary.passed, summary.failed);
    if summary.failed > 0 {
        bail!("{} test(s) failed", summary.failed);
    }
    if summary.ignored > 0 || summary.filtered > 0 {
        bail!(
            "{} test(s) ignored and {} filtered out: CI runs every test",
            summary.ignored,
            summary.filtered
        );
    }
    if summary.passed == 0 {
        bail!("no test ran");
    }
    // The quickstart, as README's first command runs it: one finding -> lease -> verified
    // outcome on this host.
    let mut build = cargo();
    build.args(["build", "--locked", "--bins"]);
    with_object(&mut build);
    run_cmd(&mut build)?;
    setup::require_root("the quickstart loads eBPF programs and mounts a demo disk")?;
    quickstart::run(&root().join("target/debug"), true).context("cargo xtask run --once")?;
    println!("ci: quickstart (run --once) passed");
    Ok(())
}

/// Builds the eBPF object from source (through the agent's build script and aya-build) and
/// returns a stable path to a copy of it under `target/ebpf/`.
pub fn build_ebpf_object() -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--package",
        "interlock-agent",
        "--locked",
        "--message-format=json",
    ])
    .env_remove("INTERLOCK_EBPF_OBJECT")
    .current_dir(root())
    .stdout(Stdio::piped());
    eprintln!(
        "xtask: $ {} (builds the eBPF object from source)",
        describe(&cmd)
    );
    let out = cmd.output().context("cannot run cargo build")?;
    if !out.status.success() {
        bail!("building the agent and its eBPF object failed (see the messages above)");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let out_dir = stdout
        .lines()
        .filter(|l| {
            l.contains("\"reason\":\"build-script-executed\"") && l.contains("#interlock-agent@")
        })
        .find_map(|l| json_string_field(l, "out_dir"))
        .context("cargo did not report the agent build script's OUT_DIR")?;
    let built = Path::new(&out_dir).join("interlock-agent-ebpf");
    let dest_dir = root().join("target/ebpf");
    std::fs::create_dir_all(&dest_dir)?;
    let dest = dest_dir.join("interlock-agent-ebpf.o");
    std::fs::copy(&built, &dest)
        .with_context(|| format!("copying {} to {}", built.display(), dest.display()))?;
    eprintln!("xtask: eBPF object built from source: {}", dest.display());
    Ok(dest)
}

/// Extracts `"field":"value"` from one line of cargo's JSON output.
fn json_string_field(line: &str, field: &str) -> Option<String> {
    let key = format!("\"{field}\":\"");
    let start = line.find(&key)? + key.len();
    let end = line[start..].find('"')?;
    Some(line[start..start + end].replace("\\\\", "\\"))
}

#[derive(Debug, Default)]
struct TestSummary {
    passed: u64,
    failed: u64,
    ignored: u64,
    filtered: u64,
}

/// Runs `cargo test`, passing its output through, and adds up every `test result:` line.
fn run_tests(cmd: &mut Command) -> anyhow::Result<TestSummary> {
    use std::io::{BufRead as _, BufReader};
    eprintln!("xtask: $ {}", describe(cmd));
    let mut child = cmd
        .current_dir(root())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let stdout = child.stdout.take().expect("piped");
    let mut summary = TestSummary::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(label), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n
                    .trim_start_matches("ok.")
                    .trim_start_matches("FAILED.")
                    .trim()
                    .parse()
                    .unwrap_or(0);
                match label {
                    "passed" => summary.passed += n,
                    "failed" => summary.failed += n,
                    "ignored" => summary.ignored += n,
                    "out" => summary.filtered += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    if !status.success() && summary.failed == 0 {
        bail!("cargo test failed with {status} before reporting a failed test (build error?)");
    }
    Ok(summary)
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let once = match args {
        [] => false,
        [flag] if flag == "--once" => true,
        _ => bail!("usage: cargo xtask run [--once]"),
    };
    setup::run()?;
    setup::require_root("the agent loads eBPF programs and the quickstart mounts a demo disk")?;
    run_cmd(cargo().args(["build", "--locked", "--bins"]))?;
    quickstart::run(&root().join("target/debug"), once)
}

/// Benchmarks, each a release binary of the tests package that starts what it measures.
const BENCHES: [&str; 4] = ["coordinator", "agent", "detectors", "actions"];

fn bench(args: &[String]) -> anyhow::Result<()> {
    let name = match args.first().map(String::as_str) {
        Some(name) if BENCHES.contains(&name) => name,
        Some(name) => bail!(
            "unknown benchmark `{name}`; available: {}",
            BENCHES.join(", ")
        ),
        None => bail!(
            "usage: cargo xtask bench NAME; available: {}",
            BENCHES.join(", ")
        ),
    };
    setup::run()?;
    let object = build_ebpf_object()?;
    run_cmd(
        cargo()
            .args([
                "run",
                "--release",
                "--locked",
                "-p",
                "interlock-tests",
                "--bin",
            ])
            .arg(format!("bench-{name}"))
            .env("INTERLOCK_EBPF_OBJECT", &object),
    )
}

fn chaos(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some(name) => bail!("unknown chaos scenario `{name}`; none is built yet"),
        None => bail!("usage: cargo xtask chaos NAME; none is built yet"),
    }
}
