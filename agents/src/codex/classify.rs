//! What one rollout line is, read leniently from its JSON.
//!
//! A rollout line is `{"timestamp", "type", "payload"}` with `type` one of `session_meta`,
//! `response_item`, `event_msg`, `turn_context`, `compacted` (Codex's `RolloutLine` and
//! `RolloutItem`). Older rollouts started with a bare `SessionMeta` object and went on with bare
//! `ResponseItem`s; both are recognized. Only a few fields are read (ids, roles, types, the
//! model, a title); the line itself is kept whole by the caller, so a field this module does
//! not know about is never lost. A field of an unexpected JSON type reads as absent.

use crate::lenient::LStr;
use crate::lenient::LBool;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// The longest title kept, in bytes.
pub const MAX_TITLE: usize = 120;
/// The longest string field kept in derived data, in bytes.
const MAX_FIELD: usize = 256;
/// At most this many file names of a patch are listed in a diff entity's data.
const MAX_FILES: usize = 64;

/// The fields read from a line, or from its `payload`.
#[derive(Deserialize, Default)]
struct Fields<'a> {
    #[serde(default)]
    timestamp: LStr,
    #[serde(default, rename = "type")]
    ty: LStr,
    #[serde(default, borrow)]
    payload: Option<&'a RawValue>,
    #[serde(default)]
    id: LStr,
    #[serde(default)]
    role: LStr,
    #[serde(default)]
    phase: LStr,
    #[serde(default)]
    name: LStr,
    #[serde(default)]
    call_id: LStr,
    #[serde(default)]
    cwd: LStr,
    #[serde(default)]
    cli_version: LStr,
    #[serde(default)]
    originator: LStr,
    #[serde(default)]
    model_provider: LStr,
    #[serde(default)]
    model: LStr,
    #[serde(default)]
    effort: LStr,
    #[serde(default)]
    success: LBool,
    #[serde(default)]
    message: LStr,
    #[serde(default)]
    instructions: Option<IgnoredAny>,
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
    #[serde(default, borrow)]
    changes: Option<&'a RawValue>,
}

/// What a session_meta line says about the session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub id: String,
    pub cwd: Option<String>,
    pub cli_version: Option<String>,
    pub originator: Option<String>,
    pub model_provider: Option<String>,
    pub started_at: Option<String>,
}

/// What kind of record a line is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    SessionMeta(Meta),
    /// `response_item` of type `message` (or a legacy bare one).
    Message { role: Option<String>, phase: Option<String> },
    /// Any other `response_item` (reasoning, function_call, function_call_output, ...).
    ResponseItem { item: Option<String>, name: Option<String>, call_id: Option<String> },
    Compacted,
    TurnContext { model: Option<String>, effort: Option<String> },
    PatchApplyEnd { call_id: Option<String>, success: Option<bool>, files: Vec<String> },
    /// Any other `event_msg`.
    Event { event: Option<String> },
    /// Valid JSON of a shape this module does not know.
    Other { ty: Option<String> },
    /// Not JSON (or not an object).
    Invalid,
}

/// One line, classified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub kind: Kind,
    /// The line's `timestamp`, as written (bounded), and in milliseconds.
    pub timestamp: Option<String>,
    pub ts_ms: Option<i64>,
    /// A title candidate: the text of a user prompt on this line.
    pub title: Option<String>,
}

const RESPONSE_ITEMS: &[&str] = &[
    "message",
    "reasoning",
    "local_shell_call",
    "function_call",
    "function_call_output",
    "custom_tool_call",
    "custom_tool_call_output",
    "web_search_call",
    "image_generation_call",
    "tool_search_call",
    "tool_search_output",
    "compaction",
    "compaction_summary",
    "context_compaction",
    "ghost_snapshot",
];

fn bounded(s: Option<String>) -> Option<String> {
    s.map(|s| crate::payload::truncate(&s, MAX_FIELD).to_owned())
}

/// Classifies a line (its bytes without the newline). `first` says it is the file's first.
pub fn classify(bytes: &[u8], first: bool) -> Line {
    let invalid = Line { kind: Kind::Invalid, timestamp: None, ts_ms: None, title: None };
    let Ok(text) = std::str::from_utf8(bytes) else { return invalid };
    if !text.trim_start().starts_with('{') {
        return invalid;
    }
    let Ok(outer) = serde_json::from_str::<Fields<'_>>(text) else { return invalid };
    let timestamp = bounded(outer.timestamp.0.clone());
    let ts_ms = timestamp.as_deref().and_then(crate::opid::parse_rfc3339_ms);
    let line = |kind, title| Line { kind, timestamp: timestamp.clone(), ts_ms, title };
    let ty = outer.ty.0.as_deref();
    match (outer.payload, ty) {
        (Some(payload), Some(ty)) => {
            let inner = serde_json::from_str::<Fields<'_>>(payload.get()).unwrap_or_default();
            match ty {
                "session_meta" => line(meta(inner, timestamp.clone()), None),
                "response_item" => response_item(inner, &line),
                "compacted" => line(Kind::Compacted, None),
                "turn_context" => line(Kind::TurnContext { model: bounded(inner.model.0), effort: bounded(inner.effort.0) }, None),
                "event_msg" => match inner.ty.0.as_deref() {
                    Some("patch_apply_end") => line(
                        Kind::PatchApplyEnd { call_id: bounded(inner.call_id.0), success: inner.success.0, files: files(inner.changes) },
                        None,
                    ),
                    Some("user_message") => {
                        let title = inner.message.0.as_deref().and_then(title_of);
                        line(Kind::Event { event: Some("user_message".into()) }, title)
                    }
                    _ => line(Kind::Event { event: bounded(inner.ty.0) }, None),
                },
                _ => line(Kind::Other { ty: bounded(Some(ty.to_owned())) }, None),
            }
        }
        // A legacy rollout: a bare SessionMeta first, then bare ResponseItems.
        (None, None) if first && outer.id.0.is_some() && (outer.instructions.is_some() || timestamp.is_some()) => {
            let started = timestamp.clone();
            line(meta(outer, started), None)
        }
        (None, Some(ty)) if RESPONSE_ITEMS.contains(&ty) => response_item(outer, &line),
        _ => line(Kind::Other { ty: bounded(ty.map(str::to_owned)) }, None),
    }
}

