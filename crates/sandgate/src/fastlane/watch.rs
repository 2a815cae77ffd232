//! Notices that a request has waited `UNWATCHED` for its answer while its client is not yet
//! registered with the event loop (`client.rs`), so that the client gets registered and its
//! leaving noticed, without a timer per request: one ticker per event loop, running only while
//! such a wait exists, wakes the waiting tasks every `UNWATCHED`, and a wait that has seen two
//! ticks go by (20 to 40 ms) registers its client. A 20 ms timer per request did the same, but
//! tokio wakes its own loop (an eventfd write, an extra `epoll_wait`) whenever a timer is
//! registered earlier than the deadline the loop last slept with: about one request in eight.

use std::sync::{Mutex, PoisonError};
use std::task::{Context, Waker};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How often the ticker runs while a request waits with its client unwatched.
pub const UNWATCHED: Duration = Duration::from_millis(20);

/// One event loop's ticker state.
pub struct Watch {
    state: Mutex<State>,
    /// Wakes the ticker from idle when a wait begins.
    start: Notify,
}

struct State {
    tick: u64,
    waiting: Vec<Waker>,
    /// The ticker sleeps until `start` is notified.
    idle: bool,
}

/// One request's wait for its answer, while its client is unwatched.
#[derive(Default)]
pub struct Wait {
    since: Option<u64>,
    queued_at: Option<u64>,
}

impl Default for Watch {
    fn default() -> Watch {
        Watch {
            state: Mutex::new(State {
                tick: 0,
                waiting: Vec::new(),
                idle: true,
            }),
            start: Notify::new(),
        }
    }
}

impl Watch {
    /// Whether `wait` has lasted at least `UNWATCHED`; if not, the calling task is woken at
    /// the next tick (and the ticker started if it was idle).
    pub fn lasted(&self, wait: &mut Wait, cx: &Context<'_>) -> bool {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let since = *wait.since.get_or_insert(s.tick);
        if s.tick >= since + 2 {
            return true;
        }
        if wait.queued_at != Some(s.tick) {
            s.waiting.push(cx.waker().clone());
            wait.queued_at = Some(s.tick);
            if s.idle {
                s.idle = false;
                self.start.notify_one();
            }
        }
        false
    }

    /// The ticker: sleeps while nothing waits, ticks every `UNWATCHED` while something does.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut due = Vec::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.start.notified() => {}
            }
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(UNWATCHED) => {}
                }
                {
                    let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                    s.tick += 1;
                    std::mem::swap(&mut s.waiting, &mut due);
                    s.idle = due.is_empty();
                }
                if due.is_empty() {
                    break;
                }
                due.drain(..).for_each(Waker::wake);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::sync::Arc;
    use std::task::Poll;

    /// A wait is reported as lasted only after two ticks, its task being woken by each; the
    /// ticker then goes idle, and starts again for the next wait.
    #[tokio::test]
    async fn a_wait_lasts_after_two_ticks_and_the_ticker_idles_between_waits() {
        let watch = Arc::new(Watch::default());
        let stop = CancellationToken::new();
        let ticker = tokio::spawn({
            let (watch, stop) = (watch.clone(), stop.clone());
            async move { watch.run(stop).await }
        });
        for _ in 0..2 {
            let mut wait = Wait::default();
            let mut polls = 0;
            poll_fn(|cx| {
                polls += 1;
                match watch.lasted(&mut wait, cx) {
                    true => Poll::Ready(()),
                    false => Poll::Pending,
                }
            })
            .await;
            assert_eq!(
                polls, 3,
                "polled at the start and woken by each of two ticks"
            );
            // Nothing waits now: the next tick finds no one and the ticker goes idle (within
            // one tick; this task yields to it meanwhile).
            while !watch.state.lock().unwrap().idle {
                tokio::task::yield_now().await;
            }
        }
        stop.cancel();
        ticker.await.unwrap();
    }
}
