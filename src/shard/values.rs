//! Text-format values of query results, as a merge across shards needs
//! them: compare by type (as PostgreSQL orders them) and add (for
//! `count` and `sum`), exactly or not at all.

use std::cmp::Ordering;

/// Type OIDs pgmux can compare.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
}

/// Whether values of type `oid` can be ordered here; text types only when
/// the order is bytewise (`COLLATE "C"`).
pub fn comparable(type_oid: u32, bytewise_text: bool) -> bool {
    use oid::*;
    match type_oid {
        BOOL | INT2 | INT4 | INT8 | OID | FLOAT4 | FLOAT8 | NUMERIC | UUID | DATE | TIMESTAMP | TIMESTAMPTZ => true,
        TEXT | VARCHAR | BPCHAR | NAME => bytewise_text,
        _ => false,
    }
}

/// Compare two non-NULL text-format values of type `type_oid` (one that is
/// [`comparable`]).
pub fn compare(type_oid: u32, a: &[u8], b: &[u8]) -> Ordering {
    use oid::*;
    let s = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    match type_oid {
        INT2 | INT4 | INT8 | OID => {
            let n = |v: &[u8]| s(v).parse::<i128>().unwrap_or(0);
            n(a).cmp(&n(b))
        }
        FLOAT4 | FLOAT8 => {
            // PostgreSQL sorts NaN above every other value.
            let f = |v: &[u8]| s(v).parse::<f64>().unwrap_or(f64::NAN);
            compare_float(f(a), f(b))
        }
        NUMERIC => compare_decimal(&s(a), &s(b)),
        DATE | TIMESTAMP | TIMESTAMPTZ => {
            let rank = |v: &[u8]| match v {
                b"-infinity" => 0,
                b"infinity" => 2,
                _ => 1,
            };
            rank(a).cmp(&rank(b)).then_with(|| a.cmp(b))
        }
        _ => a.cmp(b),
    }
}

/// Whether binary-format values of type `oid` can be ordered here; text
/// types only when the order is bytewise (`COLLATE "C"`).
pub fn comparable_binary(type_oid: u32, bytewise_text: bool) -> bool {
    use oid::*;
    match type_oid {
        BOOL | INT2 | INT4 | INT8 | OID | FLOAT4 | FLOAT8 | UUID | DATE | TIMESTAMP | TIMESTAMPTZ => true,
        TEXT | VARCHAR | BPCHAR | NAME => bytewise_text,
        _ => false,
    }
}

/// Compare two non-NULL binary-format values of a [`comparable_binary`]
/// type (text types bytewise, as `COLLATE "C"`).
pub fn compare_binary(type_oid: u32, a: &[u8], b: &[u8]) -> Ordering {
    use oid::*;
    let int = int_binary;
    let float = |v: &[u8]| match v.len() {
        4 => f64::from(f32::from_be_bytes([v[0], v[1], v[2], v[3]])),
        8 => f64::from_be_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]),
        _ => f64::NAN,
    };
    match type_oid {
        INT2 | INT4 | INT8 | DATE | TIMESTAMP | TIMESTAMPTZ => int(a).cmp(&int(b)),
        OID => (int(a) as u32).cmp(&(int(b) as u32)),
        FLOAT4 | FLOAT8 => compare_float(float(a), float(b)),
        _ => a.cmp(b),
    }
}

/// A binary int2, int4 or int8 (by its length; 0 if none of them).
pub fn int_binary(v: &[u8]) -> i64 {
    match v.len() {
        2 => i64::from(i16::from_be_bytes([v[0], v[1]])),
        4 => i64::from(i32::from_be_bytes([v[0], v[1], v[2], v[3]])),
        8 => i64::from_be_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]),
        _ => 0,
    }
}

/// `a + b` for binary int8 values (`count`, `sum` of int2/int4).
pub fn add_int8_binary(a: &[u8], b: &[u8]) -> Option<Vec<u8>> {
    let x = i64::from_be_bytes(a.try_into().ok()?);
    let y = i64::from_be_bytes(b.try_into().ok()?);
    Some(x.checked_add(y)?.to_be_bytes().to_vec())
}

/// Floats as PostgreSQL orders them: NaN above every other value.
fn compare_float(x: f64, y: f64) -> Ordering {
    match (x.is_nan(), y.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
    }
}

/// A decimal as (negative, integer digits, fraction digits), without
/// leading/trailing zeros; `None` for NaN / infinities.
fn decimal(s: &str) -> Option<(bool, Vec<u8>, Vec<u8>)> {
    let s = s.trim();
    let (neg, digits) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (i, f) = digits.split_once('.').unwrap_or((digits, ""));
    if i.is_empty() && f.is_empty() || !i.bytes().chain(f.bytes()).all(|c| c.is_ascii_digit()) {
        return None;
    }
    let int: Vec<u8> = i.bytes().skip_while(|&c| c == b'0').map(|c| c - b'0').collect();
    let mut frac: Vec<u8> = f.bytes().map(|c| c - b'0').collect();
    while frac.last() == Some(&0) {
        frac.pop();
    }
    let zero = int.is_empty() && frac.is_empty();
    Some((neg && !zero, int, frac))
}

