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
    /// Wakes the filler: a sandbox was claimed or lost.
    wake: tokio::sync::Notify,
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

    /// Takes the oldest waiting sandbox of `runtime`, if any. The claim then either
    /// [`Pools::release`]s it (made it the user's, or removed it) or hands it back with
    /// [`Pools::give_back`]; until then it still counts towards the pool's size.
    pub fn take(&self, runtime: &str) -> Option<String> {
        let mut pools = self.lock();
        let pool = pools.get_mut(runtime)?;
        let id = pool.ready.pop_front()?;
        pool.claiming += 1;
        Some(id)
    }

    /// A taken sandbox left the pool: the filler replaces it.
    pub fn release(&self, runtime: &str) {
        if let Some(pool) = self.lock().get_mut(runtime) {
            pool.claiming = pool.claiming.saturating_sub(1);
        }
        self.wake.notify_one();
    }

    /// A taken sandbox the claim could not use: first in line again.
    pub fn give_back(&self, runtime: &str, id: String) {
        if let Some(pool) = self.lock().get_mut(runtime) {
            pool.claiming = pool.claiming.saturating_sub(1);
            pool.ready.push_front(id);
        }
    }

    /// Adds a started and checked sandbox to its runtime's pool.
    pub fn put(&self, runtime: &str, id: String) {
        self.lock()
            .entry(runtime.to_string())
            .or_default()
            .ready
            .push_back(id);
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

    /// How long the filler may sleep: until the earliest retry of a short pool (`None`: until
    /// woken).
    pub fn next_retry(&self) -> Option<Duration> {
        let now = Instant::now();
        self.lock()
            .values()
            .filter(|p| p.held() < p.target)
            .filter_map(|p| p.retry_at)
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
        assert_eq!(p.take("web").as_deref(), Some("a"));
        assert_eq!(p.begin_fill(), None, "a claim in progress still counts");
        p.give_back("web", "a".into());
        assert_eq!(p.begin_fill(), None);
        assert_eq!(
            p.take("web").as_deref(),
            Some("a"),
            "handed back first in line"
        );
        p.release("web");
        assert_eq!(p.begin_fill().as_deref(), Some("web"), "a claim makes room");
        assert!(p.forget("b"));
        assert!(!p.forget("b"));
        assert_eq!(p.take("web"), None);
        assert_eq!(p.take("none"), None);
    }

    #[test]
    fn a_failed_fill_backs_off() {
        let p = pools();
        assert_eq!(p.begin_fill().as_deref(), Some("web"));
        p.filled("web", false);
        let wait = p.next_retry().expect("a retry is due");
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
    }
}
