//! Everything the config determines, as one immutable snapshot: the
//! validated [`Config`], TLS toward clients and servers, the SCRAM
//! verifiers, the lag monitors and statement classifiers of the groups
//! that route reads, and (built from them on first use) the read routing
//! and shard routers of each (database, user).
//!
//! [`crate::proxy::Proxy`] holds the snapshot in force in an
//! [`ArcSwap`]; a reload ([`crate::ops::reload`]) builds a whole new one
//! and swaps it in one store, so a login or a transaction sees either the
//! old snapshot or the new one, never a mix (new TLS with old
//! classifiers). A login reads one snapshot; a session keeps the one its
//! backends came from and looks for a newer one at each transaction
//! boundary (one atomic load).
//!
//! What outlives a snapshot (pools and their server connections, key
//! directories, PAUSE, metrics) is the proxy's, not the snapshot's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::backend::replicas::monitor::{Backend, Monitor, MonitorConfig};
use crate::config::{Config, Database, HostPort};
use crate::protocol::auth::ScramVerifier;
use crate::protocol::tls::{ClientTls, ServerTls, TlsError};
use crate::router::route::Routing;
use crate::shard::schema::Columns;
use crate::shard::ShardRouter;
use crate::sql::classify::Classifier;

/// The cell holding the snapshot in force (shared by the proxy and every
/// session, which load it at their transaction boundaries).
pub type Current = Arc<ArcSwap<Topology>>;

/// Per (database or group, user): built once per snapshot, on first use.
type PerUser<T> = Mutex<HashMap<(String, String), Arc<T>>>;

/// One config's world (see the module docs).
pub struct Topology {
    pub config: Arc<Config>,
    pub client_tls: Arc<ClientTls>,
    pub server_tls: Arc<ServerTls>,
    /// SCRAM verifiers per user: configured ones, or derived once from a
    /// plain-text password.
    verifiers: HashMap<String, ScramVerifier>,
    /// Lag/health monitors of the groups that route reads to replicas.
    monitors: HashMap<String, Arc<Monitor>>,
    /// Statement classifiers of those groups (their write functions).
    classifiers: HashMap<String, Arc<Classifier>>,
    /// Read routing per (group, user).
    routes: PerUser<Routing>,
    /// Shard routers of sharded databases, per (database, user).
    sharded: PerUser<ShardRouter>,
    /// What the routers of a sharded database (every user's) know of its
    /// schema, per database.
    schemas: Mutex<HashMap<String, Arc<Columns>>>,
}

