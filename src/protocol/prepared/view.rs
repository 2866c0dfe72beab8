//! The view `pg_prepared_statements` as a transaction-mode client should see
//! it. On a shared server connection the real view lists what pgmux
//! prepared there for every client (`pgmux_<hash>`), so [`rewrite`]
//! replaces each reference to the relation in a client's statement text by
//! a derived table listing the client's own protocol statements (under its
//! names, with the server's plan counters when this connection has them)
//! plus the session's SQL-level `PREPARE`s (clients that use those are
//! pinned to their connection, so they are theirs).
//!
//! The scan is a tokenizer, not a parser. It skips `'…'`, `E'…'` and
//! `$tag$…$tag$` literals, `"…"` identifiers, `--` and nested `/* */`
//! comments, and rewrites the name (`pg_prepared_statements`,
//! `pg_catalog.pg_prepared_statements`, any case, or `"pg_prepared_statements"`
//! quoted), and calls of the function behind it (`pg_prepared_statement()`),
//! only where a relation stands: after `FROM`, `JOIN`, `USING`, after a
//! comma of a `FROM` list, and as `TABLE pg_prepared_statements` at the
//! start of a statement. Limits:
//! - other uses are left alone: the function called in a select list or
//!   `WITH ORDINALITY`, a whole-row or qualified column reference
//!   (`pg_prepared_statements.name` still works: the derived table takes
//!   that alias), `FROM ONLY …`, `UPDATE` / `LOCK TABLE` / DDL naming the
//!   view, `U&"…"` identifiers, and SQL inside literals (function bodies);
//!   a three-part column reference `pg_catalog.pg_prepared_statements.name`
//!   no longer resolves once its relation is rewritten;
//! - `standard_conforming_strings = off` (backslash escapes in the client's
//!   `'…'`) is not understood; the generated SQL is right either way;
//! - `DELETE FROM pg_prepared_statements` becomes a syntax error instead of
//!   "cannot delete from view";
//! - the client's statements are baked in when the text is rewritten: a
//!   protocol statement prepared from such a text keeps that list;
//! - the columns are PostgreSQL 14/15's (from 16 on the real view has also
//!   `result_types`, which the derived table does not return).

use std::fmt::Write;

use crate::protocol::messages::quote_literal;
use crate::sql::marks::{Mark, Marks};

const NAME: &[u8] = b"pg_prepared_statements";
/// The function behind the view (a prefix of its name).
const FUNCTION: &[u8] = b"pg_prepared_statement";

/// PostgreSQL's reserved and type/function-name keywords: the words that
/// cannot be a table alias written without `AS`.
const NOT_ALIAS: &str =
    "all analyse analyze and any array as asc asymmetric both case cast check collate column constraint \
    create current_catalog current_date current_role current_time current_timestamp current_user default \
    deferrable desc distinct do else end except false fetch for foreign from grant group having in \
    initially intersect into lateral leading limit localtime localtimestamp not null offset on only or \
    order placing primary references returning select session_user some symmetric table then to trailing \
    true union unique user using variadic when where window with authorization binary collation \
    concurrently cross current_schema freeze full ilike inner is isnull join left like natural notnull \
    outer overlaps right similar tablesample verbose";

/// Words after which a `FROM` list is over (at the same parenthesis depth).
const END_FROM: &str =
    "select where group having window order limit offset fetch for union intersect except returning \
    values set into";

/// `sql` with every relation reference to `pg_prepared_statements` replaced
/// by the client's own view, or `None` when there is none. `own` holds the
/// client's protocol-level statements: (client name, server name
/// `pgmux_<hash>`, query text).
pub fn rewrite(sql: &str, own: &[(String, String, String)]) -> Option<String> {
    if !crate::sql::scan::mentions(sql, FUNCTION) {
        return None;
    }
    let refs = references(sql.as_bytes());
    if refs.is_empty() {
        return None;
    }
    let sub = subquery(own);
    let mut out = String::with_capacity(sql.len() + refs.len() * (sub.len() + 40));
    let mut copied = 0;
    for r in refs {
        out.push_str(sql.get(copied..r.start)?);
        if r.table {
            out.push_str("SELECT * FROM ");
        }
        out.push_str(&sub);
        if !r.aliased {
            out.push_str(if r.function { " AS pg_prepared_statement" } else { " AS pg_prepared_statements" });
        }
        copied = r.end;
    }
    out.push_str(sql.get(copied..)?);
    Some(out)
}

