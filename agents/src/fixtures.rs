//! Deterministic generators of agent session stores, for tests and measurements: Codex
//! rollouts of a given total size (the 50 MB rollout, the 10,000-session / 1 GB tree) and
//! opencode JSON trees. The same seed gives the same bytes. `examples/gen_fixtures.rs` is the
//! command-line front.
//!
//! The records follow the formats as the agents' sources define them (see docs/AGENTS.md):
//! a rollout is a `session_meta` line, then turns of `turn_context`, `response_item` messages,
//! reasoning, function calls and their outputs, `apply_patch` custom tool calls with their
//! `patch_apply_end` events, token counts; the content is filler.

use crate::opencode::pretty_json;
use crate::opid::format_rfc3339_ms;
use crate::payload::JsonObject;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A small deterministic generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }

    /// A UUIDv7-looking id stamped `ms`.
    pub fn uuid7(&mut self, ms: i64) -> String {
        let r = self.next_u64();
        let s = self.next_u64();
        format!(
            "{:08x}-{:04x}-7{:03x}-{:04x}-{:012x}",
            (ms as u64 >> 16) & 0xffff_ffff,
            ms as u64 & 0xffff,
            r & 0xfff,
            0x8000 | ((r >> 12) & 0x3fff),
            s & 0xffff_ffff_ffff
        )
    }

    /// Filler text of a length in `lo..hi`.
    pub fn text_between(&mut self, lo: u64, hi: u64) -> String {
        let len = self.range(lo, hi) as usize;
        self.text(len)
    }

    /// Filler text of `len` bytes: words, newlines, now and then a quote or a non-ASCII letter.
    pub fn text(&mut self, len: usize) -> String {
        const WORDS: &[&str] = &["fn", "let", "cargo", "test", "the", "entity", "sync", "capsync", "séance", "\"quoted\"", "path/to/file.rs", "ok", "error:", "42", "\t"];
        let mut out = String::with_capacity(len + 16);
        while out.len() < len {
            let r = self.next_u64();
            out.push_str(WORDS[(r % WORDS.len() as u64) as usize]);
            out.push(if r.is_multiple_of(11) { '\n' } else { ' ' });
        }
        crate::payload::truncate(&out, len).to_owned()
    }
}

fn obj(build: impl FnOnce(&mut JsonObject)) -> String {
    let mut o = JsonObject::new();
    build(&mut o);
    String::from_utf8(o.finish()).expect("JSON is UTF-8")
}

fn line(ts: i64, ty: &str, payload: &str) -> String {
    obj(|o| {
        o.str("timestamp", &format_rfc3339_ms(ts)).str("type", ty).raw("payload", payload);
    })
}

/// What a generator wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Generated {
    pub sessions: u64,
    pub files: u64,
    pub bytes: u64,
    pub records: u64,
}

