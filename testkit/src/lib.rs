//! Test and demo tooling for pgmux, kept out of the proxy library: throw-away
//! real PostgreSQL clusters ([`Cluster`]: a primary, streaming replicas,
//! extra primaries for shards) built with the installed server binaries
//! ([`PgBin`]), and throw-away TLS certificates ([`make_certs`]). Used by the
//! integration tests, the benchmarks and `pgmux demo`; the proxy itself
//! never links it unless built with its `demo` feature (the default), and
//! then only the command-line binary uses it.

mod certs;
mod cluster;
mod command;
mod pgbin;
mod spec;

pub use cluster::*;
