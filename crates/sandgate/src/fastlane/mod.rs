//! The HTTP/1.1 fast lane: proxies plain HTTP/1.1 requests to running sandboxes straight from
//! socket buffers (heads parsed by `httparse`, bodies forwarded as they came), over pooled
//! upstream connections driven in the client connection's own task. Anything else (the control API, h2c, HTTP/1.0,
//! upgrades, `Expect`, unusual framing, a sandbox to wake or an error to explain) is handed,
//! with the bytes already read, to hyper's general path (`crate::hyperlane`).
//! Why this exists and what it must keep equal to the general path: `docs/fastlane.md`.

pub mod chunked;
pub mod client;
#[doc(hidden)]
pub mod differential;
pub mod frame;
pub mod head;
pub mod linger;
pub mod prefixed;
pub mod watch;

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::admission::{Ending, ScopedAdmission, Started};
use crate::auth::Principal;
use crate::backend::Upstream;
use crate::error::Error;
use crate::gateway::{Gateway, MAX_HEAD};
use crate::policy::{Decision, Framing, Head};
use crate::proxy::pool::PoolKey;
use crate::proxy::{headers, upstream_error, Target};
use chunked::{Malformed, Scanner, LAST_CHUNK};
use client::Client;
use head::{RequestFacts, RequestRewrite, ResponseRewrite, MAX_HEADERS};
use prefixed::Prefixed;

/// Bytes read from the client at a time; a request head must fit in `MAX_HEAD`.
const CLIENT_BUF: usize = 8 * 1024;
/// Bytes read from the sandbox at a time, at first.
const UPSTREAM_BUF: usize = 32 * 1024;
/// Reads that keep filling the buffer double it up to this (large bodies, fewer system calls);
/// a buffer grown past its start is dropped after the exchange.
const BODY_BUF: usize = 256 * 1024;

/// Serves one client connection: the fast lane while requests suit it, then hyper.
pub async fn serve(
    gw: Arc<Gateway>,
    client: Client,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let mut lane = Lane::new(client, peer);
    let handoff = lane.run(&gw, &shutdown).await;
    let Some(prefix) = handoff else {
        return;
    };
    gw.serve_hyper(Prefixed::new(prefix, lane.client), peer, shutdown)
        .await;
}

/// A read buffer: bytes read and not yet used. Reads go into spare capacity (never zeroed);
/// used bytes are dropped from the front without copying.
struct Buf {
    data: BytesMut,
    cap: usize,
    /// How much free space a body read asks for (see `poll_fill_body`).
    want: usize,
}

impl Buf {
    fn new(cap: usize) -> Buf {
        Buf {
            data: BytesMut::with_capacity(cap),
            cap,
            want: cap,
        }
    }

    /// Like `poll_fill` for body bytes: reads that fill the free space double it, up to
    /// `BODY_BUF`.
    fn poll_fill_body<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
    ) -> Poll<io::Result<usize>> {
        if self.data.capacity() - self.data.len() < self.want / 2 {
            self.data.reserve(self.want);
        }
        let room = self.data.capacity() - self.data.len();
        let read = tokio_util::io::poll_read_buf(Pin::new(r), cx, &mut self.data);
        if let Poll::Ready(Ok(n)) = read {
            if n == room && self.want < BODY_BUF {
                self.want *= 2;
            }
        }
        read
    }

    /// Whether the buffer grew for a large body and should be let go.
    fn grown(&self) -> bool {
        self.want > self.cap
    }

    /// Reads once into free space, growing up to `max` bytes held. `Ok(0)` means end of
    /// stream, or `max` bytes held already.
    fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        if self.data.len() >= max {
            return Poll::Ready(Ok(0));
        }
        if self.data.capacity() == self.data.len() {
            self.data
                .reserve(self.cap.max(self.data.len()).min(max - self.data.len()));
        }
        tokio_util::io::poll_read_buf(Pin::new(r), cx, &mut self.data)
    }

    /// Polls the client for a read while no request is being read, keeping what arrives
    /// (a pipelined request) and saying whether the client has gone (end of stream or error).
    /// With no free space left it does not look.
    fn poll_gone<R: AsyncRead + Unpin>(&mut self, cx: &mut Context<'_>, r: &mut R) -> bool {
        if self.data.capacity() == self.data.len() {
            if self.data.len() >= self.cap {
                return false;
            }
            self.data.reserve(self.cap - self.data.len());
        }
        match tokio_util::io::poll_read_buf(Pin::new(r), cx, &mut self.data) {
            Poll::Ready(Ok(n)) => n == 0,
            Poll::Ready(Err(_)) => true,
            Poll::Pending => false,
        }
    }

    fn filled(&self) -> &[u8] {
        &self.data
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn consume(&mut self, n: usize) {
        self.data.advance(n);
    }

    fn clear(&mut self) {
        self.data.clear();
    }
}

/// What became of one request.
enum Step {
    KeepAlive,
    /// The exchange completed and the connection ends as asked: closing the socket sends the
    /// FIN (one system call fewer than `shutdown` + close, per `Connection: close` request).
    Finished,
    /// Anything else that ends the connection: `shutdown` first, then close.
    Close,
}

/// A request head the fast lane will forward; the head sent on is already in `Lane::out`.
struct Forward {
    head_len: usize,
    target: Target,
    /// Who the request acts as, and from which address (for admission).
    principal: Principal,
    client: IpAddr,
    upstream: Upstream,
    facts: RequestFacts,
    /// When its head was complete, its method and route (for the finish step).
    started: Started,
}

