//! The bench on PostgreSQL: where the databases come from (a throwaway cluster, or a server the
//! user names), and the baselines that talk to PostgreSQL with nothing of capsync in between:
//! the raw tokio-postgres loop doing the store's append SQL, and PostgreSQL's own single-row
//! durable insert.

use super::harness::{ms, payload, puts, quantile};
use anyhow::Context as _;
use capsync_persistence::IncomingBatch;
use capsync_store_postgres::{append_sql as sql, interpret_append, migrate, testing, AppendCall, PgStore};
use std::cell::RefCell;
use std::time::Instant;
use tokio_postgres::{Client, NoTls};

/// Where each scenario's fresh database is made.
pub enum PgTarget {
    /// A cluster of this process (`capsync_store_postgres::testing`): initdb in a temp dir,
    /// a free port, trust auth, `fsync=on`; stopped and removed when the bench exits.
    Cluster,
    /// A server the user runs: databases `capsync_bench_<pid>_<n>` are created through this
    /// URL (its role needs CREATEDB) and dropped at the end.
    Url { url: String, made: RefCell<Vec<String>> },
}

impl PgTarget {
    /// Starts the cluster (or checks the URL answers); returns a line saying what runs.
    pub async fn open(&self) -> anyhow::Result<String> {
        let url = match self {
            PgTarget::Cluster => {
                // The harness panics with a clear message when it cannot start a cluster.
                let port = std::panic::catch_unwind(|| testing::cluster().port)
                    .map_err(|_| anyhow::anyhow!("the throwaway PostgreSQL cluster did not start (see above)"))?;
                format!("postgres://{}@127.0.0.1:{port}/postgres", testing::USER)
            }
            PgTarget::Url { url, .. } => url.clone(),
        };
        let client = connect(&url).await?;
        let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
        let settings = client
            .query_one(
                "SELECT current_setting('fsync'), current_setting('synchronous_commit'), current_setting('shared_buffers')",
                &[],
            )
            .await?;
        let (fsync, sync_commit, buffers): (String, String, String) = (settings.get(0), settings.get(1), settings.get(2));
        let what = match self {
            PgTarget::Cluster => "a throwaway cluster on 127.0.0.1",
            PgTarget::Url { .. } => "the server of --store",
        };
        Ok(format!("PostgreSQL {version}, {what} (fsync={fsync}, synchronous_commit={sync_commit}, shared_buffers={buffers})"))
    }

    /// A new, empty database; returns its URL.
    pub async fn fresh_database(&self) -> anyhow::Result<String> {
        match self {
            PgTarget::Cluster => Ok(testing::fresh_database()),
            PgTarget::Url { url, made } => {
                let name = format!("capsync_bench_{}_{}", std::process::id(), made.borrow().len() + 1);
                let client = connect(url).await?;
                client
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .with_context(|| format!("CREATE DATABASE {name} (the --store role needs CREATEDB)"))?;
                made.borrow_mut().push(name.clone());
                with_database(url, &name)
            }
        }
    }

    /// Drops the databases made through a URL (the cluster goes away as a whole).
    pub async fn cleanup(&self) {
        if let PgTarget::Url { url, made } = self {
            let names = made.take();
            if names.is_empty() {
                return;
            }
            match connect(url).await {
                Ok(client) => {
                    for name in names {
                        if let Err(err) = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await {
                            eprintln!("capsync bench: could not drop database {name}: {err}");
                        }
                    }
                }
                Err(err) => eprintln!("capsync bench: could not drop the bench databases: {err:#}"),
            }
        }
    }
}

/// `url` (`postgres://[userinfo@]host[:port][/db][?params]`) naming database `db` instead.
fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let scheme_end = url.find("://").context("the --store URL has no scheme")? + 3;
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let after = &rest[authority_end..];
    let query = after.find('?').map(|q| &after[q..]).unwrap_or("");
    Ok(format!("{}{}/{db}{query}", &url[..scheme_end], &rest[..authority_end]))
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A connection of the bench's own that LISTENs on `channel` of the database at `url`, on a
/// thread and runtime of its own (so the scenario's work on the bench's thread does not delay
/// its clock): each notification's payload with the time it was read. Listens until the
/// receiver is dropped and the next notification comes, or the bench exits.
pub fn listen(url: &str, channel: &str) -> anyhow::Result<std::sync::mpsc::Receiver<(Instant, String)>> {
    let (url, listen) = (url.to_owned(), format!("LISTEN {channel}"));
    let (tx, rx) = std::sync::mpsc::channel();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(err) => return drop(ready_tx.send(Err(anyhow::Error::from(err)))),
        };
        runtime.block_on(async move {
            use futures::StreamExt as _;
            let (client, mut connection) = match tokio_postgres::connect(&url, NoTls).await {
                Ok(pair) => pair,
                Err(err) => return drop(ready_tx.send(Err(err.into()))),
            };
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            let subscribe = client.batch_execute(&listen);
            tokio::pin!(subscribe);
            // The connection is only driven by polling `messages`: drive both until LISTEN is in.
            loop {
                tokio::select! {
                    done = &mut subscribe => {
                        let _ = ready_tx.send(done.map_err(anyhow::Error::from));
                        break;
                    }
                    message = messages.next() => if message.is_none() { return; },
                }
            }
            while let Some(Ok(message)) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notification(n) = message {
                    if tx.send((Instant::now(), n.payload().to_owned())).is_err() {
                        return;
                    }
                }
            }
            // `client` lives until here: dropping it would end the connection.
        });
    });
    ready.recv().context("the listening thread ended")??;
    Ok(rx)
}

