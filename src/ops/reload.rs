//! Hot reload (SIGHUP, or `RELOAD` in the admin console): the config file
//! is read and validated again; an invalid one is refused (logged, and
//! the old config stays). A valid one takes effect without dropping a
//! client:
//!
//! - pools whose backend group, user or pool defaults changed are retired:
//!   their idle server connections close at once, the others when their
//!   transaction ends; pools made afresh from the new config take new
//!   checkouts (so new sizes, timeouts, addresses and passwords apply);
//! - lag monitors are rebuilt for groups whose config changed (replicas
//!   added, removed or reweighted) and stopped for groups removed; read
//!   routing and shard routers are rebuilt from the new config, and
//!   directories whose map changed restart;
//! - every session picks up the new pools at its next transaction
//!   boundary; a session whose database or user was removed ends there
//!   with an error.

use std::collections::HashMap;
use std::sync::Arc;

use crate::backend::replicas::monitor::{Backend, Monitor, MonitorConfig};
use crate::config::{Config, ConfigError, Database};
use crate::protocol::auth::ScramVerifier;
use crate::protocol::tls::ServerTls;
use crate::proxy::Proxy;
use crate::sql::classify::Classifier;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("pgmux was not started from a config file")]
    NoFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] crate::protocol::tls::TlsError),
}

/// SCRAM verifiers per user: configured ones, or derived once from a
/// plain-text password.
pub fn verifiers(config: &Config) -> HashMap<String, ScramVerifier> {
    config.users.values().filter_map(|u| Some((u.name.clone(), u.secret.as_ref()?.scram_verifier()?))).collect()
}

/// Every backend group (a database, or each shard of a sharded one).
fn groups(config: &Config) -> HashMap<String, Database> {
    config.databases.iter().flat_map(|(name, db)| db.groups(name)).collect()
}

type Monitors = HashMap<String, Arc<Monitor>>;
type Classifiers = HashMap<String, Arc<Classifier>>;

/// Lag monitors and statement classifiers of the groups that route reads
/// to replicas. With `old` (the previous config and its monitors), a
/// group whose config did not change keeps its monitor.
pub fn topology(config: &Config, old: Option<(&Config, &Monitors)>, tls: &Arc<ServerTls>) -> (Monitors, Classifiers) {
    let groups = groups(config);
    let old_groups = old.map(|(c, _)| groups_and_login(c));
    let monitors: Monitors = groups
        .iter()
        .filter(|(_, db)| db.read_routing && !db.replicas.is_empty())
        .filter_map(|(name, db)| {
            let login = config.monitor_login(db.monitor_user.as_deref()?)?;
            let unchanged = old_groups.as_ref().is_some_and(|(g, t)| {
                g.get(name).is_some_and(|(d, l)| d == db && l.as_ref() == Some(&login))
                    && *t == config.pool.server_connect_timeout
            });
            if let (true, Some((_, monitors))) = (unchanged, old) {
                if let Some(m) = monitors.get(name) {
                    return Some((name.clone(), m.clone()));
                }
            }
            let (user, password) = login;
            let backend = |i: usize, hp: &crate::config::HostPort| Backend {
                name: if i == 0 { format!("{name}/primary") } else { format!("{name}/replica{i}") },
                host: hp.host.clone(),
                port: hp.port,
            };
            let cfg = MonitorConfig {
                check_interval: db.check_interval.0,
                max_lag_bytes: Some(db.max_lag_bytes),
                max_lag: Some(db.lag_bound()),
                ban_time: db.ban_time.0,
                connect_timeout: config.pool.server_connect_timeout.0,
                user,
                password,
                dbname: db.server_dbname(name).to_string(),
                tls: tls.clone(),
            };
            let replicas = db.replicas.iter().enumerate().map(|(i, r)| backend(i + 1, &r.addr)).collect();
            Some((name.clone(), Monitor::start(backend(0, &db.primary_addr()), replicas, cfg)))
        })
        .collect();
    let classifiers = monitors
        .keys()
        .filter_map(|name| {
            let db = groups.get(name)?;
            let c = Classifier::new(10_000, &db.write_functions, db.functions_are_writes);
            Some((name.clone(), Arc::new(c)))
        })
        .collect();
    (monitors, classifiers)
}