/// The derived table, in parentheses, with PostgreSQL 15's columns.
fn subquery(own: &[(String, String, String)]) -> String {
    let mut s = String::from("(");
    if !own.is_empty() {
        s.push_str(
            "SELECT c.name, c.statement, \
             COALESCE(s.prepare_time, pg_catalog.now()) AS prepare_time, \
             COALESCE(s.parameter_types, '{}'::pg_catalog.regtype[]) AS parameter_types, \
             false AS from_sql, \
             COALESCE(s.generic_plans, 0::pg_catalog.int8) AS generic_plans, \
             COALESCE(s.custom_plans, 0::pg_catalog.int8) AS custom_plans \
             FROM (VALUES ",
        );
        for (k, (name, server, text)) in own.iter().enumerate() {
            let sep = if k == 0 { "" } else { ", " };
            let _ = write!(s, "{sep}({}, {}, {})", quote_literal(name), quote_literal(server), quote_literal(text));
        }
        s.push_str(
            ") AS c(name, srv, statement) \
             LEFT JOIN pg_catalog.pg_prepared_statements s ON s.name = c.srv UNION ALL ",
        );
    }
    s.push_str(
        "SELECT name, statement, prepare_time, parameter_types, from_sql, generic_plans, custom_plans \
         FROM pg_catalog.pg_prepared_statements WHERE NOT pg_catalog.starts_with(name, 'pgmux_'))",
    );
    s
}

/// One reference to replace: bytes `start..end` of the text.
#[derive(Debug, PartialEq, Eq)]
struct Ref {
    start: usize,
    end: usize,
    /// The user wrote an alias after it.
    aliased: bool,
    /// `TABLE pg_prepared_statements`: `start` is at `TABLE`.
    table: bool,
    /// A call of the function behind the view, `pg_prepared_statement()`.
    function: bool,
}

/// Blank: white space or a comment. Word: a keyword or unquoted identifier.
/// Quoted: a `"quoted"` identifier. Literal: a string or number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Blank,
    Word,
    Quoted,
    Literal,
    Punct(u8),
}

#[derive(Debug, Clone, Copy)]
struct Tok {
    kind: Kind,
    start: usize,
    end: usize,
}

/// Where the scan stands: whether the next token may name a relation.
struct Scan {
    /// Per parenthesis depth: inside a `FROM` list.
    from_list: Vec<bool>,
    relation_next: bool,
    statement_start: bool,
    /// Start of a `TABLE` keyword that began a statement.
    table_at: Option<usize>,
}

fn references(b: &[u8]) -> Vec<Ref> {
    let mut refs = Vec::new();
    let mut scan = Scan { from_list: vec![false], relation_next: false, statement_start: true, table_at: None };
    let mut i = 0;
    while i < b.len() {
        let t = token(b, i);
        i = t.end;
        if t.kind == Kind::Blank {
            continue;
        }
        let end = if scan.relation_next || scan.table_at.is_some() { reference_end(b, t) } else { None };
        if let Some((end, function)) = end {
            let table = scan.table_at.is_some();
            refs.push(Ref {
                start: scan.table_at.unwrap_or(t.start),
                end,
                aliased: !table && next_is_alias(b, end),
                table,
                function,
            });
            i = end;
            scan.step(b, Tok { kind: Kind::Literal, start: t.start, end });
        } else {
            scan.step(b, t);
        }
    }
    refs
}