enum Plan {
    /// The head is not complete yet.
    Partial,
    Handoff,
    Forward(Forward),
    /// The policy refused the request: answered with this error, and the connection closed
    /// if `close` (its framing cannot be trusted, or a body follows that will not be read).
    Refuse {
        err: Error,
        head_len: usize,
        html: bool,
        close: bool,
        /// The client's address (the finish step counts a refused credential against it).
        client: IpAddr,
        started: Started,
    },
}

impl Plan {
    /// Refuses a head from `client` that cannot be trusted: answered, then the connection
    /// closes.
    fn refuse(err: Error, client: IpAddr) -> Plan {
        let mut started = Started::now("");
        started.client = client;
        Plan::Refuse {
            err,
            head_len: 0,
            html: false,
            close: true,
            client,
            started,
        }
    }
}

struct Lane {
    client: Client,
    /// The peer's address, in its canonical form (an IPv4-mapped address as IPv4).
    peer: IpAddr,
    /// The peer's address as `X-Forwarded-For` text (the client's, unless a trusted proxy
    /// names another).
    ip: head::IpText,
    rbuf: Buf,
    ubuf: Option<Buf>,
    /// The head sent to the sandbox (kept for a retry), then the one sent to the client.
    out: Vec<u8>,
    rout: Vec<u8>,
    /// The current request's `Host`, for `Location` rewriting.
    host: Vec<u8>,
}

impl Lane {
    fn new(client: Client, peer: SocketAddr) -> Lane {
        let peer = peer.ip().to_canonical();
        Lane {
            client,
            peer,
            ip: head::ip_text(peer),
            rbuf: Buf::new(CLIENT_BUF),
            ubuf: None,
            out: Vec::with_capacity(512),
            rout: Vec::with_capacity(512),
            host: Vec::new(),
        }
    }

    /// Serves requests until the connection ends (`None`) or one needs hyper: then returns the
    /// bytes read and not answered, which hyper reads first.
    async fn run(&mut self, gw: &Gateway, shutdown: &CancellationToken) -> Option<Bytes> {
        let timer = tokio::time::sleep(gw.state.config.header_timeout);
        tokio::pin!(timer);
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        loop {
            let forward = match self
                .read_head(gw, timer.as_mut(), cancelled.as_mut())
                .await?
            {
                Plan::Partial => return None,
                Plan::Handoff => return Some(self.rbuf.data.split().freeze()),
                Plan::Forward(f) => f,
                Plan::Refuse {
                    err,
                    head_len,
                    html,
                    close,
                    client,
                    started,
                } => {
                    gw.policy.refused(&err, client, &started);
                    let id = started.request_id().as_bytes();
                    head::write_full(&mut self.rout, &err.to_response(html), close, Some(id));
                    let written = self.client.write_all(&self.rout).await;
                    if written.is_err() {
                        return None;
                    }
                    if close {
                        // The client may be sending a body still: let it reach our answer.
                        let _ = linger::close(&mut self.client).await;
                        return None;
                    }
                    self.rbuf.consume(head_len);
                    continue;
                }
            };
            match self.exchange(gw, forward, timer.as_mut()).await {
                Step::KeepAlive if !shutdown.is_cancelled() => {}
                Step::Finished => return None,
                Step::KeepAlive | Step::Close => {
                    let _ = self.client.shutdown().await;
                    return None;
                }
            }
        }
    }