/// A connection to a database with capsync's schema, as the raw baselines use.
pub struct Raw {
    client: Client,
}

impl Raw {
    /// Connects to `url` and brings its schema to the store's (the same migrations).
    pub async fn open(url: &str) -> anyhow::Result<Raw> {
        let mut client = connect(url).await?;
        migrate::run(&mut client).await?;
        Ok(Raw { client })
    }

    /// The raw loop: the store's append (`store-postgres/src/append.rs`) as the store sends it
    /// (one `capsync_append` call per batch in autocommit, prepared once), for `ops` puts of
    /// ~200 bytes in batches of `batch` on one connection, on a new session. No RPC, no pool,
    /// no capsync process. Ops/s.
    pub async fn append_loop(&self, ops: u64, batch: u64) -> anyhow::Result<f64> {
        let c = &self.client;
        let session_id = uuid::Uuid::now_v7().to_string();
        let sid: i64 = c
            .query_one(
                "INSERT INTO sessions (id, title, created_at) VALUES ($1, 'raw', $2) RETURNING sid",
                &[&session_id, &(capsync_store_postgres::now_ms() as i64)],
            )
            .await?
            .get(0);
        let client_id = *uuid::Uuid::new_v4().as_bytes();
        let batches: Vec<IncomingBatch> = (0..ops)
            .step_by(batch as usize)
            .enumerate()
            .map(|(i, start)| IncomingBatch { client_id, batch_seq: i as u64 + 1, ops: puts(start..(start + batch).min(ops), "raw") })
            .collect();
        let call = c.prepare(sql::CALL).await?;
        let started = Instant::now();
        for b in &batches {
            append(c, &call, sid, &session_id, b).await?;
        }
        Ok(ops as f64 / started.elapsed().as_secs_f64())
    }

    /// PostgreSQL's own durable write, alone: `n` single-row INSERTs of ~200 bytes, each its own
    /// transaction (autocommit: one round trip whose COMMIT waits for the WAL flush), one after
    /// the other on one connection. (p50 ms, p99 ms).
    pub async fn insert_latency(&self, n: u64) -> anyhow::Result<(f64, f64)> {
        let c = &self.client;
        c.batch_execute("CREATE TABLE IF NOT EXISTS bench_insert (id BIGSERIAL PRIMARY KEY, data BYTEA NOT NULL)").await?;
        let insert = c.prepare("INSERT INTO bench_insert (data) VALUES ($1)").await?;
        let mut latencies = Vec::with_capacity(n as usize);
        for i in 0..n {
            let data = payload(i);
            let started = Instant::now();
            c.execute(&insert, &[&data]).await?;
            latencies.push(started.elapsed());
        }
        latencies.sort();
        Ok((ms(quantile(&latencies, 0.5)), ms(quantile(&latencies, 0.99))))
    }
}

/// One batch as the store appends it (`store-postgres/src/append.rs`): the same arguments
/// built from the batch, the same `capsync_append` call in autocommit (prepared once), the
/// same reading of its answer.
async fn append(c: &Client, call: &tokio_postgres::Statement, sid: i64, session_id: &str, batch: &IncomingBatch) -> anyhow::Result<()> {
    let args = AppendCall::new(sid, session_id, batch, &[]);
    let row = c.query_one(call, &args.params()).await?;
    let appended = interpret_append(&row, sid, batch)?;
    anyhow::ensure!(
        appended.applied.len() == batch.ops.len(),
        "the raw loop's ops all apply ({} of {} did)",
        appended.applied.len(),
        batch.ops.len()
    );
    Ok(())
}

/// Appends `ops` puts to a session directly through the store, in batches of 10,000 (S4's
/// preloaded session on PostgreSQL).
pub async fn preload(url: &str, session_id: &str, ops: u64) -> anyhow::Result<()> {
    let store = PgStore::connect(url).await?;
    let sid = store.session(session_id).await?.context("the preloaded session is missing")?.sid;
    let client_id = *uuid::Uuid::new_v4().as_bytes();
    for (i, start) in (0..ops).step_by(10_000).enumerate() {
        let batch = IncomingBatch { client_id, batch_seq: i as u64 + 1, ops: puts(start..(start + 10_000).min(ops), "pre") };
        store.append(sid, session_id, &batch, &[]).await?;
    }
    Ok(())
}


#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn a_url_names_another_database() {
        let cases = [
            ("postgres://u:p@h:5432/app", "postgres://u:p@h:5432/x"),
            ("postgresql://h/app?sslmode=require", "postgresql://h/x?sslmode=require"),
            ("postgres://u@h:1", "postgres://u@h:1/x"),
            ("postgres://h?application_name=a", "postgres://h/x?application_name=a"),
            ("postgres://[::1]:5432/app", "postgres://[::1]:5432/x"),
        ];
        for (url, want) in cases {
            assert_eq!(with_database(url, "x").unwrap(), want, "{url}");
        }
    }
}
