//! The request policy: the one place where a request's fate is decided, for both proxy lanes.
//!
//! Three steps, after DESIGN.md §8 (pingora's phases, sozu's one router for H1 and H2):
//! - **check** ([`Policy::check`]): a pure, synchronous function of the request head (method,
//!   host, path, query, peer address, and the [`Facts`] one pass over its fields yields) that
//!   says what happens to it: forward to a sandbox port, hand to the control API, answer with
//!   a redirect, or refuse with an error. It touches no admission counter (its one write is
//!   the balancer's round-robin turn, for a sandbox with replicas), so a lane that hands a
//!   request to the other may ask again and get the same answer (an instance may differ).
//! - **admit** ([`Policy::admit`]): exactly once, in the lane that forwards the request: the
//!   sandbox's in-use mark (within its connection cap), the rate-limit tokens of the
//!   credential and the sandbox ([`crate::rates`]), the concurrency slot and the client
//!   address's share; for the control API, the credential's token ([`Policy::admit_api`]).
//!   A stopped sandbox is woken ([`Policy::wake`]) only once the request is admitted.
//! - **finish**: dropping the [`Admission`] when the response or upgraded stream ends (or
//!   [`Policy::answered`] for what the gateway answers itself): where metrics and the access
//!   log hook.

pub mod head;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use crate::addresses::Addresses;
use crate::admission::{
    Admission, Circuit, Ending, Limits, OwnedAdmission, ScopedAdmission, Started,
};
use crate::audit::{Actor, Audit};
use crate::auth::{permissions, preview, Auth, Authenticated, Principal, Via};
use crate::backend::{Backend, Upstream};
use crate::breaker::{Peek, Transition};
use crate::error::Error;
use crate::manager::Manager;
use crate::metrics::{AuthResult, Operation, RouteLabel};
use crate::model::{Mode, Sandbox, Status};
use crate::proxy::Target;
use crate::rates::{self, Rates};
use crate::routes::{Activity, Entry, Routes};
use crate::routing::{self, Route};
pub use head::{facts, Facts, Fields, Framing};

/// A request head as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    pub method: &'a str,
    /// The authority of an absolute-form target (`GET http://host/path`), which wins over the
    /// `Host` field (RFC 9112 §3.2.2); `:authority` for HTTP/2.
    pub authority: Option<&'a str>,
    /// The first `Host` field.
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub peer: IpAddr,
    /// The client's address: the peer's, or, from a trusted proxy, the one its
    /// `X-Forwarded-For` names ([`Policy::client`]). What allowlists and throttles judge.
    pub client: IpAddr,
    pub facts: &'a Facts<'a>,
}

/// What happens to a request.
pub enum Decision {
    /// Forward it to a sandbox port.
    Proxy(Grant),
    /// Hand it to the control API, acting as this principal (`None`: a route that needs no
    /// credential).
    Api(Option<Principal>),
    /// Answer with a redirect to this location (`/sandbox/{id}` → `/sandbox/{id}/`).
    Redirect(String),
    /// A preview URL: answer 303 to `location` (the URL without its token), setting `cookie`.
    Preview { location: String, cookie: String },
    /// Refuse it with this error.
    Deny(Error),
}

/// A request the policy lets through to a sandbox.
pub struct Grant {
    pub target: Target,
    /// Where to connect; `None` while the sandbox is stopped and must be woken first, or
    /// its server failed its health checks (`unready`).
    pub upstream: Option<Upstream>,
    /// The sandbox runs but its health checks fail: the request waits briefly for its port
    /// ([`Policy::await_ready`]) instead of being sent to a server that is down.
    pub unready: bool,
    /// The request asks for a protocol switch the gateway splices (`upgrade_protocols`).
    pub upgrade: bool,
    /// The client prefers HTML error pages.
    pub html: bool,
    /// Who the request acts as (what rate limits and the access log name).
    pub principal: Principal,
}

