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
//! - all of it is one new snapshot ([`crate::topology`]) swapped in at
//!   once: a login sees the old config or the new, never parts of both;
//! - every session picks up the new snapshot (and its pools) at its next
//!   transaction boundary; a session whose database or user was removed
//!   ends there with an error.

use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::proxy::Proxy;
use crate::topology::{groups, Topology};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("pgmux was not started from a config file")]
    NoFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] crate::protocol::tls::TlsError),
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

    /// Put a validated config in force (see the module docs): a whole new
    /// snapshot, its TLS files read first (a failure changes nothing),
    /// swapped in at once.
    pub fn apply_config(&self, new: Config) -> Result<(), ReloadError> {
        // One reload at a time: each builds on the snapshot in force.
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.topology();
        let next = Arc::new(Topology::new(new, Some(&old))?);
        let (oc, nc) = (&old.config, &next.config);
        if nc.general.listen != oc.general.listen || nc.general.metrics_listen != oc.general.metrics_listen {
            tracing::warn!("listen addresses change only at restart");
        }
        let (old_groups, new_groups) = (groups(oc), groups(nc));
        let retired = self.pools.retire(|p| {
            let group = p.database.split('#').next().unwrap_or(&p.database);
            let same_group = old_groups.get(group).is_some_and(|d| new_groups.get(group) == Some(d));
            let same_user = oc.users.get(&p.user).is_some_and(|u| nc.users.get(&p.user) == Some(u));
            !(same_group && same_user && oc.pool == nc.pool)
        });
        self.directories.lock().unwrap_or_else(|e| e.into_inner()).retain(|(db, map), d| {
            let same = oc.databases.get(db).and_then(|x| x.maps.get(map))
                == nc.databases.get(db).and_then(|x| x.maps.get(map));
            if !same {
                d.stop();
            }
            same
        });
        let replaced = self.swap_topology(next.clone());
        replaced.stop_monitors_not_in(&next);
        tracing::info!(retired_pools = retired, "config reloaded");
        Ok(())
    }
}
