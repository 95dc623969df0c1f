//! Writes the seed corpus: `cargo run --manifest-path fuzz/Cargo.toml --bin gen_corpus`.

use capsync_schema::capsync_capnp::{batch, EntityKind};
use std::path::Path;

fn batch_seed(ops: &[(EntityKind, &str, &str, Option<&str>)], op_id_len: usize) -> Vec<u8> {
    let mut message = capnp::message::Builder::new_default();
    let mut b = message.init_root::<batch::Builder>();
    b.set_client_id(&[7; 16]);
    b.set_batch_seq(1);
    let mut list = b.init_ops(ops.len() as u32);
    for (i, (kind, id, parent, data)) in ops.iter().enumerate() {
        let mut op = list.reborrow().get(i as u32);
        op.set_op_id(&vec![i as u8 + 1; op_id_len]);
        match data {
            Some(data) => {
                let mut e = op.init_put();
                e.set_kind(*kind);
                e.set_id(*id);
                e.set_parent_id(*parent);
                e.set_data(data.as_bytes());
            }
            None => {
                let mut k = op.init_delete();
                k.set_kind(*kind);
                k.set_id(*id);
            }
        }
    }
    capnp::serialize::write_message_to_words(&message)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let batches = root.join("batch_apply");
    use EntityKind::*;
    write(&batches, "message-and-part", &batch_seed(&[(Message, "m1", "", Some("{\"role\":\"user\"}")), (Part, "p1", "m1", Some("[1,2]"))], 16));
    write(&batches, "orphan-part", &batch_seed(&[(Part, "p1", "nope", Some("{}"))], 16));
    write(&batches, "delete-cascade", &batch_seed(&[(Message, "m", "", Some("1")), (Part, "p", "m", Some("2")), (Message, "m", "", None)], 16));
    write(&batches, "bad-json", &batch_seed(&[(Diff, "d", "", Some("{nope"))], 16));
    write(&batches, "short-op-id", &batch_seed(&[(Model, "x", "", Some("\"gpt\""))], 3));
    write(&batches, "same-op-twice", &batch_seed(&[(Message, "a", "", Some("1")), (Message, "a", "", Some("1"))], 0));
    let uris = root.join("sturdy_uri");
    // One character short of a token, so no secret scanner mistakes a seed for a leaked one;
    // the fuzzer reaches well-formed tokens with a single inserted byte.
    let token = format!("csy_{}", "0".repeat(42));
    write(&uris, "plain", format!("capsync://127.0.0.1:7420/{token}").as_bytes());
    write(&uris, "tls-v6", format!("capsyncs://[::1]:443/{token}").as_bytes());
    write(&uris, "bad-port", b"capsync://host:99999/csy_x");
    write(&uris, "marker", b"remote exception: capsync/revoked: share x");
    let jsonl = root.join("jsonl");
    write(&jsonl, "ops", b"{\"op\":\"put\",\"kind\":\"part\",\"id\":\"p1\",\"parent\":\"m1\",\"data\":{\"a\":[1,2]}}\n{\"op\":\"delete\",\"kind\":\"message\",\"id\":\"m1\"}\n");
    write(&jsonl, "bad-kind", b"{\"op\":\"put\",\"kind\":\"blob\",\"id\":\"x\",\"data\":null}\n");
}
