//! Configuration: TOML parsed and validated once, at the edge, into typed
//! structs. Every error names the key, and its position in the file when
//! it was read with one (the checks across keys have none).
//!
//! Shape (see `config/pgmux.toml` for the annotated version):
//! `[pgmux]` process settings, `[pool]` pool defaults, `[[users]]`,
//! `[databases.NAME]` with a `primary` and a `replicas` list.
//!
//! One file per section: `process.rs` (`[pgmux]`), `pool.rs` (`[pool]`
//! and the settings of one pool), `users.rs`, `database.rs` and its
//! [`shards`]; `types.rs` holds the value types they share, `check.rs`
//! the rules across keys, `describe.rs` what `pgmux check-config` prints.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

mod check;
mod database;
mod describe;
mod pool;
mod process;
pub mod shards;
mod types;
mod users;
pub use database::Database;
pub use pool::{PoolDefaults, PoolMode, PoolSettings, ServerTlsMode};
pub use process::{ClientTlsMode, General, LogFormat};
pub use shards::{KeyType, MapConfig, RawKey, Shard, ShardedTable};
pub use types::{
    parse_duration, Dur, HostPort, LoadBalancing, PrimaryReads, ReadYourWrites, Replica, TransactionRouting,
};
use users::RawUser;
pub use users::{AuthMethod, User};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}:{line}:{col}: {key}: {message}")]
    Invalid { path: String, line: usize, col: usize, key: String, message: String },
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

/// The validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub general: General,
    pub pool: PoolDefaults,
    pub users: BTreeMap<String, User>,
    pub databases: BTreeMap<String, Database>,
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
        let users = users::resolve(raw.users, invalid)?;
        let cfg = Config { general: raw.pgmux, pool: raw.pool, users, databases: raw.databases };
        cfg.check(origin)?;
        Ok(cfg)
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
