#!/usr/bin/env bash
# benches/bench.sh — throughput/latency benchmark: pgmux vs PgBouncer vs direct.
#
# In one run, on loopback (127.0.0.1) only, bounded in time, it:
#   1. installs PostgreSQL / PgBouncer with apt-get when missing (needs root),
#   2. builds pgmux (`cargo build --release` in the repo root),
#   3. starts a throw-away PostgreSQL primary in a mktemp -d directory and
#      loads it with `pgbench -i -s $SCALE` (role/database "bench"),
#   4. starts pgmux and PgBouncer in front of it, both in transaction mode with
#      the same pool size and SCRAM-SHA-256 client auth,
#   5. runs pgbench (select-only, -S) against each target — direct PostgreSQL,
#      pgmux, PgBouncer — for every protocol mode in $MODES, with a 2 s
#      warm-up before each measured run,
#   6. prints a table (tps, mean latency, failed transactions) plus the ratios
#      pgmux/PgBouncer and pgmux/direct, and writes the same summary to
#      benches/results/latest.txt,
#   7. keeps the run's logs (pgmux, PgBouncer, PostgreSQL, pgbench) in
#      benches/results/logs/ and tears everything down on exit (trap on
#      EXIT/INT/TERM).
#
# Usage:
#   bash benches/bench.sh
#   DURATION=30 CLIENTS=32 MODES="simple extended prepared" bash benches/bench.sh
#
# Environment variables (defaults in brackets):
#   SCALE     pgbench scale factor for `pgbench -i`                   [10]
#   CLIENTS   pgbench clients (-c)                                     [16]
#   JOBS      pgbench worker threads (-j)                              [2]
#   DURATION  seconds per measured run (-T)                            [15]
#   WARMUP    seconds of warm-up per target and mode                   [2]
#   POOL      server pool size for pgmux and PgBouncer                 [20]
#   MODES     space-separated protocol modes to run; each maps to a
#             pgbench `-M` value: simple, extended, prepared
#                                                     [simple extended prepared]
#   SKIP_BUILD=1  use the existing target/release/pgmux as is          [unset]
#   PGMUX_BIN     the pgmux binary to measure (with SKIP_BUILD=1)   [target/release/pgmux]
#   PGMUX_THREADS pgmux worker threads (0 = one per core)              [0]
#   PGBOUNCER_BIN the PgBouncer binary, e.g. one built from its latest
#             release's source (see README, "Benchmarks")     [pgbouncer on PATH]
#   REPLICAS  streaming replicas for the read-scaling run (0 = skip)    [2]
#   SHARDS    2: a keyed-read run and a multi-row INSERT run through pgmux
#             over 2 shard databases
#             (on the same server) vs one database; 0 = skip             [2]
#   DDL_EVERY seconds between DDL statements run through pgmux during a
#             second `-S -M prepared` run (the cost of pgmux dropping and
#             re-preparing every statement after DDL); 0 = skip          [0]
#   CALLGRIND=1  run both proxies under valgrind's callgrind, counting
#             instructions only during the measured runs: the table gets
#             an "Ir/txn" column (instructions per transaction, repeatable
#             where CPU time is noisy) and benches/results/logs/ the top
#             functions of each run, self and inclusive (callgrind_annotate),
#             with the dump itself (callgrind-*.out). Use a longer
#             DURATION (the proxies run ~50x slower) and PGMUX_THREADS=1
#             (PgBouncer has one thread too).                     [unset]
#   STRACE=1  attach `strace -c -f` to each proxy during its measured run:
#             the table gets a "sys/txn" column (system calls per
#             transaction) and benches/results/logs/strace-*.log the count
#             of each call. The proxies run slower under strace; the
#             counts per transaction, not the tps, are the figures.  [unset]
#
# Adding a scenario: add its name to MODES and, if it is not a plain pgbench
# `-M` protocol, a branch to mode_args(). Each (target, mode) pair becomes one
# row of the table via run_pgbench.

set -euo pipefail

SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-16}
JOBS=${JOBS:-2}
DURATION=${DURATION:-15}
WARMUP=${WARMUP:-2}
POOL=${POOL:-20}
MODES=${MODES:-simple extended prepared}
SKIP_BUILD=${SKIP_BUILD:-}
REPLICAS=${REPLICAS:-2}
SHARDS=${SHARDS:-2}
DDL_EVERY=${DDL_EVERY:-0}
CALLGRIND=${CALLGRIND:-}
STRACE=${STRACE:-}
WRAP=()
PGBOUNCER_BIN=${PGBOUNCER_BIN:-pgbouncer}
DDL_PID=""
STRACE_PID=""
REPLICA_DIRS=()
REPLICA_PORTS=()

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$SCRIPT_DIR")
RESULTS_DIR="$SCRIPT_DIR/results"
PGMUX_BIN=${PGMUX_BIN:-"$ROOT/target/release/pgmux"}

