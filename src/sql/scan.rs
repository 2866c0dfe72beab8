//! What pooling must know of a statement text, found without a full parse:
//! its leading command (`PREPARE`, `EXECUTE`, `DEALLOCATE name`), whether
//! it ends the transaction (`COMMIT`, `ROLLBACK` and synonyms) or acts on
//! a savepoint, its statements (split at top-level semicolons), its shape
//! with literals blanked; and the word-level helpers [`crate::sql::effects`]
//! builds on. Skips white space, comments and quotes.

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Prepare,
    Execute,
    /// `DEALLOCATE [PREPARE] name` (not `ALL`), name as PostgreSQL folds it.
    Deallocate(String),
    Other,
}

pub(super) fn skip_blank(s: &str) -> &str {
    let mut s = s;
    loop {
        let t = s.trim_start();
        if let Some(rest) = t.strip_prefix("--") {
            s = rest.find('\n').map_or("", |i| &rest[i + 1..]);
        } else if let Some(rest) = t.strip_prefix("/*") {
            // PostgreSQL block comments nest.
            let mut depth = 1;
            let b = rest.as_bytes();
            let mut i = 0;
            while i < b.len() && depth > 0 {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                } else {
                    i += 1;
                }
            }
            s = rest.get(i..).unwrap_or("");
        } else {
            return t;
        }
    }
}

/// A keyword or identifier at the front: (folded word, rest).
pub(super) fn word(s: &str) -> Option<(String, &str)> {
    let s = skip_blank(s);
    if let Some(rest) = s.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if rest[i + 1..].starts_with('"') {
                    out.push('"');
                    chars.next();
                } else {
                    return Some((out, &rest[i + 1..]));
                }
            } else {
                out.push(c);
            }
        }
        return None;
    }
    let end = s.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$')).unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    Some((s[..end].to_lowercase(), &s[end..]))
}

pub(super) fn at_end(s: &str) -> bool {
    skip_blank(s).trim_start_matches(';').trim().is_empty()
}

pub fn leading_command(sql: &str) -> Command {
    if !first_letter_in(sql, b"ped") {
        return Command::Other;
    }
    let Some((kw, rest)) = word(sql) else { return Command::Other };
    match kw.as_str() {
        "prepare" => Command::Prepare,
        "execute" => Command::Execute,
        "deallocate" => {
            let Some((mut name, mut rest)) = word(rest) else { return Command::Other };
            if name == "prepare" {
                match word(rest) {
                    Some((n, r)) => (name, rest) = (n, r),
                    None => return Command::Other,
                }
            }
            if name == "all" || !at_end(rest) {
                return Command::Other;
            }
            Command::Deallocate(name)
        }
        _ => Command::Other,
    }
}

