//! What a statement is: the one pass every relayed statement gets
//! ([`marks`]: which watched words it has, ruling out the other looks for
//! nearly every statement), scans of its text without a parse ([`scan`]:
//! leading command, transaction end, savepoints, statements, literal
//! shape; [`effects`]: what it does to the session) and the parser-backed
//! classifier ([`classify`]: read, write, transaction control, session
//! state, routing hints), cached.

pub mod classify;
pub mod effects;
pub mod marks;
pub mod scan;
