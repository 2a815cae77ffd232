//! `sandgate-loadgen`: the benchmark harness's load client for what wrk cannot drive.
//!
//! Every subcommand targets one `--addr` (an IPv4 loopback `host:port`; anything else is
//! refused), sends `--host` as the `Host` header, is bounded in time, and prints one JSON
//! object on stdout:
//!
//! - `ws-echo --conns N --seconds S [--warmup S] [--size B]`: N WebSocket connections, each
//!   on its own thread, each sending a binary message and waiting for its echo, in a loop.
//!   Reports round trips per second and round-trip latency percentiles (µs).
//! - `sse-first --count N`: N times in a row: connect, send `GET`, wait for the first
//!   `data:` event. Reports time-to-first-event percentiles (µs), connection setup included.
//! - `upload --bytes N [--count K]`: K `POST`s of N bytes each (`Content-Length`, written
//!   from one reused buffer, so the client never holds the body) and checks the upstream's
//!   `{"bytes": N}` answer. Reports MiB/s.
//! - `ws-idle --conns N [--max-hold S]`: opens N WebSocket connections, echoes one message on
//!   each, prints `{"opened":..}` and holds them until a line (or EOF) arrives on stdin (or
//!   `--max-hold` seconds pass), then echoes once more on each and prints `{"alive":..}`.
//! - `exec-http --path /sandboxes/ID/exec [--body JSON] [--conns C] [--seconds S]`: exec round
//!   trips (each answer awaited) on C kept-alive connections. Reports execs/s and latency.
//! - `exec-ws --path /ws/ID [--command CMD] [--seconds S]`: the same through seed 004's socket.
//! - `exec-first-byte --path /sandboxes/ID/exec [--count N]`: time from sending a streamed exec
//!   to its first `stdout` event, connection setup included.
//! - `spawn [--argv "true"] [--seconds S]`: the floor: this process spawning the command and
//!   waiting for it (`--addr` is still required, and unused).
//!
//! Standard library only: no async runtime, one thread per busy connection.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    let Some(cmd) = argv.next() else {
        eprintln!("usage: sandgate-loadgen ws-echo|sse-first|upload|ws-idle|exec-http|exec-ws|exec-first-byte|spawn --addr HOST:PORT [--host H] [--path P] ...");
        return ExitCode::from(2);
    };
    let mut opts = HashMap::new();
    while let Some(k) = argv.next() {
        let Some(key) = k.strip_prefix("--") else {
            eprintln!("sandgate-loadgen: unexpected argument {k:?}");
            return ExitCode::from(2);
        };
        let Some(v) = argv.next() else {
            eprintln!("sandgate-loadgen: missing value for {k}");
            return ExitCode::from(2);
        };
        opts.insert(key.to_string(), v);
    }
    let result = Opts::new(opts).and_then(|o| match cmd.as_str() {
        "ws-echo" => ws_echo(&o),
        "sse-first" => sse_first(&o),
        "upload" => upload(&o),
        "ws-idle" => ws_idle(&o),
        "exec-http" => exec_http(&o),
        "exec-ws" => exec_ws(&o),
        "exec-first-byte" => exec_first_byte(&o),
        "spawn" => spawn(&o),
        other => Err(format!("unknown subcommand {other:?}")),
    });
    match result {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sandgate-loadgen {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Opts {
    addr: SocketAddr,
    host: String,
    path: String,
    map: HashMap<String, String>,
}

impl Opts {
    fn new(map: HashMap<String, String>) -> Result<Opts, String> {
        let addr: SocketAddr = map
            .get("addr")
            .ok_or("--addr is required")?
            .parse()
            .map_err(|e| format!("--addr: {e}"))?;
        // Load is only ever sent to this machine's loopback interface.
        if !addr.ip().is_loopback() {
            return Err(format!("refusing non-loopback target {addr}"));
        }
        let host = map.get("host").cloned().unwrap_or_else(|| addr.to_string());
        let path = map.get("path").cloned().unwrap_or_else(|| "/".into());
        Ok(Opts {
            addr,
            host,
            path,
            map,
        })
    }

    fn num(&self, key: &str, default: f64) -> Result<f64, String> {
        match self.map.get(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|e| format!("--{key} {v:?}: {e}")),
        }
    }

    fn connect(&self) -> io::Result<TcpStream> {
        let s = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(s)
    }
}

fn err(context: &str) -> impl Fn(io::Error) -> String + '_ {
    move |e| format!("{context}: {e}")
}

