//! opencode: the JSON tree fixture (tests/fixtures/opencode/storage), and the database built
//! at test time from tests/fixtures/opencode/opencode.sql through capsync-persistence.

mod common;

use capsync_agents::opencode::{export_opencode, OpencodeStore};
use capsync_agents::{AgentSession, EntityKind, Limits, Record, SessionSource, Warning};
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const SA: &str = "ses_6a1f00d1e001aAbCdEfGhIjK";
const SB: &str = "ses_6a1f2b3c4002bLmNoPqRsTuV";
const SC: &str = "ses_6a1f3c4d5003cDbDbDbDbDbD";
const PROJ: &str = "4b0ea68d7af9a6031a7ffda7ad66e0cb83315750";

fn tree_fixture() -> PathBuf {
    fixtures().join("opencode")
}

/// A copy of the fixture with `opencode.db` built from `opencode.sql`.
fn with_db() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&tree_fixture(), dir.path());
    let script = std::fs::read_to_string(dir.path().join("opencode.sql")).unwrap();
    capsync_persistence::agents::create_opencode_fixture(&dir.path().join("opencode.db"), &script).unwrap();
    dir
}

fn sessions(store: &OpencodeStore) -> (Vec<AgentSession>, Vec<Warning>) {
    let (mut found, mut warnings) = (Vec::new(), Vec::new());
    for item in store.sessions() {
        match item {
            Ok(s) => found.push(s),
            Err(w) => warnings.push(w),
        }
    }
    (found, warnings)
}

fn read(store: &OpencodeStore, session: &AgentSession) -> (Vec<Record>, Vec<Warning>) {
    let mut reader = store.reader(session, TARGET).unwrap();
    let records = reader.by_ref().map(|r| r.unwrap()).collect();
    (records, reader.take_warnings())
}

/// Every file under `dir`, relative, with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                out.insert(path.strip_prefix(base).unwrap().to_string_lossy().into_owned(), std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

fn session_files(all: &BTreeMap<String, Vec<u8>>, session: &str, messages: &[&str]) -> BTreeMap<String, Vec<u8>> {
    all.iter()
        .filter(|(k, _)| k.contains(session) || messages.iter().any(|m| k.starts_with(&format!("part/{m}/"))))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn the_json_tree_maps_to_entities() {
    let (store, warnings) = OpencodeStore::open(&tree_fixture(), Limits::default()).unwrap();
    assert!(warnings.is_empty() && store.has_tree() && !store.has_db());
    let (found, warnings) = sessions(&store);
    assert!(warnings.is_empty(), "{warnings:?}");
    let ids: Vec<_> = found.iter().map(|s| s.session_id.as_str()).collect();
    assert_eq!(ids, vec![SA, SB]);
    assert_eq!(found[0].title, "Fix the flaky sync test");
    assert_eq!(found[0].ref_name(), format!("opencode:{SA}"));
    assert!(matches!(&found[0].source, SessionSource::OpencodeTree { path, .. } if path == &format!("storage/session/{PROJ}/{SA}.json")));

    let (records, warnings) = read(&store, &found[0]);
    assert!(warnings.is_empty(), "{warnings:?}");
    let state = entities(&records);
    assert_eq!(state.len(), 12);
    assert_eq!(count(&state, EntityKind::Session), 1);
    assert_eq!(count(&state, EntityKind::Diff), 1);
    assert_eq!(count(&state, EntityKind::Message), 2);
    assert_eq!(count(&state, EntityKind::Part), 7);
    assert_eq!(count(&state, EntityKind::Model), 1);
    assert_eq!(state[0].kind, EntityKind::Session, "the session comes first");
    let session = data(&state[0]);
    assert_eq!((session["agent"].as_str(), session["agent_session_id"].as_str()), (Some("opencode"), Some(SA)));
    assert_eq!(session["title"], "Fix the flaky sync test");
    assert_eq!(session["directory"], "/home/dev/capsync");
    assert_eq!(session["value"]["slug"], "brave-falcon");
    let diff = state.iter().find(|e| e.kind == EntityKind::Diff).unwrap();
    assert_eq!((diff.id.as_str(), diff.parent_id.as_str()), ("session_diff", TARGET));
    assert_eq!(data(diff)["files"], serde_json::json!(["tests/sync.rs"]));
    let model = state.iter().find(|e| e.kind == EntityKind::Model).unwrap();
    assert_eq!((model.id.as_str(), model.parent_id.as_str()), ("anthropic/claude-sonnet-4-5", TARGET));
    let messages: Vec<_> = state.iter().filter(|e| e.kind == EntityKind::Message).collect();
    assert!(messages.iter().all(|m| m.parent_id == TARGET));
    for part in state.iter().filter(|e| e.kind == EntityKind::Part) {
        assert!(messages.iter().any(|m| m.id == part.parent_id), "a part's parent is its message");
        let position = records.iter().position(|r| r.entity.id == part.id).unwrap();
        let parent = records.iter().position(|r| r.entity.id == part.parent_id).unwrap();
        assert!(parent < position, "a message comes before its parts");
    }
    let tool = state.iter().find(|e| data(e)["type"] == "tool").unwrap();
    assert_eq!((data(tool)["tool"].as_str(), data(tool)["status"].as_str()), (Some("edit"), Some("completed")));
    let types: Vec<String> = state.iter().filter(|e| e.kind == EntityKind::Part).map(|e| data(e)["type"].as_str().unwrap().to_owned()).collect();
    assert_eq!(types, ["text", "step-start", "reasoning", "tool", "patch", "text", "step-finish"]);

    // Deterministic.
    let (again, _) = read(&store, &found[0]);
    assert_eq!(again, records);
}

#[test]
fn a_corrupt_message_is_skipped_with_its_parts_and_one_relative_warning() {
    let (store, _) = OpencodeStore::open(&tree_fixture(), Limits::default()).unwrap();
    let (found, _) = sessions(&store);
    let (records, warnings) = read(&store, &found[1]);
    let state = entities(&records);
    assert_eq!((count(&state, EntityKind::Message), count(&state, EntityKind::Part)), (2, 3));
    assert_eq!(state.iter().find(|e| e.kind == EntityKind::Model).unwrap().id, "openai/gpt-5");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].path, format!("storage/message/{SB}/msg_6a1f2b3c7003VvWwXxYyZz01.json"));
    assert!(warnings[0].reason.contains("not valid JSON") && warnings[0].reason.contains("parts"), "{:?}", warnings[0]);
}

