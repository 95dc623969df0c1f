//! Codex rollouts: discovery, the mapping, deterministic opIds, incremental reads, export,
//! and the file-safety rules, on the fixtures in tests/fixtures/codex.

mod common;

use capsync_agents::codex::{self, export_codex, line_id};
use capsync_agents::{Agent, AgentSession, EntityKind, Limits, SessionSource};
use common::*;
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

fn discover_all(root: &Path, limits: Limits) -> (Vec<AgentSession>, Vec<capsync_agents::Warning>) {
    let (mut sessions, mut warnings) = (Vec::new(), Vec::new());
    for found in codex::discover(root, limits).unwrap() {
        match found {
            Ok(s) => sessions.push(s),
            Err(w) => warnings.push(w),
        }
    }
    (sessions, warnings)
}

fn lines_of(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    bytes.split_inclusive(|&b| b == b'\n').filter(|l| l.ends_with(b"\n")).map(|l| l[..l.len() - 1].to_vec()).collect()
}

#[test]
fn discovery_finds_the_sessions_and_warns_about_the_rest_by_relative_path() {
    let root = fixtures().join("codex");
    let (sessions, warnings) = discover_all(&root, Limits::default());
    let ids: Vec<&str> = sessions.iter().map(|s| s.session_id.as_str()).collect();
    assert_eq!(ids, vec![S4, S1, S2, S3], "name order, years then months then days");
    let s1 = &sessions[1];
    assert_eq!(s1.agent, Agent::Codex);
    assert_eq!(s1.ref_name(), format!("codex:{S1}"));
    assert_eq!(s1.title, "Add a --json flag to `capsync status` and test it.");
    assert!(matches!(&s1.source, SessionSource::CodexRollout { path, compressed: false, .. } if path == S1_PATH));
    assert!(matches!(&sessions[3].source, SessionSource::CodexRollout { compressed: true, .. }));
    assert_eq!(sessions[3].title, "Create TODO.md with three items — ünïcödé is fine.");
    assert_eq!(sessions[0].title, "List the crates in this workspace", "a legacy rollout");

    assert_eq!(warnings.len(), 2, "{warnings:?}");
    let corrupt = warnings.iter().find(|w| w.path == CORRUPT_PATH).expect("the corrupt file is named");
    assert!(corrupt.reason.contains("not a Codex rollout"), "{corrupt:?}");
    let link = warnings.iter().find(|w| w.path == LINK_PATH).expect("the symlink is named");
    assert!(link.reason.contains("outside the root"), "{link:?}");
    let root_text = root.canonicalize().unwrap().to_string_lossy().into_owned();
    for w in &warnings {
        assert!(!w.path.starts_with('/') && !w.to_string().contains(&root_text), "no absolute path: {w}");
    }
}

