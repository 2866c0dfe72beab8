//! The leading command of a simple-query string, found without a full
//! parse: enough to spot `PREPARE`, `EXECUTE` and `DEALLOCATE name`, which
//! transaction pooling must handle itself. Skips white space and comments.

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Prepare,
    Execute,
    /// `DEALLOCATE [PREPARE] name` (not `ALL`), name as PostgreSQL folds it.
    Deallocate(String),
    Other,
}

fn skip_blank(s: &str) -> &str {
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
fn word(s: &str) -> Option<(String, &str)> {
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

fn at_end(s: &str) -> bool {
    skip_blank(s).trim_start_matches(';').trim().is_empty()
}

pub fn leading_command(sql: &str) -> Command {
    let first = skip_blank(sql).as_bytes().first().map(|b| b.to_ascii_lowercase());
    if !matches!(first, Some(b'p' | b'e' | b'd')) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_leading_commands() {
        assert_eq!(leading_command("PREPARE p AS SELECT 1"), Command::Prepare);
        assert_eq!(leading_command("  /* x /* nested */ */ -- c\n execute p(1)"), Command::Execute);
        assert_eq!(leading_command("DEALLOCATE s1"), Command::Deallocate("s1".into()));
        assert_eq!(leading_command("deallocate prepare \"S_1\";"), Command::Deallocate("S_1".into()));
        assert_eq!(leading_command("DEALLOCATE ALL"), Command::Other);
        assert_eq!(leading_command("DEALLOCATE a; SELECT 1"), Command::Other);
        assert_eq!(leading_command("SELECT 'PREPARE'"), Command::Other);
        assert_eq!(leading_command("delete from t"), Command::Other);
        assert_eq!(leading_command(""), Command::Other);
        assert_eq!(leading_command("/* unterminated"), Command::Other);
    }
}
