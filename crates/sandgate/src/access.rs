//! The access log: one line per request or upgraded stream when it ends, written by the
//! finish step both lanes share, and the request id every request carries (`x-request-id`:
//! the client's if it is sane, else a new one; forwarded to the sandbox and returned on the
//! response).
//!
//! What a line holds is gathered while the request is planned, into fixed inline buffers
//! ([`Inline`]): no allocation per request, whatever lane serves it. Lines are formatted by
//! hand, in the shape `--log-format json|text` gives every other line (target
//! `sandgate::access`), into per-thread buffers written to standard error at least every
//! 100 ms ([`Writer`]).

use std::cell::RefCell;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The request-id field.
pub const X_REQUEST_ID: &str = "x-request-id";

/// A short string kept inline, cut (at a character boundary, with `…`) when longer than `N`.
#[derive(Clone, Copy)]
pub struct Inline<const N: usize> {
    buf: [u8; N],
    len: u16,
}

impl<const N: usize> Default for Inline<N> {
    fn default() -> Self {
        Inline {
            buf: [0; N],
            len: 0,
        }
    }
}

impl<const N: usize> Inline<N> {
    /// `s`, cut to fit.
    pub fn new(s: &str) -> Self {
        let mut v = Self::default();
        v.set(s);
        v
    }

    pub fn set(&mut self, s: &str) {
        const MARK: &str = "…";
        let take = if s.len() <= N {
            s.len()
        } else {
            let mut end = N - MARK.len();
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            end
        };
        self.buf[..take].copy_from_slice(&s.as_bytes()[..take]);
        let mut len = take;
        if take < s.len() {
            self.buf[take..take + MARK.len()].copy_from_slice(MARK.as_bytes());
            len += MARK.len();
        }
        self.len = len as u16;
    }

    /// `bytes` as text (a placeholder if they are not UTF-8).
    pub fn set_bytes(&mut self, bytes: &[u8]) {
        match std::str::from_utf8(bytes) {
            Ok(s) => self.set(s),
            Err(_) => self.set("(not UTF-8)"),
        }
    }

    pub fn as_str(&self) -> &str {
        // Only whole `&str`s cut at character boundaries are ever copied in.
        std::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("")
    }

    /// The text's bytes, without re-checking that they are UTF-8 (the access log's writer
    /// copies bytes).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<const N: usize> std::fmt::Debug for Inline<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request id: 1-64 characters of `A-Z a-z 0-9 - _ . : / + = @`.
pub type RequestId = Inline<64>;

/// The client's `x-request-id` if it is sane (else a new one is made): a request id ends up
/// in logs and in the sandbox's request, so nothing that could break a log line or a header
/// is kept.
pub fn sane_request_id(value: &[u8]) -> Option<&str> {
    let ok = (1..=64).contains(&value.len())
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(b));
    ok.then(|| std::str::from_utf8(value).ok()).flatten()
}

/// A new request id: 32 lowercase hex digits (128 random bits, the shape of a W3C trace id).
pub fn new_request_id() -> RequestId {
    let n: u128 = rand::random();
    let mut id = RequestId::default();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in 0..32 {
        id.buf[i] = HEX[((n >> (124 - 4 * i)) & 0xf) as usize];
    }
    id.len = 32;
    id
}

/// The request's id: the client's if sane, else a new one.
pub fn request_id(client: Option<&[u8]>) -> RequestId {
    match client.and_then(sane_request_id) {
        Some(s) => RequestId::new(s),
        None => new_request_id(),
    }
}

/// The trace id of a valid W3C `traceparent` (`00-{32 hex}-{16 hex}-{2 hex}`), for the log.
pub fn trace_id(traceparent: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(traceparent).ok()?.trim();
    let mut parts = s.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && hex(flags, 2);
    valid.then_some(trace)
}

/// Who and what a request was, gathered while it is planned.
#[derive(Clone, Default)]
pub struct Who {
    pub request_id: RequestId,
    pub trace_id: Inline<32>,
    pub host: Inline<128>,
    /// The path, without the query.
    pub path: Inline<256>,
    pub sandbox: Inline<40>,
    pub port: u16,
    /// The key id or token subject the request acted as.
    pub subject: Option<std::sync::Arc<str>>,
}

