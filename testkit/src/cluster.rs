//! Throw-away, real PostgreSQL clusters built from the installed server binaries.
//!
//! Used by the integration tests and by `pgmux demo`. [`Cluster::start`] creates a
//! temporary directory (prefix `pgmux-`, in `$PGMUX_TMPDIR`, else `/dev/shm` when
//! usable, else the system temp dir) holding one primary, optional streaming
//! replicas (`pg_basebackup -R`) and optional independent "extra" primaries, each
//! listening on `127.0.0.1:<free port>` and on a unix socket in `<root>/sock`.
//! Roles and databases from the [`ClusterSpec`] are created on every primary; the
//! superuser `postgres` gets [`Cluster::superuser_password`] (SCRAM) for TCP use.
//!
//! When running as root (initdb refuses root), every server binary and the setup
//! `psql` run as `runuser -u postgres -- <bin>` and the directory is chowned to
//! `postgres`. Dropping the [`Cluster`] (also while unwinding from a panic, and when
//! [`Cluster::start`] fails half-way) stops every server with
//! `pg_ctl stop -m immediate` and removes the directory.
//! Nothing is printed to stdout; progress goes to `tracing::debug!`. Every call
//! blocks (seconds for `start`): from async code use `tokio::task::spawn_blocking`.
//!
//! Here: a running cluster and what drives it (psql, stopping and starting
//! nodes, waiting for replicas, shutdown). Building one is in
//! `cluster/setup.rs`, what it is built from in `spec.rs`, running the
//! tools in `command.rs`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::command::{check_output, clean_env, describe, lit, run, spawn_err};

mod setup;
pub use setup::free_port;

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(25);
const SUPERUSER: &str = "postgres";
const SUPERUSER_PASSWORD: &str = "pgmux-superuser-secret";

/// Everything that can go wrong while building or driving a cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The server binaries (or the `postgres` OS user) are missing; carries a hint.
    #[error("PostgreSQL server binaries not found: {0}")]
    NotInstalled(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A command could not be spawned or exited unsuccessfully.
    #[error("command `{cmd}` failed ({status}):\n{output}")]
    Command { cmd: String, status: String, output: String },
    #[error("timed out: {0}")]
    Timeout(String),
}

pub(crate) type Res<T> = Result<T, ClusterError>;

pub use crate::certs::{make_certs, Certs};
pub use crate::pgbin::PgBin;
pub use crate::spec::{ClusterSpec, HbaMethod, Role};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeRole {
    Primary,
    Replica,
    ExtraPrimary,
}

/// One PostgreSQL server of a [`Cluster`].
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub role: NodeRole,
    pub port: u16,
    pub data_dir: PathBuf,
    pub log_file: PathBuf,
}

impl Node {
    /// `"127.0.0.1:PORT"`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A libpq / tokio-postgres `key=value` connection string over TCP.
    pub fn conn_str(&self, user: &str, password: &str, db: &str) -> String {
        let q = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        let (port, user, password, db) = (self.port, q(user), q(password), q(db));
        format!("host=127.0.0.1 port={port} user={user} password={password} dbname={db}")
    }

    /// The last `lines` lines of the server log (empty if unreadable).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log_file).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Running PostgreSQL servers in a temporary directory; see the module docs.
pub struct Cluster {
    pub primary: Node,
    pub replicas: Vec<Node>,
    pub extra_primaries: Vec<Node>,
    bin: PgBin,
    sock_dir: PathBuf,
    /// uid/gid of `postgres` when we are root and must switch users.
    owner: Option<(u32, u32)>,
    dir: TempDir,
}

impl Cluster {
    /// Password of the superuser `postgres` (SCRAM-stored, usable over TCP).
    pub fn superuser_password() -> &'static str {
        SUPERUSER_PASSWORD
    }

