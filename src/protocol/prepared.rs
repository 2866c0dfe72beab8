//! Protocol-level prepared statements in transaction mode.
//!
//! A client's next transaction may run on another server connection, where
//! its named statements do not exist. pgmux therefore keeps each client's
//! statements (name → query text + parameter types) and prepares them on
//! servers under a name derived from a hash of (query, types, naming
//! context: `search_path` and `role`): the same statement from many clients
//! with the same name resolution is prepared once per server connection. A
//! Parse the server already has is answered by pgmux; a Bind or Describe of
//! a statement the server lacks gets the Parse injected in front of it, in
//! the same write. Each server connection keeps an LRU of what it has
//! prepared (`max_prepared_statements`); the Close of an evicted or stale
//! statement travels with the next write.
//!
//! A server statement goes stale when the schema changes under it (the
//! server then answers `cached plan must not change result type`, `cache
//! lookup failed for type ...`): [`rerun`] drops it everywhere and, when no
//! byte of the failed batch's answer reached the client, runs the batch
//! again on a fresh statement. DDL relayed (a `CREATE`/`ALTER`/`DROP`
//! command completed) invalidates every statement of the database; a
//! statement whose result shape a client was told is then checked (a
//! Describe of pgmux's own) before the client uses it again.
//!
//! The statement bookkeeping works on the protocol tracker's queue of
//! replies expected ([`crate::protocol::tracker`]): `impl Tracker` here and
//! in [`client`] (client messages), [`server`] (server messages) and
//! [`rerun`].

use bytes::{BufMut, BytesMut};

use crate::protocol::error::PgError;
use crate::protocol::frame::Flow;
use crate::protocol::messages::{finish_message, start_message};
use crate::protocol::statements::put_cstr;
pub use crate::protocol::statements::{
    answer_parse_batch, identity, naming_context, private_context, server_name, statement_hash, ClientStatements,
    Invalidations, ServerStatements, Statement,
};
pub use crate::protocol::tracker::Event;
use crate::protocol::tracker::{message, put_message, Expect, Tracker, Undo, Used};

mod client;
pub(super) mod rerun;
mod server;
pub mod view;
pub use rerun::Again;

/// The state the tracker works on.
pub struct Ctx<'a> {
    pub stmts: &'a mut ClientStatements,
    pub server: &'a mut ServerStatements,
    pub server_cap: usize,
    pub events: CacheEvents,
    /// The statement invalidations of the server's database.
    pub log: Option<&'a Invalidations>,
    /// The marks of the Query or Parse being tracked, when the relay found
    /// them already (its one pass over the text).
    pub marks: Option<crate::sql::marks::Marks>,
}

/// What the server statement cache did (for metrics).
#[derive(Debug, Default)]
pub struct CacheEvents {
    /// A statement the server had already.
    pub hits: u64,
    /// A statement prepared on the server.
    pub misses: u64,
    /// A statement closed on the server to make room.
    pub evictions: u64,
    /// Server statements found stale (with the preparation number of the
    /// stale copy when their result type changed): to drop from every
    /// connection.
    pub stale: Vec<(u64, Option<u64>)>,
    /// Batches run again after a stale statement.
    pub reruns: u64,
    /// Shapes a client was told, checked after DDL (`Expect::Verify`).
    pub checks: u64,
    /// A transaction that ran DDL ended: every statement may be stale.
    pub schema_changed: bool,
}

impl<'a> Ctx<'a> {
    pub fn new(stmts: &'a mut ClientStatements, server: &'a mut ServerStatements, server_cap: usize) -> Self {
        Ctx { stmts, server, server_cap, events: CacheEvents::default(), log: None, marks: None }
    }
}

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
    fn emulate_error(&mut self, err: PgError) -> Flow {
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

#[cfg(test)]
#[path = "prepared_tests.rs"]
mod tests;
