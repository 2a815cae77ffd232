//! The in-memory route table the proxy reads on every request: sandbox id (and `owner/name`)
//! to the current sandbox record and its last activity. Written through by the manager on
//! every change; lookups take a read lock for a hash probe and an `Arc` clone, and no lock is
//! ever held across `.await`.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Instant;

use crate::model::Sandbox;

/// How a sandbox is being used; shared by every version of its entry.
#[derive(Debug)]
pub struct Activity {
    /// Last use, in ms on the process's monotonic clock ([`now_ms`]).
    last_active_ms: AtomicI64,
    /// Proxied requests whose responses are still streaming.
    in_flight: AtomicUsize,
    /// Commands running, and command sockets open (`/ws`), for the sandbox object.
    commands: AtomicUsize,
    sockets: AtomicUsize,
    terminals: AtomicUsize,
    /// The sandbox id, shared: what per-sandbox tables (rate limits) are keyed by, so that a
    /// request hashes it without allocating.
    key: Arc<str>,
    /// Its dev-server port's health checks ([`Health`]).
    health: HealthState,
    /// Its ports' circuit breakers.
    pub breakers: crate::breaker::Breakers,
}

/// What the health checks say about a sandbox's dev-server port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Not checked since it (re)started.
    Unknown,
    /// The last `rise` checks passed.
    Ready,
    /// The last `fall` checks failed.
    NotReady,
}

/// Check results of one incarnation (generation) of a sandbox; a new one starts unknown.
#[derive(Debug, Default)]
struct HealthState {
    generation: AtomicI64,
    /// 0 unknown, 1 ready, 2 not ready.
    state: std::sync::atomic::AtomicU8,
    /// Consecutive passes (positive) or failures (negative).
    streak: std::sync::atomic::AtomicI32,
    /// When it was last checked ([`now_ms`]), 0 never.
    checked_ms: AtomicI64,
}

/// A sandbox's check state as `/health/sandboxes` reports it.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct HealthReport {
    pub state: Health,
    /// Consecutive passes (positive) or failures (negative).
    pub streak: i32,
    /// Milliseconds since the last check (`None`: never checked).
    pub checked_ms_ago: Option<i64>,
}

/// A routed sandbox: its record plus its activity.
#[derive(Debug)]
pub struct Entry {
    sandbox: Sandbox,
    activity: Arc<Activity>,
}

impl Entry {
    /// Whether its dev-server port is health-checked now: running, with a dev server.
    pub fn health_checked(&self) -> bool {
        self.sandbox.status == crate::model::Status::Running
            && self.sandbox.dev_server
            && self.sandbox.port.is_some()
    }

    /// Its ports' circuit breakers.
    pub fn breakers(&self) -> &crate::breaker::Breakers {
        &self.activity.breakers
    }

    /// Records use of the sandbox now (a proxied request, WebSocket traffic, API use).
    pub fn touch(&self) {
        self.activity.touch();
    }

    /// Milliseconds since the sandbox was last used.
    pub fn idle_ms(&self) -> i64 {
        now_ms() - self.activity.last_active_ms.load(Ordering::Relaxed)
    }

    /// Whether a request to the sandbox is still being answered.
    pub fn busy(&self) -> bool {
        self.activity.in_flight.load(Ordering::Relaxed) > 0
    }

    /// Counts a request as in flight until the returned guard drops (its response ended).
    pub fn in_use(&self) -> InUse {
        self.activity.begin();
        InUse(self.activity.clone())
    }

    /// `in_use` for a request answered within the caller's scope: no reference count taken
    /// (the guard writes only the sandbox's activity counters).
    pub fn in_use_scoped(&self) -> InUse<&Activity> {
        self.activity.begin();
        InUse(&self.activity)
    }

    /// `in_use`, unless `max` requests are in flight already (`max_connections_per_sandbox`).
    pub fn try_in_use(&self, max: usize) -> Option<InUse> {
        // Never build a guard that was not begun: dropping one ends a request.
        if !self.activity.try_begin(max) {
            return None;
        }
        Some(InUse(self.activity.clone()))
    }

