//! Configuration: TOML parsed and validated once, at the edge, into typed
//! structs. Every error names the key and its position in the file.
//!
//! Shape (see `config/pgmux.toml` for the annotated version):
//! `[pgmux]` process settings, `[pool]` pool defaults, `[[users]]`,
//! `[databases.NAME]` with a `primary` and a `replicas` list.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

mod describe;
pub mod shards;
mod types;
pub use shards::{KeyType, MapConfig, RawKey, Shard, ShardedTable};
pub use types::{
    parse_duration, Dur, HostPort, LoadBalancing, PrimaryReads, ReadYourWrites, Replica, TransactionRouting,
};

use crate::protocol::auth::Secret;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}:{line}:{col}: {key}: {message}")]
    Invalid { path: String, line: usize, col: usize, key: String, message: String },
}

/// How long a server connection stays with a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// Returned to the pool when ReadyForQuery says idle.
    Transaction,
    /// Held until the client disconnects.
    Session,
}

/// How pgmux authenticates connecting clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "password")]
    Password,
    #[serde(rename = "trust")]
    Trust,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    pgmux: General,
    #[serde(default)]
    pool: PoolDefaults,
    #[serde(default)]
    users: Vec<RawUser>,
    #[serde(default)]
    databases: BTreeMap<String, Database>,
}

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
        }
    }
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

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: Spanned<String>,
    #[serde(default)]
    password: Option<Spanned<String>>,
    #[serde(default = "default_auth")]
    auth_method: Spanned<AuthMethod>,
    #[serde(default)]
    server_password: Option<String>,
    #[serde(default)]
    pool_mode: Option<PoolMode>,
    #[serde(default)]
    pool_size: Option<usize>,
}

fn default_auth() -> Spanned<AuthMethod> {
    Spanned::new(0..0, AuthMethod::ScramSha256)
}

/// `[[users]]`: who may connect, and how pgmux logs in for them.
#[derive(Clone, Debug, PartialEq)]
pub struct User {
    pub name: String,
    /// Plain text or a verifier (md5 / SCRAM) as pg_authid stores it.
    pub secret: Option<Secret>,
    pub auth_method: AuthMethod,
    /// Password for PostgreSQL when it differs from `password`.
    pub server_password: Option<String>,
    pub pool_mode: Option<PoolMode>,
    pub pool_size: Option<usize>,
}

/// `[databases.NAME]`: a logical database clients connect to.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    /// The primary (unsharded databases; a sharded one names each shard's).
    #[serde(default)]
    pub primary: Option<HostPort>,
    #[serde(default)]
    pub replicas: Vec<Replica>,
    /// Database name on the servers (defaults to the key).
    #[serde(default)]
    pub dbname: Option<String>,
    #[serde(default)]
    pub pool_mode: Option<PoolMode>,
    #[serde(default)]
    pub pool_size: Option<usize>,
    #[serde(default)]
    pub min_pool_size: Option<usize>,
    /// Send reads to healthy replicas within the lag bounds (needs
    /// `monitor_user` and at least one replica).
    #[serde(default = "yes")]
    pub read_routing: bool,
    /// The `[[users]]` entry whose password the lag monitor logs in with.
    #[serde(default)]
    pub monitor_user: Option<String>,
    /// Replicas further behind the primary than this many WAL bytes get no reads.
    #[serde(default = "default_lag_bytes")]
    pub max_lag_bytes: u64,
    /// Replicas further behind than this get no reads.
    #[serde(default = "default_lag")]
    pub max_lag: Dur,
    /// `max_lag` in milliseconds (give one or the other).
    #[serde(default)]
    pub max_lag_ms: Option<u64>,
    #[serde(default = "default_check_interval")]
    pub check_interval: Dur,
    /// How long a failing replica is left out before it is probed again.
    #[serde(default = "default_ban_time")]
    pub ban_time: Dur,
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    #[serde(default)]
    pub primary_reads: PrimaryReads,
    #[serde(default)]
    pub read_your_writes: ReadYourWrites,
    #[serde(default)]
    pub transaction_routing: TransactionRouting,
    /// Functions (unqualified names) whose calls make a statement a write,
    /// on top of the built-in list (nextval, pg_advisory_lock, ...).
    #[serde(default)]
    pub write_functions: Vec<String>,
    /// A call of any function not known to be read-only makes a statement a
    /// write.
    #[serde(default)]
    pub functions_are_writes: bool,
    /// Send writes to a replica that was promoted while the primary is down
    /// or in recovery.
    #[serde(default)]
    pub follow_promotion: bool,
    /// Sharding (see [`shards`]): the shards, each a primary with replicas.
    #[serde(default)]
    pub shards: Vec<Shard>,
    /// Sharded tables: key column and map.
    #[serde(default)]
    pub tables: Vec<ShardedTable>,
    #[serde(default)]
    pub maps: BTreeMap<String, MapConfig>,
    /// Tables with the same rows on every shard: reads go to one shard,
    /// writes are refused (they would have to reach every shard at once).
    #[serde(default)]
    pub reference_tables: Vec<String>,
    /// Writes without a key, or to several shards, run on each shard (not
    /// atomically) instead of being refused.
    #[serde(default)]
    pub allow_cross_shard_writes: bool,
    /// With `allow_cross_shard_writes`: commit what touched several shards
    /// with PostgreSQL's two-phase commit (`PREPARE TRANSACTION`), all or
    /// nothing. The shards need `max_prepared_transactions > 0`.
    #[serde(default)]
    pub two_phase_commit: bool,
}