impl Topology {
    /// The snapshot of `config`; TLS files are read now (a failure builds
    /// nothing). With `old`, a group whose monitor would be built alike
    /// keeps the old one (its samples and bans).
    pub fn new(config: Config, old: Option<&Topology>) -> Result<Topology, TlsError> {
        let g = &config.general;
        let client_tls = ClientTls::new(g.tls_mode, g.tls_cert_file.as_deref(), g.tls_key_file.as_deref())?;
        let server_tls = ServerTls::new(config.pool.server_tls_mode, config.pool.server_tls_ca_file.as_deref())?;
        let server_tls = Arc::new(server_tls);
        let verifiers = config
            .users
            .values()
            .filter_map(|u| Some((u.name.clone(), u.secret.as_ref()?.scram_verifier()?)))
            .collect();
        let groups = groups(&config);
        let old = old.map(|o| (o, self::groups(&o.config)));
        let monitors: HashMap<_, _> = groups
            .iter()
            .filter(|(_, db)| db.read_routing && !db.replicas.is_empty())
            .filter_map(|(name, db)| {
                let reused = old.as_ref().and_then(|(o, was)| o.same_monitor(was.get(name)?, &config, name, db));
                Some((name.clone(), reused.or_else(|| start_monitor(&config, name, db, &server_tls))?))
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
        Ok(Topology {
            config: Arc::new(config),
            client_tls: Arc::new(client_tls),
            server_tls,
            verifiers,
            monitors,
            classifiers,
            routes: Mutex::default(),
            sharded: Mutex::default(),
            schemas: Mutex::default(),
        })
    }

    /// This snapshot's monitor of group `name` (`was` in this config),
    /// when the new config would build the same one (same group, monitor
    /// login and connect timeout).
    fn same_monitor(&self, was: &Database, config: &Config, name: &str, db: &Database) -> Option<Arc<Monitor>> {
        let old = &self.config;
        let login = |c: &Config, d: &Database| d.monitor_user.as_deref().and_then(|u| c.monitor_login(u));
        let same = was == db
            && login(old, was) == login(config, db)
            && old.pool.server_connect_timeout == config.pool.server_connect_timeout;
        same.then(|| self.monitors.get(name).cloned()).flatten()
    }

    /// Stop the monitors `next` does not keep (after it is in force).
    pub fn stop_monitors_not_in(&self, next: &Topology) {
        for (name, m) in &self.monitors {
            if next.monitors.get(name).is_none_or(|n| !Arc::ptr_eq(n, m)) {
                m.stop();
            }
        }
    }

    /// The SCRAM verifier of `user`, when its secret gives one.
    pub fn verifier(&self, user: &str) -> Option<ScramVerifier> {
        self.verifiers.get(user).cloned()
    }

    /// The health/lag monitor of a group that routes reads.
    pub fn monitor(&self, group: &str) -> Option<Arc<Monitor>> {
        self.monitors.get(group).cloned()
    }

    /// Every lag monitor, by backend group, in name order.
    pub fn monitors(&self) -> Vec<(String, Arc<Monitor>)> {
        let mut all: Vec<_> = self.monitors.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The classifier of a group that routes reads.
    pub fn classifier(&self, group: &str) -> Option<Arc<Classifier>> {
        self.classifiers.get(group).cloned()
    }

    /// The read routing of (group, user), made by `make` on first use.
    pub fn route(&self, group: &str, user: &str, make: impl FnOnce() -> Arc<Routing>) -> Arc<Routing> {
        memo(&self.routes, group, user, make)
    }

    /// The shard router of (database, user), made by `make` on first use.
    pub fn shard_router(&self, db: &str, user: &str, make: impl FnOnce() -> Arc<ShardRouter>) -> Arc<ShardRouter> {
        memo(&self.sharded, db, user, make)
    }

    /// The schema knowledge every user's router of sharded database `db`
    /// shares (a schema change through one is seen by all).
    pub fn schema(&self, db: &str) -> Arc<Columns> {
        let mut all = self.schemas.lock().unwrap_or_else(|e| e.into_inner());
        all.entry(db.to_string()).or_default().clone()
    }

    /// The shard router of a sharded database (once a client used it).
    pub fn sharding(&self, database: &str) -> Option<Arc<ShardRouter>> {
        let routers = self.sharded.lock().unwrap_or_else(|e| e.into_inner());
        routers.iter().find(|((db, _), _)| db == database).map(|(_, r)| r.clone())
    }
}

fn memo<T>(map: &PerUser<T>, a: &str, b: &str, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    map.entry((a.to_string(), b.to_string())).or_insert_with(make).clone()
}

/// Every backend group (a database, or each shard of a sharded one).
pub fn groups(config: &Config) -> HashMap<String, Database> {
    config.databases.iter().flat_map(|(name, db)| db.groups(name)).collect()
}

/// Start the lag monitor of group `name` (None: it has no usable login).
fn start_monitor(config: &Config, name: &str, db: &Database, tls: &Arc<ServerTls>) -> Option<Arc<Monitor>> {
    let (user, password) = config.monitor_login(db.monitor_user.as_deref()?)?;
    let backend = |i: usize, hp: &HostPort| Backend {
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
    Some(Monitor::start(backend(0, &db.primary_addr()), replicas, cfg))
}
