//! `interlock-agent demo-service`: a tiny HTTP service to watch and restart, for the quickstart,
//! the integration tests and `cargo xtask bench actions`. It is a real process with a real
//! socket, so the whole loop (crash seen by the exit probe → lease → restart → health check)
//! runs for real.
//!
//! - `GET /healthz` answers 200 once the service is ready (`--ready-after` after start).
//! - `GET /crash` answers 200 and then exits with status 1: a crash on request, so a test or
//!   the quickstart can crash a process it did not start without signalling it.
//! - `--crash-after D` exits with status 1 D after start (a flapping process).
//! - `--starts FILE` appends one line (`pid unix_ms`) per start, so a test can count restarts.
//!
//! Plain blocking std networking: one connection at a time is all it needs.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// Settings of one demo service.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub listen: SocketAddr,
    pub ready_after: Duration,
    pub crash_after: Option<Duration>,
    pub starts: Option<PathBuf>,
}

/// Runs until `/crash` or `--crash-after`; returns the exit status to use.
pub fn serve(options: &DemoOptions) -> std::io::Result<u8> {
    if let Some(path) = &options.starts {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        writeln!(f, "{} {now}", std::process::id())?;
        f.sync_data()?;
    }
    let started = Instant::now();
    let listener = TcpListener::bind(options.listen)?;
    listener.set_nonblocking(true)?;
    // Bounded by the crash deadline when one is set; otherwise it serves until /crash (a
    // service runs until told to stop, which is the point).
    loop {
        if let Some(after) = options.crash_after
            && started.elapsed() >= after
        {
            return Ok(1);
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let ready = started.elapsed() >= options.ready_after;
                if handle(stream, ready) == Request::Crash {
                    return Ok(1);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Request {
    Health,
    Crash,
    Other,
}

fn handle(mut stream: TcpStream, ready: bool) -> Request {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    // The whole head, however the client split its writes (bounded by 1 KiB and the 1 s read
    // timeout): answering a half-read request and exiting would reset the connection.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0_u8; 256];
    while head.len() < 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let request = match path {
        "/healthz" => Request::Health,
        "/crash" => Request::Crash,
        _ => Request::Other,
    };
    let status = match (&request, ready) {
        (Request::Health, true) | (Request::Crash, _) => "200 OK",
        (Request::Health, false) => "503 Service Unavailable",
        (Request::Other, _) => "404 Not Found",
    };
    let _ = stream.write_all(
        format!("HTTP/1.0 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let _ = stream.flush();
    request
}
