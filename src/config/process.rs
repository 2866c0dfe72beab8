//! `[pgmux]`: the process — where it listens, how it logs, how many
//! clients it takes and how long their login may take, users looked up
//! with `auth_query`, who may use the admin console, the metrics endpoint,
//! shutdown, slow-query logging and TLS for clients.

use std::time::Duration;

use serde::Deserialize;

use super::{Dur, HostPort};

/// `tls_mode`: TLS for clients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientTlsMode {
    #[default]
    Disable,
    Allow,
    Prefer,
    Require,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[pgmux]`: the process.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct General {
    /// Client-facing listen address.
    pub listen: HostPort,
    /// tracing filter (`info`, `pgmux=debug`, ...); RUST_LOG wins when set.
    pub log_level: String,
    /// `text` (one line per event, `key=value` fields) or `json`.
    pub log_format: LogFormat,
    /// Most client connections at once; more get 53300.
    pub max_client_conn: usize,
    /// A client must finish its login (startup, TLS, authentication)
    /// within this time, or it is disconnected.
    pub client_login_timeout: Dur,
    /// Users not in `[[users]]` are looked up with `auth_query`, run as
    /// this `[[users]]` entry on the primary of the database asked for.
    pub auth_user: Option<String>,
    /// Returns (user name, verifier) for `$1`; the verifier as pg_authid
    /// stores it (SCRAM-SHA-256 or md5).
    pub auth_query: String,
    /// Worker threads for the runtime (0 = one per core).
    pub worker_threads: usize,
    /// Users (from `[[users]]`) allowed every admin console command.
    pub admin_users: Vec<String>,
    /// Users allowed the admin console's SHOW commands.
    pub stats_users: Vec<String>,
    /// Where Prometheus scrapes `/metrics` (none: no metrics endpoint).
    pub metrics_listen: Option<HostPort>,
    /// On SIGTERM / SIGINT / SHUTDOWN: how long transactions in flight may
    /// take to finish before their clients are closed.
    pub shutdown_timeout: Dur,
    /// Log queries that take longer (their text truncated, never their
    /// parameters); 0 = off.
    pub log_slow_queries: Dur,
    /// TLS for clients: disable, allow, prefer (TLS when the client asks)
    /// or require (plain-text clients are refused).
    pub tls_mode: ClientTlsMode,
    /// Certificate chain and private key (PEM) shown to clients.
    pub tls_cert_file: Option<std::path::PathBuf>,
    pub tls_key_file: Option<std::path::PathBuf>,
    /// This pgmux's number (0-1023) in the ids `SELECT pgmux.unique_id()`
    /// makes: distinct per pgmux for ids unique across them (read at
    /// start).
    pub node_id: u16,
}

impl Default for General {
    fn default() -> Self {
        General {
            listen: HostPort { host: "127.0.0.1".into(), port: 6432 },
            log_level: "info".into(),
            log_format: LogFormat::Text,
            max_client_conn: 10_000,
            client_login_timeout: Dur(Duration::from_secs(60)),
            auth_user: None,
            auth_query: "SELECT usename, passwd FROM pg_shadow WHERE usename = $1".into(),
            worker_threads: 0,
            admin_users: Vec::new(),
            stats_users: Vec::new(),
            metrics_listen: None,
            shutdown_timeout: Dur(Duration::from_secs(30)),
            log_slow_queries: Dur(Duration::ZERO),
            tls_mode: ClientTlsMode::Disable,
            tls_cert_file: None,
            tls_key_file: None,
            node_id: 0,
        }
    }
}
