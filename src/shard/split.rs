//! A write cut per shard: an `INSERT ... VALUES` whose rows belong to
//! several shards becomes one INSERT per shard holding that shard's rows
//! (the client's own text for each row, the head and tail — `ON
//! CONFLICT`, `RETURNING` — kept), with its `$n` parameters renumbered
//! from `$1` and a map back to the client's parameters; or the same write
//! for each of several shards.
//!
//! The text is cut on tokens found as PostgreSQL's scanner finds them
//! ([`super::lex`]: strings, dollar quotes, comments and placeholders are
//! single tokens), so nothing of the client's statement is re-printed.

use super::lex::{self, Tok};

/// One shard's part of a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub shard: usize,
    pub sql: String,
    /// The client's parameters (0-based) this part's `$1, $2, ...` are;
    /// `None`: all of them, as they are.
    pub params: Option<Vec<usize>>,
    /// The client's VALUES rows (0-based) this part inserts, in order
    /// (empty: not an INSERT cut by rows).
    pub rows: Vec<usize>,
}

/// A write in parts, one per shard, in shard order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    /// The client's statement, whole.
    pub sql: String,
    pub parts: Vec<Part>,
}

impl Split {
    /// The same statement on each of `shards`.
    pub fn same(sql: &str, shards: impl IntoIterator<Item = usize>) -> Split {
        let parts = shards
            .into_iter()
            .map(|shard| Part { shard, sql: sql.to_string(), params: None, rows: Vec::new() })
            .collect();
        Split { sql: sql.to_string(), parts }
    }

    /// The shards written, in order.
    pub fn shards(&self) -> Vec<usize> {
        self.parts.iter().map(|p| p.shard).collect()
    }
}

/// A token's text and what the split needs of it.
struct Piece<'a> {
    text: &'a str,
    token: Tok,
}

/// The statement's tokens with their text (whitespace and comments
/// included, so the pieces put together are the statement).
fn pieces(sql: &str) -> Result<Vec<Piece<'_>>, String> {
    Ok(lex::tokens(sql)?.into_iter().map(|(r, token)| Piece { text: &sql[r], token }).collect())
}

/// The cut of an `INSERT ... VALUES`: piece ranges of the head (up to and
/// including `VALUES`), each row's parentheses, and the tail.
struct Rows {
    head: std::ops::Range<usize>,
    rows: Vec<std::ops::Range<usize>>,
    tail: std::ops::Range<usize>,
}

fn is_blank(t: &Tok) -> bool {
    *t == Tok::Blank
}

fn cut_rows(p: &[Piece]) -> Result<Rows, String> {
    let mut depth = 0i32;
    let mut values = None;
    for (i, piece) in p.iter().enumerate() {
        match &piece.token {
            Tok::Open | Tok::OpenBracket => depth += 1,
            Tok::Close | Tok::CloseBracket => depth -= 1,
            Tok::Values if depth == 0 => {
                values = Some(i);
                break;
            }
            _ => {}
        }
    }
    let values = values.ok_or("an INSERT across shards needs VALUES rows")?;
    let (mut rows, mut i, mut depth) = (Vec::new(), values + 1, 0i32);
    let mut start = None;
    while i < p.len() {
        let t = &p[i].token;
        match t {
            Tok::Open => {
                if depth == 0 {
                    start = Some(i);
                }
                depth += 1;
            }
            Tok::Close => {
                depth -= 1;
                if depth == 0 {
                    rows.push(start.take().unwrap_or(i)..i + 1);
                }
            }
            Tok::OpenBracket => depth += 1,
            Tok::CloseBracket => depth -= 1,
            Tok::Comma if depth == 0 => {}
            _ if depth == 0 && !is_blank(t) => break,
            _ => {}
        }
        i += 1;
    }
    if depth != 0 || rows.is_empty() {
        return Err("cannot split this INSERT's VALUES".into());
    }
    let last = rows.last().map_or(i, |r| r.end);
    Ok(Rows { head: 0..values + 1, rows, tail: last..p.len() })
}