#[test]
fn a_rollout_maps_line_by_line_to_entities() {
    let root = fixtures().join("codex");
    let (records, cursor, warnings) = read_all(&root, S1_PATH, None, Limits::default());
    assert!(warnings.is_empty(), "{warnings:?}");
    let lines = lines_of(&root.join(S1_PATH));
    assert_eq!(lines.len(), 29);
    // Every line once, plus the session entity again when its model (line 4) and its title
    // (line 5) became known.
    assert_eq!(records.len(), 31);
    let state = replica(&records);
    assert_eq!(state.len(), 29);
    assert_eq!(count(&state, EntityKind::Session), 1);
    assert_eq!(count(&state, EntityKind::Message), 8);
    assert_eq!(count(&state, EntityKind::Model), 2);
    assert_eq!(count(&state, EntityKind::Diff), 1);
    assert_eq!(count(&state, EntityKind::Part), 17);

    let session = state.iter().find(|e| e.kind == EntityKind::Session).unwrap();
    assert_eq!((session.id.as_str(), session.parent_id.as_str()), (TARGET, ""));
    let d = data(session);
    assert_eq!(d["agent"], "codex");
    assert_eq!(d["agent_session_id"], S1);
    assert_eq!(d["title"], "Add a --json flag to `capsync status` and test it.");
    assert_eq!(d["directory"], "/home/dev/capsync");
    assert_eq!(d["model"], "gpt-5-codex");
    assert_eq!(d["cli_version"], "0.46.0");
    assert_eq!(d["file"], S1_PATH);
    assert_eq!(d["raw"]["payload"]["id"], S1, "the raw line rides as JSON");

    let by_id = |id: String| state.iter().find(|e| e.id == id && e.kind != EntityKind::Session).unwrap().clone();
    // Line 1 (task_started) comes before any message: a message of its own.
    assert_eq!(by_id(line_id(1)).kind, EntityKind::Message);
    let user = by_id(line_id(5));
    assert_eq!((user.kind, user.parent_id.as_str()), (EntityKind::Message, TARGET));
    assert_eq!(data(&user)["role"], "user");
    for (n, item) in [(8, "reasoning"), (9, "function_call"), (11, "function_call_output"), (12, "custom_tool_call")] {
        let part = by_id(line_id(n));
        assert_eq!((part.kind, part.parent_id.clone()), (EntityKind::Part, line_id(5)), "line {n}");
        assert_eq!(data(&part)["item"], item);
    }
    let call = data(&by_id(line_id(9)));
    assert_eq!((call["name"].as_str(), call["call_id"].as_str()), (Some("shell"), Some("call_Qm1hZ2ljU3RhdHVz")));
    let diff = by_id(line_id(13));
    assert_eq!((diff.kind, diff.parent_id.as_str()), (EntityKind::Diff, TARGET));
    assert_eq!(data(&diff)["files"], serde_json::json!(["/home/dev/capsync/src/main.rs"]));
    assert_eq!(data(&diff)["success"], true);
    let model = by_id(line_id(21));
    assert_eq!((model.kind, data(&model)["model"].as_str()), (EntityKind::Model, Some("gpt-5")));
    let compacted = by_id(line_id(19));
    assert_eq!((compacted.kind, data(&compacted)["type"].as_str()), (EntityKind::Message, Some("compacted")));
    // After the compacted line, parts hang from it until the next message.
    assert_eq!(by_id(line_id(20)).parent_id, line_id(19));
    assert_eq!(by_id(line_id(24)).parent_id, line_id(22));
    let unknown = by_id(line_id(28));
    assert_eq!((unknown.kind, data(&unknown)["type"].as_str()), (EntityKind::Part, Some("world_state")));

    // Every entity's data is JSON the server accepts, and under its size limit.
    for e in &state {
        serde_json::from_slice::<serde::de::IgnoredAny>(&e.data).unwrap();
        assert!(e.data.len() < 1024 * 1024 && e.id.len() <= 256);
    }
    assert_eq!(cursor.line, 29);
    assert_eq!(cursor.offset, std::fs::metadata(root.join(S1_PATH)).unwrap().len());
    assert_eq!(cursor.agent_session_id, S1);
}

#[test]
fn op_ids_are_deterministic_uuidv7_with_the_records_own_time() {
    let root = fixtures().join("codex");
    let (a, _, _) = read_all(&root, S1_PATH, None, Limits::default());
    let (b, _, _) = read_all(&root, S1_PATH, None, Limits::default());
    assert_eq!(a, b, "same input, same records and opIds");
    let ids: HashSet<_> = a.iter().map(|r| r.op_id).collect();
    assert_eq!(ids.len(), a.len(), "opIds are distinct");
    for r in &a {
        assert_eq!(r.op_id[6] >> 4, 7, "version 7");
        assert_eq!(r.op_id[8] >> 6, 2, "RFC 4122 variant");
    }
    // Line 5's timestamp is 2025-08-05T10:15:02.313Z.
    let line5 = a.iter().find(|r| r.entity.id == line_id(5)).unwrap();
    assert_eq!(capsync_agents::opid::timestamp_ms(&line5.op_id), 1_754_388_902_313);
    // Near-sequential: opId timestamps follow the file.
    let stamps: Vec<i64> = a.iter().map(|r| capsync_agents::opid::timestamp_ms(&r.op_id)).collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{stamps:?}");
    // Another capsync session: other opIds (a client's outbox holds opIds unique).
    let safe = capsync_agents::safety::SafeRoot::new(&root).unwrap();
    let other: Vec<_> = codex::CodexReader::open(&safe, S1_PATH, "another-session", None, Limits::default()).unwrap().map(|r| r.unwrap().op_id).collect();
    assert!(other.iter().all(|id| !ids.contains(id)));
}

