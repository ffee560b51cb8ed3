//! Times the SQLite store alone: group commits of registration-shaped batches.
//!
//! `cargo run --release -p prealloc-control-plane --example store_probe [PER [BATCHES]]`:
//! BATCHES commits of PER registrations each (default 30 and 500).
use prealloc_control_plane::store::*;
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut st = SqliteStore::open(&dir.path().join("p.db"))?;
    let arg = |i: usize| std::env::args().nth(i);
    let per: u64 = arg(1).and_then(|a| a.parse().ok()).unwrap_or(30);
    let n: u64 = arg(2).and_then(|a| a.parse().ok()).unwrap_or(500);
    let mut id = 0u64;
    let mut exec = std::time::Duration::ZERO;
    for _ in 0..n {
        let mut ops = Vec::new();
        for _ in 0..per {
            id += 1;
            let c = prealloc_wire::ConsumerId::from_bytes(rand::random()).to_string();
            ops.push(Op::PutResource(ResourceRow {
                id,
                resource_type: "mailbox".into(),
                name: format!("mailbox-{id}"),
                location: "l".into(),
                manager: "m1".into(),
                state: ResourceState::Ready,
                consumer: None,
                created_ms: 1,
            }));
            ops.push(Op::Assign {
                resource: id,
                consumer: c,
                created_ms: 1,
                registered_ms: None,
            });
            ops.push(Op::PutReplica(ReplicaRow {
                resource: id,
                manager: "m1".into(),
                at_ms: 1,
            }));
        }
        ops.push(Op::SetMeta {
            key: "version".into(),
            value: id.to_string(),
        });
        let t = Instant::now();
        st.commit(&ops)?;
        exec += t.elapsed();
    }
    println!(
        "{} registrations per commit: {:.2} ms per commit, {:.0} registrations/s",
        per,
        exec.as_secs_f64() * 1000.0 / n as f64,
        (per * n) as f64 / exec.as_secs_f64()
    );
    Ok(())
}
