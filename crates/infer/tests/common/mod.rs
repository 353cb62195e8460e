//! Test helpers: a minimal blocking HTTP/1.1 client over `std::net::TcpStream` (Content-Length and chunked
//! bodies, SSE events), so server tests need no HTTP client dependency. Loopback only.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub struct Resp {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// An open connection whose response head has been read.
pub struct Conn {
    pub status: u16,
    pub head: String,
    r: BufReader<TcpStream>,
    chunked: bool,
    left: Option<usize>,
    buf: Vec<u8>,
    eof: bool,
}

pub fn send(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    let mut w = &s;
    w.write_all(req.as_bytes()).unwrap();
    if let Some(b) = body {
        // a server may answer (413) and close before reading everything
        let _ = w.write_all(b);
    }
    s
}

impl Conn {
    pub fn open(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> Conn {
        let s = send(addr, method, path, body);
        let mut r = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let lower = head.to_ascii_lowercase();
        let chunked = lower.contains("transfer-encoding: chunked");
        let left =
            lower.lines().find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()));
        Conn { status, head, r, chunked, left, buf: Vec::new(), eof: false }
    }

    /// Read more body bytes into `buf`; false at the end of the body.
    fn fill(&mut self) -> bool {
        if self.eof {
            return false;
        }
        if self.chunked {
            let mut line = String::new();
            if self.r.read_line(&mut line).unwrap_or(0) == 0 {
                self.eof = true;
                return false;
            }
            let n = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
            if n == 0 {
                self.eof = true;
                return false;
            }
            let mut chunk = vec![0u8; n + 2];
            self.r.read_exact(&mut chunk).unwrap();
            self.buf.extend_from_slice(&chunk[..n]);
            true
        } else if let Some(left) = self.left {
            if left == 0 {
                self.eof = true;
                return false;
            }
            let mut chunk = vec![0u8; left];
            self.r.read_exact(&mut chunk).unwrap();
            self.buf.extend_from_slice(&chunk);
            self.left = Some(0);
            true
        } else {
            let mut chunk = vec![0u8; 4096];
            let n = self.r.read(&mut chunk).unwrap_or(0);
            if n == 0 {
                self.eof = true;
                return false;
            }
            self.buf.extend_from_slice(&chunk[..n]);
            true
        }
    }

    pub fn body(mut self) -> Resp {
        while self.fill() {}
        Resp { status: self.status, head: self.head, body: self.buf }
    }

    /// The next SSE event's `data:` payload, None at the end of the stream.
    pub fn next_event(&mut self) -> Option<String> {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let ev: Vec<u8> = self.buf.drain(..p + 2).collect();
                let ev = String::from_utf8(ev).expect("utf-8 event");
                let data: Vec<&str> =
                    ev.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| d.trim_start()).collect();
                if data.is_empty() {
                    continue;
                }
                return Some(data.join("\n"));
            }
            if !self.fill() {
                return None;
            }
        }
    }

    /// Close the connection now (client disconnect).
    pub fn close(self) {
        let _ = self.r.get_ref().shutdown(std::net::Shutdown::Both);
    }
}

pub fn get(addr: SocketAddr, path: &str) -> Resp {
    Conn::open(addr, "GET", path, None).body()
}

pub fn post(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Resp {
    Conn::open(addr, "POST", path, Some(body.to_string().as_bytes())).body()
}

/// Poll `cond` on /health up to ~60 s (a deadline, not a timing assertion).
pub fn wait_health(addr: SocketAddr, what: &str, cond: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..6000 {
        last = get(addr, "/health").json();
        if cond(&last) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for: {what}; last /health: {last}");
}

pub fn tokenizer_path() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/20B_tokenizer.json")
}