    /// Run `sql` with psql as superuser over the unix socket against `node`/`db`
    /// (`-X -A -t -q -v ON_ERROR_STOP=1`, statements fed on stdin and run one by
    /// one, so `CREATE DATABASE` works); returns the trimmed stdout.
    pub fn psql(&self, node: &Node, db: &str, sql: &str) -> Result<String, ClusterError> {
        let mut cmd = self.server_cmd("psql");
        cmd.args("-X -A -t -q -v ON_ERROR_STOP=1 -U postgres -f - -h".split(' '));
        cmd.arg(&self.sock_dir).args(["-p", &node.port.to_string(), "-d", db]);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        cmd.stderr(Stdio::piped());
        let short: String = sql.chars().take(300).collect();
        let desc = format!("{} <<< {short}", describe(&cmd));
        let mut child = cmd.spawn().map_err(|e| spawn_err(desc.clone(), e))?;
        // Feed stdin from a thread so that a large result cannot deadlock us.
        let writer = child.stdin.take().map(|mut stdin| {
            let sql = sql.to_owned();
            std::thread::spawn(move || stdin.write_all(sql.as_bytes()))
        });
        let out = child.wait_with_output()?;
        if let Some(w) = writer {
            let _ = w.join();
        }
        check_output(desc, out).map(|s| s.trim().to_string())
    }

    /// The CA that signed `node`'s certificate (`ClusterSpec::tls`).
    pub fn tls_ca(&self, node: &Node) -> PathBuf {
        node.data_dir.join("ca.crt")
    }

    /// `pg_ctl stop -m fast -w`.
    pub fn stop_node(&self, node: &Node) -> Result<(), ClusterError> {
        self.pg_ctl_stop(node, "fast")
    }

    /// `pg_ctl stop -m immediate -w`: a crash, as far as clients can tell.
    pub fn kill_node(&self, node: &Node) -> Result<(), ClusterError> {
        self.pg_ctl_stop(node, "immediate")
    }

    fn pg_ctl_stop(&self, node: &Node, mode: &str) -> Result<(), ClusterError> {
        let mut cmd = self.server_cmd("pg_ctl");
        cmd.arg("stop").arg("-D").arg(&node.data_dir).args(["-m", mode]);
        run(cmd.args("-w -t 30 -s".split(' '))).map(drop)
    }

    /// `pg_ctl start -w -l <log_file>`, then wait until `pg_isready` succeeds.
    pub fn start_node(&self, node: &Node) -> Result<(), ClusterError> {
        let mut cmd = self.server_cmd("pg_ctl");
        cmd.arg("start").arg("-D").arg(&node.data_dir).arg("-l").arg(&node.log_file);
        if let Err(mut e) = run(cmd.args(["-w", "-t", "30", "-s"])) {
            if let ClusterError::Command { output, .. } = &mut e {
                let _ = write!(output, "\n--- tail of {} ---\n{}", node.name, node.log_tail(30));
            }
            return Err(e);
        }
        let isready = self.bin.path("pg_isready");
        let deadline = Instant::now() + READY_TIMEOUT;
        self.poll_until(node, deadline, "accepting connections", || {
            let mut cmd = Command::new(&isready);
            cmd.args("-q -t 2 -h 127.0.0.1 -d postgres -U postgres -p".split(' '));
            clean_env(cmd.arg(node.port.to_string()).stdin(Stdio::null()));
            Ok(cmd.output()?.status.success())
        })?;
        tracing::debug!(node = %node.name, port = node.port, "postgres node ready");
        Ok(())
    }

