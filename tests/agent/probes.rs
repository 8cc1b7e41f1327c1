//! Kernel probes against real processes, connections, cgroups and network namespaces (as root).
//!
//! Each test loads its own [`ProbeSet`] (its own maps), filters what it reads down to what it
//! caused itself (its pids, ports, namespaces), bounds every wait, and removes what it creates
//! through guards whose `Drop` also runs on panic. Network traffic stays on 127.0.0.0/8 or
//! inside namespaces the test creates.

use std::{
    fs,
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use interlock_agent::probes::{
    ConnectFailureRecord, ExitStatus, FlowRecord, ProbeOptions, ProbeSet, ProcessEvents,
    ProcessRecord, TcpCloseRecord, TcpStateRecord, detect_cgroup2_root, monotonic_now_ns,
};
use interlock_agent_common::tcp_state;
use interlock_tests::require_root;

const SIGKILL: i32 = 9;
const PYTHON: &str = "/usr/bin/python3";

/// A child that is killed and reaped when the guard drops (also on panic).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python() -> &'static str {
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is needed by this test; install Debian's python3"
    );
    PYTHON
}

/// Waits up to `within` for a process record matching `want`, keeping everything else.
async fn next_matching(
    events: &mut ProcessEvents,
    within: Duration,
    want: impl Fn(&ProcessRecord) -> bool,
) -> Option<ProcessRecord> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let record = tokio::time::timeout_at(deadline, events.next())
            .await
            .ok()?;
        let record = record.expect("reading PROCESS_EVENTS");
        if want(&record) {
            return Some(record);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exits_report_the_fatal_signal_or_the_exit_code_with_the_pid() {
    require_root("loading the process probes");
    let mut set = ProbeSet::load(&ProbeOptions {
        process: true,
        ..ProbeOptions::none()
    })
    .expect("load the process probes");
    let mut events = set.take_process_events().expect("process events");

    // SIGKILL: the child sleeps until killed.
    let mut sleeper = ChildGuard(
        Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep"),
    );
    let pid = sleeper.0.id();
    // Let the exec finish so the comm is the new program's.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let killed_at = monotonic_now_ns();
    sleeper.0.kill().expect("SIGKILL the child");
    let record = next_matching(
        &mut events,
        Duration::from_secs(5),
        |r| matches!(r, ProcessRecord::Exit(e) if e.pid == pid),
    )
    .await;
    let received_at = monotonic_now_ns();
    let Some(ProcessRecord::Exit(exit)) = record else {
        panic!("no exit event for killed pid {pid} within 5 s");
    };
    assert_eq!(
        exit.status,
        ExitStatus::Signaled {
            signal: SIGKILL,
            core_dumped: false
        }
    );
    assert_eq!(exit.comm, "sleep");
    assert!(exit.ts_ns >= killed_at, "the exit follows the kill");
    eprintln!(
        "exit latency: kill -> exit {} us, exit in kernel -> received in user space {} us, kill -> received {} us",
        (exit.ts_ns - killed_at) / 1000,
        (received_at - exit.ts_ns) / 1000,
        (received_at - killed_at) / 1000,
    );

    // Exit code 3.
    let mut exiter = ChildGuard(
        Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .expect("spawn sh"),
    );
    let pid = exiter.0.id();
    let record = next_matching(
        &mut events,
        Duration::from_secs(5),
        |r| matches!(r, ProcessRecord::Exit(e) if e.pid == pid),
    )
    .await;
    let Some(ProcessRecord::Exit(exit)) = record else {
        panic!("no exit event for pid {pid} (exit 3) within 5 s");
    };
    assert_eq!(exit.status, ExitStatus::Exited(3));
    assert_eq!(exit.comm, "sh");
    assert_eq!(exiter.0.wait().expect("reap").code(), Some(3));

    // Threads that end before their process are not reported: one record per process.
    let threaded = "import threading\nt = threading.Thread(target=lambda: None)\n\
                    t.start()\nt.join()\nraise SystemExit(4)\n";
    let mut child = ChildGuard(
        Command::new(python())
            .args(["-c", threaded])
            .spawn()
            .expect("spawn python"),
    );
    let pid = child.0.id();
    assert_eq!(child.0.wait().expect("reap").code(), Some(4));
    let first = next_matching(&mut events, Duration::from_secs(5), |r| {
        r.pid() == Some(pid)
    })
    .await;
    let Some(ProcessRecord::Exit(exit)) = first else {
        panic!("no exit event for threaded pid {pid}: {first:?}");
    };
    assert_eq!(exit.status, ExitStatus::Exited(4));
    let again = next_matching(&mut events, Duration::from_millis(300), |r| {
        r.pid() == Some(pid)
    })
    .await;
    assert_eq!(again, None, "a second record for pid {pid}");
    let counters = set.counters().expect("counters");
    assert_eq!(counters.process_events.dropped, 0);
}

#[test]
fn a_refused_connect_reports_the_connecting_pid_and_ports() {
    require_root("loading the TCP probes");
    let mut set = ProbeSet::load(&ProbeOptions {
        tcp_state: true,
        flows: true,
        ..ProbeOptions::none()
    })
    .expect("load the TCP probes");
    let mut failures = set.take_connect_failures().expect("connect failures");
    let flows = set.take_flow_stats().expect("flow stats");

    // A port that was just free and has no listener now.
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let err = TcpStream::connect(closed).expect_err("nothing listens there");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen: Vec<ConnectFailureRecord> = Vec::new();
    let failure = loop {
        failures.drain(&mut seen);
        if let Some(found) = seen.iter().find(|r| r.remote == closed) {
            break found.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no failed connect to {closed} within 5 s; saw {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        failure.pid,
        std::process::id(),
        "attributed to the connecting process"
    );
    assert_eq!(failure.local.ip(), Ipv4Addr::LOCALHOST);
    assert_ne!(
        failure.local.port(),
        0,
        "the socket was bound before the SYN"
    );
    assert!(failure.refused, "the peer answered with a RST");
    assert!(failure.ts_ns >= failure.started_ns);

    // The same refusal, seen per flow: our side received a RST, the closed port's side sent it.
    let records: Vec<FlowRecord> = flows.read().expect("read TCP_FLOWS");
    let ours = records
        .iter()
        .find(|f| f.local == failure.local && f.remote == closed)
        .unwrap_or_else(|| panic!("no flow {} -> {closed} in {records:?}", failure.local));
    assert_eq!(ours.resets_received, 1);
    let theirs = records
        .iter()
        .find(|f| f.local == closed && f.remote == failure.local)
        .unwrap_or_else(|| panic!("no flow {closed} -> {} in {records:?}", failure.local));
    assert_eq!(theirs.resets_sent, 1);
}

/// A v1 memory cgroup that is removed when the guard drops.
struct MemoryCgroup(PathBuf);

impl MemoryCgroup {
    fn create(limit_bytes: u64) -> Self {
        let root = Path::new("/sys/fs/cgroup/memory");
        assert!(
            root.join("memory.limit_in_bytes").exists(),
            "this test needs the cgroup v1 memory controller at {}",
            root.display()
        );
        let path = root.join(format!("interlock-probes-oom-{}", std::process::id()));
        let _ = fs::remove_dir(&path);
        fs::create_dir(&path).expect("create the memory cgroup");
        let guard = Self(path);
        fs::write(
            guard.0.join("memory.limit_in_bytes"),
            limit_bytes.to_string(),
        )
        .expect("set memory.limit_in_bytes");
        guard
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // The cgroup can only be removed once its processes are gone; they were killed and
        // reaped by their own guard, declared after this one so it drops first.
        for _ in 0..50 {
            if fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove {}", self.0.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_kill_in_a_small_memory_cgroup_names_the_victim() {
    require_root("loading the process probes and creating a memory cgroup");
    let mut set = ProbeSet::load(&ProbeOptions {
        process: true,
        ..ProbeOptions::none()
    })
    .expect("load the process probes");
    let mut events = set.take_process_events().expect("process events");
    let cgroup = MemoryCgroup::create(32 << 20);

    // The shell moves itself into the cgroup, then becomes Python (same pid), which touches
    // 200 MiB: far over the 32 MiB limit.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec {} -c \"b = b'x' * (200 << 20)\"",
        cgroup.0.display(),
        python()
    );
    let mut child = ChildGuard(
        Command::new("sh")
            .args(["-c", &script])
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the allocating child"),
    );
    let pid = child.0.id();
    let kill = next_matching(
        &mut events,
        Duration::from_secs(20),
        |r| matches!(r, ProcessRecord::OomKill(k) if k.pid == pid),
    )
    .await;
    let Some(ProcessRecord::OomKill(kill)) = kill else {
        panic!("no OOM kill of pid {pid} within 20 s");
    };
    assert_eq!(kill.comm, "python3");
    assert!(
        kill.anon_rss_kb > 16 * 1024,
        "the victim held most of the 32 MiB: {kill:?}"
    );
    let exit = next_matching(
        &mut events,
        Duration::from_secs(5),
        |r| matches!(r, ProcessRecord::Exit(e) if e.pid == pid),
    )
    .await;
    let Some(ProcessRecord::Exit(exit)) = exit else {
        panic!("no exit event for OOM-killed pid {pid}");
    };
    assert_eq!(
        exit.status,
        ExitStatus::Signaled {
            signal: SIGKILL,
            core_dumped: false
        }
    );
    let status = child.0.wait().expect("reap the child");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(SIGKILL)
    );
    drop(child);
    drop(cgroup);
}

/// Two network namespaces joined by a veth pair, deleted when the guard drops.
struct NetnsPair {
    client: String,
    server: String,
}

const CLIENT_ADDR: &str = "10.200.0.1";
const SERVER_ADDR: &str = "10.200.0.2";

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}; is iproute2/iptables installed?"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetnsPair {
    fn create() -> Self {
        let tag = std::process::id() % 100_000;
        let pair = Self {
            client: format!("il-cli-{tag}"),
            server: format!("il-srv-{tag}"),
        };
        let _ = Command::new("ip")
            .args(["netns", "del", &pair.client])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &pair.server])
            .output();
        run(&["ip", "netns", "add", &pair.client]);
        run(&["ip", "netns", "add", &pair.server]);
        // The veth pair is created inside the client namespace, then one end moves: it never
        // exists in the host's namespace.
        run(&[
            "ip",
            "-n",
            &pair.client,
            "link",
            "add",
            "veth-c",
            "type",
            "veth",
            "peer",
            "name",
            "veth-s",
            "netns",
            &pair.server,
        ]);
        for (ns, dev, addr) in [
            (&pair.client, "veth-c", CLIENT_ADDR),
            (&pair.server, "veth-s", SERVER_ADDR),
        ] {
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/30"),
                "dev",
                dev,
            ]);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.client, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

