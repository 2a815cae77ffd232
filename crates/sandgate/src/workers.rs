//! Connection workers: extra threads, each with a single-threaded runtime of its own and a
//! listening socket of its own on the gateway's address (nginx's worker model: one event loop
//! per core, no work stealing, no cross-thread wake-ups on the hot path).
//!
//! The sockets form one `SO_REUSEPORT` group, so the kernel spreads new connections evenly by
//! their addresses. (Accepting from one shared socket was measured first: whichever loop was
//! awake took a burst of connections, and a loop holding most keep-alive clients capped
//! throughput at one core's.) Linux admits only sockets of the same user to the group. Where
//! the group cannot be formed, the workers accept from clones of the one socket.
//!
//! Objects a worker creates (upstream connections, timers, child-process watchers, Docker
//! client connections) belong to its runtime, so the workers outlive the control plane:
//! they stop accepting and drain with the main listener, but their runtimes end only after
//! the gateway has stopped its sandboxes ([`Workers::finish`]).

use std::net::TcpListener as StdListener;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;

/// Puts `listener` in a `SO_REUSEPORT` group; false where the system refuses.
fn reuse_port(listener: &StdListener) -> bool {
    let ok = socket2::SockRef::from(listener).set_reuse_port(true);
    if let Err(e) = &ok {
        tracing::warn!(error = %e, "SO_REUSEPORT unavailable; workers share one listening socket");
    }
    ok.is_ok()
}

/// A new listening socket in `listener`'s `SO_REUSEPORT` group.
fn bind_like(listener: &StdListener) -> std::io::Result<StdListener> {
    use socket2::{Domain, Socket, Type};
    let addr = listener.local_addr()?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The extra workers of one gateway.
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
    drained: Vec<oneshot::Receiver<()>>,
    /// A child of the gateway's shutdown token: also cancelled when `Workers` is dropped.
    stop: CancellationToken,
    finish: CancellationToken,
}

impl Workers {
    /// Starts `count` workers serving clones of `listener` until `shutdown` fires.
    pub fn spawn(
        count: usize,
        listener: &StdListener,
        gateway: &Arc<Gateway>,
        shutdown: &CancellationToken,
    ) -> std::io::Result<Workers> {
        let mut workers = Workers {
            threads: Vec::with_capacity(count),
            drained: Vec::with_capacity(count),
            stop: shutdown.child_token(),
            finish: CancellationToken::new(),
        };
        let shared = count > 0 && !reuse_port(listener);
        for index in 1..=count {
            let listener = match shared {
                true => listener.try_clone()?,
                false => bind_like(listener)?,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (gateway, shutdown, finish) = (
                gateway.clone(),
                workers.stop.clone(),
                workers.finish.clone(),
            );
            let (drained_tx, drained_rx) = oneshot::channel();
            let thread = std::thread::Builder::new()
                .name(format!("sandgate-worker-{index}"))
                .spawn(move || {
                    crate::event_loop::set_current(index);
                    runtime.block_on(async move {
                        if let Err(e) = crate::server::serve(listener, gateway, shutdown).await {
                            tracing::error!(worker = index, error = %e, "worker cannot listen");
                        }
                        let _ = drained_tx.send(());
                        finish.cancelled().await;
                    });
                })?;
            workers.threads.push(thread);
            workers.drained.push(drained_rx);
        }
        Ok(workers)
    }

    /// Waits until every worker has stopped accepting and drained its connections.
    pub async fn drained(&mut self) {
        for rx in self.drained.drain(..) {
            let _ = rx.await;
        }
    }

    /// Ends the workers' runtimes and waits for their threads.
    pub async fn finish(mut self) {
        self.finish.cancel();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

impl Drop for Workers {
    /// An early return of the gateway still lets the worker threads end.
    fn drop(&mut self) {
        self.stop.cancel();
        self.finish.cancel();
    }
}
