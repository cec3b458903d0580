//! Routing: which worker a shard goes to, as a pure function of the candidates
//! (live, not draining, serving the job's group and handler, with room under their
//! capacity), the job's routing strategy, its round-robin counter and, for
//! `random`, a draw from the engine's seeded generator.

use chime_shared::queue::fnv1a64;

use crate::model::Routing;

/// A worker a shard may go to, with what routing looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Candidate {
    /// Worker id (candidates come sorted by it).
    pub(super) id: String,
    /// Shards it runs plus shards planned for it.
    pub(super) load: usize,
    /// When it was last sent a shard, ms.
    pub(super) last_assigned_ms: i64,
    /// Whether it runs a shard of this job now (`busy-over`).
    pub(super) runs_job: bool,
}

/// The worker `routing` picks among `cands` (sorted by id). `rr` is the job's
/// round-robin counter, `key` the consistent-hash key, `rng` the engine's generator.
pub(super) fn route(
    routing: Routing,
    cands: &[Candidate],
    rr: u64,
    key: &str,
    rng: &mut fastrand::Rng,
) -> Option<String> {
    let n = cands.len();
    if n == 0 {
        return None;
    }
    let c = match routing {
        // A takeover or retry of a broadcast shard: the least loaded worker.
        Routing::ShardingBroadcast | Routing::LeastLoaded => least_loaded(cands)?,
        Routing::RoundRobin => &cands[(rr % n as u64) as usize],
        Routing::Random => &cands[rng.usize(..n)],
        // Rendezvous hashing: stable while the worker set is.
        Routing::ConsistentHash => cands
            .iter()
            .max_by_key(|c| fnv1a64(format!("{key}\u{1}{}", c.id).as_bytes()))?,
        Routing::LeastRecentlyUsed => cands.iter().min_by_key(|c| c.last_assigned_ms)?,
        Routing::Failover | Routing::First => &cands[0],
        Routing::Last => &cands[n - 1],
        Routing::BusyOver => cands.iter().find(|c| !c.runs_job).unwrap_or(&cands[0]),
    };
    Some(c.id.clone())
}

/// The candidate with the least load (ties: the smallest id).
pub(super) fn least_loaded(cands: &[Candidate]) -> Option<&Candidate> {
    cands.iter().min_by_key(|c| (c.load, c.id.as_str()))
}

/// The value consistent hashing hashes: the top-level JSON field `param` of the
/// params, or the whole params.
pub(super) fn hash_key(params: &str, param: &str) -> String {
    if param.is_empty() {
        return params.to_owned();
    }
    serde_json::from_str::<serde_json::Value>(params)
        .ok()
        .and_then(|v| v.get(param).cloned())
        .map(|v| match v {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(loads: &[usize]) -> Vec<Candidate> {
        loads
            .iter()
            .enumerate()
            .map(|(i, l)| Candidate {
                id: format!("w{i}"),
                load: *l,
                last_assigned_ms: 100 - i as i64,
                runs_job: i == 0,
            })
            .collect()
    }

    #[test]
    fn every_strategy_picks_what_it_promises() {
        let c = cands(&[2, 0, 1]);
        let mut rng = fastrand::Rng::with_seed(7);
        let pick = |r, rr, key: &str, rng: &mut fastrand::Rng| route(r, &c, rr, key, rng);
        assert_eq!(
            pick(Routing::LeastLoaded, 0, "", &mut rng).as_deref(),
            Some("w1")
        );
        assert_eq!(
            pick(Routing::ShardingBroadcast, 0, "", &mut rng).as_deref(),
            Some("w1")
        );
        assert_eq!(
            pick(Routing::RoundRobin, 4, "", &mut rng).as_deref(),
            Some("w1")
        );
        assert_eq!(pick(Routing::First, 0, "", &mut rng).as_deref(), Some("w0"));
        assert_eq!(
            pick(Routing::Failover, 0, "", &mut rng).as_deref(),
            Some("w0")
        );
        assert_eq!(pick(Routing::Last, 0, "", &mut rng).as_deref(), Some("w2"));
        assert_eq!(
            pick(Routing::LeastRecentlyUsed, 0, "", &mut rng).as_deref(),
            Some("w2")
        );
        assert_eq!(
            pick(Routing::BusyOver, 0, "", &mut rng).as_deref(),
            Some("w1")
        );
        let a = pick(Routing::ConsistentHash, 0, "user-7", &mut rng);
        assert_eq!(a, pick(Routing::ConsistentHash, 9, "user-7", &mut rng));
        assert!(pick(Routing::Random, 0, "", &mut rng).is_some());
        assert_eq!(route(Routing::First, &[], 0, "", &mut rng), None);
    }

    #[test]
    fn hash_key_reads_a_top_level_field() {
        assert_eq!(hash_key(r#"{"user":"u1","n":2}"#, "user"), "u1");
        assert_eq!(hash_key(r#"{"user":"u1","n":2}"#, "n"), "2");
        assert_eq!(hash_key("plain", ""), "plain");
        assert_eq!(hash_key("not json", "user"), "");
    }
}
