//! Differential harness for tests and the fuzzer (`crates/sandgate/fuzz`), never called by the
//! proxy: gives the same bytes to the fast lane's framing (`frame::request_framing`, the
//! lane's own code) and to hyper 1.x's HTTP/1.1 server in-process, and reports any
//! disagreement on where a request or its body ends or whether it is valid.
//! Design and findings: `docs/fuzzing.md`.

use std::cell::RefCell;
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::frame::{request_framing, stricter_by_design, Verdict};
use super::RequestBody;

/// Requests compared per input at most (a long pipeline proves nothing more).
const MAX_REQUESTS: usize = 32;

/// One response hyper wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// For a request hyper served: `METHOD target length-of-decoded-body` (a field, since a
    /// response to `HEAD` has no body).
    pub got: String,
}

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// Runs `fut` on this thread's runtime (made once: a fuzzer calls this millions of times).
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    RUNTIME.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a runtime")
        });
        rt.block_on(fut)
    })
}

/// Hyper's server reading `input` as a client's whole stream (then the client's end of
/// stream): its answers, in order. Its service reads each request body to the end and answers
/// with what it got (`x-got`), or `400`. Hyper is configured as the general path's
/// (`server::Gateway`: defaults) except for half-close, so that it answers every request
/// it has read before it notices the end of the stream.
pub fn hyper_answers(input: &[u8]) -> Vec<Answer> {
    block_on(answers(input))
}

async fn answers(input: &[u8]) -> Vec<Answer> {
    let (mut client, server) = tokio::io::duplex(input.len() + 64 * 1024);
    let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
        let what = format!("{} {}", req.method(), req.uri());
        let mut resp = Response::new(Full::new(Bytes::new()));
        match req.into_body().collect().await {
            Ok(body) => {
                let got = format!("{what} {}", body.to_bytes().len());
                if let Ok(v) = http::HeaderValue::from_str(&got) {
                    resp.headers_mut().insert("x-got", v);
                }
            }
            Err(_) => *resp.status_mut() = StatusCode::BAD_REQUEST,
        }
        Ok::<_, Infallible>(resp)
    });
    let serve = async {
        let _ = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            // As the gateway's hyper lane (`gateway.rs`).
            .max_buf_size(crate::gateway::MAX_HEAD)
            .serve_connection(TokioIo::new(server), service)
            .await;
    };
    let talk = async {
        let mut out = Vec::new();
        if client.write_all(input).await.is_ok() {
            let _ = client.shutdown().await;
        }
        let _ = client.read_to_end(&mut out).await;
        out
    };
    let run = async { tokio::join!(serve, talk).1 };
    let out = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("hyper answered within 10 s");
    parse_answers(&out)
}

/// The responses in `out` (hyper's: `content-length` always).
fn parse_answers(mut out: &[u8]) -> Vec<Answer> {
    let mut answers = Vec::new();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(n)) = resp.parse(out) else {
            return answers;
        };
        let len = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
            .unwrap_or(0);
        let got = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("x-got"))
            .map_or(String::new(), |h| {
                String::from_utf8_lossy(h.value).into_owned()
            });
        answers.push(Answer {
            status: resp.code.unwrap_or(0),
            got,
        });
        out = &out[(n + len).min(out.len())..];
    }
}

