//! A session as the operator sees it: its state in the client list
//! (`SHOW CLIENTS`), `KILL`, and its end when pgmux shuts down (at its
//! next transaction boundary, or when the shutdown timeout kills it).

use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{ready, Poll};

use crate::frontend::buffers;
use tokio::sync::watch;

use super::Session;
use crate::frontend::registry::{ClientInfo, ClientState};
use crate::protocol::auth::ScramCredentials;
use crate::protocol::error::{sqlstate, PgError};
use crate::proxy::Proxy;
use crate::topology::{Current, Topology};

/// How a session finds its pools again after a reload: the snapshot its
/// backends came from, and the cell holding the one in force.
pub struct Refresh {
    proxy: Weak<Proxy>,
    current: Current,
    topology: Arc<Topology>,
    database: String,
    user: String,
    /// SCRAM keys from the client's login, for pools made after it.
    scram: Option<Box<ScramCredentials>>,
    /// The user as auth_query found it (not in `[[users]]`).
    looked_up: Option<Box<crate::config::User>>,
}

impl Refresh {
    /// A session of `user` on `database` whose backends came from
    /// `topology`.
    pub fn new(
        proxy: Weak<Proxy>,
        current: Current,
        topology: Arc<Topology>,
        database: &str,
        user: &str,
        scram: Option<ScramCredentials>,
        looked_up: Option<crate::config::User>,
    ) -> Refresh {
        let (database, user) = (database.into(), user.into());
        // Boxed: most clients have no looked-up user, and every one keeps
        // its refresh for as long as it stays.
        let (scram, looked_up) = (scram.map(Box::new), looked_up.map(Box::new));
        Refresh { proxy, current, topology, database, user, scram, looked_up }
    }
}

impl Session {
    /// Let the session follow config reloads (see [`crate::ops::reload`]).
    pub fn set_refresh(&mut self, refresh: Refresh) {
        self.refresh = Some(Box::new(refresh));
    }

    /// Between transactions after a reload: take the pools of the snapshot
    /// in force (one atomic load when there was none). Fails (FATAL) when
    /// the database or user is gone.
    pub(super) fn follow_reload(&mut self) -> Result<(), PgError> {
        let between = self.between_transactions();
        let Some(r) = &mut self.refresh else { return Ok(()) };
        if std::ptr::eq(&**r.current.load(), &*r.topology) || !between {
            return Ok(());
        }
        let Some(proxy) = r.proxy.upgrade() else { return Ok(()) };
        r.topology = r.current.load_full();
        let Some(user) = r.topology.config.users.get(&r.user).or(r.looked_up.as_deref()) else {
            return Err(PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                format!("user \"{}\" was removed from the pgmux config", r.user),
            ));
        };
        let (backends, sharding) = proxy.session_backends(&r.topology, &r.database, user)?;
        if let Some(creds) = &r.scram {
            for b in &backends {
                for p in b.routing.iter().flat_map(|x| x.replicas.iter()).chain([&b.primary]) {
                    p.learn_scram((**creds).clone());
                }
            }
        }
        self.pool = backends[0].primary.clone();
        self.routing = backends[0].routing.clone();
        self.sharding = sharding;
        self.shard_at = 0;
        if self.stmts.map.is_empty() {
            // Nothing depends on the old mode: take the new one.
            let s = &self.pool.settings;
            self.mode = s.mode;
            self.track = s.mode == crate::config::PoolMode::Transaction && s.max_prepared_statements > 0;
        }
        Ok(())
    }

    /// Register the session's entry in the client list and the shutdown
    /// signal it ends on.
    pub fn set_client(&mut self, info: Arc<ClientInfo>, draining: watch::Receiver<bool>) {
        self.client = Some(info);
        self.draining = Some(draining);
    }

    /// Log this session's queries slower than `threshold` (zero: none).
    pub fn log_slow(&mut self, threshold: std::time::Duration) {
        self.account.log_slow(threshold);
    }

    pub(super) fn set_state(&self, state: ClientState) {
        if let Some(c) = &self.client {
            c.set(state);
        }
    }

    /// Between transactions while pgmux shuts down: the session ends.
    pub(super) fn must_leave(&self) -> bool {
        self.between_transactions() && self.draining.as_ref().is_some_and(|d| *d.borrow())
    }

    /// Read more client bytes while idle; `None`: pgmux is shutting down.
    /// With nothing buffered, the session waits for the socket to become
    /// readable holding no buffer at all: an idle client costs pgmux no
    /// read buffer. One poll function, not a select of futures: what an
    /// idle session's task holds while it waits is a few references.
    pub(super) async fn read_idle(&mut self) -> Option<std::io::Result<usize>> {
        let between = self.between_transactions();
        let Session { stream, rbuf, draining, client, .. } = self;
        // Shutdown ends a session between transactions; it wakes this
        // wait through the client's entry (`ClientInfo::nudge`).
        let leave = draining.as_ref().zip(client.as_deref()).filter(|_| between);
        std::future::poll_fn(|cx| {
            if let Some((draining, info)) = leave {
                info.wait_nudge(cx.waker());
                if *draining.borrow() {
                    return Poll::Ready(None);
                }
            }
            if rbuf.is_empty() {
                if rbuf.capacity() > 0 {
                    buffers::give(std::mem::take(rbuf));
                }
                if let Err(e) = ready!(stream.poll_read_ready(cx)) {
                    return Poll::Ready(Some(Err(e)));
                }
                *rbuf = buffers::take();
            }
            tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, rbuf).map(Some)
        })
        .await
    }

    /// Tell the client pgmux is going away.
    pub(super) async fn goodbye(&mut self) {
        let e = PgError::fatal(sqlstate::ADMIN_SHUTDOWN, "pgmux is shutting down");
        Self::fatal(&mut self.stream, &e).await
    }

    /// Serve until the client leaves or is killed (KILL, or the end of
    /// the shutdown timeout).
    pub(super) async fn serve_until_killed(&mut self) {
        let Some(info) = self.client.clone() else { return self.serve().await };
        let killed = tokio::select! {
            // A kill takes effect whenever serving waits.
            biased;
            _ = self.serve() => false,
            _ = info.killed() => true,
        };
        if killed {
            tracing::info!(client = info.id, "client connection killed");
            let e = PgError::fatal(sqlstate::ADMIN_SHUTDOWN, "terminating connection due to administrator command");
            Self::fatal(&mut self.stream, &e).await;
        }
    }
}
