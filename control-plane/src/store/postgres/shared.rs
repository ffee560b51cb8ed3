//! Several control planes on one database (`store.shared`): the round's
//! commit lock and catch-up read (`begin`), the batch log row and `NOTIFY`
//! of each commit, the listener that wakes an idle instance, and the duty
//! lease. How it fits together: the module docs of `super`.

use super::batch::{batched, Stmt};
use super::{p, to_i64, Session, CHANNEL, COMMIT_LOCK, DUTIES_LOCK};
use crate::store::{FellBehind, Foreign, Op};
use anyhow::{anyhow, bail, Context};
use std::time::Duration;
use tokio_postgres::NoTls;

/// How long a shared database keeps its batch log: an instance that could
/// not read it for longer has fallen behind and must be restarted.
pub const BATCH_LOG_KEPT_MS: u64 = 5 * 60 * 1000;
/// Old batches are dropped by every this-many-th commit.
const PRUNE_EVERY: u64 = 1000;

impl Session {
    /// Shared: ends a round's transaction left open (a failed round).
    pub(super) async fn end_open_round(&mut self) {
        if self.in_txn {
            self.in_txn = false;
            if let Some(c) = &self.client {
                let _ = c.batch_execute("ROLLBACK").await;
            }
        }
    }

    /// Shared: opens the round's transaction, takes the commit lock, and
    /// reads the batches committed since this store's last.
    pub(super) async fn begin(&mut self) -> anyhow::Result<Vec<Foreign>> {
        self.end_open_round().await;
        let after = i64::try_from(self.seq.unwrap_or(0)).unwrap_or(i64::MAX);
        let client = self.client().await?;
        client.batch_execute("BEGIN").await?;
        let read = async {
            client
                .execute("SELECT pg_advisory_xact_lock($1)", &[&COMMIT_LOCK])
                .await?;
            let rows = client
                .query(
                    "SELECT seq, ops FROM batches WHERE seq > $1 ORDER BY seq",
                    &[&after],
                )
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            let mut last = None;
            if let Some(first) = rows.first() {
                let first: i64 = first.try_get(0)?;
                if first != after + 1 {
                    return Err(anyhow::Error::new(FellBehind {
                        next: after as u64 + 1,
                        oldest: first as u64,
                        kept_ms: BATCH_LOG_KEPT_MS,
                    }));
                }
            }
            for r in &rows {
                let seq: i64 = r.try_get(0)?;
                let text: String = r.try_get(1)?;
                let ops: Vec<Op> = serde_json::from_str(&text)
                    .with_context(|| format!("batch {seq} in the database is not readable"))?;
                out.push(Foreign { ops });
                last = Some(seq as u64);
            }
            anyhow::Ok((out, last))
        }
        .await;
        match read {
            Ok((out, last)) => {
                self.in_txn = true;
                if let Some(last) = last {
                    self.seq = Some(last);
                }
                Ok(out)
            }
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                Err(e)
            }
        }
    }

    /// Shared: a receiver woken whenever another instance commits (and once
    /// after each (re)connection of the listener, for what it may have missed).
    pub(super) fn foreign_commits(
        &mut self,
    ) -> anyhow::Result<tokio::sync::mpsc::UnboundedReceiver<()>> {
        let config = self.connect_config()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(listen(config, self.instance.clone(), self.target(), tx));
        Ok(rx)
    }

    /// Shared: whether this instance holds the duty lease, kept by a
    /// connection of its own that waits for the lock and then holds it.
    pub(super) fn duties(&mut self) -> anyhow::Result<tokio::sync::watch::Receiver<bool>> {
        let config = self.connect_config()?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(hold_duties(config, self.target(), tx));
        Ok(rx)
    }

    /// Shared: the round's batch, its log row and its notification, in the
    /// transaction `begin` opened (which holds the commit lock).
    pub(super) async fn commit_shared(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        if !self.in_txn {
            let unseen = self.begin().await?;
            if !unseen.is_empty() {
                self.end_open_round().await;
                bail!("other control planes committed since this one read the database; retry");
            }
        }
        let result = self.commit_in_round(ops).await;
        if result.is_err() {
            self.end_open_round().await;
        }
        result
    }

    async fn commit_in_round(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        let client_closed = || anyhow!("no PostgreSQL connection");
        if ops.is_empty() {
            self.in_txn = false;
            self.client
                .as_ref()
                .ok_or_else(client_closed)?
                .batch_execute("COMMIT")
                .await?;
            return Ok(());
        }
        let seq = self.seq.unwrap_or(0) + 1;
        let mut statements = batched(ops);
        if seq.is_multiple_of(PRUNE_EVERY) {
            // The log is for instances catching up, not history.
            statements.push(Stmt {
                sql: "DELETE FROM batches WHERE at_ms < $1",
                params: vec![p(to_i64(crate::now_ms().saturating_sub(BATCH_LOG_KEPT_MS)))],
                expect: None,
            });
        }
        statements.push(Stmt {
            sql: "INSERT INTO batches (seq, instance, at_ms, ops) VALUES ($1, $2, $3, $4)",
            params: vec![
                p(to_i64(seq)),
                p(self.instance.clone()),
                p(to_i64(crate::now_ms())),
                p(serde_json::to_string(ops)?),
            ],
            expect: None,
        });
        statements.push(Stmt {
            sql: "SELECT pg_notify($1, $2)",
            params: vec![p(CHANNEL), p(self.instance.clone())],
            expect: None,
        });
        self.execute_in_transaction(statements).await?;
        let client = self.client.as_ref().ok_or_else(client_closed)?;
        client
            .batch_execute("COMMIT")
            .await
            .context("commit failed")?;
        self.in_txn = false;
        self.seq = Some(seq);
        Ok(())
    }
}

