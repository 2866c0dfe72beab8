//! pgmux: a PostgreSQL proxy.
//!
//! The data path reads from the folder names: a client socket is accepted
//! by [`proxy`] and logs in through the [`frontend`] (login, cancel keys,
//! the client registry), whose session relays its frames ([`protocol`]:
//! framing, what is in flight, prepared statements) after [`sql`] has
//! said what a statement is and [`router`] (or [`shard`]) where it goes,
//! to a server connection checked out of a [`backend`] pool, and back.
//! Around it: [`config`] (typed, validated once) and [`ops`] (console,
//! control verbs, reload, metrics).

pub mod backend;
pub mod config;
pub mod frontend;
pub mod ops;
pub mod protocol;
pub mod proxy;
pub mod router;
pub mod shard;
pub mod sql;
pub mod topology;

/// Database name of the admin console.
pub const ADMIN_DB: &str = "pgmux";