impl Grant {
    /// The sandbox is stopped (and persistent): it is started before the request goes on.
    pub fn needs_wake(&self) -> bool {
        self.upstream.is_none() && !self.unready
    }
}

pub struct Policy {
    auth: Arc<Auth>,
    audit: Arc<Audit>,
    routes: Arc<Routes>,
    manager: Arc<Manager>,
    backend: Arc<dyn Backend>,
    limits: Arc<Limits>,
    rates: Arc<Rates>,
    addresses: Addresses,
    domain: String,
    /// Cookies the gateway sets are `Secure` (it is reached over HTTPS).
    secure_cookies: bool,
    upgrade_protocols: Vec<String>,
    wake_timeout: Duration,
    health_rise: u32,
    health_fall: u32,
    strategy: crate::config::Strategy,
}

/// How long the balancer passes over an instance that refused a connection (unless a health
/// check passes first): after Envoy's outlier detection, ejected at once on a refusal rather
/// than after `fall` failed checks.
const EJECT_MS: i64 = 3_000;

impl Policy {
    pub fn new(
        auth: Arc<Auth>,
        audit: Arc<Audit>,
        routes: Arc<Routes>,
        manager: Arc<Manager>,
        limits: Arc<Limits>,
        rates: Arc<Rates>,
        config: &crate::config::Config,
    ) -> Policy {
        Policy {
            auth,
            audit,
            routes,
            backend: manager.backend().clone(),
            manager,
            limits,
            rates,
            addresses: Addresses::new(config),
            domain: config.domain.clone(),
            secure_cookies: config.tls.is_some()
                || config
                    .public_url
                    .as_deref()
                    .is_some_and(|u| u.starts_with("https://")),
            upgrade_protocols: config.upgrade_protocols.clone(),
            wake_timeout: config.wake_timeout,
            health_rise: config.health_rise,
            health_fall: config.health_fall,
            strategy: config.load_balancer_strategy,
        }
    }

    pub fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    /// The client's address for a request from `peer` with these facts (see
    /// [`Head::client`]); both lanes resolve it once per request, before `check`.
    pub fn client(&self, peer: IpAddr, facts: &Facts<'_>) -> IpAddr {
        self.addresses.client(peer, &facts.forwarded_for)
    }

    /// Decides what happens to a request, and names the route it matched (for metrics).
    /// Pure: no counter, no I/O.
    pub fn check(&self, head: &Head<'_>) -> (Decision, RouteLabel) {
        let mut route = RouteLabel::Unmatched;
        let decision = self.decide(head, &mut route);
        (decision, route)
    }

