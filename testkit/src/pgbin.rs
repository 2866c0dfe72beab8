//! Where the PostgreSQL server binaries are (`initdb`, `pg_ctl`,
//! `pg_basebackup`, ...), and how to install them when they are missing.

use std::path::PathBuf;
use std::process::Command;

use crate::cluster::ClusterError;
use crate::command::{is_root, run};

/// Directory holding `initdb`, `pg_ctl`, `postgres`, `pg_basebackup`, `psql`, ...
#[derive(Clone, Debug)]
pub struct PgBin {
    pub dir: PathBuf,
}

impl PgBin {
    pub const INSTALL_HINT: &'static str = "install the PostgreSQL server with \
        `apt-get update && apt-get install -y postgresql` (Debian/Ubuntu), \
        `dnf install -y postgresql-server` (Fedora) or `brew install postgresql` (macOS), \
        or set PGMUX_PG_BIN to the directory that contains initdb";

    /// `$PGMUX_PG_BIN`, else `pg_config --bindir` if it contains initdb, else the
    /// highest `/usr/lib/postgresql/*/bin` with initdb, else `initdb` on `PATH`.
    pub fn locate() -> Result<PgBin, ClusterError> {
        if let Some(dir) = std::env::var_os("PGMUX_PG_BIN").map(PathBuf::from) {
            if dir.join("initdb").is_file() {
                return Ok(PgBin { dir });
            }
            let msg = format!("PGMUX_PG_BIN={} has no initdb; ", dir.display());
            return Err(ClusterError::NotInstalled(msg + Self::INSTALL_HINT));
        }
        let pg_config = Command::new("pg_config").arg("--bindir").output().ok();
        let pg_config = pg_config.filter(|o| o.status.success()).map(|o| o.stdout);
        let pg_config = pg_config.map(|out| PathBuf::from(String::from_utf8_lossy(&out).trim()));
        let mut versioned: Vec<((u32, u32), PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let mut parts = name.split('.').map(str::parse::<u32>);
                let major = parts.next()?.ok()?;
                let minor = parts.next().and_then(Result::ok).unwrap_or(0);
                Some(((major, minor), e.path().join("bin")))
            })
            .collect();
        versioned.sort();
        let path = std::env::var_os("PATH").unwrap_or_default();
        pg_config
            .into_iter()
            .chain(versioned.into_iter().rev().map(|(_, dir)| dir))
            .chain(std::env::split_paths(&path))
            .find(|dir| dir.join("initdb").is_file())
            .map(|dir| PgBin { dir })
            .ok_or_else(|| ClusterError::NotInstalled(Self::INSTALL_HINT.to_string()))
    }

    /// `apt-get update && apt-get install -y postgresql` (root only).
    pub fn install() -> Result<(), ClusterError> {
        if !is_root() {
            let msg = "installing needs root; ".to_string() + Self::INSTALL_HINT;
            return Err(ClusterError::NotInstalled(msg));
        }
        for args in [&["update"][..], &["install", "-y", "postgresql"]] {
            let mut cmd = Command::new("apt-get");
            run(cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive"))?;
        }
        Ok(())
    }

    /// Full path of the binary `name` in this directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}
