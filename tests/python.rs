//! The Python client's pytest suite (`clients/python/tests`), run as part of `cargo test` against
//! this build's `capsync` binary (issue 13).
//!
//! The suite runs in a virtualenv next to the build (`<target>/python-venv`) that
//! `scripts/python-venv.sh` creates on first use (pycapnp and pytest from PyPI, then
//! `pip install ./clients/python`); `CAPSYNC_PYTHON` names another interpreter that has them.
//! A suite that skipped anything fails here: the binary is always there, so a skip would hide
//! a test that did not run.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The interpreter to run pytest with, setting up the default venv if needed.
fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("CAPSYNC_PYTHON") {
        return PathBuf::from(python);
    }
    // <target>/debug/capsync -> <target>/python-venv, so a CARGO_TARGET_DIR elsewhere keeps its own.
    let target = Path::new(common::BIN).parent().and_then(Path::parent).expect("the binary lives in <target>/<profile>/");
    let venv = target.join("python-venv");
    let setup = Command::new(repo().join("scripts/python-venv.sh")).arg(&venv).output().expect("running scripts/python-venv.sh");
    assert!(
        setup.status.success(),
        "setting up the Python venv failed (scripts/python-venv.sh {}):\n{}",
        venv.display(),
        String::from_utf8_lossy(&setup.stderr)
    );
    venv.join("bin/python")
}

#[test]
fn python_client_suite() {
    let output = Command::new(python())
        .args(["-m", "pytest", "clients/python/tests", "-q", "-rs", "-p", "no:cacheprovider"])
        .current_dir(repo())
        .env("CAPSYNC_BIN", common::BIN)
        .env_remove("PYTHONPATH")
        .output()
        .expect("running pytest");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}\n{stderr}");
    assert!(output.status.success(), "the Python client's tests failed (output above)");
    let summary = stdout.lines().rev().find(|l| l.contains(" passed")).unwrap_or_default();
    assert!(!summary.contains("skipped"), "some Python tests were skipped: {summary}");
}
