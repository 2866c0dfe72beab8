//! The few messages pgmux builds or decodes itself.
//!
//! Relayed traffic is never decoded here; these are the messages of the
//! login and authentication phases, the queries pgmux issues on its own
//! server connections (parameter sync, reset), and the replies it
//! synthesizes for clients.

use bytes::{Buf, BufMut, BytesMut};

/// Startup-family request codes.
pub const PROTOCOL_3_0: u32 = 196_608;
pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;

/// Authentication request codes (the `R` message).
pub const AUTH_OK: i32 = 0;
pub const AUTH_CLEARTEXT: i32 = 3;
pub const AUTH_MD5: i32 = 5;
pub const AUTH_SASL: i32 = 10;
pub const AUTH_SASL_CONTINUE: i32 = 11;
pub const AUTH_SASL_FINAL: i32 = 12;

/// Begin a tagged message; returns the offset to pass to [`finish_message`].
pub fn start_message(buf: &mut BytesMut, tag: u8) -> usize {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    at
}

/// Patch the length word of a message begun with [`start_message`].
pub fn finish_message(buf: &mut BytesMut, at: usize) {
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

/// A transaction status, as ReadyForQuery reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TxStatus {
    /// `I`: not in a transaction block.
    #[default]
    Idle,
    /// `T`: in a transaction block.
    InBlock,
    /// `E`: in a failed transaction block (queries are refused until it
    /// ends).
    Failed,
}

impl TxStatus {
    /// The status of a ReadyForQuery body. A byte PostgreSQL never sends
    /// counts as a failed transaction: such a connection is never taken
    /// for idle.
    pub fn of_ready(body: &[u8]) -> TxStatus {
        match body.first() {
            Some(b'I') => TxStatus::Idle,
            Some(b'T') => TxStatus::InBlock,
            _ => TxStatus::Failed,
        }
    }

    /// Its byte on the wire.
    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InBlock => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

pub fn ready_for_query(buf: &mut BytesMut, status: TxStatus) {
    buf.put_u8(b'Z');
    buf.put_i32(5);
    buf.put_u8(status.byte());
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    let at = start_message(buf, b'S');
    put_cstr(buf, name);
    put_cstr(buf, value);
    finish_message(buf, at);
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    buf.put_u8(b'K');
    buf.put_i32(12);
    buf.put_i32(pid);
    buf.put_i32(secret);
}

/// `R` with a code and payload.
pub fn auth_request(buf: &mut BytesMut, code: i32, payload: &[u8]) {
    let at = start_message(buf, b'R');
    buf.put_i32(code);
    buf.put_slice(payload);
    finish_message(buf, at);
}

/// AuthenticationSASL listing one mechanism.
pub fn auth_sasl(buf: &mut BytesMut, mechanism: &str) {
    let at = start_message(buf, b'R');
    buf.put_i32(AUTH_SASL);
    put_cstr(buf, mechanism);
    buf.put_u8(0);
    finish_message(buf, at);
}

/// NegotiateProtocolVersion: newest minor we support and options we ignore.
pub fn negotiate_protocol_version(buf: &mut BytesMut, minor: i32, unsupported: &[String]) {
    let at = start_message(buf, b'v');
    buf.put_i32(minor);
    buf.put_i32(unsupported.len() as i32);
    for o in unsupported {
        put_cstr(buf, o);
    }
    finish_message(buf, at);
}

/// Simple Query.
pub fn query(buf: &mut BytesMut, sql: &str) {
    let at = start_message(buf, b'Q');
    put_cstr(buf, sql);
    finish_message(buf, at);
}

/// CopyFail with a reason.
pub fn copy_fail(buf: &mut BytesMut, reason: &str) {
    let at = start_message(buf, b'f');
    put_cstr(buf, reason);
    finish_message(buf, at);
}

pub fn terminate(buf: &mut BytesMut) {
    buf.put_u8(b'X');
    buf.put_i32(4);
}

/// StartupMessage (protocol 3.0) with the given parameters.
pub fn startup(buf: &mut BytesMut, params: &[(&str, &str)]) {
    let at = buf.len();
    buf.put_i32(0);
    buf.put_u32(PROTOCOL_3_0);
    for (k, v) in params {
        put_cstr(buf, k);
        put_cstr(buf, v);
    }
    buf.put_u8(0);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn cancel_request(buf: &mut BytesMut, pid: i32, secret: i32) {
    buf.put_i32(16);
    buf.put_u32(CANCEL_REQUEST);
    buf.put_i32(pid);
    buf.put_i32(secret);
}

/// PasswordMessage carrying a NUL-terminated string (cleartext or md5).
pub fn password_message(buf: &mut BytesMut, password: &str) {
    let at = start_message(buf, b'p');
    put_cstr(buf, password);
    finish_message(buf, at);
}

pub fn sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    let at = start_message(buf, b'p');
    put_cstr(buf, mechanism);
    buf.put_i32(data.len() as i32);
    buf.put_slice(data);
    finish_message(buf, at);
}

pub fn sasl_response(buf: &mut BytesMut, data: &[u8]) {
    let at = start_message(buf, b'p');
    buf.put_slice(data);
    finish_message(buf, at);
}

/// Read a NUL-terminated string; `None` when malformed.
pub fn get_cstr(buf: &mut BytesMut) -> Option<String> {
    let end = buf.iter().position(|&b| b == 0)?;
    let s = String::from_utf8(buf.split_to(end).to_vec()).ok();
    buf.advance(1);
    s
}

/// Key/value pairs of a StartupMessage payload (after the version word).
pub fn parse_startup_params(mut payload: BytesMut) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    loop {
        if payload.is_empty() {
            return None;
        }
        if payload[0] == 0 {
            return Some(out);
        }
        let k = get_cstr(&mut payload)?;
        let v = get_cstr(&mut payload)?;
        out.push((k, v));
    }
}