/// Latency percentiles in microseconds from samples in nanoseconds.
fn percentiles(samples: &mut [u64]) -> String {
    samples.sort_unstable();
    let pick = |q: f64| -> f64 {
        if samples.is_empty() {
            return 0.0;
        }
        let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i] as f64 / 1000.0
    };
    let mean = if samples.is_empty() {
        0.0
    } else {
        samples.iter().sum::<u64>() as f64 / samples.len() as f64 / 1000.0
    };
    format!(
        "\"samples\":{},\"mean_us\":{:.1},\"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1},\"max_us\":{:.1}",
        samples.len(),
        mean,
        pick(0.50),
        pick(0.90),
        pick(0.99),
        pick(1.0)
    )
}

// ---------------------------------------------------------------------------------------------
// WebSocket client (RFC 6455), just enough for echo: binary frames out (masked), any data frame
// in; pings are answered, a close ends the connection.

struct Ws {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    mask_state: u32,
    frame: Vec<u8>,
}

impl Ws {
    fn connect(o: &Opts) -> io::Result<Ws> {
        let stream = o.connect()?;
        let mut writer = stream.try_clone()?;
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            o.path, o.host
        );
        writer.write_all(req.as_bytes())?;
        let mut reader = BufReader::with_capacity(16 * 1024, stream);
        let (status, _) = read_head(&mut reader)?;
        if status != 101 {
            return Err(io::Error::other(format!(
                "WebSocket handshake answered {status}"
            )));
        }
        Ok(Ws {
            reader,
            writer,
            mask_state: 0x9e37_79b9,
            frame: Vec::with_capacity(1024),
        })
    }

    fn next_mask(&mut self) -> [u8; 4] {
        // xorshift32: masks need not be secret here, only present.
        let mut x = self.mask_state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.mask_state = x;
        x.to_le_bytes()
    }

    fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mask = self.next_mask();
        self.frame.clear();
        self.frame.push(0x80 | opcode);
        let n = payload.len();
        if n < 126 {
            self.frame.push(0x80 | n as u8);
        } else if n <= 0xffff {
            self.frame.push(0x80 | 126);
            self.frame.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            self.frame.push(0x80 | 127);
            self.frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
        self.frame.extend_from_slice(&mask);
        self.frame
            .extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.writer.write_all(&self.frame)
    }

    /// Reads the next data message's payload length (answering pings on the way).
    fn recv(&mut self) -> io::Result<usize> {
        loop {
            let mut h = [0u8; 2];
            self.reader.read_exact(&mut h)?;
            let opcode = h[0] & 0x0f;
            let masked = h[1] & 0x80 != 0;
            let mut len = u64::from(h[1] & 0x7f);
            if len == 126 {
                let mut b = [0u8; 2];
                self.reader.read_exact(&mut b)?;
                len = u64::from(u16::from_be_bytes(b));
            } else if len == 127 {
                let mut b = [0u8; 8];
                self.reader.read_exact(&mut b)?;
                len = u64::from_be_bytes(b);
            }
            let mut mask = [0u8; 4];
            if masked {
                self.reader.read_exact(&mut mask)?;
            }
            let mut payload = vec![0u8; len as usize];
            self.reader.read_exact(&mut payload)?;
            match opcode {
                0x8 => return Err(io::Error::other("server closed the WebSocket")),
                0x9 => self.send(0xA, &payload)?,
                0xA => {}
                _ => return Ok(payload.len()),
            }
        }
    }

    fn echo(&mut self, payload: &[u8]) -> io::Result<()> {
        self.send(0x2, payload)?;
        let n = self.recv()?;
        if n != payload.len() {
            return Err(io::Error::other(format!(
                "echo of {} bytes came back as {n}",
                payload.len()
            )));
        }
        Ok(())
    }
}

/// Reads a response head; returns the status and the lower-cased headers.
fn read_head(r: &mut impl BufRead) -> io::Result<(u16, HashMap<String, String>)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = HashMap::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(io::Error::other(
                "connection closed inside the response head",
            ));
        }
        let l = line.trim_end();
        if l.is_empty() {
            return Ok((status, headers));
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
}

