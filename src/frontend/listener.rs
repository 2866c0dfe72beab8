//! The listener: accepts client connections, runs each login (startup
//! packet, TLS, authentication, the user found in the config or by
//! `auth_query`), forwards cancel requests, hands admin-console logins to
//! [`crate::ops::admin`], and starts each logged-in client's session in a
//! task of its own.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::User;
use crate::frontend::authquery;
use crate::frontend::login::{self, LoginError, Startup, StartupInfo};
use crate::frontend::registry::Registered;
use crate::frontend::session::{Refresh, Session};
use crate::ops::admin;
use crate::protocol::auth::{ScramCredentials, Secret};
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::tls::ClientStream;
use crate::proxy::Proxy;
use crate::topology::Topology;

/// A login refused after authentication: the client's stream and why.
type Refused = Box<(ClientStream, PgError)>;

impl Proxy {
    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        tracing::info!(addr = ?listener.local_addr().ok(), "pgmux listening");
        let mut draining = self.draining.subscribe();
        loop {
            tokio::select! {
                _ = async { let _ = draining.wait_for(|d| *d).await; } => break,
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
        for (_, monitor) in self.monitors() {
            monitor.stop();
        }
    }

    async fn handle(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let count = ClientCount::new(self.clone());
        let mut buf = BytesMut::with_capacity(1024);
        // One snapshot of the config for the whole login.
        let topo = self.topology();
        // One deadline for the whole login: startup, TLS, authentication.
        let deadline = tokio::time::Instant::now() + topo.config.general.client_login_timeout.0;
        let (mut stream, startup) =
            match tokio::time::timeout_at(deadline, Box::pin(login::accept(tcp, &mut buf, &topo.client_tls))).await {
                Ok((Some(stream), startup)) => (stream, startup),
                Ok((None, _)) | Err(_) => return,
            };
        let startup = match startup {
            Ok(s) => s,
            Err(LoginError::Reply(e)) => return Session::fatal(&mut stream, &e).await,
            Err(LoginError::Gone) => return,
        };
        let info = match startup {
            Startup::Cancel { pid, secret } => return self.cancel(pid, secret).await,
            Startup::Login(info) => info,
        };
        let config = &topo.config;
        if count.0 > config.general.max_client_conn {
            let e = PgError::fatal(sqlstate::TOO_MANY_CONNECTIONS, "sorry, too many clients already");
            return Session::fatal(&mut stream, &e).await;
        }
        tracing::debug!(%peer, user = %info.user, database = %info.database, "client login");
        let user = match self.find_user(&topo, &info).await {
            Ok(user) => user,
            Err(e) => return Session::fatal(&mut stream, &e).await,
        };
        let user = &user;
        let verifier = topo.verifier(&user.name).or_else(|| user.secret.as_ref().and_then(|s| s.scram_verifier()));
        let auth = tokio::time::timeout_at(
            deadline,
            Box::pin(login::authenticate(&mut stream, &mut buf, user, verifier.as_ref())),
        )
        .await;
        let client_key = match auth {
            Ok(Ok(k)) => k,
            Ok(Err(LoginError::Reply(e))) => {
                tracing::info!(%peer, user = %info.user, "login failed: {}", e.message);
                return Session::fatal(&mut stream, &e).await;
            }
            Ok(Err(LoginError::Gone)) | Err(_) => return,
        };
        if info.database == crate::ADMIN_DB {
            return Box::pin(self.serve_admin(stream, buf, &info, user, peer)).await;
        }
        // The session is a task of its own: the login's state does not stay
        // in every idle client's task.
        let client = Box::new(LoggedIn { stream, buf, info, user: user.clone(), client_key, peer });
        tokio::spawn(self.clone().serve_client(client, topo, count));
    }

    /// Serve a logged-in client until it leaves (`_count`: it counts as
    /// connected until then).
    async fn serve_client(self: Arc<Self>, client: Box<LoggedIn>, topo: Arc<Topology>, _count: ClientCount) {
        // The login's box goes in and is freed there (moved out of here,
        // its room would stay allocated for as long as the client stays);
        // the session comes back boxed (this future keeps both the match's
        // result and its binding: a session inline would be here twice).
        let (mut session, _registered) = match self.open_session(client, topo) {
            Ok(opened) => opened,
            Err(refused) => {
                let (mut stream, e) = *refused;
                return Box::pin(async move { Session::fatal(&mut stream, &e).await }).await;
            }
        };
        // The client's cancel key, registered until it leaves. Boxed (it
        // may open a server connection), as the refusal: a future's
        // largest state stays with an idle session for good.
        let _key = match Box::pin(session.welcome(&self.cancels)).await {
            Ok(key) => key,
            Err(e) => return Box::pin(session.close_with(&e)).await,
        };
        session.run().await;
    }

    /// The session of a client just logged in, set up for its database and
    /// user, and its entry in the client list (no await: what login left
    /// is gone before the session is served).
    fn open_session(
        self: &Arc<Self>,
        client: Box<LoggedIn>,
        topo: Arc<Topology>,
    ) -> Result<(Box<Session>, Registered<'_>), Refused> {
        let LoggedIn { stream, buf, info, user, client_key, peer } = *client;
        let config = &topo.config;
        let (backends, sharding) = match self.session_backends(&topo, &info.database, &user) {
            Ok(b) => b,
            Err(e) => return Err(Box::new((stream, e))),
        };
        let (pool, routing) = (backends[0].primary.clone(), backends[0].routing.clone());
        let scram = match (client_key, &user.secret) {
            (Some(client_key), Some(Secret::Scram(v))) => {
                Some(ScramCredentials::ClientKey { client_key, verifier: v.clone() })
            }
            _ => None,
        };
        if let Some(creds) = &scram {
            for b in &backends {
                for p in b.routing.iter().flat_map(|r| r.replicas.iter()).chain([&b.primary]) {
                    p.learn_scram(creds.clone());
                }
            }
        }
        let app = info.params.get("application_name").cloned().unwrap_or_default();
        let registered = self.sessions.register(peer, &user.name, &info.database, &app);
        let mut session = Box::new(Session::new(stream, buf, pool, info.params, self.metrics.clone()));
        session.set_client(registered.info.clone(), self.draining.subscribe());
        session.log_slow(config.general.log_slow_queries.0);
        let looked_up = (!config.users.contains_key(&user.name)).then(|| user.clone());
        let (proxy, current) = (Arc::downgrade(self), self.current().clone());
        session.set_refresh(Refresh::new(proxy, current, topo, &info.database, &user.name, scram, looked_up));
        session.set_routing(routing);
        if let Some(sh) = sharding {
            session.set_sharding(sh);
        }
        Ok((session, registered))
    }

    async fn cancel(&self, pid: i32, secret: i32) {
        if let Some((addr, spid, ssecret)) = self.cancels.target(pid, secret) {
            if let Err(e) = crate::backend::server::send_cancel(&addr, spid, ssecret).await {
                tracing::warn!("forwarding cancel to {addr} failed: {e}");
            }
        }
    }

    /// The user logging in: from `[[users]]`, else looked up on the server
    /// (`auth_query`). An unknown role is refused as PostgreSQL refuses it.
    async fn find_user(&self, topo: &Topology, info: &StartupInfo) -> Result<User, PgError> {
        let config = &topo.config;
        if let Some(u) = config.users.get(&info.user) {
            return Ok(u.clone());
        }
        // Boxed: a rare path, kept out of every login's future.
        let found = Box::pin(authquery::lookup(config, &topo.server_tls, &info.database, &info.user)).await;
        match found {
            Ok(Some(u)) => Ok(u),
            Ok(None) if config.general.auth_user.is_none() => {
                Err(PgError::fatal(sqlstate::INVALID_AUTHORIZATION, format!("role \"{}\" does not exist", info.user)))
            }
            failed => {
                if let Err(e) = failed {
                    tracing::warn!(user = %info.user, "{e}");
                }
                // As PostgreSQL: an unknown role fails like a wrong password.
                Err(PgError::fatal(
                    sqlstate::INVALID_PASSWORD,
                    format!("password authentication failed for user \"{}\"", info.user),
                ))
            }
        }
    }

    /// The admin console, for a user allowed on it.
    async fn serve_admin(
        self: &Arc<Self>,
        mut stream: ClientStream,
        buf: BytesMut,
        info: &StartupInfo,
        user: &User,
        peer: SocketAddr,
    ) {
        let general = &self.config().general;
        let role = if general.admin_users.contains(&user.name) {
            admin::Role::Admin
        } else if general.stats_users.contains(&user.name) {
            admin::Role::Stats
        } else {
            let e = PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                format!("user \"{}\" may not use the admin console (admin_users, stats_users)", user.name),
            );
            return Session::fatal(&mut stream, &e).await;
        };
        let app = info.params.get("application_name").map(String::as_str).unwrap_or_default();
        let _registered = self.sessions.register(peer, &user.name, &info.database, app);
        let guard = self.cancels.register();
        admin::serve(self.clone(), stream, buf, role, guard.key()).await
    }
}

/// A client counted as connected (`max_client_conn`) until dropped; the
/// count with it included.
struct ClientCount(usize, Arc<Proxy>);

impl ClientCount {
    fn new(proxy: Arc<Proxy>) -> ClientCount {
        ClientCount(proxy.clients.fetch_add(1, Ordering::Relaxed) + 1, proxy)
    }
}

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.1.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client past login, on its way to its session.
struct LoggedIn {
    stream: ClientStream,
    buf: BytesMut,
    info: StartupInfo,
    user: User,
    client_key: Option<[u8; 32]>,
    peer: SocketAddr,
}
