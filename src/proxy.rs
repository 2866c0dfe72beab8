//! The listener: accept clients, run their login, hand them to a session.
//!
//! [`Proxy`] holds what all sessions share: the validated config, the
//! pools, the cancel-key registry and the client count.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cancel::CancelRegistry;
use crate::client::Session;
use crate::config::{Config, Database, MapConfig, User};
use crate::login::{self, LoginError, Startup};
use crate::pool::{Pool, Pools};
use crate::protocol::auth::{ScramCredentials, ScramVerifier, Secret};
use crate::protocol::error::{sqlstate, PgError};
use crate::replicas::monitor::{Backend, Monitor, MonitorConfig};
use crate::router::classify::Classifier;
use crate::router::route::{RouteOptions, Routing};
use crate::server::Login;
use crate::shard::directory::{Directory, DirectoryConfig};
use crate::shard::{ShardBackend, ShardRouter};

/// A client must finish its login within this time.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Proxy {
    pub config: Config,
    pub pools: Pools,
    pub cancels: CancelRegistry,
    clients: AtomicUsize,
    /// SCRAM verifiers per user: configured ones, or derived once from a
    /// plain-text password.
    verifiers: HashMap<String, ScramVerifier>,
    /// Lag/health monitors of groups that route reads to replicas.
    monitors: HashMap<String, Arc<Monitor>>,
    /// Statement classifiers of those databases (their write functions).
    classifiers: HashMap<String, Arc<Classifier>>,
    routes: Mutex<HashMap<(String, String), Arc<Routing>>>,
    /// Shard routers of sharded databases, per (database, user).
    sharded: Mutex<HashMap<(String, String), Arc<ShardRouter>>>,
    /// Key directories, per (database, map).
    directories: Mutex<HashMap<(String, String), Arc<Directory>>>,
}

