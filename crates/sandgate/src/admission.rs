//! Admission: what a request the policy let through holds while it is forwarded, taken once
//! in whichever lane forwards it, and the finish step that runs once when it ends.
//!
//! A forwarded request holds one slot of `MAX_CONCURRENT_REQUESTS` (one atomic counter, no
//! queue: over the cap is refused at once), one slot of its client address's share
//! (`max_requests_per_client`, so slow clients from one address cannot hold every slot) and
//! its sandbox's in-use mark (the idle reaper leaves it alone). Dropping the [`Admission`] is
//! the finish step: slots are returned, the per-loop finish counters count it and the request
//! is recorded in [`Metrics`] (method, status class, route, duration, upstream error).
//!
//! Every event loop takes and returns slots per request, so these counters are words both
//! loops write; a semaphore (a compare-and-swap, a mutex taken on every release and a
//! reference count) cost several times that in cache-line transfers between cores
//! (docs/benchmarks.md). The per-client share is a fixed table of counters indexed by a hash
//! of the address: no lock, no allocation per client, bounded memory whatever the traffic;
//! two addresses that share a counter share its cap (conservative, never more than the cap).

use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::access::{self, Io, Who};
use crate::breaker::Outcome;
use crate::error::Error;
use crate::metrics::{AuthResult, Finish, Method, Metrics, RouteLabel, Stream, UpstreamError};
use crate::routes::{Activity, InUse};

/// What the finish step needs to know of a request from its start: when its head was
/// complete, its method and route, how its credential fared, its client, and what the access
/// log names (its id, host, path, sandbox, port, subject).
#[derive(Clone)]
pub struct Started {
    pub at: Instant,
    pub method: Method,
    pub route: RouteLabel,
    pub auth: AuthResult,
    /// The client's address as the policy resolved it.
    pub client: IpAddr,
    pub who: Who,
}

impl Started {
    /// A request whose head was complete now, with a new request id.
    pub fn now(method: &str) -> Started {
        let who = Who {
            request_id: access::new_request_id(),
            ..Who::default()
        };
        Started {
            at: Instant::now(),
            method: Method::of(method),
            route: RouteLabel::Unmatched,
            auth: AuthResult::None,
            client: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            who,
        }
    }

    /// What the head says: the client's request id (kept if sane), its `traceparent` (the
    /// log names its trace), host and path (without the query).
    pub fn identify(
        &mut self,
        request_id: Option<&[u8]>,
        traceparent: Option<&[u8]>,
        host: Option<&str>,
        path: &str,
    ) {
        if let Some(id) = request_id.and_then(access::sane_request_id) {
            self.who.request_id = access::RequestId::new(id);
        }
        if let Some(trace) = traceparent.and_then(access::trace_id) {
            self.who.trace_id = access::Inline::new(trace);
        }
        self.who.host.set(host.unwrap_or(""));
        self.who.path.set(path);
    }

    /// The sandbox port a request goes to, and who it acts as.
    pub fn granted(&mut self, sandbox: &str, port: u16, subject: &Arc<str>) {
        self.who.sandbox.set(sandbox);
        self.who.port = port;
        self.who.subject = Some(subject.clone());
    }

    /// The request's id (`x-request-id`).
    pub fn request_id(&self) -> &str {
        self.who.request_id.as_str()
    }

    /// The request as the metrics record it, having ended as `end` after `elapsed`.
    fn finish(&self, end: &Ending, route: RouteLabel, elapsed: Duration) -> Finish {
        Finish {
            method: self.method,
            route,
            status: end.status,
            elapsed,
            auth: if end.auth == AuthResult::None {
                self.auth
            } else {
                end.auth
            },
            upstream_error: end.upstream,
        }
    }
}

/// How a request ended, for the finish step: its status (0: no response), and what the error
/// it was answered with says about the sandbox's side, the access log's flag and the
/// credential (a refusal overrides what the grant said).
#[derive(Debug, Clone, Copy)]
pub struct Ending {
    pub status: u16,
    upstream: Option<UpstreamError>,
    flag: &'static str,
    auth: AuthResult,
}

impl Ending {
    /// Answered with `status`, no error.
    pub fn status(status: u16) -> Ending {
        Ending {
            status,
            upstream: None,
            flag: "-",
            auth: AuthResult::None,
        }
    }

    /// Answered with the gateway's error `err`.
    pub fn error(err: &Error) -> Ending {
        Ending {
            status: err.status_and_code().0.as_u16(),
            upstream: err.upstream_error(),
            flag: err.flag(),
            auth: err.auth_result(),
        }
    }