fn compare_magnitude(a: &(Vec<u8>, Vec<u8>), b: &(Vec<u8>, Vec<u8>)) -> Ordering {
    a.0.len().cmp(&b.0.len()).then_with(|| a.0.cmp(&b.0)).then_with(|| a.1.cmp(&b.1))
}

/// Compare numeric text values (NaN above all, as PostgreSQL does).
pub fn compare_decimal(a: &str, b: &str) -> Ordering {
    match (decimal(a), decimal(b)) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some((na, ia, fa)), Some((nb, ib, fb))) => match (na, nb) {
            (false, true) => Ordering::Greater,
            (true, false) => Ordering::Less,
            (false, false) => compare_magnitude(&(ia, fa), &(ib, fb)),
            (true, true) => compare_magnitude(&(ib, fb), &(ia, fa)),
        },
    }
}

/// Digits of a magnitude aligned to `frac` fraction digits, least
/// significant first.
fn aligned(int: &[u8], f: &[u8], frac: usize) -> Vec<u8> {
    let mut v: Vec<u8> = f.iter().copied().chain(std::iter::repeat_n(0, frac - f.len())).collect();
    v.reverse();
    v.extend(int.iter().rev());
    v
}

/// `a + b` for exact decimal text values (integers or numerics);
/// `None` if either is not a finite decimal.
pub fn add_decimal(a: &str, b: &str) -> Option<String> {
    let (na, ia, fa) = decimal(a)?;
    let (nb, ib, fb) = decimal(b)?;
    // Keep the scale PostgreSQL would: the larger one written.
    let scale = |s: &str| s.trim().split_once('.').map_or(0, |(_, f)| f.len());
    let frac = scale(a).max(scale(b)).max(fa.len()).max(fb.len());
    let x = aligned(&ia, &fa, frac);
    let y = aligned(&ib, &fb, frac);
    let (neg, digits) = if na == nb {
        let mut out = Vec::new();
        let mut carry = 0;
        for k in 0..x.len().max(y.len()) {
            let d = x.get(k).copied().unwrap_or(0) + y.get(k).copied().unwrap_or(0) + carry;
            out.push(d % 10);
            carry = d / 10;
        }
        if carry > 0 {
            out.push(carry);
        }
        (na, out)
    } else {
        let bigger_a = compare_magnitude(&(ia.clone(), fa.clone()), &(ib.clone(), fb.clone())) != Ordering::Less;
        let (big, small, neg) = if bigger_a { (&x, &y, na) } else { (&y, &x, nb) };
        let mut out = Vec::new();
        let mut borrow = 0i8;
        for (k, &digit) in big.iter().enumerate() {
            let mut d = digit as i8 - small.get(k).copied().unwrap_or(0) as i8 - borrow;
            borrow = i8::from(d < 0);
            if d < 0 {
                d += 10;
            }
            out.push(d as u8);
        }
        (neg, out)
    };
    let mut int: Vec<u8> = digits[frac..].iter().rev().copied().skip_while(|&d| d == 0).collect();
    if int.is_empty() {
        int.push(0);
    }
    let fr: String = digits[..frac].iter().rev().map(|d| (b'0' + d) as char).collect();
    let int: String = int.iter().map(|d| (b'0' + d) as char).collect();
    let zero = int == "0" && fr.bytes().all(|c| c == b'0');
    let sign = if neg && !zero { "-" } else { "" };
    Some(if frac > 0 { format!("{sign}{int}.{fr}") } else { format!("{sign}{int}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_add_and_compare() {
        assert_eq!(add_decimal("1", "2").as_deref(), Some("3"));
        assert_eq!(add_decimal("-5", "3").as_deref(), Some("-2"));
        assert_eq!(add_decimal("5", "-5").as_deref(), Some("0"));
        assert_eq!(add_decimal("0.10", "0.905").as_deref(), Some("1.005"));
        assert_eq!(
            add_decimal("99999999999999999999999999999999", "1").as_deref(),
            Some("100000000000000000000000000000000")
        );
        assert_eq!(add_decimal("-1.50", "0.25").as_deref(), Some("-1.25"));
        assert_eq!(add_decimal("NaN", "1"), None);
        assert_eq!(compare_decimal("10", "9.99"), Ordering::Greater);
        assert_eq!(compare_decimal("-10", "-9.99"), Ordering::Less);
        assert_eq!(compare_decimal("1.0", "1.00"), Ordering::Equal);
        assert_eq!(compare_decimal("NaN", "1000000000"), Ordering::Greater);
    }

    #[test]
    fn typed_compare() {
        assert_eq!(compare(oid::INT8, b"10", b"9"), Ordering::Greater);
        assert_eq!(compare(oid::FLOAT8, b"NaN", b"Infinity"), Ordering::Greater);
        assert_eq!(compare(oid::FLOAT8, b"-Infinity", b"-1e308"), Ordering::Less);
        assert_eq!(compare(oid::DATE, b"infinity", b"2024-01-01"), Ordering::Greater);
        assert_eq!(compare(oid::TIMESTAMP, b"2024-01-02 00:00:00", b"2024-01-01 23:59:59"), Ordering::Greater);
        assert!(!comparable(oid::TEXT, false) && comparable(oid::TEXT, true));
    }
}
