//! What all sessions share: [`Proxy`] holds the config's snapshot in
//! force ([`crate::topology`]: config, TLS, verifiers, monitors,
//! classifiers, routing), and what outlives a snapshot: the pools, the key
//! directories, the cancel-key registry, the client list and count, PAUSE
//! and shutdown. It builds each session's backends from a snapshot. The
//! listener that accepts clients is [`crate::frontend::listener`];
//! [`Proxy::start`] runs it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backend::pool::Pool;
use crate::backend::pools::Pools;
use crate::backend::replicas::monitor::Monitor;
use crate::backend::server::Login;
use crate::config::{Config, Database, MapConfig, User};
use crate::frontend::cancel::CancelRegistry;
use crate::ops::metrics::Metrics;
use crate::protocol::auth::Secret;
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::tls::TlsError;
use crate::router::route::{RouteOptions, Routing};
use crate::shard::directory::{Directory, DirectoryConfig};
use crate::shard::{ShardBackend, ShardRouter};
use crate::topology::{Current, Topology};

pub struct Proxy {
    /// The config's snapshot in force (swapped whole by a reload).
    topology: Current,
    /// The file the config came from (RELOAD / SIGHUP re-read it).
    pub(crate) config_path: Mutex<Option<std::path::PathBuf>>,
    /// Held by a reload while it builds and swaps in a snapshot.
    pub(crate) reloading: Mutex<()>,
    pub pools: Pools,
    pub metrics: Arc<Metrics>,
    pub cancels: CancelRegistry,
    pub(crate) clients: AtomicUsize,
    /// The clients connected now.
    pub sessions: crate::frontend::registry::Clients,
    pub started: std::time::Instant,
    /// Databases whose new transactions are held (PAUSE).
    pub(crate) paused: Mutex<std::collections::HashSet<String>>,
    /// Set when pgmux shuts down: no new clients, sessions end at their
    /// next transaction boundary.
    pub(crate) draining: watch::Sender<bool>,
    /// Key directories, per (database, map): kept across reloads that do
    /// not change their map.
    pub(crate) directories: Mutex<HashMap<(String, String), Arc<Directory>>>,
}

/// A proxy serving in the background (tests, demo).
pub struct RunningProxy {
    pub addr: SocketAddr,
    /// The metrics endpoint's address, when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    pub proxy: Arc<Proxy>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    metrics_task: Option<JoinHandle<()>>,
}

