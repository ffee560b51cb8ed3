//! Filling a real control plane's database fast: consumers written through
//! the control plane's own registry (the same ops a sign-up writes),
//! committed in large batches, far faster than as many HTTP sign-ups.

use prealloc_control_plane::registry::{NewId, Registry};
use prealloc_control_plane::store::Op;
use prealloc_control_plane::store::{sqlite::SqliteStore, Store};
use prealloc_e2e::control_plane::ControlPlane;
use std::time::{SystemTime, UNIX_EPOCH};

/// The ids of a benchmark control plane's `n` managers: `m1`..`mn`.
pub fn manager_ids(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("m{i}")).collect()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// splitmix64's finalizer: a bijection, so distinct `n` give distinct ids.
fn mix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes consumers into the database of a stopped control plane.
pub struct Filler {
    reg: Registry,
    store: SqliteStore,
    ops: Vec<Op>,
    /// The routes version the database had.
    version: u64,
    managers: Vec<String>,
    /// When the fill started (ms): who is settled by then.
    now: u64,
}

impl Filler {
    /// Opens `cp`'s database (kill the control plane first).
    pub fn open(cp: &ControlPlane) -> Filler {
        let text = std::fs::read_to_string(cp.dir().join("prealloc.toml")).expect("cp config");
        let config =
            prealloc_control_plane::Config::parse(&text, cp.dir()).expect("cp config parses");
        let mut store = SqliteStore::open(&cp.database_path()).expect("open the database");
        let window = prealloc_control_plane::registry::load_window(
            &config,
            prealloc_control_plane::now_ms(),
        );
        let snap = store.load(window).expect("load");
        let reg = Registry::from_snapshot(&config, &snap).expect("registry");
        let version = snap
            .meta("version")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        Filler {
            managers: config.managers.iter().map(|m| m.id.clone()).collect(),
            reg,
            store,
            ops: Vec::new(),
            version,
            now: prealloc_control_plane::now_ms(),
        }
    }

    /// Signs up consumer `n` at `t` (ms) and records `copies` more managers
    /// holding its data 5 ms later (the ones after its first manager, in
    /// the configuration's order, wrapping around).
    pub fn sign_up(&mut self, n: u64, t: u64, copies: usize) {
        let ops = &mut self.ops;
        self.reg
            .reserve(0, t, ops)
            .expect("capacity for every consumer");
        // Minted as the control plane mints them: found by id once settled.
        let (r, _) = self
            .reg
            .register("mailbox", None, NewId::Mint(mix(n)), t, ops)
            .expect("a ready resource");
        let id = r.consumer.clone();
        self.reg.confirm(&id, t, ops).expect("confirm");
        let at = self
            .managers
            .iter()
            .position(|m| *m == r.manager)
            .unwrap_or(0);
        let n = self.managers.len();
        for k in 1..=copies.min(n.saturating_sub(1)) {
            let m = &self.managers[(at + k) % n];
            self.reg.add_replica(&id, m, t + 5, ops).expect("replica");
        }
        // Signed up long ago: settled, it leaves memory as in the control plane.
        self.reg.evict_if_settled(&id, self.now);
        if self.ops.len() > 200_000 {
            self.store.commit(&self.ops).expect("commit");
            self.ops.clear();
        }
    }

    /// Commits what is left, with the next routes version: Envoys that
    /// polled the control plane before see a gap and load the new table.
    pub fn finish(mut self) {
        self.ops.push(Op::SetMeta {
            key: "version".into(),
            value: (self.version + 1).to_string(),
        });
        self.store.commit(&self.ops).expect("commit");
    }
}
