//! Warm pools: for each runtime with `warm = N` in its configuration, the ids of pre-started
//! sandboxes waiting for a create to claim them, how many are being started, and when a
//! runtime whose last start failed may be tried again. The manager fills and claims; this is
//! only the bookkeeping, behind one short-held lock (never across `.await`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The first wait after a failed fill; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// One runtime's pool.
#[derive(Debug, Default)]
struct Pool {
    target: usize,
    /// Started, checked and waiting, oldest first.
    ready: VecDeque<String>,
    /// Being started now.
    starting: usize,
    /// Taken by a create that has not yet made it its own (or handed it back).
    claiming: usize,
    /// After a failed fill: not before then, and the next wait.
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl Pool {
    /// Sandboxes that count towards the size: waiting, starting or being claimed.
    fn held(&self) -> usize {
        self.ready.len() + self.starting + self.claiming
    }
}

/// A pool's figures, for metrics and reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolReport {
    pub runtime: String,
    pub target: usize,
    pub ready: usize,
    pub starting: usize,
}

/// Every runtime's pool.
#[derive(Debug, Default)]
pub struct Pools {
    pools: Mutex<HashMap<String, Pool>>,
    /// Taken sandboxes found unfit (ended, not answering): the filler removes them, so that
    /// the create that found them need not wait for it.
    condemned: Mutex<Vec<String>>,
    /// Wakes the filler: a sandbox was claimed or lost.
    wake: tokio::sync::Notify,
}

/// A sandbox a claim took from its pool. Unless the claim settles it ([`Taken::release`]:
/// it is the user's now, or gone; [`Taken::condemn`]: it is unfit), it goes back to the front
/// of the pool when dropped: a create cancelled halfway (its client went away) neither loses
/// it nor leaves the pool a slot short.
#[must_use]
pub struct Taken<'p> {
    pools: &'p Pools,
    runtime: String,
    id: Option<String>,
}

impl Taken<'_> {
    pub fn id(&self) -> &str {
        self.id.as_deref().unwrap_or("")
    }

    pub fn runtime(&self) -> &str {
        &self.runtime
    }

    /// It left the pool (claimed, or removed): the filler replaces it.
    pub fn release(mut self) {
        self.id = None;
        self.pools.release(&self.runtime);
    }

    /// It is unfit: the filler removes it and starts another.
    pub fn condemn(mut self) {
        if let Some(id) = self.id.take() {
            self.pools
                .condemned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(id);
        }
        self.pools.release(&self.runtime);
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.pools.give_back(&self.runtime, id);
        }
    }
}

impl Pools {
    /// Pools of these sizes, by runtime (size 0: no pool).
    pub fn new(targets: &BTreeMap<String, usize>) -> Pools {
        let pools = targets
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(rt, n)| {
                let pool = Pool {
                    target: *n,
                    ..Pool::default()
                };
                (rt.clone(), pool)
            })
            .collect();
        Pools {
            pools: Mutex::new(pools),
            condemned: Mutex::default(),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pool>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `runtime` has a pool at all.
    pub fn has(&self, runtime: &str) -> bool {
        self.lock().contains_key(runtime)
    }

    /// Takes the oldest waiting sandbox of `runtime`, if any; until the claim settles it, it
    /// still counts towards the pool's size.
    pub fn take(&self, runtime: &str) -> Option<Taken<'_>> {
        let mut pools = self.lock();
        let pool = pools.get_mut(runtime)?;
        let id = pool.ready.pop_front()?;
        pool.claiming += 1;
        Some(Taken {
            pools: self,
            runtime: runtime.to_string(),
            id: Some(id),
        })
    }

