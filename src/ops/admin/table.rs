//! A result set the admin console answers with: named, typed columns and
//! text rows, encoded as RowDescription, DataRows and CommandComplete.

use bytes::{BufMut, BytesMut};

use crate::protocol::messages as msg;

/// A column's type, as the client sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    Text,
    Int8,
}

impl Type {
    fn oid_and_len(self) -> (i32, i16) {
        match self {
            Type::Text => (25, -1),
            Type::Int8 => (20, 8),
        }
    }
}

#[derive(Debug, Default)]
pub struct Table {
    columns: Vec<(String, Type)>,
    rows: Vec<Vec<Option<String>>>,
}

impl Table {
    /// A table of these `(name, type)` columns.
    pub fn new(columns: &[(&str, Type)]) -> Table {
        Table { columns: columns.iter().map(|(n, t)| (n.to_string(), *t)).collect(), rows: Vec::new() }
    }

    /// Columns from a spec: names separated by spaces, `:int` marking an
    /// int8 column (`"database pool_size:int"`).
    pub fn spec(spec: &str) -> Table {
        let columns = spec
            .split_whitespace()
            .map(|c| match c.strip_suffix(":int") {
                Some(name) => (name.to_string(), Type::Int8),
                None => (c.to_string(), Type::Text),
            })
            .collect();
        Table { columns, rows: Vec::new() }
    }

    /// Text columns only.
    pub fn text(names: &[&str]) -> Table {
        Table { columns: names.iter().map(|n| (n.to_string(), Type::Text)).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, values: Vec<Option<String>>) {
        self.rows.push(values);
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn rows(&self) -> &[Vec<Option<String>>] {
        &self.rows
    }

    /// RowDescription, the rows, and CommandComplete `tag`.
    pub fn encode(&self, out: &mut BytesMut, tag: &str) {
        let at = msg::start_message(out, b'T');
        out.put_i16(self.columns.len() as i16);
        for (name, ty) in &self.columns {
            let (oid, len) = ty.oid_and_len();
            out.extend_from_slice(name.as_bytes());
            out.put_u8(0);
            out.put_i32(0);
            out.put_i16(0);
            out.put_i32(oid);
            out.put_i16(len);
            out.put_i32(-1);
            out.put_i16(0);
        }
        msg::finish_message(out, at);
        for row in &self.rows {
            let at = msg::start_message(out, b'D');
            out.put_i16(self.columns.len() as i16);
            for i in 0..self.columns.len() {
                match row.get(i).and_then(|v| v.as_deref()) {
                    Some(v) => {
                        out.put_i32(v.len() as i32);
                        out.extend_from_slice(v.as_bytes());
                    }
                    None => out.put_i32(-1),
                }
            }
            msg::finish_message(out, at);
        }
        let at = msg::start_message(out, b'C');
        out.extend_from_slice(tag.as_bytes());
        out.put_u8(0);
        msg::finish_message(out, at);
    }
}

/// A value for a row.
pub fn v(x: impl ToString) -> Option<String> {
    Some(x.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_a_result_set() {
        let mut t = Table::spec("name n:int");
        assert_eq!(t.columns, Table::new(&[("name", Type::Text), ("n", Type::Int8)]).columns);
        t.row(vec![v("a"), None]);
        let mut out = BytesMut::new();
        t.encode(&mut out, "SHOW");
        assert_eq!(out[0], b'T');
        let d = out.iter().position(|&b| b == b'D').unwrap();
        // DataRow: 2 columns, "a", NULL.
        assert_eq!(&out[d + 5..d + 7], &[0, 2]);
        assert_eq!(&out[d + 7..d + 12], &[0, 0, 0, 1, b'a']);
        assert_eq!(&out[d + 12..d + 16], &(-1i32).to_be_bytes());
        assert!(out.ends_with(b"SHOW\0"));
    }
}
