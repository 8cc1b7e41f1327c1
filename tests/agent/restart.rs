//! `process_restart` against real processes: a supervised python TCP server restarted and
//! health-checked, a process that ignores SIGTERM killed after the grace, and a restart that
//! `continue_ok` stops between stop and start. Every process here is started by the test's
//! `Supervisor` and ended by it (through its pidfd) when it drops.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use interlock_agent::actions::restart::{
    HostRestart, Interrupted, RawArgv, RawRestart, RawRestartTarget, RestartExecutor as _,
    RestartTarget, Stopped, Supervisor, Systemctl,
};

/// Signal numbers on Linux (this crate does not depend on libc).
const SIGTERM: i32 = 15;
const SIGKILL: i32 = 9;

/// A TCP server on the port given as argv[1]; with `ignore` as argv[2] it ignores SIGTERM
/// (set before it listens, so once the port accepts, the signal is ignored).
const SERVER: &str = r"
import signal, socket, sys
if len(sys.argv) > 2 and sys.argv[2] == 'ignore':
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', int(sys.argv[1])))
s.listen(16)
while True:
    c, _ = s.accept()
    c.close()
";

/// Debian's python3 (which setup installs), run directly: no shell is ever invoked.
fn python3() -> String {
    const PYTHON: &str = "/usr/bin/python3";
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is needed by this test; run `cargo xtask setup`"
    );
    PYTHON.to_owned()
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn target(argv: Vec<String>, port: u16, grace: &str) -> RestartTarget {
    let raw = RawRestart {
        target: vec![RawRestartTarget {
            name: Some("demo".into()),
            argv: Some(RawArgv::List(argv)),
            grace: Some(grace.into()),
            tcp: Some(format!("127.0.0.1:{port}")),
            health_window: Some("10s".into()),
            ..RawRestartTarget::default()
        }],
    };
    let config = raw.validate("restart").expect("valid config");
    config.target("demo").expect("allow-listed").clone()
}

fn server(port: u16, ignore_term: bool, grace: &str) -> RestartTarget {
    let mut argv = vec![python3(), "-c".into(), SERVER.into(), port.to_string()];
    if ignore_term {
        argv.push("ignore".into());
    }
    target(argv, port, grace)
}

/// Waits (bounded) until the port accepts.
fn wait_listening(port: u16) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("port {port} never accepted");
}

/// Whether a pid names no process (the test reaped it, so a live pid here would be a reuse).
fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn supervised_server_is_restarted_and_healthy() {
    let port = free_port();
    let target = server(port, false, "5s");
    let mut host = HostRestart::new(Systemctl);
    let old = host.supervisor.start(&target).expect("start");
    wait_listening(port);

    let report = host.restart(&target, &mut || true).expect("restart");
    eprintln!("restart report: {report:?}");
    assert_eq!(report.stopped, Some(Stopped::Signalled));
    assert_eq!(report.old_exit.and_then(|s| s.signal()), Some(SIGTERM));
    assert!(gone(old), "old pid {old} still exists");
    let new = report.new_pid.expect("new pid");
    assert_ne!(new, old);
    assert_eq!(host.supervisor.pid("demo"), Some(new));
    assert!(report.healthy, "{report:?}");
    assert!(report.interrupted.is_none());
    let to_start = report.stop_to_start.expect("stop to start");
    let to_healthy = report.stop_to_healthy.expect("stop to healthy");
    assert!(to_start <= to_healthy);
    eprintln!("stop→start {to_start:?}, stop→healthy {to_healthy:?}");
    TcpStream::connect(("127.0.0.1", port)).expect("new instance listens");
}

#[test]
fn process_ignoring_sigterm_is_killed_after_grace() {
    let port = free_port();
    let target = server(port, true, "300ms");
    let mut host = HostRestart::new(Systemctl);
    let old = host.supervisor.start(&target).expect("start");
    wait_listening(port);

    let mut asked = 0;
    let report = host
        .restart(&target, &mut || {
            asked += 1;
            true
        })
        .expect("restart");
    eprintln!("restart report: {report:?}");
    assert_eq!(report.stopped, Some(Stopped::Killed));
    assert_eq!(report.old_exit.and_then(|s| s.signal()), Some(SIGKILL));
    assert!(gone(old), "old pid {old} still exists");
    assert!(report.stop_to_start.expect("started") >= Duration::from_millis(300));
    assert!(report.healthy, "{report:?}");
    // Stop, kill, start, then at least one health poll.
    assert!(asked >= 4, "continue_ok asked {asked} times");
}

