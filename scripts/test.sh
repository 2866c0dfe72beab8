#!/usr/bin/env bash
# The test command: installs what a fresh machine lacks (PostgreSQL server
# binaries and client tools, which the tests run for real; the drivers of
# the driver matrix), then runs the whole suite. Usage: scripts/test.sh [cargo test args...]
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
command -v pgbench >/dev/null 2>&1 || missing+=(postgresql)
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "missing packages: ${missing[*]} (run as root, or: sudo apt-get install -y ${missing[*]})" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  echo "no 'postgres' OS user to run the server binaries as; reinstall the postgresql package" >&2
  exit 1
fi

# Driver matrix (psycopg 3, asyncpg, pgjdbc, node-postgres): their toolchains
# and packages.
bash tests/drivers/install.sh

exec cargo test --workspace "$@"
