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
use std::time::{Duration, Instant, SystemTime};

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
    /// When it ended (the line's timestamp), read off the same clock read as its duration.
    pub ended: Instant,
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
    /// The wall clock at one reading of the monotonic clock, re-read once a second: a line's
    /// time is derived from the `Instant` its request ended at, so a line reads no clock.
    static WALL: RefCell<Option<(Instant, Duration)>> = const { RefCell::new(None) };
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

/// The wall-clock time (since the Unix epoch) of monotonic instant `at`.
fn wall_time(at: Instant) -> Duration {
    WALL.with_borrow_mut(|wall| {
        if let Some((base, since_epoch)) = *wall {
            if let Some(after) = at.checked_duration_since(base) {
                if after < Duration::from_secs(1) {
                    return since_epoch + after;
                }
            }
        }
        let (base, since_epoch) = (
            Instant::now(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        *wall = Some((base, since_epoch));
        match at.checked_duration_since(base) {
            Some(after) => since_epoch + after,
            None => since_epoch.saturating_sub(base.duration_since(at)),
        }
    })
}

/// `2026-12-02T01:20:46.564Z`: the wall-clock time of `at`.
fn timestamp(out: &mut Vec<u8>, at: Instant) {
    let now = wall_time(at);
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

/// A field's name as the shape `J` (JSON: true) spells it before its value: `,"name":` or
/// ` name=`. A constant once `J` is known, so writing it is an inlined copy.
macro_rules! name {
    ($j:ident, $n:literal) => {
        if $j {
            concat!(",\"", $n, "\":")
        } else {
            concat!(" ", $n, "=")
        }
    };
}

/// The same, opening a JSON string in the same copy: `,"name":"` or ` name=`.
macro_rules! name_quoted {
    ($j:ident, $n:literal) => {
        if $j {
            concat!(",\"", $n, "\":\"")
        } else {
            concat!(" ", $n, "=")
        }
    };
}

/// A line being written in shape `J`: `,"name":value` (JSON) or ` name=value` (text).
/// Monomorphised per shape, so every name and separator is a constant.
struct Fields<'o, const J: bool> {
    out: &'o mut Vec<u8>,
}

impl<const J: bool> Fields<'_, J> {
    /// A text value: a JSON string; in text, written plainly unless it holds a space, a quote,
    /// a backslash or a byte that is not printable ASCII (then escaped as JSON would).
    #[inline(always)]
    fn text(&mut self, name: &'static str, value: &[u8]) {
        self.out.extend_from_slice(name.as_bytes());
        if J || !plain_text(value) {
            json_string(self.out, value);
        } else {
            self.out.extend_from_slice(value);
        }
    }

    /// A text value known to need no escaping in either shape (ids, templates, codes: printable
    /// ASCII without spaces, quotes or backslashes), after a [`name_quoted!`] name.
    #[inline(always)]
    fn safe(&mut self, name: &'static str, value: &[u8]) {
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(value);
        if J {
            self.out.push(b'"');
        }
    }

    /// A number `write` puts down (`None`: JSON `null`, text `-`).
    #[inline(always)]
    fn number(&mut self, name: &'static str, write: Option<impl FnOnce(&mut Vec<u8>)>) {
        self.out.extend_from_slice(name.as_bytes());
        match write {
            Some(write) => write(self.out),
            None if J => self.out.extend_from_slice(b"null"),
            None => self.out.push(b'-'),
        }
    }

    /// An address, after a [`name_quoted!`] name (an IPv4 one without `fmt`).
    fn address(&mut self, name: &'static str, ip: IpAddr) {
        use std::io::Write;
        self.out.extend_from_slice(name.as_bytes());
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
        if J {
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
    if json {
        line_in::<true>(out, l)
    } else {
        line_in::<false>(out, l)
    }
}

fn line_in<const J: bool>(out: &mut Vec<u8>, l: &Line<'_>) {
    out.reserve(512);
    if J {
        out.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(out, l.ended);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"target\":\"sandgate::access\"");
    } else {
        timestamp(out, l.ended);
        out.extend_from_slice(b"  INFO sandgate::access:");
    }
    let w = l.who;
    let mut f = Fields::<J> { out };
    f.safe(name_quoted!(J, "kind"), l.kind.as_bytes());
    // Request ids are of a safe set (`sane_request_id`), trace ids hex, sandbox ids base32.
    f.safe(name_quoted!(J, "request_id"), w.request_id.as_bytes());
    f.safe(name_quoted!(J, "method"), l.method.as_bytes());
    f.safe(name_quoted!(J, "route"), l.route.as_bytes());
    f.text(name!(J, "host"), or_dash(w.host.as_bytes()));
    f.text(name!(J, "path"), or_dash(w.path.as_bytes()));
    f.number(name!(J, "status"), Some(integer(l.status.into())));
    f.safe(name_quoted!(J, "sandbox"), or_dash(w.sandbox.as_bytes()));
    f.number(name!(J, "port"), Some(integer(w.port.into())));
    let subject = w.subject.as_deref().unwrap_or("").as_bytes();
    f.text(name!(J, "subject"), or_dash(subject));
    f.safe(name_quoted!(J, "flag"), l.flag.as_bytes());
    f.number(
        name!(J, "duration_ms"),
        Some(|o: &mut Vec<u8>| millis(o, l.duration)),
    );
    let connect = l.io.connect.map(|d| move |o: &mut Vec<u8>| millis(o, d));
    f.number(name!(J, "upstream_connect_ms"), connect);
    f.number(name!(J, "bytes_received"), Some(integer(l.io.received)));
    f.number(name!(J, "bytes_sent"), Some(integer(l.io.sent)));
    f.address(name_quoted!(J, "client"), l.client);
    f.safe(name_quoted!(J, "trace_id"), or_dash(w.trace_id.as_bytes()));
    out.extend_from_slice(if J { b"}\n" } else { b"\n" });
}

/// `0x0101…01` times `b`: `b` in every byte of a word.
const fn splat(b: u8) -> u64 {
    u64::from_ne_bytes([b; 8])
}

/// Whether some byte of `x` is below `n` (≤ 128): exact as a whole (the word trick of
/// "Bit Twiddling Hacks"), eight bytes at a time.
#[inline(always)]
fn has_less(x: u64, n: u8) -> bool {
    x.wrapping_sub(splat(n)) & !x & splat(0x80) != 0
}

#[inline(always)]
fn has_byte(x: u64, b: u8) -> bool {
    has_less(x ^ splat(b), 1)
}

/// Whether every byte passes `word` (eight at a time) and the rest pass `byte`.
#[inline(always)]
fn all_bytes(s: &[u8], word: impl Fn(u64) -> bool, byte: impl Fn(u8) -> bool) -> bool {
    let mut words = s.chunks_exact(8);
    for w in &mut words {
        let mut b = [0; 8];
        b.copy_from_slice(w);
        if !word(u64::from_ne_bytes(b)) {
            return false;
        }
    }
    words.remainder().iter().all(|&b| byte(b))
}

/// Printable ASCII other than `"` and `\`: written as is in a text line.
fn plain_text(s: &[u8]) -> bool {
    all_bytes(
        s,
        |x| {
            x & splat(0x80) == 0
                && !has_less(x, 0x21)
                && !has_byte(x, 0x7f)
                && !has_byte(x, b'"')
                && !has_byte(x, b'\\')
        },
        |b| b.is_ascii_graphic() && b != b'"' && b != b'\\',
    )
}

/// Nothing a JSON string must escape (control bytes, `"`, `\`; DEL escaped too).
fn json_plain(s: &[u8]) -> bool {
    all_bytes(
        s,
        |x| !has_less(x, 0x20) && !has_byte(x, 0x7f) && !has_byte(x, b'"') && !has_byte(x, b'\\'),
        |b| b >= 0x20 && b != 0x7f && b != b'"' && b != b'\\',
    )
}

/// A JSON string literal: copied whole when nothing needs escaping, else runs of bytes that
/// need none are copied whole.
fn json_string(out: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    if json_plain(s) {
        out.extend_from_slice(s);
        out.push(b'"');
        return;
    }
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
            ended: Instant::now(),
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
    fn line_times_come_from_the_instant_a_request_ended() {
        let since_epoch = || {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
        };
        let close = |a: Duration, b: Duration| a.abs_diff(b) < Duration::from_millis(50);
        let now = Instant::now();
        assert!(close(wall_time(now), since_epoch()));
        // Earlier than the thread's reading, and more than a second later: both right.
        let earlier = now - Duration::from_secs(5);
        assert!(close(
            wall_time(earlier),
            since_epoch() - Duration::from_secs(5)
        ));
        let later = now + Duration::from_secs(3);
        assert!(close(
            wall_time(later),
            since_epoch() + Duration::from_secs(3)
        ));
        assert!(close(wall_time(Instant::now()), since_epoch()));
    }

    #[test]
    fn word_scans_agree_with_byte_scans() {
        let byte_plain = |s: &[u8]| {
            s.iter()
                .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        };
        let byte_json = |s: &[u8]| {
            s.iter()
                .all(|&b| b >= 0x20 && b != 0x7f && b != b'"' && b != b'\\')
        };
        // Every byte value at every position of words and tails, among plain neighbours.
        for len in [1, 7, 8, 9, 16, 23] {
            for pos in 0..len {
                for b in 0..=255u8 {
                    let mut s = vec![b'a'; len];
                    s[pos] = b;
                    assert_eq!(plain_text(&s), byte_plain(&s), "{s:?}");
                    assert_eq!(json_plain(&s), byte_json(&s), "{s:?}");
                }
            }
        }
        assert!(plain_text(b"") && json_plain(b""));
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
