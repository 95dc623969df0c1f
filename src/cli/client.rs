//! Client commands: put, delete, push, sync, pull, status, tail. Each that names a session takes
//! a sturdy URI or the name of a ref attached in the outbox (`codex:<id>`, `ref-…`).

use anyhow::{bail, Context as _};
use capsync_client::{Change, Client, RefStatus};
use capsync_persistence::EntityKind;
use capsync_schema::SturdyUri;
use clap::Args;
use super::{render, Target};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct OutboxArg {
    /// The client database (outbox, refs, replicas). Default: $XDG_DATA_HOME/capsync/outbox.db,
    /// else ~/.local/share/capsync/outbox.db.
    #[arg(long, env = "CAPSYNC_OUTBOX", value_name = "PATH")]
    pub(super) outbox: Option<PathBuf>,
    /// How long acked ops stay in the outbox after their ack (90s, 30m, 12h, 7d): while kept,
    /// they are re-delivered to a server restored from an older backup. Older ones are pruned
    /// after each sync.
    #[arg(long, env = "CAPSYNC_KEEP_ACKED", default_value = "7d", value_parser = super::parse_duration, value_name = "DURATION")]
    keep_acked: u64,
    #[command(flatten)]
    pub(super) tls: super::TlsArg,
}

impl OutboxArg {
    pub(super) fn path(&self) -> anyhow::Result<PathBuf> {
        if let Some(path) = &self.outbox {
            return Ok(path.clone());
        }
        let base = match std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from(std::env::var_os("HOME").context("set --outbox (no HOME to default under)")?).join(".local/share"),
        };
        Ok(base.join("capsync").join("outbox.db"))
    }

    pub(super) fn open(&self) -> anyhow::Result<Client> {
        let path = self.path()?;
        let client = Client::open(&path).with_context(|| format!("opening the outbox {}", path.display()))?;
        let options = capsync_client::SyncOptions {
            tls_ca: self.tls.tls_ca.clone(),
            keep_acked: Duration::from_secs(self.keep_acked),
            ..client.options().clone()
        };
        Ok(client.with_options(options))
    }
}

#[derive(Args, Debug)]
pub struct PutArgs {
    /// Sturdy URI of the session or share to write to, or the name of an attached ref.
    #[arg(value_parser = super::TargetParser, value_name = "URI|REF")]
    target: Target,
    #[arg(long, value_parser = parse_kind)]
    kind: EntityKind,
    #[arg(long)]
    id: String,
    /// Parent id (a part's message).
    #[arg(long, default_value = "")]
    parent: String,
    /// The entity's data, a JSON value.
    #[arg(long)]
    data: String,
    #[command(flatten)]
    outbox: OutboxArg,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// A sturdy URI, or the name of an attached ref (`codex:<id>`, see `capsync status`).
    #[arg(value_parser = super::TargetParser, value_name = "URI|REF")]
    target: Target,
    #[arg(long, value_parser = parse_kind)]
    kind: EntityKind,
    #[arg(long)]
    id: String,
    #[command(flatten)]
    outbox: OutboxArg,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// A sturdy URI, or the name of an attached ref (`codex:<id>`, see `capsync status`).
    #[arg(value_parser = super::TargetParser, value_name = "URI|REF")]
    target: Target,
    /// JSON Lines: {"op":"put","kind":"part","id":"p1","parent":"m1","data":{...}} or
    /// {"op":"delete","kind":"message","id":"m1"}. Lines longer than 4 MiB are refused.
    #[arg(long, value_name = "PATH")]
    file: PathBuf,
    #[command(flatten)]
    outbox: OutboxArg,
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    /// Keep running: deliver new ops as they are queued, across disconnects.
    #[arg(long)]
    follow: bool,
    #[command(flatten)]
    outbox: OutboxArg,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// A sturdy URI, or the name of an attached ref (`codex:<id>`, see `capsync status`).
    #[arg(value_parser = super::TargetParser, value_name = "URI|REF")]
    target: Target,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    outbox: OutboxArg,
}

#[derive(Args, Debug)]
pub struct TailArgs {
    /// A sturdy URI, or the name of an attached ref (`codex:<id>`, see `capsync status`).
    #[arg(value_parser = super::TargetParser, value_name = "URI|REF")]
    target: Target,
    /// One JSON object per op: {"seq", "op", "kind", "id", "parent", "data"}.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    outbox: OutboxArg,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Only this ref (a name, or a URI used before).
    #[arg(value_parser = super::TargetParser, value_name = "URI|REF")]
    target: Option<Target>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    outbox: OutboxArg,
}

fn parse_kind(text: &str) -> Result<EntityKind, String> {
    EntityKind::from_name(text).ok_or_else(|| format!("unknown kind `{text}`; use session, message, part, diff or model"))
}

/// Attaches `uri` under its default name and returns that name.
fn attach(client: &Client, uri: &SturdyUri) -> anyhow::Result<String> {
    let name = Client::default_ref_name(uri);
    client.attach(&name, &uri.expose())?;
    Ok(name)
}

