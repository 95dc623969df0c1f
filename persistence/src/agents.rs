//! Read-only access to opencode's SQLite database (`opencode.db`), for `capsync-agents`.
//!
//! opencode keeps its sessions in tables `session` (one column per field), `message` and `part`
//! (`id`, parent ids, `time_created`, `time_updated` and a JSON `data` column). This module
//! hands those rows out as plain values; turning them into capsync entities is
//! `capsync-agents`' business, so this crate does not depend on it.
//!
//! The database belongs to a running opencode: it is opened with `SQLITE_OPEN_READ_ONLY`
//! (so it never writes, never checkpoints the WAL and never takes a write lock), with a busy
//! timeout, and every query is one short read transaction (pages of rows, keyed by the last
//! row seen), so opencode is never locked out. A value longer than the caller's cap is not
//! fetched at all: the row carries its length instead.

use crate::StorageError;
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::path::Path;
use std::time::Duration;

/// One column's value as SQLite stored it.
#[derive(Clone, Debug, PartialEq)]
pub enum SqlValue {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
    /// Longer than the cap the caller gave: not read. The length is in bytes.
    TooLarge(u64),
}

/// A `session` row: every column, in table order, by name.
#[derive(Clone, Debug, PartialEq)]
pub struct OpencodeSessionRow {
    pub columns: Vec<(String, SqlValue)>,
}

impl OpencodeSessionRow {
    pub fn get(&self, name: &str) -> Option<&SqlValue> {
        self.columns.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

/// A `message` or `part` row. `message_id` is empty for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpencodeRecordRow {
    pub id: String,
    pub session_id: String,
    pub message_id: String,
    pub time_created: i64,
    pub time_updated: i64,
    /// The JSON text of `data`, or `None` when it is longer than the cap (or not text).
    pub data: Option<String>,
    /// The length of `data` in bytes.
    pub data_bytes: u64,
}

/// What changes when anything in a session changes: compared between two scans, it tells
/// whether the session needs reading again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpencodeFingerprint {
    pub session_updated: i64,
    pub messages: u64,
    pub messages_updated: i64,
    pub parts: u64,
    pub parts_updated: i64,
}

/// A read-only connection to an `opencode.db`.
pub struct OpencodeDb {
    conn: Connection,
}

