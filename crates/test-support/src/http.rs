//! A minimal blocking HTTP/1.1 client over `std::net::TcpStream`, one request per connection
//! (`Connection: close`): Content-Length, chunked and read-to-close bodies, the body as lines or as SSE events, and
//! an abrupt close (a client that goes away). Loopback only; every read has a 120 s timeout so that a server that
//! never answers fails the test instead of hanging it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A whole response.
pub struct Resp {
    pub status: u16,
    /// The status line and the header lines, each ending in `\r\n`.
    pub head: String,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.head, name)
    }
}

fn header_in<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Connect to `addr` and send one request: `headers` as given, then `Content-Length` when there is a body. The
/// response is left unread. A body the server does not read (it answered early, e.g. 413, and closed) is not an
/// error.
pub fn send_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(120))).expect("set the read timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    let mut w = &s;
    w.write_all(req.as_bytes()).unwrap_or_else(|e| panic!("send {method} {path} to {addr}: {e}"));
    if let Some(b) = body {
        let _ = w.write_all(b);
    }
    s
}

/// [`send_with`] with `Content-Type: application/json` when there is a body.
pub fn send(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> TcpStream {
    let json: &[(&str, &str)] = if body.is_some() { &[("Content-Type", "application/json")] } else { &[] };
    send_with(addr, method, path, json, body)
}

/// An open connection whose response head has been read; the body is read on demand.
pub struct Conn {
    pub status: u16,
    /// The status line and the header lines, each ending in `\r\n`.
    pub head: String,
    r: BufReader<TcpStream>,
    chunked: bool,
    left: Option<usize>,
    /// Body bytes read but not yet handed out.
    buf: Vec<u8>,
    eof: bool,
}

impl Conn {
    /// Send a request as [`send`] does and read the response head.
    pub fn open(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> Conn {
        Conn::read_head(send(addr, method, path, body), method)
    }

    /// Send a request as [`send_with`] does and read the response head.
    pub fn open_with(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Conn {
        Conn::read_head(send_with(addr, method, path, headers, body), method)
    }

    /// Read the response head; a HEAD's response has no body whatever its `Content-Length` says.
    fn read_head(s: TcpStream, method: &str) -> Conn {
        let mut r = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).expect("read the response head") == 0 || line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let chunked = header_in(&head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let left = header_in(&head, "content-length")
            .map(|v| v.parse::<usize>().unwrap_or_else(|_| panic!("bad Content-Length {v:?} in:\n{head}")));
        let eof = method.eq_ignore_ascii_case("HEAD");
        Conn { status, head, r, chunked, left, buf: Vec::new(), eof }
    }

    /// The value of the first response header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.head, name)
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
            self.r.read_exact(&mut chunk).expect("read a body chunk");
            self.buf.extend_from_slice(&chunk[..n]);
            true
        } else if let Some(left) = self.left {
            if left == 0 {
                self.eof = true;
                return false;
            }
            let mut chunk = vec![0u8; left];
            self.r.read_exact(&mut chunk).expect("read the body (Content-Length)");
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

    /// The rest of the body, read to its end.
    pub fn rest(&mut self) -> Vec<u8> {
        while self.fill() {}
        std::mem::take(&mut self.buf)
    }

    /// Read the whole (remaining) body.
    pub fn body(mut self) -> Resp {
        let body = self.rest();
        Resp { status: self.status, head: self.head, body }
    }

    /// The next line of the body without its `\n` (or `\r\n`); a last line without a newline counts; None at the
    /// end of the body.
    pub fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(p) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..p + 1).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Some(String::from_utf8(line).expect("utf-8 line"));
            }
            if !self.fill() {
                if self.buf.is_empty() {
                    return None;
                }
                return Some(String::from_utf8(std::mem::take(&mut self.buf)).expect("utf-8 line"));
            }
        }
    }

    /// The next SSE event's `data:` payload (several `data:` lines joined by `\n`; events without data are
    /// skipped), None at the end of the stream.
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

    /// Close the connection now (a client that goes away).
    pub fn close(self) {
        let _ = self.r.get_ref().shutdown(std::net::Shutdown::Both);
    }
}

pub fn get(addr: SocketAddr, path: &str) -> Resp {
    Conn::open(addr, "GET", path, None).body()
}

/// POST `body` as JSON.
pub fn post(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Resp {
    Conn::open(addr, "POST", path, Some(body.to_string().as_bytes())).body()
}

/// Poll `GET /health` until `cond` holds on its JSON, up to ~60 s (a deadline, not a timing assertion); panics
/// naming `what` and the last answer.
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

/// The address a `dolly serve` child (spawned with stderr piped) listens on, from its "... http://ADDR" start-up
/// line; the stderr reader is handed back for the rest of its log. Panics if the server exits first.
pub fn listening_addr(child: &mut std::process::Child) -> (SocketAddr, BufReader<std::process::ChildStderr>) {
    let mut err = BufReader::new(child.stderr.take().expect("the server's stderr is piped"));
    let mut line = String::new();
    loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "server exited before listening");
        if let Some(a) = line.trim().split("http://").nth(1) {
            let addr = a.parse().unwrap_or_else(|e| panic!("listening address {a:?}: {e}"));
            return (addr, err);
        }
    }
}
