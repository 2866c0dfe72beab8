#!/usr/bin/env bash
# Installs what the driver-compatibility tests (tests/drivers.rs) need:
# psycopg 3 and asyncpg for python3, pgjdbc (+ a JDK) from Debian, and
# node-postgres into tests/drivers/node. Idempotent and quiet; run as root.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

quiet() { # run "$@"; show its output only if it fails
  local log rc=0
  log="$(mktemp)"
  "$@" >"$log" 2>&1 || rc=$?
  ((rc == 0)) || cat "$log" >&2
  rm -f "$log"
  return "$rc"
}

py=python3
if ! $py -c 'import psycopg, psycopg_binary' >/dev/null 2>&1; then
  quiet $py -m pip install --disable-pip-version-check --root-user-action=ignore 'psycopg[binary]>=3.1'
fi
if ! $py -c 'import asyncpg' >/dev/null 2>&1; then
  quiet $py -m pip install --disable-pip-version-check --root-user-action=ignore 'asyncpg>=0.27'
fi

apt_pkgs=()
[ -f /usr/share/java/postgresql.jar ] || apt_pkgs+=(libpostgresql-jdbc-java)
command -v javac >/dev/null 2>&1 || apt_pkgs+=(default-jdk-headless)
if ((${#apt_pkgs[@]})); then
  quiet apt-get update
  quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y "${apt_pkgs[@]}"
fi

if [ ! -f "$here/node/node_modules/pg/package.json" ]; then
  cd "$here/node"
  if [ -f package-lock.json ]; then
    quiet npm ci --no-audit --no-fund
  else
    quiet npm install --no-audit --no-fund
  fi
fi