/// Compares the fast lane's and hyper's readings of `input` as a client's stream: every
/// request the fast lane forwards, hyper must serve with the same method, target and body
/// length, and no other request in between; what the fast lane refuses, hyper must refuse
/// (unless `stricter_by_design`); what it still waits for, hyper must not serve. Once the fast
/// lane hands the rest to hyper, hyper must read that rest as it does alone (so the lane ended
/// the previous request where hyper did). Also checks that the lane finds the same verdict
/// whatever the reads the bytes arrive in (`check_splits`), and, for a chunked body, that
/// hyper's client reads it as a response body as the lane does (`check_response`).
pub fn check_request(input: &[u8]) -> Result<(), String> {
    let answers = hyper_answers(input);
    let mut pos = 0;
    for i in 0..MAX_REQUESTS {
        let rest = &input[pos..];
        let lane = request_framing(rest);
        check_splits(rest, lane)?;
        if i == 0 {
            // The same chunked body, as a sandbox's response to hyper's client.
            if let Some((head_len, crate::policy::Framing::Chunked)) = body_start(rest) {
                check_response(&rest[head_len..])?;
            }
        }
        let answer = answers.get(i);
        let served = answer.is_some_and(|a| a.status == 200);
        let fail = |what: String| {
            Err(format!(
                "request {i} at byte {pos}: fast lane {lane:?}, hyper {answer:?}: {what}"
            ))
        };
        match lane {
            Verdict::Handoff => {
                // Hyper judges the rest; it must read it as if it started there.
                if i > 0 && answers[i.min(answers.len())..] != hyper_answers(rest)[..] {
                    return fail(
                        "hyper read the rest otherwise: the previous request ended elsewhere"
                            .into(),
                    );
                }
                return Ok(());
            }
            Verdict::Refuse(why) if served && !stricter_by_design(why) => {
                return fail("hyper served what the fast lane refuses".into())
            }
            Verdict::Refuse(_) => return Ok(()),
            Verdict::Partial if served => {
                return fail("hyper served what the fast lane waits for".into())
            }
            Verdict::Partial if pos == input.len() && answers.len() > i => {
                return fail("hyper served a request the fast lane never saw".into())
            }
            Verdict::Partial => return Ok(()),
            Verdict::Complete {
                head_len,
                body_end,
                body_len,
                keep_alive,
            } => {
                let mut headers = [httparse::EMPTY_HEADER; 0];
                let mut req = httparse::Request::new(&mut headers);
                let _ = req.parse(&rest[..head_len]);
                let want = format!(
                    "{} {} {body_len}",
                    req.method.unwrap_or(""),
                    req.path.unwrap_or("")
                );
                if !served || answer.map(|a| &a.got) != Some(&want) {
                    return fail(format!("the fast lane forwards `{want}`"));
                }
                pos += body_end;
                if !keep_alive {
                    return Ok(()); // both close here (hyper may read on; the lane does not)
                }
            }
        }
    }
    Ok(())
}

/// Hyper's client reading a `200` response with `Transfer-Encoding: chunked` and `body` after
/// its head (then the end of the stream): the decoded body's length, or `None` if hyper
/// refused it or found it incomplete.
pub fn hyper_reads_chunked_response(body: &[u8]) -> Option<u64> {
    block_on(async {
        let (client, mut server) = tokio::io::duplex(body.len() + 64 * 1024);
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Empty<Bytes>,
        >(TokioIo::new(client))
        .await
        .ok()?;
        let talk = async {
            let req = Request::get("/").body(http_body_util::Empty::new()).ok()?;
            let resp = sender.send_request(req).await.ok()?;
            let len = resp.into_body().collect().await.ok()?.to_bytes().len();
            drop(sender);
            Some(len as u64)
        };
        let serve = async {
            // Answer once asked: hyper's client refuses bytes that come before its request.
            let mut req = Vec::new();
            let mut byte = [0u8; 1];
            while !req.ends_with(b"\r\n\r\n") {
                match server.read(&mut byte).await {
                    Ok(1) => req.push(byte[0]),
                    _ => return,
                }
            }
            let mut raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            raw.extend_from_slice(body);
            if server.write_all(&raw).await.is_ok() {
                let _ = server.shutdown().await;
            }
            let _ = server.read_to_end(&mut Vec::new()).await;
        };
        let run = async {
            let (_, got, _) = tokio::join!(conn, talk, serve);
            got
        };
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("hyper read the response within 10 s")
    })
}

