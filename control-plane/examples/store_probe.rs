//! Times the SQLite store alone: group commits of registration-shaped batches.
use prealloc_control_plane::store::*;
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut st = SqliteStore::open(&dir.path().join("p.db"))?;
    let per: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(30);
    let mut id = 0u64;
    let mut exec = std::time::Duration::ZERO;
    let n = 500;
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
