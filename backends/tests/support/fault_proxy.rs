//! A fault-injecting HTTP/1.1 proxy for the tests, between nixpush and a real server
//! (SeaweedFS, nginx) on loopback.
//!
//! Every request gets a sequence number in the order it arrives, and a [`Plan`] decides from
//! it (and the request's head) what happens: forwarded untouched, or one of the faults of
//! [`Fault`]. [`seeded_mix`] is a plan that picks a fault for about `percent` % of the
//! requests, from a seed: the same seed gives the same faults to the same sequence numbers on
//! every run. Every request is recorded ([`Record`]: method, target, fault, status, when it
//! arrived and ended, how many were in flight), and logged one line each to a file.
//!
//! How it works, kept simple: one thread per client connection, one request per connection
//! (every answer says `Connection: close`), one fresh upstream connection per forwarded
//! request, the whole request read before it is forwarded and the whole answer read before it
//! is sent back (the objects of the tests are small: a few MiB). The `Host` header is forwarded
//! as the client sent it, so S3 signatures (which cover it) stay valid.

#![allow(dead_code)]

use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the proxy does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forwarded, answered as the server answered.
    Pass,
    /// Not forwarded: answered with this status and an S3-style error body (`code`), with a
    /// `Retry-After` header if given.
    Status {
        status: u16,
        code: &'static str,
        retry_after: Option<u64>,
    },
    /// Not forwarded: the connection is reset (RST) once the request's head is read.
    Reset,
    /// Not forwarded, never answered: the connection is held for the stall time, then closed.
    Timeout,
    /// Forwarded; the answer's head and half its body are sent back, then the connection is
    /// closed (a PUT may have landed although its writer cannot know).
    Truncate,
    /// Forwarded; the answer's head and half its body are sent back, then nothing more for
    /// the stall time, then the connection is closed.
    Stall,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Pass => f.write_str("pass"),
            Fault::Status {
                status,
                retry_after: Some(s),
                ..
            } => write!(f, "{status}+retry-after-{s}"),
            Fault::Status { status, .. } => write!(f, "{status}"),
            Fault::Reset => f.write_str("reset"),
            Fault::Timeout => f.write_str("timeout"),
            Fault::Truncate => f.write_str("truncate"),
            Fault::Stall => f.write_str("stall"),
        }
    }
}

/// A request's first line and headers.
#[derive(Debug, Clone)]
pub struct Head {
    pub method: String,
    /// As sent: path and query.
    pub target: String,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: u64,
    pub method: String,
    pub target: String,
    pub fault: Fault,
    /// The status sent back (the server's, or the injected one); `None` if none was sent whole.
    pub status: Option<u16>,
    /// Bytes of the request body.
    pub body_len: usize,
    /// When its head was read, and when the proxy was done with it.
    pub start: Instant,
    pub end: Instant,
    /// Requests in flight at the proxy when this one's head was read, itself included.
    pub in_flight: usize,
}

impl Record {
    /// The request's path without its query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// Decides each request's fault from its sequence number and head.
pub type Plan = Box<dyn Fn(u64, &Head) -> Fault + Send + Sync>;

/// splitmix64: a well-mixed 64-bit value from `x`.
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// About `percent` % of the requests get a fault, chosen evenly from: 500 InternalError, 503
/// ServiceUnavailable, reset, timeout, truncated answer, stalled answer. Deterministic in
/// `seed` and the sequence number.
pub fn seeded_mix(seed: u64, percent: u64) -> Plan {
    Box::new(move |seq, _| {
        let r = mix(seed ^ mix(seq));
        if r % 100 >= percent {
            return Fault::Pass;
        }
        match (r >> 32) % 6 {
            0 => Fault::Status {
                status: 500,
                code: "InternalError",
                retry_after: None,
            },
            1 => Fault::Status {
                status: 503,
                code: "ServiceUnavailable",
                retry_after: None,
            },
            2 => Fault::Reset,
            3 => Fault::Timeout,
            4 => Fault::Truncate,
            _ => Fault::Stall,
        }
    })
}

/// Options of a proxy.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long a timeout or a stall holds the connection (longer than the client waits).
    pub stall: Duration,
    /// Added before every forwarded request: a slower server, so that requests overlap.
    pub latency: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            stall: Duration::from_secs(6),
            latency: Duration::ZERO,
        }
    }
}