START_SECONDS=$SECONDS
# Keep the original stdout/stderr: a signal trap can fire inside a function
# whose output is redirected to a log file.
exec 3>&1 4>&2
WORK=""
PGDATA=""
PGBIN=""
PGMUX_PID=""
PGBOUNCER_PIDFILE=""
PG_STARTED=""
CHILD_PID=""

LOG_TAG=bench READY_USER=bench READY_PASSWORD=bench READY_DB=bench
# shellcheck source=../scripts/pgtools.sh
. "$ROOT/scripts/pgtools.sh"

# Run a command in the background and wait for it, so that a TERM/INT sent
# to this script runs the cleanup trap at once instead of after the command.
run_child() {
    local rc=0
    "$@" &
    CHILD_PID=$!
    wait "$CHILD_PID" || rc=$?
    CHILD_PID=""
    return "$rc"
}

# ---------------------------------------------------------------- cleanup ---
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    exec 1>&3 2>&4
    if [[ -n "$DDL_PID" ]]; then kill "$DDL_PID" 2>/dev/null; wait "$DDL_PID" 2>/dev/null; fi
    if [[ -n "$STRACE_PID" ]]; then kill "$STRACE_PID" 2>/dev/null; wait "$STRACE_PID" 2>/dev/null; fi
    if [[ -n "$CHILD_PID" ]] && kill -0 "$CHILD_PID" 2>/dev/null; then
        kill -TERM "$CHILD_PID" 2>/dev/null
        wait "$CHILD_PID" 2>/dev/null
    fi
    if [[ -n "$PGBOUNCER_PIDFILE" && -s "$PGBOUNCER_PIDFILE" ]]; then
        local bpid
        bpid=$(cat "$PGBOUNCER_PIDFILE")
        if [[ -n "$bpid" ]] && kill -0 "$bpid" 2>/dev/null; then
            log "stopping PgBouncer (pid $bpid)"
            kill -TERM "$bpid" 2>/dev/null
            for _ in $(seq 50); do kill -0 "$bpid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$bpid" 2>/dev/null
        fi
    fi
    if [[ -n "$PGMUX_PID" ]] && kill -0 "$PGMUX_PID" 2>/dev/null; then
        log "stopping pgmux (pid $PGMUX_PID)"
        kill -TERM "$PGMUX_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$PGMUX_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PGMUX_PID" 2>/dev/null
        wait "$PGMUX_PID" 2>/dev/null
    fi
    local rdir
    for rdir in "${REPLICA_DIRS[@]}"; do
        as_pg "$PGBIN/pg_ctl" -D "$rdir" stop -m immediate -w >/dev/null 2>&1
    done
    if [[ -n "$PG_STARTED" && -n "$PGDATA" ]]; then
        log "stopping PostgreSQL"
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA" stop -m immediate -w >/dev/null 2>&1
    fi
    if [[ -n "$WORK" && -d "$WORK" ]]; then
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ tools ---
ensure_tools() {
    PGBIN=$(find_pgbin)
    if [[ -z "$PGBIN" ]]; then
        is_root || die "initdb not found and not root: install PostgreSQL first"
        log "initdb not found: apt-get install -y postgresql"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql
        PGBIN=$(find_pgbin)
        [[ -n "$PGBIN" ]] || die "initdb still not found after installing postgresql"
    fi
    if ! command -v "$PGBOUNCER_BIN" >/dev/null 2>&1; then
        is_root || die "pgbouncer not found and not root: install it first"
        log "pgbouncer not found: apt-get install -y pgbouncer"
        DEBIAN_FRONTEND=noninteractive apt-get install -y pgbouncer \
            || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y pgbouncer; }
    fi
    need_tools pgbench psql python3 timeout
}

# psql as the superuser over the temp-dir unix socket.
pg_admin() {
    psql -X -q -v ON_ERROR_STOP=1 -h "$WORK" -p "$PG_PORT" -U postgres -d "${PGADMIN_DB:-postgres}" "$@"
}

