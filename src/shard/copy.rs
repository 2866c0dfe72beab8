//! COPY FROM STDIN into a sharded table: the statement's format and the
//! key column's position, and a splitter that cuts the client's CopyData
//! stream into rows (text or CSV, rows may span CopyData messages) and
//! reads each row's key field.

use sqlparser::ast::{CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Statement};

/// A COPY ... FROM STDIN into a sharded table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyIn {
    /// The table, folded.
    pub table: String,
    /// Columns as listed (folded); empty: all, in table order.
    pub columns: Vec<String>,
    pub csv: bool,
    pub delimiter: u8,
    pub quote: u8,
    pub escape: u8,
    pub header: bool,
}

/// The COPY FROM STDIN in `stmt`, if it is one (`Err`: a form pgmux cannot
/// split).
pub fn copy_in(stmt: &Statement) -> Option<Result<CopyIn, String>> {
    let Statement::Copy { source, to: false, target: CopyTarget::Stdin, options, legacy_options, .. } = stmt else {
        return None;
    };
    let CopySource::Table { table_name, columns } = source else { return None };
    let fold =
        |i: &sqlparser::ast::Ident| if i.quote_style.is_some() { i.value.clone() } else { i.value.to_lowercase() };
    let table = table_name.0.last().and_then(|p| p.as_ident()).map(fold).unwrap_or_default();
    let mut c = CopyIn {
        table,
        columns: columns.iter().map(fold).collect(),
        csv: false,
        delimiter: b'\t',
        quote: b'"',
        escape: b'"',
        header: false,
    };
    let mut delimiter = None;
    let mut escape = None;
    let byte = |ch: char| u8::try_from(u32::from(ch)).ok().filter(|b| b.is_ascii());
    for o in options {
        match o {
            CopyOption::Format(f) => match f.value.to_lowercase().as_str() {
                "csv" => c.csv = true,
                "text" => c.csv = false,
                other => return Some(Err(format!("COPY format {other} into a sharded table is not supported"))),
            },
            CopyOption::Delimiter(d) => delimiter = byte(*d),
            CopyOption::Header(h) => c.header = *h,
            CopyOption::Quote(q) => c.quote = byte(*q).unwrap_or(b'"'),
            CopyOption::Escape(e) => escape = byte(*e),
            _ => {}
        }
    }
    for o in legacy_options {
        match o {
            CopyLegacyOption::Csv(csv) => {
                c.csv = true;
                for co in csv {
                    match co {
                        CopyLegacyCsvOption::Header => c.header = true,
                        CopyLegacyCsvOption::Quote(q) => c.quote = byte(*q).unwrap_or(b'"'),
                        CopyLegacyCsvOption::Escape(e) => escape = byte(*e),
                        _ => {}
                    }
                }
            }
            CopyLegacyOption::Delimiter(d) => delimiter = byte(*d),
            CopyLegacyOption::Binary => return Some(Err("binary COPY into a sharded table is not supported".into())),
            _ => {}
        }
    }
    c.delimiter = delimiter.unwrap_or(if c.csv { b',' } else { b'\t' });
    c.escape = escape.unwrap_or(c.quote);
    Some(Ok(c))
}

/// Cuts a COPY stream into rows.
#[derive(Debug)]
pub struct RowSplitter {
    fmt: CopyIn,
    /// Bytes of a row not yet ended.
    partial: Vec<u8>,
}

impl RowSplitter {
    pub fn new(fmt: CopyIn) -> Self {
        RowSplitter { fmt, partial: Vec::new() }
    }

    /// Feed CopyData bytes; whole rows (with their line end) are passed to
    /// `row` in order.
    pub fn feed(&mut self, data: &[u8], mut row: impl FnMut(&[u8])) {
        self.partial.extend_from_slice(data);
        let mut start = 0;
        let mut quoted = false;
        let mut i = 0;
        let buf = &self.partial;
        while i < buf.len() {
            let b = buf[i];
            if self.fmt.csv {
                if quoted
                    && b == self.fmt.escape
                    && self.fmt.escape != self.fmt.quote
                    && buf.get(i + 1) == Some(&self.fmt.quote)
                {
                    i += 2;
                    continue;
                }
                if b == self.fmt.quote {
                    quoted = !quoted;
                } else if b == b'\n' && !quoted {
                    row(&buf[start..=i]);
                    start = i + 1;
                }
            } else if b == b'\\' {
                i += 2;
                continue;
            } else if b == b'\n' {
                row(&buf[start..=i]);
                start = i + 1;
            }
            i += 1;
        }
        self.partial.drain(..start);
    }

