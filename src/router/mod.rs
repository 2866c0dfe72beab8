//! Routing: what a statement is (read, write, transaction control, session
//! state, hints) and, later, where it goes. The classifier is in place and
//! tested; routing reads to replicas is not wired into sessions yet.

pub mod classify;
pub mod route;
