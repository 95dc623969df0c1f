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
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = capsync_server::ServerConfig::new(&args.data_dir);
    config.max_connections = args.max_connections.max(1);
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
    capsync_server::serve_blocking(&args.listen, config, async {
        super::shutdown_signal().await;
        tracing::info!("shutdown signal received");
    })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(ExitCode::SUCCESS)
}