/// One line of the access log.
pub struct Line<'a> {
    pub who: &'a Who,
    pub method: &'a str,
    pub route: &'a str,
    pub client: IpAddr,
    /// 0: no response was sent.
    pub status: u16,
    pub duration: Duration,
    /// Envoy-style: `UF` connect failure, `UT` timeout, … (`-`: none).
    pub flag: &'static str,
    /// `request` or `stream` (an upgraded connection, logged when it ends).
    pub kind: &'static str,
    pub io: Io,
}

/// What moved between the gateway and the sandbox for one request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Io {
    /// Time to open a new connection to the sandbox (`None`: a kept one was used, or none).
    pub connect: Option<Duration>,
    /// Response body bytes sent to the client (a stream's: none counted).
    pub sent: u64,
    /// Request body bytes read from the client, as the body decodes (chunk framing not
    /// counted).
    pub received: u64,
}

/// The access log's writer: each thread formats its lines by hand into a buffer of its own,
/// and a flusher thread writes every buffer to standard error every [`FLUSH_EVERY`] (or a
/// thread does when its buffer passes [`FLUSH_AT`]): nginx's `access_log … buffer= flush=`.
/// Through `tracing`'s formatter and one write per line, a line cost a third of a keep-alive
/// request's CPU (docs/observability.md); this way it costs a few percent.
struct Writer {
    json: bool,
    buffers: Mutex<Vec<Arc<Mutex<Vec<u8>>>>>,
}

/// How often buffered lines are written at the latest.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A thread's buffer is written at once past this size.
const FLUSH_AT: usize = 32 * 1024;

static WRITER: OnceLock<Writer> = OnceLock::new();

thread_local! {
    static MINE: RefCell<Option<Arc<Mutex<Vec<u8>>>>> = const { RefCell::new(None) };
    /// The formatted current second (`2026-12-02T01:20:46`), remade once a second.
    static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
}

/// Starts the access log on standard error, as JSON objects or text lines. Until this is
/// called (a library user, the tests' in-process gateways) lines are not written.
pub fn init(json: bool) {
    let mut started = false;
    WRITER.get_or_init(|| {
        started = true;
        Writer {
            json,
            buffers: Mutex::new(Vec::new()),
        }
    });
    if started {
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(|| loop {
                std::thread::sleep(FLUSH_EVERY);
                flush();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "the access log's flusher did not start: lines are written when a buffer fills and at exit");
        }
    }
}

/// Writes every buffered line now (the flusher's tick, and shutdown).
pub fn flush() {
    let Some(w) = WRITER.get() else {
        return;
    };
    let buffers: Vec<_> = w.buffers.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for b in buffers {
        let lines = take_lines(&mut b.lock().unwrap_or_else(|e| e.into_inner()));
        write_out(&lines);
    }
}

/// The lines buffered so far, leaving an empty buffer in their place: they are written
/// after the buffer's lock is let go, so a slow standard error never holds up a thread that
/// logs.
fn take_lines(buf: &mut Vec<u8>) -> Vec<u8> {
    if buf.is_empty() {
        return Vec::new();
    }
    std::mem::replace(buf, Vec::with_capacity(FLUSH_AT * 2))
}

fn write_out(lines: &[u8]) {
    if lines.is_empty() {
        return;
    }
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(lines);
}

/// Writes one access-log line (if the log was started).
pub fn log(l: &Line<'_>) {
    let Some(w) = WRITER.get() else {
        return;
    };
    MINE.with_borrow_mut(|mine| {
        let b = mine.get_or_insert_with(|| {
            let b = Arc::new(Mutex::new(Vec::with_capacity(FLUSH_AT * 2)));
            w.buffers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(b.clone());
            b
        });
        let full = {
            let mut buf = b.lock().unwrap_or_else(|e| e.into_inner());
            line(&mut buf, l, w.json);
            if buf.len() >= FLUSH_AT {
                take_lines(&mut buf)
            } else {
                Vec::new()
            }
        };
        write_out(&full);
    });
}

/// `2026-12-02T01:20:46.564Z`.
fn timestamp(out: &mut Vec<u8>) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != secs {
            let t = chrono::DateTime::from_timestamp(secs as i64, 0).unwrap_or_default();
            let formatted = t.format("%Y-%m-%dT%H:%M:%S").to_string();
            if formatted.len() == 19 {
                text.copy_from_slice(formatted.as_bytes());
            }
            *cached = secs;
        }
        out.extend_from_slice(&text[..]);
    });
    let ms = now.subsec_millis();
    out.extend_from_slice(&[
        b'.',
        b'0' + (ms / 100) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
        b'Z',
    ]);
}

