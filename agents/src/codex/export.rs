//! Writing a session's entities back as a Codex rollout.

use crate::payload::{chunk_piece, join_chunks, Fields};
use crate::{AgentError, Entity, EntityKind, ExportReport};
use std::collections::HashMap;
use std::io::Write;

/// Writes the rollout that the entities of one imported Codex session came from: every line
/// an entity carries, in line order, each followed by `\n`. For a rollout whose last line ended
/// with `\n`, the output is the file's bytes exactly (a `.zst` rollout comes out decompressed).
///
/// `entities` may come in any order (a replica's snapshot, say); only references to them are
/// kept. Entities that carry no rollout line (not imported from Codex) are counted in
/// [`ExportReport::skipped`]; lines missing from the set (never imported, e.g. over the line
/// cap, or not yet pulled), and lines whose chunks are incomplete, are listed in
/// [`ExportReport::missing`] and left out.
pub fn export_codex<'a>(entities: impl IntoIterator<Item = &'a Entity>, out: &mut impl Write) -> Result<ExportReport, AgentError> {
    let mut report = ExportReport::default();
    let mut lines: Vec<(u64, &'a Entity)> = Vec::new();
    let mut chunks: HashMap<String, Vec<&'a Entity>> = HashMap::new();
    for entity in entities {
        let Some(fields) = Fields::parse(&entity.data) else {
            report.skipped += 1;
            continue;
        };
        if fields.str("agent").as_deref() != Some("codex") {
            report.skipped += 1;
            continue;
        }
        if let Some(owner) = fields.str("chunk_of") {
            chunks.entry(owner).or_default().push(entity);
            continue;
        }
        let Some(line) = fields.int("line").and_then(|n| u64::try_from(n).ok()) else {
            report.skipped += 1;
            continue;
        };
        if entity.kind == EntityKind::Session {
            report.file = fields.str("file");
        }
        lines.push((line, entity));
    }
    // The session entity holds line 0; should another entity claim a line too, the session
    // entity (or else the first) wins.
    lines.sort_by_key(|(n, e)| (*n, e.kind != EntityKind::Session));
    lines.dedup_by_key(|(n, _)| *n);
    let mut expected = 0u64;
    let io = |e| AgentError::io("<export>", e);
    for (n, entity) in lines {
        for gap in expected..n {
            report.missing.push(format!("line {}", gap + 1));
        }
        expected = n + 1;
        let fields = Fields::parse(&entity.data).expect("parsed above");
        let bytes = match fields.chunk_count() {
            None => match fields.inline("raw").map_err(AgentError::Format)? {
                Some(bytes) => bytes,
                None => {
                    report.missing.push(format!("line {}", n + 1));
                    continue;
                }
            },
            Some(count) => {
                let pieces = chunks
                    .get(&entity.id)
                    .map(|list| list.iter().filter_map(|c| chunk_piece(&c.data)).map(|(_, i, p)| (i, p)).collect())
                    .unwrap_or_default();
                match join_chunks(pieces, count) {
                    Some(bytes) => bytes,
                    None => {
                        report.missing.push(format!("line {} (incomplete chunks)", n + 1));
                        continue;
                    }
                }
            }
        };
        out.write_all(&bytes).map_err(io)?;
        out.write_all(b"\n").map_err(io)?;
        report.written += 1;
    }
    out.flush().map_err(io)?;
    Ok(report)
}