    /// `in_use_scoped`, unless `max` requests are in flight already.
    pub fn try_in_use_scoped(&self, max: usize) -> Option<InUse<&Activity>> {
        if !self.activity.try_begin(max) {
            return None;
        }
        Some(InUse(&self.activity))
    }

    /// The sandbox id as the key of per-sandbox tables.
    pub fn key(&self) -> &Arc<str> {
        &self.activity.key
    }

    /// Counts a running command (`Use::Command`) or an open command socket (`Use::Socket`)
    /// until the guard drops.
    pub fn count(&self, kind: Use) -> Counted {
        self.activity.counter(kind).fetch_add(1, Ordering::Relaxed);
        Counted(self.activity.clone(), kind)
    }

    /// What the checks say about this incarnation's dev-server port.
    pub fn health(&self) -> Health {
        let h = &self.activity.health;
        if h.generation.load(Ordering::Relaxed) != self.sandbox.generation {
            return Health::Unknown;
        }
        match h.state.load(Ordering::Relaxed) {
            1 => Health::Ready,
            2 => Health::NotReady,
            _ => Health::Unknown,
        }
    }

    /// Whether the sandbox is ready, as the API says it: running, and for a dev server (when
    /// `checks_run`) its last checks passed.
    pub fn ready(&self, checks_run: bool) -> bool {
        let proxied = self.sandbox.dev_server && self.sandbox.port.is_some();
        self.sandbox.status == crate::model::Status::Running
            && (!proxied || !checks_run || self.health() == Health::Ready)
    }

    /// The check state for reports.
    pub fn health_report(&self) -> HealthReport {
        let h = &self.activity.health;
        let current = h.generation.load(Ordering::Relaxed) == self.sandbox.generation;
        let checked = h.checked_ms.load(Ordering::Relaxed);
        HealthReport {
            state: self.health(),
            streak: if current {
                h.streak.load(Ordering::Relaxed)
            } else {
                0
            },
            checked_ms_ago: (current && checked > 0).then(|| now_ms() - checked),
        }
    }

    /// Records one check of this incarnation's port (`ok`: it accepted a connection): after
    /// `rise` passes in a row it is ready, after `fall` failures not ready. Returns the new
    /// state when it changed.
    pub fn record_check(&self, ok: bool, rise: u32, fall: u32) -> Option<Health> {
        let h = &self.activity.health;
        let before = self.health();
        if h.generation
            .swap(self.sandbox.generation, Ordering::Relaxed)
            != self.sandbox.generation
        {
            h.streak.store(0, Ordering::Relaxed);
            h.state.store(0, Ordering::Relaxed);
        }
        h.checked_ms.store(now_ms(), Ordering::Relaxed);
        // A pass extends a run of passes (or starts one), a failure a run of failures.
        let next = |s: i32| {
            if ok {
                s.max(0).saturating_add(1)
            } else {
                s.min(0).saturating_sub(1)
            }
        };
        let streak = next(
            h.streak
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| Some(next(s)))
                .unwrap_or_else(|old| old),
        );
        if ok && streak >= rise.max(1) as i32 {
            h.state.store(1, Ordering::Relaxed);
        } else if !ok && -streak >= fall.max(1) as i32 {
            h.state.store(2, Ordering::Relaxed);
        }
        let after = self.health();
        (after != before).then_some(after)
    }

    /// Commands running, command sockets open, terminal sessions alive.
    pub fn connections(&self) -> (usize, usize, usize) {
        (
            self.activity.commands.load(Ordering::Relaxed),
            self.activity.sockets.load(Ordering::Relaxed),
            self.activity.terminals.load(Ordering::Relaxed),
        )
    }
}

/// What [`Entry::count`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Command,
    Socket,
    Terminal,
}

/// A counted command or socket; dropping it ends it.
#[derive(Debug)]
pub struct Counted(Arc<Activity>, Use);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.counter(self.1).fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl Activity {
    fn counter(&self, kind: Use) -> &AtomicUsize {
        match kind {
            Use::Command => &self.commands,
            Use::Socket => &self.sockets,
            Use::Terminal => &self.terminals,
        }
    }

