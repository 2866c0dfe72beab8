//! Stale server statements. A server statement goes stale when the schema
//! changes under it: the server then refuses a Bind or Describe of it
//! (`cached plan must not change result type`, `cache lookup failed for
//! type ...`, or the statement is gone). pgmux drops that statement from
//! every server connection of the database (it is closed there before
//! their next use) and, when the failed batch can be run again exactly,
//! runs it again on a fresh statement: the client sees only the second
//! answer.
//!
//! A batch can be run again when the failed message was the first use of
//! a named statement in its batch (up to its Sync), nothing ran before it
//! in that batch (no Execute), no transaction block was open, and nothing
//! was sent after its Sync. A batch the client has not synced yet (it
//! waits on a Flush, as asyncpg's prepare does) is ended by a Sync of
//! pgmux's own, whose ReadyForQuery the client never sees. The client's messages from that first use on
//! are kept (at most [`RERUN_LIMIT`] bytes) until the batch is answered.
//! While the server skips to the Sync, its replies are held back and the
//! client's next messages wait; then the session sends the kept messages
//! again ([`Again`]).
//!
//! A client that was told the statement's result shape (a Describe of the
//! statement) gets PostgreSQL's own `cached plan must not change result
//! type`, and so does every later use of that statement, as on its own
//! connection, until it prepares it again: pgmux never sends rows of
//! another shape than the one the client was told.

use bytes::{BufMut, BytesMut};

use super::{put_message, Ctx, Expect, Tracker};
use crate::protocol::error::{field, parse_fields, sqlstate, PgError};
use crate::protocol::frame::Flow;
use crate::protocol::messages::TxStatus;

/// Client bytes kept for a re-run, at most.
const RERUN_LIMIT: usize = 64 * 1024;

#[derive(Debug, Default, PartialEq, Eq)]
enum State {
    #[default]
    Off,
    /// Keeping the messages of the current batch.
    Recording,
    /// The kept batch ended with its Sync; nothing was sent after it.
    Closed,
}

/// The batch kept for a re-run, and a re-run under way.
#[derive(Debug, Default)]
pub struct Rerun {
    bytes: BytesMut,
    state: State,
    /// An Execute ran in the current batch.
    executed: bool,
    /// Number of the kept batch.
    batch: u64,
    /// The server's error, held back until its ReadyForQuery.
    held: Option<BytesMut>,
    /// A Sync pgmux must send to end a failed batch the client has not
    /// synced yet (it waits on a Flush).
    sync: bool,
    again: Option<Again>,
}

/// A batch to run again, for the session.
#[derive(Debug)]
pub struct Again {
    /// The client's messages to send again, ahead of its later ones
    /// (`None`: it cannot be run again after all).
    pub resend: Option<BytesMut>,
    /// What the client is told if they are not sent: the server's error
    /// and its ReadyForQuery.
    pub answer: BytesMut,
}

impl Rerun {
    /// A client message goes to the server.
    pub(in crate::protocol) fn message(&mut self, tag: u8, body: &[u8]) {
        if self.state == State::Closed || (self.state == State::Recording && matches!(tag, b'Q' | b'F')) {
            self.stop();
        }
        if self.state == State::Recording {
            put_message(&mut self.bytes, tag, body);
            if tag == b'S' {
                self.state = State::Closed;
            } else if self.bytes.len() > RERUN_LIMIT {
                self.stop();
            }
        }
        match tag {
            b'E' => self.executed = true,
            b'S' | b'Q' | b'F' => self.executed = false,
            _ => {}
        }
    }

    /// A use of a named statement: the batch is kept from here on when
    /// nothing ran in it yet. Returns the kept batch's number.
    pub(in crate::protocol) fn start(&mut self, tag: u8, body: &[u8]) -> Option<u64> {
        if self.state != State::Off || self.executed {
            return None;
        }
        self.bytes.clear();
        put_message(&mut self.bytes, tag, body);
        self.state = State::Recording;
        self.batch += 1;
        Some(self.batch)
    }

    /// Keep nothing (COPY data, or something that cannot be run again).
    pub(in crate::protocol) fn stop(&mut self) {
        self.state = State::Off;
        if self.bytes.capacity() > 8192 {
            self.bytes = BytesMut::new();
        } else {
            self.bytes.clear();
        }
    }

    pub(in crate::protocol) fn reset(&mut self) {
        self.stop();
        self.executed = false;
        self.held = None;
        self.again = None;
        self.sync = false;
    }

