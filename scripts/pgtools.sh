# scripts/pgtools.sh — shell helpers shared by benches/bench.sh and
# scripts/psycopg-suite.sh (sourced, not run): logging, running server
# binaries as postgres when root, finding PostgreSQL's binaries, a free
# loopback port, and waiting for an endpoint to answer.
#
# The sourcing script sets LOG_TAG (its name in log lines) and, for
# wait_ready, READY_USER / READY_PASSWORD / READY_DB (who logs in).

log() { printf '[%s %(%H:%M:%S)T] %s\n' "${LOG_TAG:-pgtools}" -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

is_root() { [[ $(id -u) -eq 0 ]]; }

# Run a PostgreSQL/PgBouncer server binary as the postgres user when root.
as_pg() {
    if is_root; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# The bin directory of the installed PostgreSQL (15 when there, else the
# newest), or nothing.
find_pgbin() {
    local d best=""
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x "$d/initdb" ]] && best=$d
    done
    if [[ -x /usr/lib/postgresql/15/bin/initdb ]]; then best=/usr/lib/postgresql/15/bin; fi
    if [[ -z "$best" ]] && command -v initdb >/dev/null 2>&1; then
        best=$(dirname "$(readlink -f "$(command -v initdb)")")
    fi
    printf '%s' "$best"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# wait_ready NAME PORT [PID]: until `SELECT 1` works on 127.0.0.1:PORT as
# READY_USER (20 s at most; fails at once if PID is given and dies).
wait_ready() {
    local name=$1 port=$2 pid_check=${3:-}
    local deadline=$((SECONDS + 20))
    while ((SECONDS < deadline)); do
        if [[ -n "$pid_check" ]] && ! kill -0 "$pid_check" 2>/dev/null; then
            return 1
        fi
        if PGPASSWORD=$READY_PASSWORD PGCONNECT_TIMEOUT=2 psql -X -Atq -h 127.0.0.1 -p "$port" \
            -U "$READY_USER" -d "$READY_DB" -c 'SELECT 1' >/dev/null 2>&1; then
            log "$name is accepting connections on 127.0.0.1:$port"
            return 0
        fi
        sleep 0.25
    done
    return 1
}

# need_tools TOOL...: each on PATH, and as root what running servers as
# postgres takes.
need_tools() {
    local t
    for t in "$@"; do
        command -v "$t" >/dev/null 2>&1 || die "$t not found"
    done
    if is_root; then
        command -v runuser >/dev/null 2>&1 || die "runuser not found"
        id postgres >/dev/null 2>&1 || die "user 'postgres' not found (needed to run servers as root)"
    fi
}

# init_cluster PGDATA PORT INITDB_LOG TAG: initdb a throw-away cluster in
# PGDATA (superuser postgres; trust on its socket in $WORK, SCRAM over
# TCP) listening on 127.0.0.1:PORT, durability off; the caller appends its
# own settings and pg_hba.conf. TAG names the caller in postgresql.conf.
init_cluster() {
    local pgdata=$1 port=$2 initdb_log=$3 tag=$4
    mkdir -p "$pgdata"
    if is_root; then chown postgres:postgres "$WORK" "$pgdata"; fi
    log "initdb ($PGBIN) in $pgdata"
    as_pg "$PGBIN/initdb" -D "$pgdata" -U postgres -E UTF8 --locale=C \
        --auth-local=trust --auth-host=scram-sha-256 >"$initdb_log" 2>&1 \
        || { cat "$initdb_log" >&2; die "initdb failed"; }
    cat >>"$pgdata/postgresql.conf" <<CONF

# --- $tag ---
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$WORK'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
password_encryption = 'scram-sha-256'
logging_collector = off
CONF
}
