//! The eBPF chain end to end: the real TCP program, loaded by the agent library, reports a real
//! loopback connection with its pid, ports and addresses.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use interlock_agent::probes::{TcpProbe, TcpProbeOptions, TcpStateRecord};
use interlock_agent_common::tcp_state;

#[test]
fn a_loopback_connection_is_reported_with_pid_ports_and_addresses() {
    interlock_tests::require_root("loading the TCP probe");
    let mut probe = TcpProbe::load(&TcpProbeOptions::default()).expect("load the TCP probe");

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    let mut client = TcpStream::connect(server).unwrap();
    let client_addr = client.local_addr().unwrap();
    let (mut accepted, _) = listener.accept().unwrap();
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    accepted.read_exact(&mut buf).unwrap();
    drop(client);
    drop(accepted);

    // Drain until both transitions of our connection arrived, bounded in time.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen: Vec<TcpStateRecord> = Vec::new();
    let ours = |seen: &[TcpStateRecord]| -> Option<(TcpStateRecord, TcpStateRecord)> {
        let syn = seen
            .iter()
            .find(|r| r.new_state == tcp_state::SYN_SENT && r.remote == server)?;
        let est = seen
            .iter()
            .find(|r| r.socket == syn.socket && r.new_state == tcp_state::ESTABLISHED)?;
        Some((syn.clone(), est.clone()))
    };
    let (syn, est) = loop {
        probe.drain(&mut seen);
        if let Some(found) = ours(&seen) {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no SYN_SENT+ESTABLISHED pair for {client_addr} -> {server} within 5 s; saw {} events",
            seen.len()
        );
        std::thread::sleep(Duration::from_millis(10));
    };

    // The connect runs in our process context, so the SYN_SENT event carries our pid.
    assert_eq!(syn.pid, std::process::id());
    assert_eq!(syn.old_state, tcp_state::CLOSE);
    assert_eq!(syn.remote, server);
    assert_eq!(
        est.local, client_addr,
        "ESTABLISHED carries the client's bound address"
    );
    assert_eq!(est.remote, server);
    assert!(!syn.comm.is_empty(), "comm is filled in");
    let (sent, dropped) = probe.counts().expect("read counters");
    assert!(sent >= 2, "kernel counted {sent} events sent");
    assert_eq!(dropped, 0, "nothing dropped with a 256 KiB ring");
}
