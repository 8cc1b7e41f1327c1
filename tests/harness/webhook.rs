//! A webhook receiver on loopback, standing in for the HTTP endpoint (Alertmanager's webhook
//! receiver, a chat relay) that the coordinator posts alerts to: a real socket and real HTTP.

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    sync::mpsc,
    time::Duration,
};

/// A webhook receiver on loopback: each request body goes to the test (at most 10 requests).
pub fn receiver() -> (String, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind webhook receiver");
    let url = format!("http://{}/alert", listener.local_addr().expect("addr"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(10) {
            let Ok(mut s) = stream else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            // Read the head, then the body up to its Content-Length (bounded by the timeout).
            let mut data = Vec::new();
            let mut buf = [0_u8; 4096];
            let body = loop {
                let n = s.read(&mut buf).unwrap_or(0);
                data.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&data).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() >= len || n == 0 {
                        break body.to_owned();
                    }
                } else if n == 0 {
                    break String::new();
                }
            };
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
            if tx.send(body).is_err() {
                return;
            }
        }
    });
    (url, rx)
}