#[test]
fn the_json_tree_round_trips_byte_for_byte() {
    let (store, _) = OpencodeStore::open(&tree_fixture(), Limits::default()).unwrap();
    let (found, _) = sessions(&store);
    let original = files(&tree_fixture().join("storage"));
    for (session, messages) in [
        (&found[0], vec!["msg_6a1f00d2a001QwErTyUiOpAs", "msg_6a1f00d3b002DfGhJkLzXcVb"]),
        (&found[1], vec!["msg_6a1f2b3c5001HhJjKkLlMmNn", "msg_6a1f2b3c6002PpQqRrSsTtUu"]),
    ] {
        let (records, _) = read(&store, session);
        let out = tempfile::tempdir().unwrap();
        let report = export_opencode(&entities(&records), out.path()).unwrap();
        assert!(report.missing.is_empty(), "{:?}", report.missing);
        let written = files(&out.path().join("storage"));
        let mut expected = session_files(&original, &session.session_id, &messages);
        expected.retain(|k, _| !k.contains("msg_6a1f2b3c7003")); // the corrupt message is not imported
        let mut got = written.clone();
        got.retain(|k, _| !k.starts_with("project/"));
        assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
        for (k, v) in &expected {
            assert_eq!(&got[k], v, "{k} comes back byte for byte");
        }
        assert_eq!(report.written as usize, expected.len());
        assert!(written.contains_key(&format!("project/{PROJ}.json")), "the project opencode needs");
    }
}

#[test]
fn the_database_is_read_read_only_and_wins_over_the_tree() {
    let dir = with_db();
    let db_path = dir.path().join("opencode.db");
    let before = std::fs::read(&db_path).unwrap();
    let (store, warnings) = OpencodeStore::open(dir.path(), Limits::default()).unwrap();
    assert!(warnings.is_empty() && store.has_db() && store.has_tree());
    let (found, warnings) = sessions(&store);
    assert!(warnings.is_empty(), "{warnings:?}");
    let listed: Vec<_> = found.iter().map(|s| (s.session_id.as_str(), matches!(s.source, SessionSource::OpencodeDb { .. }))).collect();
    assert_eq!(listed, vec![(SA, true), (SC, true), (SB, false)], "a session in both is read from the database");

    let (records, warnings) = read(&store, &found[1]);
    assert!(warnings.is_empty(), "{warnings:?}");
    let state = entities(&records);
    assert_eq!(state.len(), 8);
    assert_eq!((count(&state, EntityKind::Message), count(&state, EntityKind::Part), count(&state, EntityKind::Model)), (2, 3, 2));
    let session = data(&state[0]);
    assert_eq!(session["title"], "Only in the database");
    assert_eq!(session["model"], "openai/gpt-5");
    assert_eq!(session["source"], "db");
    assert_eq!(session["value"]["share"]["url"], "https://opncd.ai/s/abc123");
    assert_eq!(session["value"]["permission"][0]["action"], "ask");
    assert_eq!(session["value"]["time"]["updated"], 1_754_400_900_000i64);
    assert_eq!(session["columns"]["cost"], 0.5, "columns Session.Info has no place for ride along");
    let mut models: Vec<_> = state.iter().filter(|e| e.kind == EntityKind::Model).map(|e| e.id.clone()).collect();
    models.sort();
    assert_eq!(models, ["openai/gpt-5", "openai/gpt-5-mini"]);
    let part = state.iter().find(|e| data(e)["tool"] == "grep").unwrap();
    assert_eq!(part.parent_id, "msg_6a1f3c4d7002BbBbBbBbBbBb");
    let value = &data(part)["value"];
    assert_eq!((value["id"].as_str(), value["sessionID"].as_str(), value["messageID"].as_str()), (Some("prt_6a1f3c4d7101dddddddddddd"), Some(SC), Some("msg_6a1f3c4d7002BbBbBbBbBbBb")));

    drop(store);
    assert_eq!(std::fs::read(&db_path).unwrap(), before, "the database is not written");
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.starts_with("opencode.db-")), "no journal or WAL left behind: {names:?}");
}

