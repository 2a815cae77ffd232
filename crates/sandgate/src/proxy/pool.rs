//! Upstream connection pool: idle HTTP/1.1 connections per (upstream, sandbox incarnation),
//! checked out LIFO and returned when a response ends. Generic over the connection: hyper's
//! `SendRequest` for the general path, a raw `TcpStream` for the fast lane. The lock guards only a vector
//! push/pop and is never held across `.await`. A stopped or deleted sandbox needs no purge:
//! its key (generation, creation time) is never asked for again, its connections close with
//! its process, and the periodic sweep drops them.

use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;
use tokio::net::TcpStream;

use crate::backend::Upstream;

/// Identifies one incarnation of one sandbox port: a re-created or restarted sandbox never
/// receives a connection opened to an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub upstream: Upstream,
    pub generation: i64,
    /// The sandbox's creation time in milliseconds: distinguishes sandboxes that reuse a port.
    pub epoch: i64,
}

pub type Sender = SendRequest<super::request_body::ClientBody>;

/// A pooled connection: says when it can no longer carry a request.
pub trait Reusable {
    fn is_closed(&self) -> bool;
}

impl Reusable for Sender {
    fn is_closed(&self) -> bool {
        SendRequest::is_closed(self)
    }
}

impl Reusable for TcpStream {
    /// Without a system call when the connection is quiet: only a readiness the runtime has
    /// already seen (the peer closed, or sent bytes nobody asked for) costs a `read`.
    fn is_closed(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => {
                let mut byte = [0u8; 1];
                !matches!(self.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }
}

struct Idle<C> {
    conn: C,
    since: Instant,
}

pub struct Pool<C = Sender> {
    /// Keys are the gateway's own (no user input), so the fast hasher is safe.
    idle: Mutex<foldhash::HashMap<PoolKey, Vec<Idle<C>>>>,
    max_idle_per_key: usize,
    idle_timeout: Duration,
}

impl<C: Reusable> Pool<C> {
    pub fn new(max_idle_per_key: usize, idle_timeout: Duration) -> Pool<C> {
        Pool {
            idle: Mutex::new(foldhash::HashMap::default()),
            max_idle_per_key,
            idle_timeout,
        }
    }

    /// The most recently used live connection for `key`, if any.
    pub fn checkout(&self, key: &PoolKey) -> Option<C> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(key)?;
        while let Some(c) = list.pop() {
            if !c.conn.is_closed() && c.since.elapsed() < self.idle_timeout {
                return Some(c.conn);
            }
        }
        None
    }

    /// Gives a connection back after its response finished.
    pub fn checkin(&self, key: PoolKey, conn: C) {
        if conn.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(key).or_default();
        if list.len() < self.max_idle_per_key {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Idle connections held right now.
    pub fn idle_count(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.values().map(Vec::len).sum()
    }

    /// Drops stale and closed connections; run periodically.
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, list| {
            list.retain(|c| !c.conn.is_closed() && c.since.elapsed() < self.idle_timeout);
            !list.is_empty()
        });
    }
}
