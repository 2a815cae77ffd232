//! What the gateway itself last saw of each Sandbox, against a lagging watch: after its own
//! create, stop or start it knows a state (the Ready state a start waited for, else the API's
//! answer), and every watch report before that one is older news. Reports are applied in
//! the watch's order, each under its sandbox's lock (`Backend::fresh`, from the manager), so
//! a report queued behind the operation that noted the state is judged after it: until the
//! report of that very `resourceVersion` (compared only for equality, as the API allows)
//! comes, the reports of that Sandbox are dropped; a relist (current state) or
//! [`AWAIT_AT_MOST`] ends the wait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the watch waits for a state the gateway saw before it applies events again (it
/// always delivers it well before; this bounds a surprise).
pub const AWAIT_AT_MOST: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Track {
    /// The `resourceVersion` of the last event the watch delivered.
    delivered: Option<String>,
    /// The `resourceVersion` of the state the gateway saw, not delivered yet, and since when.
    awaited: Option<(String, Instant)>,
}

/// Per Sandbox reference, shared by the backend and its watches.
#[derive(Debug, Clone, Default)]
pub struct Seen(Arc<Mutex<HashMap<String, Track>>>);

impl Seen {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Track>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The gateway saw Sandbox `reference` at `version`: events before it are stale (unless
    /// the watch delivered it already).
    pub fn saw(&self, reference: &str, version: Option<&str>) {
        let Some(version) = version else {
            return;
        };
        let mut all = self.lock();
        let track = all.entry(reference.to_string()).or_default();
        if track.delivered.as_deref() != Some(version) {
            track.awaited = Some((version.to_string(), Instant::now()));
        }
    }

    /// A report of `reference` at `version` is being applied: whether to (`false`: it is
    /// older than what the gateway saw).
    pub fn fresh(&self, reference: &str, version: Option<&str>) -> bool {
        let mut all = self.lock();
        let track = all.entry(reference.to_string()).or_default();
        track.delivered = version.map(str::to_string);
        match &track.awaited {
            Some((awaited, since))
                if version != Some(awaited.as_str()) && since.elapsed() < AWAIT_AT_MOST =>
            {
                false
            }
            Some(_) => {
                track.awaited = None;
                true
            }
            None => true,
        }
    }

    /// A relist reports `reference` as it is now: nothing is awaited any more.
    pub fn listed(&self, reference: &str, version: Option<&str>) {
        let mut all = self.lock();
        let track = all.entry(reference.to_string()).or_default();
        track.delivered = version.map(str::to_string);
        track.awaited = None;
    }

    /// The Sandbox is gone.
    pub fn forget(&self, reference: &str) {
        self.lock().remove(reference);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_before_the_state_the_gateway_saw_are_dropped() {
        let seen = Seen::default();
        assert!(seen.fresh("a", Some("1")), "nothing awaited");
        // The gateway's start saw version 4; the watch is still at 2 and 3.
        seen.saw("a", Some("4"));
        assert!(!seen.fresh("a", Some("2")));
        assert!(!seen.fresh("a", Some("3")));
        assert!(seen.fresh("a", Some("4")), "the state it saw");
        assert!(seen.fresh("a", Some("5")), "and what came after");
        // Already delivered when the gateway notes it: nothing to wait for.
        seen.saw("a", Some("5"));
        assert!(seen.fresh("a", Some("6")));
        // Other Sandboxes are not affected; a relist ends a wait.
        seen.saw("a", Some("9"));
        assert!(seen.fresh("b", Some("7")));
        seen.listed("a", Some("10"));
        assert!(seen.fresh("a", Some("11")));
        seen.saw("a", None);
        assert!(seen.fresh("a", Some("12")), "no version: nothing awaited");
        seen.forget("a");
        assert!(seen.lock().get("a").is_none());
    }
}
