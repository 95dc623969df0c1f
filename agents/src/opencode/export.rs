//! Writing a session's entities back as opencode's JSON tree.

use super::pretty_json;
use crate::payload::{chunk_piece, join_chunks, Fields, JsonObject};
use crate::safety::is_plain_relative;
use crate::{AgentError, Entity, EntityKind, ExportReport};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Writes the opencode records among `entities` as opencode's JSON tree under `dir/storage/`:
/// `session/<project>/<id>.json`, `message/<session>/<id>.json`, `part/<message>/<id>.json`
/// and `session_diff/<session>.json`, each at the path it was imported from.
///
/// A record imported from the tree comes back byte for byte; one imported from the database
/// comes back as the same JSON value, written as opencode writes its files (two-space
/// indentation). Model entities are derived (from messages) and not written. When the
/// session's project has no `storage/project/<id>.json` yet, a minimal one is written
/// (`id`, `worktree` = the session's directory, `time`), which opencode needs to see the
/// session. Files are written whole (a temporary file, then a rename); no path outside
/// `dir/storage` is ever written, whatever the entities say.
pub fn export_opencode<'a>(entities: impl IntoIterator<Item = &'a Entity>, dir: &Path) -> Result<ExportReport, AgentError> {
    let mut report = ExportReport::default();
    let mut records: Vec<&'a Entity> = Vec::new();
    let mut chunks: HashMap<String, Vec<(u64, Vec<u8>)>> = HashMap::new();
    for entity in entities {
        let Some(fields) = Fields::parse(&entity.data) else {
            report.skipped += 1;
            continue;
        };
        if fields.str("agent").as_deref() != Some("opencode") {
            report.skipped += 1;
            continue;
        }
        if let Some((owner, index, piece)) = chunk_piece(&entity.data) {
            // Owner ids do not collide across kinds: the session's is the capsync session id,
            // the diff's `session_diff`, messages' and parts' opencode's own (`msg_…`, `prt_…`).
            chunks.entry(owner).or_default().push((index, piece));
            continue;
        }
        match entity.kind {
            EntityKind::Model => {}
            _ => records.push(entity),
        }
    }
    std::fs::create_dir_all(dir.join("storage")).map_err(|e| AgentError::io("storage", e))?;
    let base = std::fs::canonicalize(dir.join("storage")).map_err(|e| AgentError::io("storage", e))?;
    // Sessions first, then the rest in a stable order.
    records.sort_by_key(|e| (e.kind != EntityKind::Session, e.kind as u8, e.id.clone()));
    for entity in records {
        let fields = Fields::parse(&entity.data).expect("parsed above");
        let Some(file) = fields.str("file").filter(|f| valid_file(f)) else {
            report.missing.push(format!("{} {}: no usable file path", entity.kind.name(), entity.id));
            continue;
        };
        let value = match fields.chunk_count() {
            None => fields.inline("value").map_err(AgentError::Format)?,
            Some(count) => join_chunks(chunks.remove(&entity.id).unwrap_or_default(), count),
        };
        let Some(value) = value else {
            report.missing.push(format!("{file} (incomplete)"));
            continue;
        };
        let Ok(value) = String::from_utf8(value) else {
            report.missing.push(format!("{file} (not text)"));
            continue;
        };
        let bytes = match (fields.str("source").as_deref(), ws(&fields)) {
            (Some("tree"), Some((lead, trail))) => format!("{lead}{value}{trail}"),
            (Some("tree"), None) => value.clone(),
            _ => pretty_json(&value),
        };
        write(&base, &file, bytes.as_bytes())?;
        report.written += 1;
        if entity.kind == EntityKind::Session {
            project_file(&base, &value)?;
        }
    }
    Ok(report)
}

/// A path an export may write: `session/…`, `message/…`, `part/…` or `session_diff/…`,
/// ending in `.json`, plain and relative.
fn valid_file(file: &str) -> bool {
    is_plain_relative(file)
        && file.ends_with(".json")
        && ["session/", "message/", "part/", "session_diff/"].iter().any(|p| file.starts_with(p))
}

fn ws(fields: &Fields<'_>) -> Option<(String, String)> {
    let raw = fields.raw("ws")?;
    let [lead, trail]: [String; 2] = serde_json::from_str(raw.get()).ok()?;
    let only_ws = |s: &str| s.chars().all(|c| matches!(c, ' ' | '\t' | '\n' | '\r'));
    (only_ws(&lead) && only_ws(&trail)).then_some((lead, trail))
}

/// Writes `bytes` to `base/rel` whole, creating directories, refusing a path that would
/// resolve outside `base` (a symlink in the way).
fn write(base: &Path, rel: &str, bytes: &[u8]) -> Result<(), AgentError> {
    let target = base.join(rel);
    let parent = target.parent().expect("a file has a parent");
    std::fs::create_dir_all(parent).map_err(|e| AgentError::io(rel, e))?;
    let real_parent: PathBuf = std::fs::canonicalize(parent).map_err(|e| AgentError::io(rel, e))?;
    if !real_parent.starts_with(base) {
        return Err(AgentError::Escape(rel.to_owned()));
    }
    let name = target.file_name().expect("a file has a name");
    let tmp = real_parent.join(format!(".{}.capsync-tmp", name.to_string_lossy()));
    std::fs::write(&tmp, bytes).map_err(|e| AgentError::io(rel, e))?;
    std::fs::rename(&tmp, real_parent.join(name)).map_err(|e| AgentError::io(rel, e))?;
    Ok(())
}

/// `project/<projectID>.json` for the session in `value`, when there is none.
fn project_file(base: &Path, value: &str) -> Result<(), AgentError> {
    #[derive(serde::Deserialize, Default)]
    struct Info {
        #[serde(default, rename = "projectID")]
        project_id: crate::lenient::LStr,
        #[serde(default)]
        directory: crate::lenient::LStr,
        #[serde(default)]
        time: Option<Time>,
    }
    #[derive(serde::Deserialize, Default)]
    struct Time {
        #[serde(default)]
        created: crate::lenient::LNum,
    }
    let info: Info = serde_json::from_str(value).unwrap_or_default();
    let Some(project) = info.project_id.0.filter(|p| super::valid_id(p)) else { return Ok(()) };
    let rel = format!("project/{project}.json");
    if base.join(&rel).exists() {
        return Ok(());
    }
    let worktree = if project == "global" { "/".to_owned() } else { info.directory.0.unwrap_or_else(|| "/".into()) };
    let created = info.time.and_then(|t| t.created.0).unwrap_or(0);
    let mut out = JsonObject::new();
    out.str("id", &project).str("worktree", &worktree).raw("time", &format!(r#"{{"created":{created},"updated":{created}}}"#));
    let text = String::from_utf8(out.finish()).expect("JSON is UTF-8");
    write(base, &rel, pretty_json(&text).as_bytes())
}
