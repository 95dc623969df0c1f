//! Crash points for fault-injection tests.
//!
//! `CAPSYNC_FAILPOINTS="name"` aborts the process the first time `hit("name")` runs;
//! `"name=N"` aborts on the Nth hit; several are separated by commas. The abort is immediate
//! (no destructors, no flushing), like `kill -9` at exactly that line. Unset, a hit costs one
//! atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub const ENV: &str = "CAPSYNC_FAILPOINTS";

fn armed() -> &'static HashMap<String, (u64, AtomicU64)> {
    static ARMED: OnceLock<HashMap<String, (u64, AtomicU64)>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let spec = std::env::var(ENV).unwrap_or_default();
        spec.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|item| {
                let (name, nth) = item.split_once('=').unwrap_or((item, "1"));
                (name.to_owned(), (nth.parse().unwrap_or(1).max(1), AtomicU64::new(0)))
            })
            .collect()
    })
}

/// Aborts the process if `name` is armed and this is its configured hit.
pub fn hit(name: &str) {
    let armed = armed();
    if armed.is_empty() {
        return;
    }
    if let Some((nth, count)) = armed.get(name) {
        if count.fetch_add(1, Ordering::SeqCst) + 1 == *nth {
            eprintln!("failpoint {name} reached: aborting");
            std::process::abort();
        }
    }
}
