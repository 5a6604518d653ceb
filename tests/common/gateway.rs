//! The gateway binary for integration tests: start it in front of a broker, speak HTTP/1.1
//! to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// A running `syncline-gateway`, killed when dropped.
pub struct GatewayProcess {
    pub child: Child,
    /// `HOST:PORT` it serves.
    pub addr: String,
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `syncline-gateway` on an ephemeral loopback port in front of `broker`.
pub fn start_gateway(broker: &str, extra: &[&str]) -> GatewayProcess {
    let child = Command::new(super::binary("syncline-gateway"))
        .args(["--listen", "127.0.0.1:0", "--broker", broker])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn syncline-gateway");
    // Owned by the guard from here: killed and waited for however the test ends.
    let mut gateway = GatewayProcess {
        child,
        addr: String::new(),
    };
    let stderr = gateway.child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the gateway logs `listening on`");
        if let Some(rest) = line.split("listening on ").nth(1) {
            gateway.addr = rest.split_whitespace().next().unwrap().to_string();
            return gateway;
        }
    }
}

/// An HTTP answer: (status, headers lower-cased, body).
pub type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// One HTTP/1.1 request over plain TCP.
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    http_on(stream, addr, method, path, headers, body)
}

/// One HTTP/1.1 request over `stream` (plain or TLS), which it then closes.
pub fn http_on(
    mut stream: impl Read + Write,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = response[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..end]).unwrap(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[end + 2..end + 2 + size]);
            rest = &rest[end + 2 + size + 2..];
        }
        body = out;
    }
    (status, headers, body)
}

pub fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Runs the `syncline` CLI against `broker`; panics with its stderr unless it succeeds;
/// returns its stdout.
pub fn cli_ok(broker: &str, args: &[&str]) -> String {
    let output = super::cluster::run_cli_at(broker, args);
    assert!(
        output.status.success(),
        "syncline {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The next text frame of a WebSocket as JSON (within 60 s); a close frame comes back as
/// `{"closed": CODE}`.
pub async fn next_frame<S>(socket: &mut tokio_tungstenite::WebSocketStream<S>) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .expect("a frame within 60 s")
            .expect("the socket is open")
            .expect("a frame that parses");
        match message {
            Message::Text(text) => return json_of(text.as_bytes()),
            Message::Close(frame) => {
                return serde_json::json!({"closed": frame.map(|f| u16::from(f.code))})
            }
            _ => continue,
        }
    }
}
