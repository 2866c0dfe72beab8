//! The schema of a sharded database: which statements change it (they run
//! on every shard, in one transaction across them unless PostgreSQL runs
//! them only outside one), and the sharded tables' columns in order (and
//! whether `pgmux_next_id` makes their key), read from a shard's catalog
//! for an INSERT or COPY without a column list or key, and whether text
//! compares bytewise there (C/POSIX database collation, no column of
//! another) for a merge that orders text; kept until a schema change
//! through pgmux (a reload starts afresh).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use sqlparser::ast::{ObjectType, Statement};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, Tokenizer};

use crate::backend::pool::Pool;
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::messages as msg;

/// How a schema change runs on the shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// In a transaction spanning the shards (committed together).
    InTransaction,
    /// On each shard on its own (`CREATE INDEX CONCURRENTLY`, `CREATE
    /// DATABASE`, ...: PostgreSQL refuses them in a transaction block).
    Alone,
}

/// The schema change `stmt` is, if it is one. Temporary objects are not
/// (they belong to a server session, not to the database).
pub fn change(stmt: &Statement, sql: &str) -> Option<Change> {
    use Statement as S;
    let alone = |yes: bool| Some(if yes { Change::Alone } else { Change::InTransaction });
    match stmt {
        S::CreateIndex(ci) => alone(ci.concurrently),
        S::CreateTable(t) if t.temporary => None,
        S::CreateView(v) if v.temporary => None,
        S::Drop { temporary: true, .. } => None,
        S::CreateDatabase { .. } => alone(true),
        S::Drop { object_type: ObjectType::Database, .. } => alone(true),
        S::Drop { object_type: ObjectType::Index, .. } => alone(crate::sql::scan::mentions(sql, b"concurrently")),
        S::CreateView { .. }
        | S::CreateTable(_)
        | S::CreateSchema { .. }
        | S::CreateSequence { .. }
        | S::CreateType { .. }
        | S::CreateDomain { .. }
        | S::CreateFunction { .. }
        | S::CreateProcedure { .. }
        | S::CreateTrigger { .. }
        | S::CreateExtension { .. }
        | S::CreatePolicy { .. }
        | S::CreateRole { .. }
        | S::CreateCollation { .. }
        | S::AlterTable { .. }
        | S::AlterIndex { .. }
        | S::AlterView { .. }
        | S::AlterType { .. }
        | S::AlterSchema { .. }
        | S::AlterFunction { .. }
        | S::AlterRole { .. }
        | S::AlterPolicy { .. }
        | S::AlterTrigger { .. }
        | S::AlterCollation { .. }
        | S::AlterDefaultPrivileges { .. }
        | S::Drop { .. }
        | S::DropFunction { .. }
        | S::DropDomain { .. }
        | S::DropProcedure { .. }
        | S::DropPolicy { .. }
        | S::DropTrigger { .. }
        | S::DropExtension { .. }
        | S::Comment { .. }
        | S::Grant { .. }
        | S::Revoke { .. } => alone(false),
        _ => None,
    }
}

/// A statement the parser does not know that is still a schema change by
/// its first word (`CREATE`, `ALTER`, `DROP`, `COMMENT`, `GRANT`,
/// `REVOKE`, not of a temporary object).
pub fn unparsed_change(sql: &str) -> Option<Change> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize().ok()?;
    let mut words = tokens.iter().filter_map(|t| match t {
        Token::Word(w) => Some(w.value.to_ascii_lowercase()),
        Token::Whitespace(_) => None,
        _ => Some(String::new()),
    });
    let first = words.next()?;
    let second = words.next().unwrap_or_default();
    let temporary = matches!(second.as_str(), "temp" | "temporary");
    if !matches!(first.as_str(), "create" | "alter" | "drop" | "comment" | "grant" | "revoke") || temporary {
        return None;
    }
    let alone = crate::sql::scan::mentions(sql, b"concurrently")
        || (first == "alter" && second == "system")
        || second == "database"
        || second == "tablespace";
    Some(if alone { Change::Alone } else { Change::InTransaction })
}

/// A table's columns in order, and whether `pgmux_next_id` makes its key.
type Table = (Arc<[String]>, bool);

/// Sharded tables' columns in order, by folded name, whether their key is
/// made by `pgmux_next_id` (see [`super::ids`]), and a count of the schema
/// changes seen (routers drop what they derived from the schema when it
/// moves), and whether text compares bytewise on every shard.
#[derive(Default)]
pub struct Columns {
    tables: Mutex<HashMap<String, Table>>,
    changes: AtomicU64,
    /// 0: not known yet; 1: no; 2: yes.
    bytewise: AtomicU8,
}

impl Columns {
    pub fn get(&self, table: &str) -> Option<Arc<[String]>> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner()).get(table).map(|t| t.0.clone())
    }

    /// Whether `table`'s key is made by `pgmux_next_id` (None: not known yet).
    pub fn made_key(&self, table: &str) -> Option<bool> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner()).get(table).map(|t| t.1)
    }

    pub fn put(&self, table: &str, columns: Vec<String>, made_key: bool) {
        self.tables.lock().unwrap_or_else(|e| e.into_inner()).insert(table.to_string(), (columns.into(), made_key));
    }

    /// The schema changed: forget every table's columns.
    pub fn changed(&self) {
        self.tables.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.bytewise.store(0, Ordering::Relaxed);
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// Schema changes seen so far.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }
}

