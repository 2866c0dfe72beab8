//! COPY FROM STDIN into a sharded table: the statement's format and the
//! key column's position, and a splitter that cuts the client's CopyData
//! stream into rows (text, CSV or binary; rows may span CopyData
//! messages), ends it at the end-of-data marker (a `\.` line; binary: the
//! trailer) and reads each row's key field.

use super::map::{Key, KeyError};
use crate::config::KeyType;
use sqlparser::ast::{CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Statement};

/// A COPY ... FROM STDIN into a sharded table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyIn {
    /// The table, folded.
    pub table: String,
    /// Columns as listed (folded); empty: all, in table order.
    pub columns: Vec<String>,
    pub csv: bool,
    /// `FORMAT binary`: PostgreSQL's binary tuples after a file header.
    pub binary: bool,
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
        binary: false,
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
                "binary" => c.binary = true,
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
            CopyLegacyOption::Binary => c.binary = true,
            _ => {}
        }
    }
    c.delimiter = delimiter.unwrap_or(if c.csv { b',' } else { b'\t' });
    c.escape = escape.unwrap_or(c.quote);
    Some(Ok(c))
}

/// The binary format's file header: signature, flags, extension length.
const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// Cuts a COPY stream into rows.
#[derive(Debug)]
pub struct RowSplitter {
    fmt: CopyIn,
    /// Bytes of a row not yet ended.
    partial: Vec<u8>,
    /// The end-of-data marker was seen: what follows is not data.
    ended: bool,
    /// Binary: the file header is still to come.
    binary_header: bool,
}

impl RowSplitter {
    pub fn new(fmt: CopyIn) -> Self {
        let binary_header = fmt.binary;
        RowSplitter { fmt, partial: Vec::new(), ended: false, binary_header }
    }

    /// Feed CopyData bytes; whole rows (with their line end) are passed to
    /// `row` in order (binary: the file header first, as a row of its
    /// own). Nothing after the end-of-data marker is passed on.
    pub fn feed(&mut self, data: &[u8], mut row: impl FnMut(&[u8])) -> Result<(), String> {
        if self.ended {
            return Ok(());
        }
        self.partial.extend_from_slice(data);
        let start = if self.fmt.binary { self.binary_rows(&mut row)? } else { self.text_rows(&mut row) };
        self.partial.drain(..start);
        Ok(())
    }

    /// Text and CSV rows: up to each line end (outside quotes, not
    /// escaped); the offset of what is left.
    fn text_rows(&mut self, row: &mut impl FnMut(&[u8])) -> usize {
        let (mut start, mut quoted, mut i) = (0, false, 0);
        let buf = &self.partial;
        while i < buf.len() {
            let b = buf[i];
            let ends;
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
                }
                ends = b == b'\n' && !quoted;
            } else if b == b'\\' {
                i += 2;
                continue;
            } else {
                ends = b == b'\n';
            }
            if ends {
                if is_end_marker(&buf[start..=i]) {
                    self.ended = true;
                    return buf.len();
                }
                row(&buf[start..=i]);
                start = i + 1;
            }
            i += 1;
        }
        start
    }

    /// Binary: the file header, then each whole tuple (field count, each
    /// field's length and bytes) until the trailer (a count of -1); the
    /// offset of what is left.
    fn binary_rows(&mut self, row: &mut impl FnMut(&[u8])) -> Result<usize, String> {
        let buf = &self.partial;
        let mut at = 0;
        if self.binary_header {
            let Some(ext) = buf.get(15..19) else { return Ok(0) };
            if !buf.starts_with(BINARY_SIGNATURE) {
                return Err("COPY file signature not recognized".into());
            }
            let end = 19 + u32::from_be_bytes([ext[0], ext[1], ext[2], ext[3]]) as usize;
            if buf.len() < end {
                return Ok(0);
            }
            row(&buf[..end]);
            self.binary_header = false;
            at = end;
        }
        while let Some(c) = buf.get(at..at + 2) {
            let count = i16::from_be_bytes([c[0], c[1]]);
            if count == -1 {
                self.ended = true;
                return Ok(buf.len());
            }
            let count = usize::try_from(count).map_err(|_| format!("invalid COPY field count {count}"))?;
            let Some(end) = tuple_end(buf, at, count) else { return Ok(at) };
            row(&buf[at..end]);
            at = end;
        }
        Ok(at)
    }

    /// What is left when the stream ends (a last row without a line end;
    /// nothing after the end-of-data marker); binary data cut short is an
    /// error.
    pub fn finish(&mut self) -> Result<Vec<u8>, String> {
        let rest = std::mem::take(&mut self.partial);
        if self.ended || (!self.fmt.binary && is_end_marker(&rest)) {
            return Ok(Vec::new());
        }
        if self.fmt.binary && (self.binary_header || !rest.is_empty()) {
            return Err("unexpected EOF in COPY data".into());
        }
        Ok(rest)
    }

    /// What every shard's stream ends with (binary: the trailer).
    pub fn trailer(&self) -> &'static [u8] {
        if self.fmt.binary {
            b"\xff\xff"
        } else {
            b""
        }
    }

    /// The shard key in field `n` of a whole row; None for NULL (`\N`, an
    /// unquoted empty CSV field, a binary length of -1) or a row with
    /// fewer fields.
    pub fn key(&self, row: &[u8], n: usize, kt: KeyType) -> Option<Result<Key, KeyError>> {
        if self.fmt.binary {
            return binary_field(row, n).map(|v| Key::from_binary(kt, v));
        }
        self.field(row, n).map(|t| Key::from_text(kt, &t))
    }

    /// Field `n` of a whole text or CSV row, unescaped; None for NULL or a
    /// row with fewer fields.
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

