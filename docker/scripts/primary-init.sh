#!/usr/bin/env bash
# Prepare a primary for pgmux and its streaming replicas: an application
# role and database, a replication role, one physical replication slot per
# replica, and pg_hba lines for both. Idempotent.
#
# Runs in the postgres image's /docker-entrypoint-initdb.d (as the postgres
# user, local socket) and, with the same environment, from the test suite
# against a cluster it starts (tests/docker.rs), so it cannot rot unseen.
#
# Environment: APP_USER, APP_PASSWORD, APP_DB (comma-separated list allowed),
# REPLICATION_USER, REPLICATION_PASSWORD, REPLICA_SLOTS (space-separated),
# and psql's PG* / POSTGRES_USER / POSTGRES_DB. PGDATA: the data directory
# whose pg_hba.conf gets the lines.
set -euo pipefail

: "${APP_USER:=app}" "${APP_PASSWORD:=app}" "${APP_DB:=app}"
: "${REPLICATION_USER:=replicator}" "${REPLICATION_PASSWORD:=replicator}"
: "${REPLICA_SLOTS:=}"

run_sql() {
  psql -v ON_ERROR_STOP=1 -X -q --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" "$@"
}

run_sql -v app="$APP_USER" -v app_pw="$APP_PASSWORD" -v repl="$REPLICATION_USER" -v repl_pw="$REPLICATION_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'app', :'app_pw')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'app') \gexec
SELECT format('CREATE ROLE %I LOGIN REPLICATION PASSWORD %L', :'repl', :'repl_pw')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'repl') \gexec
SQL

for db in ${APP_DB//,/ }; do
  run_sql -v db="$db" -v app="$APP_USER" <<'SQL'
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'app')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SQL
done

for slot in $REPLICA_SLOTS; do
  run_sql -v slot="$slot" <<'SQL'
SELECT pg_create_physical_replication_slot(:'slot')
 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = :'slot');
SQL
done

if [ -n "${PGDATA:-}" ] && [ -f "$PGDATA/pg_hba.conf" ]; then
  marker="# pgmux: replication and application access"
  if ! grep -qF "$marker" "$PGDATA/pg_hba.conf"; then
    {
      echo "$marker"
      echo "host replication $REPLICATION_USER all scram-sha-256"
      echo "host all all all scram-sha-256"
    } >>"$PGDATA/pg_hba.conf"
  fi
  run_sql -c "SELECT pg_reload_conf()" >/dev/null
fi
echo "primary ready: role $APP_USER, databases ${APP_DB}, slots: ${REPLICA_SLOTS:-none}"