impl Scan {
    fn step(&mut self, b: &[u8], t: Tok) {
        let here = self.relation_next;
        let start = self.statement_start;
        self.relation_next = false;
        self.statement_start = false;
        self.table_at = None;
        match t.kind {
            Kind::Word => {
                let w = &b[t.start..t.end];
                let is = |k: &str| w.eq_ignore_ascii_case(k.as_bytes());
                if is("from") || is("join") || is("using") {
                    self.set_from_list(true);
                    self.relation_next = true;
                } else if one_of(END_FROM, w) {
                    self.set_from_list(false);
                }
                if is("table") && start {
                    self.table_at = Some(t.start);
                }
                self.statement_start = one_of("union intersect except all distinct", w);
            }
            Kind::Punct(b'(') => {
                self.from_list.push(here);
                self.relation_next = here;
                self.statement_start = true;
            }
            Kind::Punct(b')') if self.from_list.len() > 1 => {
                self.from_list.pop();
            }
            Kind::Punct(b',') => self.relation_next = self.from_list.last().copied().unwrap_or(false),
            Kind::Punct(b';') => {
                self.from_list = vec![false];
                self.statement_start = true;
            }
            _ => {}
        }
    }

    fn set_from_list(&mut self, on: bool) {
        self.from_list.last_mut().into_iter().for_each(|f| *f = on)
    }
}

/// When `t` starts a reference to the view (`[pg_catalog.]name`, not a
/// qualifier `name.column`) or a call of its function
/// (`[pg_catalog.]pg_prepared_statement()`): where it ends, and whether it
/// is the call.
fn reference_end(b: &[u8], t: Tok) -> Option<(usize, bool)> {
    let name = if is_ident(b, t, b"pg_catalog") {
        let dot = next_significant(b, t.end).filter(|d| d.kind == Kind::Punct(b'.'))?;
        next_significant(b, dot.end)?
    } else {
        t
    };
    if is_ident(b, name, FUNCTION) {
        let open = next_significant(b, name.end).filter(|t| t.kind == Kind::Punct(b'('))?;
        let close = next_significant(b, open.end).filter(|t| t.kind == Kind::Punct(b')'))?;
        let ordinality = next_significant(b, close.end).is_some_and(|w| is_ident(b, w, b"with"));
        return (!ordinality).then_some((close.end, true));
    }
    if !is_ident(b, name, NAME) || next_significant(b, name.end).is_some_and(|n| n.kind == Kind::Punct(b'.')) {
        return None;
    }
    Some((name.end, false))
}

/// Whether the user wrote an alias after the reference ending at `at`.
fn next_is_alias(b: &[u8], at: usize) -> bool {
    match next_significant(b, at) {
        Some(t) if t.kind == Kind::Word => {
            let w = &b[t.start..t.end];
            w.eq_ignore_ascii_case(b"as") || !one_of(NOT_ALIAS, w)
        }
        Some(t) => t.kind == Kind::Quoted,
        None => false,
    }
}

/// Whether `t` is the identifier `lower` (lowercase): unquoted in any case,
/// or quoted exactly.
fn is_ident(b: &[u8], t: Tok, lower: &[u8]) -> bool {
    let text = &b[t.start..t.end];
    match t.kind {
        Kind::Word => text.eq_ignore_ascii_case(lower),
        Kind::Quoted => text.len() == lower.len() + 2 && text.ends_with(b"\"") && &text[1..text.len() - 1] == lower,
        _ => false,
    }
}

fn next_significant(b: &[u8], mut i: usize) -> Option<Tok> {
    while i < b.len() {
        let t = token(b, i);
        if t.kind != Kind::Blank {
            return Some(t);
        }
        i = t.end;
    }
    None
}

/// Whether `w` is one of the space-separated lowercase `words`, in any case.
fn one_of(words: &str, w: &[u8]) -> bool {
    words.split(' ').any(|k| w.eq_ignore_ascii_case(k.as_bytes()))
}

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn ident_char(c: u8) -> bool {
    ident_start(c) || c.is_ascii_digit() || c == b'$'
}

fn run(b: &[u8], f: impl Fn(u8) -> bool) -> usize {
    b.iter().position(|&c| !f(c)).unwrap_or(b.len())
}