    /// Takes a waiting sandbox of whichever pool has one (to free its port).
    pub fn take_any(&self) -> Option<Taken<'_>> {
        let runtime = self
            .lock()
            .iter()
            .find(|(_, p)| !p.ready.is_empty())
            .map(|(rt, _)| rt.clone())?;
        self.take(&runtime)
    }

    /// The sandboxes condemned since the last call, to remove.
    pub fn take_condemned(&self) -> Vec<String> {
        std::mem::take(&mut *self.condemned.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A taken sandbox left the pool: the filler replaces it.
    fn release(&self, runtime: &str) {
        if let Some(pool) = self.lock().get_mut(runtime) {
            pool.claiming = pool.claiming.saturating_sub(1);
        }
        self.wake.notify_one();
    }

    /// A taken sandbox the claim could not use: first in line again.
    fn give_back(&self, runtime: &str, id: String) {
        if let Some(pool) = self.lock().get_mut(runtime) {
            pool.claiming = pool.claiming.saturating_sub(1);
            pool.ready.push_front(id);
        }
    }

    /// Adds a started and checked sandbox to its runtime's pool (which exists: the filler and
    /// `has_room` only ever name configured ones).
    pub fn put(&self, runtime: &str, id: String) {
        if let Some(pool) = self.lock().get_mut(runtime) {
            pool.ready.push_back(id);
        }
    }

    /// Whether `runtime` has a pool with room for one more waiting sandbox.
    pub fn has_room(&self, runtime: &str) -> bool {
        self.lock()
            .get(runtime)
            .is_some_and(|p| p.held() < p.target)
    }

    /// Removes a sandbox that ended or was removed while waiting; true if it was waiting.
    pub fn forget(&self, id: &str) -> bool {
        let mut pools = self.lock();
        for pool in pools.values_mut() {
            if let Some(i) = pool.ready.iter().position(|r| r == id) {
                pool.ready.remove(i);
                self.wake.notify_one();
                return true;
            }
        }
        false
    }

    /// Every waiting sandbox, emptying the pools (shutdown).
    pub fn drain(&self) -> Vec<String> {
        let mut pools = self.lock();
        pools
            .values_mut()
            .flat_map(|p| std::mem::take(&mut p.ready))
            .collect()
    }

    /// A runtime whose pool is short of its size and not waiting out a failure, counted as
    /// starting one more; the caller reports the outcome with [`Pools::filled`].
    pub fn begin_fill(&self) -> Option<String> {
        let now = Instant::now();
        let mut pools = self.lock();
        let (runtime, pool) = pools
            .iter_mut()
            .filter(|(_, p)| p.held() < p.target)
            .find(|(_, p)| p.retry_at.is_none_or(|t| t <= now))?;
        pool.starting += 1;
        Some(runtime.clone())
    }

    /// How a fill [`Pools::begin_fill`] started ended: a failure makes the runtime wait
    /// (1 s, doubling up to a minute) before the next try.
    pub fn filled(&self, runtime: &str, ok: bool) {
        let mut pools = self.lock();
        let Some(pool) = pools.get_mut(runtime) else {
            return;
        };
        pool.starting = pool.starting.saturating_sub(1);
        if ok {
            pool.retry_at = None;
            pool.backoff = Duration::ZERO;
        } else {
            pool.backoff = (pool.backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
            pool.retry_at = Some(Instant::now() + pool.backoff);
        }
    }

    /// How long the filler may sleep: until the earliest retry still to come of a short pool
    /// (`None`: until woken; a retry already due is started, or waits for a start in flight
    /// to end, not for a timer).
    pub fn next_retry(&self) -> Option<Duration> {
        let now = Instant::now();
        self.lock()
            .values()
            .filter(|p| p.held() < p.target)
            .filter_map(|p| p.retry_at)
            .filter(|t| *t > now)
            .min()
            .map(|t| t.saturating_duration_since(now))
    }

    /// Resolves when a sandbox was claimed or lost since the last call.
    pub async fn changed(&self) {
        self.wake.notified().await;
    }

    /// Every pool's figures, by runtime name.
    pub fn report(&self) -> Vec<PoolReport> {
        let mut out: Vec<_> = self
            .lock()
            .iter()
            .map(|(rt, p)| PoolReport {
                runtime: rt.clone(),
                target: p.target,
                ready: p.ready.len(),
                starting: p.starting,
            })
            .collect();
        out.sort_by(|a, b| a.runtime.cmp(&b.runtime));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools() -> Pools {
        Pools::new(&BTreeMap::from([
            ("web".to_string(), 2),
            ("none".to_string(), 0),
        ]))
    }

    #[test]
    fn fills_to_the_target_and_hands_out_oldest_first() {
        let p = pools();
        assert!(p.has("web") && !p.has("none"));
        assert_eq!(p.begin_fill().as_deref(), Some("web"));
        assert_eq!(p.begin_fill().as_deref(), Some("web"));
        assert_eq!(p.begin_fill(), None, "two starting fill a pool of two");
        p.put("web", "a".into());
        p.filled("web", true);
        p.put("web", "b".into());
        p.filled("web", true);
        assert_eq!(p.begin_fill(), None);
        let a = p.take("web").unwrap();
        assert_eq!(a.id(), "a");
        assert_eq!(p.begin_fill(), None, "a claim in progress still counts");
        drop(a);
        assert_eq!(
            p.begin_fill(),
            None,
            "a claim dropped unsettled hands it back"
        );
        let a = p.take("web").unwrap();
        assert_eq!(a.id(), "a", "handed back first in line");
        a.release();
        assert_eq!(p.begin_fill().as_deref(), Some("web"), "a claim makes room");
        let b = p.take_any().unwrap();
        assert_eq!(b.id(), "b");
        b.condemn();
        assert_eq!(p.take_condemned(), vec!["b".to_string()]);
        assert_eq!(
            p.begin_fill().as_deref(),
            Some("web"),
            "a condemned one is replaced"
        );
        p.put("web", "c".into());
        assert!(p.forget("c"));
        assert!(!p.forget("c"));
        assert!(p.take("web").is_none());
        assert!(p.take("none").is_none());
    }

    #[test]
    fn a_failed_fill_backs_off() {
        let p = pools();
        assert_eq!(p.begin_fill().as_deref(), Some("web"));
        p.filled("web", false);
        let wait = p.next_retry().expect("a retry is to come");
        assert!(wait > Duration::from_millis(500) && wait <= FIRST_BACKOFF);
        assert_eq!(p.begin_fill(), None, "the runtime waits out the failure");
        let report = p.report();
        assert_eq!(
            report,
            vec![PoolReport {
                runtime: "web".into(),
                target: 2,
                ready: 0,
                starting: 0
            }]
        );
        assert_eq!(p.drain(), Vec::<String>::new());
        p.lock().get_mut("web").unwrap().retry_at = Some(Instant::now());
        assert_eq!(
            p.next_retry(),
            None,
            "a retry already due is no timer to sleep on"
        );
        assert_eq!(p.begin_fill().as_deref(), Some("web"), "and is started");
    }
}
