//! The PostgreSQL v3 wire protocol: framing, the messages pgmux builds or
//! decodes, authentication exchanges, and error responses.

pub mod auth;
pub mod error;
pub mod frame;
pub mod messages;