fn yes() -> bool {
    true
}
fn default_lag_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_lag() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_check_interval() -> Dur {
    Dur(Duration::from_millis(500))
}
fn default_ban_time() -> Dur {
    Dur(Duration::from_secs(30))
}

/// The validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub general: General,
    pub pool: PoolDefaults,
    pub users: BTreeMap<String, User>,
    pub databases: BTreeMap<String, Database>,
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
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: name.clone(), source })?;
        Config::parse(&text, &name)
    }

    /// Parse and validate TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: origin.to_string(), message: e.to_string() })?;
        let invalid = |span: std::ops::Range<usize>, key: &str, message: String| {
            let (line, col) = line_col(text, span.start);
            ConfigError::Invalid { path: origin.to_string(), line, col, key: key.to_string(), message }
        };
        let mut users = BTreeMap::new();
        for (i, u) in raw.users.into_iter().enumerate() {
            let key = format!("users[{i}]");
            let name = u.name.get_ref().clone();
            if name.is_empty() {
                return Err(invalid(u.name.span(), &format!("{key}.name"), "must not be empty".into()));
            }
            let method = *u.auth_method.get_ref();
            let secret = match &u.password {
                Some(p) => Some(
                    Secret::parse(p.get_ref())
                        .map_err(|e| invalid(p.span(), &format!("{key}.password"), e.to_string()))?,
                ),
                None => None,
            };
            let span = u.password.as_ref().map(|p| p.span()).unwrap_or(u.name.span());
            match (method, &secret) {
                (AuthMethod::Trust, _) => {}
                (_, None) => {
                    return Err(invalid(span, &format!("{key}.password"), format!("user \"{name}\" needs a password for this auth_method")))
                }
                (AuthMethod::ScramSha256, Some(Secret::Md5(_))) => {
                    return Err(invalid(span, &format!("{key}.password"), "an md5 hash cannot verify SCRAM-SHA-256; give the password or its SCRAM verifier, or use auth_method = \"md5\"".into()))
                }
                (AuthMethod::Md5, Some(Secret::Scram(_))) => {
                    return Err(invalid(span, &format!("{key}.password"), "a SCRAM verifier cannot verify md5; give the password or its md5 hash, or use auth_method = \"scram-sha-256\"".into()))
                }
                _ => {}
            }
            if u.pool_size == Some(0) {
                return Err(invalid(u.name.span(), &format!("{key}.pool_size"), "must be at least 1".into()));
            }
            let user = User {
                name: name.clone(),
                secret,
                auth_method: method,
                server_password: u.server_password,
                pool_mode: u.pool_mode,
                pool_size: u.pool_size,
            };
            if users.insert(name.clone(), user).is_some() {
                return Err(invalid(u.name.span(), &format!("{key}.name"), format!("user \"{name}\" is listed twice")));
            }
        }
        let cfg = Config { general: raw.pgmux, pool: raw.pool, users, databases: raw.databases };
        cfg.check(origin)?;
        Ok(cfg)
    }

    fn check(&self, origin: &str) -> Result<(), ConfigError> {
        let err = |key: &str, message: &str| ConfigError::Invalid {
            path: origin.to_string(),
            line: 0,
            col: 0,
            key: key.to_string(),
            message: message.to_string(),
        };
        if self.pool.default_pool_size == 0 {
            return Err(err("pool.default_pool_size", "must be at least 1"));
        }
        if self.pool.min_pool_size > self.pool.default_pool_size {
            return Err(err("pool.min_pool_size", "must not exceed pool.default_pool_size"));
        }
        let g = &self.general;
        if g.tls_mode != ClientTlsMode::Disable && (g.tls_cert_file.is_none() || g.tls_key_file.is_none()) {
            return Err(err("pgmux.tls_mode", "needs tls_cert_file and tls_key_file"));
        }
        if matches!(self.pool.server_tls_mode, ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull)
            && self.pool.server_tls_ca_file.is_none()
        {
            return Err(err("pool.server_tls_mode", "verify-ca and verify-full need server_tls_ca_file"));
        }
        if self.general.max_client_conn == 0 {
            return Err(err("pgmux.max_client_conn", "must be at least 1"));
        }
        if self.pool.server_connect_timeout.0.is_zero() {
            return Err(err("pool.server_connect_timeout", "must be greater than zero"));
        }
        if let Some(u) = &self.general.auth_user {
            if self.monitor_login(u).is_none() {
                return Err(err(
                    "pgmux.auth_user",
                    &format!("\"{u}\" must be a [[users]] entry with a plain-text password or a server_password"),
                ));
            }
        }
        for (key, list) in
            [("pgmux.admin_users", &self.general.admin_users), ("pgmux.stats_users", &self.general.stats_users)]
        {
            if let Some(u) = list.iter().find(|u| !self.users.contains_key(*u)) {
                return Err(err(key, &format!("\"{u}\" is not a [[users]] entry")));
            }
        }
        for (name, db) in &self.databases {
            if db.pool_size == Some(0) {
                return Err(err(&format!("databases.{name}.pool_size"), "must be at least 1"));
            }
            if name == crate::ADMIN_DB {
                return Err(err(&format!("databases.{name}"), "this name is reserved for the admin console"));
            }
            match (&db.primary, db.shards.is_empty()) {
                (Some(_), false) => {
                    return Err(err(&format!("databases.{name}.shards"), "give primary or shards, not both"))
                }
                (None, true) => return Err(err(&format!("databases.{name}.primary"), "missing (or give shards)")),
                (None, false) if !db.replicas.is_empty() => {
                    return Err(err(
                        &format!("databases.{name}.replicas"),
                        "a sharded database lists replicas per shard",
                    ))
                }
                (Some(_), true) if !db.tables.is_empty() || !db.maps.is_empty() => {
                    return Err(err(&format!("databases.{name}.tables"), "tables and maps need shards"))
                }
                _ => {}
            }
            shards::check(name, db).map_err(|(key, message)| err(&key, &message))?;
            if db.max_lag_ms.is_some() && db.max_lag != default_lag() {
                return Err(err(&format!("databases.{name}.max_lag_ms"), "give max_lag or max_lag_ms, not both"));
            }
            if let Some(f) = db.write_functions.iter().find(|f| f.trim().is_empty() || f.contains('(')) {
                return Err(err(
                    &format!("databases.{name}.write_functions"),
                    &format!("\"{f}\" is not a function name (give names without arguments)"),
                ));
            }
            if let Some(m) = &db.monitor_user {
                if self.monitor_login(m).is_none() {
                    return Err(err(
                        &format!("databases.{name}.monitor_user"),
                        &format!("\"{m}\" must be a [[users]] entry with a plain-text password or a server_password"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// (user, password) the lag monitor logs in with.
    pub fn monitor_login(&self, name: &str) -> Option<(String, String)> {
        let u = self.users.get(name)?;
        let pw = match (&u.server_password, &u.secret) {
            (Some(p), _) => p.clone(),
            (None, Some(Secret::Plain(p))) => p.clone(),
            _ => return None,
        };
        Some((u.name.clone(), pw))
    }

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

impl Database {
    /// The time-lag bound: `max_lag_ms` when given, else `max_lag`.
    pub fn lag_bound(&self) -> Duration {
        self.max_lag_ms.map(Duration::from_millis).unwrap_or(self.max_lag.0)
    }

    pub fn server_dbname<'a>(&'a self, key: &'a str) -> &'a str {
        self.dbname.as_deref().unwrap_or(key)
    }

    /// The backend groups behind this database: (name, database with one
    /// primary and its replicas). One for an unsharded database (its own
    /// name); `NAME/SHARD` per shard of a sharded one, with the shard's
    /// servers and every other setting of the database.
    pub fn groups(&self, name: &str) -> Vec<(String, Database)> {
        if self.shards.is_empty() {
            return vec![(name.to_string(), self.clone())];
        }
        self.shards
            .iter()
            .map(|s| {
                let mut db = self.clone();
                db.primary = Some(s.primary.clone());
                db.replicas = s.replicas.clone();
                db.dbname = Some(s.dbname.clone().unwrap_or_else(|| self.server_dbname(name).to_string()));
                db.shards = Vec::new();
                db.tables = Vec::new();
                db.maps = BTreeMap::new();
                (format!("{name}/{}", s.name), db)
            })
            .collect()
    }

    /// The primary of a group (see [`Database::groups`]).
    pub fn primary_addr(&self) -> HostPort {
        self.primary.clone().unwrap_or_else(|| HostPort { host: "invalid".into(), port: 1 })
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

#[cfg(test)]
mod tests;