    /// The access log's flag (`DC`: the client left before any response).
    fn flag(&self) -> &'static str {
        if self.status == 0 {
            "DC"
        } else {
            self.flag
        }
    }
}

/// Counters of the per-client share (a power of two).
const CLIENT_COUNTERS: usize = 4096;

/// How a finished request ended, for the finish counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Forwarded to a sandbox (whatever its status).
    Forwarded,
    /// Switched protocols (WebSocket) and spliced until either side closed.
    Upgraded,
    /// Answered by the gateway itself: the control API, a redirect or an error.
    Answered,
}

/// One event loop's finish counters, on a cache line of their own.
#[repr(align(128))]
#[derive(Default)]
struct LoopCounters {
    forwarded: AtomicU64,
    upgraded: AtomicU64,
    answered: AtomicU64,
}

/// Requests finished so far, by how they ended (sums over every event loop).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FinishedCounts {
    pub forwarded: u64,
    pub upgraded: u64,
    pub answered: u64,
}

pub struct Limits {
    in_flight: AtomicUsize,
    max: usize,
    per_client: Box<[AtomicUsize]>,
    per_client_max: usize,
    hasher: foldhash::fast::FixedState,
    finished: Box<[LoopCounters]>,
    metrics: Arc<Metrics>,
    /// Each finished request writes an access-log line.
    access_log: bool,
    circuit: CircuitRule,
}

/// When a sandbox port's circuit opens, and for how long (`failures` 0: never).
#[derive(Debug, Clone, Copy, Default)]
pub struct CircuitRule {
    pub failures: u32,
    pub open_ms: u64,
}

/// The breaker a forwarded request reports to when it ends.
#[derive(Debug, Clone, Copy)]
pub struct Circuit {
    pub generation: i64,
    pub port: u16,
    /// It is the half-open circuit's one trial.
    pub trial: bool,
}

impl Limits {
    /// `max` requests in flight, at most `per_client_max` of them from one client address;
    /// finish counters for `loops` event loops, recording into `metrics`.
    pub fn new(max: usize, per_client_max: usize, loops: usize, metrics: Arc<Metrics>) -> Limits {
        Limits {
            in_flight: AtomicUsize::new(0),
            max,
            per_client: (0..CLIENT_COUNTERS).map(|_| AtomicUsize::new(0)).collect(),
            per_client_max,
            hasher: foldhash::fast::FixedState::with_seed(rand::random()),
            finished: (0..loops.max(1)).map(|_| LoopCounters::default()).collect(),
            metrics,
            access_log: false,
            circuit: CircuitRule::default(),
        }
    }

    /// Opens a port's circuit after `rule.failures` failures in a row.
    pub fn with_circuit(mut self, rule: CircuitRule) -> Limits {
        self.circuit = rule;
        self
    }

    pub fn circuit(&self) -> CircuitRule {
        self.circuit
    }