    fn decide(&self, head: &Head<'_>, label: &mut RouteLabel) -> Decision {
        if let Some(why) = head.facts.ambiguous {
            return Decision::Deny(Error::BadFraming(why));
        }
        if head.facts.hosts > 1 {
            return Decision::Deny(Error::BadFraming("more than one Host field"));
        }
        // An address not allowed learns nothing else (only a head whose framing cannot be
        // trusted is refused before, and its connection closed, whoever sent it).
        if let Err(e) = self.addresses.allows(head.client) {
            return Decision::Deny(e);
        }
        if head.method == "CONNECT" {
            return Decision::Deny(Error::MethodNotAllowed);
        }
        let host = head.authority.or(head.host);
        let route = match routing::classify(host, head.path, &self.domain) {
            Ok(r) => r,
            Err(e) => return Decision::Deny(e),
        };
        *label = match route {
            Route::Api => RouteLabel::Api,
            Route::Host { .. } => RouteLabel::Host,
            Route::Id { .. } => RouteLabel::Id,
            Route::Path { .. } => RouteLabel::Path,
            Route::AddSlash { id_route: true, .. } => RouteLabel::IdRedirect,
            Route::AddSlash { .. } => RouteLabel::PathRedirect,
        };
        let routes = &self.routes;
        let by_path = matches!(route, Route::Path { .. });
        let (found, port, prefix) = match route {
            Route::Api => return self.api(head),
            Route::Host { id, port } => (routes.get(id).ok_or(id), Some(port), None),
            Route::Id { id, prefix } => (routes.get(id).ok_or(id), None, Some(prefix)),
            Route::Path {
                owner,
                name,
                prefix,
            } => match routes.get_by_path(owner, name) {
                Some(sb) => (Ok(sb), None, Some(prefix)),
                None => {
                    *label = RouteLabel::Api;
                    return self.api(head);
                }
            },
            Route::AddSlash { id_route, path } => {
                if !id_route {
                    let mut segs = path[1..].splitn(2, '/');
                    let (owner, name) = (segs.next().unwrap_or(""), segs.next().unwrap_or(""));
                    if routes.get_by_path(owner, name).is_none() {
                        *label = RouteLabel::Api;
                        return self.api(head);
                    }
                }
                let query = head.query.map(|q| format!("?{q}")).unwrap_or_default();
                return Decision::Redirect(format!("{path}/{query}"));
            }
        };
        let wanted = port.or_else(|| found.as_ref().ok().and_then(|sb| sb.port));
        // A preview URL: the token is exchanged for a cookie, and the browser sent on to the
        // same URL without it.
        if let (Ok(sb), Some(token)) = (&found, head.query.and_then(preview::query_token)) {
            if self.auth.enabled() && !wanted.is_some_and(|p| sb.is_public(p)) {
                return self.exchange_preview(head, sb, token, wanted, prefix);
            }
        }
        // Credentials before existence: without one, a client learns nothing (401 whether or
        // not the sandbox exists); with one, another team's sandbox is "not found". A public
        // port needs none; a preview cookie opens only its own sandbox (and port).
        let who = match &found {
            Ok(sb) if wanted.is_some_and(|p| sb.is_public(p)) => Authenticated {
                principal: Principal::for_sandbox(&sb.team, Via::Public),
                consumed_authorization: false,
            },
            _ => match self.credentials(head) {
                Ok(Some(who)) => who,
                Ok(None) => match found
                    .as_ref()
                    .ok()
                    .and_then(|sb| self.preview_cookie(head, sb, wanted))
                {
                    Some(who) => match self.addresses.team_allows(&who.principal.team, head.client)
                    {
                        Ok(()) => who,
                        Err(e) => return Decision::Deny(e),
                    },
                    None => return Decision::Deny(Error::Unauthenticated),
                },
                Err(e) => return Decision::Deny(e),
            },
        };
        let sandbox = match found {
            Ok(sb) if who.principal.sees(&sb.team) => sb,
            Ok(sb) => return Decision::Deny(Error::SandboxNotFound(sb.id.clone())),
            Err(id) => return Decision::Deny(Error::SandboxNotFound(id.to_string())),
        };
        if let Err(e) = who.principal.require(permissions::proxy(
            head.method,
            head.facts.upgrade.is_some(),
        )) {
            return Decision::Deny(e);
        }
        let port = match port.or(sandbox.port) {
            Some(p) => p,
            // Seed 003: a sandbox with no server of its own has `/execute` answered by the
            // gateway (one with a dev server receives it like any other path).
            None if by_path
                && head.method == "POST"
                && prefix.is_some_and(|p| &head.path[p.len()..] == "/execute") =>
            {
                *label = RouteLabel::Api;
                return Decision::Api(Some(who.principal));
            }
            None => return Decision::Deny(port_not_exposed(&sandbox, 0)),
        };
        // A sandbox with replicas: the balancer's choice among its usable instances; with
        // none usable, as for one instance (waits for its own, wakes it, or says why not).
        if !sandbox.instances().is_empty() {
            let now = crate::routes::now_ms();
            let picked = crate::balance::pick(self.strategy, &sandbox, head.client, |e| {
                self.usable(e, port, now)
            });
            if let Some((instance, upstream)) = picked {
                let upstream = Some(upstream);
                return self.grant(head, sandbox, instance, port, prefix, who, upstream, false);
            }
        }
        let mut unready = false;
        let upstream = match sandbox.status {
            Status::Running => match self.backend.upstream(&sandbox, port) {
                // Its dev server failed its checks: only that port waits (others may serve).
                Some(_)
                    if Some(port) == sandbox.port
                        && sandbox.health() == crate::routes::Health::NotReady =>
                {
                    unready = true;
                    None
                }
                Some(u) => {
                    if let Some(e) = self.circuit_open(&sandbox, port) {
                        return Decision::Deny(e);
                    }
                    Some(u)
                }
                None => return Decision::Deny(port_not_exposed(&sandbox, port)),
            },
            Status::Stopped if sandbox.mode == Mode::Persistent => None,
            // Not ready yet (a Kubernetes Sandbox whose `Ready` condition is false): retry.
            Status::Creating => return Decision::Deny(Error::NotReady(sandbox.id.clone())),
            status => {
                // A failed start says why (a browser shows it instead of a bare status).
                let status = match (&sandbox.status_reason, status) {
                    (Some(why), Status::Failed | Status::Stopped) => format!("{status}: {why}"),
                    _ => status.to_string(),
                };
                return Decision::Deny(Error::NotRunning {
                    id: sandbox.id.clone(),
                    status,
                });
            }
        };
        self.grant(head, sandbox, 0, port, prefix, who, upstream, unready)
    }

