//! Between the storage model and the wire structs, on the client side: the mapping itself is
//! `capsync_schema::wire` (shared with the server); this adds the client's requests.

use capsync_persistence::client::FormedBatch;
use capsync_persistence::Id16;
use capsync_schema::capsync_capnp::session;
use capsync_schema::wire;

pub use capsync_schema::wire::{kind_from, kind_to, read_ack, read_applied_op, read_entity};

/// The `append` call for a formed batch.
pub fn append_request(
    session: &session::Client,
    client_id: &Id16,
    batch: &FormedBatch,
) -> capnp::capability::Request<session::append_params::Owned, session::append_results::Owned> {
    let mut request = session.append_request();
    let mut b = request.get().init_batch();
    b.set_client_id(client_id);
    b.set_batch_seq(batch.batch_seq);
    let mut list = b.init_ops(batch.ops.len() as u32);
    for (i, op) in batch.ops.iter().enumerate() {
        wire::set_op(list.reborrow().get(i as u32), &op.op_id, &op.body);
    }
    request
}
