//! Routing: where a transaction goes (the primary, or which replica and
//! why), from what [`crate::sql::classify`] says its first statement is.

pub mod route;