fn meta(fields: Fields<'_>, line_ts: Option<String>) -> Kind {
    match fields.id.0 {
        Some(id) => Kind::SessionMeta(Meta {
            id,
            cwd: bounded(fields.cwd.0),
            cli_version: bounded(fields.cli_version.0),
            originator: bounded(fields.originator.0),
            model_provider: bounded(fields.model_provider.0),
            started_at: bounded(fields.timestamp.0).or(line_ts),
        }),
        None => Kind::Other { ty: Some("session_meta".into()) },
    }
}

fn response_item(fields: Fields<'_>, line: &dyn Fn(Kind, Option<String>) -> Line) -> Line {
    match fields.ty.0.as_deref() {
        Some("message") => {
            let role = bounded(fields.role.0);
            let title = if role.as_deref() == Some("user") { fields.content.and_then(first_prompt) } else { None };
            line(Kind::Message { role, phase: bounded(fields.phase.0) }, title)
        }
        _ => line(
            Kind::ResponseItem { item: bounded(fields.ty.0), name: bounded(fields.name.0), call_id: bounded(fields.call_id.0) },
            None,
        ),
    }
}

#[derive(Deserialize)]
struct ContentItem {
    #[serde(default, rename = "type")]
    ty: LStr,
    #[serde(default)]
    text: LStr,
}

/// The first input text of a user message that is a prompt (not injected context such as
/// `<environment_context>` or `<user_instructions>`).
fn first_prompt(content: &RawValue) -> Option<String> {
    let items: Vec<ContentItem> = serde_json::from_str(content.get()).ok()?;
    items
        .into_iter()
        .filter(|item| item.ty.0.as_deref() == Some("input_text"))
        .find_map(|item| item.text.0.as_deref().and_then(title_of))
}

/// A title from a prompt: its first non-empty line, bounded; `None` for injected context.
pub fn title_of(text: &str) -> Option<String> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('<') || trimmed.starts_with("# AGENTS.md") {
        return None;
    }
    let first = trimmed.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(crate::payload::truncate(first, MAX_TITLE).to_owned())
}

fn files(changes: Option<&RawValue>) -> Vec<String> {
    let Some(changes) = changes else { return Vec::new() };
    let map: BTreeMap<String, IgnoredAny> = serde_json::from_str(changes.get()).unwrap_or_default();
    map.into_keys().take(MAX_FILES).map(|f| crate::payload::truncate(&f, MAX_FIELD).to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_classified() {
        let meta_line = br#"{"timestamp":"2025-08-05T12:00:00.000Z","type":"session_meta","payload":{"id":"0198-x","timestamp":"2025-08-05T12:00:00.000Z","cwd":"/w","originator":"codex_cli_rs","cli_version":"0.20.0","instructions":null}}"#;
        let line = classify(meta_line, true);
        let Kind::SessionMeta(meta) = line.kind else { panic!("{line:?}") };
        assert_eq!((meta.id.as_str(), meta.cwd.as_deref()), ("0198-x", Some("/w")));
        assert_eq!(line.ts_ms, Some(1_754_395_200_000));
        let user = br#"{"timestamp":"2025-08-05T12:00:01.000Z","type":"response_item","payload":{"type":"message","role":"user","content":[{"type":"input_text","text":"<environment_context>x</environment_context>"},{"type":"input_text","text":"\n  Fix the bug\nplease"}]}}"#;
        let line = classify(user, false);
        assert_eq!(line.kind, Kind::Message { role: Some("user".into()), phase: None });
        assert_eq!(line.title.as_deref(), Some("Fix the bug"));
        let patch = br#"{"timestamp":"x","type":"event_msg","payload":{"type":"patch_apply_end","call_id":"c1","stdout":"","stderr":"","success":true,"changes":{"b.rs":{"type":"add","content":""},"a.rs":{"type":"delete","content":""}}}}"#;
        assert_eq!(
            classify(patch, false).kind,
            Kind::PatchApplyEnd { call_id: Some("c1".into()), success: Some(true), files: vec!["a.rs".into(), "b.rs".into()] }
        );
        let odd = br#"{"timestamp":"x","type":"turn_context","payload":{"model":{"nested":1},"effort":"high"}}"#;
        assert_eq!(classify(odd, false).kind, Kind::TurnContext { model: None, effort: Some("high".into()) });
        assert_eq!(classify(b"{not json", false).kind, Kind::Invalid);
        assert_eq!(classify(b"[1,2]", false).kind, Kind::Invalid);
        let legacy = br#"{"id":"abc","timestamp":"2025-04-01T00:00:00Z","instructions":"hi"}"#;
        assert!(matches!(classify(legacy, true).kind, Kind::SessionMeta(_)));
        let bare = br#"{"type":"function_call","name":"shell","arguments":"{}","call_id":"c"}"#;
        assert!(matches!(classify(bare, false).kind, Kind::ResponseItem { .. }));
        assert_eq!(classify(br#"{"record_type":"state"}"#, false).kind, Kind::Other { ty: None });
    }
}
