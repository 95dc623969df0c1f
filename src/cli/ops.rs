//! Operator commands: `capsync backup` and `capsync restore` of a SQLite data dir.
//!
//! A backup is taken while the server runs (one consistent snapshot, see
//! `capsync_persistence::server::backup`). A restore only fills a new or empty data dir that no
//! server holds; the restored server writes a fresh `admin.uri` on its first start (the backup
//! holds token hashes, never the admin URI itself, so earlier admin tokens stop working),
//! while session and share tokens redeem as before and revoked ones stay revoked.

use anyhow::{bail, Context as _};
use capsync_persistence::server::backup;
use capsync_server::datadir::{DataDirLock, LOCK_FILE};
use clap::Args;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::PathBuf;
use std::process::ExitCode;

/// The server database inside a data dir.
const DB_FILE: &str = "capsync.db";

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// The data dir of the server to back up (it may be running).
    #[arg(long, default_value = "./capsync-data", value_name = "DIR")]
    data_dir: PathBuf,
    /// Where to write the backup; must not exist (created 0600).
    #[arg(long, value_name = "FILE")]
    to: PathBuf,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// A file written by `capsync backup`.
    #[arg(long, value_name = "FILE")]
    from: PathBuf,
    /// A new or empty data dir that no server is using (created 0700 if missing).
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
}

pub fn backup(args: BackupArgs) -> anyhow::Result<ExitCode> {
    let info = backup::backup(&args.data_dir.join(DB_FILE), &args.to).context("backup failed")?;
    println!(
        "backed up {} sessions, {} ops (schema v{}, {} bytes) to {}",
        info.sessions,
        info.ops,
        info.schema_version,
        info.bytes,
        args.to.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn restore(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let dir = &args.data_dir;
    // A server's lock file alone does not make a dir "not empty", but a server holding it does.
    let in_use = |err| anyhow::anyhow!("refusing to restore: {err}");
    let held = if dir.join(LOCK_FILE).exists() { Some(DataDirLock::acquire(dir).map_err(in_use)?) } else { None };
    refuse_unless_empty(dir)?;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Held for the whole restore, so no server can start on the dir half-way.
    let _owner = match held {
        Some(lock) => lock,
        None => DataDirLock::acquire(dir).map_err(in_use)?,
    };
    refuse_unless_empty(dir)?;
    let info = backup::restore(&args.from, &dir.join(DB_FILE)).context("restore failed")?;
    println!(
        "restored {} sessions, {} ops (schema v{}) into {}; `capsync serve --data-dir {}` writes a new admin.uri on its first start",
        info.sessions,
        info.ops,
        info.schema_version,
        dir.display(),
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Fails unless `dir` is missing or holds nothing but a server's lock file.
fn refuse_unless_empty(dir: &std::path::Path) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    if let Some(entry) = entries.filter_map(|e| e.ok()).find(|e| e.file_name() != LOCK_FILE) {
        bail!(
            "refusing to restore: {} is not empty (it holds {}); restore into a new or empty data dir",
            dir.display(),
            entry.file_name().to_string_lossy()
        );
    }
    Ok(())
}
