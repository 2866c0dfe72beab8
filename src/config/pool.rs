//! `[pool]`: the defaults of every pool (mode, sizes, timeouts, reset
//! query, prepared statements, TLS to servers), and the settings of one
//! pool resolved from them and the database's and the user's overrides.

use std::time::Duration;

use serde::Deserialize;

use super::{Config, Database, Dur, User};

/// How long a server connection stays with a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// Returned to the pool when ReadyForQuery says idle.
    Transaction,
    /// Held until the client disconnects.
    Session,
}

/// `server_tls_mode`: TLS to servers, as libpq's `sslmode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    #[default]
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// `[pool]`: defaults for every pool.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolDefaults {
    pub pool_mode: PoolMode,
    pub default_pool_size: usize,
    pub min_pool_size: usize,
    pub query_wait_timeout: Dur,
    pub server_idle_timeout: Dur,
    pub server_lifetime: Dur,
    pub server_connect_timeout: Dur,
    /// Run on a session-mode server connection before reuse.
    pub server_reset_query: String,
    /// Protocol-level prepared statements kept per server connection in
    /// transaction mode (LRU); 0 turns statement tracking off.
    pub max_prepared_statements: usize,
    /// Named prepared statements one client may hold at once.
    pub max_client_prepared_statements: usize,
    /// A query whose answer has not ended (ReadyForQuery) after this long
    /// is canceled on the server and its client closed (57014), so a
    /// stalled server cannot hold a client forever; 0 = no limit.
    pub query_timeout: Dur,
    /// TLS to servers: disable, prefer, require, verify-ca, verify-full.
    pub server_tls_mode: ServerTlsMode,
    /// CA certificates (PEM) that verify-ca / verify-full trust.
    pub server_tls_ca_file: Option<std::path::PathBuf>,
}

impl Default for PoolDefaults {
    fn default() -> Self {
        PoolDefaults {
            pool_mode: PoolMode::Transaction,
            default_pool_size: 20,
            min_pool_size: 0,
            query_wait_timeout: Dur(Duration::from_secs(120)),
            server_idle_timeout: Dur(Duration::from_secs(600)),
            server_lifetime: Dur(Duration::from_secs(3600)),
            server_connect_timeout: Dur(Duration::from_secs(5)),
            server_reset_query: "DISCARD ALL".into(),
            max_prepared_statements: 500,
            max_client_prepared_statements: 1000,
            query_timeout: Dur(Duration::ZERO),
            server_tls_mode: ServerTlsMode::Disable,
            server_tls_ca_file: None,
        }
    }
}

/// Settings of one pool, resolved from the layers above.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolSettings {
    pub mode: PoolMode,
    pub size: usize,
    pub min_size: usize,
    pub query_wait_timeout: Duration,
    pub idle_timeout: Duration,
    pub lifetime: Duration,
    pub connect_timeout: Duration,
    pub reset_query: String,
    pub max_prepared_statements: usize,
    pub max_client_prepared_statements: usize,
    /// A query unanswered this long is canceled (None: no limit).
    pub query_timeout: Option<Duration>,
}

impl Config {
    /// Resolve the settings of the pool for (database, user).
    pub fn pool_settings(&self, db: &Database, user: &User) -> PoolSettings {
        let size = user.pool_size.or(db.pool_size).unwrap_or(self.pool.default_pool_size);
        PoolSettings {
            mode: user.pool_mode.or(db.pool_mode).unwrap_or(self.pool.pool_mode),
            size,
            min_size: db.min_pool_size.unwrap_or(self.pool.min_pool_size).min(size),
            query_wait_timeout: self.pool.query_wait_timeout.0,
            idle_timeout: self.pool.server_idle_timeout.0,
            lifetime: self.pool.server_lifetime.0,
            connect_timeout: self.pool.server_connect_timeout.0,
            reset_query: self.pool.server_reset_query.clone(),
            max_prepared_statements: self.pool.max_prepared_statements,
            max_client_prepared_statements: self.pool.max_client_prepared_statements,
            query_timeout: Some(self.pool.query_timeout.0).filter(|t| !t.is_zero()),
        }
    }
}
