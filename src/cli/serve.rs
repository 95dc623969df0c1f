//! `capsync serve`.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on. Loopback by default: tokens travel in clear text without TLS.
    #[arg(long, default_value = "127.0.0.1:7420")]
    listen: String,
    /// Directory for the SQLite database and admin.uri (created 0700 if missing).
    #[arg(long, default_value = "./capsync-data")]
    data_dir: PathBuf,
    /// Connections served at once; more wait in the listen backlog.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Serve TLS with this PEM certificate chain (clients then use capsyncs:// URIs).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Allow listening beyond loopback without TLS (tokens would cross the network in clear).
    #[arg(long)]
    insecure_plaintext: bool,
    /// Largest Cap'n Proto message the server reads; a larger one closes the connection.
    #[arg(long, default_value_t = 16 * 1024 * 1024, value_name = "BYTES")]
    max_message_bytes: usize,
    /// Ops one batch may carry (capsync/too-large beyond).
    #[arg(long, default_value_t = 10_000)]
    max_batch_ops: usize,
    /// Entity bytes one batch may carry (capsync/too-large beyond).
    #[arg(long, default_value_t = 8 * 1024 * 1024, value_name = "BYTES")]
    max_batch_bytes: usize,
    /// Size of one entity's data (the op is rejected beyond).
    #[arg(long, default_value_t = 1024 * 1024, value_name = "BYTES")]
    max_data_bytes: usize,
    /// Calls one connection may have in flight (capsync/overloaded beyond).
    #[arg(long, default_value_t = 256)]
    max_calls_in_flight: usize,
    /// Close a connection that has not completed its first frame, or has been inside a frame,
    /// for this long (90s, 1m...).
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    frame_timeout: u64,
    /// Failed redeems per peer address per minute before its redeems are refused for the rest
    /// of that minute (capsync/overloaded).
    #[arg(long, default_value_t = 20)]
    max_failed_redeems: u32,
    /// Connections one peer address may hold open (0 = no limit; set 0 behind a load
    /// balancer, whose address every connection shares).
    #[arg(long, default_value_t = 64)]
    max_connections_per_address: usize,
    /// Close a connection that holds no live capability after this long without a frame.
    #[arg(long, default_value = "30s", value_parser = super::parse_duration)]
    idle_timeout: u64,
    /// Bytes of large requests one connection may have read and not yet had answered; past
    /// it the server stops reading that connection until its calls are answered.
    #[arg(long, default_value_t = 64 * 1024 * 1024, value_name = "BYTES")]
    max_connection_bytes: usize,
    /// The same budget over all connections together.
    #[arg(long, default_value_t = 256 * 1024 * 1024, value_name = "BYTES")]
    max_server_bytes: usize,
    /// Subscriptions one connection may hold (capsync/overloaded beyond).
    #[arg(long, default_value_t = 64)]
    max_subscriptions_per_connection: usize,
    /// Serve Prometheus metrics at /metrics, and /healthz and /readyz, over HTTP on this
    /// address (`--metrics-listen` alone: 127.0.0.1:9464). Off by default. The endpoint has no
    /// authentication and shows no secret; keep it on loopback or a private network.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:9464")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Keep the server's state in PostgreSQL instead of SQLite in --data-dir (which then holds
    /// only admin.uri): a libpq-style URL, postgres://USER[:PASSWORD]@HOST:PORT/DATABASE, with
    /// libpq's TLS settings (e.g. ?sslmode=verify-full&sslrootcert=CA.pem; default
    /// sslmode=prefer). The role must be able to create tables in that database. Without it:
    /// SQLite.
    #[arg(long, env = "CAPSYNC_STORE", hide_env_values = true, value_name = "URL", value_parser = StoreUrlParser)]
    store: Option<StoreUrl>,
    /// The HOST:PORT clients should dial, written into admin.uri and so into every URI made
    /// from it: behind a load balancer, the balancer's address. Default: the listen address.
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
}

/// A PostgreSQL URL; its `Debug` hides it (it may hold a password).
#[derive(Clone)]
struct StoreUrl(String);

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreUrl(<redacted>)")
    }
}

/// Accepts `postgres://` and `postgresql://` URLs. The error never echoes the value (clap's
/// own would): it may hold a password.
#[derive(Clone, Copy)]
struct StoreUrlParser;

impl clap::builder::TypedValueParser for StoreUrlParser {
    type Value = StoreUrl;

    fn parse_ref(&self, _: &clap::Command, _: Option<&clap::Arg>, value: &std::ffi::OsStr) -> Result<StoreUrl, clap::Error> {
        use clap::error::ErrorKind;
        let text = value.to_str().ok_or_else(|| clap::Error::raw(ErrorKind::InvalidUtf8, "the --store URL is not UTF-8\n"))?;
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Ok(StoreUrl(text.to_owned()))
        } else {
            Err(clap::Error::raw(ErrorKind::ValueValidation, "--store takes a postgres:// or postgresql:// URL (without it: SQLite in --data-dir)\n"))
        }
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = capsync_server::ServerConfig::new(&args.data_dir);
    config.max_connections = args.max_connections.max(1);
    config.metrics_listen = args.metrics_listen;
    config.store_url = args.store.map(|url| url.0);
    config.advertise = args.advertise;
    let limits = &mut config.limits;
    limits.traversal_limit_words = (args.max_message_bytes / 8).max(1024);
    limits.max_batch_ops = args.max_batch_ops;
    limits.max_batch_bytes = args.max_batch_bytes;
    limits.max_data_bytes = args.max_data_bytes;
    limits.max_calls_in_flight = args.max_calls_in_flight.max(1);
    limits.frame_timeout = std::time::Duration::from_secs(args.frame_timeout.max(1));
    limits.max_failed_redeems = args.max_failed_redeems.max(1);
    limits.max_connections_per_address = args.max_connections_per_address;
    limits.idle_timeout = std::time::Duration::from_secs(args.idle_timeout.max(1));
    limits.max_connection_bytes_in_flight = args.max_connection_bytes.max(1);
    limits.max_server_bytes_in_flight = args.max_server_bytes.max(1);
    limits.max_subscriptions_per_connection = args.max_subscriptions_per_connection.max(1);
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls = Some(capsync_server::tls::server_config(cert, key).map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    if config.tls.is_none() && !args.insecure_plaintext {
        let addrs: Vec<std::net::SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(args.listen.as_str())
            .map_err(|e| anyhow::anyhow!("cannot resolve --listen {}: {e}", args.listen))?
            .collect();
        if addrs.iter().any(|a| !a.ip().is_loopback()) {
            anyhow::bail!(
                "refusing to listen on {} without TLS: sturdy refs are bearer secrets; pass --tls-cert and --tls-key, or --insecure-plaintext",
                args.listen
            );
        }
    }
    // Announced on stdout once the data dir is ours and the database is open, so scripts and
    // tests using port 0 learn the port, and "listening" means a client can redeem.
    let announce = |addr: std::net::SocketAddr| {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "capsync listening on {addr}");
        let _ = out.flush();
    };
    capsync_server::serve_blocking(&args.listen, config, announce, async {
        super::shutdown_signal().await;
        tracing::info!("shutdown signal received");
    })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(ExitCode::SUCCESS)
}