#[test]
fn retransmits_under_packet_loss_are_counted_for_the_flow() {
    require_root("loading the flow probes and creating network namespaces");
    let mut set = ProbeSet::load(&ProbeOptions {
        flows: true,
        ..ProbeOptions::none()
    })
    .expect("load the flow probes");
    let flows = set.take_flow_stats().expect("flow stats");
    let netns = NetnsPair::create();
    // Drop 30% of what arrives in the server's namespace: data and ACKs get lost, so the
    // client retransmits.
    run(&[
        "ip",
        "netns",
        "exec",
        &netns.server,
        "iptables",
        "-A",
        "INPUT",
        "-m",
        "statistic",
        "--mode",
        "random",
        "--probability",
        "0.3",
        "-j",
        "DROP",
    ]);
    let port = 5001;
    let python = python();
    let server_code = format!(
        "import socket\ns = socket.socket()\ns.bind(('{SERVER_ADDR}', {port}))\ns.listen(1)\n\
         print('ready', flush=True)\nc, _ = s.accept()\nn = 0\n\
         while True:\n    b = c.recv(65536)\n    if not b: break\n    n += len(b)\nprint(n, flush=True)\n"
    );
    let mut server = ChildGuard(
        Command::new("ip")
            .args(["netns", "exec", &netns.server, python, "-c", &server_code])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the server"),
    );
    let mut stdout = server.0.stdout.take().expect("server stdout");
    let mut ready = [0u8; 6];
    stdout.read_exact(&mut ready).expect("server ready");
    let client_code = format!(
        "import socket\nc = socket.create_connection(('{SERVER_ADDR}', {port}), timeout=20)\n\
         c.sendall(b'x' * (1 << 20))\nc.shutdown(socket.SHUT_WR)\nc.recv(1)\nc.close()\n"
    );
    let started = Instant::now();
    let status = Command::new("timeout")
        .args([
            "30",
            "ip",
            "netns",
            "exec",
            &netns.client,
            python,
            "-c",
            &client_code,
        ])
        .status()
        .expect("run the client");
    assert!(status.success(), "the transfer failed: {status}");
    let mut received = String::new();
    stdout.read_to_string(&mut received).expect("server output");
    assert_eq!(
        received.trim(),
        (1 << 20).to_string(),
        "the server got every byte"
    );

    let server_addr: SocketAddr = format!("{SERVER_ADDR}:{port}").parse().unwrap();
    let records = flows.read().expect("read TCP_FLOWS");
    let ours: Vec<&FlowRecord> = records.iter().filter(|f| f.remote == server_addr).collect();
    let retransmits: u64 = ours.iter().map(|f| f.retransmits).sum();
    eprintln!(
        "1 MiB through 30% loss in {:?}: {retransmits} retransmits on {:?}",
        started.elapsed(),
        ours.iter().map(|f| f.local).collect::<Vec<_>>()
    );
    assert!(
        retransmits > 0,
        "no retransmits counted for {server_addr}: {records:?}"
    );
    assert!(ours.iter().all(|f| f.local.ip().to_string() == CLIENT_ADDR));
}