struct Shared {
    upstream: u16,
    plan: Plan,
    opts: Options,
    seq: AtomicU64,
    in_flight: AtomicUsize,
    records: Mutex<Vec<Record>>,
    log: Mutex<Option<fs::File>>,
    stop: AtomicBool,
}

/// A running proxy; stops accepting when dropped.
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Listen on a free port of 127.0.0.1 and forward to 127.0.0.1:`upstream`, logging to
    /// `log` (one line a request).
    pub fn start(upstream: u16, plan: Plan, opts: Options, log: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("local addr").port();
        let shared = Arc::new(Shared {
            upstream,
            plan,
            opts,
            seq: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            records: Mutex::new(Vec::new()),
            log: Mutex::new(Some(fs::File::create(log).expect("proxy log"))),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || serve(&s, conn));
            }
        });
        Self { port, shared }
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request so far, in the order they arrived.
    pub fn records(&self) -> Vec<Record> {
        let mut r = self
            .shared
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        r.sort_by_key(|r| r.seq);
        r
    }

    /// Requests whose head has been read and that are not done with.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accepting thread so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// A tally of records by fault kind, for messages: `pass=410 500=12 …`.
pub fn tally(records: &[Record]) -> String {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for r in records {
        *counts.entry(r.fault.to_string()).or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn serve(s: &Shared, client: TcpStream) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(60)));
    let mut client = BufReader::new(client);
    let Ok(Some((head, raw_head))) = read_head(&mut client) else {
        return;
    };
    let seq = s.seq.fetch_add(1, Ordering::SeqCst);
    let in_flight = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let start = Instant::now();
    let fault = (s.plan)(seq, &head);
    let mut body_len = 0;
    let status = handle(s, &mut client, &head, &raw_head, fault, &mut body_len);
    s.in_flight.fetch_sub(1, Ordering::SeqCst);
    let rec = Record {
        seq,
        method: head.method.clone(),
        target: head.target.clone(),
        fault,
        status,
        body_len,
        start,
        end: Instant::now(),
        in_flight,
    };
    if let Some(f) = s.log.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        let _ = writeln!(
            f,
            "{seq} {} {} fault={fault} status={} body={body_len} in_flight={in_flight} ms={}",
            rec.method,
            rec.target,
            status.map_or("-".to_owned(), |c| c.to_string()),
            rec.end.duration_since(start).as_millis()
        );
    }
    s.records
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(rec);
}

/// Handle one request; the status sent back whole, if any.
fn handle(
    s: &Shared,
    reader: &mut BufReader<TcpStream>,
    head: &Head,
    raw_head: &[u8],
    fault: Fault,
    body_len: &mut usize,
) -> Option<u16> {
    if fault == Fault::Reset {
        // SO_LINGER 0: close() sends RST.
        let _ = rustix::net::sockopt::set_socket_linger(reader.get_ref(), Some(Duration::ZERO));
        return None;
    }
    let body = {
        if head
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            let _ = reader.get_mut().write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        read_body(reader, head).ok()?
    };
    let client = reader.get_mut();
    *body_len = body.len();
    match fault {
        Fault::Status {
            status,
            code,
            retry_after,
        } => {
            let text = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
                 <Message>injected by the test proxy</Message></Error>"
            );
            let mut resp = format!(
                "HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\n\
                 Content-Length: {}\r\nConnection: close\r\n",
                text.len()
            );
            if let Some(secs) = retry_after {
                resp.push_str(&format!("Retry-After: {secs}\r\n"));
            }
            resp.push_str("\r\n");
            resp.push_str(&text);
            client.write_all(resp.as_bytes()).ok()?;
            let _ = client.shutdown(Shutdown::Write);
            Some(status)
        }
        Fault::Timeout => {
            std::thread::sleep(s.opts.stall);
            None
        }
        Fault::Pass | Fault::Truncate | Fault::Stall => {
            if !s.opts.latency.is_zero() {
                std::thread::sleep(s.opts.latency);
            }
            let answer = forward(s.upstream, raw_head, &body).ok()?;
            let (status, resp_head, resp_body) = split_answer(&answer)?;
            match fault {
                Fault::Pass => {
                    client.write_all(&resp_head).ok()?;
                    client.write_all(resp_body).ok()?;
                    let _ = client.shutdown(Shutdown::Write);
                    Some(status)
                }
                _ => {
                    if resp_body.is_empty() {
                        // Nothing to cut but the head itself.
                        client.write_all(&resp_head[..resp_head.len() / 2]).ok()?;
                    } else {
                        client.write_all(&resp_head).ok()?;
                        client.write_all(&resp_body[..resp_body.len() / 2]).ok()?;
                    }
                    let _ = client.flush();
                    if fault == Fault::Stall {
                        std::thread::sleep(s.opts.stall);
                    }
                    None
                }
            }
        }
        Fault::Reset => unreachable!("handled above"),
    }
}