/// The token starting at `b[i]` (`i < b.len()`).
fn token(b: &[u8], i: usize) -> Tok {
    let rest = &b[i..];
    let c = rest[0];
    let (kind, len) = if c.is_ascii_whitespace() {
        (Kind::Blank, run(rest, |c| c.is_ascii_whitespace()))
    } else if rest.starts_with(b"--") {
        (Kind::Blank, rest.iter().position(|&c| c == b'\n').map_or(rest.len(), |p| p + 1))
    } else if rest.starts_with(b"/*") {
        (Kind::Blank, block_comment(rest))
    } else if c == b'\'' {
        (Kind::Literal, quoted(rest, b'\'', false))
    } else if c == b'"' {
        (Kind::Quoted, quoted(rest, b'"', false))
    } else if c == b'$' {
        match dollar_quoted(rest) {
            Some(n) => (Kind::Literal, n),
            None => (Kind::Punct(b'$'), 1 + run(&rest[1..], |c| c.is_ascii_digit())),
        }
    } else if ident_start(c) {
        let n = run(rest, ident_char);
        if n == 1 && c.eq_ignore_ascii_case(&b'e') && rest.get(1) == Some(&b'\'') {
            (Kind::Literal, 1 + quoted(&rest[1..], b'\'', true))
        } else {
            (Kind::Word, n)
        }
    } else if c.is_ascii_digit() {
        (Kind::Literal, run(rest, |c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.'))
    } else {
        (Kind::Punct(c), 1)
    };
    Tok { kind, start: i, end: i + len.max(1) }
}

/// Length of the `q`-quoted token at the front of `b` (doubled quotes
/// inside; backslash escapes when `escapes`), or all of `b` if unclosed.
fn quoted(b: &[u8], q: u8, escapes: bool) -> usize {
    let mut i = 1;
    while i < b.len() {
        if (escapes && b[i] == b'\\') || (b[i] == q && b.get(i + 1) == Some(&q)) {
            i += 2;
        } else if b[i] == q {
            return i + 1;
        } else {
            i += 1;
        }
    }
    b.len()
}

/// Length of the nested `/* */` comment at the front of `b`.
fn block_comment(b: &[u8]) -> usize {
    let (mut depth, mut i) = (0usize, 0);
    while i + 1 < b.len() {
        match &b[i..i + 2] {
            b"/*" => (depth, i) = (depth + 1, i + 2),
            b"*/" if depth == 1 => return i + 2,
            b"*/" => (depth, i) = (depth - 1, i + 2),
            _ => i += 1,
        }
    }
    b.len()
}

/// Length of the `$tag$…$tag$` string at the front of `b`, if one starts
/// there (`$1` does not).
fn dollar_quoted(b: &[u8]) -> Option<usize> {
    let n = run(&b[1..], |c| ident_start(c) || c.is_ascii_digit());
    if b.get(1).is_some_and(u8::is_ascii_digit) || b.get(1 + n) != Some(&b'$') {
        return None;
    }
    let tag = &b[..n + 2];
    let body = &b[tag.len()..];
    Some(body.windows(tag.len()).position(|w| w == tag).map_or(b.len(), |p| tag.len() + p + tag.len()))
}

#[cfg(test)]
#[path = "view_tests.rs"]
mod tests;

/// [`rewrite`] for a client whose protocol statements are `stmts`, on a
/// server connection in naming context `context`; `None` (at the cost of
/// one scan) for the texts that do not mention the view. `named`: the
/// text is the Parse of the client's statement of that name, which the
/// view lists too once it is prepared (as PostgreSQL lists it).
pub(crate) fn for_client(
    sql: &str,
    marks: Option<Marks>,
    stmts: &crate::protocol::statements::ClientStatements,
    context: u64,
    named: &str,
) -> Option<String> {
    use crate::protocol::statements::{identity, server_name};
    if !marks.unwrap_or_else(|| Marks::of(sql.as_bytes())).has(Mark::PreparedView) {
        return None;
    }
    let mut own: Vec<(String, String, String)> = stmts
        .map
        .iter()
        .map(|(name, st)| {
            let text = String::from_utf8_lossy(st.query()).into_owned();
            (name.clone(), server_name(identity(st.hash, context)), text)
        })
        .collect();
    if !named.is_empty() {
        // Its own server name depends on the rewritten text: listed with
        // the defaults of a statement this connection does not have.
        own.push((named.to_string(), String::new(), sql.to_string()));
    }
    rewrite(sql, &own)
}
