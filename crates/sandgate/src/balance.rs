//! The load balancer: picks which of a sandbox's instances (`replicas`) a request goes to,
//! by `LOAD_BALANCER_STRATEGY`, among those the caller finds usable (running, ready, circuit
//! closed, not just ejected). No lock, no allocation: a pass or two over the instances.

use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use rand::Rng;

use crate::config::Strategy;
use crate::routes::Entry;

/// Instance `i` of `sandbox`: 0 is the sandbox's own entry, `i` its `i`-th extra instance.
pub fn instance(sandbox: &Arc<Entry>, i: usize) -> &Arc<Entry> {
    match i {
        0 => sandbox,
        i => &sandbox.instances()[i - 1],
    }
}

/// Picks an instance of `sandbox` for a request from `client`: its index (see [`instance`])
/// and what `usable` made of it; `None` if no instance is usable.
pub fn pick<T>(
    strategy: Strategy,
    sandbox: &Arc<Entry>,
    client: IpAddr,
    usable: impl Fn(&Entry) -> Option<T>,
) -> Option<(usize, T)> {
    let n = 1 + sandbox.instances().len();
    let usable_at = |i: usize| usable(instance(sandbox, i)).map(|u| (i, u));
    match strategy {
        Strategy::RoundRobin | Strategy::Random => {
            // The k-th usable one: an instance out of rotation leaves its share to all the
            // others evenly, not to its neighbour.
            let count = (0..n)
                .filter(|&i| usable(instance(sandbox, i)).is_some())
                .count();
            if count == 0 {
                return None;
            }
            let k = match strategy {
                Strategy::Random => rand::thread_rng().gen_range(0..count),
                _ => sandbox.next_turn() % count,
            };
            (0..n).filter_map(usable_at).nth(k)
        }
        Strategy::LeastConnections => {
            // Ties go in turn (the scan starts at the next turn's instance).
            let start = sandbox.next_turn();
            let mut best: Option<(usize, T, usize)> = None;
            for k in 0..n {
                let i = (start + k) % n;
                if let Some((i, u)) = usable_at(i) {
                    let load = instance(sandbox, i).in_flight();
                    if best.as_ref().is_none_or(|b| load < b.2) {
                        best = Some((i, u, load));
                    }
                }
            }
            best.map(|(i, u, _)| (i, u))
        }
        Strategy::Sticky => {
            // Rendezvous hashing: the client's highest-scoring usable instance. Fixed keys, so
            // every gateway replica sends a client to the same instance.
            let mut best: Option<(usize, T, u64)> = None;
            for i in 0..n {
                if let Some((i, u)) = usable_at(i) {
                    let score = affinity(client, &instance(sandbox, i).id);
                    if best.as_ref().is_none_or(|b| score > b.2) {
                        best = Some((i, u, score));
                    }
                }
            }
            best.map(|(i, u, _)| (i, u))
        }
    }
}

/// How strongly `client` belongs to the instance `id` (same on every gateway).
fn affinity(client: IpAddr, id: &str) -> u64 {
    let mut h = foldhash::fast::FixedState::with_seed(0x5a4d_6761_7465).build_hasher();
    client.hash(&mut h);
    id.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Sandbox;
    use crate::routes::Routes;

    /// A sandbox with `n` instances in a route table; its entry.
    fn sandbox(n: usize) -> Arc<Entry> {
        let routes = Routes::default();
        let mut sb = Sandbox::for_tests("sb-aaaaaaaaaaaaaaaa");
        sb.replicas = n as u32;
        routes.put(sb.clone());
        for i in 1..n {
            let mut r = sb.clone();
            r.id = format!("sb-aaaaaaaaaaaaaab{}", (b'a' + i as u8) as char);
            r.replica_of = Some(sb.id.clone());
            r.created_at += chrono::Duration::milliseconds(i as i64);
            routes.put(r);
        }
        routes.get(&sb.id).unwrap()
    }

    fn counts(strategy: Strategy, sb: &Arc<Entry>, down: &[usize], rounds: usize) -> Vec<usize> {
        let n = 1 + sb.instances().len();
        let mut seen = vec![0; n];
        for r in 0..rounds {
            let client = IpAddr::from([10, 0, (r / 256) as u8, (r % 256) as u8]);
            let (i, ()) = pick(strategy, sb, client, |e| {
                let idx = (0..n).find(|&k| instance(sb, k).id == e.id).unwrap();
                (!down.contains(&idx)).then_some(())
            })
            .unwrap();
            seen[i] += 1;
        }
        seen
    }

    #[test]
    fn round_robin_takes_turns_and_shares_a_missing_instance_evenly() {
        let sb = sandbox(3);
        assert_eq!(counts(Strategy::RoundRobin, &sb, &[], 300), [100, 100, 100]);
        let seen = counts(Strategy::RoundRobin, &sb, &[1], 300);
        assert_eq!(seen, [150, 0, 150]);
    }

    #[test]
    fn least_connections_prefers_the_idle_instance() {
        let sb = sandbox(2);
        let _busy = sb.in_use();
        assert_eq!(counts(Strategy::LeastConnections, &sb, &[], 10), [0, 10]);
        // Ties go in turn.
        drop(_busy);
        assert_eq!(counts(Strategy::LeastConnections, &sb, &[], 10), [5, 5]);
    }

    #[test]
    fn random_reaches_every_instance() {
        let sb = sandbox(3);
        let seen = counts(Strategy::Random, &sb, &[], 600);
        assert!(seen.iter().all(|&c| c > 100), "{seen:?}");
        assert_eq!(counts(Strategy::Random, &sb, &[0, 2], 50), [0, 50, 0]);
    }

    #[test]
    fn sticky_keeps_a_client_and_moves_only_a_leaving_instances_clients() {
        let sb = sandbox(3);
        let client = IpAddr::from([192, 0, 2, 7]);
        let first = pick(Strategy::Sticky, &sb, client, |_| Some(())).unwrap().0;
        for _ in 0..20 {
            assert_eq!(
                pick(Strategy::Sticky, &sb, client, |_| Some(())).unwrap().0,
                first
            );
        }
        // Spread over the clients, and an instance's leaving moves only its own.
        let all = counts(Strategy::Sticky, &sb, &[], 3000);
        assert!(all.iter().all(|&c| c > 700), "{all:?}");
        let without = counts(Strategy::Sticky, &sb, &[1], 3000);
        assert_eq!(without[1], 0);
        assert!(
            without[0] >= all[0] && without[2] >= all[2],
            "{all:?} {without:?}"
        );
        assert_eq!(without[0] + without[2], 3000);
    }

    #[test]
    fn nothing_usable_is_none() {
        let sb = sandbox(2);
        assert!(pick(
            Strategy::RoundRobin,
            &sb,
            IpAddr::from([127, 0, 0, 1]),
            |_| None::<()>
        )
        .is_none());
    }
}