    /// Waits for a complete request head (bounded by `header_timeout` and shutdown) and plans
    /// it; `None` when the client left, was too slow, or the gateway is stopping.
    async fn read_head(
        &mut self,
        gw: &Gateway,
        mut timer: Pin<&mut Sleep>,
        mut cancelled: Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
    ) -> Option<Plan> {
        if !self.rbuf.is_empty() {
            if let Some(plan) = self.plan_complete(gw) {
                return Some(plan);
            }
        }
        if !self.client.is_polled() {
            // A new connection's first request is usually in the socket already: read it
            // before arming the timer (no event-loop round, no timer entry). Had the read to
            // wait, the client is registered now and the loop below waits as usual.
            let mut cx = Context::from_waker(std::task::Waker::noop());
            match self.rbuf.poll_fill(&mut cx, &mut self.client, MAX_HEAD) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return None,
                Poll::Ready(Ok(_)) => {
                    if let Some(plan) = self.plan_complete(gw) {
                        return Some(plan);
                    }
                }
                Poll::Pending => {}
            }
        }
        timer
            .as_mut()
            .reset(Instant::now() + gw.state.config.header_timeout);
        loop {
            let read = poll_fn(|cx| {
                if let Poll::Ready(r) = self.rbuf.poll_fill(cx, &mut self.client, MAX_HEAD) {
                    return Poll::Ready(Some(r));
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                // Idle between requests: leave at once on shutdown. Mid-head: finish it.
                if self.rbuf.is_empty() && cancelled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await;
            match read {
                Some(Ok(0)) if self.rbuf.filled().len() >= MAX_HEAD => {
                    return Some(Plan::refuse(
                        frame::refusal(frame::HEAD_TOO_LARGE),
                        self.peer,
                    ));
                }
                Some(Ok(0)) | Some(Err(_)) | None => return None,
                Some(Ok(_)) => {
                    if let Some(plan) = self.plan_complete(gw) {
                        return Some(plan);
                    }
                }
            }
        }
    }

    /// `plan`, or `None` while the buffered head is still incomplete.
    fn plan_complete(&mut self, gw: &Gateway) -> Option<Plan> {
        match self.plan(gw) {
            Plan::Partial => None,
            plan => Some(plan),
        }
    }

    /// Parses the buffered request head and decides its fate; for a forwarded request, writes
    /// the head the sandbox will receive into `out`.
    fn plan(&mut self, gw: &Gateway) -> Plan {
        let buf = self.rbuf.filled();
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        // The same reading `frame::request_framing` (tests, fuzzer) makes.
        let frame::Head {
            head_len,
            method,
            target,
            headers: req_headers,
            facts,
        } = match frame::parse_head(buf, &mut headers) {
            Ok(h) => h,
            Err(frame::Verdict::Partial) => return Plan::Partial,
            Err(frame::Verdict::Refuse(why)) => {
                return Plan::refuse(frame::refusal(why), self.peer)
            }
            Err(_) => return Plan::Handoff,
        };
        let (path, query) = match crate::routing::split_once_byte(target, b'?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let host = head::host(req_headers);
        let mut started = Started::now(method);
        let client = gw.policy.client(self.peer, &facts);
        started.client = client;
        started.identify(
            head::field(req_headers, crate::access::X_REQUEST_ID),
            head::field(req_headers, "traceparent"),
            host,
            path,
        );
        let view = Head {
            method,
            authority: None,
            host,
            path,
            query,
            peer: self.peer,
            client,
            facts: &facts,
        };
        let (decision, route) = gw.policy.check(&view);
        started.route = route;
        let grant = match decision {
            Decision::Proxy(grant) => grant,
            Decision::Deny(err) => {
                return Plan::Refuse {
                    close: err.closes_connection() || facts.framing.has_body() || !facts.keep_alive,
                    err,
                    head_len,
                    html: facts.html,
                    client,
                    started,
                }
            }
            // Answers the API gives, redirects: hyper's lane.
            Decision::Api(_) | Decision::Redirect(_) | Decision::Preview { .. } => {
                return Plan::Handoff
            }
        };
        // Waking a sandbox, and splicing a protocol switch, are hyper's lane's.
        let (Some(upstream), false) = (grant.upstream, grant.upgrade) else {
            return Plan::Handoff;
        };
        started.auth = crate::policy::auth_result(&grant.principal);
        started.granted(
            &grant.target.sandbox.id,
            grant.target.port,
            &grant.principal.subject,
        );
        let target_route = grant.target;
        // Sent as `X-Forwarded-Prefix` whether or not the path keeps it.
        let prefix = target_route.prefix.as_ref().map(|p| p.as_bytes());
        let strip = target_route
            .stripped_prefix()
            .map_or(0, http::HeaderValue::len);
        let rest = &target[strip.min(target.len())..];
        let rebuilt;
        let upstream_path = match query.and_then(headers::query_without_credentials) {
            // The gateway's credential parameter never reaches a sandbox.
            Some(q) => {
                let path = &rest[..rest.len() - query.map_or(0, |q| q.len() + 1)];
                let sep = if q.is_empty() { "" } else { "?" };
                let slash = if path.starts_with('/') { "" } else { "/" };
                rebuilt = format!("{slash}{path}{sep}{q}");
                &rebuilt
            }
            None if rest.starts_with('/') => rest,
            None => {
                rebuilt = format!("/{rest}");
                &rebuilt
            }
        };
        // The peer's text, made once per connection, unless a trusted proxy named another.
        let client_text;
        let client_ip: &[u8] = if client == self.peer {
            &self.ip
        } else {
            client_text = head::ip_text(client);
            &client_text
        };
        head::write_request(
            &mut self.out,
            req_headers,
            &RequestRewrite {
                method,
                path: upstream_path,
                upstream_port: upstream.port(),
                client_ip,
                prefix,
                framing: facts.framing,
                strip_authorization: target_route.strip_authorization,
                request_id: started.request_id().as_bytes(),
            },
        );
        self.host.clear();
        self.host.extend_from_slice(host.unwrap_or("").as_bytes());
        Plan::Forward(Forward {
            head_len,
            target: target_route,
            principal: grant.principal,
            client,
            upstream,
            facts: RequestFacts::from(&facts),
            started,
        })
    }

    /// Forwards one request and its response. Bodies stream both ways at once, so a sandbox
    /// may answer before it has read the whole request.
    async fn exchange(&mut self, gw: &Gateway, mut f: Forward, mut timer: Pin<&mut Sleep>) -> Step {
        self.rbuf.consume(f.head_len);
        let has_body = f.facts.framing.has_body();
        let proxy = &*gw.state.proxy;
        let mut admission = match gw
            .policy
            .admit(&f.target, &f.principal, f.client, &f.started)
        {
            Ok(a) => a,
            Err(e) => {
                gw.policy.answered(&f.started, Ending::error(&e));
                return self.fail(&e, &f, has_body).await;
            }
        };
        let target = &f.target;
        let sb = &target.sandbox;
        let mut at = Dialing {
            instance: target.instance,
            upstream: f.upstream,
            key: crate::proxy::pool_key(target.dialed(), f.upstream),
        };
        let timeout = proxy.timeout();
        let mut ubuf = self.ubuf.take().unwrap_or_else(|| Buf::new(UPSTREAM_BUF));
        ubuf.clear();
        let mut reused = true;
        let mut up = match proxy.raw_pool().checkout(&at.key) {
            Some(s) => s,
            None => {
                reused = false;
                timer.as_mut().reset(Instant::now() + timeout);
                let dialed = connect(gw, target, f.client, &mut at, &mut admission, &mut self.out);
                match race(dialed, timer.as_mut()).await {
                    Some(Ok((s, took))) => {
                        admission.connected(took);
                        f.upstream = at.upstream;
                        s
                    }
                    Some(Err(e)) => {
                        let err = upstream_error(sb, target.port, e);
                        return {
                            admission.failed(&err);
                            self.fail(&err, &f, has_body).await
                        };
                    }
                    None => {
                        let err = timeout_error(&f, timeout);
                        return {
                            admission.failed(&err);
                            self.fail(&err, &f, has_body).await
                        };
                    }
                }
            }
        };

        // The request head (and a body's first bytes), then the response head.
        let mut req = RequestBody::new(f.facts.framing);
        // A request that is harmless to repeat goes again on a fresh connection when a kept
        // one fails before any answer (the sandbox had let it go), and, for a sandbox with
        // other instances, to another instance when a fresh one fails so (a server dying
        // with connections in its backlog).
        let others = !target.sandbox.instances().is_empty();
        let head_result = loop {
            let sent = if req.done() {
                up.write_all(&self.out).await
            } else {
                req.send_first(&mut up, &self.out, &mut self.rbuf).await
            };
            if sent.is_err()
                && req.may_retry(&f.facts)
                && (reused
                    || (others
                        && move_on(gw, target, f.client, &mut at, &mut admission, &mut self.out)))
            {
                if reused {
                    proxy.metrics().retried(crate::metrics::Retry::Resend);
                }
                reused = false;
                timer.as_mut().reset(Instant::now() + timeout);
                let dialed = connect(gw, target, f.client, &mut at, &mut admission, &mut self.out);
                if let Some(Ok((s, took))) = race(dialed, timer.as_mut()).await {
                    admission.connected(took);
                    f.upstream = at.upstream;
                    up = s;
                    continue;
                }
            }
            if let Err(e) = sent {
                let err = protocol_error(&f, &e);
                return self.abandon(admission, &req, &err, &f).await;
            }
            let got = read_response_head(
                &mut up,
                &mut ubuf,
                &mut self.client,
                &mut self.rbuf,
                &mut req,
                timer.as_mut(),
                proxy,
            )
            .await;
            match got {
                Err(e)
                    if (e.closed_early() || (others && e.broken()))
                        && ubuf.is_empty()
                        && req.may_retry(&f.facts)
                        && (reused
                            || (others
                                && move_on(
                                    gw,
                                    target,
                                    f.client,
                                    &mut at,
                                    &mut admission,
                                    &mut self.out,
                                ))) =>
                {
                    if reused {
                        proxy.metrics().retried(crate::metrics::Retry::Resend);
                    }
                    reused = false;
                    ubuf.clear();
                    timer.as_mut().reset(Instant::now() + timeout);
                    let dialed =
                        connect(gw, target, f.client, &mut at, &mut admission, &mut self.out);
                    match race(dialed, timer.as_mut()).await {
                        Some(Ok((s, took))) => {
                            admission.connected(took);
                            f.upstream = at.upstream;
                            up = s;
                        }
                        _ => break Err(HeadError::Closed),
                    }
                }
                other => break other,
            }
        };
        let head_len = match head_result {
            Ok(n) => n,
            Err(e) => {
                let err = match e {
                    HeadError::Timeout => timeout_error(&f, timeout),
                    HeadError::BodyStalled(true) => Error::BodyTimeout(proxy.body_timeout()),
                    HeadError::BodyStalled(false) => timeout_error(&f, proxy.body_timeout()),
                    HeadError::Closed => protocol_error(
                        &f,
                        &io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed before a response",
                        ),
                    ),
                    HeadError::Io(e) => protocol_error(&f, &e),
                    HeadError::Malformed(what) => Error::UpstreamProtocol {
                        id: sb.id.clone(),
                        reason: what.into(),
                    },
                    HeadError::ClientGone => {
                        return Step::Close;
                    }
                    // As a refused head: JSON, and the connection closed (the body is unread).
                    HeadError::BadBody(why) => Error::BadFraming(why),
                };
                return self.abandon(admission, &req, &err, &f).await;
            }
        };

        // The response head, rewritten, then its body.
        let resp = match self.response_head(&ubuf, head_len, &f, !req.done()) {
            Ok(r) => r,
            Err(reason) => {
                let err = Error::UpstreamProtocol {
                    id: sb.id.clone(),
                    reason: reason.into(),
                };
                return self.abandon(admission, &req, &err, &f).await;
            }
        };
        admission.respond(resp.status);
        ubuf.consume(head_len);
        let mut sent_bytes = 0;
        let body = forward_response_body(
            &mut up,
            &mut ubuf,
            &mut self.client,
            &self.rout,
            resp.framing,
            &mut self.rbuf,
            &mut req,
            (timer.as_mut(), StallWatch::new(proxy.body_timeout())),
            &mut sent_bytes,
        )
        .await;
        // The last piece, written below, counts too.
        let last_len = body.as_ref().map_or(0, |l| l.len);
        admission.sent(sent_bytes + last_len as u64);
        admission.received(req.received());
        // Settle the upstream connection, the permit and the in-use mark before the client sees
        // the end of the response, so that whatever the client does next (on this connection
        // or another, served by another event loop) finds them released: the connection in
        // the pool (or gone), `in_flight` down, the sandbox idle.
        let last_used = body.as_ref().map_or(0, |l| l.used);
        let upstream_clean =
            body.is_ok() && resp.reusable && req.done() && ubuf.filled().len() == last_used;
        if upstream_clean {
            proxy.raw_pool().checkin(at.key, up);
        }
        drop(admission);
        let sent = match body {
            Ok(last) => {
                let head: &[u8] = if last.head { &self.rout } else { &[] };
                let mut bufs = [
                    IoSlice::new(head),
                    IoSlice::new(&ubuf.filled()[..last.len]),
                    IoSlice::new(last.trailer),
                ];
                write_all_vectored(&mut self.client, &mut bufs)
                    .await
                    .map_err(|_| ())
            }
            Err(()) => Err(()),
        };
        if !ubuf.grown() {
            self.ubuf = Some(ubuf);
        }
        if self.rbuf.grown() && self.rbuf.is_empty() {
            self.rbuf = Buf::new(CLIENT_BUF);
        }
        match sent {
            Ok(()) if f.facts.keep_alive && req.done() && !resp.close => Step::KeepAlive,
            Ok(()) if req.done() && self.rbuf.is_empty() => Step::Finished,
            _ => Step::Close,
        }
    }

    /// Parses the response head in `ubuf`, decides its framing and writes the client's head
    /// into `rout`.
    fn response_head(
        &mut self,
        ubuf: &Buf,
        head_len: usize,
        f: &Forward,
        request_unfinished: bool,
    ) -> Result<ResponseShape, &'static str> {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            &ubuf.filled()[..head_len],
            &mut headers,
        ) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return Err("malformed response head"),
        }
        let (Some(status), Some(version)) = (resp.code, resp.version) else {
            return Err("malformed response head");
        };
        let facts =
            head::response_facts(status, version, resp.headers, f.facts.is_head).map_err(|e| {
                match e {
                    head::BadResponse::Length => "invalid content-length",
                    head::BadResponse::Coding => "unsupported transfer-encoding",
                    head::BadResponse::Switch => "switched protocols without an upgrade request",
                }
            })?;
        let client_framing = match facts.framing {
            Framing::UntilClose => Framing::Chunked,
            Framing::Empty if !head::bodiless(status, f.facts.is_head) => Framing::Length(0),
            other => other,
        };
        // A body the client never sees (HEAD, 304) keeps the sandbox's stated length.
        let keep_length = facts.framing == Framing::Empty && (f.facts.is_head || status == 304);
        let close = !f.facts.keep_alive || request_unfinished;
        let prefix = f
            .target
            .stripped_prefix()
            .map_or(&b""[..], http::HeaderValue::as_bytes);
        head::write_response(
            &mut self.rout,
            resp.headers,
            &ResponseRewrite {
                status,
                reason: resp.reason.unwrap_or(""),
                framing: client_framing,
                keep_length,
                close,
                ports: [f.target.port, f.upstream.port()],
                public_host: &self.host,
                prefix,
                request_id: f.started.request_id().as_bytes(),
            },
        );
        Ok(ResponseShape {
            status,
            framing: facts.framing,
            reusable: facts.reusable,
            close,
        })
    }

    /// Forwarding failed with `err`: the admission finishes with it (and the request body's
    /// size so far), then the client is answered with it.
    async fn abandon<L, A>(
        &mut self,
        mut admission: crate::admission::Admission<L, A>,
        req: &RequestBody,
        err: &Error,
        f: &Forward,
    ) -> Step
    where
        L: std::ops::Deref<Target = crate::admission::Limits>,
        A: std::ops::Deref<Target = crate::routes::Activity>,
    {
        admission.received(req.received());
        admission.failed(err);
        self.fail(err, f, !req.done()).await
    }

    /// Answers with the gateway's own error (the request's admission already finished, so
    /// that the client's next request finds its slot free). The connection stays open only
    /// if the request was read completely and the client wants that.
    async fn fail(&mut self, err: &Error, f: &Forward, body_unread: bool) -> Step {
        let close = body_unread || !f.facts.keep_alive;
        let id = f.started.request_id().as_bytes();
        head::write_full(
            &mut self.rout,
            &err.to_response(f.facts.html),
            close,
            Some(id),
        );
        if self.client.write_all(&self.rout).await.is_err() || close {
            return Step::Close;
        }
        Step::KeepAlive
    }
}

