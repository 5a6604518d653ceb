//! Looking at a running broker from outside: its Prometheus samples and its memory.

use std::io::{Read, Write};
use std::net::TcpStream;

/// The `/metrics` text of the broker whose metrics endpoint is `addr` (HTTP/1.0, so the body is
/// neither chunked nor kept alive).
pub fn metrics_text(addr: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .expect("send the scrape");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the scrape");
    match response.split_once("\r\n\r\n") {
        Some((_head, body)) => body.to_string(),
        None => panic!("not an HTTP response: {response}"),
    }
}

/// The value of the unlabelled sample `name` in exposition `text`, if present.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|value| value.trim().parse().ok())
}

/// Resident anonymous memory of process `pid` in bytes (`RssAnon` of /proc/PID/status): the
/// heap and stacks, not the page cache behind the segment mappings.
pub fn anonymous_memory_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon in /proc/PID/status");
    kib * 1024
}