/// The ref a command works on: a URI is attached under its default name; a name must be
/// attached already.
pub(super) fn resolve(client: &Client, target: &Target) -> anyhow::Result<String> {
    match target {
        Target::Uri(uri) => attach(client, uri),
        Target::Ref(name) => {
            if !client.has_ref(name)? {
                bail!("no ref named {name} in the outbox (`capsync status` lists them)");
            }
            Ok(name.clone())
        }
    }
}

/// Syncs one ref; on failure says what stays queued.
async fn deliver(client: &Client, name: &str) -> anyhow::Result<capsync_client::SyncReport> {
    match client.sync(name).await {
        Ok(report) => Ok(report),
        Err(err) => {
            let queued = client.status()?.into_iter().find(|s| s.name == name).map(|s| s.counts.pending + s.counts.sent).unwrap_or(0);
            bail!("{err}; {queued} op(s) kept in the outbox (`capsync sync` delivers them later)")
        }
    }
}

pub async fn put(args: PutArgs) -> anyhow::Result<ExitCode> {
    let client = args.outbox.open()?;
    let name = resolve(&client, &args.target)?;
    let change = Change::Put { kind: args.kind, id: args.id, parent: args.parent, data: args.data.into_bytes() };
    client.enqueue(&name, [change])?;
    let report = deliver(&client, &name).await?;
    println!("acked (cursor {})", report.cursor);
    Ok(ExitCode::SUCCESS)
}

pub async fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let client = args.outbox.open()?;
    let name = resolve(&client, &args.target)?;
    client.enqueue(&name, [Change::Delete { kind: args.kind, id: args.id }])?;
    let report = deliver(&client, &name).await?;
    println!("acked (cursor {})", report.cursor);
    Ok(ExitCode::SUCCESS)
}

/// Longest line `push` reads: a 1 MiB `data` (the server's limit) with room for its JSON
/// escaping and the envelope. A longer line stops the read (never loaded whole).
pub const MAX_JSONL_LINE: usize = 4 * 1024 * 1024;

/// Reads every line first: one bad line and nothing from the file is queued. Each line is read
/// through a bounded reader, so a file with no line breaks (`/dev/zero`) costs at most one
/// line's worth of memory before it is refused.
fn read_jsonl(path: &PathBuf) -> anyhow::Result<Vec<Change>> {
    use std::io::{BufRead as _, Read as _};
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut changes = Vec::new();
    let mut buf = Vec::new();
    for number in 1.. {
        buf.clear();
        let read = (&mut reader).take(MAX_JSONL_LINE as u64 + 1).read_until(b'\n', &mut buf).with_context(|| format!("reading {}", path.display()))?;
        if read == 0 {
            break;
        }
        if buf.last() != Some(&b'\n') && buf.len() > MAX_JSONL_LINE {
            anyhow::bail!("{}: line {number} is longer than {MAX_JSONL_LINE} bytes", path.display());
        }
        let line = std::str::from_utf8(&buf).map_err(|_| anyhow::anyhow!("{}: line {number} is not UTF-8", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let change = capsync_client::jsonl::parse_line(line.trim_end_matches(['\n', '\r'])).map_err(|err| anyhow::anyhow!("{}: line {number}: {err}", path.display()))?;
        changes.push(change);
    }
    Ok(changes)
}

pub async fn push(args: PushArgs) -> anyhow::Result<ExitCode> {
    let changes = read_jsonl(&args.file)?;
    let client = args.outbox.open()?;
    let name = resolve(&client, &args.target)?;
    let total = changes.len() as u64;
    let started = Instant::now();
    client.enqueue(&name, changes).context("queueing the file's ops (none were queued)")?;
    let bar = progress_bar(total);
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let options = capsync_client::SyncOptions { acked_ops: Some(acked.clone()), ..client.options().clone() };
    let client = client.with_options(options);
    let sync = deliver(&client, &name);
    tokio::pin!(sync);
    let report = loop {
        tokio::select! {
            done = &mut sync => break done,
            _ = tokio::time::sleep(Duration::from_millis(100)), if !bar.is_hidden() => {
                bar.set_position(acked.load(std::sync::atomic::Ordering::Relaxed).min(total));
            }
        }
    };
    bar.finish_and_clear();
    report?;
    let secs = started.elapsed().as_secs_f64();
    println!("pushed {total} ops in {secs:.2} s ({:.0} ops/s)", total as f64 / secs.max(1e-9));
    Ok(ExitCode::SUCCESS)
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:40} {human_pos}/{human_len} ops acked, {elapsed} elapsed, eta {eta}") {
        bar.set_style(style);
    }
    bar
}

