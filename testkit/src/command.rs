//! Running the external tools a cluster is built and driven with: their
//! environment (the libpq variables that would redirect them removed,
//! C-locale messages), one run to completion with its failure as
//! [`ClusterError::Command`], whether we are root (and must run them as
//! `postgres`), and the quoting of the SQL and postgresql.conf values
//! they are fed.

use std::process::{Command, Output, Stdio};

use crate::cluster::{ClusterError, Res};

/// libpq environment variables that would silently redirect the client tools.
const PG_ENV: &str = "PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGPASSWORD PGPASSFILE \
    PGSERVICE PGSERVICEFILE PGOPTIONS PGDATA PGSSLMODE PGAPPNAME";

/// Drop libpq variables that would redirect the client tools; C-locale messages.
pub(crate) fn clean_env(cmd: &mut Command) {
    for var in PG_ENV.split_whitespace() {
        cmd.env_remove(var);
    }
    cmd.env("LC_ALL", "C");
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Run to completion with stdin closed; stdout on success, else Command error.
pub(crate) fn run(cmd: &mut Command) -> Res<String> {
    let out = cmd.stdin(Stdio::null()).output();
    check_output(describe(cmd), out.map_err(|e| spawn_err(describe(cmd), e))?)
}

pub(crate) fn check_output(cmd: String, out: Output) -> Res<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let output = stdout + &String::from_utf8_lossy(&out.stderr);
    Err(cmd_err(cmd, out.status.to_string(), output))
}

pub(crate) fn spawn_err(cmd: String, e: std::io::Error) -> ClusterError {
    cmd_err(cmd, "could not be spawned".into(), e.to_string())
}

fn cmd_err(cmd: String, status: String, output: String) -> ClusterError {
    ClusterError::Command { cmd, status, output }
}

pub(crate) fn describe(cmd: &Command) -> String {
    let parts = std::iter::once(cmd.get_program()).chain(cmd.get_args());
    parts.map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

pub(crate) fn io_err(msg: &str) -> ClusterError {
    ClusterError::Io(std::io::Error::other(msg.to_string()))
}

/// SQL identifier quoting.
pub(crate) fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// SQL / postgresql.conf string literal quoting.
pub(crate) fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