/// Milliseconds with three decimals (microseconds), without `fmt`.
fn millis(out: &mut Vec<u8>, d: Duration) {
    // In u64: u128 division is a library call.
    let us = d.as_micros() as u64;
    out.extend_from_slice(itoa::Buffer::new().format(us / 1000).as_bytes());
    let frac = (us % 1000) as u16;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

/// A field's name as each shape spells it before its value: `,"name":` (JSON) and ` name=`
/// (text), made at compile time so that writing one is a single copy.
macro_rules! name {
    ($n:literal) => {
        &[concat!(",\"", $n, "\":"), concat!(" ", $n, "=")]
    };
}

type Name = &'static [&'static str; 2];

/// A line being written in one of the two shapes: `,"name":value` (JSON) or ` name=value`
/// (text).
struct Fields<'o> {
    out: &'o mut Vec<u8>,
    json: bool,
}

impl Fields<'_> {
    fn name(&mut self, name: Name) {
        let n = name[usize::from(!self.json)];
        self.out.extend_from_slice(n.as_bytes());
    }

    /// A text value: a JSON string; in text, written plainly unless it holds a space, a quote,
    /// a backslash or a byte that is not printable ASCII (then escaped as JSON would).
    fn text(&mut self, name: Name, value: &[u8]) {
        self.name(name);
        let plain = || {
            value
                .iter()
                .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        };
        if self.json || !plain() {
            json_string(self.out, value);
        } else {
            self.out.extend_from_slice(value);
        }
    }

    /// A text value known to need no escaping in either shape (ids, templates, codes: printable
    /// ASCII without spaces, quotes or backslashes).
    fn safe(&mut self, name: Name, value: &[u8]) {
        self.name(name);
        if self.json {
            self.out.push(b'"');
            self.out.extend_from_slice(value);
            self.out.push(b'"');
        } else {
            self.out.extend_from_slice(value);
        }
    }

    /// A number `write` puts down (`None`: JSON `null`, text `-`).
    fn number(&mut self, name: Name, write: Option<impl FnOnce(&mut Vec<u8>)>) {
        self.name(name);
        match write {
            Some(write) => write(self.out),
            None if self.json => self.out.extend_from_slice(b"null"),
            None => self.out.push(b'-'),
        }
    }

    /// An address: a JSON string, plain text (an IPv4 one without `fmt`).
    fn address(&mut self, name: Name, ip: IpAddr) {
        use std::io::Write;
        self.name(name);
        if self.json {
            self.out.push(b'"');
        }
        match ip {
            IpAddr::V4(v4) => {
                let [a, b, c, d] = v4.octets();
                let mut n = itoa::Buffer::new();
                self.out.extend_from_slice(n.format(a).as_bytes());
                for o in [b, c, d] {
                    self.out.push(b'.');
                    self.out.extend_from_slice(n.format(o).as_bytes());
                }
            }
            IpAddr::V6(_) => {
                let _ = write!(self.out, "{ip}");
            }
        }
        if self.json {
            self.out.push(b'"');
        }
    }
}

fn integer(n: u64) -> impl FnOnce(&mut Vec<u8>) {
    move |out: &mut Vec<u8>| out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes())
}

/// One line, JSON (`{"timestamp":…,"level":"INFO","target":"sandgate::access",…}`) or text
/// (`2026-… INFO sandgate::access: kind=request …`, as `tracing` writes other lines), and a
/// newline.
fn line(out: &mut Vec<u8>, l: &Line<'_>, json: bool) {
    out.reserve(512);
    if json {
        out.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(out);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"target\":\"sandgate::access\"");
    } else {
        timestamp(out);
        out.extend_from_slice(b"  INFO sandgate::access:");
    }
    let w = l.who;
    let mut f = Fields { out, json };
    f.safe(name!("kind"), l.kind.as_bytes());
    // Request ids are of a safe set (`sane_request_id`), trace ids hex, sandbox ids base32.
    f.safe(name!("request_id"), w.request_id.as_bytes());
    f.safe(name!("method"), l.method.as_bytes());
    f.safe(name!("route"), l.route.as_bytes());
    f.text(name!("host"), or_dash(w.host.as_bytes()));
    f.text(name!("path"), or_dash(w.path.as_bytes()));
    f.number(name!("status"), Some(integer(l.status.into())));
    f.safe(name!("sandbox"), or_dash(w.sandbox.as_bytes()));
    f.number(name!("port"), Some(integer(w.port.into())));
    let subject = w.subject.as_deref().unwrap_or("").as_bytes();
    f.text(name!("subject"), or_dash(subject));
    f.safe(name!("flag"), l.flag.as_bytes());
    f.number(
        name!("duration_ms"),
        Some(|o: &mut Vec<u8>| millis(o, l.duration)),
    );
    let connect = l.io.connect.map(|d| move |o: &mut Vec<u8>| millis(o, d));
    f.number(name!("upstream_connect_ms"), connect);
    f.number(name!("bytes_received"), Some(integer(l.io.received)));
    f.number(name!("bytes_sent"), Some(integer(l.io.sent)));
    f.address(name!("client"), l.client);
    f.safe(name!("trace_id"), or_dash(w.trace_id.as_bytes()));
    out.extend_from_slice(if json { b"}\n" } else { b"\n" });
}