impl RunningProxy {
    pub async fn stop(self) {
        if let Some(t) = &self.metrics_task {
            t.abort();
        }
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

impl Proxy {
    pub fn new(config: Config) -> Result<Arc<Proxy>, TlsError> {
        // The process's id maker takes this node id (see shard::ids).
        crate::shard::ids::unique_ids(config.general.node_id);
        let topology = Topology::new(config, None)?;
        Ok(Arc::new(Proxy {
            topology: Arc::new(ArcSwap::from_pointee(topology)),
            config_path: Mutex::new(None),
            reloading: Mutex::new(()),
            pools: Pools::default(),
            metrics: Arc::new(Metrics::new()),
            cancels: CancelRegistry::default(),
            clients: AtomicUsize::new(0),
            sessions: Default::default(),
            started: std::time::Instant::now(),
            paused: Mutex::new(Default::default()),
            draining: watch::Sender::new(false),
            directories: Mutex::new(HashMap::new()),
        }))
    }

    /// The config's snapshot in force now.
    pub fn topology(&self) -> Arc<Topology> {
        self.topology.load_full()
    }

    /// The cell a session watches for a newer snapshot.
    pub(crate) fn current(&self) -> &Current {
        &self.topology
    }

    /// Put a new snapshot in force; the old one is returned.
    pub(crate) fn swap_topology(&self, next: Arc<Topology>) -> Arc<Topology> {
        self.topology.swap(next)
    }

    /// The config in force now.
    pub fn config(&self) -> Arc<Config> {
        self.topology.load().config.clone()
    }

    /// The health/lag monitor of a group that routes reads.
    pub fn monitor(&self, group: &str) -> Option<Arc<Monitor>> {
        self.topology.load().monitor(group)
    }

    /// Every lag monitor, by backend group.
    pub fn monitors(&self) -> Vec<(String, Arc<Monitor>)> {
        self.topology.load().monitors()
    }

    /// The metrics text, its gauges sampled now.
    pub fn render_metrics(&self) -> Vec<u8> {
        let m = &self.metrics;
        let pools = self.pools.all();
        let waiting: usize = pools.iter().map(|p| p.stats.waiting.load(Ordering::Relaxed)).sum();
        let active: usize = pools.iter().map(|p| p.in_use()).sum();
        let total = self.client_count();
        m.clients.with_label_values(&["active"]).set(active as i64);
        m.clients.with_label_values(&["waiting"]).set(waiting as i64);
        m.clients.with_label_values(&["idle"]).set(total.saturating_sub(active + waiting) as i64);
        let mut per_backend: HashMap<&str, (usize, usize)> = HashMap::new();
        for p in &pools {
            let e = per_backend.entry(p.database.as_str()).or_default();
            e.0 += p.in_use();
            e.1 += p.idle_count();
        }
        for (backend, (used, idle)) in per_backend {
            m.server_connections.with_label_values(&[backend, "active"]).set(used as i64);
            m.server_connections.with_label_values(&[backend, "idle"]).set(idle as i64);
        }
        for (group, monitor) in self.monitors() {
            for (b, s) in monitor.snapshot() {
                let labels = [group.as_str(), b.name.as_str()];
                let healthy = s.reachable && !Monitor::is_banned(&s);
                m.replica_healthy.with_label_values(&labels).set(if healthy { 1.0 } else { 0.0 });
                if let Some(bytes) = s.lag_bytes {
                    m.replica_lag_bytes.with_label_values(&labels).set(bytes as f64);
                }
                if let Some(lag) = s.lag {
                    m.replica_lag_seconds.with_label_values(&labels).set(lag.as_secs_f64());
                }
            }
        }
        let dirs = self.directories.lock().unwrap_or_else(|e| e.into_inner());
        for ((db, map), d) in dirs.iter() {
            let (hits, misses) = d.cache_counts();
            for (result, n) in [("hit", hits), ("miss", misses)] {
                let c = m.directory_cache.with_label_values(&[db, map, result]);
                c.inc_by(n.saturating_sub(c.get()));
            }
        }
        drop(dirs);
        m.render()
    }

    /// The shard router of a sharded database (once a client used it).
    pub fn sharding(&self, database: &str) -> Option<Arc<ShardRouter>> {
        self.topology.load().sharding(database)
    }

    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Bind the configured address and serve until `stop` turns true.
    pub async fn start(config: Config) -> std::io::Result<RunningProxy> {
        let listen = &config.general.listen;
        let listener = TcpListener::bind((listen.host.as_str(), listen.port)).await?;
        let addr = listener.local_addr()?;
        let metrics = match &config.general.metrics_listen {
            Some(m) => Some(TcpListener::bind((m.host.as_str(), m.port)).await?),
            None => None,
        };
        let proxy = Proxy::new(config).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let mut metrics_addr = None;
        let mut metrics_task = None;
        if let Some(listener) = metrics {
            metrics_addr = listener.local_addr().ok();
            let weak = Arc::downgrade(&proxy);
            let render = Arc::new(move || weak.upgrade().map(|p| p.render_metrics()).unwrap_or_default());
            metrics_task = Some(tokio::spawn(crate::ops::metrics::serve(listener, render)));
        }
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(proxy.clone().serve(listener, rx));
        Ok(RunningProxy { addr, metrics_addr, proxy, stop, task, metrics_task })
    }

    /// What a session of `user` on database `name` uses in snapshot
    /// `topo`: its backend groups (primary pool and read routing; one per
    /// shard), and the shard router of a sharded database.
    pub(crate) fn session_backends(
        &self,
        topo: &Topology,
        name: &str,
        user: &User,
    ) -> Result<(Vec<ShardBackend>, Option<Arc<ShardRouter>>), PgError> {
        let Some(db) = topo.config.databases.get(name) else {
            return Err(PgError::fatal(sqlstate::INVALID_CATALOG_NAME, format!("database \"{name}\" does not exist")));
        };
        let backends = self.backends_for(topo, name, db, user);
        let sharding = (!db.shards.is_empty()).then(|| self.shard_router(topo, name, db, user, backends.clone()));
        Ok((backends, sharding))
    }

    /// The backend groups of a database for a user: its primary pool and
    /// read routing, one per shard of a sharded database.
    fn backends_for(&self, topo: &Topology, name: &str, db: &Database, user: &User) -> Vec<ShardBackend> {
        db.groups(name)
            .iter()
            .map(|(group, gdb)| ShardBackend {
                name: group.rsplit('/').next().unwrap_or(group).to_string(),
                primary: self.pool_for(topo, group, gdb, user, 0),
                routing: self.routing_for(topo, group, gdb, user),
            })
            .collect()
    }

    fn shard_router(
        &self,
        topo: &Topology,
        name: &str,
        db: &Database,
        user: &User,
        backends: Vec<ShardBackend>,
    ) -> Arc<ShardRouter> {
        let directories = self.directories_for(topo, name, db);
        let schema = topo.schema(name);
        topo.shard_router(name, &user.name, || {
            let router = Arc::new(ShardRouter::new(name, db, backends, &directories, schema));
            if db.two_phase_commit {
                tokio::spawn(settle_prepared(Arc::downgrade(&router)));
            }
            router
        })
    }

    /// The directories of a sharded database's `directory` maps (started
    /// on first use, shared by every user).
    pub fn directories_for(&self, topo: &Topology, name: &str, db: &Database) -> HashMap<String, Arc<Directory>> {
        let mut all = self.directories.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = HashMap::new();
        for (map, cfg) in &db.maps {
            let MapConfig::Directory { backend, dbname, table, user, weights, cache_size, .. } = cfg else { continue };
            let login = user.as_deref().or(db.monitor_user.as_deref()).and_then(|u| topo.config.monitor_login(u));
            let Some((user, password)) = login else {
                tracing::error!(database = name, map = %map, "shard directory: no usable login");
                continue;
            };
            let dir = all.entry((name.to_string(), map.clone())).or_insert_with(|| {
                Directory::start(DirectoryConfig {
                    map: map.clone(),
                    host: backend.host.clone(),
                    port: backend.port,
                    user,
                    password,
                    dbname: dbname.clone().unwrap_or_else(|| db.server_dbname(name).to_string()),
                    table: table.clone(),
                    shards: db
                        .shards
                        .iter()
                        .map(|s| (s.name.clone(), weights.get(&s.name).copied().unwrap_or(1)))
                        .collect(),
                    cache_size: *cache_size,
                    connect_timeout: topo.config.pool.server_connect_timeout.0,
                    tls: topo.server_tls.clone(),
                })
            });
            out.insert(map.clone(), dir.clone());
        }
        out
    }

    /// Read routing for (group, user), when the group has replicas and a
    /// lag monitor.
    fn routing_for(&self, topo: &Topology, name: &str, db: &Database, user: &User) -> Option<Arc<Routing>> {
        let monitor = topo.monitor(name)?;
        let classifier = topo.classifier(name)?;
        Some(topo.route(name, &user.name, || {
            let primary = self.pool_for(topo, name, db, user, 0);
            let replicas = (1..=db.replicas.len()).map(|i| self.pool_for(topo, name, db, user, i)).collect();
            Arc::new(Routing::new(name, primary, replicas, monitor, classifier, RouteOptions::of(db)))
        }))
    }

    /// The pool of (database, user) on backend 0 (the primary) or replica
    /// `backend - 1`.
    fn pool_for(&self, topo: &Topology, name: &str, db: &Database, user: &User, backend: usize) -> Arc<Pool> {
        let (key, addr) = match backend {
            0 => (name.to_string(), &db.primary_addr()),
            i => (format!("{name}#replica{i}"), &db.replicas[i - 1].addr),
        };
        self.pools.get_or_create(&key, &user.name, || {
            let plain = match &user.secret {
                Some(Secret::Plain(p)) => Some(p.clone()),
                _ => None,
            };
            let login = Login {
                user: user.name.clone(),
                database: db.server_dbname(name).to_string(),
                password: user.server_password.clone().or(plain),
                md5_hash: match &user.secret {
                    Some(Secret::Md5(h)) if user.server_password.is_none() => Some(h.clone()),
                    _ => None,
                },
                scram: None,
            };
            let settings = topo.config.pool_settings(db, user);
            let route = match backend {
                0 if name.contains('/') => "shard",
                0 => "primary",
                _ => "replica",
            };
            let metrics = self.metrics.pool(route, &key);
            let invalidations = self.pools.invalidations(&login.database);
            let tls = topo.server_tls.clone();
            let pool = Pool::new(key.clone(), user.name.clone(), addr.clone(), settings, login, metrics, tls);
            pool.share_invalidations(invalidations);
            if self.is_paused(&key) {
                pool.pause(true);
            }
            pool
        })
    }
}

/// Settle, every so often, the prepared transactions a pgmux that died
/// mid-commit left on a sharded database (two-phase commit).
async fn settle_prepared(router: std::sync::Weak<ShardRouter>) {
    use crate::shard::twophase::{RECOVERY_EVERY, RECOVERY_GRACE};
    loop {
        let Some(r) = router.upgrade() else { return };
        if let Err(e) = r.recover_prepared(RECOVERY_GRACE).await {
            tracing::warn!(database = %r.name, "settling prepared transactions: {e}");
        }
        drop(r);
        tokio::time::sleep(RECOVERY_EVERY).await;
    }
}
