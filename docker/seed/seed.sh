#!/usr/bin/env bash
# Create the schema of docker/seed/schema.sql on every shard primary.
# Environment: SHARDS (space-separated host:port list, in shard order),
# SEED_DB, SEED_USER, PGPASSWORD.
set -euo pipefail
: "${SHARDS:?}" "${SEED_DB:=shop}" "${SEED_USER:=app}"
here="$(cd "$(dirname "$0")" && pwd)"
hosts=($SHARDS)
for i in "${!hosts[@]}"; do
  host="${hosts[$i]%:*}" port="${hosts[$i]##*:}"
  for _ in $(seq 1 60); do pg_isready -q -h "$host" -p "$port" && break; sleep 1; done
  psql -X -q -v ON_ERROR_STOP=1 -h "$host" -p "$port" -U "$SEED_USER" -d "$SEED_DB" \
    -v shard="$i" -v shards="${#hosts[@]}" -f "$here/schema.sql"
  echo "shard $i ($host:$port): schema ready"
done