/// A line that is the end-of-data marker `\.` (with its line end).
fn is_end_marker(line: &[u8]) -> bool {
    matches!(line, b"\\." | b"\\.\n" | b"\\.\r\n")
}

/// The end of the binary tuple of `count` fields at `at`, if `buf` holds
/// it whole.
fn tuple_end(buf: &[u8], at: usize, count: usize) -> Option<usize> {
    let mut end = at + 2;
    for _ in 0..count {
        let l = buf.get(end..end + 4)?;
        let len = i32::from_be_bytes([l[0], l[1], l[2], l[3]]);
        end += 4 + usize::try_from(len).unwrap_or(0);
    }
    (end <= buf.len()).then_some(end)
}

/// Field `n` of a whole binary tuple; None for NULL.
fn binary_field(row: &[u8], n: usize) -> Option<&[u8]> {
    let mut at = 2;
    for i in 0.. {
        let l = row.get(at..at + 4)?;
        let len = i32::from_be_bytes([l[0], l[1], l[2], l[3]]);
        let size = usize::try_from(len).ok();
        if i == n {
            return row.get(at + 4..at + 4 + size?);
        }
        at += 4 + size.unwrap_or(0);
    }
    None
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
        s.feed(b"1\tone\n2\ttw", |r| rows.push(r.to_vec())).unwrap();
        s.feed(b"o\\\\\n3\t\\N\n", |r| rows.push(r.to_vec())).unwrap();
        assert_eq!(rows, vec![b"1\tone\n".to_vec(), b"2\ttwo\\\\\n".to_vec(), b"3\t\\N\n".to_vec()]);
        assert_eq!(s.field(&rows[1], 1).as_deref(), Some("two\\"));
        assert_eq!(s.field(&rows[2], 1), None);
        assert_eq!(s.field(&rows[0], 0).as_deref(), Some("1"));
        let mut s = RowSplitter::new(parse("COPY t FROM STDIN CSV"));
        let mut rows = Vec::new();
        s.feed(b"\"a,\"\"b\"\"\nc\",7\n,8\n", |r| rows.push(r.to_vec())).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(s.field(&rows[0], 0).as_deref(), Some("a,\"b\"\nc"));
        assert_eq!(s.field(&rows[0], 1).as_deref(), Some("7"));
        assert_eq!(s.field(&rows[1], 0), None);
    }

    #[test]
    fn the_end_of_data_marker_ends_the_rows() {
        for (sql, data) in
            [("COPY t FROM STDIN", &b"1\ta\n\\.\n2\tb\n"[..]), ("COPY t FROM STDIN CSV", b"1,a\r\n\\.\r\n")]
        {
            let mut s = RowSplitter::new(parse(sql));
            let mut rows = Vec::new();
            s.feed(data, |r| rows.push(r.to_vec())).unwrap();
            assert_eq!(rows.len(), 1, "{sql}");
            s.feed(b"3\tc\n", |r| rows.push(r.to_vec())).unwrap();
            assert_eq!((rows.len(), s.finish()), (1, Ok(vec![])), "{sql}");
        }
        // Without a line end, at the end of the stream; an escaped dot is data.
        let mut s = RowSplitter::new(parse("COPY t FROM STDIN"));
        let mut rows = Vec::new();
        s.feed(b"\\.x\n\\.", |r| rows.push(r.to_vec())).unwrap();
        assert_eq!((rows, s.finish()), (vec![b"\\.x\n".to_vec()], Ok(vec![])));
    }

    #[test]
    fn binary_rows_across_messages() {
        let c = parse("COPY t (id, name) FROM STDIN (FORMAT binary)");
        assert!(c.binary);
        let mut data = BINARY_SIGNATURE.to_vec();
        data.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2, b'x', b'y']);
        let tuple = |id: i64, name: Option<&[u8]>| {
            let mut t = vec![0, 2, 0, 0, 0, 8];
            t.extend_from_slice(&id.to_be_bytes());
            match name {
                Some(n) => {
                    t.extend_from_slice(&(n.len() as i32).to_be_bytes());
                    t.extend_from_slice(n);
                }
                None => t.extend_from_slice(&(-1i32).to_be_bytes()),
            }
            t
        };
        data.extend(tuple(7, Some(b"seven")));
        data.extend(tuple(-1, None));
        data.extend_from_slice(&[0xff, 0xff]);
        let mut s = RowSplitter::new(c);
        let mut rows = Vec::new();
        for chunk in data.chunks(5) {
            s.feed(chunk, |r| rows.push(r.to_vec())).unwrap();
        }
        assert_eq!(rows.len(), 3, "header and two tuples");
        assert_eq!(rows[0].len(), 21);
        assert_eq!(s.key(&rows[1], 0, KeyType::Int8), Some(Ok(Key::Int(7))));
        assert_eq!(s.key(&rows[2], 0, KeyType::Int8), Some(Ok(Key::Int(-1))));
        assert_eq!(s.key(&rows[2], 1, KeyType::Text), None);
        assert_eq!((s.finish(), s.trailer()), (Ok(vec![]), &b"\xff\xff"[..]));
        let mut bad = RowSplitter::new(parse("COPY t FROM STDIN (FORMAT binary)"));
        assert!(bad.feed(b"PGCOPY\nXXXXXXXXXXXXXXXXXXX", |_| {}).is_err());
        let mut short = RowSplitter::new(parse("COPY t FROM STDIN (FORMAT binary)"));
        short.feed(b"1\tx\n", |_| {}).unwrap();
        assert!(short.finish().is_err());
    }
}
