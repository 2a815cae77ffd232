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
    /// The balancer's round-robin cursor (a sandbox's, over its instances).
    turn: AtomicUsize,
    /// Until when ([`now_ms`]) the balancer passes this instance over: it refused a
    /// connection just now (a passing health check ends it sooner).
    ejected_until_ms: AtomicI64,
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

/// A routed sandbox: its record plus its activity, and its extra instances (`replicas`).
#[derive(Debug)]
pub struct Entry {
    sandbox: Sandbox,
    activity: Arc<Activity>,
    /// Its instances besides itself (instance 0), in creation order; empty for one instance
    /// and for an instance's own entry.
    instances: Box<[Arc<Entry>]>,
}

impl Entry {
    /// Its instances besides itself, in creation order.
    pub fn instances(&self) -> &[Arc<Entry>] {
        &self.instances
    }

    /// Takes the balancer's next round-robin turn.
    pub fn next_turn(&self) -> usize {
        self.activity.turn.fetch_add(1, Ordering::Relaxed)
    }

    /// Passes this instance over until `until_ms` ([`now_ms`]), or its next passing check.
    pub fn eject(&self, until_ms: i64) {
        self.activity
            .ejected_until_ms
            .store(until_ms, Ordering::Relaxed);
    }

    /// Whether the balancer passes this instance over at `now_ms`.
    pub fn ejected(&self, now_ms: i64) -> bool {
        self.activity.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Requests in flight to this instance (what `least-connections` compares).
    pub fn in_flight(&self) -> usize {
        self.activity.in_flight.load(Ordering::Relaxed)
    }

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

    /// Milliseconds since the sandbox (any of its instances) was last used.
    pub fn idle_ms(&self) -> i64 {
        let last = self
            .instances
            .iter()
            .map(|i| i.activity.last_active_ms.load(Ordering::Relaxed))
            .fold(
                self.activity.last_active_ms.load(Ordering::Relaxed),
                i64::max,
            );
        now_ms() - last
    }

    /// Whether a request to the sandbox (any of its instances) is still being answered.
    pub fn busy(&self) -> bool {
        self.in_flight() > 0 || self.instances.iter().any(|i| i.in_flight() > 0)
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
        if ok {
            self.eject(0);
        }
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
    /// A new sandbox's (or instance's): used now, nothing in flight.
    fn new(id: &str) -> Arc<Activity> {
        Arc::new(Activity {
            last_active_ms: AtomicI64::new(now_ms()),
            in_flight: AtomicUsize::new(0),
            commands: AtomicUsize::new(0),
            sockets: AtomicUsize::new(0),
            terminals: AtomicUsize::new(0),
            key: id.into(),
            health: HealthState::default(),
            breakers: Default::default(),
            turn: AtomicUsize::new(0),
            ejected_until_ms: AtomicI64::new(0),
        })
    }

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
    /// Extra instances by their own id: never routed by it, only through their sandbox's
    /// entry (which holds them).
    replicas: foldhash::HashMap<String, Arc<Entry>>,
    /// Sandbox id → its extra instances' ids.
    replicas_of: HashMap<String, Vec<String>>,
}

impl Table {
    /// A sandbox's extra instances as its entry holds them: oldest first.
    fn instances_of(&self, id: &str) -> Box<[Arc<Entry>]> {
        let Some(ids) = self.replicas_of.get(id) else {
            return Box::default();
        };
        let mut v: Vec<_> = ids
            .iter()
            .filter_map(|r| self.replicas.get(r).cloned())
            .collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        v.into_boxed_slice()
    }

    /// Rebuilds sandbox `id`'s entry around its current instances.
    fn refresh(&mut self, id: &str) {
        let instances = self.instances_of(id);
        if let Some(e) = self.by_id.get_mut(id) {
            *e = Arc::new(Entry {
                sandbox: e.sandbox.clone(),
                activity: e.activity.clone(),
                instances,
            });
        }
    }
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

    /// Every sandbox's entry and every extra instance's (what health checks visit).
    pub fn all_instances(&self) -> Vec<Arc<Entry>> {
        let t = self.read();
        t.by_id
            .values()
            .chain(t.replicas.values())
            .cloned()
            .collect()
    }

    /// Inserts or replaces a sandbox's route (or an extra instance's, within its sandbox's
    /// entry), keeping its activity (a new one counts as used now).
    pub fn put(&self, sb: Sandbox) {
        let mut t = self.write();
        if let Some(of) = sb.replica_of.clone() {
            let activity = t
                .replicas
                .get(&sb.id)
                .map_or_else(|| Activity::new(&sb.id), |e| e.activity.clone());
            let ids = t.replicas_of.entry(of.clone()).or_default();
            if !ids.contains(&sb.id) {
                ids.push(sb.id.clone());
            }
            let entry = Entry {
                activity,
                sandbox: sb,
                instances: Box::default(),
            };
            t.replicas.insert(entry.id.clone(), Arc::new(entry));
            t.refresh(&of);
            return;
        }
        let activity = t
            .by_id
            .get(&sb.id)
            .map_or_else(|| Activity::new(&sb.id), |e| e.activity.clone());
        if let Some(name) = &sb.name {
            t.by_path
                .entry(sb.owner.clone())
                .or_default()
                .insert(name.clone(), sb.id.clone());
        }
        let entry = Entry {
            instances: t.instances_of(&sb.id),
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
        if let Some(r) = t.replicas.remove(id) {
            if let Some(of) = r.replica_of.as_deref() {
                if let Some(ids) = t.replicas_of.get_mut(of) {
                    ids.retain(|x| x != id);
                    if ids.is_empty() {
                        t.replicas_of.remove(of);
                    }
                }
                t.refresh(of);
            }
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> (Routes, Arc<Entry>) {
        let routes = Routes::default();
        routes.put(Sandbox::for_tests("sb-abcdefghijklmnop"));
        let e = routes.get("sb-abcdefghijklmnop").unwrap();
        (routes, e)
    }

    /// `rise` passes in a row make a port ready and `fall` failures in a row not ready; a
    /// run broken by the other result starts again, so a flapping port keeps its state.
    #[test]
    fn rise_and_fall_thresholds_decide_readiness() {
        let (_routes, e) = entry();
        let check = |ok| e.record_check(ok, 3, 3);
        assert_eq!(e.health(), Health::Unknown);
        assert_eq!(check(true), None);
        assert_eq!(check(true), None);
        assert_eq!(e.health(), Health::Unknown, "not ready after 2 passes");
        assert!(!e.ready(true));
        assert_eq!(check(true), Some(Health::Ready));
        assert!(e.ready(true));
        assert_eq!(check(true), None);
        // Two failures: still ready.
        assert_eq!(check(false), None);
        assert_eq!(check(false), None);
        assert_eq!(e.health(), Health::Ready, "ready through 2 failures");
        assert_eq!(e.health_report().streak, -2);
        // A pass in between starts the count again.
        assert_eq!(check(true), None);
        assert_eq!(check(false), None);
        assert_eq!(check(false), None);
        assert_eq!(e.health(), Health::Ready);
        assert_eq!(check(false), Some(Health::NotReady));
        assert!(!e.ready(true));
        assert_eq!(e.health_report().streak, -3);
        // Back: not ready until 3 passes in a row.
        assert_eq!(check(true), None);
        assert_eq!(check(true), None);
        assert_eq!(check(false), None);
        assert_eq!(check(true), None);
        assert_eq!(check(true), None);
        assert_eq!(e.health(), Health::NotReady);
        assert_eq!(check(true), Some(Health::Ready));
        // Without checks (`checks_run` false) a running sandbox is ready whatever they said.
        assert_eq!(check(false), None);
        assert_eq!(check(false), None);
        assert_eq!(check(false), Some(Health::NotReady));
        assert!(e.ready(false));
    }

    /// A new incarnation (generation) of the sandbox starts unknown, whatever the last said.
    #[test]
    fn a_restarted_sandbox_starts_unjudged() {
        let (routes, e) = entry();
        e.record_check(true, 1, 1);
        assert_eq!(e.health(), Health::Ready);
        let mut sb = Sandbox::for_tests("sb-abcdefghijklmnop");
        sb.generation = e.generation + 1;
        routes.put(sb);
        let e = routes.get("sb-abcdefghijklmnop").unwrap();
        assert_eq!(e.health(), Health::Unknown);
        assert_eq!(e.health_report().streak, 0);
        assert_eq!(e.record_check(false, 1, 2), None);
        assert_eq!(e.record_check(false, 1, 2), Some(Health::NotReady));
    }
}
