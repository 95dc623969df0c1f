//! TLS to PostgreSQL with libpq's `sslmode` (src/tls.rs), against a real cluster that serves
//! TLS only (`testing::tls_cluster`: a certificate for `db.capsync.test` and 127.0.0.1 signed
//! by a test CA, `hostssl` lines only in pg_hba.conf).

use capsync_store_postgres::notify::{ListenOptions, Notice};
use capsync_store_postgres::testing::{tls_cluster, Cluster, SCRAM_PASSWORD, SCRAM_USER, TLS_HOST, USER};
use capsync_store_postgres::{PgError, PgOptions, PgStore};
use std::time::Duration;

fn cluster() -> &'static Cluster {
    tls_cluster()
}

fn ca() -> String {
    cluster().tls().unwrap().ca.display().to_string()
}

fn other_ca() -> String {
    cluster().tls().unwrap().other_ca.display().to_string()
}

/// A URL for a fresh database reached at 127.0.0.1 under the host name `host`, with `params`.
fn url_as(host: &str, params: &str) -> String {
    let db = cluster().fresh_database();
    let db = db.rsplit('/').next().unwrap();
    let port = cluster().port;
    let sep = if params.is_empty() { "" } else { "&" };
    format!("postgres://{USER}@{host}:{port}/{db}?hostaddr=127.0.0.1{sep}{params}")
}

fn url(params: &str) -> String {
    url_as(TLS_HOST, params)
}

async fn connect(url: &str) -> Result<PgStore, PgError> {
    let options = PgOptions { connect_timeout: Duration::from_secs(10), ..PgOptions::default() };
    PgStore::connect_with(url, options).await
}

/// Whether the pool's connection is encrypted, as the server sees it.
async fn encrypted(store: &PgStore) -> bool {
    let client = store.pool().get().await.unwrap();
    client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn verify_full_with_the_ca_connects_encrypted_and_so_does_listen() {
    let store = connect(&url(&format!("sslmode=verify-full&sslrootcert={}", ca()))).await.unwrap();
    assert!(encrypted(&store).await);
    // The LISTEN connection (not pooled) goes over TLS too: with hostssl only, it could not
    // connect otherwise. Every backend of this database is encrypted.
    let mut notices = store.listen(ListenOptions::default());
    let notice = tokio::time::timeout(Duration::from_secs(20), notices.recv()).await.unwrap();
    assert!(matches!(notice, Some(Notice::Listening)), "{notice:?}");
    let client = store.pool().get().await.unwrap();
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    let (encrypted, all): (i64, i64) = (row.get(0), row.get(1));
    assert!(all >= 2 && encrypted == all, "{encrypted} of {all} connections are encrypted");
}

#[tokio::test]
async fn verify_full_checks_an_ip_address_against_the_certificate_too() {
    let port = cluster().port;
    let db = cluster().fresh_database();
    let db = db.rsplit('/').next().unwrap();
    let url = format!("postgres://{USER}@127.0.0.1:{port}/{db}?sslmode=verify-full&sslrootcert={}", ca());
    let store = connect(&url).await.unwrap();
    assert!(encrypted(&store).await);
}

#[tokio::test]
async fn verify_full_with_another_ca_fails_clearly() {
    for mode in ["verify-full", "verify-ca", "require"] {
        let err = connect(&url(&format!("sslmode={mode}&sslrootcert={}", other_ca()))).await.err().unwrap();
        let text = err.to_string();
        assert!(text.contains("not signed by a trusted CA"), "{mode}: {text}");
        assert!(text.contains(&other_ca()), "{mode}: names the roots: {text}");
    }
}

#[tokio::test]
async fn verify_full_refuses_a_host_name_the_certificate_does_not_name() {
    let err = connect(&url_as("wrong.capsync.test", &format!("sslmode=verify-full&sslrootcert={}", ca())))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not valid for the host name `wrong.capsync.test`"), "{err}");
    // verify-ca checks the chain only.
    let store =
        connect(&url_as("wrong.capsync.test", &format!("sslmode=verify-ca&sslrootcert={}", ca()))).await.unwrap();
    assert!(encrypted(&store).await);
}

#[tokio::test]
async fn require_without_a_root_certificate_encrypts_without_checking() {
    let store = connect(&url_as("wrong.capsync.test", "sslmode=require")).await.unwrap();
    assert!(encrypted(&store).await);
}

#[tokio::test]
async fn prefer_is_the_default_and_allow_retries_with_tls() {
    for params in ["", "sslmode=prefer", "sslmode=allow"] {
        let store = connect(&url(params)).await.unwrap_or_else(|e| panic!("{params}: {e}"));
        assert!(encrypted(&store).await, "{params}");
    }
}

#[tokio::test]
async fn disable_is_refused_by_a_hostssl_only_server() {
    let err = connect(&url("sslmode=disable")).await.err().unwrap().to_string();
    assert!(err.contains("pg_hba.conf") && err.contains("no encryption"), "{err}");
}

#[tokio::test]
async fn scram_binds_itself_to_the_tls_channel() {
    let port = cluster().port;
    let db = cluster().fresh_database();
    let db = db.rsplit('/').next().unwrap();
    // tokio-postgres fails channel_binding=require unless the connector gives the server's
    // certificate hash and the server offers SCRAM-SHA-256-PLUS.
    let url = format!(
        "postgres://{SCRAM_USER}:{SCRAM_PASSWORD}@127.0.0.1:{port}/{db}?sslmode=require&channel_binding=require"
    );
    let options = PgOptions { migrate: false, ..PgOptions::default() };
    let store = PgStore::connect_with(&url, options.clone()).await.unwrap();
    assert!(encrypted(&store).await);
    let wrong = url.replace(SCRAM_PASSWORD, "not-the-password");
    let err = PgStore::connect_with(&wrong, options).await.err().unwrap().to_string();
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(!err.contains("not-the-password"), "{err}");
}
