//! The throwaway cluster lives in `capsync_store_postgres::testing`; the async helpers these
//! tests use on top of it are here.

#![allow(dead_code)]

pub use capsync_store_postgres::testing::*;

/// A URL for a new, empty database of the cluster.
pub async fn fresh_db() -> String {
    fresh_database()
}

/// A plain client (its connection driven by a spawned task).
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect to the test cluster");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

