//! PostgreSQL `numeric` as a merge across shards needs it, digit for
//! digit as the server would give it: `avg` finished from the shards'
//! sums and counts (PostgreSQL's `numeric_div`: the result scale of
//! `select_div_scale`, rounded half away from zero), and the binary wire
//! format (base-10000 digits) read and written.

/// A decimal's text split: negative, integer digits (no leading zeros),
/// fraction digits as written. None for NaN, infinities, or not a number.
fn parts(s: &str) -> Option<(bool, String, String)> {
    let s = s.trim();
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
        return None;
    }
    Some((neg, int.trim_start_matches('0').to_string(), frac.to_string()))
}

/// The weight and first base-10000 digit of a decimal (as PostgreSQL
/// stores it): (0, 0) for zero.
fn weight_and_first(int: &str, frac: &str) -> (i32, u32) {
    if !int.is_empty() {
        let n = int.len();
        let lead = (n - 1) % 4 + 1;
        let weight = i32::try_from((n - 1) / 4).unwrap_or(i32::MAX);
        return (weight, int[..lead].parse().unwrap_or(0));
    }
    match frac.bytes().position(|b| b != b'0') {
        None => (0, 0),
        Some(p) => {
            let g = p / 4;
            let group: String = frac.chars().chain(std::iter::repeat('0')).skip(g * 4).take(4).collect();
            (-(i32::try_from(g).unwrap_or(i32::MAX)) - 1, group.parse().unwrap_or(0))
        }
    }
}

/// `sum / count` as PostgreSQL's `avg` gives it for integer and numeric
/// input; None when `count` is 0 or `sum` is not a finite decimal.
pub fn avg(sum: &str, count: u64) -> Option<String> {
    if count == 0 {
        return None;
    }
    let (neg, int, frac) = parts(sum)?;
    let (w1, f1) = weight_and_first(&int, &frac);
    let c = count.to_string();
    let (w2, f2) = weight_and_first(&c, "");
    let mut qweight = w1 - w2;
    if f1 <= f2 {
        qweight -= 1;
    }
    let dscale = i32::try_from(frac.len()).unwrap_or(1000);
    let rscale = (16 - qweight * 4).max(dscale).clamp(0, 1000);
    let rscale = usize::try_from(rscale).unwrap_or(0);
    // sum * 10^rscale / count, one decimal digit at a time.
    let mut numerator = int;
    numerator.push_str(&frac);
    numerator.extend(std::iter::repeat_n('0', rscale - frac.len()));
    let (mut q, mut r) = (String::with_capacity(numerator.len()), 0u128);
    for d in numerator.bytes() {
        r = r * 10 + u128::from(d - b'0');
        q.push(char::from(b'0' + u8::try_from(r / u128::from(count)).ok()?));
        r %= u128::from(count);
    }
    let mut digits: Vec<u8> = q.bytes().map(|b| b - b'0').collect();
    if 2 * r >= u128::from(count) {
        // Round half away from zero.
        let mut at = digits.len();
        loop {
            if at == 0 {
                digits.insert(0, 1);
                break;
            }
            at -= 1;
            if digits[at] == 9 {
                digits[at] = 0;
            } else {
                digits[at] += 1;
                break;
            }
        }
    }
    while digits.len() <= rscale {
        digits.insert(0, 0);
    }
    let split = digits.len() - rscale;
    let int: String = digits[..split].iter().map(|d| char::from(b'0' + d)).collect();
    let int = match int.trim_start_matches('0') {
        "" => "0",
        i => i,
    };
    let frac: String = digits[split..].iter().map(|d| char::from(b'0' + d)).collect();
    let zero = digits.iter().all(|&d| d == 0);
    let sign = if neg && !zero { "-" } else { "" };
    Some(if rscale == 0 { format!("{sign}{int}") } else { format!("{sign}{int}.{frac}") })
}