/// A proxy serving in the background (tests, demo).
pub struct RunningProxy {
    pub addr: SocketAddr,
    pub proxy: Arc<Proxy>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningProxy {
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

impl Proxy {
    pub fn new(config: Config) -> Arc<Proxy> {
        let verifiers = config
            .users
            .values()
            .filter_map(|u| Some((u.name.clone(), u.secret.as_ref()?.scram_verifier()?)))
            .collect();
        // Every backend group: a database, or each shard of a sharded one.
        let groups: HashMap<String, Database> =
            config.databases.iter().flat_map(|(name, db)| db.groups(name)).collect();
        let monitors = groups
            .iter()
            .filter(|(_, db)| db.read_routing && !db.replicas.is_empty())
            .filter_map(|(name, db)| {
                let (user, password) = config.monitor_login(db.monitor_user.as_deref()?)?;
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
                };
                let replicas = db.replicas.iter().enumerate().map(|(i, r)| backend(i + 1, &r.addr)).collect();
                Some((name.clone(), Monitor::start(backend(0, &db.primary_addr()), replicas, cfg)))
            })
            .collect::<HashMap<_, _>>();
        let classifiers = monitors
            .keys()
            .filter_map(|name| {
                let db = groups.get(name)?;
                let c = Classifier::new(10_000, &db.write_functions, db.functions_are_writes);
                Some((name.clone(), Arc::new(c)))
            })
            .collect();
        Arc::new(Proxy {
            config,
            pools: Pools::default(),
            cancels: CancelRegistry::default(),
            clients: AtomicUsize::new(0),
            verifiers,
            monitors,
            classifiers,
            routes: Mutex::new(HashMap::new()),
            sharded: Mutex::new(HashMap::new()),
            directories: Mutex::new(HashMap::new()),
        })
    }

    /// The health/lag monitor of a database that routes reads.
    pub fn monitor(&self, database: &str) -> Option<Arc<Monitor>> {
        self.monitors.get(database).cloned()
    }

    /// The shard router of a sharded database (once a client used it).
    pub fn sharding(&self, database: &str) -> Option<Arc<ShardRouter>> {
        let routers = self.sharded.lock().unwrap_or_else(|e| e.into_inner());
        routers.iter().find(|((db, _), _)| db == database).map(|(_, r)| r.clone())
    }

    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Bind the configured address and serve until `stop` turns true.
    pub async fn start(config: Config) -> std::io::Result<RunningProxy> {
        let listen = &config.general.listen;
        let listener = TcpListener::bind((listen.host.as_str(), listen.port)).await?;
        let addr = listener.local_addr()?;
        let proxy = Proxy::new(config);
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(proxy.clone().serve(listener, rx));
        Ok(RunningProxy { addr, proxy, stop, task })
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        tracing::info!(addr = ?listener.local_addr().ok(), "pgmux listening");
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        let proxy = self.clone();
                        tokio::spawn(async move { proxy.handle(stream, peer).await });
                    }
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = stop.changed() => break,
            }
        }
        for pool in self.pools.all() {
            pool.close_idle();
        }
        for monitor in self.monitors.values() {
            monitor.stop();
        }
    }

    async fn handle(self: Arc<Self>, mut stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let count = self.clients.fetch_add(1, Ordering::Relaxed) + 1;
        let _count = ClientCount(&self.clients);
        let mut buf = BytesMut::with_capacity(1024);
        let startup = match tokio::time::timeout(LOGIN_TIMEOUT, login::read_startup(&mut stream, &mut buf)).await {
            Ok(Ok(s)) => s,
            Ok(Err(LoginError::Reply(e))) => return Session::fatal(&mut stream, &e).await,
            Ok(Err(LoginError::Gone)) | Err(_) => return,
        };
        let info = match startup {
            Startup::Cancel { pid, secret } => return self.cancel(pid, secret).await,
            Startup::Login(info) => info,
        };
        if count > self.config.general.max_client_conn {
            let e = PgError::fatal(sqlstate::TOO_MANY_CONNECTIONS, "sorry, too many clients already");
            return Session::fatal(&mut stream, &e).await;
        }
        tracing::debug!(%peer, user = %info.user, database = %info.database, "client login");
        let Some(user) = self.config.users.get(&info.user) else {
            let e = PgError::fatal(sqlstate::INVALID_AUTHORIZATION, format!("role \"{}\" does not exist", info.user));
            return Session::fatal(&mut stream, &e).await;
        };
        let verifier = self.verifiers.get(&user.name);
        let auth =
            tokio::time::timeout(LOGIN_TIMEOUT, login::authenticate(&mut stream, &mut buf, user, verifier)).await;
        let client_key = match auth {
            Ok(Ok(k)) => k,
            Ok(Err(LoginError::Reply(e))) => {
                tracing::info!(%peer, user = %info.user, "login failed: {}", e.message);
                return Session::fatal(&mut stream, &e).await;
            }
            Ok(Err(LoginError::Gone)) | Err(_) => return,
        };
        if info.database == crate::ADMIN_DB {
            let general = &self.config.general;
            let role = if general.admin_users.contains(&user.name) {
                crate::admin::Role::Admin
            } else if general.stats_users.contains(&user.name) {
                crate::admin::Role::Stats
            } else {
                let e = PgError::fatal(
                    sqlstate::INVALID_AUTHORIZATION,
                    format!("user \"{}\" may not use the admin console (admin_users, stats_users)", user.name),
                );
                return Session::fatal(&mut stream, &e).await;
            };
            tracing::info!(%peer, user = %user.name, "admin console login");
            let guard = self.cancels.register();
            return crate::admin::serve(self.clone(), stream, buf, role, guard.key()).await;
        }
        let Some(db) = self.config.databases.get(&info.database) else {
            let e = PgError::fatal(
                sqlstate::INVALID_CATALOG_NAME,
                format!("database \"{}\" does not exist", info.database),
            );
            return Session::fatal(&mut stream, &e).await;
        };
        let backends = self.backends_for(&info.database, db, user);
        let (pool, routing) = (backends[0].primary.clone(), backends[0].routing.clone());
        if let (Some(client_key), Some(Secret::Scram(v))) = (client_key, &user.secret) {
            let creds = ScramCredentials::ClientKey { client_key, verifier: v.clone() };
            for b in &backends {
                for p in b.routing.iter().flat_map(|r| r.replicas.iter()).chain([&b.primary]) {
                    p.learn_scram(creds.clone());
                }
            }
        }
        let guard = self.cancels.register();
        let mut session = Session::new(stream, buf, pool, info.params, guard.slot.clone());
        session.set_routing(routing);
        if !db.shards.is_empty() {
            session.set_sharding(self.shard_router(&info.database, db, user, backends));
        }
        if let Err(e) = session.welcome(guard.key()).await {
            return session.close_with(&e).await;
        }
        session.run().await;
    }

    /// The backend groups of a database for a user: its primary pool and
    /// read routing, one per shard of a sharded database.
    fn backends_for(&self, name: &str, db: &Database, user: &User) -> Vec<ShardBackend> {
        db.groups(name)
            .iter()
            .map(|(group, gdb)| ShardBackend {
                name: group.rsplit('/').next().unwrap_or(group).to_string(),
                primary: self.pool_for(group, gdb, user, 0),
                routing: self.routing_for(group, gdb, user),
            })
            .collect()
    }

    fn shard_router(&self, name: &str, db: &Database, user: &User, backends: Vec<ShardBackend>) -> Arc<ShardRouter> {
        let directories = self.directories_for(name, db);
        let mut routers = self.sharded.lock().unwrap_or_else(|e| e.into_inner());
        routers
            .entry((name.to_string(), user.name.clone()))
            .or_insert_with(|| {
                let router = Arc::new(ShardRouter::new(name, db, backends, &directories));
                if db.two_phase_commit {
                    tokio::spawn(settle_prepared(Arc::downgrade(&router)));
                }
                router
            })
            .clone()
    }

    /// The directories of a sharded database's `directory` maps (started
    /// on first use, shared by every user).
    pub fn directories_for(&self, name: &str, db: &Database) -> HashMap<String, Arc<Directory>> {
        let mut all = self.directories.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = HashMap::new();
        for (map, cfg) in &db.maps {
            let MapConfig::Directory { backend, dbname, table, user, weights, cache_size, .. } = cfg else { continue };
            let login = user.as_deref().or(db.monitor_user.as_deref()).and_then(|u| self.config.monitor_login(u));
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
                    connect_timeout: self.config.pool.server_connect_timeout.0,
                })
            });
            out.insert(map.clone(), dir.clone());
        }
        out
    }

    /// Read routing for (group, user), when the group has replicas and a
    /// lag monitor.
    fn routing_for(&self, name: &str, db: &Database, user: &User) -> Option<Arc<Routing>> {
        let monitor = self.monitors.get(name)?.clone();
        let classifier = self.classifiers.get(name)?.clone();
        let mut routes = self.routes.lock().ok()?;
        let route = routes.entry((name.to_string(), user.name.clone())).or_insert_with(|| {
            let primary = self.pool_for(name, db, user, 0);
            let replicas = (1..=db.replicas.len()).map(|i| self.pool_for(name, db, user, i)).collect();
            Arc::new(Routing::new(name, primary, replicas, monitor, classifier, RouteOptions::of(db)))
        });
        Some(route.clone())
    }

    /// The pool of (database, user) on backend 0 (the primary) or replica
    /// `backend - 1`.
    fn pool_for(&self, name: &str, db: &Database, user: &User, backend: usize) -> Arc<Pool> {
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
            let settings = self.config.pool_settings(db, user);
            Pool::new(key.clone(), user.name.clone(), addr.clone(), settings, login)
        })
    }

    async fn cancel(&self, pid: i32, secret: i32) {
        if let Some((addr, spid, ssecret)) = self.cancels.target(pid, secret) {
            if let Err(e) = crate::server::send_cancel(&addr, spid, ssecret).await {
                tracing::warn!("forwarding cancel to {addr} failed: {e}");
            }
        }
    }
}

struct ClientCount<'a>(&'a AtomicUsize);

impl Drop for ClientCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
