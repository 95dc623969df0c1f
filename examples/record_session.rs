//! Records a tiny agent session through the client API: queue changes durably, deliver them,
//! pull the session back into a local replica, and show the outbox's status.
//!
//! ```sh
//! cargo run --release -- serve &                                  # a server on 127.0.0.1:7420
//! URI=$(cargo run --release -- admin create-session --title demo)
//! cargo run --release --example record_session -- "$URI" ./example-outbox.db
//! ```

use capsync_client::{Change, Client};
use capsync_persistence::EntityKind;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let uri = args.next().ok_or("usage: record_session SESSION_URI [OUTBOX_PATH]")?;
    let outbox = args.next().unwrap_or_else(|| "example-outbox.db".into());

    let client = Client::open(&outbox)?;
    client.attach("demo", &uri)?;

    // Each enqueue is durable when it returns: a crash from here on loses nothing.
    client.enqueue(
        "demo",
        [
            Change::Put { kind: EntityKind::Message, id: "m1".into(), parent: String::new(), data: br#"{"role":"user"}"#.to_vec() },
            Change::Put { kind: EntityKind::Part, id: "m1-p1".into(), parent: "m1".into(), data: br#"{"text":"Fix the build"}"#.to_vec() },
            Change::Put { kind: EntityKind::Message, id: "m2".into(), parent: String::new(), data: br#"{"role":"assistant"}"#.to_vec() },
        ],
    )?;

    // capnp-rpc is !Send: run the async parts on a LocalSet.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    tokio::task::LocalSet::new().block_on(&runtime, async {
        let sent = client.sync("demo").await?;
        println!("delivered {} ops in {} batches; server cursor {}", sent.ops, sent.batches, sent.cursor);
        let pulled = client.pull("demo").await?;
        println!("replica at cursor {}", pulled.cursor);
        Ok::<_, capsync_client::ClientError>(())
    })?;

    let (_, entities) = client.replica("demo")?;
    for e in entities {
        println!("{:<8} {:<6} {}", e.kind.name(), e.id, String::from_utf8_lossy(&e.data));
    }
    for s in client.status()? {
        println!("{} {} acked={} pending={} ({})", s.name, s.state, s.counts.acked, s.counts.pending, s.uri);
    }
    Ok(())
}
