//! Pipelining on a sharded session: a batch the client sent behind the one
//! in flight goes on to the same server connection at once, without
//! waiting for the answer before it, when it surely runs on that
//! connection's shard — every statement it runs is keyed to that shard
//! (and the connection is the shard's primary, which serves reads and
//! writes alike). Any other batch waits, as before, and is routed anew
//! once the batches before it are answered.

use super::guard::bind_params;
use super::Session;
use crate::protocol::frame::{first_message, HEADER_LEN};
use crate::protocol::messages::split_nul as cstr;
use crate::protocol::statements::{ClientStatements, Statement};
use crate::shard::ShardTarget;

/// A client message that starts a batch (a lone Sync does not).
pub(super) fn starts_batch(tag: u8) -> bool {
    matches!(tag, b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'F' | b'H')
}

/// The Parse body (text, NUL, parameter types) of the statement a Bind of
/// `name` binds: the last one `parsed` (name, body after it) of the
/// messages looked at, else the client's statement of that name; `None`
/// for an unnamed statement parsed before them.
pub(super) fn bound<'a>(parsed: &[(&[u8], &'a [u8])], stmts: &'a ClientStatements, name: &[u8]) -> Option<&'a [u8]> {
    match parsed.iter().rev().find(|(n, _)| *n == name) {
        Some((_, body)) => Some(body),
        None if name.is_empty() => None,
        None => Some(Statement::lookup(stmts, std::str::from_utf8(name).ok()?)?.query_and_types()),
    }
}

/// Which of the client's messages the relay sends on now (see
/// [`Gate::admit`]), and which of them the shard guard need not look at.
pub(super) struct Gate {
    /// Batches behind the one in flight are held back (sharded,
    /// transaction mode: the next may belong to another shard and is
    /// routed once this one's transaction ends) ...
    hold: bool,
    /// ... but for this many, which go on all the same.
    pipelined: usize,
    /// The batch before the next message is whole (sent or in flight).
    batch_done: bool,
    /// The first statement is the one the batch was routed by.
    routed: bool,
    /// The current batch is a pipelined one (each statement vetted).
    vetted_batch: bool,
}

impl Gate {
    /// `None`: hold `tag`'s message back, with all after it; else whether
    /// it is a statement routed already (the routed batch's first, any of
    /// a pipelined batch).
    pub(super) fn admit(&mut self, tag: u8) -> Option<bool> {
        if self.hold && self.batch_done && starts_batch(tag) {
            self.pipelined = self.pipelined.checked_sub(1)?;
            self.batch_done = false;
            self.vetted_batch = true;
        }
        self.batch_done |= matches!(tag, b'Q' | b'S');
        Some(matches!(tag, b'Q' | b'B') && (self.vetted_batch || std::mem::take(&mut self.routed)))
    }
}

impl Session {
    /// The gate of one forward of the client's messages, on a connection
    /// `pinned` or not, its shard's `primary` or not (see `relay::Stretch`),
    /// the batch at the front `routed` to it or not. `outstanding`: a whole
    /// batch is in flight (it counts as this forward's first).
    pub(super) fn gate(&mut self, (pinned, primary): (bool, bool), routed: bool, outstanding: bool) -> Gate {
        let hold = self.sharding.is_some() && self.mode == crate::config::PoolMode::Transaction && !pinned;
        let pipelined = match hold && primary && self.multi().is_none() {
            true => self.pipelined(!outstanding),
            false => 0,
        };
        Gate { hold, pipelined, batch_done: hold && outstanding, routed, vetted_batch: false }
    }

    /// How many whole batches at the front of the buffer may go on now,
    /// pipelined: after the first (`skip_first`: it is the batch this
    /// connection serves; else it is already sent), each batch until one
    /// that may not. Batches are counted as the relay counts them: from a
    /// message that starts one to its Sync, or a Query.
    pub(super) fn pipelined(&mut self, skip_first: bool) -> usize {
        let Some(sh) = self.sharding.clone() else { return 0 };
        let Session { rbuf, stmts, wanted, resolved, shard_at, .. } = self;
        let session_shard = wanted.get("pgmux.shard").map(String::as_str);
        let here = |t: Result<ShardTarget, _>| matches!(t, Ok(ShardTarget::One(i)) if i == *shard_at);
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        // Statements parsed by the batches looked at (the unnamed one too).
        let mut parsed: Vec<(&[u8], &[u8])> = Vec::new();
        let (mut rest, mut first, mut started, mut n): (&[u8], bool, bool, usize) = (rbuf, skip_first, false, 0);
        while let Some((tag, body)) = first_message(rest) {
            rest = &rest[HEADER_LEN + body.len()..];
            let ends = matches!(tag, b'Q' | b'S');
            if first {
                first = !ends;
                continue;
            }
            started |= starts_batch(tag);
            let fits = match tag {
                b'Q' => here(sh.route(&text(cstr(body).0), &[], session_shard, resolved)),
                b'P' => {
                    parsed.push(cstr(body));
                    true
                }
                b'B' => bound(&parsed, stmts, cstr(cstr(body).1).0)
                    .is_some_and(|p| here(sh.route(&text(cstr(p).0), &bind_params(body), session_shard, resolved))),
                b'D' | b'E' | b'C' | b'S' => true,
                _ => false,
            };
            if !fits {
                break;
            }
            if ends && started {
                n += 1;
                started = false;
            }
        }
        n
    }
}
