//! Replicas: health and lag of each backend of a database, for lag-aware
//! read routing (the routing itself is not wired in yet).

pub mod monitor;
