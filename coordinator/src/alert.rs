//! Alert delivery: POSTs an alert as JSON to the policy's webhook.
//!
//! Written by hand over a plain TCP stream rather than pulling an HTTP client crate: one
//! bounded POST of a small JSON body to an `http://` URL is all it does (the policy refuses
//! other schemes; put a relay in front of an HTTPS receiver). It must not hold decision logic.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// Whole-request time limit: an alert must never stall the coordinator.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `body` to `url` (`http://host:port/path`) and expects a 2xx status.
pub async fn post_json(url: &str, body: &serde_json::Value) -> Result<(), String> {
    tokio::time::timeout(TIMEOUT, post(url, body))
        .await
        .map_err(|_| format!("no answer from {url} within {TIMEOUT:?}"))?
}

async fn post(url: &str, body: &serde_json::Value) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("alert webhook {url} must start with http://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let payload = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    let mut stream = TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending to {addr}: {e}"))?;
    let mut head = vec![0u8; 64];
    let n = stream
        .read(&mut head)
        .await
        .map_err(|e| format!("reading from {addr}: {e}"))?;
    let status_line = String::from_utf8_lossy(&head[..n]);
    let code = status_line.split_whitespace().nth(1).unwrap_or("");
    if code.starts_with('2') {
        Ok(())
    } else {
        Err(format!(
            "{url} answered {:?}",
            status_line.lines().next().unwrap_or("")
        ))
    }
}