/// Where a forwarded request is being sent: which instance of its sandbox, the upstream and
/// its pool key.
struct Dialing {
    instance: usize,
    upstream: Upstream,
    key: PoolKey,
}

/// Opens a connection to the instance `at` names, with the time it took; a refusal moves
/// the request to another instance of its sandbox ([`move_on`]) as [`Proxy::dial_instance`]
/// says.
///
/// [`Proxy::dial_instance`]: crate::proxy::Proxy::dial_instance
async fn connect<'a>(
    gw: &'a Gateway,
    target: &'a Target,
    client: IpAddr,
    at: &mut Dialing,
    admission: &mut ScopedAdmission<'a>,
    out: &mut Vec<u8>,
) -> Result<(TcpStream, std::time::Duration), crate::proxy::SendError> {
    let others = !target.sandbox.instances().is_empty();
    let first = at.upstream;
    gw.state
        .proxy
        .dial_instance(first, others, || {
            move_on(gw, target, client, at, admission, out).then_some(at.upstream)
        })
        .await
}

/// Moves a request whose instance failed it (nothing answered) to another instance of its
/// sandbox, by the policy's failover: `at`, the admission and the `Host` port in `out`
/// follow. False if there is no other.
fn move_on<'a>(
    gw: &'a Gateway,
    target: &'a Target,
    client: IpAddr,
    at: &mut Dialing,
    admission: &mut ScopedAdmission<'a>,
    out: &mut Vec<u8>,
) -> bool {
    let Some((i, upstream)) = gw.policy.failover(target, at.instance, client, admission) else {
        return false;
    };
    let instance = crate::balance::instance(&target.sandbox, i);
    *at = Dialing {
        instance: i,
        upstream,
        key: crate::proxy::pool_key(instance, upstream),
    };
    head::set_host_port(out, upstream.port());
    true
}

