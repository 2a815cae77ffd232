//! The listener: accepts connections on one event loop's listening socket, hands each to the
//! fast lane (or, with `--fast-lane off`, to hyper's lane), and drains them gracefully on
//! shutdown. On a TLS listener every connection is a TLS handshake first, in its own task,
//! then hyper's lane (`docs/tls.md`).

use std::net::SocketAddr;
use std::net::TcpListener as StdListener;
use std::sync::Arc;
use std::time::Duration;

use mio::net::TcpListener as MioListener;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fastlane::client::Client;
use crate::fastlane::prefixed::Prefixed;
use crate::fastlane::watch::Watch;
use crate::gateway::Gateway;

/// How long open connections get to finish after shutdown begins.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves `listener` until `shutdown` fires, then drains open connections (bounded). Every
/// connection starts in the HTTP/1.1 fast lane (`crate::fastlane`), which hands it to hyper
/// for anything else; on a TLS listener, with a handshake, then in hyper's lane. Connections
/// are accepted without registering them with the event loop: `fastlane::client::Client`
/// does that only if one has to wait. Fails only if the listening socket cannot be
/// registered with the event loop.
pub async fn serve(
    listener: StdListener,
    gateway: Arc<Gateway>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let nodelay_inherited = nodelay_for_accepted(&listener);
    let listener = watch_listener(listener)?;
    // A token of this loop's own: each connection clones and drops it (a mutex on the
    // token's node), which then never contends with another loop's connections.
    let shutdown = shutdown.child_token();
    let watch = Arc::new(Watch::default());
    tokio::spawn({
        let (watch, shutdown) = (watch.clone(), shutdown.clone());
        async move { watch.run(shutdown).await }
    });
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = accept(&listener) => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let stream = std::net::TcpStream::from(stream);
        if !nodelay_inherited {
            let _ = stream.set_nodelay(true);
        }
        // Boxed: the connection's state (about 2.4 KiB) then sits in one place, and the task
        // holds a pointer, where tokio would otherwise copy the whole of it each time it moves
        // the task's future (spawning it, finishing it: ~2k instructions per connection).
        let client = Client::new(stream, watch.clone());
        if let Some(acceptor) = &gateway.tls {
            tracker.spawn(Box::pin(serve_tls(
                gateway.clone(),
                acceptor.clone(),
                client,
                peer,
                shutdown.clone(),
            )));
        } else if gateway.state.config.fast_lane {
            tracker.spawn(Box::pin(crate::fastlane::serve(
                gateway.clone(),
                client,
                peer,
                shutdown.clone(),
            )));
        } else {
            let prefixed = Prefixed::new(bytes::Bytes::new(), client);
            tracker.spawn(
                gateway
                    .clone()
                    .serve_hyper(prefixed, peer, shutdown.clone()),
            );
        }
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(DRAIN, tracker.wait()).await.is_err() {
        tracing::warn!("connections still open after {DRAIN:?}; closing them");
    }
    Ok(())
}

/// The first byte of every TLS connection: a handshake record (RFC 8446 §5.1).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// How a TLS listener's connection opened.
enum Opened {
    /// Boxed: a TLS stream's state is over a kilobyte.
    Tls(Box<tokio_rustls::server::TlsStream<Prefixed<Client>>>),
    /// Plain HTTP (or anything but TLS): the client, its first bytes read.
    Plain(Client),
    /// Closed, failed, or given up on: nothing to answer.
    Gone,
}