/// Writes one rollout of about `target_bytes` (at least one complete turn) to `out`, every line
/// ending in `\n`. `big_every` > 0 makes every that-many-th tool output about 700 KB (over the
/// inline cap, so chunked). Returns the bytes and lines written.
pub fn write_rollout(out: &mut impl Write, rng: &mut Rng, session_id: &str, start_ms: i64, target_bytes: u64, big_every: u64) -> io::Result<(u64, u64)> {
    let (mut bytes, mut lines) = (0u64, 0u64);
    let mut ts = start_ms;
    let mut emit = |text: String, out: &mut dyn Write| -> io::Result<(u64, u64)> {
        out.write_all(text.as_bytes())?;
        out.write_all(b"\n")?;
        bytes += text.len() as u64 + 1;
        lines += 1;
        Ok((bytes, lines))
    };
    let meta = obj(|o| {
        o.str("id", session_id)
            .str("timestamp", &format_rfc3339_ms(ts))
            .str("cwd", "/home/user/project")
            .str("originator", "codex_cli_rs")
            .str("cli_version", "0.46.0")
            .raw("instructions", "null")
            .str("source", "cli")
            .str("model_provider", "openai");
    });
    emit(line(ts, "session_meta", &meta), out)?;
    let mut turn = 0u64;
    let mut call = 0u64;
    loop {
        turn += 1;
        ts += rng.range(1_000, 60_000) as i64;
        let turn_id = format!("turn-{turn}");
        emit(line(ts, "event_msg", &obj(|o| {
            o.str("type", "task_started").str("turn_id", &turn_id).int("model_context_window", 272_000);
        })), out)?;
        emit(line(ts, "turn_context", &obj(|o| {
            o.str("turn_id", &turn_id)
                .str("cwd", "/home/user/project")
                .str("approval_policy", "on-request")
                .raw("sandbox_policy", r#"{"type":"workspace-write","network_access":false}"#)
                .str("model", "gpt-5-codex")
                .str("effort", "medium")
                .str("summary", "auto");
        })), out)?;
        let prompt = format!("Turn {turn}: {}", rng.text_between(20, 200));
        let content = format!("[{}]", obj(|o| {
            o.str("type", "input_text").str("text", &prompt);
        }));
        emit(line(ts, "response_item", &obj(|o| {
            o.str("type", "message").str("role", "user").raw("content", &content);
        })), out)?;
        emit(line(ts, "event_msg", &obj(|o| {
            o.str("type", "user_message").str("message", &prompt).raw("images", "[]");
        })), out)?;
        for _ in 0..rng.range(1, 4) {
            call += 1;
            ts += rng.range(100, 5_000) as i64;
            let call_id = format!("call_{call:06}");
            let summary = format!("[{}]", obj(|o| {
                o.str("type", "summary_text").str("text", &rng.text(80));
            }));
            emit(line(ts, "response_item", &obj(|o| {
                o.str("type", "reasoning").raw("summary", &summary).raw("content", "null").str("encrypted_content", &rng.text(120));
            })), out)?;
            let arguments = obj(|o| {
                o.strs("command", &["bash".into(), "-lc".into(), "cargo test".into()]).str("workdir", "/home/user/project");
            });
            emit(line(ts, "response_item", &obj(|o| {
                o.str("type", "function_call").str("name", "shell").str("arguments", &arguments).str("call_id", &call_id);
            })), out)?;
            let size = if big_every > 0 && call.is_multiple_of(big_every) { 700 * 1024 } else { rng.range(200, 12_000) as usize };
            let output = obj(|o| {
                o.str("output", &rng.text(size)).raw("metadata", r#"{"exit_code":0,"duration_seconds":0.5}"#);
            });
            emit(line(ts, "response_item", &obj(|o| {
                o.str("type", "function_call_output").str("call_id", &call_id).str("output", &output);
            })), out)?;
        }
        if turn.is_multiple_of(2) {
            call += 1;
            let call_id = format!("call_{call:06}");
            let patch = format!("*** Begin Patch\n*** Update File: src/lib.rs\n@@\n-{}\n+{}\n*** End Patch\n", rng.text(40), rng.text(40));
            emit(line(ts, "response_item", &obj(|o| {
                o.str("type", "custom_tool_call").str("status", "completed").str("call_id", &call_id).str("name", "apply_patch").str("input", &patch);
            })), out)?;
            let changes = obj(|o| {
                o.raw("/home/user/project/src/lib.rs", &obj(|c| {
                    c.str("type", "update").str("unified_diff", &patch).raw("move_path", "null");
                }));
            });
            emit(line(ts, "event_msg", &obj(|o| {
                o.str("type", "patch_apply_end").str("call_id", &call_id).str("turn_id", &turn_id).str("stdout", "Success. Updated the following files:\nM src/lib.rs\n").str("stderr", "").bool("success", true).raw("changes", &changes);
            })), out)?;
            emit(line(ts, "response_item", &obj(|o| {
                o.str("type", "custom_tool_call_output").str("call_id", &call_id).str("output", r#"{"output":"Success.","metadata":{"exit_code":0}}"#);
            })), out)?;
        }
        let answer = rng.text_between(100, 1_500);
        let content = format!("[{}]", obj(|o| {
            o.str("type", "output_text").str("text", &answer);
        }));
        emit(line(ts, "response_item", &obj(|o| {
            o.str("type", "message").str("role", "assistant").raw("content", &content);
        })), out)?;
        emit(line(ts, "event_msg", &obj(|o| {
            o.str("type", "agent_message").str("message", &answer);
        })), out)?;
        let (written, _) = emit(line(ts, "event_msg", &obj(|o| {
            o.str("type", "token_count").raw("info", r#"{"total_token_usage":{"input_tokens":1000,"cached_input_tokens":0,"output_tokens":200,"reasoning_output_tokens":50,"total_tokens":1200}}"#);
        })), out)?;
        if written >= target_bytes {
            break;
        }
    }
    Ok((bytes, lines))
}

/// The path (relative to a sessions root) Codex gives a rollout started at `ms`.
pub fn rollout_path(ms: i64, session_id: &str) -> String {
    let t = format_rfc3339_ms(ms);
    let (date, time) = (&t[..10], &t[11..19]);
    format!("{}/{}/{}/rollout-{date}T{}-{session_id}.jsonl", &date[..4], &date[5..7], &date[8..10], time.replace(':', "-"))
}

/// Writes `sessions` rollouts of about `total_bytes` together under `dir` (Codex's
/// `YYYY/MM/DD` layout), from `seed`. Every `zst_every`-th one (when > 0) is zstd-compressed.
pub fn generate_codex(dir: &Path, sessions: u64, total_bytes: u64, seed: u64, zst_every: u64) -> io::Result<Generated> {
    let mut rng = Rng::new(seed);
    let per_session = total_bytes / sessions.max(1);
    let mut generated = Generated::default();
    let mut ms = 1_748_736_000_000i64; // 2025-06-01
    for i in 0..sessions {
        ms += rng.range(60_000, 3_600_000) as i64;
        let id = rng.uuid7(ms);
        let mut rel = rollout_path(ms, &id);
        let compressed = zst_every > 0 && (i + 1) % zst_every == 0;
        if compressed {
            rel.push_str(".zst");
        }
        let path: PathBuf = dir.join(&rel);
        std::fs::create_dir_all(path.parent().expect("a parent"))?;
        let file = io::BufWriter::new(std::fs::File::create(&path)?);
        let (bytes, lines) = if compressed {
            let mut encoder = zstd::stream::write::Encoder::new(file, 3)?;
            let written = write_rollout(&mut encoder, &mut rng, &id, ms, per_session, 0)?;
            encoder.finish()?.flush()?;
            written
        } else {
            let mut file = file;
            let written = write_rollout(&mut file, &mut rng, &id, ms, per_session, 0)?;
            file.flush()?;
            written
        };
        generated.sessions += 1;
        generated.files += 1;
        generated.bytes += bytes;
        generated.records += lines;
    }
    Ok(generated)
}

/// Writes an opencode JSON tree under `dir/storage` with `sessions` sessions of `messages`
/// messages each (user and assistant in turn, each with a few parts of several types), and a
/// session diff for every other session; files as opencode writes them (two-space JSON).
pub fn generate_opencode(dir: &Path, sessions: u64, messages: u64, seed: u64) -> io::Result<Generated> {
    let mut rng = Rng::new(seed);
    let storage = dir.join("storage");
    let mut generated = Generated::default();
    let write = |rel: String, compact: String, generated: &mut Generated| -> io::Result<()> {
        let path = storage.join(rel);
        std::fs::create_dir_all(path.parent().expect("a parent"))?;
        let text = pretty_json(&compact);
        generated.files += 1;
        generated.records += 1;
        generated.bytes += text.len() as u64;
        std::fs::write(path, text)
    };
    let project = "4b0ea68d7af9a6031a7ffda7ad66e0cb83315750";
    let mut ms = 1_748_736_000_000i64;
    write(format!("project/{project}.json"), obj(|o| {
        o.str("id", project).str("worktree", "/home/user/project").str("vcs", "git").raw("time", &format!(r#"{{"created":{ms},"updated":{ms}}}"#));
    }), &mut generated)?;
    for s in 0..sessions {
        ms += rng.range(60_000, 3_600_000) as i64;
        let sid = format!("ses_{:012x}{:014x}", ms, rng.next_u64() >> 8);
        write(format!("session/{project}/{sid}.json"), obj(|o| {
            o.str("id", &sid).str("slug", "quiet-otter").str("version", "1.0.20").str("projectID", project).str("directory", "/home/user/project").str("title", &format!("Session {s}: {}", rng.text(30))).raw("time", &format!(r#"{{"created":{ms},"updated":{}}}"#, ms + 1000));
        }), &mut generated)?;
        generated.sessions += 1;
        let mut t = ms;
        for m in 0..messages {
            t += rng.range(1_000, 30_000) as i64;
            let mid = format!("msg_{:012x}{:014x}", t, rng.next_u64() >> 8);
            let user = m.is_multiple_of(2);
            let info = obj(|o| {
                o.str("id", &mid).str("sessionID", &sid).str("role", if user { "user" } else { "assistant" });
                o.raw("time", &format!(r#"{{"created":{t}}}"#));
                if user {
                    o.str("agent", "build").raw("model", r#"{"providerID":"anthropic","modelID":"claude-sonnet-4"}"#);
                } else {
                    o.str("parentID", "msg_parent").str("modelID", "claude-sonnet-4").str("providerID", "anthropic").str("mode", "build").str("agent", "build");
                    o.raw("path", r#"{"cwd":"/home/user/project","root":"/home/user/project"}"#).int("cost", 0);
                    o.raw("tokens", r#"{"input":10,"output":20,"reasoning":0,"cache":{"read":0,"write":0}}"#);
                }
            });
            write(format!("message/{sid}/{mid}.json"), info, &mut generated)?;
            let kinds: &[&str] = if user { &["text"] } else { &["step-start", "reasoning", "tool", "text", "patch", "step-finish"] };
            for (k, kind) in kinds.iter().enumerate() {
                let pid = format!("prt_{:012x}{:04x}{:010x}", t, k, rng.next_u64() >> 24);
                let part = obj(|o| {
                    o.str("id", &pid).str("sessionID", &sid).str("messageID", &mid).str("type", kind);
                    match *kind {
                        "text" | "reasoning" => {
                            o.str("text", &rng.text_between(50, 800)).raw("time", &format!(r#"{{"start":{t},"end":{}}}"#, t + 5));
                        }
                        "tool" => {
                            let state = obj(|st| {
                                st.str("status", "completed").raw("input", r#"{"command":"cargo test"}"#).str("output", &rng.text_between(100, 4_000)).str("title", "cargo test").raw("metadata", "{}").raw("time", &format!(r#"{{"start":{t},"end":{}}}"#, t + 900));
                            });
                            o.str("callID", &format!("toolu_{k}{t}")).str("tool", "bash").raw("state", &state);
                        }
                        "patch" => {
                            o.str("hash", "0f1e2d3c4b5a69788796a5b4c3d2e1f0a9b8c7d6").strs("files", &["/home/user/project/src/lib.rs".into()]);
                        }
                        "step-start" => {
                            o.str("snapshot", "0f1e2d3c4b5a69788796a5b4c3d2e1f0a9b8c7d6");
                        }
                        _ => {
                            o.str("reason", "stop").int("cost", 0).raw("tokens", r#"{"input":10,"output":20,"reasoning":0,"cache":{"read":0,"write":0}}"#);
                        }
                    }
                });
                write(format!("part/{mid}/{pid}.json"), part, &mut generated)?;
            }
        }
        if s.is_multiple_of(2) {
            let diff = format!("[{}]", obj(|o| {
                o.str("file", "src/lib.rs").str("before", "fn a() {}\n").str("after", "fn a() { b() }\n").int("additions", 1).int("deletions", 1);
            }));
            write(format!("session_diff/{sid}.json"), diff, &mut generated)?;
        }
    }
    Ok(generated)
}

/// Copies a directory tree, files and symlinks as they are (symlinks are not followed): how
/// tests put a checked-in fixture tree where an agent would have written it.
pub fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let dest = to.join(entry.file_name());
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, dest)?;
        } else if kind.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), dest)?;
        }
    }
    Ok(())
}