/// Compares the fast lane's reading of `body` as a chunked response body (the `Scanner`, as
/// `forward_response_body` runs it) with hyper's client's: both must refuse it, or both find
/// it incomplete, or both read it whole with the same length of content.
pub fn check_response(body: &[u8]) -> Result<(), String> {
    let mut scanner = super::chunked::Scanner::default();
    let scanned = scanner.scan(body);
    let lane = match scanned {
        Ok(_) if scanner.done() => Some(scanner.data_len()),
        _ => None,
    };
    let hyper = hyper_reads_chunked_response(body);
    if lane != hyper {
        return Err(format!(
            "chunked response body: fast lane {scanned:?} ({lane:?} bytes), hyper {hyper:?} bytes"
        ));
    }
    Ok(())
}

/// Feeds the body after the head to `RequestBody::take` in pieces, as the lane's reads
/// deliver it (bytes it has not used are offered again with more), and checks it reaches the
/// verdict `request_framing` reached on the bytes at once.
fn check_splits(buf: &[u8], whole: Verdict) -> Result<(), String> {
    let (head_len, framing) = match whole {
        Verdict::Complete { head_len, .. } => (head_len, head_framing(buf, head_len)),
        Verdict::Refuse(_) | Verdict::Partial => match body_start(buf) {
            Some(h) => h,
            None => return Ok(()),
        },
        Verdict::Handoff => return Ok(()),
    };
    for step in [1, 2, 3, 7, 64] {
        let mut body = RequestBody::new(framing);
        let (mut start, mut end) = (head_len, head_len);
        let verdict = loop {
            if body.received {
                break Verdict::Complete {
                    head_len,
                    body_end: start,
                    body_len: 0,
                    keep_alive: false,
                };
            }
            if let Some(m) = body.malformed {
                break Verdict::Refuse(m.0);
            }
            if end == buf.len() {
                break Verdict::Partial;
            }
            end = (end + step).min(buf.len());
            let n = body.take(&buf[start..end]);
            start += n + std::mem::take(&mut body.swallow);
        };
        let same = match (whole, verdict) {
            (Verdict::Complete { body_end: a, .. }, Verdict::Complete { body_end: b, .. }) => {
                a == b
            }
            (a, b) => a == b,
        };
        if !same {
            return Err(format!(
                "read {step} bytes at a time, the body's verdict is {verdict:?}, not {whole:?}"
            ));
        }
    }
    Ok(())
}

/// Where the body starts and how it is framed, for a head the lane reads as one to forward.
fn body_start(buf: &[u8]) -> Option<(usize, crate::policy::Framing)> {
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; super::head::MAX_HEADERS];
    let head = super::frame::parse_head(buf, &mut headers).ok()?;
    Some((head.head_len, head.facts.framing))
}

fn head_framing(buf: &[u8], head_len: usize) -> crate::policy::Framing {
    body_start(&buf[..head_len]).map_or(crate::policy::Framing::Empty, |(_, f)| f)
}

/// Known desync shapes, one per line with `\r`, `\n`, `\t`, `\\` and `\xHH` escapes:
/// `crates/sandgate/tests/corpus/desync.txt`. Blank lines and lines starting with `#` are
/// skipped.
pub fn parse_corpus(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(unescape)
        .collect()
}