    /// The grant of a request to instance `instance` of `sandbox` (`unready`: see
    /// [`Grant::unready`]).
    #[allow(clippy::too_many_arguments)]
    fn grant(
        &self,
        head: &Head<'_>,
        sandbox: Arc<Entry>,
        instance: usize,
        port: u16,
        prefix: Option<&str>,
        who: Authenticated,
        upstream: Option<Upstream>,
        unready: bool,
    ) -> Decision {
        let upgrade = head.facts.upgrade.is_some_and(|p| {
            self.upgrade_protocols
                .iter()
                .any(|allowed| p.eq_ignore_ascii_case(allowed.as_bytes()))
        });
        Decision::Proxy(Grant {
            target: Target {
                sandbox,
                instance,
                port,
                prefix: prefix.and_then(prefix_header),
                strip_authorization: who.consumed_authorization,
            },
            upstream,
            unready,
            upgrade,
            html: head.facts.html,
            principal: who.principal,
        })
    }

    /// Where to reach `port` of one instance, if the balancer may send it a request now: it
    /// runs, did not just refuse a connection, its dev server (for that port) is not failing
    /// its checks, and the port's circuit is not open.
    fn usable(&self, e: &Entry, port: u16, now: i64) -> Option<Upstream> {
        if e.status != Status::Running || e.ejected(now) {
            return None;
        }
        if Some(port) == e.port && e.health() == crate::routes::Health::NotReady {
            return None;
        }
        let rule = self.limits.circuit();
        if rule.failures > 0 {
            let at = now.max(0) as u64;
            if let Peek::Open(_) = e.breakers().peek(e.generation, port, at, rule.open_ms) {
                return None;
            }
        }
        self.backend.upstream(e, port)
    }

    /// The instance `target` was sent to refused the connection: it is passed over for a
    /// while ([`EJECT_MS`], or until a check passes), and another usable instance of the
    /// sandbox chosen; `None` if there is none (the caller answers with the refusal).
    fn next_instance(
        &self,
        target: &Target,
        refused: usize,
        client: IpAddr,
    ) -> Option<(usize, Upstream)> {
        if target.sandbox.instances().is_empty() {
            return None;
        }
        let now = crate::routes::now_ms();
        let refused = crate::balance::instance(&target.sandbox, refused);
        refused.eject(now + EJECT_MS);
        tracing::info!(sandbox = %target.sandbox.id, instance = %refused.id, port = target.port, "an instance refused a connection; trying another");
        let found = crate::balance::pick(self.strategy, &target.sandbox, client, |e| {
            if e.id == refused.id {
                return None;
            }
            self.usable(e, target.port, now)
        })?;
        self.limits
            .metrics()
            .retried(crate::metrics::Retry::Failover);
        Some(found)
    }

