//! Circuit breakers for sandbox ports: after `threshold` consecutive connection failures or
//! timeouts to a port, its circuit opens for `open_ms`, and requests to it are answered
//! `503 circuit_open` at once instead of piling up on `PROXY_TIMEOUT`; then one trial request
//! goes through (half-open): its success closes the circuit, its failure opens it again.
//!
//! Each sandbox has a few slots of two atomics (its ports with failures, keyed by port and
//! the sandbox's generation, so a restart starts closed). A request to a port without a slot
//! (the usual case) costs four relaxed loads to find none, and no clock read.

use std::sync::atomic::{AtomicU64, Ordering};

/// Ports per sandbox that can have a breaker at once; a fifth failing port goes without.
const SLOTS: usize = 4;

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;

/// `word`: state (2 bits) | failures in a row (14 bits) | since (48 bits, ms).
fn pack(state: u64, failures: u64, since_ms: u64) -> u64 {
    state | (failures.min(0x3fff) << 2) | (since_ms << 16)
}

fn state(word: u64) -> u64 {
    word & 3
}

fn failures(word: u64) -> u64 {
    (word >> 2) & 0x3fff
}

fn since(word: u64) -> u64 {
    word >> 16
}

/// A slot's key: the port and the sandbox's generation (0: free).
fn key(generation: i64, port: u16) -> u64 {
    ((generation as u64) << 16) | u64::from(port)
}

#[derive(Default, Debug)]
struct Slot {
    key: AtomicU64,
    word: AtomicU64,
}

/// The breakers of one sandbox's ports.
#[derive(Default, Debug)]
pub struct Breakers {
    slots: [Slot; SLOTS],
}

/// What a port's breaker says of a request about to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    Closed,
    /// Open for this many more milliseconds, or a trial under way that may take that long:
    /// a request sent now would be refused (the balancer passes the port over).
    Open(u64),
    /// Open time over (or a trial that outlived its time): the admission decides who tries.
    Expired,
}

/// How a forwarded request ended, for its port's breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The sandbox answered.
    Answered,
    /// The connection failed or no response came in time.
    Failed,
    /// Nothing can be told (the client left first).
    Unknown,
}

/// A breaker's state change, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened,
    HalfOpened,
    Closed,
}

impl Breakers {
    fn find(&self, generation: i64, port: u16) -> Option<&Slot> {
        let k = key(generation, port);
        self.slots
            .iter()
            .find(|s| s.key.load(Ordering::Relaxed) == k)
    }

    /// What the breaker of `port` says now, without changing it (the policy's check).
    pub fn peek(&self, generation: i64, port: u16, now_ms: u64, open_ms: u64) -> Peek {
        let Some(slot) = self.find(generation, port) else {
            return Peek::Closed;
        };
        let w = slot.word.load(Ordering::Acquire);
        match state(w) {
            OPEN => match (since(w) + open_ms).checked_sub(now_ms) {
                Some(left) if left > 0 => Peek::Open(left),
                _ => Peek::Expired,
            },
            HALF_OPEN => match (since(w) + open_ms).checked_sub(now_ms) {
                Some(left) if left > 0 => Peek::Open(left),
                _ => Peek::Expired,
            },
            _ => Peek::Closed,
        }
    }

    /// Admits a request to `port`: `Ok(false)` through a closed circuit, `Ok(true)` as the
    /// one trial of a half-open one, `Err(ms left)` while open (or another trial is under
    /// way: then `open_ms`, the time a trial may take at most before a new one goes). A
    /// trial is the circuit turning half-open.
    pub fn admit(
        &self,
        generation: i64,
        port: u16,
        now_ms: u64,
        open_ms: u64,
    ) -> Result<bool, u64> {
        let Some(slot) = self.find(generation, port) else {
            return Ok(false);
        };
        let mut w = slot.word.load(Ordering::Acquire);
        loop {
            let next = match state(w) {
                OPEN if since(w) + open_ms > now_ms => return Err(since(w) + open_ms - now_ms),
                // Open time over, or a trial that never reported (its time is up too): this
                // request is the trial.
                OPEN => pack(HALF_OPEN, failures(w), now_ms),
                HALF_OPEN if since(w) + open_ms > now_ms => return Err(open_ms),
                HALF_OPEN => pack(HALF_OPEN, failures(w), now_ms),
                _ => return Ok(false),
            };
            match slot
                .word
                .compare_exchange_weak(w, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(true),
                Err(now) => w = now,
            }
        }
    }

