//! Helpers shared by the tests of capsync-agents.
#![allow(dead_code)]

use capsync_agents::{codex, Entity, EntityKind, Limits, Record, Warning};
use std::path::{Path, PathBuf};

/// The repository's fixtures directory.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

pub const S1: &str = "0198799a-1c2b-7d3e-8f40-5a6b7c8d9e01";
pub const S2: &str = "0198799b-4a5b-7c6d-9e7f-8a9b0c1d2e02";
pub const S3: &str = "0198799c-5b6c-7d8e-af01-9b0c1d2e3f03";
pub const S4: &str = "7b1c2d3e-4f50-4a61-b7c8-d9e0f1a2b304";
pub const S1_PATH: &str = "2025/08/05/rollout-2025-08-05T10-15-02-0198799a-1c2b-7d3e-8f40-5a6b7c8d9e01.jsonl";
pub const S2_PATH: &str = "2025/08/05/rollout-2025-08-05T16-40-11-0198799b-4a5b-7c6d-9e7f-8a9b0c1d2e02.jsonl";
pub const S3_PATH: &str = "2025/08/06/rollout-2025-08-06T08-05-00-0198799c-5b6c-7d8e-af01-9b0c1d2e3f03.jsonl.zst";
pub const S4_PATH: &str = "2025/04/20/rollout-2025-04-20T09-00-00-7b1c2d3e-4f50-4a61-b7c8-d9e0f1a2b304.jsonl";
pub const CORRUPT_PATH: &str = "2025/08/07/rollout-2025-08-07T08-00-00-0198799d-0000-7000-8000-000000000005.jsonl";
pub const LINK_PATH: &str = "2025/08/07/rollout-2025-08-07T09-30-00-0198799e-0000-7000-8000-000000000006.jsonl";

/// The capsync session id the tests import into.
pub const TARGET: &str = "0f0e0d0c-0b0a-4908-8706-050403020100";

/// Reads one rollout whole: its records, final cursor and warnings.
pub fn read_all(root: &Path, rel: &str, cursor: Option<codex::CodexCursor>, limits: Limits) -> (Vec<Record>, codex::CodexCursor, Vec<Warning>) {
    let safe = capsync_agents::safety::SafeRoot::new(root).unwrap();
    let mut reader = codex::CodexReader::open(&safe, rel, TARGET, cursor, limits).unwrap();
    let records: Vec<Record> = reader.by_ref().map(|r| r.unwrap()).collect();
    (records, reader.cursor(), reader.take_warnings())
}

pub fn entities(records: &[Record]) -> Vec<Entity> {
    records.iter().map(|r| r.entity.clone()).collect()
}

/// The latest version of each entity, as a replica would hold them.
pub fn replica(records: &[Record]) -> Vec<Entity> {
    let mut latest: std::collections::BTreeMap<(u8, String), Entity> = Default::default();
    for r in records {
        latest.insert((r.entity.kind as u8, r.entity.id.clone()), r.entity.clone());
    }
    latest.into_values().collect()
}

pub fn data(e: &Entity) -> serde_json::Value {
    serde_json::from_slice(&e.data).unwrap()
}

pub fn count(entities: &[Entity], kind: EntityKind) -> usize {
    entities.iter().filter(|e| e.kind == kind).count()
}

/// Copies a directory tree (files and symlinks as they are).
pub fn copy_tree(from: &Path, to: &Path) {
    capsync_agents::fixtures::copy_tree(from, to).unwrap();
}
