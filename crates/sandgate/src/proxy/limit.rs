//! The gateway-wide cap on proxied requests in flight (`MAX_CONCURRENT_REQUESTS`): one atomic
//! counter, no queue (a request over the cap is refused at once). Every event loop takes and
//! returns a slot per request, so the counter is the one shared word each request writes
//! twice; a semaphore (a compare-and-swap, a mutex taken on every release and a reference
//! count) cost several times that in cache-line transfers between cores (docs/benchmarks.md).

use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub struct Limit {
    in_flight: AtomicUsize,
    max: usize,
}

/// One request's slot, returned when dropped. `L` is `&Limit` where the request's lifetime is
/// a scope (the fast lane), `Arc<Limit>` where it travels with a response body.
pub struct Permit<L: Deref<Target = Limit>>(L);

impl Limit {
    pub fn new(max: usize) -> Limit {
        Limit {
            in_flight: AtomicUsize::new(0),
            max,
        }
    }

    /// A slot, or `None` at the cap. Never refuses while fewer than `max` are taken.
    pub fn try_take<L: Deref<Target = Limit>>(this: L) -> Option<Permit<L>> {
        let mut n = this.in_flight.load(Ordering::Relaxed);
        loop {
            if n >= this.max {
                return None;
            }
            match this.in_flight.compare_exchange_weak(
                n,
                n + 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(Permit(this)),
                Err(now) => n = now,
            }
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

impl<L: Deref<Target = Limit>> Drop for Permit<L> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Release);
    }
}

/// A permit that can travel with a response body.
pub type OwnedPermit = Permit<Arc<Limit>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_up_to_the_cap_and_returned_on_drop() {
        let limit = Arc::new(Limit::new(2));
        let a = Limit::try_take(limit.clone()).unwrap();
        let b = Limit::try_take(&*limit).unwrap();
        assert!(Limit::try_take(&*limit).is_none());
        assert_eq!(limit.in_flight(), 2);
        drop(b);
        let c = Limit::try_take(&*limit).unwrap();
        drop((a, c));
        assert_eq!(limit.in_flight(), 0);
        assert!(Limit::try_take(&*Arc::new(Limit::new(0))).is_none());
    }

    /// Threads racing for the slots never take more than the cap, and never fewer while
    /// slots are free: with as many threads as slots, every one succeeds.
    #[test]
    fn racing_takers_get_exactly_the_free_slots() {
        let limit = Arc::new(Limit::new(8));
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let taken: Vec<_> = (0..8)
            .map(|_| {
                let (limit, barrier) = (limit.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    Limit::try_take(limit)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert!(taken.iter().all(Option::is_some));
        assert_eq!(limit.in_flight(), 8);
        assert!(Limit::try_take(&*limit).is_none());
        drop(taken);
        assert_eq!(limit.in_flight(), 0);
    }
}
