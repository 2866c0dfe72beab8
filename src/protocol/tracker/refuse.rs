//! Errors pgmux detects in a client's message, raised by the server in the
//! message's place (so the transaction fails and the rest of the batch is
//! skipped exactly as PostgreSQL would), and the tracker's handling of a
//! transaction block pgmux abandons.

use bytes::{BufMut, BytesMut};

use super::{Ctx, Expect, Tracker};
use crate::protocol::error::PgError;
use crate::protocol::frame::Flow;
use crate::protocol::messages::{finish_message, start_message};
use crate::protocol::statements::{put_cstr, ServerStatements};

impl Tracker {
    /// A Parse is in flight whose outcome the bookkeeping depends on.
    pub fn parse_in_flight(&self) -> bool {
        self.expect.iter().any(|e| matches!(e, Expect::Parse { undo: Some(_), .. }))
    }

    /// pgmux rolls back the client's transaction block itself (the client
    /// left in it): the statements prepared inside it are closed on the
    /// connection before its next use, as after a client's ROLLBACK.
    pub fn abandon_block(&mut self, server: &mut ServerStatements) {
        for ident in self.in_block.drain(..) {
            server.doom(ident);
        }
    }

    /// Report an error pgmux detects in the extended protocol. The server
    /// raises it (an unnamed `DO` that raises it, run in place of the
    /// message), so the transaction is aborted and the rest of the batch
    /// skipped exactly as PostgreSQL would.
    pub(super) fn emulate_error(&mut self, err: PgError) -> Flow {
        let mut out = BytesMut::new();
        let at = start_message(&mut out, b'P');
        out.put_u8(0);
        put_cstr(&mut out, &raise_sql(&err));
        out.put_i16(0);
        finish_message(&mut out, at);
        let at = start_message(&mut out, b'B');
        out.put_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        finish_message(&mut out, at);
        let at = start_message(&mut out, b'E');
        out.put_u8(0);
        out.put_i32(0);
        finish_message(&mut out, at);
        self.expect.push_back(Expect::Parse { undo: None, hidden: true });
        self.expect.push_back(Expect::Hidden(b'2'));
        self.expect.push_back(Expect::Execute);
        Flow::Replace(out)
    }

    /// Refuse the client message `tag` (a Query, or a Bind/Parse/Describe/
    /// Execute) with `err`: the server raises it in the message's place,
    /// so the transaction fails as it would on PostgreSQL.
    pub(in crate::protocol) fn refuse(&mut self, tag: u8, body: &[u8], cx: &mut Ctx, err: PgError) -> Flow {
        if self.flight.copy_in || self.server_skipping || !matches!(tag, b'Q' | b'P' | b'B' | b'D' | b'E') {
            return self.on_client(tag, body, cx);
        }
        if tag != b'Q' {
            return self.emulate_error(err);
        }
        let mut out = BytesMut::new();
        crate::protocol::messages::query(&mut out, &raise_sql(&err));
        self.expect.push_back(Expect::Query);
        Flow::Replace(out)
    }
}

/// SQL that makes the server raise `err` (SQLSTATE, message, hint).
fn raise_sql(err: &PgError) -> String {
    use crate::protocol::messages::quote_literal;
    let clean = |t: &str| t.replace("$pgmux_raise$", "");
    let mut sql = format!(
        "DO $pgmux_raise$BEGIN RAISE EXCEPTION USING ERRCODE = {}, MESSAGE = {}",
        quote_literal(&clean(&err.code)),
        quote_literal(&clean(&err.message))
    );
    if let Some(h) = &err.hint {
        sql.push_str(&format!(", HINT = {}", quote_literal(&clean(h))));
    }
    sql.push_str("; END$pgmux_raise$");
    sql
}