/// The statements of a query string, split at top-level semicolons.
pub fn statements(sql: &str) -> Vec<&str> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        match b[i] {
            b'\'' | b'"' => {
                let q = b[i];
                // E'...' strings take backslash escapes.
                let escapes = q == b'\'' && i > 0 && b[i - 1].eq_ignore_ascii_case(&b'e');
                i += 1;
                while i < b.len() && b[i] != q {
                    if escapes && b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let rest = &sql[i..];
                i += rest.len() - skip_blank(rest).len() - 1;
            }
            b'$' => {
                let tag_end =
                    b[i + 1..].iter().position(|c| !(c.is_ascii_alphanumeric() || *c == b'_')).map(|p| i + 1 + p);
                if let Some(e) = tag_end.filter(|e| b[*e] == b'$') {
                    let tag = &sql[i..=e];
                    i = sql[e + 1..].find(tag).map_or(b.len(), |p| e + 1 + p + tag.len() - 1);
                }
            }
            b';' => {
                out.push(&sql[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if start < sql.len() {
        out.push(&sql[start..]);
    }
    out
}

/// The statement with its literals blanked (`'…'` → `'?'`, numbers → `0`),
/// comments kept: statements of one shape route alike, so a cache keyed by
/// this serves queries that differ only in their values.
pub fn literal_shape(sql: &str) -> String {
    scan_literals(sql, |_, _| {})
}

/// The shape (see [`literal_shape`]) and the literals' values in order:
/// numbers as written, strings without quotes (`''` → `'`). `None` when a
/// string has escapes (`E'…'`).
pub fn shape_and_literals(sql: &str) -> Option<(String, Vec<String>)> {
    let mut literals = Vec::new();
    let mut plain = true;
    let shape = scan_literals(sql, |raw, escapes| {
        plain &= !escapes;
        literals.push(match raw.strip_prefix(b"'") {
            Some(inner) => String::from_utf8_lossy(inner.strip_suffix(b"'").unwrap_or(inner)).replace("''", "'"),
            None => String::from_utf8_lossy(raw).into_owned(),
        });
    });
    plain.then_some((shape, literals))
}

/// Blank the literals of `sql`, passing each (as written; strings with
/// their quotes, and whether they have escapes) to `literal`.
fn scan_literals(sql: &str, mut literal: impl FnMut(&[u8], bool)) -> String {
    let b = sql.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let prev_ident = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b'$');
        if c == b'\'' {
            let escapes = i > 0 && b[i - 1].eq_ignore_ascii_case(&b'e');
            let start = i;
            i += 1;
            while i < b.len() {
                if escapes && b[i] == b'\\' {
                    i += 2;
                    continue;
                }
                if b[i] == b'\'' {
                    if b.get(i + 1) == Some(&b'\'') {
                        i += 2;
                        continue;
                    }
                    break;
                }
                i += 1;
            }
            literal(b.get(start..=i).unwrap_or(&b[start..]), escapes);
            out.extend_from_slice(b"'?'");
            i += 1;
        } else if c.is_ascii_digit() && !prev_ident {
            let start = i;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            literal(&b[start..i], false);
            out.push(b'0');
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| sql.to_string())
}

/// How a transaction-control statement alone in a query ends the
/// transaction: `COMMIT` / `END` or `ROLLBACK` / `ABORT`, each with an
/// optional `WORK` / `TRANSACTION` (not `AND CHAIN`, not `TO SAVEPOINT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnEnd {
    Commit,
    Rollback,
}

impl TxnEnd {
    /// The command tag PostgreSQL answers it with.
    pub fn tag(self) -> &'static str {
        match self {
            TxnEnd::Commit => "COMMIT",
            TxnEnd::Rollback => "ROLLBACK",
        }
    }
}

/// Whether the first word of `sql` starts with one of `letters`
/// (lowercase): a test before a word is folded.
fn first_letter_in(sql: &str, letters: &[u8]) -> bool {
    skip_blank(sql).as_bytes().first().is_some_and(|c| letters.contains(&c.to_ascii_lowercase()))
}

/// See [`TxnEnd`]; comments and white space anywhere are skipped.
pub fn transaction_end(sql: &str) -> Option<TxnEnd> {
    if !first_letter_in(sql, b"cera") {
        return None;
    }
    let (kw, mut rest) = word(sql)?;
    let end = match kw.as_str() {
        "commit" | "end" => TxnEnd::Commit,
        "rollback" | "abort" => TxnEnd::Rollback,
        _ => return None,
    };
    while let Some((w, r)) = word(rest).filter(|(w, _)| w == "work" || w == "transaction") {
        debug_assert!(!w.is_empty());
        rest = r;
    }
    at_end(rest).then_some(end)
}

/// `SAVEPOINT`, `RELEASE [SAVEPOINT]`, `ROLLBACK [WORK | TRANSACTION] TO`:
/// statements that act inside a transaction block.
pub fn is_savepoint(sql: &str) -> bool {
    if !first_letter_in(sql, b"sr") {
        return false;
    }
    let Some((kw, mut rest)) = word(sql) else { return false };
    match kw.as_str() {
        "savepoint" | "release" => true,
        "rollback" => {
            for _ in 0..2 {
                match word(rest) {
                    Some((w, _)) if w == "to" => return true,
                    Some((w, r)) if w == "work" || w == "transaction" => rest = r,
                    _ => return false,
                }
            }
            false
        }
        _ => false,
    }
}

/// Whether `word` occurs anywhere in `sql`, ignoring ASCII case.
pub fn mentions(sql: &str, word: &[u8]) -> bool {
    let Some((&first, rest)) = word.split_first() else { return true };
    let (lower, upper) = (first.to_ascii_lowercase(), first.to_ascii_uppercase());
    let b = sql.as_bytes();
    let mut from = 0;
    while let Some(p) = b.get(from..).and_then(|t| t.iter().position(|&c| c == lower || c == upper)) {
        let at = from + p;
        if b.get(at + 1..at + 1 + rest.len()).is_some_and(|w| w.eq_ignore_ascii_case(rest)) {
            return true;
        }
        from = at + 1;
    }
    false
}

#[cfg(test)]
#[path = "scan_tests.rs"]
mod tests;