/// Reads a whole response body (Content-Length or chunked).
fn read_body(r: &mut impl BufRead, headers: &HashMap<String, String>) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if let Some(len) = headers.get("content-length") {
        let len: usize = len.parse().map_err(io::Error::other)?;
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        let mut line = String::new();
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|e| io::Error::other(format!("chunk size {line:?}: {e}")))?;
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            line.clear();
            r.read_line(&mut line)?;
            if size == 0 {
                return Ok(body);
            }
        }
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(body)
}

// ---------------------------------------------------------------------------------------------

fn ws_echo(o: &Opts) -> Result<String, String> {
    let conns = o.num("conns", 1.0)? as usize;
    let seconds = o.num("seconds", 5.0)?;
    let warmup = o.num("warmup", 0.5)?;
    let size = o.num("size", 64.0)? as usize;
    let barrier = Arc::new(Barrier::new(conns + 1));
    let mut handles = Vec::new();
    for _ in 0..conns {
        let mut ws = Ws::connect(o).map_err(err("connect"))?;
        let barrier = barrier.clone();
        handles.push(thread::spawn(move || -> io::Result<(Vec<u64>, u64)> {
            let payload = vec![b'w'; size];
            ws.echo(&payload)?;
            barrier.wait();
            let start = Instant::now();
            let measure_from = start + Duration::from_secs_f64(warmup);
            let end = measure_from + Duration::from_secs_f64(seconds);
            let mut samples = Vec::with_capacity(1 << 16);
            let mut total = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                ws.echo(&payload)?;
                total += 1;
                if t0 >= measure_from {
                    samples.push(t0.elapsed().as_nanos() as u64);
                }
            }
            Ok((samples, total))
        }));
    }
    barrier.wait();
    let mut all = Vec::new();
    let (mut errors, mut total) = (0, 0);
    for h in handles {
        match h.join() {
            Ok(Ok((s, t))) => {
                all.extend(s);
                total += t;
            }
            _ => errors += 1,
        }
    }
    if errors == conns {
        return Err("every connection failed".into());
    }
    let rate = all.len() as f64 / seconds;
    Ok(format!(
        "{{\"conns\":{conns},\"errors\":{errors},\"seconds\":{seconds},\"round_trips_per_s\":{rate:.1},\"total_round_trips\":{total},{}}}",
        percentiles(&mut all)
    ))
}

fn sse_first(o: &Opts) -> Result<String, String> {
    let count = o.num("count", 100.0)? as usize;
    let mut samples = Vec::with_capacity(count);
    let deadline = Instant::now() + Duration::from_secs_f64(o.num("max-seconds", 60.0)?);
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
        o.path, o.host
    );
    let mut buf = vec![0u8; 8192];
    for _ in 0..count {
        if Instant::now() >= deadline {
            break;
        }
        let t0 = Instant::now();
        let mut s = o.connect().map_err(err("connect"))?;
        s.write_all(req.as_bytes()).map_err(err("send"))?;
        let mut got = Vec::new();
        loop {
            let n = s.read(&mut buf).map_err(err("read"))?;
            if n == 0 {
                return Err(format!(
                    "connection closed before the first event: {:?}",
                    String::from_utf8_lossy(&got)
                ));
            }
            got.extend_from_slice(&buf[..n]);
            let Some(head_end) = find(&got, b"\r\n\r\n") else {
                continue;
            };
            if !got.starts_with(b"HTTP/1.1 200") {
                return Err(format!(
                    "expected 200, got {:?}",
                    String::from_utf8_lossy(&got[..head_end])
                ));
            }
            let body = &got[head_end + 4..];
            if let Some(d) = find(body, b"data:") {
                if find(&body[d..], b"\n\n").is_some() {
                    break;
                }
            }
        }
        samples.push(t0.elapsed().as_nanos() as u64);
    }
    Ok(format!(
        "{{\"count\":{count},{}}}",
        percentiles(&mut samples)
    ))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn upload(o: &Opts) -> Result<String, String> {
    let bytes = o.num("bytes", 256.0 * 1024.0 * 1024.0)? as u64;
    let count = o.num("count", 1.0)? as usize;
    let chunk = vec![b'u'; 256 * 1024];
    let mut secs = Vec::new();
    for _ in 0..count {
        let t0 = Instant::now();
        let s = o.connect().map_err(err("connect"))?;
        let mut w = s.try_clone().map_err(err("clone"))?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: {bytes}\r\n\r\n",
            o.path, o.host
        );
        w.write_all(head.as_bytes()).map_err(err("send head"))?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            w.write_all(&chunk[..n]).map_err(err("send body"))?;
            left -= n as u64;
        }
        let mut r = BufReader::new(s);
        let (status, headers) = read_head(&mut r).map_err(err("read head"))?;
        let body = read_body(&mut r, &headers).map_err(err("read body"))?;
        let body = String::from_utf8_lossy(&body);
        if status != 200 || !body.contains(&format!("\"bytes\":{bytes}")) {
            return Err(format!("upload answered {status}: {body}"));
        }
        secs.push(t0.elapsed().as_secs_f64());
    }
    let mut sorted = secs.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let mib = bytes as f64 / (1024.0 * 1024.0);
    Ok(format!(
        "{{\"bytes\":{bytes},\"count\":{count},\"median_seconds\":{median:.4},\"mib_per_s\":{:.1}}}",
        mib / median
    ))
}

