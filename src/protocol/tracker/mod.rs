//! The protocol tracker: the one record of what is in flight between a
//! client and its attached server connection. Its [`Flight`] counts what
//! the relay must wait for (Queries and Syncs unanswered, COPY IN, the
//! transaction status) in every session; in transaction mode its queue of
//! replies expected drives the prepared-statement bookkeeping (the design:
//! [`crate::protocol::prepared`]) on the statement records of [`Ctx`]:
//! client messages in [`client`], server messages in [`server`], stale
//! statements and the batches run again in [`rerun`], errors pgmux raises
//! in a message's place in [`refuse`].
//!
//! Answers pgmux gives itself must reach the client in protocol order, and
//! answers to injected messages must not reach it at all, so the queue
//! holds a reply expected from the server for every message forwarded,
//! with pgmux's own answers in their places. An error in the extended
//! protocol makes the server skip to Sync; the tracker drops what the
//! server will not answer and undoes bookkeeping for statements that were
//! not created after all. The relay calls [`Tracker::client`] and
//! [`Tracker::server`] once per message.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use crate::protocol::error::PgError;
use crate::protocol::flight::Flight;
use crate::protocol::frame::Flow;
use crate::protocol::messages::TxStatus;
use crate::protocol::statements::{ClientStatements, Invalidations, ServerStatements, Statement};

mod client;
mod refuse;
pub(super) mod rerun;
mod server;
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

/// Bookkeeping to undo when the server skips a Parse after an error.
#[derive(Debug)]
pub(super) struct Undo {
    pub(super) hash: Option<u64>,
    pub(super) client_name: Option<String>,
    /// A client statement pgmux dropped (Close, DEALLOCATE) to put back.
    pub(super) restore: Option<(String, Arc<Statement>)>,
}

#[derive(Debug)]
pub(super) enum Expect {
    /// pgmux answers at this point in the stream.
    Synthetic(BytesMut, Option<Undo>),
    /// ReadyForQuery with the current transaction status, from pgmux.
    SyntheticReady,
    Parse {
        undo: Option<Undo>,
        hidden: bool,
    },
    /// A Bind; of a client's named statement: `Some`.
    Bind(Option<Used>),
    /// A Describe; of a client's named statement: `Some`.
    Describe(Option<Used>),
    Execute,
    Close {
        hidden: bool,
        /// The statement an eviction Close removes from the server set.
        victim: Option<u64>,
        /// A stale statement closed: to close again if the server skips it.
        doomed: Option<u64>,
    },
    /// The client ended a COPY IN before the server started it (pipelined).
    CopyEnd,
    /// A reply (by tag) to a message pgmux injected: not for the client.
    Hidden(u8),
    /// The description (hidden) of a statement whose shape the client was
    /// told before a schema change, checked before its use (`upto`: that
    /// change, see [`Invalidations::all_seq`]); the client's message waits.
    Verify {
        stmt: Arc<Statement>,
        upto: u64,
    },
    /// The error pgmux had the server raise: the client gets this message
    /// (PostgreSQL's own fields) in its place.
    Raise(BytesMut),
    Sync,
    Query,
    FunctionCall,
}

/// A client's named statement in use on the server.
#[derive(Debug)]
pub(super) struct Used {
    pub(super) client: Arc<Statement>,
    /// Its server-side identity there.
    pub(super) ident: u64,
    /// This message starts the batch kept for a re-run (its number).
    pub(super) rerun: Option<u64>,
}

/// Something the session must act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    None,
    /// The server ran DISCARD ALL for this client.
    DiscardAll,
    /// A server prepared this statement: its SQL is valid.
    Prepared(u64),
    /// The server will skip this many Query/FunctionCall messages (sent
    /// after an extended-protocol error, before Sync): no ReadyForQuery
    /// comes for them (the flight no longer waits for them).
    Skipped(usize),
}

/// What is in flight between a client and its attached server connection:
/// the one record of it. [`Flight`] counts what the relay must wait for
/// (Queries and Syncs unanswered, COPY IN, the transaction status) for
/// every session; in transaction mode the queue of replies expected, with
/// pgmux's own answers in their places, drives the statement bookkeeping.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Unanswered Queries and Syncs, COPY IN, the transaction status.
    pub flight: Flight,
    pub(super) expect: VecDeque<Expect>,
    /// After an extended-protocol error the server ignores all until Sync.
    pub(super) server_skipping: bool,
    /// The batch kept for a re-run, and a re-run under way.
    pub(super) rerun: rerun::Rerun,
    /// A DDL command completed: the schema changed once its transaction ends.
    pub(super) ddl: bool,
    /// The ParameterDescription of a client statement's Describe, held
    /// until its RowDescription/NoData: the server may refuse the rest
    /// (stale), and the Describe then runs again whole.
    pub(super) param_desc: Option<BytesMut>,
    /// Statements prepared here inside the open transaction block: a
    /// rollback may take with it what they were planned with (a type
    /// created in it), so it drops them.
    pub(super) in_block: Vec<u64>,
    /// A statement's shape is being checked (`Expect::Verify`): the
    /// client's messages wait.
    pub(super) verifying: bool,
    /// The check is over: the session sends the client's messages again.
    pub(super) resume: bool,
}

