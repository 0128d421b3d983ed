//! Row-level replication of the store: what a write transaction changed, as rows, and how a
//! replica applies rows it is sent.
//!
//! In HA mode (see [`crate::ha`]) every center keeps a full SQLite copy of the cluster's state
//! and etcd holds the authoritative rows, one key per row. The leader's write transactions are
//! captured here by temporary triggers (installed on the connection only, so the database file
//! and the single-node mode are untouched) into a temporary table; before SQLite commits, the
//! captured rows go to etcd in one transaction fenced by the leader's term, and SQLite commits
//! only if etcd did. Every other center applies the rows etcd reports, one etcd revision per
//! SQLite transaction.
//!
//! Not replicated: `migration_samples` (a migration's pre-copy readings, many a second), and on
//! `hosts` the columns every heartbeat rewrites (facts, load, last heartbeat, health counters):
//! a row is sent when anything else in it changes, including whether the host is degraded.

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::StoreError;

/// Tables that stay on each center.
const LOCAL_TABLES: &[&str] = &["migration_samples"];

/// Columns of `hosts` each heartbeat rewrites: an update that changes only these is not sent.
const HEARTBEAT_COLUMNS: &[&str] = &["facts", "load", "last_heartbeat", "health"];

/// One row's change: its new content (a JSON object of its columns), or `None` for a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowChange {
    pub table: String,
    /// The row's primary key as a JSON array (its key in etcd).
    pub key: String,
    pub row: Option<String>,
}

/// A replicated table's shape, read from the schema (never from replicated data).
#[derive(Debug, Clone)]
struct TableShape {
    columns: Vec<String>,
    /// Primary key columns, in key order.
    key: Vec<String>,
}

/// The replicated tables of a store and the SQL to capture and apply their rows.
#[derive(Debug, Clone)]
pub struct Schema {
    tables: HashMap<String, TableShape>,
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

impl Schema {
    /// Reads the replicated tables' shapes from the connection's schema.
    pub fn read(conn: &Connection) -> Result<Schema, StoreError> {
        let mut stmt = conn.prepare(
            "SELECT name FROM main.sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
             ORDER BY name",
        )?;
        let names = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut tables = HashMap::new();
        for name in names {
            if LOCAL_TABLES.contains(&name.as_str()) {
                continue;
            }
            let mut info = conn.prepare(&format!("PRAGMA main.table_info({})", quote(&name)))?;
            let mut cols: Vec<(String, i64)> = info
                .query_map([], |r| Ok((r.get::<_, String>(1)?, r.get::<_, i64>(5)?)))?
                .collect::<Result<_, _>>()?;
            let mut key: Vec<(String, i64)> = cols.iter().filter(|c| c.1 > 0).cloned().collect();
            key.sort_by_key(|c| c.1);
            if key.is_empty() {
                return Err(StoreError::Corrupt(format!(
                    "table {name} has no primary key, so it cannot be replicated"
                )));
            }
            tables.insert(
                name,
                TableShape {
                    columns: cols.drain(..).map(|c| c.0).collect(),
                    key: key.into_iter().map(|c| c.0).collect(),
                },
            );
        }
        Ok(Schema { tables })
    }

    /// Whether `table` is replicated (a name from etcd is checked against this).
    pub fn has(&self, table: &str) -> bool {
        self.tables.contains_key(table)
    }

    /// The replicated tables, sorted.
    pub fn tables(&self) -> Vec<&str> {
        let mut t: Vec<&str> = self.tables.keys().map(String::as_str).collect();
        t.sort_unstable();
        t
    }

    /// Installs the capture on `conn`: a temporary change table and temporary triggers.
    pub fn install_capture(&self, conn: &Connection) -> Result<(), StoreError> {
        let mut sql = String::from(
            "CREATE TEMP TABLE IF NOT EXISTS tern_changes (
                 seq INTEGER PRIMARY KEY, tbl TEXT NOT NULL, key TEXT NOT NULL, row TEXT);\n",
        );
        for (name, shape) in &self.tables {
            let q = quote(name);
            let key = |side: &str| {
                let cols: Vec<String> = shape
                    .key
                    .iter()
                    .map(|c| format!("{side}.{}", quote(c)))
                    .collect();
                format!("json_array({})", cols.join(", "))
            };
            let row = |side: &str| {
                let cols: Vec<String> = shape
                    .columns
                    .iter()
                    .map(|c| format!("'{}', {side}.{}", c.replace('\'', "''"), quote(c)))
                    .collect();
                format!("json_object({})", cols.join(", "))
            };
            let literal = format!("'{}'", name.replace('\'', "''"));
            // An update is sent only when a replicated column changed.
            let mut changed: Vec<String> = shape
                .columns
                .iter()
                .filter(|c| !(name == "hosts" && HEARTBEAT_COLUMNS.contains(&c.as_str())))
                .map(|c| format!("OLD.{0} IS NOT NEW.{0}", quote(c)))
                .collect();
            if name == "hosts" {
                for part in ["degraded", "ignored"] {
                    changed.push(format!(
                        "json_extract(OLD.health, '$.{part}') IS NOT json_extract(NEW.health, '$.{part}')"
                    ));
                }
            }
            sql.push_str(&format!(
                "DROP TRIGGER IF EXISTS temp.tern_ins_{name};
                 CREATE TEMP TRIGGER tern_ins_{name} AFTER INSERT ON main.{q} BEGIN
                   INSERT INTO tern_changes(tbl, key, row) VALUES ({literal}, {nk}, {nr});
                 END;
                 DROP TRIGGER IF EXISTS temp.tern_upd_{name};
                 CREATE TEMP TRIGGER tern_upd_{name} AFTER UPDATE ON main.{q} WHEN {when} BEGIN
                   INSERT INTO tern_changes(tbl, key, row)
                     SELECT {literal}, {ok}, NULL WHERE {ok} IS NOT {nk};
                   INSERT INTO tern_changes(tbl, key, row) VALUES ({literal}, {nk}, {nr});
                 END;
                 DROP TRIGGER IF EXISTS temp.tern_del_{name};
                 CREATE TEMP TRIGGER tern_del_{name} AFTER DELETE ON main.{q} BEGIN
                   INSERT INTO tern_changes(tbl, key, row) VALUES ({literal}, {ok}, NULL);
                 END;\n",
                nk = key("NEW"),
                ok = key("OLD"),
                nr = row("NEW"),
                when = changed.join(" OR "),
            ));
        }
        conn.execute_batch(&sql)?;
        Ok(())
    }

