//! An UPDATE that assigns a sharded table's key may move rows to another
//! shard. pgmux runs it on the shards its WHERE names with `RETURNING
//! ctid, *` (each row as it now is), then for each row whose new key
//! belongs elsewhere deletes it there by `ctid` and inserts it on its new
//! shard — all in one transaction across the shards (two-phase when on).
//! Here: the statements; the session runs them (`frontend/session/rekey.rs`).

use sqlparser::ast::{Expr, Ident, SelectItem, Statement, WildcardAdditionalOptions};

use crate::protocol::messages::quote_literal;

/// An UPDATE that assigns the shard key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rekey {
    /// The table as the client wrote it (schema included).
    pub target: String,
    /// The table and its key column, folded.
    pub table: String,
    pub key: String,
    /// The client's UPDATE, returning `ctid` and every column.
    pub sql: String,
    /// The shards it runs on (set when routed).
    pub shards: Vec<usize>,
}

impl Rekey {
    pub fn new(stmt: &Statement, table: String, key: String) -> Result<Rekey, String> {
        let Statement::Update(u) = stmt else { return Err("not an UPDATE".into()) };
        if u.returning.is_some() {
            return Err("RETURNING of an UPDATE that changes the shard key is not supported".into());
        }
        if u.from.is_some() || !u.table.joins.is_empty() {
            return Err("UPDATE ... FROM that changes the shard key is not supported".into());
        }
        let target = match &u.table.relation {
            sqlparser::ast::TableFactor::Table { name, .. } => name.to_string(),
            _ => return Err("this UPDATE that changes the shard key is not supported".into()),
        };
        let mut u = u.clone();
        u.returning = Some(vec![
            SelectItem::UnnamedExpr(Expr::Identifier(Ident::new("ctid"))),
            SelectItem::Wildcard(WildcardAdditionalOptions::default()),
        ]);
        Ok(Rekey { target, table, key, sql: Statement::Update(u).to_string(), shards: Vec::new() })
    }

    /// Delete the rows at `ctids` (as the UPDATE returned them).
    pub fn delete_sql(&self, ctids: &[String]) -> String {
        let list = ctids.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(",");
        format!("DELETE FROM {} WHERE ctid = ANY({}::tid[])", self.target, quote_literal(&format!("{{{list}}}")))
    }

    /// Insert `rows` (text values; None: NULL) into the columns named.
    pub fn insert_sql(&self, columns: &[String], rows: &[Vec<Option<String>>]) -> String {
        let cols = columns.iter().map(|c| format!("\"{}\"", c.replace('"', "\"\""))).collect::<Vec<_>>().join(", ");
        let value = |v: &Option<String>| v.as_deref().map_or("NULL".to_string(), quote_literal);
        let rows: Vec<String> =
            rows.iter().map(|r| format!("({})", r.iter().map(value).collect::<Vec<_>>().join(", "))).collect();
        format!("INSERT INTO {} ({cols}) OVERRIDING SYSTEM VALUE VALUES {}", self.target, rows.join(", "))
    }
}

impl super::ShardRouter {
    /// Where an UPDATE that assigns the shard key goes: the shards its
    /// WHERE names (`scope`), or the directory lookup that must come first.
    pub(super) fn rekey_target(
        &self,
        scope: super::key::Scope,
        mut rekey: Box<Rekey>,
        params: &[(Option<&[u8]>, bool)],
        resolved: &mut super::Resolved,
    ) -> Result<super::ShardTarget, crate::protocol::error::PgError> {
        use super::{KeysAt, ShardTarget};
        if !self.allow_cross_shard_writes {
            return Err(super::feature(
                "pgmux: an UPDATE that changes the shard key may move rows to another shard; refused \
                 (allow_cross_shard_writes = false)",
            )
            .with_hint("Delete the row and insert it again with its new key."));
        }
        rekey.shards = match scope {
            super::key::Scope::Keys { map, keys } => match self.shards_of_keys(map, &keys, false, params, resolved)? {
                KeysAt::Lookup(t) => return Ok(t),
                KeysAt::Shards(each) => {
                    let mut s: Vec<usize> = each.into_iter().flatten().collect();
                    s.sort_unstable();
                    s.dedup();
                    s
                }
            },
            _ => (0..self.backends.len()).collect(),
        };
        // Keys no shard has: nothing to update anywhere.
        Ok(if rekey.shards.is_empty() { ShardTarget::Any } else { ShardTarget::Rekey(rekey) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;

    fn rekey(sql: &str) -> Result<Rekey, String> {
        let stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap();
        Rekey::new(&stmts[0], "users".into(), "id".into())
    }

    #[test]
    fn statements_of_a_move() {
        let r = rekey("UPDATE public.users SET id = $1, name = 'x' WHERE id = $2").unwrap();
        assert_eq!(r.sql, "UPDATE public.users SET id = $1, name = 'x' WHERE id = $2 RETURNING ctid, *");
        assert_eq!(r.delete_sql(&["(0,1)".into()]), "DELETE FROM public.users WHERE ctid = ANY('{\"(0,1)\"}'::tid[])");
        let rows = vec![vec![Some("5".into()), Some("it's".into()), None]];
        assert_eq!(
            r.insert_sql(&["id".into(), "name".into(), "n".into()], &rows),
            "INSERT INTO public.users (\"id\", \"name\", \"n\") OVERRIDING SYSTEM VALUE VALUES ('5', 'it''s', NULL)"
        );
        assert!(rekey("UPDATE users SET id = 2 WHERE id = 1 RETURNING id").is_err());
        assert!(rekey("UPDATE users SET id = o.x FROM o WHERE users.id = o.y").is_err());
    }
}