pub async fn sync(args: SyncArgs) -> anyhow::Result<ExitCode> {
    let client = args.outbox.open()?;
    if !args.follow {
        let mut failed = Vec::new();
        let (mut ops, mut duplicates, mut healed) = (0, 0, 0);
        // Every usable ref, not only those with queued ops: one whose acked ops are kept checks
        // that its server still has them (a server restored from a backup may not).
        for status in client.status()? {
            if !matches!(status.state.as_str(), "ok" | "unreachable") {
                continue;
            }
            match client.sync(&status.name).await {
                Ok(report) => {
                    ops += report.ops;
                    duplicates += report.duplicates;
                    healed += report.healed;
                }
                Err(err) => failed.push(format!("{}: {err}", status.name)),
            }
        }
        if !failed.is_empty() {
            bail!("{}", failed.join("; "));
        }
        if healed > 0 {
            println!("re-delivered {healed} acked ops to a server that had lost them (restored from a backup)");
        }
        println!("synced {ops} ops ({duplicates} already applied); the outbox is drained");
        return Ok(ExitCode::SUCCESS);
    }
    let stop = super::shutdown_signal();
    tokio::pin!(stop);
    let mut failures = 0u32;
    loop {
        let mut retry = false;
        for status in client.status()? {
            let has_work = status.counts.pending + status.counts.sent > 0;
            if !has_work || !matches!(status.state.as_str(), "ok" | "unreachable") {
                continue;
            }
            if let Err(err) = client.sync(&status.name).await {
                tracing::warn!(ref_name = %status.name, error = %err, "sync failed");
                retry |= err.is_retryable();
            }
        }
        failures = if retry { failures + 1 } else { 0 };
        let pause = if retry { capsync_client::sync::backoff(client.options(), failures) } else { Duration::from_millis(100) };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = &mut stop => return Ok(ExitCode::SUCCESS),
        }
    }
}

pub async fn pull(args: PullArgs) -> anyhow::Result<ExitCode> {
    let client = args.outbox.open()?;
    let name = resolve(&client, &args.target)?;
    let report = client.pull(&name).await?;
    let (cursor, entities) = client.replica(&name)?;
    let text = if args.json {
        render::to_json(&render::Replica { cursor, entities: entities.iter().map(render::EntityLine::of).collect() })
    } else {
        format!("{} entities at cursor {} ({} ops applied)", entities.len(), report.cursor, report.ops_applied)
    };
    write_stdout(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// Writes one line to stdout; a closed pipe (`capsync pull --json | head -c 1`) is an error to
/// report, not a panic as `println!` would make it.
fn write_stdout(line: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).context("writing to stdout")
}

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let client = args.outbox.open()?;
    let mut refs = client.status()?;
    if let Some(target) = &args.target {
        let name = match target {
            Target::Uri(uri) => Client::default_ref_name(uri),
            Target::Ref(name) => name.clone(),
        };
        refs.retain(|s| s.name == name);
        if refs.is_empty() {
            bail!("no ref named {name} in the outbox");
        }
    }
    if args.json {
        let refs: Vec<_> = refs.iter().map(status_json).collect();
        println!("{}", json!({ "refs": refs }));
    } else {
        // Names like codex:<uuid> are long: the column fits the longest.
        let w = refs.iter().map(|s| s.name.len()).max().unwrap_or(0).max(18);
        println!("{:<w$}  {:<13}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  URI", "NAME", "STATE", "PENDING", "SENT", "KEPT", "REJECTED", "CONFLICT", "CURSOR");
        for s in &refs {
            println!(
                "{:<w$}  {:<13}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {}",
                s.name, s.state, s.counts.pending, s.counts.sent, s.counts.acked, s.counts.rejected, s.counts.conflict, s.cursor, s.uri
            );
            if !s.last_error.is_empty() {
                println!("{:<w$}  last error: {}", "", s.last_error);
            }
            if s.healed > 0 {
                println!("{:<w$}  re-delivered {} acked ops to a server that had lost them (restored from a backup)", "", s.healed);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn status_json(s: &RefStatus) -> serde_json::Value {
    json!({
        "name": s.name,
        "uri": s.uri,
        "session_id": s.session_id,
        "state": s.state,
        "pending": s.counts.pending,
        "sent": s.counts.sent,
        "acked": s.counts.acked,
        "rejected": s.counts.rejected,
        "conflict": s.counts.conflict,
        "cursor": s.cursor,
        "last_error": s.last_error,
        "healed": s.healed,
    })
}

/// Prints ops as they are applied, following across disconnects and server restarts. Stops
/// (exit 0) once stdout is closed, so `capsync tail | head` ends when `head` does.
pub async fn tail(args: TailArgs) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let client = args.outbox.open()?;
    let name = resolve(&client, &args.target)?;
    let json = args.json;
    let closed = std::rc::Rc::new(tokio::sync::Notify::new());
    let print = {
        let closed = closed.clone();
        move |ops: &[capsync_persistence::LoggedOp]| {
            let mut out = std::io::stdout().lock();
            let written = ops.iter().try_for_each(|logged| writeln!(out, "{}", render::op_line(logged, json))).and_then(|()| out.flush());
            if let Err(err) = written {
                tracing::debug!(error = %err, "stdout closed; tail stops");
                closed.notify_one();
            }
        }
    };
    let stop = async move {
        tokio::select! {
            _ = super::shutdown_signal() => {}
            _ = closed.notified() => {}
        }
    };
    client.follow(&name, print, stop).await?;
    Ok(ExitCode::SUCCESS)
}