fn ws_idle(o: &Opts) -> Result<String, String> {
    let conns = o.num("conns", 1000.0)? as usize;
    let max_hold = o.num("max-hold", 120.0)?;
    let t0 = Instant::now();
    let mut all = Vec::with_capacity(conns);
    for i in 0..conns {
        let ws = Ws::connect(o).map_err(|e| format!("connection {i}: {e}"))?;
        all.push(ws);
    }
    let opened_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let mut echoed = 0;
    for ws in &mut all {
        if ws.echo(b"idle-check").is_ok() {
            echoed += 1;
        }
    }
    println!("{{\"opened\":{conns},\"echoed\":{echoed},\"open_ms\":{opened_ms:.1}}}");
    io::stdout().flush().map_err(err("stdout"))?;
    // Hold until told (a line or EOF on stdin) or until the time bound passes.
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = io::stdin().read_line(&mut line);
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs_f64(max_hold));
    let mut alive = 0;
    for ws in &mut all {
        if ws.echo(b"still-there").is_ok() {
            alive += 1;
        }
    }
    Ok(format!(
        "{{\"alive\":{alive},\"held_s\":{:.1}}}",
        t0.elapsed().as_secs_f64()
    ))
}

// ---------------------------------------------------------------------------------------------
// Commands in sandboxes (issue 15's benchmark)
// ---------------------------------------------------------------------------------------------