#[test]
fn a_session_read_from_the_database_exports_the_same_json_values_as_the_tree_it_came_from() {
    let dir = with_db();
    let (store, _) = OpencodeStore::open(dir.path(), Limits::default()).unwrap();
    let (found, _) = sessions(&store);
    assert_eq!(found[0].session_id, SA);
    let (from_db, _) = read(&store, &found[0]);
    let out = tempfile::tempdir().unwrap();
    let report = export_opencode(&entities(&from_db), out.path()).unwrap();
    assert!(report.missing.is_empty(), "{:?}", report.missing);
    let written = files(&out.path().join("storage"));
    let original = files(&tree_fixture().join("storage"));
    let expected = session_files(&original, SA, &["msg_6a1f00d2a001QwErTyUiOpAs", "msg_6a1f00d3b002DfGhJkLzXcVb"]);
    assert_eq!(expected.len(), 11, "the session, its diffs, 2 messages and 7 parts");
    for (k, v) in &expected {
        let got: serde_json::Value = serde_json::from_slice(written.get(k).unwrap_or_else(|| panic!("{k} written"))).unwrap();
        let want: serde_json::Value = serde_json::from_slice(v).unwrap();
        assert_eq!(got, want, "{k}: the same JSON value");
        let text = String::from_utf8(written[k].clone()).unwrap();
        assert!(text.starts_with("{\n  \"") || text.starts_with("[\n  {"), "{k}: written as opencode writes: {text}");
    }
}

#[test]
fn caps_symlinks_and_fingerprints() {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&tree_fixture(), dir.path());
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("x.json"), br#"{"id":"prt_x","type":"text","text":"secret"}"#).unwrap();
    let parts = dir.path().join("storage/part/msg_6a1f00d3b002DfGhJkLzXcVb");
    std::os::unix::fs::symlink(outside.path().join("x.json"), parts.join("prt_6a1f00d3b199zzzzzzzzzzzz.json")).unwrap();

    let limits = Limits { max_line_bytes: 600, ..Limits::default() };
    let (store, _) = OpencodeStore::open(dir.path(), limits).unwrap();
    let (found, _) = sessions(&store);
    let fingerprint = found[0].source.fingerprint().unwrap().to_owned();
    let (records, warnings) = read(&store, &found[0]);
    let reasons: Vec<String> = warnings.iter().map(|w| w.to_string()).collect();
    assert!(reasons.iter().any(|r| r.starts_with("storage/part/msg_6a1f00d3b002DfGhJkLzXcVb/prt_6a1f00d3b199zzzzzzzzzzzz.json: ") && r.contains("outside the root")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("prt_6a1f00d3b103dddddddddddd.json: ") && r.contains("over the record cap")), "{reasons:?}");
    assert!(records.iter().all(|r| !String::from_utf8_lossy(&r.entity.data).contains("secret")));
    let root_text = dir.path().canonicalize().unwrap().to_string_lossy().into_owned();
    assert!(reasons.iter().all(|r| !r.contains(&root_text)));

    // The fingerprint moves when a file of the session changes, and only then.
    let (again, _) = sessions(&store);
    assert_eq!(again[0].source.fingerprint().unwrap(), fingerprint);
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(parts.join("prt_6a1f00d3b105ffffffffffff.json"), b"{\"id\":\"prt_6a1f00d3b105ffffffffffff\",\"type\":\"text\",\"text\":\"edited\"}").unwrap();
    let (changed, _) = sessions(&store);
    assert_ne!(changed[0].source.fingerprint().unwrap(), fingerprint);
    assert_eq!(changed[1].source.fingerprint(), found[1].source.fingerprint());
}

#[test]
fn the_database_fingerprint_and_its_caps() {
    let dir = with_db();
    let limits = Limits { max_line_bytes: 200, ..Limits::default() };
    let (store, _) = OpencodeStore::open(dir.path(), limits).unwrap();
    let (found, _) = sessions(&store);
    let c = found.iter().find(|s| s.session_id == SC).unwrap();
    assert!(c.source.fingerprint().unwrap().starts_with("1754400900000-2-"), "{:?}", c.source);
    let (records, warnings) = read(&store, c);
    // The assistant message's data is over the cap: it is skipped with its parts, unread.
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].path, "opencode.db");
    assert!(warnings[0].reason.contains("msg_6a1f3c4d7002BbBbBbBbBbBb") && warnings[0].reason.contains("over the record cap"), "{warnings:?}");
    let state = entities(&records);
    assert_eq!((count(&state, EntityKind::Message), count(&state, EntityKind::Part)), (1, 1));
}