    /// [`Policy::next_instance`] for a request admitted within the caller's scope (the fast
    /// lane): instance `refused` of `target`'s sandbox refused; the admission moves to the
    /// new instance, whose index and upstream are returned.
    pub fn failover<'a>(
        &'a self,
        target: &'a Target,
        refused: usize,
        client: IpAddr,
        admission: &mut ScopedAdmission<'a>,
    ) -> Option<(usize, Upstream)> {
        let (i, upstream) = self.next_instance(target, refused, client)?;
        self.rebind(target, i, admission, |e, cap| e.try_in_use_scoped(cap))?;
        Some((i, upstream))
    }

    /// [`Policy::failover`] for an admission that travels with its response (hyper lane):
    /// `target` moves to the new instance too.
    pub fn failover_owned(
        &self,
        target: &mut Target,
        client: IpAddr,
        admission: &mut OwnedAdmission,
    ) -> Option<Upstream> {
        let (i, upstream) = self.next_instance(target, target.instance, client)?;
        self.rebind(target, i, admission, |e, cap| e.try_in_use(cap))?;
        target.instance = i;
        Some(upstream)
    }

    /// Moves `admission` to instance `i` of `target`'s sandbox: its in-use mark (`in_use`
    /// takes it within the connection cap) and its port's breaker; `None` if either refuses.
    fn rebind<'t, L, A>(
        &self,
        target: &'t Target,
        i: usize,
        admission: &mut Admission<L, A>,
        in_use: impl FnOnce(&'t Entry, usize) -> Option<crate::routes::InUse<A>>,
    ) -> Option<()>
    where
        L: std::ops::Deref<Target = Limits>,
        A: std::ops::Deref<Target = Activity>,
    {
        let next = crate::balance::instance(&target.sandbox, i);
        let in_use = in_use(next, self.rates.max_connections(&target.sandbox.team))?;
        let circuit = self.circuit_of(next, target.port).ok()?;
        admission.rebind(in_use, circuit);
        Some(())
    }

    /// The refusal of a request to a port whose circuit is open (read only: who makes the
    /// half-open trial is decided at admission).
    fn circuit_open(&self, sandbox: &Entry, port: u16) -> Option<Error> {
        let rule = self.limits.circuit();
        if rule.failures == 0 {
            return None;
        }
        let now = crate::routes::now_ms().max(0) as u64;
        match sandbox
            .breakers()
            .peek(sandbox.generation, port, now, rule.open_ms)
        {
            Peek::Open(left) => Some(circuit_error(sandbox, port, left)),
            Peek::Closed | Peek::Expired => None,
        }
    }

    /// A control-API request: the credential its route needs, and the role.
    fn api(&self, head: &Head<'_>) -> Decision {
        let need = permissions::api(head.method, head.path);
        if need == permissions::Need::Nothing {
            return Decision::Api(None);
        }
        // A browser's WebSocket carries its credential as a subprotocol: honoured on the
        // gateway's own sockets only, never on proxied ones (an app's subprotocols are its own).
        let sockets = head.facts.upgrade.is_some() && socket_route(head.path);
        let who = match self.credentials_with(head, sockets) {
            Ok(Some(who)) => who,
            Ok(None) => return Decision::Deny(Error::Unauthenticated),
            Err(e) => return Decision::Deny(e),
        };
        match who.principal.require(need) {
            Ok(()) => Decision::Api(Some(who.principal)),
            Err(e) => Decision::Deny(e),
        }
    }

    /// The answer to a preview URL: 303 to the same URL without the token, setting the
    /// cookie that stands for it (scoped to the sandbox's host, or its path prefix).
    fn exchange_preview(
        &self,
        head: &Head<'_>,
        sb: &Entry,
        token: &str,
        port: Option<u16>,
        prefix: Option<&str>,
    ) -> Decision {
        if let Err(e) = self.rates.throttled(head.client) {
            return Decision::Deny(e);
        }
        let Some(scope) = self.auth.preview(token.as_bytes(), sb, port) else {
            return Decision::Deny(Error::BadCredential(
                "the preview token is invalid, expired, revoked or for another sandbox or port",
            ));
        };
        if let Err(e) = self.addresses.team_allows(&sb.team, head.client) {
            return Decision::Deny(e);
        }
        let rest = head
            .query
            .and_then(crate::proxy::headers::query_without_credentials)
            .filter(|q| !q.is_empty());
        let location = match rest {
            Some(q) => format!("{}?{q}", head.path),
            None => head.path.to_string(),
        };
        let path = prefix.map_or_else(|| "/".to_string(), |p| format!("{p}/"));
        let max_age = scope.expires - self.auth.now();
        Decision::Preview {
            location,
            cookie: preview::cookie(token, &path, max_age, self.secure_cookies),
        }
    }

    /// A preview cookie's principal, if one of the request's opens this sandbox and port.
    fn preview_cookie(
        &self,
        head: &Head<'_>,
        sb: &Entry,
        port: Option<u16>,
    ) -> Option<Authenticated> {
        let creds = &head.facts.credentials;
        creds.previews[..creds.preview_count as usize]
            .iter()
            .any(|t| self.auth.preview(t, sb, port).is_some())
            .then(|| Authenticated {
                principal: Principal::for_sandbox(&sb.team, Via::Preview),
                consumed_authorization: false,
            })
    }

    /// The request's principal, or why it has none.
    /// The principal of the request's headers' credentials (`None`: it carries none), within
    /// its team's address rules. An address that spent its budget of refused credentials gets
    /// no credential checked.
    fn credentials(&self, head: &Head<'_>) -> Result<Option<Authenticated>, Error> {
        self.credentials_with(head, false)
    }

    /// `credentials`, taking a subprotocol credential too when `subprotocol`.
    fn credentials_with(
        &self,
        head: &Head<'_>,
        subprotocol: bool,
    ) -> Result<Option<Authenticated>, Error> {
        self.rates.throttled(head.client)?;
        let mut creds = head.facts.credentials;
        if !subprotocol {
            creds.subprotocol = None;
        }
        let Some(who) = self.auth.authenticate(&creds)? else {
            return Ok(None);
        };
        self.addresses
            .team_allows(&who.principal.team, head.client)?;
        Ok(Some(who))
    }

    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// Admits a granted request for forwarding within the caller's scope (the fast lane), for
    /// `principal` from `client`.
    pub fn admit<'a>(
        &'a self,
        target: &'a Target,
        principal: &Principal,
        client: IpAddr,
        started: &Started,
    ) -> Result<ScopedAdmission<'a>, Error> {
        let dialed = target.dialed();
        let in_use = self.limit(target, principal, |cap| dialed.try_in_use_scoped(cap))?;
        let circuit = self
            .circuit_of(dialed, target.port)
            .map_err(|left| circuit_error(&target.sandbox, target.port, left))?;
        Limits::admit(&*self.limits, client, in_use, started, circuit)
    }

    /// Admits a granted request whose admission travels with its response body (hyper lane).
    pub fn admit_owned(
        &self,
        target: &Target,
        principal: &Principal,
        client: IpAddr,
        started: &Started,
    ) -> Result<OwnedAdmission, Error> {
        let dialed = target.dialed();
        let in_use = self.limit(target, principal, |cap| dialed.try_in_use(cap))?;
        let circuit = self
            .circuit_of(dialed, target.port)
            .map_err(|left| circuit_error(&target.sandbox, target.port, left))?;
        Limits::admit(self.limits.clone(), client, in_use, started, circuit)
    }

    /// The breaker a request to `port` of instance `sb` reports to, if circuit breaking is
    /// on; refused while the circuit is open or another request is its half-open trial. A
    /// request that becomes the trial turns the circuit half-open. A refusal is the open
    /// time left, in ms.
    fn circuit_of(&self, sb: &Entry, port: u16) -> Result<Option<Circuit>, u64> {
        let rule = self.limits.circuit();
        if rule.failures == 0 {
            return Ok(None);
        }
        let now = crate::routes::now_ms().max(0) as u64;
        match sb.breakers().admit(sb.generation, port, now, rule.open_ms) {
            Ok(trial) => {
                if trial {
                    self.limits.metrics().circuit(Transition::HalfOpened);
                }
                Ok(Some(Circuit {
                    generation: sb.generation,
                    port,
                    trial,
                }))
            }
            Err(left) => Err(left),
        }
    }

    /// The limits of a forwarded request before its concurrency slots: the sandbox's in-use
    /// mark within its connection cap (`in_use` takes it, given the cap; a refusal later
    /// returns it), then the rate-limit tokens of its credential and of its sandbox (spent
    /// even if a later step refuses: a request refused for overload still was a request).
    fn limit<I>(
        &self,
        target: &Target,
        principal: &Principal,
        in_use: impl FnOnce(usize) -> Option<I>,
    ) -> Result<I, Error> {
        let sandbox = &target.sandbox;
        let cap = self.rates.max_connections(&sandbox.team);
        let in_use = in_use(cap).ok_or_else(|| rates::too_many_connections(cap))?;
        self.rates.take_key(&principal.team, &principal.subject)?;
        self.rates.take_sandbox(&sandbox.team, sandbox.key())?;
        Ok(in_use)
    }

    /// Admits a control-API request acting as `principal`: its credential's rate-limit token
    /// (hyper's lane, the only one that serves the API, so once per request).
    pub fn admit_api(&self, principal: &Principal) -> Result<(), Error> {
        self.rates.take_key(&principal.team, &principal.subject)
    }

    /// The finish step of a request the gateway answered itself.
    pub fn answered(&self, started: &Started, end: Ending) {
        self.limits.answered(started, end);
    }

    /// The finish step of a control-API request, answered with `status` by the route
    /// `template` (`None`: none matched).
    pub fn answered_api(&self, started: &Started, status: u16, template: Option<&str>) {
        self.limits.answered_api(started, status, template);
    }

    /// The finish step of a request the policy refused: counted as answered; a refused
    /// credential counts against `client`'s address (the brute-force throttle), and it, a
    /// refused permission or address is an audited authentication failure.
    pub fn refused(&self, err: &Error, client: IpAddr, started: &Started) {
        let action = match err {
            Error::BadCredential(_) => "auth.failure",
            Error::Forbidden(_) => "auth.forbidden",
            Error::AddressNotAllowed => "auth.address_refused",
            _ => "",
        };
        if !action.is_empty() {
            if matches!(err, Error::BadCredential(_)) {
                self.auth.failed();
                self.rates.auth_failed(client);
            }
            let actor = Actor {
                client: Some(client.to_string()),
                ..Actor::default()
            };
            let (_, code) = err.status_and_code();
            self.audit
                .record(&actor, action, None, code, Some(err_details(err)));
        }
        self.limits.answered(started, Ending::error(err));
    }

    /// Starts the stopped persistent sandbox of a granted request and waits (bounded by
    /// `wake_timeout`) for its port to accept connections; the grant then has its upstream.
    pub async fn wake(&self, grant: Grant) -> Result<Grant, Error> {
        let id = grant.target.sandbox.id.clone();
        tracing::info!(sandbox = %id, "waking on request");
        let began = std::time::Instant::now();
        let woke = self.wake_and_wait(grant).await;
        self.limits
            .metrics()
            .lifecycle(Operation::Wake, woke.is_ok(), began.elapsed());
        woke
    }

    async fn wake_and_wait(&self, mut grant: Grant) -> Result<Grant, Error> {
        let id = grant.target.sandbox.id.clone();
        self.manager.start(&id).await?;
        let entry = self
            .routes
            .get(&id)
            .ok_or_else(|| Error::SandboxNotFound(id.clone()))?;
        let upstream = self
            .backend
            .upstream(&entry, grant.target.port)
            .ok_or_else(|| port_not_exposed(&entry, grant.target.port))?;
        grant.target.sandbox = entry;
        grant.upstream = Some(upstream);
        let deadline = tokio::time::Instant::now() + self.wake_timeout;
        let mut pause = Duration::from_millis(10);
        loop {
            if upstream.dial().await.is_ok() {
                return Ok(grant);
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(Error::Starting(id));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
}

/// How a granted principal's credential fared: accepted if it presented one.
pub fn auth_result(principal: &Principal) -> AuthResult {
    match principal.via {
        Via::Key | Via::Token | Via::External | Via::Preview => AuthResult::Accepted,
        Via::Open | Via::Public => AuthResult::None,
    }
}

/// How long a request to a sandbox whose server failed its checks waits for its port.
const READY_WAIT: Duration = Duration::from_secs(2);

impl Policy {
    /// A running sandbox's server failed its health checks: waits (up to [`READY_WAIT`]) for
    /// it to pass one (a connection, or its `health_path` answering 2xx/3xx; recorded), else
    /// `503 sandbox_not_ready`.
    pub async fn await_ready(&self, mut grant: Grant) -> Result<Grant, Error> {
        let entry = grant.target.sandbox.clone();
        let upstream = self
            .backend
            .upstream(&entry, grant.target.port)
            .ok_or_else(|| port_not_exposed(&entry, grant.target.port))?;
        let deadline = tokio::time::Instant::now() + READY_WAIT;
        let mut pause = Duration::from_millis(50);
        loop {
            if upstream.probe(entry.health_path.as_deref()).await {
                let changed = entry.record_check(true, self.health_rise, self.health_fall);
                self.limits.metrics().health_check(true, changed.is_some());
                grant.upstream = Some(upstream);
                grant.unready = false;
                return Ok(grant);
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(Error::NotReady(entry.id.clone()));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }
}

/// The gateway's own WebSockets, which may authenticate with a subprotocol credential:
/// `/sandboxes/{id}/pty` and `/ws/{id}`.
fn socket_route(path: &str) -> bool {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    matches!(segs.as_slice(), ["sandboxes", _, "pty"] | ["ws", _])
}

/// What an audit record says about a refusal.
fn err_details(err: &Error) -> String {
    match err {
        Error::BadCredential(why) => (*why).to_string(),
        other => other.to_string(),
    }
}

/// `503 circuit_open`, retry after the open time left (whole seconds, at least 1).
fn circuit_error(sb: &Entry, port: u16, left_ms: u64) -> Error {
    Error::CircuitOpen {
        id: sb.id.clone(),
        port,
        retry_after: left_ms.div_ceil(1000).max(1),
    }
}

fn port_not_exposed(sb: &Arc<Entry>, port: u16) -> Error {
    let sb: &Sandbox = sb;
    Error::PortNotExposed {
        id: sb.id.clone(),
        port,
    }
}

/// A route prefix as the `X-Forwarded-Prefix` value it becomes. Prefixes are built from
/// validated ids and labels (`/`, `a-z`, `0-9`, `-`), which are always valid header values.
fn prefix_header(prefix: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(prefix).ok()
}