#[test]
fn export_reproduces_every_fixture_rollout_byte_for_byte() {
    let root = fixtures().join("codex");
    for (rel, expected) in [
        (S1_PATH, std::fs::read(root.join(S1_PATH)).unwrap()),
        (S4_PATH, std::fs::read(root.join(S4_PATH)).unwrap()),
        (S3_PATH, zstd::decode_all(std::fs::File::open(root.join(S3_PATH)).unwrap()).unwrap()),
        // The truncated last line is not imported: the export is the file up to it.
        (S2_PATH, {
            let bytes = std::fs::read(root.join(S2_PATH)).unwrap();
            let end = bytes.iter().rposition(|&b| b == b'\n').unwrap() + 1;
            assert!(end < bytes.len(), "the fixture ends in a partial line");
            bytes[..end].to_vec()
        }),
    ] {
        let (records, _, _) = read_all(&root, rel, None, Limits::default());
        let mut state = replica(&records);
        state.reverse(); // any order will do
        let mut out = Vec::new();
        let report = export_codex(&state, &mut out).unwrap();
        assert_eq!(out, expected, "{rel}");
        assert!(report.missing.is_empty(), "{rel}: {:?}", report.missing);
        assert_eq!(report.file.as_deref(), Some(rel));
        assert_eq!(report.written as usize, expected.iter().filter(|&&b| b == b'\n').count());
    }
}

#[test]
fn a_line_that_is_not_json_is_kept_and_the_partial_last_line_is_not_consumed() {
    let root = fixtures().join("codex");
    let (records, cursor, warnings) = read_all(&root, S2_PATH, None, Limits::default());
    let bytes = std::fs::read(root.join(S2_PATH)).unwrap();
    let complete = bytes.iter().rposition(|&b| b == b'\n').unwrap() as u64 + 1;
    assert_eq!(cursor.offset, complete);
    assert_eq!(cursor.line, 7);
    assert_eq!(replica(&records).len(), 7);
    let invalid = records.iter().find(|r| r.entity.id == line_id(4)).unwrap();
    assert_eq!(data(&invalid.entity)["raw_text"], "this line is not JSON {\"at\":\"all\"");
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].path, S2_PATH);
    assert!(warnings[0].reason.contains("line 5 is not valid JSON"), "{:?}", warnings[0]);
}

#[test]
fn incremental_reads_yield_only_what_was_appended() {
    let root = fixtures().join("codex");
    let all = lines_of(&root.join(S1_PATH));
    let (full, _, _) = read_all(&root, S1_PATH, None, Limits::default());
    let full_ids: Vec<_> = full.iter().map(|r| r.op_id).collect();

    let dir = tempfile::tempdir().unwrap();
    let rel = S1_PATH; // the session entity names its file: the same path, the same entity
    let path = dir.path().join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let write_lines = |lines: &[Vec<u8>]| {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
        for l in lines {
            f.write_all(l).unwrap();
            f.write_all(b"\n").unwrap();
        }
    };
    // Split after line 4: the model is known, the title (line 5) is not yet.
    write_lines(&all[..5]);
    let (first, c1, _) = read_all(dir.path(), rel, None, Limits::default());
    assert_eq!(first.len(), 6, "five lines and the session entity again for the model");
    assert_eq!(c1.line, 5);
    let c1 = codex::CodexCursor::from_json(&c1.to_json()).unwrap();

    // Nothing new: nothing read.
    let (none, same, _) = read_all(dir.path(), rel, Some(c1.clone()), Limits::default());
    assert!(none.is_empty());
    assert_eq!(same, c1);

    write_lines(&all[5..]);
    let (second, c2, _) = read_all(dir.path(), rel, Some(c1), Limits::default());
    assert!(second.iter().all(|r| r.entity.id != line_id(0) && r.entity.id != line_id(4)), "nothing before the cursor");
    let mut split: Vec<_> = first.iter().chain(&second).map(|r| r.op_id).collect();
    let mut whole = full_ids.clone();
    split.sort();
    whole.sort();
    assert_eq!(split, whole, "two reads mint exactly the opIds of one");
    assert_eq!(c2.line, 29);

    // A re-import from scratch (a lost cursor) only repeats opIds already sent.
    let (again, _, _) = read_all(dir.path(), rel, None, Limits::default());
    assert!(again.iter().all(|r| full_ids.contains(&r.op_id)));

    // A partial line is not consumed until its newline arrives.
    let extra = br#"{"timestamp":"2025-08-05T10:40:00.000Z","type":"event_msg","payload":{"type":"agent_message","message":"bye"}}"#;
    std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(&extra[..30]).unwrap();
    let (nothing, c3, _) = read_all(dir.path(), rel, Some(c2.clone()), Limits::default());
    assert!(nothing.is_empty());
    assert_eq!((c3.offset, c3.line), (c2.offset, c2.line));
    std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(&[&extra[30..], b"\n"].concat()).unwrap();
    let (one, c4, _) = read_all(dir.path(), rel, Some(c3), Limits::default());
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].entity.id, line_id(29));
    assert_eq!(one[0].entity.parent_id, line_id(26), "the parent comes from the cursor's state");
    assert_eq!(c4.line, 30);
}