/// Serves one connection of a TLS listener: the handshake (bounded by `header_timeout`, like a
/// request head, and given up at shutdown), then hyper's lane, which speaks h2 or HTTP/1.1 as
/// ALPN agreed (the client's first bytes tell hyper which). The fast lane proxies from the
/// socket's own buffers, so it never sees a TLS connection. A client speaking plain HTTP to
/// the TLS port is told so in plain HTTP (400), as nginx does, rather than left with a TLS
/// alert it cannot read.
async fn serve_tls(
    gateway: Arc<Gateway>,
    acceptor: tokio_rustls::TlsAcceptor,
    mut client: Client,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    use tokio::io::AsyncReadExt;
    let limit = gateway.state.config.header_timeout;
    let open = async move {
        // The first read goes straight to the socket (no event-loop registration if the
        // ClientHello is there already); what it read is the handshake's first input.
        let mut first = vec![0; 4096];
        let n = match client.read(&mut first).await {
            Ok(0) | Err(_) => return Opened::Gone,
            Ok(n) => n,
        };
        if first[0] != TLS_HANDSHAKE_RECORD {
            return Opened::Plain(client);
        }
        first.truncate(n);
        // `Prefixed` also lingers on close, as for plain connections, so an early answer
        // reaches a client still sending.
        match acceptor
            .accept(Prefixed::new(bytes::Bytes::from(first), client))
            .await
        {
            Ok(stream) => Opened::Tls(Box::new(stream)),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                Opened::Gone
            }
        }
    };
    let opened = tokio::select! {
        _ = shutdown.cancelled() => Opened::Gone,
        opened = tokio::time::timeout(limit, open) => opened.unwrap_or_else(|_| {
            tracing::debug!(%peer, "TLS handshake not done within {limit:?}");
            Opened::Gone
        }),
    };
    match opened {
        Opened::Tls(stream) => gateway.serve_hyper(stream, peer, shutdown).await,
        Opened::Plain(client) => refuse_plaintext(client).await,
        Opened::Gone => {}
    }
}

/// Answers a plain-HTTP request on a TLS listener with 400 `bad_request` and closes.
async fn refuse_plaintext(mut client: Client) {
    use tokio::io::AsyncWriteExt;
    let err = crate::error::Error::BadRequest(
        "this port speaks HTTPS only: send the request over TLS (an https:// URL)".into(),
    );
    let mut out = Vec::new();
    crate::fastlane::head::write_full(&mut out, &err.to_response(false), true, None);
    if client.write_all(&out).await.is_ok() {
        let _ = crate::fastlane::linger::close(&mut client).await;
    }
}

/// The listening socket, non-blocking and registered with the event loop for readability.
/// tokio's safe way to watch a socket without taking over what it accepts is deprecated in
/// favour of an `unsafe` one (tokio#8587: the safe one cannot check that the descriptor stays
/// the same); the crate otherwise denies `unsafe` code.
#[allow(unsafe_code)]
fn watch_listener(listener: StdListener) -> std::io::Result<AsyncFd<MioListener>> {
    listener.set_nonblocking(true)?;
    let listener = MioListener::from_std(listener);
    // SAFETY: the `AsyncFd` owns the listener, whose descriptor stays open and the same for
    // as long as the `AsyncFd` lives (it is never taken out of it or forgotten).
    unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }
        .map_err(std::io::Error::from)
}

/// Accepts one connection: non-blocking, close-on-exec, not registered with the event loop.
async fn accept(
    listener: &AsyncFd<MioListener>,
) -> std::io::Result<(mio::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        if let Ok(accepted) = ready.try_io(|l| l.get_ref().accept()) {
            return accepted;
        }
    }
}

/// Sets `TCP_NODELAY` on the listening socket, which Linux copies to every connection it
/// accepts: one system call per connection fewer than setting it on each. False where that
/// does not hold, and each connection is set instead.
fn nodelay_for_accepted(listener: &StdListener) -> bool {
    cfg!(target_os = "linux") && socket2::SockRef::from(listener).set_nodelay(true).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel behaviour `serve` relies on: a connection accepted from a listening socket
    /// with `TCP_NODELAY` has it too (Nagle would hold back a streamed response's small writes).
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_from_the_listener() {
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let inherited = nodelay_for_accepted(&listener);
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        assert_eq!(inherited, cfg!(target_os = "linux"));
        let addr = listener.local_addr().unwrap();
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (accepted, _) = accepted.unwrap();
        assert!(
            !client.unwrap().nodelay().unwrap(),
            "the client side is untouched"
        );
        assert_eq!(accepted.nodelay().unwrap(), inherited);
    }
}
