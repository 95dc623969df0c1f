//! Writes generated agent session stores, deterministic from a seed.
//!
//! ```text
//! cargo run -p capsync-agents --example gen_fixtures -- codex DIR SESSIONS TOTAL_BYTES [SEED] [ZST_EVERY]
//! cargo run -p capsync-agents --example gen_fixtures -- opencode DIR SESSIONS MESSAGES [SEED]
//! ```
//!
//! `codex /tmp/big 10000 1000000000` makes the 10,000-session / 1 GB tree of the import
//! measurement; `codex /tmp/one 1 50000000` one 50 MB rollout.

use std::path::PathBuf;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: gen_fixtures codex DIR SESSIONS TOTAL_BYTES [SEED] [ZST_EVERY] | opencode DIR SESSIONS MESSAGES [SEED]";
    if args.len() < 4 {
        eprintln!("{usage}");
        std::process::exit(2);
    }
    let num = |i: usize, default: u64| -> u64 {
        args.get(i).map(|a| a.parse().unwrap_or_else(|_| {
            eprintln!("{usage}");
            std::process::exit(2)
        })).unwrap_or(default)
    };
    let dir = PathBuf::from(&args[1]);
    let generated = match args[0].as_str() {
        "codex" => capsync_agents::fixtures::generate_codex(&dir, num(2, 1), num(3, 1), num(4, 1), num(5, 0)),
        "opencode" => capsync_agents::fixtures::generate_opencode(&dir, num(2, 1), num(3, 4), num(4, 1)),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    match generated {
        Ok(g) => println!("{} sessions, {} files, {} records, {} bytes", g.sessions, g.files, g.records, g.bytes),
        Err(e) => {
            eprintln!("gen_fixtures: {e}");
            std::process::exit(1);
        }
    }
}
