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
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = capsync_server::ServerConfig::new(&args.data_dir);
    config.max_connections = args.max_connections.max(1);
    capsync_server::serve_blocking(&args.listen, config, async {
        super::shutdown_signal().await;
        tracing::info!("shutdown signal received");
    })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(ExitCode::SUCCESS)
}
