//! A server connection lost under a session: why (the server's own FATAL
//! when it said goodbye with one), how to find the goodbye in what the
//! server sent, and what the client is told.

use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::frame::first_message;
use crate::protocol::frame::HEADER_LEN;

/// Why a server connection was lost.
#[derive(Debug)]
pub(super) struct Lost {
    /// For the log and for pgmux's own error.
    pub why: String,
    /// The server's own FATAL ErrorResponse (body), when it said goodbye
    /// with one: a client whose session ends with the connection gets it
    /// as the server sent it (SQLSTATE, severity, message).
    pub fatal: Option<Vec<u8>>,
    /// That FATAL was relayed to the client already (session mode, pinned):
    /// it is told nothing more.
    pub told: bool,
}

impl From<String> for Lost {
    fn from(why: String) -> Self {
        Lost { why, fatal: None, told: false }
    }
}

impl From<String> for Box<Lost> {
    fn from(why: String) -> Self {
        Box::new(why.into())
    }
}

impl Lost {
    /// What a client whose session ends with the connection is told
    /// (`None`: it was told already).
    pub fn client_error(&self) -> Option<PgError> {
        match &self.fatal {
            _ if self.told => None,
            Some(body) => Some(PgError::fatal_from_server(body)),
            None => Some(PgError::fatal(sqlstate::CONNECTION_FAILURE, format!("server connection lost: {}", self.why))),
        }
    }
}

/// A server's goodbye among the whole messages of `buf` before any
/// ReadyForQuery (an answer that ended is not affected).
pub(super) fn goodbye_before_ready(mut buf: &[u8]) -> Option<Lost> {
    while let Some((tag, body)) = first_message(buf) {
        if tag == b'Z' {
            return None;
        }
        if let Some(lost) = goodbye(tag, body) {
            return Some(lost);
        }
        buf = &buf[HEADER_LEN + body.len()..];
    }
    None
}

/// A server's goodbye: a FATAL ErrorResponse, or the notice (class 57,
/// operator intervention) a backend sends when its server shuts down.
pub(super) fn goodbye(tag: u8, body: &[u8]) -> Option<Lost> {
    use crate::protocol::error::{describe_server_error, field, parse_fields};
    if tag != b'E' && tag != b'N' {
        return None;
    }
    let fields = parse_fields(body);
    let severity = field(&fields, b'V').or(field(&fields, b'S'));
    let fatal = tag == b'E' && matches!(severity, Some("FATAL" | "PANIC"));
    let shutdown = field(&fields, b'C').is_some_and(|c| c.starts_with("57P"));
    (shutdown || fatal).then(|| Lost {
        why: describe_server_error(body),
        fatal: fatal.then(|| body.to_vec()),
        told: false,
    })
}

/// What a client is told of a batch whose server connection was lost.
pub(super) fn lost_error(why: &str) -> PgError {
    PgError::error(sqlstate::CONNECTION_FAILURE, format!("pgmux: the server connection was lost ({why})"))
        .with_detail("The statement may or may not have run. The session goes on: a retry gets a new connection.")
}