/// `POST {path}` with `--body` (JSON) on one kept-alive connection per `--conns`, each waiting
/// for its answer before the next, for `--seconds`: latency of a whole exec round trip, and
/// execs per second with several at once.
fn exec_http(o: &Opts) -> Result<String, String> {
    let conns = o.num("conns", 1.0)? as usize;
    let seconds = o.num("seconds", 3.0)?;
    let warmup = o.num("warmup", 0.3)?;
    let body = o.map.get("body").cloned().unwrap_or_else(|| r#"{"command":"true"}"#.into());
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        o.path,
        o.host,
        body.len()
    );
    let barrier = Arc::new(Barrier::new(conns + 1));
    let mut handles = Vec::new();
    for _ in 0..conns {
        let stream = o.connect().map_err(err("connect"))?;
        let mut writer = stream.try_clone().map_err(err("clone"))?;
        let mut reader = BufReader::with_capacity(64 * 1024, stream);
        let (req, barrier) = (req.clone(), barrier.clone());
        handles.push(thread::spawn(move || -> io::Result<(Vec<u64>, u64)> {
            let mut once = |samples: Option<&mut Vec<u64>>| -> io::Result<()> {
                let t0 = Instant::now();
                writer.write_all(req.as_bytes())?;
                let (status, headers) = read_head(&mut reader)?;
                let body = read_body(&mut reader, &headers)?;
                if status != 200 || find(&body, b"\"exit_code\":0").is_none() {
                    return Err(io::Error::other(format!(
                        "exec answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    )));
                }
                if let Some(s) = samples {
                    s.push(t0.elapsed().as_nanos() as u64);
                }
                Ok(())
            };
            once(None)?;
            barrier.wait();
            let start = Instant::now();
            let measure_from = start + Duration::from_secs_f64(warmup);
            let end = measure_from + Duration::from_secs_f64(seconds);
            let mut samples = Vec::new();
            let mut total = 0;
            while Instant::now() < end {
                let measured = Instant::now() >= measure_from;
                once(measured.then_some(&mut samples))?;
                total += 1;
            }
            Ok((samples, total))
        }));
    }
    barrier.wait();
    collect(handles, conns, seconds, "execs_per_s")
}

/// Seed 004's socket: `{"command": --command}` on `--path`, each answer awaited.
fn exec_ws(o: &Opts) -> Result<String, String> {
    let seconds = o.num("seconds", 3.0)?;
    let warmup = o.num("warmup", 0.3)?;
    let command = o.map.get("command").cloned().unwrap_or_else(|| "true".into());
    let msg = format!(r#"{{"command":"{command}"}}"#);
    let mut ws = Ws::connect(o).map_err(err("connect"))?;
    let once = |ws: &mut Ws| -> io::Result<()> {
        ws.send(0x1, msg.as_bytes())?;
        ws.recv()?;
        Ok(())
    };
    once(&mut ws).map_err(err("first command"))?;
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(warmup);
    let end = measure_from + Duration::from_secs_f64(seconds);
    let mut samples = Vec::new();
    while Instant::now() < end {
        let t0 = Instant::now();
        once(&mut ws).map_err(err("command"))?;
        if t0 >= measure_from {
            samples.push(t0.elapsed().as_nanos() as u64);
        }
    }
    let rate = samples.len() as f64 / seconds;
    Ok(format!("{{\"execs_per_s\":{rate:.1},{}}}", percentiles(&mut samples)))
}

/// Time from sending a streamed exec (`Accept: application/x-ndjson`) of `echo x; sleep 0.05`
/// to the arrival of its first `stdout` event, `--count` times.
fn exec_first_byte(o: &Opts) -> Result<String, String> {
    let count = o.num("count", 50.0)? as usize;
    let body = r#"{"command":"echo x; sleep 0.05"}"#;
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nAccept: application/x-ndjson\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        o.path,
        o.host,
        body.len()
    );
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let stream = o.connect().map_err(err("connect"))?;
        let mut writer = stream.try_clone().map_err(err("clone"))?;
        let mut reader = BufReader::new(stream);
        let t0 = Instant::now();
        writer.write_all(req.as_bytes()).map_err(err("send"))?;
        let (status, _) = read_head(&mut reader).map_err(err("head"))?;
        if status != 200 {
            return Err(format!("streamed exec answered {status}"));
        }
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = reader.read(&mut buf).map_err(err("read"))?;
            if n == 0 {
                return Err("the stream ended before any output".into());
            }
            seen.extend_from_slice(&buf[..n]);
            if find(&seen, b"\"type\":\"stdout\"").is_some() {
                samples.push(t0.elapsed().as_nanos() as u64);
                break;
            }
        }
    }
    Ok(format!("{{\"count\":{count},{}}}", percentiles(&mut samples)))
}

/// The floor: this process spawning `--argv` (space-separated) and waiting for it, for
/// `--seconds`.
fn spawn(o: &Opts) -> Result<String, String> {
    let seconds = o.num("seconds", 3.0)?;
    let argv: Vec<String> = o
        .map
        .get("argv")
        .cloned()
        .unwrap_or_else(|| "true".into())
        .split(' ')
        .map(str::to_string)
        .collect();
    let run = || -> Result<u64, String> {
        let t0 = Instant::now();
        let status = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .output()
            .map_err(|e| format!("{}: {e}", argv[0]))?
            .status;
        if !status.success() {
            return Err(format!("{argv:?} failed: {status}"));
        }
        Ok(t0.elapsed().as_nanos() as u64)
    };
    run()?;
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut samples = Vec::new();
    while Instant::now() < end {
        samples.push(run()?);
    }
    let rate = samples.len() as f64 / seconds;
    Ok(format!("{{\"spawns_per_s\":{rate:.1},{}}}", percentiles(&mut samples)))
}

/// Joins per-connection samples into one result.
fn collect(
    handles: Vec<thread::JoinHandle<io::Result<(Vec<u64>, u64)>>>,
    conns: usize,
    seconds: f64,
    rate_name: &str,
) -> Result<String, String> {
    let mut all = Vec::new();
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok((s, _))) => all.extend(s),
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(_) => errors.push("a thread panicked".into()),
        }
    }
    if errors.len() == conns {
        return Err(format!("every connection failed: {}", errors[0]));
    }
    let rate = all.len() as f64 / seconds;
    Ok(format!(
        "{{\"conns\":{conns},\"errors\":{},\"{rate_name}\":{rate:.1},{}}}",
        errors.len(),
        percentiles(&mut all)
    ))
}
