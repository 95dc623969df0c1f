//! What an import or a watch tells its user: a progress bar on a terminal, JSON lines with
//! `--json`, else a line on stderr now and then; warnings about files skipped or read in part
//! (named relative to the root, each once); and a summary.
//!
//! With `--json`, stdout carries one object a line, each with an `event`: `progress` (the
//! [`Totals`]), `warning` (`path`, `reason`), `info` (`message`) and, at the end, `summary`
//! (the totals, `ops_kept`, and every warning in `warned`).

use capsync_agents::Warning;
use serde::Serialize;
use serde_json::json;
use std::collections::HashSet;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counts of one import, or of a watch so far.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    /// Agent sessions found.
    pub sessions: u64,
    /// Sessions the space created a capsync session for (the rest existed already).
    pub new_sessions: u64,
    /// Sessions with nothing new to read since the last import.
    pub unchanged: u64,
    /// Records queued (records the outbox already held are not counted).
    pub records_queued: u64,
    /// Ops the server acknowledged.
    pub ops_delivered: u64,
    /// Warnings: files skipped (unreadable, not the agent's, over a cap, a symlink out of the
    /// root) or read in part (a line not JSON, over the line cap...).
    pub warnings: u64,
    /// Sessions not opened because the server could not be reached (tried again later).
    pub deferred: u64,
}

enum Mode {
    Bar(indicatif::ProgressBar),
    Json,
    Plain,
}

/// Keeps at most this many warnings for the summary (the rest are counted).
const KEPT_WARNINGS: usize = 1000;

pub struct Reporter {
    mode: Mode,
    acked: Arc<AtomicU64>,
    last: Option<Instant>,
    every: Duration,
    /// Warnings already shown, so a watch shows each once.
    shown: HashSet<(String, String)>,
    pub warnings: Vec<Warning>,
}

impl Reporter {
    pub fn new(json: bool, acked: Arc<AtomicU64>) -> Reporter {
        let (mode, every) = if json {
            (Mode::Json, Duration::from_secs(1))
        } else if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = indicatif::ProgressBar::new_spinner();
            if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(200));
            (Mode::Bar(bar), Duration::from_millis(200))
        } else {
            (Mode::Plain, Duration::from_secs(10))
        };
        Reporter { mode, acked, last: None, every, shown: HashSet::new(), warnings: Vec::new() }
    }

    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// A warning about a file: shown once (a watch finds it again on every pass), kept for the summary.
    /// Returns whether it was new.
    pub fn warning(&mut self, warning: Warning) -> bool {
        if !self.shown.insert((warning.path.clone(), warning.reason.clone())) {
            return false;
        }
        match &self.mode {
            Mode::Bar(bar) => bar.println(format!("warning: {warning}")),
            Mode::Json => stdout_line(&json!({"event": "warning", "path": warning.path, "reason": warning.reason})),
            Mode::Plain => eprintln!("capsync: warning: {warning}"),
        }
        if self.warnings.len() < KEPT_WARNINGS {
            self.warnings.push(warning);
        }
        true
    }

    /// A line for the user (a watch starting, the server going away and coming back).
    pub fn info(&self, message: &str) {
        match &self.mode {
            Mode::Bar(bar) => bar.println(message),
            Mode::Json => stdout_line(&json!({"event": "info", "message": message})),
            Mode::Plain => eprintln!("capsync: {message}"),
        }
    }

    /// Progress, at most every so often unless `force`.
    pub fn tick(&mut self, totals: &Totals, force: bool) {
        if !force && self.last.is_some_and(|t| t.elapsed() < self.every) {
            return;
        }
        let first = self.last.is_none();
        self.last = Some(Instant::now());
        let totals = Totals { ops_delivered: self.acked(), ..totals.clone() };
        match &self.mode {
            Mode::Bar(bar) => bar.set_message(describe(&totals)),
            Mode::Json => {
                let mut line = serde_json::to_value(&totals).unwrap_or_default();
                line["event"] = "progress".into();
                stdout_line(&line);
            }
            // Without a terminal, a line every 10 s of a long pass (the summary ends it).
            Mode::Plain => {
                if !first && !force {
                    eprintln!("capsync: {}", describe(&totals));
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Mode::Bar(bar) = &self.mode {
            bar.finish_and_clear();
        }
    }

    /// The summary: a few lines of text, or one JSON line.
    pub fn summary(&self, agent: &str, totals: &Totals, kept: u64) {
        let totals = Totals { ops_delivered: self.acked(), ..totals.clone() };
        if let Mode::Json = self.mode {
            let mut line = serde_json::to_value(&totals).unwrap_or_default();
            line["event"] = "summary".into();
            line["agent"] = agent.into();
            line["ops_kept"] = kept.into();
            line["warned"] = self.warnings.iter().map(|w| json!({"path": w.path, "reason": w.reason})).collect();
            stdout_line(&line);
            return;
        }
        let mut text = format!("{agent}: {}", describe(&totals));
        if kept > 0 {
            text.push_str(&format!("; {kept} op(s) kept in the outbox"));
        }
        if totals.warnings > 0 {
            text.push_str(&format!("\nwarnings ({}):", totals.warnings));
            for w in &self.warnings {
                text.push_str(&format!("\n  {w}"));
            }
            if (self.warnings.len() as u64) < totals.warnings {
                text.push_str(&format!("\n  ... and {} more", totals.warnings - self.warnings.len() as u64));
            }
        }
        stdout_line(&text);
    }
}

fn describe(t: &Totals) -> String {
    let mut text = format!(
        "{} session(s) ({} new, {} unchanged), {} record(s) queued, {} op(s) delivered",
        t.sessions, t.new_sessions, t.unchanged, t.records_queued, t.ops_delivered
    );
    if t.warnings > 0 {
        text.push_str(&format!(", {} warning(s)", t.warnings));
    }
    if t.deferred > 0 {
        text.push_str(&format!(", {} waiting for the server", t.deferred));
    }
    text
}

/// One line on stdout; a closed stdout is not worth a panic (the work goes on).
fn stdout_line(value: &dyn std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}").and_then(|()| out.flush());
}
