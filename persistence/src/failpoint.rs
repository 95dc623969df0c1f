//! Crash points for fault-injection tests.
//!
//! `CAPSYNC_FAILPOINTS="name"` aborts the process the first time `hit("name")` runs;
//! `"name=N"` aborts on the Nth hit; several are separated by commas. The abort is immediate
//! (no destructors, no flushing), like `kill -9` at exactly that line. `"name=N:pause"` instead
//! parks the thread that hits it for good, so a test can look at the world while that thread
//! is stuck at exactly that line (and then `kill -9` the process). Each hit that acts first
//! writes `failpoint <name> reached: aborting|pausing` to stderr. Unset, a hit costs one
//! atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub const ENV: &str = "CAPSYNC_FAILPOINTS";

#[derive(Clone, Copy, PartialEq)]
enum Action {
    Abort,
    Pause,
    /// Waits until the file named by [`RELEASE_ENV`] exists, then goes on.
    Hold,
}

/// The file whose creation releases a `hold` failpoint.
pub const RELEASE_ENV: &str = "CAPSYNC_FAILPOINTS_RELEASE";

struct Armed {
    nth: u64,
    action: Action,
    hits: AtomicU64,
}

fn armed() -> &'static HashMap<String, Armed> {
    static ARMED: OnceLock<HashMap<String, Armed>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let spec = std::env::var(ENV).unwrap_or_default();
        spec.split(',').map(str::trim).filter(|s| !s.is_empty()).map(parse).collect()
    })
}

fn parse(item: &str) -> (String, Armed) {
    let (point, action) = match item.split_once(':') {
        Some((point, "pause")) => (point, Action::Pause),
        Some((point, "hold")) => (point, Action::Hold),
        Some((point, _)) => (point, Action::Abort),
        None => (item, Action::Abort),
    };
    let (name, nth) = point.split_once('=').unwrap_or((point, "1"));
    (name.to_owned(), Armed { nth: nth.parse().unwrap_or(1).max(1), action, hits: AtomicU64::new(0) })
}

/// Aborts the process (or parks this thread) if `name` is armed and this is its configured hit.
pub fn hit(name: &str) {
    let armed = armed();
    if armed.is_empty() {
        return;
    }
    if let Some(point) = armed.get(name) {
        if point.hits.fetch_add(1, Ordering::SeqCst) + 1 == point.nth {
            match point.action {
                Action::Abort => {
                    eprintln!("failpoint {name} reached: aborting");
                    std::process::abort();
                }
                Action::Hold => {
                    eprintln!("failpoint {name} reached: holding");
                    let release = std::env::var_os(RELEASE_ENV).map(std::path::PathBuf::from);
                    while !release.as_ref().is_some_and(|f| f.exists()) {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    eprintln!("failpoint {name} released");
                }
                Action::Pause => {
                    eprintln!("failpoint {name} reached: pausing");
                    loop {
                        std::thread::park();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_into_name_hit_and_action() {
        let (name, armed) = parse("server-before-commit");
        assert_eq!((name.as_str(), armed.nth), ("server-before-commit", 1));
        assert!(armed.action == Action::Abort);
        let (name, armed) = parse("writer-before-commit=4:pause");
        assert_eq!((name.as_str(), armed.nth), ("writer-before-commit", 4));
        assert!(armed.action == Action::Pause);
        let (_, armed) = parse("x=0");
        assert_eq!(armed.nth, 1, "hits count from 1");
    }
}
