//! The wire bodies a merge reads and writes: DataRow (parsed into a
//! [`Row`], encoded back) and RowDescription (its output columns read, or
//! cut to the columns the client asked for).

/// One DataRow's values (None = NULL).
pub type Row = Vec<Option<Vec<u8>>>;

/// Parse a DataRow body.
pub fn parse_row(body: &[u8]) -> Option<Row> {
    let n = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let mut at = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            out.push(None);
        } else {
            let end = at + len as usize;
            out.push(Some(body.get(at..end)?.to_vec()));
            at = end;
        }
    }
    Some(out)
}

/// Encode a DataRow body.
pub fn row_body(row: &Row) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(row.len() as u16).to_be_bytes());
    for v in row {
        match v {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(b) => {
                out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                out.extend_from_slice(b);
            }
        }
    }
    out
}

/// Output columns of a RowDescription body: (name, type OID, format).
pub fn columns(body: &[u8]) -> Option<Vec<(String, u32, i16)>> {
    let n = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let mut at = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let end = at + body.get(at..)?.iter().position(|&b| b == 0)?;
        let name = String::from_utf8_lossy(&body[at..end]).to_lowercase();
        at = end + 1;
        let f = body.get(at..at + 18)?;
        let type_oid = u32::from_be_bytes([f[6], f[7], f[8], f[9]]);
        let format = i16::from_be_bytes([f[16], f[17]]);
        out.push((name, type_oid, format));
        at += 18;
    }
    Some(out)
}

/// A RowDescription body with only its first `keep` fields.
pub fn trim_description(body: &[u8], keep: usize) -> Option<Vec<u8>> {
    let mut at = 2;
    for _ in 0..keep {
        at += body.get(at..)?.iter().position(|&b| b == 0)? + 1 + 18;
    }
    let mut out = (keep as u16).to_be_bytes().to_vec();
    out.extend_from_slice(body.get(2..at)?);
    Some(out)
}