    /// What is left when the stream ends (a last row without a line end).
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.partial)
    }

    /// Field `n` of a whole row, unescaped; None for NULL (`\N` / an
    /// unquoted empty CSV field) or a row with fewer fields.
    pub fn field(&self, row: &[u8], n: usize) -> Option<String> {
        let row = row.strip_suffix(b"\n").unwrap_or(row);
        let row = row.strip_suffix(b"\r").unwrap_or(row);
        if self.fmt.csv {
            csv_field(row, n, &self.fmt)
        } else {
            text_field(row, n, self.fmt.delimiter)
        }
    }
}

fn text_field(row: &[u8], n: usize, delim: u8) -> Option<String> {
    let mut field = 0;
    let mut out = Vec::new();
    let mut i = 0;
    while i <= row.len() {
        if i == row.len() || row[i] == delim {
            if field == n {
                return (out != b"\\N").then(|| unescape_text(&out));
            }
            field += 1;
            out.clear();
            i += 1;
            continue;
        }
        if row[i] == b'\\' && i + 1 < row.len() {
            out.extend_from_slice(&row[i..i + 2]);
            i += 2;
            continue;
        }
        out.push(row[i]);
        i += 1;
    }
    None
}

fn unescape_text(f: &[u8]) -> String {
    let mut out = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        if f[i] == b'\\' && i + 1 < f.len() {
            out.push(match f[i + 1] {
                b'n' => b'\n',
                b't' => b'\t',
                b'r' => b'\r',
                b'b' => 8,
                b'f' => 12,
                b'v' => 11,
                other => other,
            });
            i += 2;
        } else {
            out.push(f[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn csv_field(row: &[u8], n: usize, fmt: &CopyIn) -> Option<String> {
    let mut field = 0;
    let mut out = Vec::new();
    let mut quoted = false;
    let mut was_quoted = false;
    let mut i = 0;
    loop {
        let end = i == row.len();
        if end || (!quoted && row[i] == fmt.delimiter) {
            if field == n {
                return (was_quoted || !out.is_empty()).then(|| String::from_utf8_lossy(&out).into_owned());
            }
            if end {
                return None;
            }
            field += 1;
            out.clear();
            was_quoted = false;
            i += 1;
            continue;
        }
        let b = row[i];
        if quoted && b == fmt.escape && row.get(i + 1) == Some(&fmt.quote) {
            out.push(fmt.quote);
            i += 2;
            continue;
        }
        if b == fmt.quote {
            quoted = !quoted;
            was_quoted = true;
        } else {
            out.push(b);
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;

    fn parse(sql: &str) -> CopyIn {
        let stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap();
        copy_in(&stmts[0]).unwrap().unwrap()
    }

    #[test]
    fn copy_statements() {
        let c = parse("COPY users (id, Name) FROM STDIN");
        assert_eq!(
            (c.table.as_str(), c.columns.clone(), c.csv, c.delimiter),
            ("users", vec!["id".to_string(), "name".to_string()], false, b'\t')
        );
        let c = parse("COPY users FROM STDIN WITH (FORMAT csv, HEADER true, DELIMITER ';')");
        assert!(c.csv && c.header && c.delimiter == b';' && c.columns.is_empty());
        let c = parse("COPY users FROM STDIN CSV HEADER");
        assert!(c.csv && c.header && c.delimiter == b',');
    }

    #[test]
    fn rows_and_fields_across_messages() {
        let mut s = RowSplitter::new(parse("COPY t FROM STDIN"));
        let mut rows = Vec::new();
        s.feed(b"1\tone\n2\ttw", |r| rows.push(r.to_vec()));
        s.feed(b"o\\\\\n3\t\\N\n", |r| rows.push(r.to_vec()));
        assert_eq!(rows, vec![b"1\tone\n".to_vec(), b"2\ttwo\\\\\n".to_vec(), b"3\t\\N\n".to_vec()]);
        assert_eq!(s.field(&rows[1], 1).as_deref(), Some("two\\"));
        assert_eq!(s.field(&rows[2], 1), None);
        assert_eq!(s.field(&rows[0], 0).as_deref(), Some("1"));
        let mut s = RowSplitter::new(parse("COPY t FROM STDIN CSV"));
        let mut rows = Vec::new();
        s.feed(b"\"a,\"\"b\"\"\nc\",7\n,8\n", |r| rows.push(r.to_vec()));
        assert_eq!(rows.len(), 2);
        assert_eq!(s.field(&rows[0], 0).as_deref(), Some("a,\"b\"\nc"));
        assert_eq!(s.field(&rows[0], 1).as_deref(), Some("7"));
        assert_eq!(s.field(&rows[1], 0), None);
    }
}