/// Whether text without `COLLATE` compares bytewise in this database: its
/// collation is libc's C or POSIX, and no column or domain outside the
/// system schemas has another.
const BYTEWISE_SQL: &str = "SELECT (SELECT coalesce(to_jsonb(d) ->> 'datlocprovider', 'c') = 'c' \
     AND d.datcollate IN ('C', 'POSIX') FROM pg_database d WHERE d.datname = current_database()) \
     AND NOT EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
     WHERE a.attcollation NOT IN (0, 100, 950, 951) AND NOT a.attisdropped \
     AND c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)) \
     AND NOT EXISTS (SELECT 1 FROM pg_type t WHERE t.typcollation NOT IN (0, 100, 950, 951) \
     AND t.typnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace))";

/// `table`'s columns in order with their defaults, from the catalog of
/// the shard behind `pool`.
pub async fn load(pool: &Arc<Pool>, table: &str) -> Result<Vec<(String, Option<String>)>, PgError> {
    let failed =
        |e: String| PgError::error(sqlstate::CONNECTION_FAILURE, format!("pgmux: the columns of {table}: {e}"));
    let mut c = pool.get().await.map_err(|e| failed(e.to_string()))?;
    let quoted = format!("\"{}\"", table.replace('"', "\"\""));
    let sql = format!(
        "SELECT a.attname, pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a \
         LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
         WHERE a.attrelid = {}::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        msg::quote_literal(&quoted)
    );
    let rows = match c.conn().query_rows(&sql).await {
        Ok(rows) => rows,
        Err(crate::backend::server::ServerError::Query(body)) => {
            c.release();
            return Err(PgError::error_from_server(&body));
        }
        Err(e) => return Err(failed(e.to_string())),
    };
    c.release();
    let text = |v: Option<Vec<u8>>| v.map(|v| String::from_utf8_lossy(&v).into_owned());
    Ok(rows
        .iter()
        .filter_map(|r| super::merge::parse_row(r))
        .filter_map(|mut r| {
            let default = text(r.get_mut(1).and_then(Option::take));
            Some((text(r.into_iter().next().flatten())?, default))
        })
        .collect())
}

impl super::ShardRouter {
    /// `table`'s columns in order, read from the first shard when not known.
    pub async fn table_columns(&self, table: &str) -> Result<Arc<[String]>, PgError> {
        if let Some(c) = self.tables.columns.get(table) {
            return Ok(c);
        }
        let pool = &self.backends.first().ok_or_else(|| super::feature("pgmux: no shards"))?.primary;
        let columns = load(pool, table).await?;
        let key = self.tables.tables.get(table).map(|(k, _)| k.as_str());
        let made =
            columns.iter().any(|(c, d)| Some(c.as_str()) == key && d.as_deref().is_some_and(super::ids::made_by_pgmux));
        self.tables.columns.put(table, columns.into_iter().map(|(c, _)| c).collect(), made);
        self.tables.columns.get(table).ok_or_else(|| super::feature("pgmux: no columns"))
    }

    /// Whether text without `COLLATE` compares bytewise on the shards of
    /// `conns` (asked of them; known until a schema change once every
    /// shard has said yes, or one no). Not known (a query failed): no.
    pub async fn text_bytewise(&self, conns: &mut [(usize, crate::backend::pool::Checkout)]) -> bool {
        let known = &self.tables.columns.bytewise;
        match known.load(Ordering::Relaxed) {
            1 => return false,
            2 => return true,
            _ => {}
        }
        for (_, c) in conns.iter_mut() {
            match c.conn().query_rows(BYTEWISE_SQL).await {
                Ok(rows) if rows.len() == 1 && super::merge::parse_row(&rows[0]) == Some(vec![Some(b"t".to_vec())]) => {
                }
                Ok(_) => {
                    known.store(1, Ordering::Relaxed);
                    return false;
                }
                Err(_) => return false,
            }
        }
        // Some shards only (a read of keys on a few): true of those.
        if conns.len() == self.backends.len() {
            known.store(2, Ordering::Relaxed);
        }
        true
    }

    /// The schema changed (through pgmux): what every router of the
    /// database knew of it goes.
    pub fn schema_changed(&self) {
        self.tables.columns.changed();
    }

    /// Drop the analyses made before the last schema change.
    pub(super) fn forget_stale_analyses(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        // A load on every statement; a write only after a change.
        let changes = self.tables.columns.changes();
        if self.analyzed_after.load(Relaxed) != changes {
            self.analyzed_after.store(changes, Relaxed);
            for cache in [&self.cache, &self.shapes] {
                cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::parser::Parser;

    fn of(sql: &str) -> Option<Change> {
        match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
            Ok(s) => change(&s[0], sql),
            Err(_) => unparsed_change(sql),
        }
    }

    #[test]
    fn schema_changes() {
        for sql in [
            "CREATE TABLE t (id int)",
            "ALTER TABLE users ADD COLUMN x int",
            "DROP TABLE t",
            "CREATE INDEX ON users (name)",
            "CREATE SEQUENCE s",
            "COMMENT ON TABLE users IS 'x'",
            "GRANT SELECT ON users TO app",
            "DROP INDEX i",
            "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
        ] {
            assert_eq!(of(sql), Some(Change::InTransaction), "{sql}");
        }
        for sql in
            ["CREATE INDEX CONCURRENTLY i ON users (name)", "DROP INDEX CONCURRENTLY i", "ALTER SYSTEM SET x = 1"]
        {
            assert_eq!(of(sql), Some(Change::Alone), "{sql}");
        }
        for sql in ["CREATE TEMP TABLE t (id int)", "SELECT 1", "INSERT INTO t VALUES (1)", "TRUNCATE users"] {
            assert_eq!(of(sql), None, "{sql}");
        }
    }
}
