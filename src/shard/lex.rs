//! The tokens an INSERT is cut on ([`super::split`]), found as
//! PostgreSQL's scanner finds them — strings (`'…'` with `''`, `E'…'`
//! with backslash escapes), quoted names (`"…"`), comments (`--`, nested
//! `/* */`), dollar quotes (`$tag$…$tag$`) and `$n` parameters are single
//! tokens, so a cut never falls inside one — in one pass over the bytes,
//! without allocating per token (sqlparser's lexer cost an INSERT across
//! shards more than all the rest of its routing). Everything else that
//! is not a parenthesis, bracket or comma is an opaque word or symbol.

/// What the cut needs of a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tok {
    Open,
    Close,
    OpenBracket,
    CloseBracket,
    Comma,
    /// The word `VALUES` (any case, not quoted).
    Values,
    /// `$n`, 1-based.
    Param(usize),
    /// White space or a comment.
    Blank,
    /// Anything else: a word, number, string, quoted name, operator.
    Other,
}

fn ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// The end of a string or quoted name opened by `q` at `at` (`''`/`""`
/// doubled inside; `backslash`: `\` escapes the next byte).
fn quoted_end(b: &[u8], at: usize, q: u8, backslash: bool) -> Result<usize, String> {
    let mut i = at + 1;
    while i < b.len() {
        match b[i] {
            b'\\' if backslash => i += 2,
            c if c == q && b.get(i + 1) == Some(&q) => i += 2,
            c if c == q => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err("cannot split: an unterminated quote".into())
}

/// The end of the comment, dollar quote or parameter at `at`, if one
/// starts there.
fn special_end(sql: &str, at: usize) -> Result<Option<(usize, Tok)>, String> {
    let b = sql.as_bytes();
    match (b[at], b.get(at + 1).copied()) {
        (b'-', Some(b'-')) => Ok(Some((memchr::memchr(b'\n', &b[at..]).map_or(b.len(), |p| at + p), Tok::Blank))),
        (b'/', Some(b'*')) => {
            let (mut depth, mut i) = (0usize, at);
            while i + 1 < b.len() {
                match (b[i], b[i + 1]) {
                    (b'/', b'*') => (depth, i) = (depth + 1, i + 2),
                    (b'*', b'/') if depth == 1 => return Ok(Some((i + 2, Tok::Blank))),
                    (b'*', b'/') => (depth, i) = (depth - 1, i + 2),
                    _ => i += 1,
                }
            }
            Err("cannot split: an unterminated comment".into())
        }
        (b'$', Some(c)) if c.is_ascii_digit() => {
            let end = b[at + 1..].iter().position(|c| !c.is_ascii_digit()).map_or(b.len(), |p| at + 1 + p);
            let n = sql[at + 1..end].parse().map_err(|_| "cannot split: a bad parameter number")?;
            Ok(Some((end, Tok::Param(n))))
        }
        (b'$', _) => {
            let tag_len = b[at + 1..].iter().position(|&c| !(ident_byte(c) && c != b'$'));
            let Some(close) = tag_len.map(|n| at + 1 + n).filter(|&e| b[e] == b'$') else { return Ok(None) };
            let tag = &sql[at..=close];
            match sql[close + 1..].find(tag) {
                Some(p) => Ok(Some((close + 1 + p + tag.len(), Tok::Other))),
                None => Err("cannot split: an unterminated dollar quote".into()),
            }
        }
        _ => Ok(None),
    }
}

/// `sql`'s tokens with their byte ranges, white space and comments
/// included: put together they are the text.
pub fn tokens(sql: &str) -> Result<Vec<(std::ops::Range<usize>, Tok)>, String> {
    let b = sql.as_bytes();
    let mut out = Vec::with_capacity(b.len() / 3);
    let mut i = 0;
    while i < b.len() {
        let (end, tok) = match b[i] {
            b'(' => (i + 1, Tok::Open),
            b')' => (i + 1, Tok::Close),
            b'[' => (i + 1, Tok::OpenBracket),
            b']' => (i + 1, Tok::CloseBracket),
            b',' => (i + 1, Tok::Comma),
            c if c.is_ascii_whitespace() => {
                (b[i..].iter().position(|c| !c.is_ascii_whitespace()).map_or(b.len(), |p| i + p), Tok::Blank)
            }
            b'\'' => (quoted_end(b, i, b'\'', false)?, Tok::Other),
            b'"' => (quoted_end(b, i, b'"', false)?, Tok::Other),
            b'e' | b'E' if b.get(i + 1) == Some(&b'\'') => (quoted_end(b, i + 1, b'\'', true)?, Tok::Other),
            // A number ends where a letter starts (`12E'…'` is 12, then a string).
            c if c.is_ascii_digit() => {
                (b[i..].iter().position(|c| !(c.is_ascii_digit() || *c == b'.')).map_or(b.len(), |p| i + p), Tok::Other)
            }
            c if ident_byte(c) && c != b'$' => {
                let end = b[i..].iter().position(|&c| !ident_byte(c)).map_or(b.len(), |p| i + p);
                let word = if sql[i..end].eq_ignore_ascii_case("values") { Tok::Values } else { Tok::Other };
                (end, word)
            }
            _ => match special_end(sql, i)? {
                Some(found) => found,
                // One byte of an operator; a multibyte character is a word.
                None => (i + 1, Tok::Other),
            },
        };
        out.push((i..end, tok));
        i = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The cut-relevant tokens (byte range, kind) sqlparser's lexer finds,
    /// or None where it fails.
    fn by_sqlparser(sql: &str) -> Option<Vec<(std::ops::Range<usize>, Tok)>> {
        use sqlparser::tokenizer::{Token, Tokenizer};
        let tokens = Tokenizer::new(&sqlparser::dialect::PostgreSqlDialect {}, sql).tokenize_with_location().ok()?;
        let mut starts = Vec::new();
        let (mut line, mut col, mut chars) = (1u64, 1u64, sql.char_indices().peekable());
        for t in &tokens {
            while (line, col) < (t.span.start.line, t.span.start.column) {
                match chars.next() {
                    Some((_, '\n')) => (line, col) = (line + 1, 1),
                    Some(_) => col += 1,
                    None => break,
                }
            }
            starts.push(chars.peek().map_or(sql.len(), |(i, _)| *i));
        }
        let ends: Vec<usize> = starts.iter().skip(1).copied().chain(std::iter::once(sql.len())).collect();
        let kind = |t: &Token| match t {
            Token::LParen => Some(Tok::Open),
            Token::RParen => Some(Tok::Close),
            Token::LBracket => Some(Tok::OpenBracket),
            Token::RBracket => Some(Tok::CloseBracket),
            Token::Comma => Some(Tok::Comma),
            Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("values") => Some(Tok::Values),
            Token::Placeholder(p) => p.strip_prefix('$')?.parse().ok().map(Tok::Param),
            _ => None,
        };
        Some(
            tokens
                .iter()
                .zip(starts.iter().zip(ends))
                .filter_map(|(t, (&s, e))| Some((s..e, kind(&t.token)?)))
                .collect(),
        )
    }

    fn significant(sql: &str) -> Option<Vec<(std::ops::Range<usize>, Tok)>> {
        let keep = |t: &Tok| !matches!(t, Tok::Blank | Tok::Other);
        tokens(sql).ok().map(|t| t.into_iter().filter(|(_, k)| keep(k)).collect())
    }

    proptest! {
        /// Where sqlparser's lexer reads a text, the cut falls where it
        /// would have: the same parentheses, brackets, commas, VALUES and
        /// parameters at the same places.
        #[test]
        fn cuts_where_sqlparser_would(parts in prop::collection::vec(prop::sample::select(vec![
            "(", ")", "[", "]", ",", " ", "\n", " VALUES", " values", "\"va,l(\"", "'a,(b'", "'it''s'",
            "E'x\\')'", " $1 ", " $23 ", "$$a)b$$", "$t$ ( $t$", "-- x(\n", "/* ( /* ) */ */", " é", " x", " 12",
            "::", " a$b", " + ",
        ]), 0..24)) {
            let sql: String = parts.concat();
            if let Some(want) = by_sqlparser(&sql) {
                prop_assert_eq!(significant(&sql), Some(want), "{}", sql);
            }
        }
    }

    fn kinds(sql: &str) -> Vec<(&str, Tok)> {
        tokens(sql).unwrap().into_iter().filter(|t| t.1 != Tok::Blank).map(|(r, t)| (&sql[r], t)).collect()
    }

    #[test]
    fn strings_names_comments_and_dollar_quotes_are_single_tokens() {
        use Tok::*;
        let sql = "INSERT INTO \"t(\" VALUES ('a'',(b)', E'x\\'),(', $q$ ) $$ ( $q$, $2) /* ( /* ) */ */ -- (\n,a$b";
        assert_eq!(
            kinds(sql),
            [
                ("INSERT", Other),
                ("INTO", Other),
                ("\"t(\"", Other),
                ("VALUES", Values),
                ("(", Open),
                ("'a'',(b)'", Other),
                (",", Comma),
                ("E'x\\'),('", Other),
                (",", Comma),
                ("$q$ ) $$ ( $q$", Other),
                (",", Comma),
                ("$2", Param(2)),
                (")", Close),
                (",", Comma),
                ("a$b", Other),
            ]
        );
        let joined: String = tokens(sql).unwrap().into_iter().map(|(r, _)| &sql[r]).collect();
        assert_eq!(joined, sql);
        for bad in ["VALUES ('a", "VALUES (1) /* x", "VALUES ($a$ x", "VALUES (\"x"] {
            assert!(tokens(bad).is_err(), "{bad}");
        }
        assert_eq!(
            kinds("values(1)é,x[1]"),
            [
                ("values", Values),
                ("(", Open),
                ("1", Other),
                (")", Close),
                ("é", Other),
                (",", Comma),
                ("x", Other),
                ("[", OpenBracket),
                ("1", Other),
                ("]", CloseBracket)
            ]
        );
    }
}
