//! The history checker of the chaos tests (after Jepsen's set checker).
//!
//! A client's history is its own outbox: every op it created, in creation order, with the
//! state it reached and the seq its ack reported. An op still `sent` when the history is read
//! is indeterminate (its ack may have been lost): it may or may not be in the log, but at most
//! once. The server's log is every applied op with its seq.

use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct HistoryOp {
    pub op_id: Vec<u8>,
    pub state: String,
    pub ack_seq: u64,
}

/// Reads a client's history from its outbox file.
pub fn history(outbox: &Path) -> Vec<HistoryOp> {
    let db = rusqlite::Connection::open(outbox).unwrap();
    let mut stmt = db.prepare("SELECT op_id, state, ack_seq FROM outbox ORDER BY seq").unwrap();
    stmt.query_map([], |r| Ok(HistoryOp { op_id: r.get(0)?, state: r.get(1)?, ack_seq: r.get::<_, i64>(2)? as u64 }))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[derive(Debug, Default)]
pub struct Verdict {
    pub created: usize,
    pub acked: usize,
    pub indeterminate: usize,
    pub logged: usize,
}

/// Checks the histories against the log `(seq, op_id)` in seq order. With `all_delivered`,
/// every created op must also be acked and logged (the run ended by draining every outbox).
pub fn check(histories: &[Vec<HistoryOp>], log: &[(u64, Vec<u8>)], all_delivered: bool) -> Result<Verdict, String> {
    let mut verdict = Verdict { logged: log.len(), ..Verdict::default() };
    for (i, (seq, _)) in log.iter().enumerate() {
        if *seq != i as u64 + 1 {
            return Err(format!("the log skips from seq {} to {seq}", i));
        }
    }
    let mut position: HashMap<&[u8], u64> = HashMap::new();
    for (seq, op_id) in log {
        if position.insert(op_id, *seq).is_some() {
            return Err(format!("opId {op_id:02x?} has two effects (the second at seq {seq})"));
        }
    }
    let mut created: HashMap<&[u8], usize> = HashMap::new();
    for (client, ops) in histories.iter().enumerate() {
        let mut last_seq = 0;
        for op in ops {
            verdict.created += 1;
            created.insert(&op.op_id, client);
            let logged = position.get(op.op_id.as_slice()).copied();
            match op.state.as_str() {
                "acked" => {
                    verdict.acked += 1;
                    if logged != Some(op.ack_seq) {
                        return Err(format!("client {client}: an op acked at seq {} is logged at {logged:?}", op.ack_seq));
                    }
                }
                "sent" | "pending" => verdict.indeterminate += 1,
                other => return Err(format!("client {client}: an op ended {other}")),
            }
            if all_delivered && (op.state != "acked" || logged.is_none()) {
                return Err(format!("client {client}: an op was never delivered (state {})", op.state));
            }
            if let Some(seq) = logged {
                if seq < last_seq {
                    return Err(format!("client {client}: its ops were applied out of order (seq {seq} after {last_seq})"));
                }
                last_seq = seq;
            }
        }
    }
    if let Some((seq, _)) = log.iter().find(|(_, id)| !created.contains_key(id.as_slice())) {
        return Err(format!("the op at seq {seq} was created by no client"));
    }
    Ok(verdict)
}
