//! The client outbox's batches: forming full batches at enqueue time groups ops exactly as
//! forming them all at sync time would, in enqueue order, and a sync reads them in chunks.

use capsync_persistence::client::{BatchLimits, ClientDb, FormedBatch};
use capsync_persistence::{BatchAck, Entity, EntityKind, Op, OpBody, OpOutcome, OpStatus};

fn op(n: u32, data_len: usize) -> Op {
    let mut op_id = [0u8; 16];
    op_id[..4].copy_from_slice(&n.to_be_bytes());
    Op {
        op_id,
        body: OpBody::Put(Entity { kind: EntityKind::Message, id: format!("m{n:04}"), parent_id: String::new(), data: vec![b'x'; data_len] }),
    }
}

fn ids(batches: &[FormedBatch]) -> Vec<(u64, Vec<String>)> {
    batches.iter().map(|b| (b.batch_seq, b.ops.iter().map(|o| o.body.entity_id().to_owned()).collect())).collect()
}

fn open(dir: &tempfile::TempDir, file: &str) -> ClientDb {
    let db = ClientDb::open(&dir.path().join(file)).unwrap();
    db.attach("s", "capsync://127.0.0.1:1/secret", [7; 16]).unwrap();
    db
}

/// Ops enqueued in calls of these sizes, some of them bigger than the byte limit allows in
/// one batch, give the same batches whether they are formed while enqueuing or all at sync.
#[test]
fn batches_formed_at_enqueue_equal_batches_formed_at_sync() {
    let dir = tempfile::tempdir().unwrap();
    // Each op weighs 5 bytes of id + its data; 10 ops or 300 bytes per batch.
    let limits = BatchLimits { max_ops: 10, max_bytes: 300 };
    let calls: &[&[usize]] = &[&[20; 3], &[20; 25], &[95; 4], &[1; 10], &[400], &[20; 7], &[20; 3]];

    let eager = open(&dir, "eager.db");
    let lazy = open(&dir, "lazy.db");
    let mut n = 0;
    let mut eagerly_formed = 0;
    for sizes in calls {
        let ops: Vec<Op> = sizes.iter().map(|&len| { n += 1; op(n, len) }).collect();
        eager.enqueue("s", &ops, limits).unwrap();
        eagerly_formed = eager.unacked_batches("s", 0, usize::MAX).unwrap().len();
        // The lazy outbox never forms anything while enqueuing: its limits cannot close a batch.
        lazy.enqueue("s", &ops, BatchLimits { max_ops: usize::MAX, max_bytes: usize::MAX }).unwrap();
    }
    assert!(eagerly_formed >= 6, "full batches were formed while enqueuing ({eagerly_formed})");
    assert!(lazy.unacked_batches("s", 0, usize::MAX).unwrap().is_empty());

    eager.form_batches("s", limits).unwrap();
    lazy.form_batches("s", limits).unwrap();
    let formed = ids(&eager.unacked_batches("s", 0, usize::MAX).unwrap());
    assert_eq!(formed, ids(&lazy.unacked_batches("s", 0, usize::MAX).unwrap()));

    let in_order: Vec<String> = formed.iter().flat_map(|(_, ids)| ids.clone()).collect();
    let enqueued: Vec<String> = (1..=n).map(|i| format!("m{i:04}")).collect();
    assert_eq!(in_order, enqueued, "every op in exactly one batch, in enqueue order");
    let seqs: Vec<u64> = formed.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, (1..=formed.len() as u64).collect::<Vec<_>>());
    assert!(formed.iter().all(|(_, ids)| ids.len() <= 10));
    assert!(formed.iter().any(|(_, ids)| ids == &["m0043".to_owned()]), "the 405-byte op is a batch of its own");
}

#[test]
fn unacked_batches_are_read_in_chunks_after_a_batch_seq() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "chunks.db");
    let ops: Vec<Op> = (1..=45).map(|n| op(n, 10)).collect();
    db.enqueue("s", &ops, BatchLimits { max_ops: 10, max_bytes: 1 << 20 }).unwrap();
    assert_eq!(db.unacked_batches("s", 0, usize::MAX).unwrap().len(), 4, "the open fifth batch waits for sync");
    db.form_batches("s", BatchLimits { max_ops: 10, max_bytes: 1 << 20 }).unwrap();

    let first = db.unacked_batches("s", 0, 2).unwrap();
    assert_eq!(first.iter().map(|b| b.batch_seq).collect::<Vec<_>>(), [1, 2]);
    let rest = db.unacked_batches("s", 2, 2).unwrap();
    assert_eq!(rest.iter().map(|b| b.batch_seq).collect::<Vec<_>>(), [3, 4]);
    let last = db.unacked_batches("s", 4, 2).unwrap();
    assert_eq!(ids(&last), [(5, (41..=45).map(|i| format!("m{i:04}")).collect())]);
    assert!(db.unacked_batches("s", 5, 2).unwrap().is_empty());
}