struct ResponseShape {
    status: u16,
    framing: Framing,
    reusable: bool,
    close: bool,
}

/// Polls `fut` until it finishes or `timer` fires (`None`).
async fn race<F: std::future::Future>(fut: F, mut timer: Pin<&mut Sleep>) -> Option<F::Output> {
    tokio::pin!(fut);
    poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

fn timeout_error(f: &Forward, timeout: std::time::Duration) -> Error {
    Error::UpstreamTimeout {
        id: f.target.sandbox.id.clone(),
        port: f.target.port,
        timeout,
    }
}

fn protocol_error(f: &Forward, e: &io::Error) -> Error {
    Error::UpstreamProtocol {
        id: f.target.sandbox.id.clone(),
        reason: e.to_string(),
    }
}

/// The request body's progress from the client to the sandbox.
struct RequestBody {
    framing: Framing,
    /// `Length`: bytes not yet taken from the client.
    left: u64,
    scanner: Scanner,
    /// The client has sent the whole body (it may not all be written on yet).
    received: bool,
    /// Bytes at the front of the client buffer that are body, not yet written on.
    pending: usize,
    /// Bytes after those to drop: the client's last chunk and trailers (never forwarded).
    swallow: usize,
    /// Then the rest of the body to write on: `LAST_CHUNK`, once a chunked body has ended.
    last: &'static [u8],
    /// The client sent a malformed chunked body.
    malformed: Option<Malformed>,
    /// Writing to the sandbox failed: the rest of the body is not sent.
    abandoned: bool,
    /// Body bytes moved so far (read from the client or written on): progress, for the body
    /// timeout.
    moved: u64,
}

impl RequestBody {
    fn new(framing: Framing) -> RequestBody {
        let left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        RequestBody {
            framing,
            left,
            scanner: Scanner::default(),
            received: !framing.has_body(),
            pending: 0,
            swallow: 0,
            last: b"",
            malformed: None,
            abandoned: false,
            moved: 0,
        }
    }

    /// Body bytes taken from the client so far, as the body decodes (a chunked body's data,
    /// without its framing), for the access log.
    fn received(&self) -> u64 {
        match self.framing {
            Framing::Length(n) => n - self.left,
            Framing::Chunked => self.scanner.data(),
            _ => 0,
        }
    }

    /// The whole body reached the sandbox.
    fn done(&self) -> bool {
        self.received
            && self.pending == 0
            && self.swallow == 0
            && self.last.is_empty()
            && !self.abandoned
    }

    /// A request that failed on a reused connection may go again on a fresh one only if it
    /// carried no body and repeating it is harmless.
    fn may_retry(&self, facts: &RequestFacts) -> bool {
        crate::proxy::may_resend(facts.idempotent, facts.framing.has_body())
    }

    /// Takes the body's share of the newly buffered client bytes (the rest is the next
    /// request) and returns the length of what is forwarded; the `swallow` bytes after it are
    /// the body's too. A malformed body takes nothing and sets `malformed`.
    fn take(&mut self, available: &[u8]) -> usize {
        match self.framing {
            Framing::Length(_) => {
                let n = self.left.min(available.len() as u64) as usize;
                self.left -= n as u64;
                self.received = self.left == 0;
                n
            }
            Framing::Chunked => match self.scanner.scan(available) {
                Ok(p) => {
                    self.swallow += p.consumed - p.forward;
                    self.received = self.scanner.done();
                    if self.received {
                        self.last = LAST_CHUNK;
                    }
                    p.forward
                }
                Err(e) => {
                    self.malformed = Some(e);
                    0
                }
            },
            _ => 0,
        }
    }

    /// Sends the head together with the body bytes already buffered, in one write; nothing
    /// if those are already malformed (`poll_pump` reports it).
    async fn send_first(
        &mut self,
        up: &mut TcpStream,
        head: &[u8],
        rbuf: &mut Buf,
    ) -> io::Result<()> {
        let n = self.take(rbuf.filled());
        if self.malformed.is_some() {
            return Ok(());
        }
        let mut bufs = [
            IoSlice::new(head),
            IoSlice::new(&rbuf.filled()[..n]),
            IoSlice::new(self.last),
        ];
        write_all_vectored(up, &mut bufs).await?;
        rbuf.consume(n + self.swallow);
        (self.swallow, self.last) = (0, b"");
        Ok(())
    }

    /// Moves the body from the client to the sandbox as far as both sockets allow.
    /// `Ready(Ok(()))` once it is all sent (or abandoned); `Ready(Err)` if the client broke it
    /// (went away early, or sent a malformed body: then `malformed` says so).
    fn poll_pump(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut Client,
        rbuf: &mut Buf,
        up: &mut TcpStream,
    ) -> Poll<Result<(), ()>> {
        loop {
            if self.abandoned || self.done() {
                return Poll::Ready(Ok(()));
            }
            if self.malformed.is_some() {
                return Poll::Ready(Err(()));
            }
            if self.pending > 0 || (self.swallow == 0 && !self.last.is_empty()) {
                let chunk = match self.pending {
                    0 => self.last,
                    n => &rbuf.filled()[..n],
                };
                match Pin::new(&mut *up).poll_write(cx, chunk) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => self.abandoned = true,
                    Poll::Ready(Ok(w)) if self.pending == 0 => self.last = &self.last[w..],
                    Poll::Ready(Ok(w)) => {
                        self.moved += w as u64;
                        rbuf.consume(w);
                        self.pending -= w;
                    }
                    Poll::Pending => return Poll::Pending,
                }
                continue;
            }
            if self.swallow > 0 {
                rbuf.consume(self.swallow);
                self.swallow = 0;
                continue;
            }
            if !rbuf.is_empty() && !self.received {
                self.pending = self.take(rbuf.filled());
                if self.pending > 0 || self.swallow > 0 || self.received {
                    continue;
                }
                if self.malformed.is_some() {
                    return Poll::Ready(Err(()));
                }
                // Only part of a chunk-size line or trailer section: read on.
            }
            match rbuf.poll_fill_body(cx, client) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Err(())),
                Poll::Ready(Ok(n)) => self.moved += n as u64,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Watches a request body that is still streaming for a stall: no byte moved for the body
/// timeout. The timer is the exchange's, lent for each poll.
struct StallWatch {
    limit: std::time::Duration,
    moved: u64,
    armed: bool,
}

impl StallWatch {
    fn new(limit: std::time::Duration) -> StallWatch {
        StallWatch {
            limit,
            moved: 0,
            armed: false,
        }
    }

    /// Whether `req` has moved no byte for the limit; (re)arms `timer` on progress.
    fn stalled(
        &mut self,
        cx: &mut Context<'_>,
        mut timer: Pin<&mut Sleep>,
        req: &RequestBody,
    ) -> bool {
        if !self.armed || req.moved != self.moved {
            self.moved = req.moved;
            self.armed = true;
            timer.as_mut().reset(Instant::now() + self.limit);
        }
        timer.poll(cx).is_ready()
    }
}

impl HeadError {
    /// The sandbox closed (or reset) the connection before answering: what a kept
    /// connection it had already let go looks like.
    /// The connection failed under the request, whatever the error (an instance dying):
    /// what moves a request that is harmless to repeat to another instance.
    fn broken(&self) -> bool {
        matches!(self, HeadError::Closed | HeadError::Io(_))
    }

    fn closed_early(&self) -> bool {
        match self {
            HeadError::Closed => true,
            HeadError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }
}

enum HeadError {
    Timeout,
    /// The request body moved no byte for the body timeout: `true` if the gateway was waiting
    /// for the client, `false` if for the sandbox to take it.
    BodyStalled(bool),
    /// The sandbox closed the connection before a complete head.
    Closed,
    Io(io::Error),
    Malformed(&'static str),
    /// The client went away while the sandbox was thinking.
    ClientGone,
    /// The client's chunked body is malformed: a 400, and the connection closed.
    BadBody(&'static str),
}

/// Reads a response head into `ubuf`, skipping or forwarding interim (1xx) responses, while
/// the request body keeps streaming; the wait is bounded by `timeout` from when the request
/// is out (while the body streams, by the body timeout between bytes). Returns the head's
/// length.
async fn read_response_head(
    up: &mut TcpStream,
    ubuf: &mut Buf,
    client: &mut Client,
    rbuf: &mut Buf,
    req: &mut RequestBody,
    mut timer: Pin<&mut Sleep>,
    proxy: &crate::proxy::Proxy,
) -> Result<usize, HeadError> {
    let timeout = proxy.timeout();
    // While the body streams, the timer watches for it to stall; then for the answer.
    timer.as_mut().reset(Instant::now() + timeout);
    let mut stall = StallWatch::new(proxy.body_timeout());
    // While the client is unwatched, the loop's ticker wakes this task to register it once
    // the wait has lasted (`watch`), so that a client that left is noticed.
    let mut unwatched = watch::Wait::default();
    loop {
        match response_head_len(ubuf.filled()) {
            Ok(Some((len, interim))) => {
                if !interim {
                    return Ok(len);
                }
                ubuf.consume(len); // 1xx: informational only
                continue;
            }
            Ok(None) => {}
            Err(what) => return Err(HeadError::Malformed(what)),
        }
        let r = poll_fn(|cx| {
            if !req.done() && !req.abandoned {
                match req.poll_pump(cx, client, rbuf, up) {
                    Poll::Ready(Ok(())) => {
                        // The request is out (or can go no further): the wait for an
                        // answer starts now.
                        timer.as_mut().reset(Instant::now() + timeout);
                    }
                    Poll::Ready(Err(())) => {
                        return Poll::Ready(Err(match req.malformed {
                            Some(Malformed(why)) => HeadError::BadBody(why),
                            None => HeadError::ClientGone,
                        }))
                    }
                    Poll::Pending => {
                        if stall.stalled(cx, timer.as_mut(), req) {
                            let client_side = req.pending == 0;
                            return Poll::Ready(Err(HeadError::BodyStalled(client_side)));
                        }
                    }
                }
            } else if client.is_polled() && rbuf.poll_gone(cx, client) {
                return Poll::Ready(Err(HeadError::ClientGone));
            }
            if let Poll::Ready(r) = ubuf.poll_fill(cx, up, MAX_HEAD) {
                return Poll::Ready(match r {
                    Ok(0) => Err(HeadError::Closed),
                    Ok(_) => Ok(()),
                    Err(e) => Err(HeadError::Io(e)),
                });
            }
            if req.done() || req.abandoned {
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(HeadError::Timeout));
                }
                if !client.is_polled() && client.waited_long(&mut unwatched, cx) {
                    // Long enough unwatched: register the client (polled again at once).
                    if client.register().is_err() {
                        return Poll::Ready(Err(HeadError::ClientGone));
                    }
                    return Poll::Ready(Ok(()));
                }
            }
            Poll::Pending
        })
        .await;
        r?;
    }
}

/// The length of the complete response head at the start of `buf` and whether it is an
/// interim (1xx, not 101) response; `None` while incomplete. Only finds the blank line that
/// ends the head; `Lane::response_head` parses it (once) and rejects what is malformed.
fn response_head_len(buf: &[u8]) -> Result<Option<(usize, bool)>, &'static str> {
    let mut from = 0;
    let end = loop {
        let Some(nl) = buf[from..].iter().position(|&b| b == b'\n') else {
            if buf.len() >= MAX_HEAD {
                return Err("response head too large");
            }
            return Ok(None);
        };
        let at = from + nl + 1;
        match buf.get(at) {
            Some(b'\n') => break at + 1,
            Some(b'\r') if buf.get(at + 1) == Some(&b'\n') => break at + 2,
            Some(b'\r') if at + 1 == buf.len() => return Ok(None),
            None => return Ok(None),
            _ => from = at,
        }
    };
    // `HTTP/1.x 1xx`: the status code's first digit is byte 9.
    let interim = buf.get(9) == Some(&b'1') && buf.get(9..12) != Some(b"101");
    Ok(Some((end, interim)))
}

/// Writes the client's response head and streams the body after it, while a request body
/// still in progress keeps streaming the other way.
#[allow(clippy::too_many_arguments)] // the exchange's parts, borrowed separately
async fn forward_response_body(
    up: &mut TcpStream,
    ubuf: &mut Buf,
    client: &mut Client,
    head_out: &[u8],
    framing: Framing,
    rbuf: &mut Buf,
    req: &mut RequestBody,
    (mut timer, mut stall): (Pin<&mut Sleep>, StallWatch),
    sent_bytes: &mut u64,
) -> Result<Last, ()> {
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut scanner = Scanner::default();
    let mut head = Some(head_out);
    loop {
        // Forward what is buffered: `n` bytes, of the `used` ones.
        let mut used = 0;
        let (n, done) = match framing {
            Framing::Empty => (0, true),
            Framing::Length(_) => {
                let n = left.min(ubuf.filled().len() as u64) as usize;
                left -= n as u64;
                (n, left == 0)
            }
            Framing::Chunked => {
                // The sandbox's last chunk and trailers are swallowed; `LAST_CHUNK` ends it.
                let p = scanner.scan(ubuf.filled()).map_err(|_| ())?;
                used = p.consumed;
                (p.forward, scanner.done())
            }
            Framing::UntilClose => (ubuf.filled().len(), false),
        };
        if done {
            // The sandbox's part is over: the caller settles its connection, then sends this.
            return Ok(Last {
                head: head.is_some(),
                len: n,
                used: used.max(n),
                trailer: if framing == Framing::Chunked {
                    LAST_CHUNK
                } else {
                    b""
                },
            });
        }
        let piece = &ubuf.filled()[..n];
        let sent = match (framing, head.take()) {
            (Framing::UntilClose, h) if n > 0 => write_chunk(client, h.unwrap_or(&[]), piece).await,
            (_, Some(h)) => write_all2(client, h, piece).await,
            (_, None) if n > 0 => client.write_all(piece).await,
            _ => Ok(()),
        };
        sent.map_err(|_| ())?;
        *sent_bytes += n as u64;
        ubuf.consume(used.max(n));
        // Read more, keeping a request body moving.
        let read = poll_fn(|cx| {
            if !req.done() && !req.abandoned {
                match req.poll_pump(cx, client, rbuf, up) {
                    Poll::Ready(Err(())) => return Poll::Ready(Err(())),
                    // A request body that stalls while the response streams is cut too.
                    Poll::Pending if stall.stalled(cx, timer.as_mut(), req) => {
                        return Poll::Ready(Err(()))
                    }
                    _ => {}
                }
            } else if rbuf.poll_gone(cx, client) {
                return Poll::Ready(Err(()));
            }
            ubuf.poll_fill_body(cx, up).map_err(|_| ())
        })
        .await?;
        if read == 0 {
            if framing == Framing::UntilClose {
                // Ended by the sandbox's close: all that is left is the re-framed last chunk.
                return Ok(Last {
                    head: false,
                    len: 0,
                    used: 0,
                    trailer: LAST_CHUNK,
                });
            }
            return Err(()); // the sandbox closed mid-body: the client sees it cut
        }
    }
}

/// The end of a response body, read but not yet sent: the client's head if it is still
/// unsent, the last `len` body bytes at the front of the upstream buffer (of the `used` ones
/// that end the sandbox's body: a chunked body's last chunk and trailers are dropped), then
/// `trailer` (the fast lane's own last chunk, for a chunked or re-framed body).
struct Last {
    head: bool,
    len: usize,
    used: usize,
    trailer: &'static [u8],
}

/// One chunk of a body re-framed as chunked (a sandbox body that runs until close).
async fn write_chunk(client: &mut Client, head: &[u8], data: &[u8]) -> io::Result<()> {
    let mut size = [0u8; 20];
    let mut cursor = io::Cursor::new(&mut size[..]);
    io::Write::write_fmt(&mut cursor, format_args!("{:x}\r\n", data.len()))?;
    let len = cursor.position() as usize;
    let mut bufs = [
        IoSlice::new(head),
        IoSlice::new(&size[..len]),
        IoSlice::new(data),
        IoSlice::new(b"\r\n"),
    ];
    write_all_vectored(client, &mut bufs).await
}

async fn write_all2<W: AsyncWrite + Unpin>(w: &mut W, a: &[u8], b: &[u8]) -> io::Result<()> {
    if b.is_empty() {
        return w.write_all(a).await;
    }
    let mut bufs = [IoSlice::new(a), IoSlice::new(b)];
    write_all_vectored(w, &mut bufs).await
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::response_head_len;

    #[test]
    fn response_heads_end_at_the_blank_line() {
        let h = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi";
        assert_eq!(response_head_len(h), Ok(Some((h.len() - 2, false))));
        assert_eq!(
            response_head_len(b"HTTP/1.1 200 OK\n\nhi"),
            Ok(Some((17, false)))
        );
        assert_eq!(
            response_head_len(b"HTTP/1.1 103 Early Hints\r\n\r\n"),
            Ok(Some((28, true)))
        );
        assert_eq!(
            response_head_len(b"HTTP/1.1 101 Switching\r\n\r\n"),
            Ok(Some((26, false)))
        );
        for partial in [
            &b"HTTP/1.1 200 OK\r\n"[..],
            b"HTTP/1.1 200 OK\r\n\r",
            b"HTTP/1.1 2",
        ] {
            assert_eq!(response_head_len(partial), Ok(None));
        }
        assert!(response_head_len(&vec![b'x'; 70_000]).is_err());
    }
}
