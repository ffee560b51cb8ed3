//! Which Envoys poll the routes, and what table each holds: every
//! `GET /v1/routes` that names its node (`node=`) is recorded here, for
//! `GET /v1/pollers` and the metrics.

use serde::Serialize;
use std::collections::HashMap;
use std::sync::Mutex;

/// Nodes remembered at most; the longest silent one makes room.
const MAX_NODES: usize = 10_000;

/// One Envoy's poller as last seen.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PollerView {
    pub node: String,
    /// The version it said it holds (`since`) on its last poll.
    pub version: u64,
    /// Whether that version is of the current epoch (otherwise it gets a full snapshot).
    pub current_epoch: bool,
    /// When it last polled (ms since the Unix epoch).
    pub last_poll_ms: u64,
    /// Long-polls of it held right now.
    pub waiting: u32,
    pub polls: u64,
}

#[derive(Default)]
pub struct Pollers {
    nodes: Mutex<HashMap<String, PollerView>>,
}

/// Held while a poll of `node` waits; counts it as waiting.
pub struct Waiting<'a> {
    pollers: &'a Pollers,
    node: String,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut nodes = self.pollers.lock();
        if let Some(p) = nodes.get_mut(&self.node) {
            p.waiting = p.waiting.saturating_sub(1);
        }
    }
}

impl Pollers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PollerView>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a poll arriving; the guard marks it answered when dropped.
    pub fn arrived(&self, node: &str, since: u64, current_epoch: bool, now_ms: u64) -> Waiting<'_> {
        let mut nodes = self.lock();
        if !nodes.contains_key(node) && nodes.len() >= MAX_NODES {
            if let Some(oldest) = nodes
                .values()
                .min_by_key(|p| p.last_poll_ms)
                .map(|p| p.node.clone())
            {
                nodes.remove(&oldest);
            }
        }
        let p = nodes.entry(node.to_owned()).or_insert_with(|| PollerView {
            node: node.to_owned(),
            version: 0,
            current_epoch: false,
            last_poll_ms: 0,
            waiting: 0,
            polls: 0,
        });
        p.version = since;
        p.current_epoch = current_epoch;
        p.last_poll_ms = now_ms;
        p.waiting += 1;
        p.polls += 1;
        Waiting {
            pollers: self,
            node: node.to_owned(),
        }
    }

    /// Every node seen, sorted by name.
    pub fn list(&self) -> Vec<PollerView> {
        let mut v: Vec<PollerView> = self.lock().values().cloned().collect();
        v.sort_by(|a, b| a.node.cmp(&b.node));
        v
    }

    /// Nodes with a poll held now, or seen within `within_ms`.
    pub fn connected(&self, now_ms: u64, within_ms: u64) -> usize {
        self.lock()
            .values()
            .filter(|p| p.waiting > 0 || now_ms.saturating_sub(p.last_poll_ms) <= within_ms)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poll_is_waiting_until_answered_and_the_latest_version_wins() {
        let p = Pollers::default();
        let w = p.arrived("edge-a", 3, true, 1000);
        assert_eq!(p.list()[0].waiting, 1);
        drop(w);
        let _w = p.arrived("edge-a", 7, true, 2000);
        let _b = p.arrived("edge-b", 0, false, 2500);
        let l = p.list();
        assert_eq!(l.len(), 2);
        assert_eq!(
            (l[0].node.as_str(), l[0].version, l[0].polls),
            ("edge-a", 7, 2)
        );
        assert_eq!(l[0].waiting, 1);
        assert!(!l[1].current_epoch);
        assert_eq!(p.connected(100_000, 1000), 2, "both have a poll held");
    }

    #[test]
    fn the_longest_silent_node_makes_room() {
        let p = Pollers::default();
        for i in 0..MAX_NODES {
            drop(p.arrived(&format!("n{i}"), 0, true, 10 + i as u64));
        }
        drop(p.arrived("new", 0, true, 1_000_000));
        let l = p.list();
        assert_eq!(l.len(), MAX_NODES);
        assert!(!l.iter().any(|x| x.node == "n0"));
        assert!(l.iter().any(|x| x.node == "new"));
    }
}