    fn begin(&self) {
        self.touch();
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// `begin`, unless `max` are in flight (`usize::MAX`: no cap, as `begin`).
    fn try_begin(&self, max: usize) -> bool {
        if max == usize::MAX {
            self.begin();
            return true;
        }
        let taken = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if taken {
            self.touch();
        }
        taken
    }

    fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.touch();
    }

    /// Records use of the sandbox now.
    pub fn touch(&self) {
        self.last_active_ms.store(now_ms(), Ordering::Relaxed);
    }
}

/// A request in flight to a sandbox: it is not idle while any exists. `A` is `&Activity`
/// where the request's lifetime is a scope (the fast lane), `Arc<Activity>` where the guard
/// travels with a response body.
#[derive(Debug)]
pub struct InUse<A: Deref<Target = Activity> = Arc<Activity>>(A);

impl<A: Deref<Target = Activity>> InUse<A> {
    /// The sandbox's activity (traffic on an upgraded stream touches it).
    pub fn activity(&self) -> &Activity {
        &self.0
    }
}

impl<A: Deref<Target = Activity>> Drop for InUse<A> {
    fn drop(&mut self) {
        self.0.end();
    }
}

impl Deref for Entry {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.sandbox
    }
}

/// Milliseconds on the monotonic clock since this process first asked. Idle time is measured
/// on it, not on the wall clock, so a step of the wall clock (NTP, an operator) neither reaps
/// sandboxes in use nor keeps idle ones running for as long as the step.
/// Milliseconds on the process's monotonic clock.
pub fn now_ms() -> i64 {
    static START: LazyLock<Instant> = LazyLock::new(Instant::now);
    START.elapsed().as_millis() as i64
}

#[derive(Default)]
struct Table {
    /// Ids are the gateway's own random strings, so the fast non-cryptographic hasher is safe
    /// here (looked up on every proxied request); names below are chosen by users and keep
    /// the standard library's SipHash.
    by_id: foldhash::HashMap<String, Arc<Entry>>,
    /// owner → name → id (nested so lookups need no key allocation).
    by_path: HashMap<String, HashMap<String, String>>,
}

#[derive(Default)]
pub struct Routes {
    table: RwLock<Table>,
}

impl Routes {
    pub fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.read().by_id.get(id).cloned()
    }

    pub fn get_by_path(&self, owner: &str, name: &str) -> Option<Arc<Entry>> {
        let t = self.read();
        let id = t.by_path.get(owner)?.get(name)?;
        t.by_id.get(id).cloned()
    }

    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry, oldest sandbox first.
    pub fn all(&self) -> Vec<Arc<Entry>> {
        let mut v: Vec<_> = self.read().by_id.values().cloned().collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        v
    }

    /// Inserts or replaces a sandbox's route, keeping its activity (a new one counts as used
    /// now).
    pub fn put(&self, sb: Sandbox) {
        let mut t = self.write();
        let activity = t.by_id.get(&sb.id).map_or_else(
            || {
                Arc::new(Activity {
                    last_active_ms: AtomicI64::new(now_ms()),
                    in_flight: AtomicUsize::new(0),
                    commands: AtomicUsize::new(0),
                    sockets: AtomicUsize::new(0),
                    terminals: AtomicUsize::new(0),
                    key: sb.id.as_str().into(),
                    health: HealthState::default(),
                    breakers: Default::default(),
                })
            },
            |e| e.activity.clone(),
        );
        if let Some(name) = &sb.name {
            t.by_path
                .entry(sb.owner.clone())
                .or_default()
                .insert(name.clone(), sb.id.clone());
        }
        let entry = Entry {
            activity,
            sandbox: sb,
        };
        t.by_id.insert(entry.id.clone(), Arc::new(entry));
    }

    /// Marks a sandbox used now, if it is known.
    pub fn touch(&self, id: &str) {
        if let Some(e) = self.read().by_id.get(id) {
            e.touch();
        }
    }

    pub fn remove(&self, id: &str) {
        let mut t = self.write();
        if let Some(sb) = t.by_id.remove(id) {
            if let Some(name) = &sb.name {
                if let Some(names) = t.by_path.get_mut(&sb.owner) {
                    names.remove(name);
                    if names.is_empty() {
                        t.by_path.remove(&sb.owner);
                    }
                }
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }
}
