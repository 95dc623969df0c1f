//! capsync's wire contract, shared by the server, the client and the CLI.
//!
//! # Layout
//!
//! - [`capsync_capnp`]: Rust generated from `schema/capsync.capnp` by the workspace `build.rs`.
//! - [`marker`]: the stable `capsync/...` error markers and how to read them back.
//! - [`token`]: sturdy-ref tokens (`csy_` + 43 base64url chars) and their SHA-256 hashes.
//! - [`uri`]: sturdy URIs, `capsync://HOST:PORT/TOKEN`, with a `Debug`/`Display` that never
//!   shows the token.
//! - [`wire`]: the one mapping between the data model (`capsync-model`) and the wire structs.
//! - [`coalesce`]: the connection writer both ends use, which sends the messages ready at the
//!   same moment in one write.

pub mod capsync_capnp {
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/capsync_capnp.rs"));
}

pub mod coalesce;
pub mod marker;
pub mod token;
pub mod uri;
pub mod wire;

pub use marker::Marker;
pub use token::{Token, TokenHash};
pub use uri::SturdyUri;