#[test]
fn an_edited_or_shrunk_file_is_read_again_from_the_start() {
    let root = fixtures().join("codex");
    let dir = tempfile::tempdir().unwrap();
    let rel = S1_PATH;
    let original = std::fs::read(root.join(S1_PATH)).unwrap();
    std::fs::create_dir_all(dir.path().join(rel).parent().unwrap()).unwrap();
    std::fs::write(dir.path().join(rel), &original).unwrap();
    let (first, cursor, _) = read_all(dir.path(), rel, None, Limits::default());

    // Line 2, in the head of the file, edited in place; then a line appended. (An edit in the
    // middle of a long file, with its head and the bytes before the cursor intact, is not
    // noticed: rollouts are append-only.)
    let edited_text = String::from_utf8(original.clone()).unwrap().replacen("Approvals: on-request.", "Approvals: on-failure.", 1);
    let mut edited = edited_text.into_bytes();
    edited.extend_from_slice(b"{\"timestamp\":\"2025-08-05T10:40:00.000Z\",\"type\":\"event_msg\",\"payload\":{\"type\":\"x\"}}\n");
    std::fs::write(dir.path().join(rel), &edited).unwrap();
    let (again, _, _) = read_all(dir.path(), rel, Some(cursor.clone()), Limits::default());
    assert_eq!(again.len(), first.len() + 1, "read from the start");
    let old: HashSet<_> = first.iter().map(|r| r.op_id).collect();
    let changed: Vec<_> = again.iter().filter(|r| !old.contains(&r.op_id)).map(|r| r.entity.id.clone()).collect();
    assert_eq!(changed, vec![line_id(2), line_id(29)], "only the edited line and the new one get new opIds");

    // Shrunk below the cursor: from the start too.
    std::fs::write(dir.path().join(rel), &original[..original.len() / 2]).unwrap();
    let (shrunk, c, _) = read_all(dir.path(), rel, Some(cursor), Limits::default());
    assert!(!shrunk.is_empty() && shrunk[0].entity.kind == EntityKind::Session);
    assert!(c.line < 29);
}

#[test]
fn symlinks_out_of_the_root_are_refused_and_inside_ones_followed() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures().join("codex").join(S1_PATH), outside.path().join("secret.jsonl")).unwrap();
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("2025/01/01")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.jsonl"), root.path().join("2025/01/01/rollout-out.jsonl")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.path().join("2025/01/02")).unwrap();
    std::fs::copy(fixtures().join("codex").join(S2_PATH), root.path().join("2025/real.data")).unwrap();
    std::os::unix::fs::symlink("../real.data", root.path().join("2025/01/rollout-in.jsonl")).unwrap();
    let (sessions, warnings) = discover_all(root.path(), Limits::default());
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0].session_id, S2, "a symlink inside the root is followed");
    let mut refused: Vec<_> = warnings.iter().map(|w| w.path.as_str()).collect();
    refused.sort();
    assert_eq!(refused, vec!["2025/01/01/rollout-out.jsonl", "2025/01/02"], "{warnings:?}");
    assert!(warnings.iter().all(|w| w.reason.contains("outside the root")));
    // Opening it directly is refused as well.
    let safe = capsync_agents::safety::SafeRoot::new(root.path()).unwrap();
    let err = codex::CodexReader::open(&safe, "2025/01/01/rollout-out.jsonl", TARGET, None, Limits::default()).unwrap_err();
    assert!(matches!(err, capsync_agents::AgentError::Escape(_)), "{err}");
    assert!(codex::CodexReader::open(&safe, "../x/rollout-a.jsonl", TARGET, None, Limits::default()).is_err());
    assert!(!err.to_string().contains(&*outside.path().to_string_lossy()));
}

