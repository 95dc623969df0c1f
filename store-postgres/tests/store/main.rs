//! Tests of the PostgreSQL store against a real, throwaway PostgreSQL (see `store/support.rs`).
//! One test binary, so one cluster serves them all, each test in a database of its own.
//!
//! - `conformance`: one scenario run against the SQLite server store (capsync-persistence)
//!   and against `PgStore`, with the two transcripts compared.
//! - `postgres`: what only PostgreSQL has: several tasks and two "nodes" appending to one
//!   session at once, revocation racing appends, `ensure_admin`, error mapping.
//! - `migrations`: re-running is a no-op, concurrent migrators, a newer schema is refused.

mod conformance;
mod migrations;
mod postgres;
mod support;