    pub(in crate::protocol) fn idle(&self) -> bool {
        self.held.is_none() && self.again.is_none()
    }

    pub(in crate::protocol) fn holding(&self) -> bool {
        self.held.is_some()
    }

    pub(in crate::protocol) fn take(&mut self) -> Option<Again> {
        self.again.take()
    }
}

/// How a server statement went stale.
#[derive(Debug, PartialEq, Eq)]
enum Staleness {
    /// Its result columns changed.
    ResultType,
    /// A type or relation it was planned with is gone, or the statement.
    Gone,
}

/// Whether an error (SQLSTATE, message, routine) says the statement is stale.
fn staleness(code: &str, message: &str, routine: &str) -> Option<Staleness> {
    match code {
        sqlstate::FEATURE_NOT_SUPPORTED if routine == "RevalidateCachedQuery" || message == RESULT_TYPE_CHANGED => {
            Some(Staleness::ResultType)
        }
        sqlstate::INTERNAL_ERROR
            if message.starts_with("cache lookup failed for ")
                || message.starts_with("could not open relation with OID") =>
        {
            Some(Staleness::Gone)
        }
        "26000" if message.contains("\"pgmux_") => Some(Staleness::Gone),
        _ => None,
    }
}

/// PostgreSQL's message for a statement whose result shape changed.
pub(super) const RESULT_TYPE_CHANGED: &str = "cached plan must not change result type";

impl Tracker {
    /// Refuse a use of a statement whose shape the client was told and
    /// that changed since: the server raises the error in the message's
    /// place (see `emulate_error`), and the client gets it with
    /// PostgreSQL's own fields (drivers such as asyncpg re-prepare on
    /// seeing its routine).
    pub(in crate::protocol) fn raise_stale_shape(&mut self, err: PgError) -> Flow {
        let flow = self.emulate_error(err);
        if let Some(last) = self.expect.back_mut() {
            let mut own = BytesMut::new();
            for (k, v) in [(b'S', "ERROR"), (b'V', "ERROR"), (b'C', sqlstate::FEATURE_NOT_SUPPORTED)]
                .into_iter()
                .chain([(b'M', RESULT_TYPE_CHANGED), (b'F', "plancache.c"), (b'R', "RevalidateCachedQuery")])
            {
                own.put_u8(k);
                own.put_slice(v.as_bytes());
                own.put_u8(0);
            }
            own.put_u8(0);
            let mut message = BytesMut::new();
            put_message(&mut message, b'E', &own);
            *last = Expect::Raise(message);
        }
        flow
    }
}

/// A command tag of DDL that can make existing statements stale (index
/// changes cannot: PostgreSQL re-plans those by itself).
pub(in crate::protocol) fn is_ddl(tag: &[u8]) -> bool {
    let t = tag.strip_suffix(&[0]).unwrap_or(tag);
    let changes = t.starts_with(b"ALTER ") || t.starts_with(b"DROP ") || t == b"CREATE VIEW" || t == b"CREATE RULE";
    changes && !t.ends_with(b" INDEX")
}

impl Tracker {
    /// An ErrorResponse (body) from the server. When it says the statement
    /// in use is stale, that statement is dropped from every server; when
    /// the batch can run again, the error is held back (`true`) until the
    /// server is ready, and then the batch goes to the session to resend.
    pub(in crate::protocol) fn stale(&mut self, body: &[u8], whole: bool, cx: &mut Ctx) -> bool {
        let (Some(Expect::Bind(Some(used))) | Some(Expect::Describe(Some(used)))) = self.expect.front() else {
            return false;
        };
        let fields = parse_fields(body);
        let get = |c| field(&fields, c).unwrap_or("");
        let Some(kind) = staleness(get(b'C'), get(b'M'), get(b'R')) else { return false };
        let stale_seq = cx.server.seq(used.ident).unwrap_or(0);
        cx.server.doom(used.ident);
        let reshaped = kind == Staleness::ResultType;
        cx.events.stale.push((used.ident, reshaped.then_some(stale_seq)));
        // The client was told the shape of this stale copy (or an older
        // one): it gets PostgreSQL's error, as on its own connection.
        if reshaped && used.client.told().is_some_and(|told| told <= stale_seq) {
            used.client.mark_stale_shape();
            return false;
        }
        let again = whole && self.flight.status == TxStatus::Idle && used.rerun.is_some_and(|n| self.rerun.kept(n));
        if !again {
            return false;
        }
        // A batch waiting on a Flush: pgmux ends the failed part itself.
        let sync = self.rerun.state == State::Recording;
        let mut held = BytesMut::with_capacity(body.len() + 5);
        put_message(&mut held, b'E', body);
        self.rerun.held = Some(held);
        cx.events.reruns += 1;
        // The server skips the rest of the batch, up to its Sync.
        self.on_error(cx);
        if sync {
            self.server_skipping = false;
            self.expect.push_back(Expect::Sync);
            self.rerun.sync = true;
        }
        true
    }