    /// Writes an access-log line per finished request (`--access-log`).
    pub fn with_access_log(mut self, on: bool) -> Limits {
        self.access_log = on;
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Admits one request from `client` to the sandbox whose in-use mark is `in_use`, or
    /// refuses it: `Overloaded` at `MAX_CONCURRENT_REQUESTS`, `ClientOverloaded` at the
    /// client's share. `L` is `&Limits` where the request's lifetime is a scope (the fast
    /// lane), `Arc<Limits>` where it travels with a response body.
    pub fn admit<L, A>(
        this: L,
        client: IpAddr,
        in_use: InUse<A>,
        started: &Started,
        circuit: Option<Circuit>,
    ) -> Result<Admission<L, A>, Error>
    where
        L: Deref<Target = Limits>,
        A: Deref<Target = Activity>,
    {
        if !take(&this.in_flight, this.max) {
            return Err(Error::Overloaded);
        }
        let counter = this.counter(client);
        if !take(&this.per_client[counter], this.per_client_max) {
            this.in_flight.fetch_sub(1, Ordering::Release);
            return Err(Error::ClientOverloaded);
        }
        Ok(Admission {
            limits: this,
            counter: counter as u32,
            holds_slots: true,
            upgraded: false,
            answered: false,
            in_use,
            started: started.clone(),
            end: Ending::status(0),
            circuit,
            io: Io::default(),
        })
    }

    fn counter(&self, client: IpAddr) -> usize {
        let mut h = self.hasher.build_hasher();
        client.hash(&mut h);
        std::hash::Hasher::finish(&h) as usize & (CLIENT_COUNTERS - 1)
    }

    /// The finish step of a request the gateway answered itself (never admitted).
    pub fn answered(&self, started: &Started, end: Ending) {
        self.count(Finished::Answered);
        self.record(started, &end, started.route, None, Io::default());
    }

    /// The finish step of a control-API request answered with `status` by the route
    /// `template` (`None`: none matched).
    pub fn answered_api(&self, started: &Started, status: u16, template: Option<&str>) {
        self.count(Finished::Answered);
        let route = match template {
            Some(_) => RouteLabel::Api,
            None => RouteLabel::Unmatched,
        };
        self.record(
            started,
            &Ending::status(status),
            route,
            template,
            Io::default(),
        );
    }

    /// Records a finished request in the metrics and the access log, reading the clock once.
    /// `template`: the control API's route template, which names it instead of `route`.
    fn record(
        &self,
        started: &Started,
        end: &Ending,
        route: RouteLabel,
        template: Option<&str>,
        io: Io,
    ) {
        let ended = Instant::now();
        let elapsed = ended.saturating_duration_since(started.at);
        let f = started.finish(end, route, elapsed);
        match template {
            Some(t) => self.metrics.finish_api(&f, Some(t)),
            None => self.metrics.finish(&f),
        }
        self.log(
            started,
            end,
            template.unwrap_or(route.as_str()),
            "request",
            io,
            (ended, elapsed),
        );
    }

    /// The access-log line of a request or stream (if the log is on), which ended at `ended`
    /// after `duration` (one clock read for both).
    fn log(
        &self,
        started: &Started,
        end: &Ending,
        route: &str,
        kind: &'static str,
        io: Io,
        (ended, duration): (Instant, Duration),
    ) {
        if !self.access_log {
            return;
        }
        access::log(&access::Line {
            who: &started.who,
            ended,
            method: started.method.as_str(),
            route,
            client: started.client,
            status: end.status,
            duration,
            flag: end.flag(),
            kind,
            io,
        });
    }

    fn count(&self, how: Finished) {
        let i = crate::event_loop::current().min(self.finished.len() - 1);
        let c = &self.finished[i];
        let counter = match how {
            Finished::Forwarded => &c.forwarded,
            Finished::Upgraded => &c.upgraded,
            Finished::Answered => &c.answered,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests finished so far, over every loop.
    pub fn finished(&self) -> FinishedCounts {
        let mut sum = FinishedCounts::default();
        for c in self.finished.iter() {
            sum.forwarded += c.forwarded.load(Ordering::Relaxed);
            sum.upgraded += c.upgraded.load(Ordering::Relaxed);
            sum.answered += c.answered.load(Ordering::Relaxed);
        }
        sum
    }

    /// Forwarded requests in flight (responses still streaming included).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// Takes one of `max` slots of `counter`; never refuses while fewer than `max` are taken.
fn take(counter: &AtomicUsize, max: usize) -> bool {
    let mut n = counter.load(Ordering::Relaxed);
    loop {
        if n >= max {
            return false;
        }
        match counter.compare_exchange_weak(n, n + 1, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(now) => n = now,
        }
    }
}

/// One admitted request: its slots and its sandbox's in-use mark, returned when it is
/// dropped, which is its finish step.
pub struct Admission<L: Deref<Target = Limits>, A: Deref<Target = Activity> = Arc<Activity>> {
    limits: L,
    counter: u32,
    holds_slots: bool,
    upgraded: bool,
    /// Never forwarded after all (a sandbox that did not wake): finished as answered.
    answered: bool,
    in_use: InUse<A>,
    started: Started,
    /// How it ended (status 0 until a response is known).
    end: Ending,
    /// The port's breaker, told how the request ended.
    circuit: Option<Circuit>,
    /// A new connection's time and the response body bytes sent.
    io: Io,
}

/// An admission that can travel with a response body or an upgraded connection.
pub type OwnedAdmission = Admission<Arc<Limits>, Arc<Activity>>;

/// An admission of a request answered within the caller's scope (the fast lane).
pub type ScopedAdmission<'a> = Admission<&'a Limits, &'a Activity>;

impl<L: Deref<Target = Limits>, A: Deref<Target = Activity>> Admission<L, A> {
    /// The request switched protocols: its slots cover requests, not long-lived upgraded
    /// connections, so they are returned now; the in-use mark stays until the stream ends.
    /// The request is recorded now, as it switched (101), and its stream counted as open.
    pub fn upgraded(&mut self) {
        self.release_slots();
        self.upgraded = true;
        let elapsed = self.started.at.elapsed();
        let f = self
            .started
            .finish(&Ending::status(101), self.started.route, elapsed);
        self.limits.metrics.finish(&f);
        self.limits.metrics.stream_opened(Stream::Proxied);
    }

    /// The instance this request was sent to refused the connection (nothing was sent): its
    /// breaker learns of it, and the request counts against `in_use`'s instance and
    /// `circuit` from now on (the balancer's failover).
    pub fn rebind(&mut self, in_use: InUse<A>, circuit: Option<Circuit>) {
        if let Some(c) = self.circuit.take() {
            self.tell_breaker(c, Outcome::Failed);
        }
        self.in_use = in_use;
        self.circuit = circuit;
    }

    /// The sandbox answered with this status.
    pub fn respond(&mut self, status: u16) {
        self.end.status = status;
    }

    /// The request was answered by the gateway after all (its sandbox did not wake, or was
    /// not ready): its slots are returned and it finishes as answered with `err`.
    pub fn answered(mut self, err: &Error) {
        self.answered = true;
        self.end = Ending::error(err);
    }

    /// Forwarding failed with `err` (which the client is answered with): finished now.
    pub fn failed(mut self, err: &Error) {
        self.end = Ending::error(err);
    }

    /// A new connection to the sandbox was opened for this request in `d`.
    pub fn connected(&mut self, d: Duration) {
        self.io.connect = Some(d);
    }

    /// `n` more response body bytes went to the client.
    pub fn sent(&mut self, n: u64) {
        self.io.sent += n;
    }

    /// The client's request body came to `n` bytes (so far).
    pub fn received(&mut self, n: u64) {
        self.io.received = n;
    }

    /// What the finish step knows of the request from its start.
    pub fn started(&self) -> &Started {
        &self.started
    }

    /// The sandbox's activity (an upgraded stream touches it on traffic).
    pub fn activity(&self) -> &Activity {
        self.in_use.activity()
    }

    /// Tells the port's breaker how the request ended: a failed or timed-out connection
    /// counts against it, any answer from the sandbox resets it.
    fn report_to_breaker(&mut self) {
        let Some(c) = self.circuit.take() else {
            return;
        };
        use crate::metrics::UpstreamError as U;
        let outcome = match self.end.upstream {
            Some(U::Refused | U::Unreachable | U::Timeout) => Outcome::Failed,
            _ if self.answered => Outcome::Unknown,
            _ if self.upgraded || self.end.status != 0 => Outcome::Answered,
            _ => Outcome::Unknown,
        };
        self.tell_breaker(c, outcome);
    }

    /// Records `outcome` in the breaker `c` names (of the instance in use).
    fn tell_breaker(&self, c: Circuit, outcome: Outcome) {
        let rule = self.limits.circuit;
        let now = match outcome {
            Outcome::Answered => 0,
            _ => crate::routes::now_ms().max(0) as u64,
        };
        let changed = self.in_use.activity().breakers.record(
            c.generation,
            c.port,
            outcome,
            c.trial,
            rule.failures,
            now,
            rule.open_ms,
        );
        if let Some(t) = changed {
            self.limits.metrics.circuit(t);
        }
    }

    fn release_slots(&mut self) {
        if std::mem::take(&mut self.holds_slots) {
            self.limits.in_flight.fetch_sub(1, Ordering::Release);
            self.limits.per_client[self.counter as usize].fetch_sub(1, Ordering::Release);
        }
    }
}

impl<L: Deref<Target = Limits>, A: Deref<Target = Activity>> Drop for Admission<L, A> {
    fn drop(&mut self) {
        self.release_slots();
        self.report_to_breaker();
        self.limits.count(if self.answered {
            Finished::Answered
        } else if self.upgraded {
            Finished::Upgraded
        } else {
            Finished::Forwarded
        });
        if self.upgraded {
            self.limits.metrics.stream_closed(Stream::Proxied);
            let route = self.started.route.as_str();
            let end = Ending::status(101);
            let ended = Instant::now();
            let duration = ended.saturating_duration_since(self.started.at);
            self.limits.log(
                &self.started,
                &end,
                route,
                "stream",
                self.io,
                (ended, duration),
            );
        } else {
            let route = self.started.route;
            self.limits
                .record(&self.started, &self.end, route, None, self.io);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::Routes;

    fn get() -> Started {
        Started::now("GET")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn entry() -> (Routes, Arc<crate::routes::Entry>) {
        let routes = Routes::default();
        let sb = crate::model::Sandbox::for_tests("sb-abcdefghijklmnop");
        routes.put(sb);
        let e = routes.get("sb-abcdefghijklmnop").unwrap();
        (routes, e)
    }

    #[test]
    fn slots_are_taken_up_to_the_caps_and_returned_on_drop() {
        let (_routes, e) = entry();
        let limits = Arc::new(Limits::new(3, 2, 1, Arc::new(Metrics::new(1, true))));
        let a = Limits::admit(limits.clone(), ip("10.0.0.1"), e.in_use(), &get(), None).unwrap();
        let b = Limits::admit(&*limits, ip("10.0.0.1"), e.in_use_scoped(), &get(), None).unwrap();
        assert!(e.busy());
        // The client's share is used up; another client still gets the last slot.
        assert!(matches!(
            Limits::admit(&*limits, ip("10.0.0.1"), e.in_use_scoped(), &get(), None),
            Err(Error::ClientOverloaded)
        ));
        let c = Limits::admit(&*limits, ip("10.0.0.2"), e.in_use_scoped(), &get(), None).unwrap();
        assert!(matches!(
            Limits::admit(&*limits, ip("10.0.0.3"), e.in_use_scoped(), &get(), None),
            Err(Error::Overloaded)
        ));
        assert_eq!(limits.in_flight(), 3);
        drop((a, b, c));
        assert_eq!(limits.in_flight(), 0);
        assert!(!e.busy());
        assert_eq!(limits.finished().forwarded, 3);
        // Refusals returned every slot they took.
        let again: Vec<_> = (0..2)
            .map(|_| {
                Limits::admit(&*limits, ip("10.0.0.1"), e.in_use_scoped(), &get(), None).unwrap()
            })
            .collect();
        drop(again);
    }

    #[test]
    fn an_upgraded_stream_gives_back_its_slots_but_stays_in_use() {
        let (_routes, e) = entry();
        let limits = Arc::new(Limits::new(1, 1, 2, Arc::new(Metrics::new(2, true))));
        let mut a = Limits::admit(limits.clone(), ip("::1"), e.in_use(), &get(), None).unwrap();
        a.upgraded();
        assert_eq!(limits.in_flight(), 0);
        assert!(e.busy());
        let b = Limits::admit(&*limits, ip("::1"), e.in_use_scoped(), &get(), None).unwrap();
        drop(b);
        drop(a);
        assert!(!e.busy());
        let f = limits.finished();
        assert_eq!((f.forwarded, f.upgraded), (1, 1));
    }

    #[test]
    fn a_sandbox_connection_cap_refuses_without_counting() {
        let (_routes, e) = entry();
        let a = e.try_in_use(2).unwrap();
        let b = e.try_in_use_scoped(2).unwrap();
        assert!(e.try_in_use_scoped(2).is_none());
        assert!(e.try_in_use(2).is_none());
        drop(a);
        // The refusals took nothing: one place is free again, then none.
        let c = e.try_in_use_scoped(2).unwrap();
        assert!(e.try_in_use(2).is_none());
        drop((b, c));
        assert!(!e.busy());
        let limits = Limits::new(1, 1, 1, Arc::new(Metrics::new(1, true)));
        let d = Limits::admit(
            &limits,
            ip("10.0.0.1"),
            e.try_in_use_scoped(usize::MAX).unwrap(),
            &get(),
            None,
        );
        let d = d.unwrap();
        // An admitted request that ends up answered (its sandbox did not wake).
        d.answered(&Error::Starting("sb".into()));
        let f = limits.finished();
        assert_eq!((f.forwarded, f.answered, limits.in_flight()), (0, 1, 0));
        assert!(!e.busy());
        // Recorded with the status it was answered with.
        let m = limits.metrics();
        assert_eq!(m.requests("GET", 503, RouteLabel::Unmatched), 1);
    }

    /// Threads racing for the slots never take more than the cap, and never fewer while
    /// slots are free: with as many threads as slots, every one succeeds.
    #[test]
    fn racing_takers_get_exactly_the_free_slots() {
        let (_routes, e) = entry();
        let limits = Arc::new(Limits::new(8, 8, 1, Arc::new(Metrics::new(1, true))));
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let taken: Vec<_> = (0..8)
            .map(|_| {
                let (limits, barrier, e) = (limits.clone(), barrier.clone(), e.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    Limits::admit(limits, ip("127.0.0.1"), e.in_use(), &get(), None).ok()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert!(taken.iter().all(Option::is_some));
        assert_eq!(limits.in_flight(), 8);
        assert!(Limits::admit(&*limits, ip("127.0.0.2"), e.in_use_scoped(), &get(), None).is_err());
        drop(taken);
        assert_eq!(limits.in_flight(), 0);
    }
}