#[test]
fn files_and_lines_over_the_caps_are_skipped_without_being_read() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("2025/01/01")).unwrap();
    // A sparse 1 GiB file: reading it would take long and a lot of memory.
    let big = std::fs::File::create(root.path().join("2025/01/01/rollout-big.jsonl")).unwrap();
    big.set_len(1 << 30).unwrap();
    std::fs::copy(fixtures().join("codex").join(S1_PATH), root.path().join("2025/01/01/rollout-ok.jsonl")).unwrap();
    let started = std::time::Instant::now();
    let (sessions, warnings) = discover_all(root.path(), Limits::default());
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(sessions.len(), 1);
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].path, "2025/01/01/rollout-big.jsonl");
    assert!(warnings[0].reason.contains("over the cap"), "{:?}", warnings[0]);

    // A line over the line cap is skipped with a warning, and the export says it is missing.
    let limits = Limits { max_line_bytes: 1000, ..Limits::default() };
    let (records, cursor, warnings) = read_all(root.path(), "2025/01/01/rollout-ok.jsonl", None, limits);
    assert_eq!(cursor.line, 29);
    assert!(warnings.iter().any(|w| w.reason.contains("line 26 is") && w.reason.contains("over the line cap")), "{warnings:?}");
    assert!(records.iter().all(|r| r.entity.id != line_id(25)));
    let report = export_codex(&replica(&records), &mut Vec::new()).unwrap();
    assert_eq!(report.missing, vec!["line 26".to_owned()]);
}

#[test]
fn long_lines_ride_in_chunks_and_come_back_whole() {
    let root = fixtures().join("codex");
    let limits = Limits { max_inline_bytes: 1024, chunk_bytes: 1024, ..Limits::default() };
    let (records, _, _) = read_all(&root, S1_PATH, None, limits);
    let state = replica(&records);
    let chunks: Vec<_> = state.iter().filter(|e| data(e).get("chunk_of").is_some()).collect();
    assert!(!chunks.is_empty());
    for c in &chunks {
        let owner = data(c)["chunk_of"].as_str().unwrap().to_owned();
        let owner = state.iter().find(|e| e.id == owner && e.kind != EntityKind::Session || owner == TARGET && e.kind == EntityKind::Session).unwrap();
        match owner.kind {
            EntityKind::Message => assert_eq!((c.kind, c.parent_id.as_str()), (EntityKind::Part, owner.id.as_str())),
            EntityKind::Part => assert_eq!((c.kind, c.parent_id.as_str()), (EntityKind::Part, owner.parent_id.as_str())),
            EntityKind::Session => assert_eq!((c.kind, c.parent_id.as_str()), (EntityKind::Message, TARGET)),
            other => assert_eq!(c.kind, other),
        }
    }
    let mut out = Vec::new();
    let report = export_codex(&state, &mut out).unwrap();
    assert!(report.missing.is_empty());
    assert_eq!(out, std::fs::read(root.join(S1_PATH)).unwrap());
    // Without one chunk, that line is reported, not garbled.
    let without: Vec<_> = state.iter().filter(|e| e.id != chunks[0].id).cloned().collect();
    let report = export_codex(&without, &mut Vec::new()).unwrap();
    assert_eq!(report.missing.len(), 1);
    assert!(report.missing[0].contains("incomplete"));
}