# ------------------------------------------------------------- PostgreSQL ---
start_postgres() {
    PGDATA="$WORK/pgdata"
    PG_PORT=$(free_port)
    init_cluster "$PGDATA" "$PG_PORT" "$WORK/initdb.log" benches/bench.sh
    echo "shared_buffers = 128MB" >>"$PGDATA/postgresql.conf"
    cat >"$PGDATA/pg_hba.conf" <<EOF
local all all trust
host  replication postgres 127.0.0.1/32 trust
host  all all 127.0.0.1/32 scram-sha-256
EOF
    if is_root; then chown postgres:postgres "$PGDATA/postgresql.conf" "$PGDATA/pg_hba.conf"; fi
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/postgres.log" -w -t 60 start >/dev/null \
        || { cat "$WORK/postgres.log" >&2; die "PostgreSQL did not start"; }
    PG_STARTED=1
    pg_admin -c "CREATE ROLE bench LOGIN PASSWORD 'bench'" \
             -c "CREATE DATABASE bench OWNER bench"
    log "pgbench -i -s $SCALE"
    PGPASSWORD=bench timeout 900 pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U bench bench \
        >"$WORK/pgbench-init.log" 2>&1 \
        || { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }
    PGADMIN_DB=bench pg_admin -c "VACUUM ANALYZE" -c "CHECKPOINT"
    [[ "$SHARDS" == 2 ]] && make_shards
    return 0
}

# Two shard databases on the same server, bench_s0 and bench_s1, each with
# the pgbench_accounts rows pgmux's hash map puts there: PostgreSQL's
# PARTITION BY HASH with modulus 2 (remainder 0 iff the key's int4 hash
# with the partition seed is odd, as the seed's combine constant is odd).
make_shards() {
    local i keep
    # Multi-row INSERTs: the same table in the one database and both shards.
    PGADMIN_DB=bench pg_admin -c "CREATE TABLE bench_items (id int8 PRIMARY KEY, v int)" \
        -c "ALTER TABLE bench_items OWNER TO bench"
    for i in 0 1; do
        log "shard database bench_s$i"
        pg_admin -c "CREATE DATABASE bench_s$i TEMPLATE bench OWNER bench"
        keep=$((1 - i))
        PGADMIN_DB=bench_s$i pg_admin \
            -c "DELETE FROM pgbench_accounts WHERE (hashint4extended(aid, 8816678312871386365) & 1) <> $keep" \
            -c "VACUUM ANALYZE pgbench_accounts"
    done
    cat >"$WORK/keyed.sql" <<'EOS'
\set aid random(1, 100000 * :scale)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
EOS
    # Eight keyed reads in one pipeline (random keys: on both shards).
    {
        for i in 1 2 3 4 5 6 7 8; do echo "\\set a$i random(1, 100000 * :scale)"; done
        echo '\startpipeline'
        for i in 1 2 3 4 5 6 7 8; do echo "SELECT abalance FROM pgbench_accounts WHERE aid = :a$i;"; done
        echo '\endpipeline'
    } >"$WORK/pipeline.sql"
    # Four rows with random keys: over 2 shards nearly always both.
    cat >"$WORK/insert.sql" <<'EOS'
\set a random(1, 4000000000000)
\set b random(1, 4000000000000)
\set c random(1, 4000000000000)
\set d random(1, 4000000000000)
INSERT INTO bench_items (id, v) VALUES (:a, 1), (:b, 2), (:c, 3), (:d, 4) ON CONFLICT DO NOTHING;
EOS
}

# pgmux database "bench_sharded": pgbench_accounts over the two shard databases.
sharded_database() {
    [[ "$SHARDS" == 2 ]] || return 0
    printf '[databases.bench_sharded]\nshards = [{ name = "s0", primary = "127.0.0.1:%s", dbname = "bench_s0" }, { name = "s1", primary = "127.0.0.1:%s", dbname = "bench_s1" }]\ntables = [{ name = "pgbench_accounts", key = "aid", map = "by_aid" }, { name = "bench_items", key = "id", map = "by_id" }]\nallow_cross_shard_writes = true\n[databases.bench_sharded.maps.by_aid]\nkind = "hash"\ntype = "int4"\n[databases.bench_sharded.maps.by_id]\nkind = "hash"\ntype = "int8"\n' \
        "$PG_PORT" "$PG_PORT"
}

