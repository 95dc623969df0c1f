//! `capsync watch codex|opencode [DIR] --space URI`: an import that keeps running.
//!
//! A pass runs at the start, after each burst of file notifications (`notify`, debounced), and
//! every `--rescan` interval in any case (notifications can be lost or unavailable). Each pass
//! queues what is new with the reader's position in the same transaction, and delivery runs
//! continuously, retrying with backoff while the server is away. SIGINT or SIGTERM stop it
//! cleanly; a kill at any moment loses nothing, and a restart goes on from the positions and
//! the queue the outbox holds. A ref or a space the server refuses (revoked...) stops the
//! watcher with one line and a non-zero exit; the queue is kept.

use super::deliver::Mode;
use super::SourceArgs;
use capsync_agents::Agent;
use clap::Args;
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher as _};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct WatchArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// How often the root is scanned again even without file notifications (90s, 5s...).
    #[arg(long, default_value = "5s", value_parser = super::super::parse_duration, value_name = "DURATION")]
    rescan: u64,
    /// How long a burst of file notifications is waited out before a pass, in milliseconds.
    #[arg(long, default_value_t = 300, value_name = "MS")]
    debounce_ms: u64,
}

pub async fn watch(args: WatchArgs) -> anyhow::Result<ExitCode> {
    let (mut importer, deliverer) = args.source.start(Mode::Forever)?;
    let agent = args.source.agent.agent();
    deliverer.push_unacked()?;
    let mut delivering = tokio::task::spawn_local(deliverer.clone().run());
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel::<()>();
    let root = args.source.root()?;
    let _watcher = match notifications(agent, &root, tx) {
        Ok(watcher) => Some(watcher),
        Err(err) => {
            importer.reporter.info(&format!("file notifications are not available ({err}); scanning every {} s", args.rescan.max(1)));
            None
        }
    };
    let rescan = Duration::from_secs(args.rescan.max(1));
    let debounce = Duration::from_millis(args.debounce_ms);
    let stop = super::super::shutdown_signal();
    tokio::pin!(stop);
    importer.reporter.info(&format!("watching {} sessions; Ctrl-C stops", agent.name()));
    // Each pass, then a wait for a notification (and the burst to settle), the rescan
    // interval or a signal; a refusal in delivery ends it all.
    let refused = loop {
        tokio::select! {
            scanned = importer.scan(&deliverer) => if let Err(err) = scanned { break Some(format!("{err:#}")) },
            delivered = &mut delivering => break refusal(delivered),
            _ = &mut stop => break None,
        }
        deliverer.push_unacked()?;
        let wait = tokio::time::sleep(rescan);
        tokio::pin!(wait);
        let next = loop {
            for note in deliverer.take_notes() {
                importer.reporter.info(&note);
            }
            tokio::select! {
                _ = &mut stop => break Next::Stop,
                delivered = &mut delivering => break Next::Refused(refusal(delivered)),
                _ = &mut wait => break Next::Pass,
                Some(()) = events.recv() => {
                    tokio::time::sleep(debounce).await;
                    while events.try_recv().is_ok() {}
                    break Next::Pass;
                }
                // Notes (the server away or back) show without waiting for the next pass.
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        };
        match next {
            Next::Pass => {}
            Next::Stop => break None,
            Next::Refused(reason) => break reason,
        }
    };
    delivering.abort();
    for note in deliverer.take_notes() {
        importer.reporter.info(&note);
    }
    importer.reporter.finish();
    let kept = deliverer.unacked()?;
    if let Some(reason) = refused {
        anyhow::bail!("{reason}; the watcher stops ({kept} op(s) kept in the outbox)");
    }
    importer.reporter.summary(agent.name(), &importer.totals, kept);
    Ok(ExitCode::SUCCESS)
}

enum Next {
    Pass,
    Stop,
    Refused(Option<String>),
}

/// Why delivery ended (it runs until a ref is refused).
fn refusal(delivered: Result<Result<(), String>, tokio::task::JoinError>) -> Option<String> {
    Some(match delivered {
        Ok(Err(reason)) => reason,
        Ok(Ok(())) => "delivery ended".to_owned(),
        Err(e) => format!("delivery stopped: {e}"),
    })
}

/// File notifications under the root, each a `()` on `tx`: for Codex the whole tree; for
/// opencode the data directory itself (`opencode.db` and its WAL) and its `storage/` tree.
/// Opening and reading files (what a pass does) notifies nothing.
fn notifications(agent: Agent, root: &Path, tx: tokio::sync::mpsc::UnboundedSender<()>) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if relevant(&event.kind) {
                let _ = tx.send(());
            }
        }
    })?;
    match agent {
        Agent::Codex => watcher.watch(root, RecursiveMode::Recursive)?,
        Agent::Opencode => {
            watcher.watch(root, RecursiveMode::NonRecursive)?;
            let storage = root.join("storage");
            if storage.is_dir() {
                watcher.watch(&storage, RecursiveMode::Recursive)?;
            }
        }
    }
    Ok(watcher)
}

fn relevant(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        _ => false,
    }
}