impl OpencodeDb {
    /// Opens the database read-only. Fails when it cannot be opened or holds no opencode
    /// session tables.
    pub fn open_read_only(path: &Path, busy_timeout: Duration) -> Result<OpencodeDb, StorageError> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        conn.busy_timeout(busy_timeout)?;
        conn.pragma_update(None, "query_only", true)?;
        let db = OpencodeDb { conn };
        for table in ["session", "message", "part"] {
            if !db.has_table(table)? {
                return Err(StorageError::Sqlite(format!("not an opencode database: no {table} table")));
            }
        }
        Ok(db)
    }

    fn has_table(&self, name: &str) -> Result<bool, StorageError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1")?
            .query_row(params![name], |_| Ok(()))
            .optional()?
            .is_some())
    }

    fn columns(&self, table: &str) -> Result<Vec<String>, StorageError> {
        let mut stmt = self.conn.prepare(&format!("PRAGMA table_info({})", quote(table)))?;
        let names = stmt.query_map([], |r| r.get::<_, String>(1))?.collect::<Result<Vec<_>, _>>()?;
        Ok(names)
    }

    /// Session ids in id order after `after`, at most `limit`.
    pub fn session_ids(&self, after: Option<&str>, limit: u32) -> Result<Vec<String>, StorageError> {
        let mut stmt = self.conn.prepare_cached("SELECT id FROM session WHERE id > ?1 ORDER BY id LIMIT ?2")?;
        let ids = stmt.query_map(params![after.unwrap_or(""), limit], |r| r.get::<_, String>(0))?;
        Ok(ids.collect::<Result<Vec<_>, _>>()?)
    }

    /// One session row with every column; a value longer than `max_value_bytes` comes back as
    /// [`SqlValue::TooLarge`] without being read.
    pub fn session(&self, id: &str, max_value_bytes: u64) -> Result<Option<OpencodeSessionRow>, StorageError> {
        let names = self.columns("session")?;
        let mut select = Vec::with_capacity(names.len() * 2);
        for name in &names {
            let q = quote(name);
            select.push(format!("CASE WHEN length(CAST({q} AS BLOB)) <= ?2 THEN {q} END"));
            select.push(format!("length(CAST({q} AS BLOB))"));
        }
        let sql = format!("SELECT {} FROM session WHERE id = ?1", select.join(", "));
        let mut stmt = self.conn.prepare(&sql)?;
        let row = stmt
            .query_row(params![id, max_value_bytes as i64], |r| {
                let mut columns = Vec::with_capacity(names.len());
                for (i, name) in names.iter().enumerate() {
                    let len: Option<i64> = r.get(2 * i + 1)?;
                    let value = match r.get_ref(2 * i)? {
                        ValueRef::Null if len.unwrap_or(0) as u64 > max_value_bytes => SqlValue::TooLarge(len.unwrap_or(0) as u64),
                        value => sql_value(value),
                    };
                    columns.push((name.clone(), value));
                }
                Ok(OpencodeSessionRow { columns })
            })
            .optional()?;
        Ok(row)
    }

    /// Counts and latest update times of a session, its messages and its parts.
    pub fn fingerprint(&self, session_id: &str) -> Result<OpencodeFingerprint, StorageError> {
        let session_updated: i64 = self
            .conn
            .prepare_cached("SELECT time_updated FROM session WHERE id = ?1")?
            .query_row(params![session_id], |r| r.get::<_, Option<i64>>(0))
            .optional()?
            .flatten()
            .unwrap_or(0);
        let count = |table: &str| -> Result<(u64, i64), StorageError> {
            let sql = format!("SELECT count(*), coalesce(max(time_updated), 0) FROM {table} WHERE session_id = ?1");
            Ok(self.conn.prepare_cached(&sql)?.query_row(params![session_id], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?)
        };
        let (messages, messages_updated) = count("message")?;
        let (parts, parts_updated) = count("part")?;
        Ok(OpencodeFingerprint { session_updated, messages, messages_updated, parts, parts_updated })
    }

    /// A session's messages in (time_created, id) order after `after`, at most `limit`.
    pub fn messages(
        &self,
        session_id: &str,
        after: Option<(i64, &str)>,
        limit: u32,
        max_data_bytes: u64,
    ) -> Result<Vec<OpencodeRecordRow>, StorageError> {
        let (after_time, after_id) = after.unwrap_or((i64::MIN, ""));
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, session_id, '', time_created, time_updated,
                    CASE WHEN length(CAST(data AS BLOB)) <= ?4 THEN data END, length(CAST(data AS BLOB))
             FROM message
             WHERE session_id = ?1 AND (time_created > ?2 OR (time_created = ?2 AND id > ?3))
             ORDER BY time_created, id LIMIT ?5",
        )?;
        let rows = stmt.query_map(params![session_id, after_time, after_id, max_data_bytes as i64, limit], record_row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// A message's parts in id order after `after`, at most `limit`.
    pub fn parts(
        &self,
        message_id: &str,
        after: Option<&str>,
        limit: u32,
        max_data_bytes: u64,
    ) -> Result<Vec<OpencodeRecordRow>, StorageError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, session_id, message_id, time_created, time_updated,
                    CASE WHEN length(CAST(data AS BLOB)) <= ?3 THEN data END, length(CAST(data AS BLOB))
             FROM part WHERE message_id = ?1 AND id > ?2 ORDER BY id LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![message_id, after.unwrap_or(""), max_data_bytes as i64, limit], record_row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

/// Creates a new database at `path` from a SQL script: how tests build an `opencode.db` from
/// a fixture script. Fails if the file exists.
#[doc(hidden)]
pub fn create_opencode_fixture(path: &Path, script: &str) -> Result<(), StorageError> {
    if path.exists() {
        return Err(StorageError::Sqlite("the fixture database exists already".into()));
    }
    let conn = Connection::open(path)?;
    conn.execute_batch(script)?;
    Ok(())
}

fn record_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OpencodeRecordRow> {
    let data = match r.get_ref(5)? {
        ValueRef::Text(t) => std::str::from_utf8(t).ok().map(str::to_owned),
        _ => None,
    };
    Ok(OpencodeRecordRow {
        id: r.get(0)?,
        session_id: r.get(1)?,
        message_id: r.get(2)?,
        time_created: r.get::<_, Option<i64>>(3)?.unwrap_or(0),
        time_updated: r.get::<_, Option<i64>>(4)?.unwrap_or(0),
        data,
        data_bytes: r.get::<_, Option<i64>>(6)?.unwrap_or(0) as u64,
    })
}

fn sql_value(value: ValueRef<'_>) -> SqlValue {
    match value {
        ValueRef::Null => SqlValue::Null,
        ValueRef::Integer(i) => SqlValue::Integer(i),
        ValueRef::Real(f) => SqlValue::Real(f),
        ValueRef::Text(t) => match std::str::from_utf8(t) {
            Ok(s) => SqlValue::Text(s.to_owned()),
            Err(_) => SqlValue::Blob(t.to_vec()),
        },
        ValueRef::Blob(b) => SqlValue::Blob(b.to_vec()),
    }
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rows_read_only_and_caps_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opencode.db");
        create_opencode_fixture(
            &path,
            "CREATE TABLE session (id text PRIMARY KEY, title text NOT NULL, summary_diffs text,
                                   time_created integer NOT NULL, time_updated integer NOT NULL);
             CREATE TABLE message (id text PRIMARY KEY, session_id text NOT NULL, time_created integer NOT NULL,
                                   time_updated integer NOT NULL, data text NOT NULL);
             CREATE TABLE part (id text PRIMARY KEY, message_id text NOT NULL, session_id text NOT NULL,
                                time_created integer NOT NULL, time_updated integer NOT NULL, data text NOT NULL);
             INSERT INTO session VALUES ('ses_1', 'hello', '[1,2,3,4,5,6,7,8,9,10]', 1, 2);
             INSERT INTO message VALUES ('msg_1', 'ses_1', 10, 11, '{\"role\":\"user\"}');
             INSERT INTO message VALUES ('msg_2', 'ses_1', 10, 12, '{\"role\":\"assistant\",\"big\":\"xxxxxxxxxxxxxxxxxxxxxxxxxx\"}');
             INSERT INTO part VALUES ('prt_1', 'msg_1', 'ses_1', 10, 13, '{\"type\":\"text\"}');",
        )
        .unwrap();
        let db = OpencodeDb::open_read_only(&path, Duration::from_secs(1)).unwrap();
        assert_eq!(db.session_ids(None, 10).unwrap(), vec!["ses_1".to_owned()]);
        let row = db.session("ses_1", 10).unwrap().unwrap();
        assert_eq!(row.get("title"), Some(&SqlValue::Text("hello".into())));
        assert_eq!(row.get("summary_diffs"), Some(&SqlValue::TooLarge(22)));
        let messages = db.messages("ses_1", None, 10, 20).unwrap();
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].data.as_deref(), Some("{\"role\":\"user\"}"));
        assert_eq!(messages[1].data, None);
        let after = db.messages("ses_1", Some((10, "msg_1")), 10, 20).unwrap();
        assert_eq!(after.len(), 1);
        let parts = db.parts("msg_1", None, 10, 100).unwrap();
        assert_eq!(parts[0].message_id, "msg_1");
        let fp = db.fingerprint("ses_1").unwrap();
        assert_eq!((fp.session_updated, fp.messages, fp.messages_updated, fp.parts), (2, 2, 12, 1));
        assert!(db.conn.execute("DELETE FROM part", []).is_err(), "the connection is read-only");
    }

    #[test]
    fn a_writer_in_wal_mode_is_never_locked_out_and_nothing_is_checkpointed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opencode.db");
        create_opencode_fixture(
            &path,
            "PRAGMA journal_mode = WAL;
             CREATE TABLE session (id text PRIMARY KEY, time_updated integer);
             CREATE TABLE message (id text PRIMARY KEY, session_id text, time_created integer, time_updated integer, data text);
             CREATE TABLE part (id text PRIMARY KEY, message_id text, session_id text, time_created integer, time_updated integer, data text);
             INSERT INTO session VALUES ('ses_1', 1);",
        )
        .unwrap();
        // opencode keeps its connection open, with frames in the WAL not yet checkpointed.
        let writer = Connection::open(&path).unwrap();
        writer.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        for i in 0..300 {
            writer.execute("INSERT INTO message VALUES (?1, 'ses_1', ?2, ?2, '{}')", params![format!("msg_{i:04}"), i]).unwrap();
        }
        let wal = dir.path().join("opencode.db-wal");
        let wal_before = std::fs::metadata(&wal).unwrap().len();
        let db = OpencodeDb::open_read_only(&path, Duration::from_millis(100)).unwrap();
        // Between two pages, opencode writes: it is not blocked.
        let page = db.messages("ses_1", None, 100, 1000).unwrap();
        writer.execute("INSERT INTO message VALUES ('msg_9999', 'ses_1', 9999, 9999, '{}')", []).unwrap();
        let last = page.last().unwrap();
        let next = db.messages("ses_1", Some((last.time_created, &last.id)), 1000, 1000).unwrap();
        assert_eq!(page.len() + next.len(), 301);
        drop(db);
        assert!(std::fs::metadata(&wal).unwrap().len() >= wal_before, "the reader did not checkpoint the WAL");
        writer.execute("INSERT INTO message VALUES ('msg_a', 'ses_1', 1, 1, '{}')", []).unwrap();
    }
}
