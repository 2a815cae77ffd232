//! Connecting from inside a sandbox's network namespace: a short-lived thread enters the
//! namespace of a process in the sandbox (`setns`), connects to `127.0.0.1:port`, and hands the
//! socket back; the socket stays usable from any thread. This reaches servers bound to
//! localhost inside a container or isolated process, with no published ports and no conflicts
//! between sandboxes, and it can never reach the gateway host's own services.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use nix::sched::CloneFlags;
use tokio::net::TcpStream;

/// Upper bound for one connect attempt inside a namespace (`PROXY_TIMEOUT` bounds it too).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn enter_and_connect(pid: i32, port: u16) -> io::Result<std::net::TcpStream> {
    // Its process is gone (a container killed, a sandbox that just exited): nothing listens
    // there, which the proxy treats as a refusal (retried, or sent to another instance).
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "the sandbox's network namespace is gone",
        ),
        _ => e,
    })?;
    nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_nonblocking(true)?;
    Ok(stream)
}

/// Connects to `127.0.0.1:port` inside the network namespace of process `pid`.
pub async fn connect(pid: i32, port: u16) -> io::Result<TcpStream> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns-dial".into())
        .spawn(move || {
            // The thread ends right after: its namespace switch never leaks to other work.
            let _ = tx.send(enter_and_connect(pid, port));
        })?;
    let stream = rx
        .await
        .map_err(|_| io::Error::other("namespace dial thread vanished"))??;
    TcpStream::from_std(stream)
}

/// Whether this process may enter other network namespaces (root with CAP_SYS_ADMIN).
pub fn available() -> bool {
    let probe = || -> io::Result<()> {
        let own = std::fs::File::open("/proc/self/ns/net")?;
        nix::sched::setns(&own, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
    };
    std::thread::spawn(probe)
        .join()
        .map(|r| r.is_ok())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_inside_our_own_namespace_when_privileged() {
        if !available() {
            eprintln!("SKIPPED: no CAP_SYS_ADMIN here; netns dialing is covered where it runs");
            return;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = std::process::id() as i32;
        let (accepted, dialed) = tokio::join!(listener.accept(), connect(me, port));
        accepted.unwrap();
        dialed.unwrap();
        // A closed port is refused, with the error kind intact.
        drop(listener);
        let err = connect(me, port).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn a_vanished_namespace_is_a_refusal() {
        // No process has this pid (above the kernel's pid_max).
        let err = connect(i32::MAX, 80).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    }
}