#[test]
fn a_tiny_ring_accounts_for_every_event_as_received_or_dropped() {
    require_root("loading the TCP probe");
    let mut set = ProbeSet::load(&ProbeOptions {
        tcp_state: true,
        tcp_ring_bytes: 4096,
        run_stats: true,
        ..ProbeOptions::none()
    })
    .expect("load the TCP probe with a 4 KiB ring");
    let mut events = set.take_tcp_events().expect("tcp events");

    // A burst of loopback connections, without draining: the ring (about 40 records) fills.
    // The program sees every TCP socket on the host (other tests' too), so the checks below
    // hold for everything the program saw, and our own connections bound it from below.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    let connections = 200;
    for _ in 0..connections {
        let mut client = TcpStream::connect(server).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        client.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        accepted.read_exact(&mut byte).unwrap();
    }
    // Stop the program so the counters are final, then take everything that was queued.
    set.detach().expect("detach");
    let stats = set.program_stats().expect("program stats");
    let run_count = stats[0].run_count;
    eprintln!(
        "tcp_state: {run_count} runs, {} ns per run (ring mostly full), {:?} verified instructions",
        stats[0].run_time.as_nanos() / u128::from(run_count.max(1)),
        stats[0].verified_instructions
    );
    let mut received: Vec<TcpStateRecord> = Vec::new();
    events.drain(&mut received);
    let counters = set.counters().expect("counters").tcp_events;
    let not_tcp = set.counters().expect("counters").not_tcp;
    let ours = received
        .iter()
        .filter(|r| r.remote == server || r.local == server)
        .count();
    eprintln!(
        "tiny ring: {} received ({ours} ours), {} dropped, {} sent, {not_tcp} not TCP",
        received.len(),
        counters.dropped,
        counters.sent
    );
    assert_eq!(
        u64::try_from(received.len()).unwrap(),
        counters.sent,
        "user space received exactly what the kernel queued"
    );
    assert!(counters.dropped > 0, "a 4 KiB ring must overflow");
    // Our 200 connections made at least 3 transitions each (SYN_SENT, ESTABLISHED on both
    // sides), all counted as sent or dropped.
    assert!(counters.sent + counters.dropped >= 3 * connections);
    // The kernel's own run count of the program (bpf_stats, on for the life of the set) is an
    // independent tally of the generated events: every run was queued, dropped, or not TCP.
    assert_eq!(
        counters.sent + counters.dropped + not_tcp,
        run_count,
        "received + dropped (+ not TCP) == every run of the program"
    );
}