# ------------------------------------------------------------------ pgmux ---
# pgmux database "bench_rw": the same data, reads routed to the replicas.
replica_database() {
    ((${#REPLICA_PORTS[@]} > 0)) || return 0
    local list="" p
    for p in "${REPLICA_PORTS[@]}"; do list+="${list:+, }\"127.0.0.1:$p\""; done
    printf '[databases.bench_rw]\nprimary = "127.0.0.1:%s"\ndbname = "bench"\nreplicas = [%s]\nmonitor_user = "bench"\n' \
        "$PG_PORT" "$list"
}

# Streaming replicas of the primary (pg_basebackup -R), for the read-scaling run.
start_replicas() {
    local i dir port
    for ((i = 1; i <= REPLICAS; i++)); do
        dir="$WORK/replica$i"
        port=$(free_port)
        log "pg_basebackup -R -> replica $i on 127.0.0.1:$port"
        as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PG_PORT" -U postgres -D "$dir" -R -X stream -c fast \
            >"$WORK/basebackup$i.log" 2>&1 || { cat "$WORK/basebackup$i.log" >&2; die "pg_basebackup failed"; }
        printf "port = %s\n" "$port" | as_pg tee -a "$dir/postgresql.auto.conf" >/dev/null
        as_pg "$PGBIN/pg_ctl" -D "$dir" -l "$WORK/replica$i.log" -w -t 60 start >/dev/null \
            || { cat "$WORK/replica$i.log" >&2; die "replica $i did not start"; }
        REPLICA_DIRS+=("$dir")
        REPLICA_PORTS+=("$port")
    done
}

start_pgmux() {
    PGMUX_PORT=$(free_port)
    local cfg="$WORK/pgmux.toml"
    cat >"$cfg" <<EOF
[pgmux]
listen = "127.0.0.1:$PGMUX_PORT"
log_level = "warn"
worker_threads = ${PGMUX_THREADS:-0}

[pool]
pool_mode = "transaction"
default_pool_size = $POOL

[[users]]
name = "bench"
password = "bench"

[databases.bench]
primary = "127.0.0.1:$PG_PORT"
$(replica_database)
$(sharded_database)
EOF
    PGMUX_LOG="$WORK/pgmux.log"
    log "starting pgmux on 127.0.0.1:$PGMUX_PORT (pool $POOL)"
    "${WRAP[@]}" "$PGMUX_BIN" --config "$cfg" >"$PGMUX_LOG" 2>&1 &
    PGMUX_PID=$!
    if ! wait_ready pgmux "$PGMUX_PORT" "$PGMUX_PID"; then
        log "pgmux log:"; cat "$PGMUX_LOG" >&2
        die "pgmux did not accept connections within 20 s"
    fi
}

# -------------------------------------------------------------- PgBouncer ---
# PgBouncer tracks protocol-level prepared statements in transaction mode
# only from 1.21 on.
pgbouncer_has_prepared() {
    local v
    v=$("$PGBOUNCER_BIN" --version 2>/dev/null | head -n1 | grep -oE '[0-9]+\.[0-9]+' | head -n1)
    awk -v v="${v:-0.0}" 'BEGIN { split(v, a, "."); exit !(a[1] > 1 || (a[1] == 1 && a[2] >= 21)) }'
}

start_pgbouncer() {
    PGBOUNCER_PORT=$(free_port)
    local ini="$WORK/pgbouncer.ini" auth="$WORK/userlist.txt"
    PGBOUNCER_LOG="$WORK/pgbouncer.log"
    PGBOUNCER_PIDFILE="$WORK/pgbouncer.pid"
    printf '"bench" "bench"\n' >"$auth"
    cat >"$ini" <<EOF
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench
bench_session = host=127.0.0.1 port=$PG_PORT dbname=bench pool_mode=session

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGBOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $auth
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = 1000
ignore_startup_parameters = extra_float_digits,options
logfile = $PGBOUNCER_LOG
pidfile = $PGBOUNCER_PIDFILE
log_connections = 0
log_disconnections = 0
$(pgbouncer_has_prepared && echo "max_prepared_statements = 200")
EOF
    if is_root; then chown postgres:postgres "$ini" "$auth"; fi
    chmod 600 "$auth"
    log "starting $("$PGBOUNCER_BIN" --version | head -n1) on 127.0.0.1:$PGBOUNCER_PORT (pool $POOL)"
    if ((${#WRAP[@]} > 0)); then
        # Under valgrind PgBouncer stays in the foreground: a daemon's
        # fork leaves callgrind's control pipe with the parent that exits.
        as_pg "${WRAP[@]}" "$PGBOUNCER_BIN" "$ini" >"$WORK/pgbouncer.stdout" 2>&1 &
    else
        as_pg "$PGBOUNCER_BIN" -d "$ini" >"$WORK/pgbouncer.stdout" 2>&1 \
            || { cat "$WORK/pgbouncer.stdout" "$PGBOUNCER_LOG" >&2 2>/dev/null; die "pgbouncer failed to start"; }
    fi
    if ! wait_ready PgBouncer "$PGBOUNCER_PORT"; then
        cat "$PGBOUNCER_LOG" >&2 2>/dev/null
        die "PgBouncer did not accept connections within 20 s"
    fi
}

# ---------------------------------------------------------------- pgbench ---
# pgbench arguments for a mode name (one entry of $MODES).
mode_args() {
    case $1 in
        simple|extended|prepared) printf '%s\n' -S -M "$1" ;;
        *) die "unknown mode '$1' (known: simple extended prepared)" ;;
    esac
}

ROWS=()   # "target|mode|tps|latency|failed|cpu_us|ir_per_txn|syscalls_per_txn|status"

# utime + stime of a process, in clock ticks.
cpu_ticks() {
    awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0
}

# The proxy process behind a target name (none for direct).
proxy_pid() {
    case $1 in
        pgmux*) echo "$PGMUX_PID" ;;
        PgBouncer) cat "$PGBOUNCER_PIDFILE" 2>/dev/null ;;
    esac
}

# run_pgbench TARGET_NAME PORT EXTRA_ARGS...
#   A WARMUP-second run, then a DURATION-second measured run; appends a row
#   to ROWS. The mode label is taken from $CURRENT_MODE.
run_pgbench() {
    local name=$1 port=$2 db=$3
    shift 3
    local out="$WORK/pgbench-${name// /_}-${CURRENT_MODE}.log"
    local -a common=(-n -c "$CLIENTS" -j "$JOBS" -h 127.0.0.1 -p "$port" -U bench)
    local rc=0

    log "$name [$CURRENT_MODE]: warm-up ${WARMUP}s"
    PGPASSWORD=bench run_child timeout -k 10 $((WARMUP + 60)) \
        pgbench "${common[@]}" -T "$WARMUP" "$@" "$db" >"$out.warmup" 2>&1 \
        || log "$name [$CURRENT_MODE]: warm-up exited with $? (see below if the measured run fails too)"

    log "$name [$CURRENT_MODE]: measuring ${DURATION}s: pgbench ${common[*]} -T $DURATION $* $db"
    local ppid ticks0=0 ticks1=0
    ppid=$(proxy_pid "$name")
    [[ -n "$ppid" ]] && ticks0=$(cpu_ticks "$ppid")
    local label="${name// /_}-$CURRENT_MODE"
    [[ -n "$ppid" ]] && callgrind_toggle "$ppid" on
    [[ -n "$ppid" ]] && strace_attach "$ppid" "$label"
    PGPASSWORD=bench run_child timeout -k 10 $((DURATION + 120)) \
        pgbench "${common[@]}" -T "$DURATION" "$@" "$db" >"$out" 2>&1 || rc=$?
    [[ -n "$ppid" ]] && ticks1=$(cpu_ticks "$ppid")
    local ir="" calls=""
    [[ -n "$ppid" ]] && ir=$(callgrind_toggle "$ppid" off "$label")
    [[ -n "$ppid" ]] && calls=$(strace_detach "$label")
    local txns cpu_us=n/a ir_txn="" sys_txn=""
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out" | head -n1)
    if [[ -n "$ppid" && -n "$txns" && "$txns" -gt 0 ]]; then
        cpu_us=$(awk -v t=$((ticks1 - ticks0)) -v hz="$(getconf CLK_TCK)" -v n="$txns" 'BEGIN { printf "%.1f", t / hz / n * 1e6 }')
        if [[ -n "$ir" && "$ir" -gt 0 ]]; then ir_txn=$((ir / txns)); fi
        if [[ -n "$calls" && "$calls" -gt 0 ]]; then
            sys_txn=$(awk -v c="$calls" -v n="$txns" 'BEGIN { printf "%.2f", c / n }')
        fi
    fi

    local tps lat failed status=ok
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$out" | head -n1)
    lat=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$out" | head -n1)
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out" | head -n1)
    if ((rc != 0)); then
        status="rc=$rc"
        local aborted
        aborted=$(grep -c 'aborted in command' "$out" || true)
        if ((aborted > 0)); then
            status="$status, $aborted/$CLIENTS clients aborted"
        fi
    fi
    if [[ -n "$tps" ]]; then
        tps=$(awk -v x="$tps" 'BEGIN { printf "%.1f", x }')
    else
        tps="n/a"
        if [[ "$status" == ok ]]; then status="no tps in output"; fi
    fi
    if [[ "$status" != ok ]]; then
        log "$name [$CURRENT_MODE]: pgbench status $status; last lines of its output:"
        tail -n 20 "$out" >&2
    fi
    ROWS+=("$name|$CURRENT_MODE|$tps|${lat:-n/a}|${failed:-n/a}|$cpu_us|$ir_txn|$sys_txn|$status")
}

# cg_control PID ARGS...: callgrind_control as the process's owner (its
# vgdb pipes are that user's: PgBouncer runs as postgres).
cg_control() {
    local pid=$1 owner
    shift
    owner=$(stat -c %U "/proc/$pid")
    if is_root && [[ "$owner" != root ]]; then
        runuser -u "$owner" -- callgrind_control "$@" "$pid"
    else
        callgrind_control "$@" "$pid"
    fi
}

# callgrind_toggle PID on|off [LABEL]: with CALLGRIND=1, start counting
# the proxy's instructions, or stop, dump (LABEL names the dump) and print
# how many it executed since "on".
callgrind_toggle() {
    [[ -n "$CALLGRIND" ]] || return 0
    local pid=$1 how=$2 label=${3:-}
    if [[ $how == on ]]; then
        cg_control "$pid" -z >/dev/null 2>&1
        cg_control "$pid" -i on >/dev/null 2>&1 || log "callgrind_control -i on $pid failed"
        return 0
    fi
    cg_control "$pid" -i off >/dev/null 2>&1
    cg_control "$pid" --dump="$label" >/dev/null 2>&1 || log "callgrind_control --dump $pid failed"
    local f
    f=$(grep -l "^desc: Trigger: .*$label" "$CG_DIR"/callgrind.* 2>/dev/null | tail -n1)
    [[ -n "$f" ]] || { log "no callgrind dump for $label"; echo 0; return 0; }
    callgrind_annotate --threshold=99 "$f" 2>/dev/null | head -n 60 >"$WORK/callgrind-$label.log"
    callgrind_annotate --inclusive=yes --threshold=99 "$f" 2>/dev/null | head -n 100 >"$WORK/callgrind-$label.inclusive.log"
    cp "$f" "$WORK/callgrind-$label.out"
    sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$f" | head -n1
}

# strace_attach PID LABEL: with STRACE=1, count the proxy's system calls
# (all its threads) until strace_detach.
strace_attach() {
    [[ -n "$STRACE" ]] || return 0
    strace -c -f -q -p "$1" -o "$WORK/strace-$2.log" 2>/dev/null &
    STRACE_PID=$!
    sleep 0.5 # attached before the run starts
}

# strace_detach LABEL: stop counting; print the number of calls made.
strace_detach() {
    [[ -n "$STRACE" && -n "$STRACE_PID" ]] || return 0
    kill -INT "$STRACE_PID" 2>/dev/null
    wait "$STRACE_PID" 2>/dev/null || true
    STRACE_PID=""
    awk '$NF == "total" { print $4 }' "$WORK/strace-$1.log" 2>/dev/null
}

# DDL through pgmux every DDL_EVERY seconds (counted in $WORK/ddl.count).
ddl_loop() {
    local n=0
    while true; do
        PGPASSWORD=bench psql -h 127.0.0.1 -p "$PGMUX_PORT" -U bench -d bench -qX \
            -c "ALTER TABLE pgbench_branches ALTER COLUMN filler SET DEFAULT 'x'" >/dev/null 2>&1 \
            && n=$((n + 1)) && echo "$n" >"$WORK/ddl.count"
        sleep "$DDL_EVERY"
    done
}

# ratio NUM DEN -> "1.23" or "n/a"
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN {
        if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b + 0 > 0) printf "%.2f", a / b;
        else printf "n/a" }'
}