type GroupLogins = HashMap<String, (Database, Option<(String, String)>)>;

/// Groups with their monitor logins, and the connect timeout.
fn groups_and_login(config: &Config) -> (GroupLogins, crate::config::Dur) {
    let g = groups(config)
        .into_iter()
        .map(|(name, db)| {
            let login = db.monitor_user.as_deref().and_then(|u| config.monitor_login(u));
            (name, (db, login))
        })
        .collect();
    (g, config.pool.server_connect_timeout)
}

impl Proxy {
    /// Remember the config file, for RELOAD and SIGHUP.
    pub fn set_config_path(&self, path: impl Into<std::path::PathBuf>) {
        *self.config_path.lock().unwrap_or_else(|e| e.into_inner()) = Some(path.into());
    }

    /// Re-read the config file and apply it; an invalid file changes
    /// nothing (the error is returned and logged).
    pub fn reload(&self) -> Result<(), ReloadError> {
        let path = self.config_path.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or(ReloadError::NoFile)?;
        let applied = Config::load(&path).map_err(ReloadError::from).and_then(|c| self.apply_config(c));
        if let Err(e) = &applied {
            tracing::error!("config not reloaded, the old one stays: {e}");
        }
        applied
    }

    /// Put a validated config in force (see the module docs); its TLS
    /// files are read first (a failure changes nothing).
    pub fn apply_config(&self, new: Config) -> Result<(), ReloadError> {
        let (client_tls, server_tls) = crate::proxy::tls_of(&new)?;
        let server_tls = Arc::new(server_tls);
        *self.client_tls.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(client_tls);
        *self.server_tls.write().unwrap_or_else(|e| e.into_inner()) = server_tls.clone();
        let old = self.config();
        if new.general.listen != old.general.listen || new.general.metrics_listen != old.general.metrics_listen {
            tracing::warn!("listen addresses change only at restart");
        }
        let (old_groups, new_groups) = (groups(&old), groups(&new));
        let retired = self.pools.retire(|p| {
            let group = p.database.split('#').next().unwrap_or(&p.database);
            let same_group = old_groups.get(group).is_some_and(|d| new_groups.get(group) == Some(d));
            let same_user = old.users.get(&p.user).is_some_and(|u| new.users.get(&p.user) == Some(u));
            !(same_group && same_user && old.pool == new.pool)
        });
        let (monitors, classifiers) = {
            let current = self.monitors.read().unwrap_or_else(|e| e.into_inner());
            topology(&new, Some((&old, &current)), &server_tls)
        };
        {
            let mut current = self.monitors.write().unwrap_or_else(|e| e.into_inner());
            for (name, m) in current.iter() {
                if monitors.get(name).is_none_or(|n| !Arc::ptr_eq(n, m)) {
                    m.stop();
                }
            }
            *current = monitors;
        }
        *self.classifiers.write().unwrap_or_else(|e| e.into_inner()) = classifiers;
        *self.verifiers.write().unwrap_or_else(|e| e.into_inner()) = verifiers(&new);
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.sharded.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.directories.lock().unwrap_or_else(|e| e.into_inner()).retain(|(db, map), d| {
            let same = old.databases.get(db).and_then(|x| x.maps.get(map))
                == new.databases.get(db).and_then(|x| x.maps.get(map));
            if !same {
                d.stop();
            }
            same
        });
        self.set_config(new);
        self.epoch.send_modify(|e| *e += 1);
        tracing::info!(retired_pools = retired, "config reloaded");
        Ok(())
    }
}