impl Tracker {
    /// Everything answered, outside a transaction: the connection may go
    /// back to the pool (at a message boundary).
    pub fn idle(&self) -> bool {
        self.flight.idle() && self.settled()
    }

    /// No reply of the statement bookkeeping outstanding (the transaction
    /// may be open).
    pub fn settled(&self) -> bool {
        self.expect.is_empty() && !self.server_skipping && self.rerun.idle()
    }

    /// A client message on its way to the server: what to send instead,
    /// from the statement bookkeeping when `cx` is given (transaction
    /// mode; `veto`: refuse it with this error), and the count of what is
    /// in flight.
    pub fn client(&mut self, tag: u8, body: &[u8], cx: Option<&mut Ctx>, veto: Option<PgError>) -> Flow {
        let flow = match (cx, veto) {
            (Some(cx), Some(err)) => self.refuse(tag, body, cx, err),
            (Some(cx), None) => self.on_client(tag, body, cx),
            (None, _) => Flow::Forward,
        };
        self.flight.client(tag, flow != Flow::Drop);
        flow
    }

    /// A server message on its way to the client (`whole`: its body is
    /// present): the count of what is in flight, then, when `cx` is given,
    /// what the statement bookkeeping sends instead.
    pub fn server(&mut self, tag: u8, body: &[u8], whole: bool, cx: Option<&mut Ctx>) -> (Flow, Event) {
        self.flight.server(tag, body);
        let Some(cx) = cx else { return (Flow::Forward, Event::None) };
        let (flow, event) = self.on_server(tag, body, whole, cx);
        if let Event::Skipped(n) = event {
            self.flight.pending = self.flight.pending.saturating_sub(n);
        }
        (flow, event)
    }

    /// A connection just attached, its transaction status `status`.
    pub fn reset(&mut self, status: TxStatus) {
        self.flight = Flight::new();
        self.flight.status = status;
        self.expect.clear();
        self.server_skipping = false;
        self.rerun.reset();
        self.ddl = false;
        self.param_desc = None;
        self.in_block.clear();
        self.verifying = false;
        self.resume = false;
    }

    /// A batch whose statement was stale, to send again (then the client's
    /// later messages), or the answer to give the client when it cannot
    /// be (see [`Again`]).
    pub fn take_rerun(&mut self) -> Option<Again> {
        self.rerun.take()
    }

    /// A Sync pgmux must send the server now, ending a failed batch the
    /// client has not synced (its ReadyForQuery is not the client's).
    pub fn take_sync(&mut self) -> bool {
        self.rerun.take_sync()
    }

    /// The server's answer to a batch is held back until a re-run, or a
    /// statement's shape is being checked: send the client's next messages
    /// after it.
    pub fn holding(&self) -> bool {
        self.rerun.holding() || self.verifying
    }

    /// A statement's shape was checked (see `Expect::Verify`): send the
    /// client's messages that waited for it now.
    pub fn take_resume(&mut self) -> bool {
        std::mem::take(&mut self.resume)
    }

    /// Answers of pgmux's own that are due now (all earlier replies have
    /// been relayed). Send them to the client.
    pub fn due(&mut self) -> Option<BytesMut> {
        let mut out: Option<BytesMut> = None;
        loop {
            match self.expect.front() {
                Some(Expect::Synthetic(..)) => {
                    if let Some(Expect::Synthetic(b, _)) = self.expect.pop_front() {
                        out.get_or_insert_with(BytesMut::new).extend_from_slice(&b);
                    }
                }
                Some(Expect::SyntheticReady) => {
                    self.expect.pop_front();
                    crate::protocol::messages::ready_for_query(
                        out.get_or_insert_with(BytesMut::new),
                        self.flight.status,
                    );
                }
                _ => return out,
            }
        }
    }
}

/// A whole message of `tag` with `body`.
pub(super) fn message(tag: u8, body: &[u8]) -> BytesMut {
    let mut b = BytesMut::with_capacity(5 + body.len());
    put_message(&mut b, tag, body);
    b
}

/// Append a whole message of `tag` with `body`.
pub(super) fn put_message(b: &mut BytesMut, tag: u8, body: &[u8]) {
    b.put_u8(tag);
    b.put_i32(body.len() as i32 + 4);
    b.put_slice(body);
}

#[cfg(test)]
mod tests;