/// `sql` (an `INSERT ... VALUES` of `row_shards.len()` rows) cut per
/// shard: row `i` goes to shard `row_shards[i]`.
pub fn split_insert(sql: &str, row_shards: &[usize]) -> Result<Split, String> {
    let p = pieces(sql)?;
    let cut = cut_rows(&p)?;
    if cut.rows.len() != row_shards.len() {
        return Err(format!("an INSERT of {} rows has {} keys", cut.rows.len(), row_shards.len()));
    }
    let mut shards = row_shards.to_vec();
    shards.sort_unstable();
    shards.dedup();
    let parts = shards
        .into_iter()
        .map(|shard| {
            let mut ranges = vec![cut.head.clone()];
            ranges.extend(cut.rows.iter().zip(row_shards).filter(|(_, s)| **s == shard).map(|(r, _)| r.clone()));
            ranges.push(cut.tail.clone());
            let (sql, params) = assemble(&p, &ranges);
            let rows = (0..row_shards.len()).filter(|&i| row_shards[i] == shard).collect();
            Part { shard, sql, params: Some(params), rows }
        })
        .collect();
    Ok(Split { sql: sql.to_string(), parts })
}

/// The pieces of `ranges` put together (rows separated by commas), `$n`
/// renumbered in order of first use: (text, the client's parameter each
/// new number stands for).
fn assemble(p: &[Piece], ranges: &[std::ops::Range<usize>]) -> (String, Vec<usize>) {
    use std::fmt::Write;
    let mut sql = String::with_capacity(p.iter().map(|piece| piece.text.len()).sum::<usize>() + 8);
    let mut params: Vec<usize> = Vec::new();
    for (n, r) in ranges.iter().enumerate() {
        // Head and tail as written; rows after `VALUES` with commas.
        if n > 0 && n < ranges.len() - 1 {
            sql.push_str(if n == 1 { " " } else { ", " });
        }
        for piece in &p[r.clone()] {
            match placeholder(&piece.token) {
                Some(k) => {
                    let at = params.iter().position(|&q| q == k).unwrap_or_else(|| {
                        params.push(k);
                        params.len() - 1
                    });
                    let _ = write!(sql, "${}", at + 1);
                }
                None => sql.push_str(piece.text),
            }
        }
    }
    (sql, params)
}

/// `$n` as a 0-based parameter index.
fn placeholder(t: &Tok) -> Option<usize> {
    match t {
        Tok::Param(n) => n.checked_sub(1),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(sql: &str, shards: &[usize]) -> Vec<(usize, String, Option<Vec<usize>>)> {
        split_insert(sql, shards).unwrap().parts.into_iter().map(|p| (p.shard, p.sql, p.params)).collect()
    }

    #[test]
    fn rows_go_to_their_shards_with_head_and_tail() {
        let got =
            parts("INSERT INTO users (id, name) VALUES (1, 'a, (b)'), (2,'b'),(3, $$c)$$) RETURNING id", &[1, 0, 1]);
        assert_eq!(got[0], (0, "INSERT INTO users (id, name) VALUES (2,'b') RETURNING id".into(), Some(vec![])));
        assert_eq!(
            got[1],
            (1, "INSERT INTO users (id, name) VALUES (1, 'a, (b)'), (3, $$c)$$) RETURNING id".into(), Some(vec![]))
        );
        let got = parts("insert into t(id) values (1),(2);", &[0, 1]);
        assert_eq!(got[1].1, "insert into t(id) values (2);");
    }

    #[test]
    fn parameters_are_renumbered_per_shard() {
        let got = parts(
            "INSERT INTO t (id, v) VALUES ($1, $2), ($3, $4::int[]), ($5, ARRAY[$2]) ON CONFLICT (id) DO UPDATE SET v = $6",
            &[0, 1, 0],
        );
        assert_eq!(
            got[0],
            (
                0,
                "INSERT INTO t (id, v) VALUES ($1, $2), ($3, ARRAY[$2]) ON CONFLICT (id) DO UPDATE SET v = $4".into(),
                Some(vec![0, 1, 4, 5])
            )
        );
        assert_eq!(
            got[1].1,
            "INSERT INTO t (id, v) VALUES ($1, $2::int[]) ON CONFLICT (id) DO UPDATE SET v = $3".to_string()
        );
        assert_eq!(got[1].2, Some(vec![2, 3, 5]));
    }

    #[test]
    fn comments_and_multibyte_text_keep_their_place() {
        let got = parts("/* é */ INSERT INTO t (id, n)\n VALUES -- rows\n (1, 'ü'),\n (2, 'ß')", &[0, 1]);
        assert_eq!(got[0].1, "/* é */ INSERT INTO t (id, n)\n VALUES (1, 'ü')");
        assert_eq!(got[1].1, "/* é */ INSERT INTO t (id, n)\n VALUES (2, 'ß')");
        assert!(split_insert("INSERT INTO t SELECT 1", &[0]).is_err());
        assert!(split_insert("INSERT INTO t (id) VALUES (1), (2)", &[0]).is_err());
    }
}