fn ack_for(batch: &FormedBatch, outcome: impl Fn(usize) -> (OpStatus, u64, &'static str)) -> BatchAck {
    let results = batch
        .ops
        .iter()
        .enumerate()
        .map(|(i, op)| {
            let (status, seq, reason) = outcome(i);
            OpOutcome { op_id: op.op_id.to_vec(), status, seq, reason: reason.to_owned() }
        })
        .collect();
    BatchAck { cursor: 1000, batch_seq: batch.batch_seq, results }
}

/// Each op's state, ack seq and attempts, in outbox order.
fn rows(db: &ClientDb, batch: &FormedBatch) -> Vec<(String, u64, u64)> {
    batch
        .ops
        .iter()
        .map(|op| {
            let (state, ack_seq, _) = db.op_state(&op.op_id).unwrap().unwrap();
            (state, ack_seq, db.op_attempts(&op.op_id).unwrap())
        })
        .collect()
}

/// Acks are recorded per op whichever way they are written: in one statement for a batch of
/// consecutive rows acked at consecutive seqs, op by op for any other (a rejected op, seqs
/// that are not consecutive, or a batch whose rows another ref's ops interleave).
#[test]
fn each_op_gets_its_own_outcome_and_ack_seq() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "acks.db");
    db.attach("other", "capsync://127.0.0.1:1/other", [8; 16]).unwrap();
    let limits = BatchLimits { max_ops: 4, max_bytes: 1 << 20 };
    db.enqueue("s", &(1..=8).map(|n| op(n, 10)).collect::<Vec<_>>(), limits).unwrap();
    // Two ops left open, then another ref's op, then two more: the third batch's rows are
    // not consecutive in the outbox.
    db.enqueue("s", &(9..=10).map(|n| op(n, 10)).collect::<Vec<_>>(), limits).unwrap();
    db.enqueue("other", &[op(100, 10)], limits).unwrap();
    db.enqueue("s", &(11..=12).map(|n| op(n, 10)).collect::<Vec<_>>(), limits).unwrap();
    let batches = db.unacked_batches("s", 0, usize::MAX).unwrap();
    assert_eq!(batches.len(), 3);

    let plain = ack_for(&batches[0], |i| (OpStatus::Applied, 50 + i as u64, ""));
    let mixed = ack_for(&batches[1], |i| match i {
        1 => (OpStatus::Rejected, 0, "bad"),
        _ => (OpStatus::Applied, 60 + i as u64, ""),
    });
    let gapped = ack_for(&batches[2], |i| (OpStatus::Duplicate, 70 + i as u64, ""));
    // The first batch is marked sent in an earlier transaction, the others with their acks.
    db.record_progress("s", &[1], &[]).unwrap();
    assert_eq!(rows(&db, &batches[0])[0], ("sent".to_owned(), 0, 1));
    db.record_progress("s", &[2, 3], &[plain, mixed, gapped]).unwrap();

    let acked = |seqs: std::ops::Range<u64>| seqs.map(|s| ("acked".to_owned(), s, 1)).collect::<Vec<_>>();
    assert_eq!(rows(&db, &batches[0]), acked(50..54));
    assert_eq!(
        rows(&db, &batches[1]),
        [("acked".to_owned(), 60, 1), ("rejected".to_owned(), 0, 1), ("acked".to_owned(), 62, 1), ("acked".to_owned(), 63, 1)]
    );
    assert_eq!(rows(&db, &batches[2]), acked(70..74));
    assert!(db.unacked_batches("s", 0, usize::MAX).unwrap().is_empty());
    let other = db.op_state(&op(100, 10).op_id).unwrap().unwrap();
    assert_eq!((other.0.as_str(), other.1), ("pending", 0), "another ref's op is left alone");
}

/// A client id that is not 16 bytes is an error naming the problem, never sixteen zero bytes
/// (which every corrupt ref would then share, mixing their batchSeqs on the server).
#[test]
fn a_corrupt_client_id_is_an_error_not_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    drop(open(&dir, "outbox.db"));
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute("UPDATE refs SET client_id = x'0102' WHERE name = 's'", []).unwrap();
    drop(raw);
    let db = ClientDb::open(&path).unwrap();
    let err = db.ref_row("s").expect_err("a 2-byte client id must not load");
    assert!(err.to_string().contains("not 16"), "{err}");
}
