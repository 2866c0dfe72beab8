#!/usr/bin/env bash
# Start a streaming replica of PRIMARY_HOST: on first start (empty PGDATA)
# it copies the primary with pg_basebackup -R through its own replication
# slot, then runs postgres. Used as the replicas' entrypoint in the compose
# files, and by the test suite (with REPLICA_BOOTSTRAP_ONLY=1, against a
# cluster it starts: tests/docker.rs).
#
# Environment: PRIMARY_HOST, PRIMARY_PORT (5432), REPLICATION_USER,
# REPLICATION_PASSWORD, REPLICA_SLOT, PGDATA; REPLICA_BOOTSTRAP_ONLY=1 stops
# after the copy. Extra arguments go to postgres.
set -euo pipefail

: "${PRIMARY_HOST:?}" "${PGDATA:?}" "${REPLICA_SLOT:?}"
: "${PRIMARY_PORT:=5432}" "${REPLICATION_USER:=replicator}" "${REPLICATION_PASSWORD:=replicator}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  echo "waiting for the primary at $PRIMARY_HOST:$PRIMARY_PORT"
  for _ in $(seq 1 120); do
    pg_isready -q -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" && break
    sleep 1
  done
  mkdir -p "$PGDATA"
  chmod 700 "$PGDATA"
  PGPASSWORD="$REPLICATION_PASSWORD" pg_basebackup \
    -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" -U "$REPLICATION_USER" \
    -D "$PGDATA" -R -X stream -S "$REPLICA_SLOT" --checkpoint=fast --no-password
  echo "replica copied from $PRIMARY_HOST:$PRIMARY_PORT (slot $REPLICA_SLOT)"
fi
if [ "${REPLICA_BOOTSTRAP_ONLY:-0}" = 1 ]; then
  exit 0
fi
exec postgres -D "$PGDATA" "$@"
