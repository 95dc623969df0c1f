//! Versioned schemas kept in SQLite's `user_version`.
//!
//! A fresh database gets the current schema in one step ([`SchemaPlan::create`]); an older one
//! is upgraded version by version ([`SchemaPlan::upgrades`]). Either way the whole change runs in
//! one `IMMEDIATE` transaction, so a crash mid-migration leaves the old version intact. A test
//! per plan checks that both paths reach the same schema.

use crate::StorageError;
use rusqlite::Connection;

pub struct SchemaPlan {
    /// For error messages: "server" or "client".
    pub name: &'static str,
    pub current_version: u32,
    /// The whole current schema, for an empty database.
    pub create: &'static [&'static str],
    /// `(from_version, sql)`: the SQL that takes `from_version` to `from_version + 1`.
    pub upgrades: &'static [(u32, &'static [&'static str])],
}

impl SchemaPlan {
    /// Brings `conn` to the current version; a no-op when it is there already.
    pub fn apply(&self, conn: &mut Connection) -> Result<(), StorageError> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > self.current_version {
            return Err(StorageError::NewerSchema {
                name: self.name,
                found: version,
                supported: self.current_version,
            });
        }
        if version == 0 {
            for sql in self.create {
                tx.execute_batch(sql)?;
            }
        } else {
            for from in version..self.current_version {
                let steps = self
                    .upgrades
                    .iter()
                    .find(|(v, _)| *v == from)
                    .map(|(_, steps)| *steps)
                    .ok_or(StorageError::NoUpgradePath { name: self.name, from })?;
                for sql in steps {
                    tx.execute_batch(sql)?;
                    crate::failpoint::hit("mid-migration");
                }
            }
        }
        tx.pragma_update(None, "user_version", self.current_version)?;
        tx.commit()?;
        Ok(())
    }
}

/// The schema as SQLite understands it, independent of how its SQL was spelled: every
/// table's columns (name, type, not-null, default, primary-key position), every index's
/// columns, uniqueness and partial condition, and every trigger's name and table. Used by the
/// tests that compare an upgraded database with a fresh one.
pub fn describe(conn: &Connection) -> Result<Vec<String>, StorageError> {
    let mut out = Vec::new();
    let objects: Vec<(String, String, String, Option<String>)> = conn
        .prepare(
            "SELECT type, name, tbl_name, sql FROM sqlite_master
             WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    for (kind, name, table, sql) in objects {
        match kind.as_str() {
            "table" => {
                let mut stmt = conn.prepare(
                    "SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_info(?1)",
                )?;
                let columns = stmt.query_map([&name], |r| {
                    Ok(format!(
                        "{} {} notnull={} default={:?} pk={}",
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, i64>(4)?
                    ))
                })?;
                for column in columns {
                    out.push(format!("table {name}: {}", column?));
                }
                let without_rowid = sql.as_deref().is_some_and(|s| s.contains("WITHOUT ROWID"));
                out.push(format!("table {name}: without_rowid={without_rowid}"));
            }
            "index" => {
                let columns: Vec<String> = conn
                    .prepare("SELECT name FROM pragma_index_info(?1) ORDER BY seqno")?
                    .query_map([&name], |r| r.get::<_, Option<String>>(0))?
                    .map(|c| c.map(|c| c.unwrap_or_default()))
                    .collect::<Result<_, _>>()?;
                // Only explicit indexes have SQL; its WHERE clause is the partial condition.
                let condition = sql
                    .as_deref()
                    .and_then(|s| s.split_once(" WHERE ").map(|(_, w)| w.trim().to_owned()));
                out.push(format!("index {name} on {table}({}) where {condition:?}", columns.join(",")));
            }
            _ => out.push(format!("{kind} {name} on {table}")),
        }
    }
    Ok(out)
}

/// Connection settings every capsync database uses: WAL, `synchronous=FULL` (an ack or a
/// returned enqueue survives power loss), foreign keys on, and a busy timeout so a reader
/// never fails on a writer's checkpoint.
pub fn configure(conn: &Connection) -> Result<(), StorageError> {
    // First: switching a new file to WAL takes a lock another process opening it at the same
    // moment may hold (`capsync status` while `capsync watch` creates the outbox).
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}
