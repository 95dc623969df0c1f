//! `capsync export URI|REF --format codex|opencode --to PATH`: a session written back in an
//! agent's own format, from the local replica (pulled first), so a session recorded on one
//! machine can be resumed on another.

use super::super::client::{resolve, OutboxArg};
use super::super::Target;
use super::AgentArg;
use capsync_agents::codex::export_codex;
use capsync_agents::opencode::export_opencode;
use capsync_agents::safety::is_plain_relative;
use capsync_agents::{Entity, EntityKind, ExportReport};
use clap::Args;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The session: a sturdy URI (a read share is enough) or an attached ref (`codex:<id>`).
    #[arg(value_parser = super::super::TargetParser, value_name = "URI|REF")]
    target: Target,
    /// The agent format to write: codex (a rollout, line for line as imported) or opencode
    /// (its JSON tree under PATH/storage).
    #[arg(long, value_enum)]
    format: AgentArg,
    /// Codex: the rollout file to write, or an existing directory (such as ~/.codex/sessions) to
    /// write it into at its original path (YYYY/MM/DD/rollout-….jsonl). opencode: the data
    /// directory to write storage/ into.
    #[arg(long, value_name = "PATH")]
    to: PathBuf,
    /// Replace a rollout file that exists already.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    outbox: OutboxArg,
}

pub async fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let client = args.outbox.open()?;
    let name = resolve(&client, &args.target)?;
    if let Err(err) = client.pull(&name).await {
        let (cursor, entities) = client.replica(&name)?;
        if cursor == 0 && entities.is_empty() {
            anyhow::bail!("pulling {name}: {err}");
        }
        eprintln!("capsync: could not pull {name} ({err}); exporting the local replica at cursor {cursor}");
    }
    let (_, entities) = client.replica(&name)?;
    let report = match args.format {
        AgentArg::Codex => export_rollout(&entities, &args.to, args.force)?,
        AgentArg::Opencode => {
            let report = export_opencode(entities.iter(), &args.to)?;
            if report.written == 0 {
                anyhow::bail!("{name} holds no opencode session ({} entities of other sources)", report.skipped);
            }
            println!("wrote {} file(s) under storage/ of {}", report.written, args.to.display());
            report
        }
    };
    if !report.missing.is_empty() {
        let shown: Vec<&str> = report.missing.iter().take(10).map(String::as_str).collect();
        let more = report.missing.len().saturating_sub(shown.len());
        let more = if more > 0 { format!(" and {more} more") } else { String::new() };
        eprintln!("capsync: the export is short of {}: {}{more}", report.missing.len(), shown.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the rollout through a temporary file in the destination's directory, renamed into
/// place once complete.
fn export_rollout(entities: &[Entity], to: &Path, force: bool) -> anyhow::Result<ExportReport> {
    let dest = if to.is_dir() {
        let file = original_file(entities).ok_or_else(|| anyhow::anyhow!("the session names no rollout file of its own: give --to a file name"))?;
        to.join(file)
    } else {
        to.to_owned()
    };
    if dest.exists() && !force {
        anyhow::bail!("{} exists; --force replaces it", dest.display());
    }
    let dir = dest.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    let temp = tempfile::NamedTempFile::new_in(dir).map_err(|e| anyhow::anyhow!("writing into {}: {e}", dir.display()))?;
    let mut out = std::io::BufWriter::new(temp);
    let report = export_codex(entities.iter(), &mut out)?;
    if report.written == 0 {
        anyhow::bail!("the session holds no Codex rollout ({} entities of other sources)", report.skipped);
    }
    out.flush()?;
    let temp = out.into_inner().map_err(|e| anyhow::anyhow!("writing {}: {}", dest.display(), e.error()))?;
    temp.as_file().sync_all()?;
    temp.persist(&dest).map_err(|e| anyhow::anyhow!("writing {}: {}", dest.display(), e.error))?;
    println!("wrote {} line(s) to {}", report.written, dest.display());
    Ok(report)
}

/// The rollout's path relative to Codex's sessions directory, as the session entity recorded
/// it at import (only a plain relative path to a rollout is used).
fn original_file(entities: &[Entity]) -> Option<String> {
    let session = entities.iter().find(|e| e.kind == EntityKind::Session)?;
    let data: serde_json::Value = serde_json::from_slice(&session.data).ok()?;
    let file = data.get("file")?.as_str()?;
    let name = file.rsplit('/').next()?;
    let name = name.strip_suffix(".zst").unwrap_or(name);
    (is_plain_relative(file) && name.starts_with("rollout-") && name.ends_with(".jsonl")).then(|| match file.strip_suffix(".zst") {
        // A compressed rollout exports decompressed.
        Some(plain) => plain.to_owned(),
        None => file.to_owned(),
    })
}
