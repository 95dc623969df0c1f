//! How a server store keeps an applied batch so a replay of it is answered exactly as the
//! first time: its opIds and its results, as bytes. One encoding, shared by the SQLite and
//! PostgreSQL stores (a database moved between them answers replays the same).

use crate::{IncomingBatch, OpOutcome, OpStatus};

/// The batch's opIds: per op its length (u32 LE), then its bytes (ids of rejected ops may have
/// any length, and the list must still compare exactly).
pub fn encode_op_ids(batch: &IncomingBatch) -> Vec<u8> {
    batch.ops.iter().flat_map(|op| (op.op_id.len() as u32).to_le_bytes().into_iter().chain(op.op_id.iter().copied())).collect()
}

/// Per op: status (1 byte), seq (8), reason length (4), reason.
pub fn encode_results(results: &[OpOutcome]) -> Vec<u8> {
    let mut out = Vec::with_capacity(results.len() * 13);
    for r in results {
        out.push(r.status as u8);
        out.extend_from_slice(&r.seq.to_le_bytes());
        out.extend_from_slice(&(r.reason.len() as u32).to_le_bytes());
        out.extend_from_slice(r.reason.as_bytes());
    }
    out
}

/// The results [`encode_results`] wrote (opIds empty: the caller has them); `None` if corrupt.
pub fn decode_results(mut bytes: &[u8]) -> Option<Vec<OpOutcome>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let status = OpStatus::from_code(*bytes.first()?)?;
        let seq = u64::from_le_bytes(bytes.get(1..9)?.try_into().ok()?);
        let len = u32::from_le_bytes(bytes.get(9..13)?.try_into().ok()?) as usize;
        let reason = String::from_utf8(bytes.get(13..13 + len)?.to_vec()).ok()?;
        bytes = &bytes[13 + len..];
        out.push(OpOutcome { op_id: Vec::new(), status, seq, reason });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_round_trip() {
        let results = vec![
            OpOutcome { op_id: Vec::new(), status: OpStatus::Applied, seq: 7, reason: String::new() },
            OpOutcome { op_id: Vec::new(), status: OpStatus::Rejected, seq: 0, reason: "nope ✓".into() },
        ];
        assert_eq!(decode_results(&encode_results(&results)), Some(results));
        assert_eq!(decode_results(&[9]), None);
    }
}