/// ParameterStatus body → (name, value).
pub fn parse_parameter_status(body: &[u8]) -> Option<(String, String)> {
    let mut b = BytesMut::from(body);
    let k = get_cstr(&mut b)?;
    let v = get_cstr(&mut b)?;
    Some((k, v))
}

/// SASLInitialResponse body → (mechanism, data).
pub fn parse_sasl_initial(mut body: BytesMut) -> Option<(String, BytesMut)> {
    let mech = get_cstr(&mut body)?;
    if body.len() < 4 {
        return None;
    }
    let len = body.get_i32();
    if len < 0 {
        return Some((mech, BytesMut::new()));
    }
    if body.len() != len as usize {
        return None;
    }
    Some((mech, body))
}

/// Split a `options` startup value into `-c name=value` / `--name=value`
/// settings, honouring backslash escapes as PostgreSQL does.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_word = true;
            }
            c if c.is_ascii_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next().ok_or_else(|| "-c requires a value".to_string())?
        } else if let Some(rest) = w.strip_prefix("--") {
            rest.to_string()
        } else if let Some(rest) = w.strip_prefix("-c") {
            rest.to_string()
        } else {
            return Err(format!("unsupported startup option \"{w}\""));
        };
        let (k, v) = setting.split_once('=').ok_or_else(|| format!("option \"{setting}\" requires a value"))?;
        out.push((k.replace('-', "_"), v.to_string()));
    }
    Ok(out)
}

/// Quote a string literal for SQL (standard_conforming_strings on or off).
pub fn quote_literal(s: &str) -> String {
    if s.contains('\\') {
        format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

/// Split `b` at its first NUL: (the C string, what follows it). Without a
/// NUL the whole of `b` is the string.
pub fn split_nul(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|&c| c == 0) {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (b, &[]),
    }
}

/// A Bind body after its portal and statement names.
pub struct BindParts<'a> {
    /// Parameter format codes and values, as sent.
    pub params_section: &'a [u8],
    /// Each parameter: value (None: NULL) and whether it is binary.
    pub params: Vec<(Option<&'a [u8]>, bool)>,
    /// Result-column format codes, as sent (count included).
    pub result_formats: &'a [u8],
}

/// Parse a Bind body; `None` if it is malformed.
pub fn parse_bind(body: &[u8]) -> Option<BindParts<'_>> {
    let rest = split_nul(split_nul(body).1).1;
    let i16_at = |at: usize| rest.get(at..at + 2).map(|x| i16::from_be_bytes([x[0], x[1]]));
    let nf = usize::try_from(i16_at(0)?).ok()?;
    let formats: Vec<i16> = (0..nf).map(|i| i16_at(2 + 2 * i)).collect::<Option<_>>()?;
    let mut at = 2 + 2 * nf;
    let np = usize::try_from(i16_at(at)?).ok()?;
    at += 2;
    let mut params = Vec::with_capacity(np);
    for i in 0..np {
        let len = i32::from_be_bytes(rest.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        let binary = match formats.len() {
            0 => false,
            1 => formats[0] == 1,
            _ => formats.get(i) == Some(&1),
        };
        if len < 0 {
            params.push((None, binary));
        } else {
            let end = at + usize::try_from(len).ok()?;
            params.push((Some(rest.get(at..end)?), binary));
            at = end;
        }
    }
    let nr = usize::try_from(i16_at(at)?).ok()?;
    Some(BindParts { params_section: rest.get(..at)?, params, result_formats: rest.get(at..at + 2 + 2 * nr)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_parts() {
        // portal "", statement "s", formats [1], params [NULL, "42"], results [0]
        let mut b = b"\0s\0".to_vec();
        b.extend_from_slice(&[0, 1, 0, 1, 0, 2, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 2, b'4', b'2', 0, 1, 0, 0]);
        let p = parse_bind(&b).unwrap();
        assert_eq!(p.params, vec![(None, true), (Some(&b"42"[..]), true)]);
        assert_eq!(p.result_formats, &[0, 1, 0, 0]);
        assert_eq!(p.params_section.len(), 2 + 2 + 2 + 4 + 4 + 2);
        assert!(parse_bind(&b[..b.len() - 3]).is_none());
        assert_eq!(split_nul(b"ab\0cd"), (&b"ab"[..], &b"cd"[..]));
    }

    #[test]
    fn options_parse_like_postgres() {
        let o = parse_options("-c search_path=a,b --statement-timeout=5s -cwork_mem=4MB -c x=a\\ b").unwrap();
        assert_eq!(
            o,
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "4MB".into()),
                ("x".into(), "a b".into()),
            ]
        );
        assert!(parse_options("-x").is_err());
        assert!(parse_options("-c").is_err());
        assert!(parse_options("-c novalue").is_err());
    }

    #[test]
    fn startup_round_trip() {
        let mut b = BytesMut::new();
        startup(&mut b, &[("user", "u"), ("database", "d")]);
        let mut payload = b.split_off(8);
        assert_eq!(parse_startup_params(payload.clone()).unwrap().len(), 2);
        payload.truncate(payload.len() - 1);
        assert!(parse_startup_params(payload).is_none());
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
    }
}
