//! The capsync client.
//!
//! # Layout
//!
//! - [`connection`]: one Cap'n Proto connection and pipelined redeems.
//! - [`error`]: [`ClientError`], with the server's `capsync/...` marker when there is one.

pub mod connection;
pub mod error;

pub use connection::Connection;
pub use error::{ClientError, Result};