/// Send the request upstream on a fresh connection (`Connection: close`, no `Expect`) and
/// read the whole answer.
fn forward(upstream: u16, raw_head: &[u8], body: &[u8]) -> io::Result<Vec<u8>> {
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    up.set_read_timeout(Some(Duration::from_secs(60)))?;
    let text = String::from_utf8_lossy(raw_head);
    let mut out = String::new();
    let mut lines = text.split("\r\n");
    out.push_str(lines.next().unwrap_or(""));
    out.push_str("\r\n");
    for l in lines {
        let name = l
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if l.is_empty() || name == "connection" || name == "expect" || name == "keep-alive" {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    up.write_all(out.as_bytes())?;
    up.write_all(body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    Ok(answer)
}

/// An answer's status, its head rewritten to close the connection, and its body.
fn split_answer(answer: &[u8]) -> Option<(u16, Vec<u8>, &[u8])> {
    let end = find(answer, b"\r\n\r\n")?;
    let text = String::from_utf8_lossy(&answer[..end]);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let mut head = String::new();
    for (i, l) in text.split("\r\n").enumerate() {
        let name = l
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if i > 0 && (name == "connection" || name == "keep-alive") {
            continue;
        }
        head.push_str(l);
        head.push_str("\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    Some((status, head.into_bytes(), &answer[end + 4..]))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The request's head (parsed, and as sent up to its blank line); `None` at a clean EOF.
fn read_head(c: &mut impl BufRead) -> io::Result<Option<(Head, Vec<u8>)>> {
    let mut buf = Vec::new();
    while !buf.ends_with(b"\r\n\r\n") {
        let before = buf.len();
        if c.read_until(b'\n', &mut buf)? == 0 {
            return if before == 0 {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        if buf.len() > 64 << 10 {
            return Err(io::Error::other("request head too large"));
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("");
    let mut parts = first.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let target = parts.next().unwrap_or("").to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Some((
        Head {
            method,
            target,
            headers,
        },
        buf,
    )))
}

/// The request's body, as sent (chunked bodies stay chunked).
fn read_body(c: &mut impl BufRead, head: &Head) -> io::Result<Vec<u8>> {
    if let Some(len) = head.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| io::Error::other("bad Content-Length"))?;
        let mut body = vec![0u8; len];
        c.read_exact(&mut body)?;
        return Ok(body);
    }
    if head
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        let mut body = Vec::new();
        loop {
            let line = read_line(c)?;
            body.extend_from_slice(&line);
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&line)
                    .trim()
                    .split(';')
                    .next()
                    .unwrap_or(""),
                16,
            )
            .map_err(|_| io::Error::other("bad chunk size"))?;
            if size == 0 {
                // Trailers, up to the blank line.
                loop {
                    let l = read_line(c)?;
                    body.extend_from_slice(&l);
                    if l == b"\r\n" {
                        return Ok(body);
                    }
                }
            }
            let mut chunk = vec![0u8; size + 2];
            c.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk);
        }
    }
    Ok(Vec::new())
}

fn read_line(c: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    if c.read_until(b'\n', &mut line)? == 0 || !line.ends_with(b"\r\n") {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line)
}