lookup_tps() {
    local target=$1 mode=$2 row t m tps
    for row in "${ROWS[@]}"; do
        IFS='|' read -r t m tps _ <<<"$row"
        if [[ "$t" == "$target" && "$m" == "$mode" ]]; then printf '%s' "$tps"; return; fi
    done
    printf 'n/a'
}

summary() {
    local commit pgver bver
    commit=$(GIT_OPTIONAL_LOCKS=0 git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
    pgver=$("$PGBIN/postgres" --version 2>/dev/null || echo unknown)
    bver=$("$PGBOUNCER_BIN" --version 2>/dev/null | head -n1 || echo unknown)
    echo "pgmux benchmark — $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "commit $commit | $pgver | $bver | $(nproc) cores"
    echo "pgbench -S -c $CLIENTS -j $JOBS -T $DURATION (warm-up ${WARMUP}s), scale $SCALE, pool $POOL, transaction mode, 127.0.0.1"
    echo
    printf '%-10s %-9s %12s %16s %8s %14s  %s\n' target mode tps "mean lat (ms)" failed "proxy CPU/txn" status
    printf '%-10s %-9s %12s %16s %8s %14s  %s\n' ---------- --------- ------------ ---------------- -------- -------------- ------
    local row t m tps lat failed cpu ir calls status
    for row in "${ROWS[@]}"; do
        IFS='|' read -r t m tps lat failed cpu ir calls status <<<"$row"
        printf '%-10s %-9s %12s %16s %8s %11s us  %s%s%s\n' "$t" "$m" "$tps" "$lat" "$failed" "$cpu" \
            "${ir:+$ir Ir/txn  }" "${calls:+$calls sys/txn  }" "$status"
    done
    echo "(proxy CPU/txn: user+system CPU time the proxy process used per transaction; lower is better,"
    echo " and steadier than tps on a box where pgbench, PostgreSQL and the proxy share $(nproc) cores)"
    echo
    local mode
    for mode in $MODES; do
        printf '%-9s pgmux/PgBouncer = %sx   pgmux/direct = %sx   (PgBouncer/direct = %sx)\n' "$mode" \
            "$(ratio "$(lookup_tps pgmux "$mode")" "$(lookup_tps PgBouncer "$mode")")" \
            "$(ratio "$(lookup_tps pgmux "$mode")" "$(lookup_tps direct "$mode")")" \
            "$(ratio "$(lookup_tps PgBouncer "$mode")" "$(lookup_tps direct "$mode")")"
    done
    if ((${#REPLICA_PORTS[@]} > 0)); then
        printf 'readscale pgmux with %s replicas / pgmux primary only = %sx   (on %s cores pgbench, PostgreSQL x%s and pgmux share the CPU: reads cannot scale here)\n' \
            "${#REPLICA_PORTS[@]}" "$(ratio "$(lookup_tps pgmux+replicas readscale)" "$(lookup_tps pgmux readscale)")" \
            "$(nproc)" "$((${#REPLICA_PORTS[@]} + 1))"
    fi
    if [[ "$SHARDS" == 2 ]]; then
        printf 'sharded   pgmux over 2 shards / pgmux one database = %sx   (keyed reads, both shards on one server: the cost of routing by key)\n' \
            "$(ratio "$(lookup_tps pgmux+shards sharded)" "$(lookup_tps pgmux sharded)")"
        printf 'pipeline  pgmux over 2 shards / pgmux one database = %sx   (8 keyed reads per pipeline, extended: batches for the shard in flight go on together)\n' \
            "$(ratio "$(lookup_tps pgmux+shards pipeline)" "$(lookup_tps pgmux pipeline)")"
        printf 'insert    pgmux over 2 shards / pgmux one database = %sx   (4-row INSERTs cut per shard, each a transaction across both shards; no 2PC)\n' \
            "$(ratio "$(lookup_tps pgmux+shards insert)" "$(lookup_tps pgmux insert)")"
    fi
    if [[ "$DDL_EVERY" != 0 ]]; then
        printf 'ddl       pgmux with DDL every %ss (%s ran) / pgmux without = %sx   (-S -M prepared)\n' \
            "$DDL_EVERY" "${DDL_RUNS:-0}" "$(ratio "$(lookup_tps pgmux+ddl ddl)" "$(lookup_tps pgmux ddl)")"
    fi
    printf 'prepared  pgmux(-M prepared)/PgBouncer(-S simple) = %sx\n' \
        "$(ratio "$(lookup_tps pgmux prepared)" "$(lookup_tps PgBouncer simple)")"
    echo "goal: pgmux >= 1.00x PgBouncer (project goal 1.15x), >= 0.70x direct;"
    echo "      pgmux -M prepared >= 1.10x PgBouncer -S simple and >= 0.70x direct -M prepared"
    if [[ -n "${BOUNCER_NOTE:-}" ]]; then echo "note: $BOUNCER_NOTE"; fi
    echo "load average before / after the runs: $LOAD_BEFORE / $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)" \
         "(other work on this $(nproc)-core box skews the numbers)"
    local errs
    errs=$(grep -ciE 'error|panic' "$PGMUX_LOG" 2>/dev/null || true)
    echo "pgmux log: $(wc -l <"$PGMUX_LOG" 2>/dev/null || echo 0) lines, ${errs:-0} mentioning error/panic"
    echo "total run time: $((SECONDS - START_SECONDS)) s"
}

# ------------------------------------------------------------------- main ---
main() {
    ensure_tools
    if [[ -z "$SKIP_BUILD" ]]; then
        log "cargo build --release (in $ROOT)"
        (cd "$ROOT" && cargo build --release)
    fi
    [[ -x "$PGMUX_BIN" ]] || die "$PGMUX_BIN not found"

    WORK=$(mktemp -d "${TMPDIR:-/tmp}/pgmux-bench.XXXXXX")
    chmod 755 "$WORK"
    if [[ -n "$CALLGRIND" ]]; then
        need_tools valgrind callgrind_control callgrind_annotate
        CG_DIR="$WORK/callgrind"
        mkdir -m 777 "$CG_DIR"
        WRAP=(valgrind --tool=callgrind --instr-atstart=no "--callgrind-out-file=$CG_DIR/callgrind.%p")
    fi
    if [[ -n "$STRACE" ]]; then need_tools strace; fi
    start_postgres
    start_replicas
    start_pgmux
    start_pgbouncer

    LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)
    local mode tgt bouncer t port db
    local -a args targets
    for mode in $MODES; do
        mapfile -t args < <(mode_args "$mode")
        ((${#args[@]} > 0)) || die "unknown mode '$mode'"
        CURRENT_MODE=$mode
        # PgBouncer before 1.21 cannot run -M prepared in transaction mode:
        # that row uses its session mode instead (and says so).
        bouncer="PgBouncer:$PGBOUNCER_PORT:bench"
        if [[ $mode == prepared ]] && ! pgbouncer_has_prepared; then
            bouncer="PgBouncer:$PGBOUNCER_PORT:bench_session"
            BOUNCER_NOTE="PgBouncer $("$PGBOUNCER_BIN" --version | head -n1 | grep -oE '[0-9.]+' | head -n1) has no prepared-statement support in transaction mode (1.21+): its 'prepared' row ran in SESSION mode."
        fi
        targets=("direct:$PG_PORT:bench" "pgmux:$PGMUX_PORT:bench" "$bouncer")
        for tgt in "${targets[@]}"; do
            IFS=: read -r t port db <<<"$tgt"
            run_pgbench "$t" "$port" "$db" "${args[@]}"
        done
    done

    if ((${#REPLICA_PORTS[@]} > 0)); then
        # Read scaling: the same -S load through pgmux, primary only vs
        # reads spread over the replicas.
        CURRENT_MODE=readscale
        run_pgbench "pgmux" "$PGMUX_PORT" bench -S -M simple
        run_pgbench "pgmux+replicas" "$PGMUX_PORT" bench_rw -S -M simple
    fi

    if [[ "$SHARDS" == 2 ]]; then
        # Sharding: the same keyed reads (custom script on aid) through
        # pgmux, one database vs two shards; the cost of routing by key.
        CURRENT_MODE=sharded
        run_pgbench "pgmux" "$PGMUX_PORT" bench -f "$WORK/keyed.sql" -D "scale=$SCALE" -M simple
        run_pgbench "pgmux+shards" "$PGMUX_PORT" bench_sharded -f "$WORK/keyed.sql" -D "scale=$SCALE" -M simple
        # The same keyed reads, eight to a pipeline (extended protocol).
        CURRENT_MODE=pipeline
        run_pgbench "pgmux" "$PGMUX_PORT" bench -f "$WORK/pipeline.sql" -D "scale=$SCALE" -M extended
        run_pgbench "pgmux+shards" "$PGMUX_PORT" bench_sharded -f "$WORK/pipeline.sql" -D "scale=$SCALE" -M extended
        # Multi-row INSERTs: one database vs cut over two shards.
        CURRENT_MODE=insert
        run_pgbench "pgmux" "$PGMUX_PORT" bench -f "$WORK/insert.sql" -M simple
        run_pgbench "pgmux+shards" "$PGMUX_PORT" bench_sharded -f "$WORK/insert.sql" -M simple
    fi

    if [[ "$DDL_EVERY" != 0 ]]; then
        # Schema changes under load: DDL relayed through pgmux makes it
        # drop every prepared statement of the database (each connection
        # prepares again on next use).
        CURRENT_MODE=ddl
        run_pgbench "pgmux" "$PGMUX_PORT" bench -S -M prepared
        ddl_loop &
        DDL_PID=$!
        run_pgbench "pgmux+ddl" "$PGMUX_PORT" bench -S -M prepared
        kill "$DDL_PID" 2>/dev/null
        wait "$DDL_PID" 2>/dev/null || true
        DDL_RUNS=$(cat "$WORK/ddl.count" 2>/dev/null || echo 0)
        DDL_PID=""
    fi

    if ! kill -0 "$PGMUX_PID" 2>/dev/null; then
        log "pgmux exited during the benchmark!"
    fi
    if [[ -s "$PGMUX_LOG" ]]; then
        log "pgmux log (last 20 lines):"
        tail -n 20 "$PGMUX_LOG" >&2
    fi

    mkdir -p "$RESULTS_DIR/logs"
    rm -f "$RESULTS_DIR"/logs/*
    cp "$WORK"/*.log "$WORK"/*.log.warmup "$WORK"/*.out "$WORK"/*.toml "$WORK"/*.ini "$RESULTS_DIR/logs/" 2>/dev/null || true
    summary | tee "$RESULTS_DIR/latest.txt"
    log "logs of this run: $RESULTS_DIR/logs/"
}

main "$@"