    /// Takes the rows captured since the last call (the last change of each row only).
    pub fn take_changes(conn: &Connection) -> Result<Vec<RowChange>, StoreError> {
        let mut stmt =
            conn.prepare_cached("SELECT tbl, key, row FROM temp.tern_changes ORDER BY seq")?;
        let all = stmt
            .query_map([], |r| {
                Ok(RowChange {
                    table: r.get(0)?,
                    key: r.get(1)?,
                    row: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        conn.execute("DELETE FROM temp.tern_changes", [])?;
        let mut last: HashMap<(String, String), usize> = HashMap::new();
        for (i, c) in all.iter().enumerate() {
            last.insert((c.table.clone(), c.key.clone()), i);
        }
        Ok(all
            .into_iter()
            .enumerate()
            .filter(|(i, c)| last.get(&(c.table.clone(), c.key.clone())) == Some(i))
            .map(|(_, c)| c)
            .collect())
    }

    /// Applies changes sent by the leader (deletes first, then upserts), inside the caller's
    /// transaction; the caller has turned foreign keys off, since rows arrive in any order.
    pub fn apply(&self, conn: &Connection, changes: &[RowChange]) -> Result<(), StoreError> {
        for c in changes.iter().filter(|c| c.row.is_none()) {
            let shape = self.shape(&c.table)?;
            let cond: Vec<String> = shape
                .key
                .iter()
                .enumerate()
                .map(|(i, k)| format!("{} = json_extract(?1, '$[{i}]')", quote(k)))
                .collect();
            conn.prepare_cached(&format!(
                "DELETE FROM main.{} WHERE {}",
                quote(&c.table),
                cond.join(" AND ")
            ))?
            .execute(params![c.key])?;
        }
        for c in changes {
            let Some(row) = &c.row else { continue };
            let shape = self.shape(&c.table)?;
            let cols: Vec<String> = shape.columns.iter().map(|c| quote(c)).collect();
            let vals: Vec<String> = shape
                .columns
                .iter()
                .map(|c| format!("json_extract(?1, '$.\"{}\"')", c.replace(['"', '\''], "")))
                .collect();
            // INSERT OR REPLACE: a unique column (a name) still held by a row this revision
            // replaced under another key gives way; foreign keys are off, so nothing cascades.
            conn.prepare_cached(&format!(
                "INSERT OR REPLACE INTO main.{t} ({cols}) VALUES ({vals})",
                t = quote(&c.table),
                cols = cols.join(", "),
                vals = vals.join(", "),
            ))?
            .execute(params![row])?;
        }
        Ok(())
    }

    /// Replaces every replicated table's rows with `rows` (a replica's first load).
    pub fn load(&self, conn: &Connection, rows: &[RowChange]) -> Result<(), StoreError> {
        for t in self.tables() {
            conn.execute(&format!("DELETE FROM main.{}", quote(t)), [])?;
        }
        self.apply(conn, rows)
    }

    fn shape(&self, table: &str) -> Result<&TableShape, StoreError> {
        self.tables.get(table).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "a replicated change names an unknown table {table:?}"
            ))
        })
    }

    /// Every replicated row, sorted by table and key (tests compare replicas with it).
    pub fn dump(&self, conn: &Connection) -> Result<Vec<RowChange>, StoreError> {
        let mut out = Vec::new();
        for t in self.tables() {
            let shape = self.shape(t)?;
            let key: Vec<String> = shape.key.iter().map(|c| quote(c)).collect();
            let row: Vec<String> = shape
                .columns
                .iter()
                .map(|c| format!("'{}', {}", c.replace('\'', "''"), quote(c)))
                .collect();
            let mut stmt = conn.prepare(&format!(
                "SELECT json_array({}), json_object({}) FROM main.{} ORDER BY 1",
                key.join(", "),
                row.join(", "),
                quote(t)
            ))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(RowChange {
                        table: t.to_string(),
                        key: r.get(0)?,
                        row: Some(r.get(1)?),
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            out.extend(rows);
        }
        Ok(out)
    }
}

/// Whether the temporary change table exists on `conn` (capture installed).
pub fn capturing(conn: &Connection) -> Result<bool, StoreError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM temp.sqlite_master WHERE name = 'tern_changes'",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}
