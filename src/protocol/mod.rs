//! The PostgreSQL v3 wire protocol, both directions: framing, the messages
//! pgmux builds or decodes, authentication exchanges, error responses, TLS,
//! what is in flight between a client and its server connection (the
//! tracker and its flight), protocol-level prepared statements (their
//! bookkeeping and storage), and the shared maps of session settings.

pub mod auth;
pub mod error;
pub mod flight;
pub mod frame;
pub mod messages;
pub mod prepared;
pub mod settings;
pub mod statements;
pub mod tls;
pub mod tracker;
