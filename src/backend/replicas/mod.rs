//! Replicas: health and lag of each backend of a database, sampled by a
//! monitor per backend group, read by [`crate::router::route`] for
//! lag-aware read routing.

pub mod monitor;