/// This process's cgroup v2 id as `bpf_get_current_cgroup_id` reports it: the inode number of
/// its directory in the cgroup2 tree (`kernfs` node id, `kernel/cgroup/cgroup.c`).
fn own_cgroup2_id() -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let text = fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line (0::) in /proc/self/cgroup");
    let root = detect_cgroup2_root().expect("a cgroup2 mount");
    let dir = root.join(path.trim_start_matches('/'));
    fs::metadata(&dir)
        .unwrap_or_else(|e| panic!("stat {}: {e}", dir.display()))
        .ino()
}

/// The test 1: one loopback connection between two named threads of this process.
/// The client sends 100,000 bytes, the server answers 2,345 and closes first. The lifecycle
/// events name the right process, thread name, cgroup and ports, and each side's close record
/// carries exactly what that side sent and received.
#[test]
fn a_loopback_connection_reports_its_lifecycle_and_its_bytes_on_close() {
    const UP: usize = 100_000;
    const DOWN: usize = 2_345;
    require_root("loading the TCP probes and attaching to the cgroup v2 root");
    let mut set = ProbeSet::load(&ProbeOptions {
        tcp_state: true,
        tcp_close: true,
        ..ProbeOptions::none()
    })
    .expect("load tcp_state and tcp_close");
    assert!(set.programs().contains(&"tcp_close"));
    let mut events = set.take_tcp_events().expect("tcp events");
    let mut closes = set.take_tcp_closes().expect("tcp closes");

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    let server_thread = std::thread::Builder::new()
        .name("il-server".into())
        .spawn(move || {
            let (mut conn, peer) = listener.accept().expect("accept");
            let mut up = vec![0u8; UP];
            conn.read_exact(&mut up).expect("read the upload");
            conn.write_all(&[7u8; DOWN]).expect("send the answer");
            drop(conn);
            peer
        })
        .expect("spawn the server thread");
    let client_thread = std::thread::Builder::new()
        .name("il-client".into())
        .spawn(move || {
            let mut conn = TcpStream::connect(server).expect("connect");
            let local = conn.local_addr().unwrap();
            conn.write_all(&[1u8; UP]).expect("send the upload");
            let mut down = Vec::new();
            conn.read_to_end(&mut down).expect("read the answer to EOF");
            assert_eq!(down.len(), DOWN);
            drop(conn);
            local
        })
        .expect("spawn the client thread");
    let client = client_thread.join().expect("client thread");
    let peer = server_thread.join().expect("server thread");
    assert_eq!(peer, client);

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen: Vec<TcpStateRecord> = Vec::new();
    let mut closed: Vec<TcpCloseRecord> = Vec::new();
    let (client_close, server_close) = loop {
        events.drain(&mut seen);
        closes.drain(&mut closed);
        let client_side = closed
            .iter()
            .find(|c| c.local == client && c.remote == server);
        let server_side = closed
            .iter()
            .find(|c| c.local == server && c.remote == client);
        if let (Some(c), Some(s)) = (client_side, server_side) {
            break (c.clone(), s.clone());
        }
        assert!(
            Instant::now() < deadline,
            "no close record for both ends of {client} -> {server} within 5 s; saw {closed:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    events.drain(&mut seen);
    eprintln!("client close: {client_close:?}");
    eprintln!("server close: {server_close:?}");

    // Lifecycle events: the connect, in the client thread's context.
    let syn = seen
        .iter()
        .find(|r| r.new_state == tcp_state::SYN_SENT && r.remote == server)
        .unwrap_or_else(|| panic!("no SYN_SENT to {server}"));
    assert_eq!(syn.pid, std::process::id());
    assert_eq!(syn.comm, "il-client");
    let cgroup = own_cgroup2_id();
    assert_eq!(syn.cgroup_id, cgroup);
    // ESTABLISHED of the active open names the connecting thread, whoever ran the SYN-ACK.
    let est = seen
        .iter()
        .find(|r| {
            r.socket == syn.socket
                && r.old_state == tcp_state::SYN_SENT
                && r.new_state == tcp_state::ESTABLISHED
        })
        .unwrap_or_else(|| panic!("no SYN_SENT -> ESTABLISHED for {client}"));
    assert_eq!((est.local, est.remote), (client, server));
    assert_eq!(est.pid, std::process::id());
    assert_eq!(est.comm, "il-client");
    assert_eq!(est.cgroup_id, cgroup);
    // The accepted side, with the ports swapped.
    assert!(
        seen.iter().any(|r| r.new_state == tcp_state::ESTABLISHED
            && r.local == server
            && r.remote == client),
        "no ESTABLISHED for the accepted socket {server} <- {client}"
    );

    // Close records. The kernel counts sequence space (see `TcpCloseEvent`): with both FINs
    // exchanged and acknowledged, received = payload + the peer's FIN on both sides, and
    // acked = payload + our FIN, plus our SYN on the connecting side only (the accepted
    // socket is created after the handshake, its SYN-ACK already acknowledged).
    let (up, down) = (UP as u64, DOWN as u64);
    assert!(client_close.active_open);
    assert_eq!(
        client_close.bytes_acked,
        up + 2,
        "client: upload + SYN + FIN acked"
    );
    assert_eq!(
        client_close.bytes_received,
        down + 1,
        "client: answer + FIN"
    );
    assert!(!server_close.active_open);
    assert_eq!(
        server_close.bytes_acked,
        down + 1,
        "server: answer + FIN acked"
    );
    assert_eq!(server_close.bytes_received, up + 1, "server: upload + FIN");
    for close in [&client_close, &server_close] {
        assert!(close.srtt > Duration::ZERO, "an RTT was sampled: {close:?}");
        assert!(
            close.srtt < Duration::from_secs(1),
            "loopback RTT: {close:?}"
        );
        assert!(close.duration > Duration::ZERO, "{close:?}");
        assert!(close.duration < Duration::from_secs(5), "{close:?}");
        // Loopback does not lose segments, but on a loaded machine a tail-loss probe can fire
        // and counts as a retransmission: a sane small count, not necessarily zero.
        assert!(close.total_retrans < 16, "{close:?}");
    }
    assert_ne!(client_close.cookie, server_close.cookie);
    let counters = set.counters().expect("counters");
    assert_eq!(counters.tcp_closes.dropped, 0);
    assert!(counters.tcp_closes.sent >= 2);
}
