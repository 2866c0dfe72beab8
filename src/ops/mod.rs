//! Operating a running pgmux: the admin console, the control verbs behind
//! it and behind signals (pause, kill, ban, shutdown), hot reload, and the
//! Prometheus metrics.

pub mod admin;
pub mod control;
pub mod metrics;
pub mod reload;