    /// Records how a request to `port` ended (`trial`: it was the half-open trial); returns
    /// the state change it made, if any. `threshold` failures in a row open the circuit.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        generation: i64,
        port: u16,
        outcome: Outcome,
        trial: bool,
        threshold: u32,
        now_ms: u64,
        open_ms: u64,
    ) -> Option<Transition> {
        match outcome {
            Outcome::Answered => {
                let slot = self.find(generation, port)?;
                let w = slot.word.load(Ordering::Acquire);
                if w == pack(CLOSED, 0, 0) || (state(w) != CLOSED && !trial) {
                    // Nothing to reset; or an answer that raced an opening (only the trial
                    // closes an open circuit).
                    return None;
                }
                slot.word.store(pack(CLOSED, 0, 0), Ordering::Release);
                (state(w) != CLOSED).then_some(Transition::Closed)
            }
            Outcome::Unknown if trial => {
                // The trial told nothing: open again, already expired, so the next request is
                // the trial.
                let slot = self.find(generation, port)?;
                let w = slot.word.load(Ordering::Acquire);
                let expired = now_ms.saturating_sub(open_ms);
                slot.word
                    .store(pack(OPEN, failures(w), expired), Ordering::Release);
                None
            }
            Outcome::Unknown => None,
            Outcome::Failed => {
                let slot = self
                    .find(generation, port)
                    .or_else(|| self.claim(generation, port))?;
                let mut w = slot.word.load(Ordering::Acquire);
                loop {
                    let n = failures(w) + 1;
                    let (next, change) = match state(w) {
                        HALF_OPEN if trial => (pack(OPEN, n, now_ms), Some(Transition::Opened)),
                        CLOSED if n >= u64::from(threshold.max(1)) => {
                            (pack(OPEN, n, now_ms), Some(Transition::Opened))
                        }
                        CLOSED => (pack(CLOSED, n, 0), None),
                        // Open already (a request admitted before it opened): counted.
                        s => (pack(s, n, since(w)), None),
                    };
                    match slot.word.compare_exchange_weak(
                        w,
                        next,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => return change,
                        Err(now) => w = now,
                    }
                }
            }
        }
    }

    /// A slot for `port`: a free one, or one of an older generation.
    fn claim(&self, generation: i64, port: u16) -> Option<&Slot> {
        let k = key(generation, port);
        for slot in &self.slots {
            let old = slot.key.load(Ordering::Relaxed);
            let stale = old != 0 && (old >> 16) != (generation as u64);
            if (old == 0 || stale)
                && slot
                    .key
                    .compare_exchange(old, k, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                slot.word.store(pack(CLOSED, 0, 0), Ordering::Release);
                return Some(slot);
            }
            if slot.key.load(Ordering::Relaxed) == k {
                return Some(slot);
            }
        }
        None
    }

    /// Ports of this generation whose circuit is open or half-open now.
    pub fn open_count(&self, generation: i64) -> usize {
        self.slots
            .iter()
            .filter(|s| {
                let k = s.key.load(Ordering::Relaxed);
                k != 0
                    && (k >> 16) == generation as u64
                    && state(s.word.load(Ordering::Relaxed)) != CLOSED
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_MS: u64 = 1000;

    fn fail(b: &Breakers, trial: bool, now: u64) -> Option<Transition> {
        b.record(1, 3000, Outcome::Failed, trial, 3, now, OPEN_MS)
    }

    #[test]
    fn failures_in_a_row_open_the_circuit_and_a_trial_closes_it() {
        let b = Breakers::default();
        assert_eq!(b.peek(1, 3000, 10, OPEN_MS), Peek::Closed);
        assert_eq!(fail(&b, false, 10), None);
        assert_eq!(fail(&b, false, 11), None);
        // An answer in between starts the count again.
        b.record(1, 3000, Outcome::Answered, false, 3, 12, OPEN_MS);
        assert_eq!(fail(&b, false, 13), None);
        assert_eq!(fail(&b, false, 14), None);
        assert_eq!(fail(&b, false, 15), Some(Transition::Opened));
        assert_eq!(b.peek(1, 3000, 500, OPEN_MS), Peek::Open(515));
        assert_eq!(b.admit(1, 3000, 500, OPEN_MS), Err(515));
        assert_eq!(b.open_count(1), 1);
        // Other ports and other generations are not affected.
        assert_eq!(b.peek(1, 3001, 500, OPEN_MS), Peek::Closed);
        assert_eq!(b.admit(2, 3000, 500, OPEN_MS), Ok(false));
        // Open time over: one trial, the others wait.
        assert_eq!(b.peek(1, 3000, 1015, OPEN_MS), Peek::Expired);
        assert_eq!(b.admit(1, 3000, 1015, OPEN_MS), Ok(true));
        assert!(b.admit(1, 3000, 1016, OPEN_MS).is_err());
        // While the trial is under way the port is open to everyone else (the balancer
        // sends other requests elsewhere), until the trial's time is up.
        assert_eq!(b.peek(1, 3000, 1016, OPEN_MS), Peek::Open(999));
        assert_eq!(b.peek(1, 3000, 2015, OPEN_MS), Peek::Expired);
        // The trial fails: open again from now.
        assert_eq!(fail(&b, true, 1100), Some(Transition::Opened));
        assert_eq!(b.peek(1, 3000, 1200, OPEN_MS), Peek::Open(900));
        // The next trial succeeds: closed.
        assert_eq!(b.admit(1, 3000, 2100, OPEN_MS), Ok(true));
        assert_eq!(
            b.record(1, 3000, Outcome::Answered, true, 3, 2101, OPEN_MS),
            Some(Transition::Closed)
        );
        assert_eq!(b.peek(1, 3000, 2102, OPEN_MS), Peek::Closed);
        assert_eq!(b.admit(1, 3000, 2102, OPEN_MS), Ok(false));
        assert_eq!(b.open_count(1), 0);
    }

    #[test]
    fn a_trial_that_tells_nothing_lets_the_next_request_try() {
        let b = Breakers::default();
        for t in 0..3 {
            fail(&b, false, t);
        }
        assert_eq!(b.admit(1, 3000, 5000, OPEN_MS), Ok(true));
        b.record(1, 3000, Outcome::Unknown, true, 3, 5001, OPEN_MS);
        assert_eq!(b.admit(1, 3000, 5002, OPEN_MS), Ok(true));
        // A trial that never reports is replaced once its time is up.
        assert!(b.admit(1, 3000, 5003, OPEN_MS).is_err());
        assert_eq!(b.admit(1, 3000, 6003, OPEN_MS), Ok(true));
    }

    #[test]
    fn a_new_generation_takes_over_a_slot() {
        let b = Breakers::default();
        for port in [1, 2, 3, 4] {
            for t in 0..3 {
                b.record(1, port, Outcome::Failed, false, 3, t, OPEN_MS);
            }
        }
        assert_eq!(b.open_count(1), 4);
        // A fifth port has no slot: never refused.
        for t in 0..5 {
            b.record(1, 5, Outcome::Failed, false, 3, t, OPEN_MS);
        }
        assert_eq!(b.peek(1, 5, 10, OPEN_MS), Peek::Closed);
        // After a restart (generation 2) the old slots are reused, closed.
        b.record(2, 1, Outcome::Failed, false, 3, 20, OPEN_MS);
        assert_eq!(b.peek(2, 1, 21, OPEN_MS), Peek::Closed);
        assert_eq!(b.open_count(2), 0);
    }
}
