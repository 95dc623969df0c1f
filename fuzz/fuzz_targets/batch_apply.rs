//! A batch as the server receives it: decode with the server's reader limits, validate
//! (`convert::batch`), apply to a fresh session, then replay it, checking the invariants of
//! DESIGN §5 on every input.
#![no_main]

use capsync_persistence::server::{self, AppendError};
use capsync_persistence::writer::Txn;
use capsync_persistence::{IncomingBatch, OpStatus};
use capsync_schema::capsync_capnp::batch;
use capsync_server::{convert, Limits};
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;

fn fresh_db() -> rusqlite::Connection {
    server::open(std::path::Path::new(":memory:")).expect("an in-memory server database")
}

thread_local! {
    /// Reused across inputs (opening one costs more than most inputs); replaced every few
    /// thousand so the fuzzer's memory does not grow with what it stored.
    static DB: RefCell<(rusqlite::Connection, u32)> = RefCell::new((fresh_db(), 0));
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let mut options = capnp::message::ReaderOptions::new();
    options.traversal_limit_in_words(Some(limits.traversal_limit_words));
    options.nesting_limit(limits.nesting_limit);
    let Ok(message) = capnp::serialize::read_message_from_flat_slice(&mut &data[..], options) else { return };
    let Ok(reader) = message.get_root::<batch::Reader>() else { return };
    let Ok(incoming) = convert::batch(reader, &limits) else { return };
    // A fresh session and client, so the batch is applied rather than refused as a gap.
    let batch = IncomingBatch { batch_seq: 1, ..incoming };
    DB.with(|cell| {
        let mut cell = cell.borrow_mut();
        cell.1 += 1;
        if cell.1 % 5000 == 0 {
            cell.0 = fresh_db();
        }
        let db = &mut cell.0;
        let session_id = uuid::Uuid::now_v7().to_string();
        let sid = Txn::run(db, |txn| txn.create_session(&session_id, "fuzz", 1)).expect("a session");
        let first = Txn::run::<_, AppendError>(db, |txn| txn.append(sid, &session_id, &batch)).expect("a fresh batch applies");
        assert_eq!(first.results.len(), batch.ops.len(), "one result per op");
        let mut last_seq = 0;
        for (r, op) in first.results.iter().zip(&batch.ops) {
            assert_eq!(r.op_id, op.op_id);
            match r.status {
                OpStatus::Applied => {
                    assert_eq!(r.seq, last_seq + 1, "applied seqs count up from the cursor");
                    last_seq = r.seq;
                }
                OpStatus::Duplicate => assert!(r.seq >= 1 && r.seq <= last_seq, "a duplicate points at an earlier op"),
                OpStatus::Conflict | OpStatus::Rejected => assert!(!r.reason.is_empty(), "a refusal says why"),
            }
        }
        assert_eq!(first.cursor, last_seq, "the cursor counts applied ops");
        let again = Txn::run::<_, AppendError>(db, |txn| txn.append(sid, &session_id, &batch)).expect("a replay answers");
        assert_eq!(again.cursor, first.cursor, "a replay changes nothing");
        for (a, b) in first.results.iter().zip(&again.results) {
            let expected = if a.status == OpStatus::Applied { OpStatus::Duplicate } else { a.status };
            assert_eq!((b.status, b.seq, &b.reason), (expected, a.seq, &a.reason), "a replay answers as the first time");
        }
    });
});
