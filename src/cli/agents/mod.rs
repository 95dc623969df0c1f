//! `capsync import`, `capsync watch` and `capsync export`: the session stores of AI coding agents
//! (Codex rollouts, opencode's storage) in and out of capsync, through `capsync-agents`.
//!
//! An import walks a root for agent sessions. Each one becomes (or continues) one capsync
//! session, opened through a space (`Space.openSession`, keyed by `codex:<id>` /
//! `opencode:<id>`, idempotent) and attached in the outbox under that same name together with
//! an `agent_imports` row (the session, the space's token tag, the read position). Its records
//! are queued with their own deterministic opIds, a chunk at a time, each chunk in one
//! transaction with the reader's position, so a crash between two chunks never loses or doubles
//! a record; ops the outbox already holds are left out. Delivery runs alongside ([`deliver`]).
//!
//! - [`import`]: the pass over a root ([`import::Importer`]).
//! - [`deliver`]: syncing the refs the pass queued ops for, a few at a time.
//! - [`progress`]: the progress bar, `--json` lines, warnings and the summary.
//! - [`watch`]: `capsync watch`, a pass on each file notification and every few seconds.
//! - [`export`]: `capsync export`, a session written back in the agent's format.

mod deliver;
mod export;
mod import;
mod progress;
mod watch;

pub use export::{export, ExportArgs};
pub use watch::{watch, WatchArgs};

use super::client::OutboxArg;
use capsync_agents::Agent;
use capsync_schema::SturdyUri;
use clap::Args;
use deliver::{Deliverer, Mode};
use import::Importer;
use progress::Reporter;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// The agents whose sessions capsync imports.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentArg {
    /// OpenAI Codex CLI: rollouts under $CODEX_HOME/sessions (else ~/.codex/sessions).
    Codex,
    /// sst/opencode: opencode.db and storage/ under $XDG_DATA_HOME/opencode (else
    /// ~/.local/share/opencode).
    Opencode,
}

impl AgentArg {
    pub fn agent(self) -> Agent {
        match self {
            AgentArg::Codex => Agent::Codex,
            AgentArg::Opencode => Agent::Opencode,
        }
    }
}

/// What `import` and `watch` both take.
#[derive(Args, Debug)]
pub struct SourceArgs {
    /// The agent: codex or opencode.
    #[arg(value_enum)]
    agent: AgentArg,
    /// Where the agent keeps its sessions. Default: Codex's $CODEX_HOME/sessions (else
    /// ~/.codex/sessions); opencode's $XDG_DATA_HOME/opencode (else ~/.local/share/opencode).
    #[arg(value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The space URI (`capsync admin create-space`) that opens one capsync session per agent
    /// session. Prefer CAPSYNC_SPACE: a URI on the command line is visible to other local users.
    #[arg(long, env = "CAPSYNC_SPACE", hide_env_values = true, value_parser = super::UriParser, value_name = "URI")]
    space: SturdyUri,
    /// Progress, warnings and the summary as JSON lines on stdout (instead of a progress bar on
    /// a terminal).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    outbox: OutboxArg,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    #[command(flatten)]
    source: SourceArgs,
}

impl SourceArgs {
    /// The directory given, else the agent's default.
    fn root(&self) -> anyhow::Result<PathBuf> {
        let agent = self.agent.agent();
        match &self.dir {
            Some(dir) => Ok(dir.clone()),
            None => agent
                .default_root()
                .ok_or_else(|| anyhow::anyhow!("no HOME to find {}'s sessions under: name the directory", agent.name())),
        }
    }

    /// The importer and the deliverer of these arguments, sharing one count of acked ops.
    fn start(&self, mode: Mode) -> anyhow::Result<(Importer, Deliverer)> {
        let client = self.outbox.open()?;
        let acked = Arc::new(AtomicU64::new(0));
        let options = capsync_client::SyncOptions { acked_ops: Some(acked.clone()), ..client.options().clone() };
        let client = client.with_options(options);
        let reporter = Reporter::new(self.json, acked);
        let agent = self.agent.agent();
        let root = self.root()?;
        let importer = Importer::new(client.clone(), agent, root, self.space.clone(), self.outbox.tls.tls_ca.clone(), reporter);
        let deliverer = Deliverer::new(client, agent, mode);
        Ok((importer, deliverer))
    }
}

/// `capsync import codex|opencode [DIR] --space URI`: one pass over the root, then delivery of
/// everything queued. Exits non-zero when a session could not be opened or ops stay queued.
pub async fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let (mut importer, deliverer) = args.source.start(Mode::Once)?;
    deliverer.push_unacked()?;
    let delivering = tokio::task::spawn_local(deliverer.clone().run());
    let scanned = importer.scan(&deliverer).await;
    deliverer.close();
    let delivered = delivering.await.map_err(|e| anyhow::anyhow!("delivery stopped: {e}"))?;
    importer.reporter.finish();
    scanned?;
    importer.summary(&deliverer)?;
    let mut problems = Vec::new();
    if importer.totals.deferred > 0 {
        problems.push(format!(
            "{} session(s) could not be opened ({}); run the import again",
            importer.totals.deferred,
            importer.space_error().unwrap_or("the server could not be reached")
        ));
    }
    if let Err(problem) = delivered {
        problems.push(problem);
    }
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("; "));
    }
    Ok(ExitCode::SUCCESS)
}