#[test]
fn entities_of_other_sources_are_skipped_on_export() {
    let foreign = capsync_agents::Entity { kind: EntityKind::Message, id: "m1".into(), parent_id: "s".into(), data: br#"{"text":"hi"}"#.to_vec() };
    let mut out = Vec::new();
    let report = export_codex([&foreign], &mut out).unwrap();
    assert_eq!((report.written, report.skipped), (0, 1));
    assert!(out.is_empty());
}

#[test]
fn a_compressed_rollout_resumes_after_a_new_frame() {
    let fixture = fixtures().join("codex");
    let plain = zstd::decode_all(std::fs::File::open(fixture.join(S3_PATH)).unwrap()).unwrap();
    let cut = plain.iter().enumerate().filter(|(_, &b)| b == b'\n').nth(3).unwrap().0 + 1;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(S3_PATH);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, zstd::encode_all(&plain[..cut], 3).unwrap()).unwrap();
    let (first, c1, _) = read_all(dir.path(), S3_PATH, None, Limits::default());
    assert_eq!(c1.line, 4);
    // zstd frames concatenate: appending one is appending lines.
    std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(&zstd::encode_all(&plain[cut..], 3).unwrap()).unwrap();
    let (second, c2, _) = read_all(dir.path(), S3_PATH, Some(c1), Limits::default());
    assert!(second.iter().all(|r| r.entity.kind == EntityKind::Session || r.entity.id >= line_id(4)));
    let (full, _, _) = read_all(&fixture, S3_PATH, None, Limits::default());
    let mut split: Vec<_> = first.iter().chain(&second).map(|r| r.op_id).collect();
    let mut whole: Vec<_> = full.iter().map(|r| r.op_id).collect();
    split.sort();
    whole.sort();
    assert_eq!(split, whole);
    assert_eq!(c2.offset, plain.len() as u64);
    let (none, _, _) = read_all(dir.path(), S3_PATH, Some(c2), Limits::default());
    assert!(none.is_empty());
}

#[test]
fn a_cursor_tells_the_caller_when_a_file_need_not_be_opened() {
    let root = fixtures().join("codex");
    let (_, cursor, _) = read_all(&root, S1_PATH, None, Limits::default());
    let (sessions, _) = discover_all(&root, Limits::default());
    let SessionSource::CodexRollout { size, mtime_ns, .. } = &sessions[1].source else { panic!() };
    assert!(cursor.is_current(*size, *mtime_ns));
    assert!(!cursor.is_current(*size + 1, *mtime_ns));
    assert!(!codex::CodexCursor::default().is_current(0, 0));
}

#[test]
fn discovery_passes_over_known_files_without_reading_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("codex");
    copy_tree(&fixtures().join("codex"), &root);
    let (before, _) = discover_all(&root, Limits::default());
    let SessionSource::CodexRollout { size, mtime_ns, .. } = before[1].source.clone() else { panic!() };
    // The known file's content is replaced (same size, same mtime) by something that is no
    // rollout: discovery must not open it.
    let asked = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let seen = asked.clone();
    let known = move |rel: &str, s: u64, m: i64| {
        seen.borrow_mut().push(rel.to_owned());
        (rel == S1_PATH && s == size && m == mtime_ns).then(|| S1.to_owned())
    };
    let file = root.join(S1_PATH);
    let modified = std::fs::metadata(&file).unwrap().modified().unwrap();
    std::fs::write(&file, vec![b'x'; size as usize]).unwrap();
    std::fs::File::options().write(true).open(&file).unwrap().set_modified(modified).unwrap();
    let (_, warnings) = discover_all(&root, Limits::default());
    assert!(warnings.iter().any(|w| w.path == S1_PATH), "read, it is no rollout");
    let found: Vec<_> = codex::discover(&root, Limits::default()).unwrap().with_known(known).collect();
    let sessions: Vec<AgentSession> = found.into_iter().filter_map(Result::ok).collect();
    let ids: Vec<&str> = sessions.iter().map(|s| s.session_id.as_str()).collect();
    assert_eq!(ids, vec![S4, S1, S2, S3]);
    assert_eq!(sessions[1].title, "", "not read");
    assert_eq!(sessions[1].source, before[1].source);
    assert!(asked.borrow().iter().any(|p| p == S2_PATH), "asked about every rollout");
}