    /// Wait (30 s max) until every replica has replayed the end of the last
    /// WAL record the primary inserted, asynchronous commits included (a
    /// dummy synchronous commit flushes nothing: an xid-only transaction
    /// commits asynchronously whatever the setting).
    pub fn wait_replicas_caught_up(&self) -> Result<(), ClusterError> {
        // At a page start the insert position is past the page header
        // (24 bytes; 40 on a segment's first page), where no record ends.
        let sql = "SELECT CASE WHEN (l - '0/0') % seg = 40 THEN l - 40 \
                   WHEN (l - '0/0') % blk = 24 THEN l - 24 ELSE l END \
                   FROM (SELECT pg_current_wal_insert_lsn() AS l, \
                   current_setting('wal_block_size')::numeric AS blk, \
                   pg_size_bytes(current_setting('wal_segment_size')) AS seg) s";
        let out = self.psql(&self.primary, "postgres", sql)?;
        let lsn = out.trim().to_string();
        if !lsn.contains('/') {
            return Err(ClusterError::Command { cmd: sql.into(), status: "unexpected output".into(), output: out });
        }
        let sql = format!("SELECT pg_last_wal_replay_lsn() >= {}::pg_lsn", lit(&lsn));
        let deadline = Instant::now() + READY_TIMEOUT;
        for r in &self.replicas {
            let what = format!("replayed up to {lsn}");
            self.poll_until(r, deadline, &what, || Ok(self.psql(r, "postgres", &sql)? == "t"))?;
        }
        Ok(())
    }

    /// The temporary directory holding data dirs, logs and the socket dir.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Directory of the unix sockets of all nodes.
    pub fn socket_dir(&self) -> &Path {
        &self.sock_dir
    }

    /// Primary, replicas, then extra primaries.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        let primary = std::iter::once(&self.primary);
        primary.chain(&self.replicas).chain(&self.extra_primaries)
    }

    /// The path of PostgreSQL binary `name` (server or client tool).
    pub fn bin_path(&self, name: &str) -> PathBuf {
        self.bin.path(name)
    }

    /// A command running `program` (a script, a binary) as the user the
    /// servers run as, with the PostgreSQL binaries first on PATH.
    pub fn as_server_user(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let bin_dir = self.bin.path("postgres").parent().map(Path::to_path_buf).unwrap_or_default();
        let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
        let mut cmd = Command::new(if self.owner.is_some() { "runuser".as_ref() } else { program.as_ref() });
        if self.owner.is_some() {
            cmd.args(["-u", "postgres", "--", "env", &format!("PATH={path}")]).arg(program.as_ref());
        } else {
            cmd.env("PATH", path);
        }
        clean_env(cmd.current_dir(self.dir.path()));
        cmd
    }

    /// A command for binary `name` of [`PgBin`], as `postgres` when we are root.
    fn server_cmd(&self, name: &str) -> Command {
        let (prog, as_postgres) = (self.bin.path(name), self.owner.is_some());
        let mut cmd = Command::new(if as_postgres { Path::new("runuser") } else { &prog });
        if as_postgres {
            cmd.args(["-u", "postgres", "--"]).arg(&prog);
        }
        clean_env(cmd.current_dir(self.dir.path()));
        cmd
    }

    /// Call `check` every [`POLL`] until it returns true; Timeout past `deadline`.
    fn poll_until(&self, node: &Node, deadline: Instant, what: &str, mut check: impl FnMut() -> Res<bool>) -> Res<()> {
        while !check()? {
            if Instant::now() >= deadline {
                let (name, port, log) = (&node.name, node.port, node.log_file.display());
                return Err(ClusterError::Timeout(format!(
                    "node {name} (port {port}) not {what} within {READY_TIMEOUT:?}; \
                     tail of {log}:\n{}",
                    node.log_tail(30)
                )));
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }
}

impl Cluster {
    /// `pg_ctl stop -m immediate` for every running node (in parallel, errors
    /// ignored). Drop calls it; a cluster kept in a `static` (never dropped)
    /// should call it at exit, e.g. from a `libc::atexit` hook.
    pub fn shutdown(&self) {
        let children: Vec<_> = self
            .nodes()
            .filter(|n| n.data_dir.join("postmaster.pid").exists())
            .filter_map(|n| {
                let mut cmd = self.server_cmd("pg_ctl");
                cmd.arg("stop").arg("-D").arg(&n.data_dir);
                cmd.args("-m immediate -w -t 10 -s".split(' '));
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
                cmd.stdin(Stdio::null()).spawn().ok()
            })
            .collect();
        for mut child in children {
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    /// Stop every node, then remove the directory (the `dir` TempDir is
    /// dropped right after).
    fn drop(&mut self) {
        self.shutdown();
    }
}