    /// While an error is held back: the server skips to the Sync; what it
    /// sends until its ReadyForQuery is hidden, then the batch runs again.
    pub(in crate::protocol) fn hold_back(&mut self, tag: u8, body: &[u8]) -> Flow {
        match tag {
            b'Z' => {
                self.expect.pop_front();
                let mut answer = self.rerun.held.take().unwrap_or_default();
                put_message(&mut answer, b'Z', body);
                let resend = (self.flight.status == TxStatus::Idle).then(|| std::mem::take(&mut self.rerun.bytes));
                self.rerun.stop();
                self.rerun.again = Some(Again { resend, answer });
                Flow::Drop
            }
            // Asynchronous messages are the client's as they come.
            b'N' | b'A' | b'S' => Flow::Forward,
            _ => Flow::Drop,
        }
    }
}

impl Rerun {
    /// Whether batch `n` is the one kept, with nothing sent after it (up
    /// to its Sync, or all of it so far, waiting on a Flush).
    fn kept(&self, n: u64) -> bool {
        self.state != State::Off && self.batch == n
    }

    /// The server must be sent a Sync now (see [`Tracker::stale`]).
    pub(in crate::protocol) fn take_sync(&mut self) -> bool {
        std::mem::take(&mut self.sync)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_errors_are_recognized() {
        let rt = staleness("0A000", "cached plan must not change result type", "RevalidateCachedQuery");
        assert_eq!(rt, Some(Staleness::ResultType));
        // Localized message: the routine still says so.
        assert_eq!(staleness("0A000", "le plan en cache ...", "RevalidateCachedQuery"), Some(Staleness::ResultType));
        assert_eq!(staleness("XX000", "cache lookup failed for type 59052", "getTypeIOParam"), Some(Staleness::Gone));
        assert_eq!(
            staleness("26000", "prepared statement \"pgmux_00ab\" does not exist", "FetchPreparedStatement"),
            Some(Staleness::Gone)
        );
        assert_eq!(staleness("0A000", "something else", "other"), None);
        assert_eq!(staleness("26000", "prepared statement \"s1\" does not exist", "x"), None);
        assert_eq!(staleness("42P01", "relation \"t\" does not exist", "x"), None);
    }

    #[test]
    fn ddl_tags() {
        assert!(is_ddl(b"ALTER TABLE\0"));
        assert!(is_ddl(b"DROP TYPE\0"));
        assert!(is_ddl(b"CREATE VIEW\0"));
        assert!(!is_ddl(b"CREATE TABLE\0"));
        assert!(!is_ddl(b"CREATE INDEX\0"));
        assert!(!is_ddl(b"DROP INDEX\0"));
        assert!(!is_ddl(b"SELECT 1\0"));
        assert!(!is_ddl(b"INSERT 0 1\0"));
    }

    #[test]
    fn a_batch_is_kept_from_its_first_statement_use_to_its_sync() {
        let mut r = Rerun::default();
        r.message(b'P', b"\0SELECT 1\0\0\0");
        r.message(b'B', b"\0s1\0\0\0\0\0\0\0");
        let n = r.start(b'B', b"\0s1\0\0\0\0\0\0\0");
        assert!(n.is_some());
        r.message(b'E', b"\0\0\0\0\0");
        r.message(b'S', b"");
        assert!(r.kept(n.unwrap_or_default()));
        assert_eq!(r.bytes.len(), 5 + 10 + 5 + 5 + 5);
        // Something sent after the Sync: the batch can no longer run again.
        r.message(b'B', b"\0s2\0\0\0\0\0\0\0");
        assert!(!r.kept(n.unwrap_or_default()));
        // After an Execute in the same batch nothing is kept.
        r.message(b'E', b"\0\0\0\0\0");
        assert_eq!(r.start(b'B', b"\0s3\0\0\0\0\0\0\0"), None);
    }
}
