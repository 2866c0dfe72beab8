//! pgmux: a PostgreSQL proxy.
//!
//! The data path reads from the file names: a client socket is accepted in
//! [`proxy`], logs in through [`login`], its frames are cut by
//! [`protocol::frame`] and relayed by [`client`] to a server connection
//! ([`server`]) checked out of a [`pool`], and back.

pub mod admin;
pub mod authquery;
pub mod cancel;
pub mod client;
pub mod clients;
pub mod config;
pub mod control;
pub mod flight;

pub mod login;
pub mod metrics;
pub mod prepared;
pub mod prepared_view;

pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod reload;
pub mod replicas;
pub mod router;
pub mod server;
pub mod shard;
pub mod sqlhead;
pub mod statements;
pub mod tls;

/// Database name of the admin console.
pub const ADMIN_DB: &str = "pgmux";
