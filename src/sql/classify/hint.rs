//! Routing hints: a `/* pgmux: ... */` or `-- pgmux: ...` comment before a
//! statement's first token (`primary`, `replica`, `shard=N`, `key=V`),
//! found without a parse; unknown `pgmux:` text is an error.

use super::ClassifyError;

/// A routing hint from a leading `/* pgmux: ... */` or `-- pgmux: ...` comment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hint {
    Primary,
    Replica,
    Shard(u32),
    Key(String),
}

/// The hint in the comments before the first token, if any. Comments that do
/// not start with `pgmux:` are ignored; the first valid hint wins, and any
/// unknown `pgmux:` text is an error.
pub(super) fn leading_hint(sql: &str) -> Result<Option<Hint>, ClassifyError> {
    let mut rest = sql;
    let mut found = None;
    loop {
        rest = rest.trim_start();
        let body;
        if let Some(after) = rest.strip_prefix("--") {
            let end = after.find('\n').unwrap_or(after.len());
            body = after.get(..end).unwrap_or("");
            rest = after.get(end..).unwrap_or("");
        } else if let Some(after) = rest.strip_prefix("/*") {
            // PostgreSQL block comments nest; an unterminated one ends the scan.
            let Some(end) = block_comment_end(after) else { return Ok(found) };
            body = after.get(..end).unwrap_or("");
            rest = after.get(end + 2..).unwrap_or("");
        } else {
            return Ok(found);
        }
        if let Some(hint) = parse_hint(body)? {
            found.get_or_insert(hint);
        }
    }
}

/// Byte offset of the `*/` closing a block comment whose `/*` was just
/// consumed, honouring nesting.
fn block_comment_end(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let (mut depth, mut i) = (1usize, 0usize);
    while i + 1 < b.len() {
        match (b[i], b[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
                i += 2;
            }
            _ => i += 1,
        }
    }
    None
}

/// `Ok(None)` for a comment that is not a pgmux hint.
fn parse_hint(comment: &str) -> Result<Option<Hint>, ClassifyError> {
    let c = comment.trim();
    if !c.get(..5).is_some_and(|h| h.eq_ignore_ascii_case("pgmux")) {
        return Ok(None);
    }
    let Some(text) = c.get(5..).map(str::trim_start).and_then(|t| t.strip_prefix(':')) else { return Ok(None) };
    let text = text.trim();
    let unknown = || ClassifyError::UnknownHint(text.to_string());
    if text.eq_ignore_ascii_case("primary") {
        return Ok(Some(Hint::Primary));
    }
    if text.eq_ignore_ascii_case("replica") {
        return Ok(Some(Hint::Replica));
    }
    let (key, value) = text.split_once('=').ok_or_else(unknown)?;
    let (key, value) = (key.trim(), value.trim());
    if key.eq_ignore_ascii_case("shard") {
        value.parse::<u32>().map(|n| Some(Hint::Shard(n))).map_err(|_| unknown())
    } else if key.eq_ignore_ascii_case("key") && !value.is_empty() {
        Ok(Some(Hint::Key(value.to_string())))
    } else {
        Err(unknown())
    }
}