fn unescape(line: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            let (byte, used) = match b[i + 1] {
                b'r' => (b'\r', 2),
                b'n' => (b'\n', 2),
                b't' => (b'\t', 2),
                b'0' => (0, 2),
                b'x' if i + 4 <= b.len() => {
                    let hex = std::str::from_utf8(&b[i + 2..i + 4]).unwrap_or("");
                    (u8::from_str_radix(hex, 16).unwrap_or(b'?'), 4)
                }
                other => (other, 2),
            };
            out.push(byte);
            i += used;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// A random mutation of `input` (deterministic for a seeded `rng`): one to three insertions,
/// deletions, byte changes, overwrites or truncations, with pieces that matter to framing.
pub fn mutate(input: &[u8], rng: &mut impl rand::Rng) -> Vec<u8> {
    const PIECES: &[&[u8]] = &[
        b"\r",
        b"\n",
        b"\r\n",
        b"\r\n\r\n",
        b";",
        b" ",
        b"\t",
        b"0",
        b"1",
        b"f",
        b"ff",
        b"0\r\n\r\n",
        b":",
        b"x-api-key: k\r\n",
        b"0\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Content-Length: 1\r\n",
        b"\x00",
        b"\x7f",
        b"\xff",
        b"a=b",
        b"\"",
        b"GET / HTTP/1.1\r\n\r\n",
    ];
    let mut out = input.to_vec();
    for _ in 0..rng.gen_range(1..4) {
        let at = rng.gen_range(0..=out.len());
        match rng.gen_range(0..5) {
            0 => {
                let p = PIECES[rng.gen_range(0..PIECES.len())];
                out.splice(at..at, p.iter().copied());
            }
            1 if at < out.len() => {
                out.remove(at);
            }
            2 if at < out.len() => out[at] = rng.gen(),
            3 if at < out.len() => {
                let p = PIECES[rng.gen_range(0..PIECES.len())];
                let end = (at + p.len()).min(out.len());
                out.splice(at..end, p.iter().copied());
            }
            _ => {
                let end = rng.gen_range(at..=out.len());
                out.truncate(end.max(at));
            }
        }
    }
    out
}

/// The checked-in corpus of known desync shapes (`tests/corpus/desync.txt`, one escaped byte
/// string a line; `parse_corpus` reads it).
pub const CORPUS: &str = include_str!("../../tests/corpus/desync.txt");

fn chunked(body: &[u8]) -> Vec<u8> {
    let mut r = b"POST /te HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    r.extend_from_slice(body);
    r.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
    r
}

/// Shapes too long for a corpus line: extensions and trailers at and over hyper's limits,
/// many trailer fields, long runs of leading zeros.
pub fn large_inputs() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for ext in [16 * 1024 - 2, 16 * 1024 - 1, 16 * 1024, 20_000] {
        let mut body = b"1;".to_vec();
        body.extend(std::iter::repeat_n(b'e', ext - 1));
        body.extend(b"\r\nx\r\n0\r\n\r\n");
        out.push(chunked(&body));
    }
    let mut spread = Vec::new();
    for _ in 0..3 {
        spread.extend(b"1;");
        spread.extend([b'e'; 6000]);
        spread.extend(b"\r\nx\r\n");
    }
    spread.extend(b"0\r\n\r\n");
    out.push(chunked(&spread));
    for len in [16 * 1024 - 12, 16 * 1024 - 11, 16 * 1024 - 10, 16 * 1024] {
        let mut body = b"0\r\nx: ".to_vec();
        body.extend(std::iter::repeat_n(b'a', len - 7));
        body.extend(b"\r\n\r\n");
        out.push(chunked(&body));
    }
    for fields in [99, 100, 101] {
        let mut body = b"0\r\n".to_vec();
        for i in 0..fields {
            body.extend(format!("t{i}: 1\r\n").as_bytes());
        }
        body.extend(b"\r\n");
        out.push(chunked(&body));
    }
    for zeros in [100, 20_000] {
        let mut body = vec![b'0'; zeros];
        body.extend(b"1\r\nx\r\n0\r\n\r\n");
        out.push(chunked(&body));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_answers_each_request_it_reads() {
        let two =
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /n HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi";
        let got: Vec<String> = hyper_answers(two).into_iter().map(|a| a.got).collect();
        assert_eq!(got, ["GET / 0", "POST /n 2"]);
        let head = b"HEAD / HTTP/1.1\r\n\r\nGET /n HTTP/1.1\r\n\r\n";
        assert!(check_request(head).is_ok());
        let bad = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;a\nb\r\nx\r\n0\r\n\r\n";
        assert_eq!(hyper_answers(bad)[0].status, 400);
        assert_eq!(
            hyper_answers(b"GET / HTTP/1.1\r\nX : 1\r\n\r\n")[0].status,
            400
        );
        assert!(check_request(two).is_ok());
    }

    #[test]
    fn corpus_escapes() {
        assert_eq!(
            parse_corpus("# c\n\na\\r\\n\\x41\\\\\n"),
            vec![b"a\r\nA\\".to_vec()]
        );
    }
}
