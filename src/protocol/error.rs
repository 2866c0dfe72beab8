//! ErrorResponse / NoticeResponse construction with SQLSTATE codes.
//!
//! Everything pgmux itself tells a client goes through [`PgError`], so the
//! client sees exactly what PostgreSQL would send: severity, SQLSTATE,
//! message, optional detail and hint.

use std::borrow::Cow;

use bytes::{BufMut, BytesMut};

use super::messages::{finish_message, start_message};

/// SQLSTATE codes pgmux emits.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const TRANSACTION_RESOLUTION_UNKNOWN: &str = "08007";
    pub const CONNECTION_EXCEPTION: &str = "08000";
    pub const SQLCLIENT_UNABLE_TO_ESTABLISH: &str = "08001";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const CONFIGURATION_LIMIT_EXCEEDED: &str = "53400";
    pub const DUPLICATE_PSTATEMENT: &str = "42P05";
    pub const QUERY_CANCELED: &str = "57014";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const INTERNAL_ERROR: &str = "XX000";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const UNDEFINED_OBJECT: &str = "42704";
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
    pub const CONFIG_FILE_ERROR: &str = "F0000";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
    pub const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
    pub const INVALID_TEXT_REPRESENTATION: &str = "22P02";
    pub const ACTIVE_SQL_TRANSACTION: &str = "25001";
    pub const BAD_COPY_FILE_FORMAT: &str = "22P04";
    pub const CHECK_VIOLATION: &str = "23514";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Notice,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Notice => "NOTICE",
        }
    }
}

/// An error (or notice) to send to a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgError {
    pub severity: Severity,
    pub code: Cow<'static, str>,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    pub fn new(severity: Severity, code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        PgError { severity, code: code.into(), message: message.into(), detail: None, hint: None }
    }

    pub fn fatal(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, code, message)
    }

    pub fn error(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, message)
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Append the wire form (ErrorResponse, or NoticeResponse for notices).
    pub fn encode(&self, buf: &mut BytesMut) {
        let tag = if self.severity == Severity::Notice { b'N' } else { b'E' };
        let at = start_message(buf, tag);
        let mut field = |code: u8, value: &str| {
            buf.put_u8(code);
            buf.put_slice(value.as_bytes());
            buf.put_u8(0);
        };
        field(b'S', self.severity.as_str());
        field(b'V', self.severity.as_str());
        field(b'C', &self.code);
        field(b'M', &self.message);
        if let Some(d) = &self.detail {
            field(b'D', d);
        }
        if let Some(h) = &self.hint {
            field(b'H', h);
        }
        buf.put_u8(0);
        finish_message(buf, at);
    }

    pub fn to_bytes(&self) -> BytesMut {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity.as_str(), self.code, self.message)
    }
}

impl std::error::Error for PgError {}

/// Fields of an ErrorResponse/NoticeResponse received from a server.
pub fn parse_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        out.push((code, String::from_utf8_lossy(&tail[..end]).into_owned()));
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    out
}

/// One field (by its code byte) of parsed ErrorResponse fields.
pub fn field(fields: &[(u8, String)], code: u8) -> Option<&str> {
    fields.iter().find(|(k, _)| *k == code).map(|(_, v)| v.as_str())
}

/// "SEVERITY CODE: message" of a server ErrorResponse body, for logs and
/// errors that cross module boundaries.
pub fn describe_server_error(body: &[u8]) -> String {
    let fields = parse_fields(body);
    let get = |c| field(&fields, c).unwrap_or("");
    format!("{} {}: {}", get(b'S'), get(b'C'), get(b'M'))
}

impl PgError {
    /// A server's ErrorResponse re-issued as FATAL, keeping its SQLSTATE,
    /// message, detail and hint.
    pub fn fatal_from_server(body: &[u8]) -> PgError {
        Self::from_server(body, Severity::Fatal)
    }

    /// A server's ErrorResponse re-issued as ERROR (the session goes on).
    pub fn error_from_server(body: &[u8]) -> PgError {
        Self::from_server(body, Severity::Error)
    }

    fn from_server(body: &[u8], severity: Severity) -> PgError {
        let fields = parse_fields(body);
        let get = |c| field(&fields, c).map(str::to_string);
        let code = get(b'C').unwrap_or_else(|| sqlstate::INTERNAL_ERROR.to_string());
        let mut err = PgError::new(severity, code, get(b'M').unwrap_or_default());
        err.detail = get(b'D');
        err.hint = get(b'H');
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_fields() {
        let e = PgError::fatal(sqlstate::INVALID_PASSWORD, "password authentication failed for user \"x\"")
            .with_hint("check it");
        let b = e.to_bytes();
        assert_eq!(b[0], b'E');
        let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert_eq!(len + 1, b.len());
        let fields = parse_fields(&b[5..]);
        assert!(fields.contains(&(b'C', "28P01".into())));
        assert!(fields.contains(&(b'S', "FATAL".into())));
        assert!(fields.contains(&(b'H', "check it".into())));
        assert_eq!(PgError::fatal_from_server(&b[5..]), e);
        assert_eq!(describe_server_error(&b[5..]), "FATAL 28P01: password authentication failed for user \"x\"");
    }
}