/// Shared: waits for the duty lease on a connection of its own (the lock is
/// granted when the holder's session ends), says so, and holds it until that
/// connection ends; then tries again. Ends when nobody asks any more.
async fn hold_duties(
    config: tokio_postgres::Config,
    target: String,
    holding: tokio::sync::watch::Sender<bool>,
) {
    loop {
        match config.connect(NoTls).await {
            Ok((client, connection)) => {
                let mut connection = tokio::spawn(connection);
                let locked = tokio::select! {
                    r = client.query_one("SELECT pg_advisory_lock($1)", &[&DUTIES_LOCK]) => r.map(|_| ()),
                    _ = &mut connection => Ok(()),
                };
                match locked {
                    Ok(()) if !connection.is_finished() => {
                        tracing::info!(%target, "this control plane runs the fleet's background duties now");
                        holding.send_replace(true);
                        let _ = connection.await;
                        holding.send_replace(false);
                        tracing::warn!(%target, "the duty lease's connection ended; another control plane may take the duties over");
                    }
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(%target, error = %e, "waiting for the duty lease failed; retrying")
                    }
                }
                drop(client);
            }
            Err(e) => {
                tracing::warn!(%target, error = %e, "cannot connect to wait for the duty lease; retrying")
            }
        }
        if holding.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Shared: listens for other instances' commits on its own connection and
/// wakes the writer; reconnects (and wakes it, for what it may have missed)
/// when the connection is lost. Ends when the writer is gone.
async fn listen(
    config: tokio_postgres::Config,
    instance: String,
    target: String,
    wake: tokio::sync::mpsc::UnboundedSender<()>,
) {
    use futures_util::StreamExt;
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(Ok(m)) = messages.next().await {
                        if let tokio_postgres::AsyncMessage::Notification(n) = m {
                            if tx.send(n.payload().to_owned()).is_err() {
                                break;
                            }
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    Ok(()) => {
                        if wake.send(()).is_err() {
                            return;
                        }
                        while let Some(from) = rx.recv().await {
                            if from != instance && wake.send(()).is_err() {
                                driver.abort();
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%target, error = %e, "cannot LISTEN for other control planes' commits; retrying")
                    }
                }
                driver.abort();
            }
            Err(e) => {
                tracing::warn!(%target, error = %e, "cannot connect to listen for other control planes' commits; retrying")
            }
        }
        if wake.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
