//! Crash points for fault-injection tests.
//!
//! `CAPSYNC_FAILPOINTS="name"` aborts the process the first time `hit("name")` runs;
//! `"name=N"` aborts on the Nth hit; several are separated by commas. The abort is immediate
//! (no destructors, no flushing), like `kill -9` at exactly that line. `"name=N:pause"` instead
//! parks the thread that hits it for good, so a test can look at the world while that thread
//! is stuck at exactly that line (and then `kill -9` the process). Each hit that acts first
//! writes `failpoint <name> reached: aborting|pausing` to stderr. Unset, a hit costs one
//! atomic load.
//!
//! Compiled in only with the `failpoints` cargo feature (the test builds turn it on); without
//! it [`hit`] is an empty function and `CAPSYNC_FAILPOINTS` means nothing, so a release binary
//! cannot be made to abort or hang by its environment.

#![cfg_attr(not(feature = "failpoints"), allow(dead_code))]

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
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

/// Whether any failpoint is armed: async callers hand hits to a blocking thread only then
/// (a `hold` or `pause` must never block an async runtime's thread).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn any_armed() -> bool {
    false
}

#[cfg(feature = "failpoints")]
pub fn any_armed() -> bool {
    !armed().is_empty()
}

/// Aborts the process (or parks this thread) if `name` is armed and this is its configured hit.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    let armed = armed();
    if armed.is_empty() {
        return;
    }
    if let Some(point) = armed.get(name) {
        if point.hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == point.nth {
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

    /// Runs in `cargo test -p capsync-persistence` (no feature; `.ci/run` runs it): an armed
    /// crash point in a build without the feature must do nothing.
    #[cfg(not(feature = "failpoints"))]
    #[test]
    fn without_the_feature_an_armed_failpoint_does_nothing() {
        std::env::set_var(ENV, "armed-but-not-compiled=1");
        hit("armed-but-not-compiled");
        assert!(armed().contains_key("armed-but-not-compiled"), "the spec parses; only hit() is inert");
    }

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
