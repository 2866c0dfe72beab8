//! What a statement is: a scan of its text without a parse (leading
//! command, session effects) and the parser-backed classifier (read,
//! write, transaction control, session state, routing hints), cached.

pub mod classify;
pub mod scan;
