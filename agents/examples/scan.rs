//! Discovers and reads every session under a root the way `capsync import` does (without a
//! server): one session at a time, records counted and dropped. Prints progress lines and,
//! at the end, the totals and the peak resident memory (Linux). Used for the 10,000-session /
//! 1 GB import measurement.
//!
//! ```text
//! cargo run -p capsync-agents --example scan -- codex|opencode ROOT
//! ```

use capsync_agents::{codex, opencode, Agent, Limits};
use std::path::PathBuf;

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(agent), Some(root)) = (args.first().and_then(|a| Agent::from_name(a)), args.get(1).map(PathBuf::from)) else {
        eprintln!("usage: scan codex|opencode ROOT");
        std::process::exit(2);
    };
    let limits = Limits::default();
    let started = std::time::Instant::now();
    let (mut sessions, mut records, mut bytes, mut warnings) = (0u64, 0u64, 0u64, 0u64);
    let progress = |sessions: u64, records: u64, bytes: u64| {
        if sessions.is_multiple_of(1000) {
            println!("{{\"sessions\":{sessions},\"records\":{records},\"data_bytes\":{bytes},\"peak_rss_kib\":{}}}", peak_rss_kib());
        }
    };
    match agent {
        Agent::Codex => {
            let discovery = codex::discover(&root, limits).expect("the root");
            let safe = discovery.root().clone();
            for found in discovery {
                let session = match found {
                    Ok(s) => s,
                    Err(_) => {
                        warnings += 1;
                        continue;
                    }
                };
                let target = format!("capsync-{}", session.session_id);
                let mut reader = codex::CodexReader::for_session(&safe, &session, &target, None, limits).expect("open");
                for record in reader.by_ref() {
                    let record = record.expect("read");
                    records += 1;
                    bytes += record.entity.data.len() as u64;
                }
                warnings += reader.take_warnings().len() as u64;
                sessions += 1;
                progress(sessions, records, bytes);
            }
        }
        Agent::Opencode => {
            let (store, w) = opencode::OpencodeStore::open(&root, limits).expect("the root");
            warnings += w.len() as u64;
            let found: Vec<_> = store.sessions().collect();
            for session in found {
                let Ok(session) = session else {
                    warnings += 1;
                    continue;
                };
                let mut reader = store.reader(&session, "capsync-session").expect("open");
                for record in reader.by_ref() {
                    let Ok(record) = record else { break };
                    records += 1;
                    bytes += record.entity.data.len() as u64;
                }
                warnings += reader.take_warnings().len() as u64;
                sessions += 1;
                progress(sessions, records, bytes);
            }
        }
    }
    println!(
        "{{\"done\":true,\"sessions\":{sessions},\"records\":{records},\"data_bytes\":{bytes},\"warnings\":{warnings},\"seconds\":{:.1},\"peak_rss_kib\":{}}}",
        started.elapsed().as_secs_f64(),
        peak_rss_kib()
    );
}