/// A numeric in the binary wire format, as text (None: NaN, infinities,
/// or malformed).
pub fn from_binary(b: &[u8]) -> Option<String> {
    let word = |i: usize| b.get(2 * i..2 * i + 2).map(|w| u16::from_be_bytes([w[0], w[1]]));
    let (ndigits, weight, sign, dscale) = (word(0)?, word(1)? as i16, word(2)?, usize::from(word(3)?));
    if sign != 0 && sign != 0x4000 {
        return None;
    }
    let digits: Vec<u16> = (0..usize::from(ndigits)).map(|i| word(4 + i)).collect::<Option<_>>()?;
    let mut int = String::new();
    let mut frac = String::new();
    for (i, d) in digits.iter().enumerate() {
        let w = i32::from(weight) - i32::try_from(i).ok()?;
        if w >= 0 {
            int.push_str(&if int.is_empty() { d.to_string() } else { format!("{d:04}") });
        } else {
            frac.push_str(&format!("{d:04}"));
        }
    }
    // Zero groups between the last digit and the units, and before the
    // first fraction digit.
    let last_weight = i32::from(weight) - i32::try_from(digits.len()).ok()? + 1;
    if !int.is_empty() && last_weight > 0 {
        int.extend(std::iter::repeat_n('0', 4 * usize::try_from(last_weight).ok()?));
    }
    if weight < -1 {
        let lead = "0000".repeat(usize::try_from(-1 - i32::from(weight)).ok()?);
        frac.insert_str(0, &lead);
    }
    frac.truncate(dscale);
    while frac.len() < dscale {
        frac.push('0');
    }
    let int = if int.is_empty() { "0".to_string() } else { int };
    let sign = if sign == 0x4000 { "-" } else { "" };
    Some(if dscale == 0 { format!("{sign}{int}") } else { format!("{sign}{int}.{frac}") })
}

/// A decimal's text in the numeric binary wire format.
pub fn to_binary(s: &str) -> Option<Vec<u8>> {
    let (neg, int, frac) = parts(s)?;
    let dscale = u16::try_from(frac.len()).ok()?;
    // Base-10000 groups: the integer part from the units up, the fraction
    // from the point down.
    let pad = (4 - int.len() % 4) % 4;
    let int = format!("{}{int}", "0".repeat(pad));
    let mut groups: Vec<u16> = int.as_bytes().chunks(4).map(group).collect();
    let int_groups = groups.len();
    let fpad = (4 - frac.len() % 4) % 4;
    let frac = format!("{frac}{}", "0".repeat(fpad));
    groups.extend(frac.as_bytes().chunks(4).map(group));
    let mut weight = i32::try_from(int_groups).ok()? - 1;
    let lead = groups.iter().take_while(|&&g| g == 0).count();
    groups.drain(..lead);
    weight -= i32::try_from(lead).ok()?;
    while groups.last() == Some(&0) {
        groups.pop();
    }
    if groups.is_empty() {
        weight = 0;
    }
    let mut out = Vec::with_capacity(8 + 2 * groups.len());
    out.extend_from_slice(&u16::try_from(groups.len()).ok()?.to_be_bytes());
    out.extend_from_slice(&i16::try_from(weight).ok()?.to_be_bytes());
    out.extend_from_slice(&(if neg && !groups.is_empty() { 0x4000u16 } else { 0 }).to_be_bytes());
    out.extend_from_slice(&dscale.to_be_bytes());
    for g in groups {
        out.extend_from_slice(&g.to_be_bytes());
    }
    Some(out)
}

fn group(c: &[u8]) -> u16 {
    c.iter().fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avg_as_postgresql_gives_it() {
        // Values checked against PostgreSQL 15.
        for (sum, count, want) in [
            ("10", 4, "2.5000000000000000"),
            ("1", 3, "0.33333333333333333333"),
            ("2", 3, "0.66666666666666666667"),
            ("-2", 3, "-0.66666666666666666667"),
            ("100", 1, "100.0000000000000000"),
            ("12345678901234567890", 7, "1763668414462081127"),
            ("1.50", 2, "0.75000000000000000000"),
            ("0", 5, "0.00000000000000000000"),
            ("20000", 2, "10000.0000000000000000"),
        ] {
            assert_eq!(avg(sum, count).as_deref(), Some(want), "{sum} / {count}");
        }
        assert_eq!(avg("1", 0), None);
        assert_eq!(avg("NaN", 2), None);
    }

    #[test]
    fn binary_round_trips() {
        for s in ["0", "1", "-1", "10000", "12345.678", "0.0001", "0.00001", "-99999999.00", "3.14159", "100000000"] {
            let b = to_binary(s).unwrap();
            assert_eq!(from_binary(&b).as_deref(), Some(s), "{s}");
        }
        // 12345.678: 2 digits before the point, dscale 3.
        assert_eq!(to_binary("12345.678").unwrap(), [0, 3, 0, 1, 0, 0, 0, 3, 0, 1, 0x09, 0x29, 0x1a, 0x7c]);
    }
}