#[test]
fn refusal_after_stop_keeps_the_process_down() {
    let port = free_port();
    let target = target(vec!["/bin/sleep".into(), "600".into()], port, "5s");
    let mut host = HostRestart::new(Systemctl);
    let old = host.supervisor.start(&target).expect("start");

    let mut asked = 0;
    let report = host
        .restart(&target, &mut || {
            asked += 1;
            asked == 1
        })
        .expect("restart");
    eprintln!("restart report: {report:?}");
    assert_eq!(report.stopped, Some(Stopped::Signalled));
    assert_eq!(report.interrupted, Some(Interrupted::Start));
    assert!(!report.started && !report.healthy);
    assert_eq!(report.new_pid, None);
    assert_eq!(host.supervisor.pid("demo"), None);
    assert!(gone(old), "old pid {old} still exists");
    assert_eq!(asked, 2, "asked before the stop and before the start");
}

/// An agent killed while its supervised instance runs: the next run adopts that instance
/// (same pid, start time and argv) instead of starting a second copy, refuses to adopt it for a
/// target whose argv differs, and restarts the adopted instance through its pidfd.
#[test]
fn a_restarted_agent_adopts_its_running_instance_and_can_restart_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("actions.supervised");
    let port = free_port();
    let demo = server(port, false, "5s");
    let config = RawRestart {
        target: vec![RawRestartTarget {
            name: Some("demo".into()),
            argv: Some(RawArgv::List(match demo.kind() {
                interlock_agent::actions::restart::TargetKind::Supervised(s) => s.argv.clone(),
                interlock_agent::actions::restart::TargetKind::Unit(_) => unreachable!(),
            })),
            grace: Some("5s".into()),
            tcp: Some(format!("127.0.0.1:{port}")),
            health_window: Some("10s".into()),
            ..RawRestartTarget::default()
        }],
    }
    .validate("restart")
    .expect("valid");

    let mut first = Supervisor::with_state(state.clone());
    let pid = first.start(&demo).expect("start");
    first.save().expect("save state");
    wait_listening(port);
    // The agent dies without stopping anything (as SIGKILL would): no Drop runs.
    std::mem::forget(first);

    // Another target under the same name but another argv is not ours to adopt.
    let other_port = free_port();
    let other = server(other_port, false, "5s");
    let other_config = RawRestart {
        target: vec![RawRestartTarget {
            name: Some("demo".into()),
            argv: Some(RawArgv::List(match other.kind() {
                interlock_agent::actions::restart::TargetKind::Supervised(s) => s.argv.clone(),
                interlock_agent::actions::restart::TargetKind::Unit(_) => unreachable!(),
            })),
            tcp: Some(format!("127.0.0.1:{other_port}")),
            ..RawRestartTarget::default()
        }],
    }
    .validate("restart")
    .expect("valid");
    assert!(
        Supervisor::with_state(state.clone())
            .adopt(&other_config)
            .is_empty()
    );

    let mut exec = HostRestart {
        systemd: Systemctl,
        supervisor: Supervisor::with_state(state.clone()),
    };
    assert_eq!(
        exec.supervisor.adopt(&config),
        vec![("demo".to_owned(), pid)]
    );
    assert_eq!(exec.supervisor.pid("demo"), Some(pid));

    let target = config.target("demo").expect("allow-listed");
    let report = exec.restart(target, &mut || true).expect("restart");
    assert_eq!(report.stopped, Some(Stopped::Signalled), "{report:?}");
    assert!(report.healthy, "{report:?}");
    let new_pid = report.new_pid.expect("new pid");
    assert_ne!(new_pid, pid);
    // The adopted instance was this test's child all along (the "dead agent"): reap it.
    let status = nix::sys::wait::waitpid(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        None,
    )
    .expect("reap the old instance");
    assert!(
        matches!(
            status,
            nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGTERM, _)
        ),
        "{status:?}"
    );
    exec.supervisor.save().expect("save");
    let recorded = std::fs::read_to_string(&state).expect("state");
    assert!(
        recorded.starts_with(&format!("demo {new_pid} ")),
        "{recorded}"
    );
}