/// A JSON string literal: runs of bytes that need no escape are copied whole.
fn json_string(out: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let mut run = 0;
    for (i, &b) in s.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0..=0x1f | 0x7f => b"\\u00",
            _ => continue,
        };
        out.extend_from_slice(&s[run..i]);
        out.extend_from_slice(escape);
        if escape.len() == 4 {
            out.extend_from_slice(&[HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]]);
        }
        run = i + 1;
    }
    out.extend_from_slice(&s[run..]);
    out.push(b'"');
}

fn or_dash(s: &[u8]) -> &[u8] {
    if s.is_empty() {
        b"-"
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_at_a_character_boundary_with_a_mark() {
        let v: Inline<8> = Inline::new("ab€€€€");
        assert_eq!(v.as_str(), "ab€…");
        let v: Inline<8> = Inline::new("abcdefgh");
        assert_eq!(v.as_str(), "abcdefgh");
    }

    #[test]
    fn a_sane_client_request_id_is_kept_and_anything_else_replaced() {
        assert_eq!(
            request_id(Some(b"abc-123_x.y:z/+=@")).as_str(),
            "abc-123_x.y:z/+=@"
        );
        for bad in [
            &b""[..],
            b"a b",
            b"a\"b",
            b"a\nb",
            &[b'a'; 65][..],
            "é".as_bytes(),
        ] {
            let id = request_id(Some(bad));
            assert_eq!(id.as_str().len(), 32, "{bad:?}");
            assert!(id.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_ne!(new_request_id().as_str(), new_request_id().as_str());
    }

    #[test]
    fn lines_are_valid_json_and_plain_text() {
        let mut who = Who {
            request_id: RequestId::new("r-1"),
            path: Inline::new("/a\"b\\c\u{1}"),
            port: 3000,
            ..Who::default()
        };
        who.sandbox.set("sb-x");
        let line = Line {
            who: &who,
            method: "GET",
            route: "/sandbox/{id}/*",
            client: "::1".parse().unwrap(),
            status: 200,
            duration: Duration::from_micros(12_345),
            flag: "-",
            kind: "request",
            io: Io {
                connect: Some(Duration::from_micros(250)),
                sent: 1024,
                received: 77,
            },
        };
        let mut out = Vec::new();
        super::line(&mut out, &line, true);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["path"], "/a\"b\\c\u{1}");
        assert_eq!(v["status"], 200);
        assert_eq!(v["port"], 3000);
        assert_eq!(v["duration_ms"], 12.345);
        assert_eq!(v["client"], "::1");
        assert_eq!(v["upstream_connect_ms"], 0.25);
        assert_eq!(v["bytes_sent"], 1024);
        assert_eq!(v["bytes_received"], 77);
        assert_eq!(v["host"], "-");
        assert_eq!(v["target"], "sandgate::access");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
        out.clear();
        super::line(&mut out, &line, false);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with('\n'));
        assert!(
            text.contains(" INFO sandgate::access: kind=request request_id=r-1 "),
            "{text}"
        );
        assert!(text.contains(" path=\"/a\\\"b\\\\c\\u0001\" "), "{text}");
        assert!(
            text.contains(" status=200 ") && text.contains(" duration_ms=12.345 "),
            "{text}"
        );
    }

    #[test]
    fn trace_ids_come_from_valid_traceparents_only() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(
            trace_id(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id(b"00-4bf92f35-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id(b"garbage"), None);
    }
}
