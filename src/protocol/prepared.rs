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
//! This module holds what is known about statements: each client's
//! ([`ClientStatements`]), each server connection's ([`ServerStatements`]),
//! and each database's schema changes ([`Invalidations`]), from
//! [`crate::protocol::statements`]; and the rewrite of queries of the
//! `pg_prepared_statements` view ([`view`]). The bookkeeping that keeps
//! them in step with the wire works on the protocol tracker's queue of
//! replies expected ([`crate::protocol::tracker`]).

pub use crate::protocol::statements::{
    answer_parse_batch, identity, naming_context, private_context, server_name, statement_hash, ClientStatements,
    Invalidations, ServerStatements, Statement,
};

pub mod view;
