#!/usr/bin/env bash
# scripts/psycopg-suite.sh — run psycopg 3's own test suite directly against
# PostgreSQL and through pgmux (session mode and transaction mode), and
# through PgBouncer for reference when it is installed; report what breaks
# only behind a proxy.
#
# Not run by CI: run it by hand and report the results. One run takes a while
# (each endpoint's pytest run is a few minutes to ~20 minutes).
#
# What it does, on loopback (127.0.0.1) only, bounded in time:
#   1. finds the psycopg version to test: $PSYCOPG_VERSION, else the version
#      of psycopg the system python3 has installed (else the newest on PyPI),
#      and makes (or reuses) a virtualenv in $PSYCOPG_SUITE_CACHE with
#      psycopg[binary]==VERSION, psycopg-pool and the suite's test deps
#      (pytest, anyio, pproxy, dnspython, pytest-timeout; $EXTRA_PIP more);
#   2. finds psycopg's test suite: the checkout given as $1 or $PSYCOPG_SRC
#      (a psycopg git checkout / `git archive` of the release tag, with
#      tests/conftest.py); else `pip download --no-binary :all:` of the sdist,
#      used if it ships tests/ (psycopg's does not, at least up to 3.3.x);
#      else prints how to get it and exits 2. A version mismatch between the
#      checkout and the installed psycopg is warned about and recorded;
#   3. starts a throw-away PostgreSQL primary per endpoint (initdb in a
#      mktemp -d dir, free port, max_prepared_transactions = 10 as psycopg's
#      CI does) with the superuser `postgres` (password login over TCP) and
#      database psycopg_test; as root the server binaries run through
#      `runuser -u postgres --`. One server per endpoint: no run sees what
#      another left (prepared transactions, roles, types), and PARALLEL=1
#      runs cannot collide;
#   4. builds pgmux (`cargo build --release`, unless $PGMUX_BIN is given) and
#      starts two pgmux processes, one with pool_mode = "session" and one in
#      transaction mode, pool size $POOL, both serving database psycopg_test
#      under its own name; if `pgbouncer` is on PATH, two PgBouncers likewise
#      (transaction and session mode);
#   5. runs `pytest tests` (all of it, no xdist, -p no:randomly, -q,
#      --timeout=$TEST_TIMEOUT per test, junit xml) once per endpoint with
#      PSYCOPG_TEST_DSN pointing at it, each run bounded by $RUN_TIMEOUT
#      (SIGTERM -> KeyboardInterrupt, so a cut run still writes its junit);
#      one run after the other, or all at once with PARALLEL=1;
#   6. prints per endpoint the passed/failed/error/skipped counts and the tests
#      that fail or error through each proxy endpoint but pass directly
#      (scripts/psycopg_suite_compare.py), and writes them to $RESULTS_DIR
#      (<endpoint>.txt, summary.txt, <endpoint>.xml/.log, logs/);
#   7. tears everything down on every exit path (trap on EXIT/INT/TERM).
#
# Usage:
#   bash scripts/psycopg-suite.sh [PSYCOPG_SOURCE_DIR]
#   PSYCOPG_SRC=/tmp/psycopg-src bash scripts/psycopg-suite.sh
#   ENDPOINTS="direct pgmux-transaction" PGMUX_BIN=target/release/pgmux \
#       bash scripts/psycopg-suite.sh /tmp/psycopg-src
#
# Getting the source (nothing of psycopg is ever committed to this repo):
#   git clone https://github.com/psycopg/psycopg /tmp/psycopg-git
#   git -C /tmp/psycopg-git archive "$VERSION" | tar -x -C /tmp/psycopg-src
#
# Environment variables (defaults in brackets):
#   PSYCOPG_SRC       psycopg source checkout (or pass it as $1)          [unset]
#   PSYCOPG_VERSION   psycopg version to install and test   [system python's]
#   PSYCOPG_SUITE_CACHE  where the virtualenv and sdist go
#                                    [${XDG_CACHE_HOME:-~/.cache}/pgmux-psycopg-suite]
#   PGMUX_BIN         pgmux binary to use; unset = cargo build --release  [unset]
#   PGMUX_NOTE        free text about that binary for the summary header  [unset]
#   ENDPOINTS         which runs, in order (pgbouncer-* skipped when PgBouncer
#                     is absent)     [direct pgmux-session pgmux-transaction
#                                     pgbouncer-transaction pgbouncer-session]
#   POOL              server pool size of every proxy pool                 [8]
#   RUN_TIMEOUT       seconds one endpoint's pytest run may take        [1200]
#   TEST_TIMEOUT      seconds one test may take (pytest-timeout)          [60]
#   RESULTS_DIR       where results go               [target/psycopg-suite]
#   EXTRA_PIP         more packages for the venv (e.g. "numpy shapely gevent")
#   WITH_MYPY=1       also install mypy and run the suite's mypy tests; by
#                     default they are deselected (-m "not mypy"): they only
#                     type-check snippets, never touch the server, and cost
#                     minutes of CPU per run                             [unset]
#   PARALLEL=1        run the endpoints' pytest runs at the same time (each
#                     still one process, no xdist; the suite mostly sleeps
#                     and waits, ~10% of a core per run): total time ~ the
#                     slowest run instead of the sum. Timing-based tests get
#                     flakier. Default: one run after the other.        [unset]
#   TESTS             what pytest runs, shell words relative to the suite's
#                     root: the whole suite; a subset only when time is
#                     short, e.g. TESTS="tests/pq tests/test_connection.py" [tests]
#   NICE              nice level of the pytest runs                        [5]
#   PYTEST_ARGS       extra pytest arguments, shell words (e.g.
#                     PYTEST_ARGS='-k "notify or copy"')                  [unset]
#
# Exit status: 0 when every requested run finished (whatever its test
# results), 1 on a setup failure or when a run could not produce results,
# 2 when no psycopg test suite could be found.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$SCRIPT_DIR")

PSYCOPG_SRC=${1:-${PSYCOPG_SRC:-}}
PSYCOPG_VERSION=${PSYCOPG_VERSION:-}
PSYCOPG_SUITE_CACHE=${PSYCOPG_SUITE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pgmux-psycopg-suite}
PGMUX_BIN=${PGMUX_BIN:-}
PGMUX_NOTE=${PGMUX_NOTE:-}
ENDPOINTS=${ENDPOINTS:-direct pgmux-session pgmux-transaction pgbouncer-transaction pgbouncer-session}
POOL=${POOL:-8}
RUN_TIMEOUT=${RUN_TIMEOUT:-1200}
TEST_TIMEOUT=${TEST_TIMEOUT:-60}
RESULTS_DIR=${RESULTS_DIR:-$ROOT/target/psycopg-suite}
EXTRA_PIP=${EXTRA_PIP:-}
WITH_MYPY=${WITH_MYPY:-}
PYTEST_ARGS=${PYTEST_ARGS:-}
PARALLEL=${PARALLEL:-}
TESTS=${TESTS:-tests}
NICE=${NICE:-5}

# Login the suite uses everywhere (the server's superuser: some tests need it,
# e.g. CREATE EXTENSION hstore, two-phase commit, pg_terminate_backend).
DB_USER=postgres
DB_PASSWORD=psycopg-suite-pw
DB_NAME=psycopg_test
READY_USER=$DB_USER READY_PASSWORD=$DB_PASSWORD READY_DB=$DB_NAME

# Keep the original stdout/stderr: a signal trap can fire inside a function
# whose output is redirected to a log file.
exec 3>&1 4>&2
START_SECONDS=$SECONDS
WORK=""
PGBIN=""
VENV=""
SRC_VERSION=""
SRC_DESC=""
# Per endpoint (direct, pgmux-session, ...): its PostgreSQL, its proxy, its run.
declare -A PG_DATA=() PG_PORTS=() PGMUX_PID=() PGMUX_PORT=() BOUNCER_PIDFILE=() BOUNCER_PORT=()
declare -A RUN_PID=() RUN_T0=()

LOG_TAG=psycopg-suite
# shellcheck source=pgtools.sh
. "$SCRIPT_DIR/pgtools.sh"

# Stop a process by pid: TERM, up to 5 s, then KILL.
stop_pid() {
    local pid=$1
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------- cleanup ---
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    exec 1>&3 2>&4
    local m pid
    # pytest runs still going: TERM (they write their junit xml), 10 s, KILL.
    for pid in "${RUN_PID[@]}"; do
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            log "stopping a running child (pid $pid)"
            kill -TERM "$pid" 2>/dev/null
        fi
    done
    for pid in "${RUN_PID[@]}"; do
        [[ -n "$pid" ]] || continue
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    for m in "${!BOUNCER_PIDFILE[@]}"; do
        if [[ -s "${BOUNCER_PIDFILE[$m]}" ]]; then
            log "stopping PgBouncer ($m)"
            stop_pid "$(cat "${BOUNCER_PIDFILE[$m]}")"
        fi
    done
    for m in "${!PGMUX_PID[@]}"; do
        if kill -0 "${PGMUX_PID[$m]}" 2>/dev/null; then
            log "stopping pgmux ($m, pid ${PGMUX_PID[$m]})"
            stop_pid "${PGMUX_PID[$m]}"
            wait "${PGMUX_PID[$m]}" 2>/dev/null
        fi
    done
    for m in "${!PG_DATA[@]}"; do
        log "stopping PostgreSQL ($m)"
        as_pg "$PGBIN/pg_ctl" -D "${PG_DATA[$m]}" stop -m immediate -w >/dev/null 2>&1
    done
    if [[ -n "$WORK" && -d "$WORK" ]]; then
        # Keep the server/proxy logs of the run before the temp dir goes.
        if [[ -d "$RESULTS_DIR" ]]; then
            mkdir -p "$RESULTS_DIR/logs"
            cp "$WORK"/*.log "$WORK"/*.toml "$WORK"/*.ini "$RESULTS_DIR/logs/" 2>/dev/null
        fi
        rm -rf "$WORK"
    fi
    log "done in $((SECONDS - START_SECONDS)) s (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ tools ---
ensure_tools() {
    PGBIN=$(find_pgbin)
    [[ -n "$PGBIN" ]] || die "initdb not found: install PostgreSQL 15 (apt-get install -y postgresql), or run scripts/test.sh once"
    need_tools psql python3 timeout
}

# ---------------------------------------------------------------- psycopg ---
# The version to test: $PSYCOPG_VERSION, else what the system python has.
find_version() {
    if [[ -z "$PSYCOPG_VERSION" ]]; then
        PSYCOPG_VERSION=$(python3 -c 'import psycopg; print(psycopg.__version__)' 2>/dev/null || true)
    fi
    if [[ -z "$PSYCOPG_VERSION" ]]; then
        log "no psycopg in the system python3 and no PSYCOPG_VERSION: asking pip for the newest"
        PSYCOPG_VERSION=$(python3 -m pip index versions psycopg 2>/dev/null \
            | sed -n 's/^psycopg (\([^)]*\)).*/\1/p' | head -n1 || true)
        [[ -n "$PSYCOPG_VERSION" ]] || die "cannot tell which psycopg to test: set PSYCOPG_VERSION"
    fi
    log "psycopg version under test: $PSYCOPG_VERSION"
}

# Version a source tree declares (psycopg/pyproject.toml, or an sdist's PKG-INFO).
source_version() {
    local src=$1
    if [[ -f "$src/psycopg/pyproject.toml" ]]; then
        sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$src/psycopg/pyproject.toml" | head -n1
    elif [[ -f "$src/PKG-INFO" ]]; then
        sed -n 's/^Version: *//p' "$src/PKG-INFO" | head -n1
    fi
}

no_suite() {
    cat >&4 <<EOF
No psycopg test suite found for psycopg $PSYCOPG_VERSION.
psycopg's sdist on PyPI does not ship tests/; get a source checkout of the
matching release and pass it to this script, e.g.:

    git clone https://github.com/psycopg/psycopg /tmp/psycopg-git
    mkdir -p /tmp/psycopg-src
    git -C /tmp/psycopg-git archive $PSYCOPG_VERSION | tar -x -C /tmp/psycopg-src
    PSYCOPG_SRC=/tmp/psycopg-src bash scripts/psycopg-suite.sh

(keep it outside this repository: psycopg's code is never committed here)
EOF
    exit 2
}

# Sets PSYCOPG_SRC to a tree with tests/conftest.py, or exits 2.
find_suite() {
    if [[ -n "$PSYCOPG_SRC" ]]; then
        [[ -f "$PSYCOPG_SRC/tests/conftest.py" ]] \
            || { log "PSYCOPG_SRC=$PSYCOPG_SRC has no tests/conftest.py"; no_suite; }
        PSYCOPG_SRC=$(cd "$PSYCOPG_SRC" && pwd)
        SRC_DESC="source checkout $PSYCOPG_SRC"
    else
        local sd="$PSYCOPG_SUITE_CACHE/sdist-$PSYCOPG_VERSION"
        if [[ ! -d "$sd/psycopg-$PSYCOPG_VERSION" ]]; then
            log "no PSYCOPG_SRC: trying the sdist (pip download --no-binary :all: psycopg==$PSYCOPG_VERSION)"
            mkdir -p "$sd"
            if timeout 300 python3 -m pip download -q --no-deps --no-binary :all: \
                "psycopg==$PSYCOPG_VERSION" -d "$sd" >&2; then
                tar -xzf "$sd/psycopg-$PSYCOPG_VERSION.tar.gz" -C "$sd" 2>/dev/null || true
            fi
        fi
        if [[ -f "$sd/psycopg-$PSYCOPG_VERSION/tests/conftest.py" ]]; then
            PSYCOPG_SRC="$sd/psycopg-$PSYCOPG_VERSION"
            SRC_DESC="sdist psycopg-$PSYCOPG_VERSION.tar.gz"
        else
            log "the psycopg $PSYCOPG_VERSION sdist has no tests/"
            no_suite
        fi
    fi
    SRC_VERSION=$(source_version "$PSYCOPG_SRC")
    if [[ -n "$SRC_VERSION" && "$SRC_VERSION" != "$PSYCOPG_VERSION" ]]; then
        log "WARNING: the test suite is from psycopg $SRC_VERSION but psycopg $PSYCOPG_VERSION is installed:"
        log "WARNING: tests of behaviour changed in between fail everywhere (directly too); compare endpoints, not absolutes"
    fi
    log "test suite: $SRC_DESC (declares version ${SRC_VERSION:-unknown})"
}

# The virtualenv with psycopg==VERSION and the test deps; reused when its
# requirement list is unchanged.
ensure_venv() {
    local pyver reqs
    pyver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    VENV="$PSYCOPG_SUITE_CACHE/venv-py$pyver-psycopg$PSYCOPG_VERSION"
    reqs="psycopg[binary]==$PSYCOPG_VERSION psycopg-pool pytest anyio>=4.0 pproxy>=2.7 pytest-timeout dnspython"
    [[ -n "$WITH_MYPY" ]] && reqs+=" mypy"
    [[ -n "$EXTRA_PIP" ]] && reqs+=" $EXTRA_PIP"
    if [[ -x "$VENV/bin/python" && "$(cat "$VENV/.pgmux-reqs" 2>/dev/null)" == "$reqs" ]]; then
        log "reusing virtualenv $VENV"
    else
        log "creating virtualenv $VENV: $reqs"
        rm -rf "$VENV"
        mkdir -p "$PSYCOPG_SUITE_CACHE"
        python3 -m venv "$VENV"
        # shellcheck disable=SC2086 # word splitting of the list is intended
        timeout 900 "$VENV/bin/python" -m pip install -q --disable-pip-version-check $reqs >&2 \
            || { rm -rf "$VENV"; die "pip install into $VENV failed"; }
        printf '%s' "$reqs" >"$VENV/.pgmux-reqs"
    fi
    local got
    got=$("$VENV/bin/python" -c 'import psycopg; print(psycopg.__version__, psycopg.pq.__impl__)')
    log "venv psycopg: $got; $("$VENV/bin/python" -m pytest --version 2>&1 | head -n1)"
}

# ------------------------------------------------------------- PostgreSQL ---
# pg_admin PORT psql-args...: psql as the superuser over the temp-dir socket.
pg_admin() {
    local port=$1
    shift
    psql -X -q -v ON_ERROR_STOP=1 -h "$WORK" -p "$port" -U postgres -d postgres "$@"
}

# start_postgres KEY: a fresh primary for endpoint KEY (each endpoint has its
# own, so no run sees another's leftovers: prepared transactions, roles,
# types, and runs can go on at the same time with PARALLEL=1).
start_postgres() {
    local key=$1 PGDATA PG_PORT
    PGDATA="$WORK/pgdata-$key"
    PG_PORT=$(free_port)
    init_cluster "$PGDATA" "$PG_PORT" "$WORK/initdb-$key.log" scripts/psycopg-suite.sh
    echo "max_prepared_transactions = 10" >>"$PGDATA/postgresql.conf"
    cat >"$PGDATA/pg_hba.conf" <<EOF
local all all trust
host  all all 127.0.0.1/32 scram-sha-256
EOF
    if is_root; then chown postgres:postgres "$PGDATA/postgresql.conf" "$PGDATA/pg_hba.conf"; fi
    log "starting PostgreSQL ($("$PGBIN/postgres" --version)) for $key on 127.0.0.1:$PG_PORT"
    touch "$WORK/postgres-$key.log"
    if is_root; then chown postgres:postgres "$WORK/postgres-$key.log"; fi
    PG_DATA[$key]=$PGDATA
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/postgres-$key.log" -w -t 60 start >/dev/null \
        || { cat "$WORK/postgres-$key.log" >&2; die "PostgreSQL ($key) did not start"; }
    PG_PORTS[$key]=$PG_PORT
    pg_admin "$PG_PORT" -c "ALTER ROLE postgres PASSWORD '$DB_PASSWORD'" \
             -c "CREATE DATABASE $DB_NAME"
}

# ------------------------------------------------------------------ pgmux ---
build_pgmux() {
    if [[ -n "$PGMUX_BIN" ]]; then
        [[ -x "$PGMUX_BIN" ]] || die "PGMUX_BIN=$PGMUX_BIN is not executable"
        log "using PGMUX_BIN=$PGMUX_BIN"
        return
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found (or set PGMUX_BIN)"
    log "cargo build --release (in $ROOT)"
    (cd "$ROOT" && nice -n 5 cargo build --release) >&2 || die "cargo build --release failed"
    PGMUX_BIN="$ROOT/target/release/pgmux"
    [[ -x "$PGMUX_BIN" ]] || die "$PGMUX_BIN not found after the build"
}

# start_pgmux MODE: one pgmux process serving psycopg_test in MODE
# ("session" or "transaction"), under the server's own database name so that
# tests comparing current_database() with the dsn see no difference.
start_pgmux() {
    local mode=$1 port cfg logf
    port=$(free_port)
    cfg="$WORK/pgmux-$mode.toml"
    logf="$WORK/pgmux-$mode.log"
    cat >"$cfg" <<EOF
[pgmux]
listen = "127.0.0.1:$port"
log_level = "warn"
worker_threads = 2

[pool]
pool_mode = "$mode"
default_pool_size = $POOL
# A client waiting for a server connection this long (all $POOL taken, e.g.
# by connections a test leaked) gets an error instead of hanging its test.
query_wait_timeout = "30s"

[[users]]
name = "$DB_USER"
password = "$DB_PASSWORD"

[databases.$DB_NAME]
primary = "127.0.0.1:${PG_PORTS[pgmux-$mode]}"
EOF
    log "starting pgmux ($mode mode, pool $POOL) on 127.0.0.1:$port"
    "$PGMUX_BIN" --config "$cfg" >>"$logf" 2>&1 &
    PGMUX_PID[$mode]=$!
    PGMUX_PORT[$mode]=$port
    if ! wait_ready "pgmux ($mode)" "$port" "${PGMUX_PID[$mode]}"; then
        tail -n 40 "$logf" >&2
        die "pgmux ($mode) did not accept connections within 20 s"
    fi
}

# -------------------------------------------------------------- PgBouncer ---
# start_pgbouncer MODE: one PgBouncer serving psycopg_test in MODE.
start_pgbouncer() {
    local mode=$1 port ini auth
    port=$(free_port)
    ini="$WORK/pgbouncer-$mode.ini"
    auth="$WORK/userlist-$mode.txt"
    printf '"%s" "%s"\n' "$DB_USER" "$DB_PASSWORD" >"$auth"
    cat >"$ini" <<EOF
[databases]
$DB_NAME = host=127.0.0.1 port=${PG_PORTS[pgbouncer-$mode]} dbname=$DB_NAME

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $auth
pool_mode = $mode
default_pool_size = $POOL
max_client_conn = 1000
query_wait_timeout = 30
ignore_startup_parameters = extra_float_digits
logfile = $WORK/pgbouncer-$mode.log
pidfile = $WORK/pgbouncer-$mode.pid
log_connections = 0
log_disconnections = 0
EOF
    if is_root; then chown postgres:postgres "$ini" "$auth"; fi
    chmod 600 "$auth"
    BOUNCER_PIDFILE[$mode]="$WORK/pgbouncer-$mode.pid"
    BOUNCER_PORT[$mode]=$port
    log "starting $(pgbouncer --version | head -n1) ($mode mode, pool $POOL) on 127.0.0.1:$port"
    as_pg pgbouncer -d "$ini" >"$WORK/pgbouncer-$mode.stdout.log" 2>&1 \
        || { cat "$WORK/pgbouncer-$mode.stdout.log" >&2; die "pgbouncer ($mode) failed to start"; }
    if ! wait_ready "PgBouncer ($mode)" "$port"; then
        tail -n 40 "$WORK/pgbouncer-$mode.log" >&2 2>/dev/null
        die "PgBouncer ($mode) did not accept connections within 20 s"
    fi
}

# ------------------------------------------------------------------ pytest ---
# ensure_endpoint EP: start EP's proxy if it is not running (again, if it
# exited during an earlier run) and set EP_PORT to the port to test.
# Not to be called in a $(...) subshell: the pids it records must stay here.
EP_PORT=""
ensure_endpoint() {
    local ep=$1 m
    [[ -n "${PG_PORTS[$ep]:-}" ]] || start_postgres "$ep"
    case $ep in
        direct) EP_PORT=${PG_PORTS[$ep]} ;;
        pgmux-session|pgmux-transaction)
            m=${ep#pgmux-}
            # (not kill -0 0: pid 0 is our own process group)
            if [[ -z "${PGMUX_PID[$m]:-}" ]] || ! kill -0 "${PGMUX_PID[$m]}" 2>/dev/null; then
                [[ -x "$PGMUX_BIN" ]] || die "PGMUX_BIN=$PGMUX_BIN is not executable"
                [[ -n "${PGMUX_PID[$m]:-}" ]] && log "pgmux ($m) is not running (exited earlier): starting it again"
                start_pgmux "$m"
            fi
            EP_PORT=${PGMUX_PORT[$m]} ;;
        pgbouncer-session|pgbouncer-transaction)
            m=${ep#pgbouncer-}
            if [[ -z "${BOUNCER_PORT[$m]:-}" ]]; then start_pgbouncer "$m"; fi
            EP_PORT=${BOUNCER_PORT[$m]} ;;
        *) die "unknown endpoint '$ep' (known: direct pgmux-session pgmux-transaction pgbouncer-transaction pgbouncer-session)" ;;
    esac
}

# The pytest launcher: SIGTERM (from `timeout` or from our cleanup) and SIGINT
# become KeyboardInterrupt, so that an interrupted run still ends its session
# and writes its junit xml. (A command started with & by a non-interactive
# shell has SIGINT ignored, and python then installs no handler of its own.)
PYTEST_LAUNCHER='
import signal, sys
def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
signal.signal(signal.SIGINT, _interrupt)
signal.signal(signal.SIGTERM, _interrupt)
import pytest
sys.exit(pytest.main(sys.argv[1:]))
'

RUN_FAILED=()

# start_run EP: start EP's servers if needed and its pytest run in the
# background (pid in RUN_PID[EP]). Each run has its own copy of the suite,
# pytest cache and basetemp, so runs can go on at the same time.
start_run() {
    local ep=$1 port
    ensure_endpoint "$ep"
    port=$EP_PORT
    local dsn="host=127.0.0.1 port=$port user=$DB_USER password=$DB_PASSWORD dbname=$DB_NAME"
    # conftest.py uses config.cache (a segfault guard): keep cacheprovider,
    # with a fresh cache directory per run.
    local -a args=()
    # Shell words, quotes allowed (here and in PYTEST_ARGS).
    eval "args=($TESTS)"
    args+=(-q -p no:randomly -o "cache_dir=$WORK/pytest-cache-$ep"
          --basetemp="$WORK/pytest-tmp-$ep"
          --junitxml="$RESULTS_DIR/$ep.xml" -o junit_family=xunit1
          --timeout="$TEST_TIMEOUT")
    if [[ -z "$WITH_MYPY" ]]; then args+=(-m "not mypy"); fi
    if [[ -n "$PYTEST_ARGS" ]]; then
        # Shell words, quotes allowed: PYTEST_ARGS='-k "notify or copy"'.
        local -a extra
        eval "extra=($PYTEST_ARGS)"
        args+=("${extra[@]}")
    fi
    rm -rf "$RESULTS_DIR/$ep.xml" "$WORK/suite-$ep"
    cp -a "$WORK/suite" "$WORK/suite-$ep"
    printf '%s\n' "port=$port" >"$RESULTS_DIR/$ep.status"
    log "[$ep] pytest ${args[*]} (dsn port $port, at most ${RUN_TIMEOUT}s) -> $RESULTS_DIR/$ep.log"
    (
        cd "$WORK/suite-$ep"
        # The dsn says everything; PG* variables of the caller must not leak in.
        unset PGHOST PGHOSTADDR PGPORT PGUSER PGPASSWORD PGDATABASE PGSERVICE PGOPTIONS PGSSLMODE
        export PSYCOPG_TEST_DSN="$dsn" PYTHONDONTWRITEBYTECODE=1
        exec timeout -s TERM -k 60 "$RUN_TIMEOUT" \
            nice -n "$NICE" "$VENV/bin/python" -c "$PYTEST_LAUNCHER" "${args[@]}"
    ) >"$RESULTS_DIR/$ep.log" 2>&1 &
    RUN_PID[$ep]=$!
    RUN_T0[$ep]=$SECONDS
}

# finish_run EP: wait for EP's run and record how it ended.
finish_run() {
    local ep=$1 rc=0
    wait "${RUN_PID[$ep]}" || rc=$?
    unset "RUN_PID[$ep]"
    local took=$((SECONDS - RUN_T0[$ep]))
    # pytest: 0 all passed, 1 some failed, 2 interrupted, 3 internal error,
    # 4 usage error, 5 no tests; timeout(1): 124 timed out, 137 killed.
    local last
    last=$(grep -E '^=+ .* in [0-9.]+s' "$RESULTS_DIR/$ep.log" | tail -n1 || true)
    [[ -n "$last" ]] || last=$(tail -n1 "$RESULTS_DIR/$ep.log")
    log "[$ep] pytest exit $rc after ${took}s: $last"
    printf '%s\n' "exit=$rc seconds=$took $(cat "$RESULTS_DIR/$ep.status")" >"$RESULTS_DIR/$ep.status"
    if ((rc == 124 || rc == 137)); then
        log "[$ep] WARNING: the run hit RUN_TIMEOUT=${RUN_TIMEOUT}s; its results are partial"
        printf '%s\n' "hit RUN_TIMEOUT=${RUN_TIMEOUT}s: partial" >>"$RESULTS_DIR/$ep.status"
    fi
    if [[ ! -s "$RESULTS_DIR/$ep.xml" ]] || ((rc == 3 || rc == 4 || rc == 5)); then
        log "[$ep] no usable results (no junit xml, or pytest internal/usage error, or no tests); last lines of its output:"
        tail -n 30 "$RESULTS_DIR/$ep.log" >&2
        RUN_FAILED+=("$ep")
    fi
    if [[ $ep == pgmux-* ]] && ! kill -0 "${PGMUX_PID[${ep#pgmux-}]}" 2>/dev/null; then
        log "[$ep] WARNING: pgmux exited during the run! last lines of its log:"
        tail -n 30 "$WORK/pgmux-${ep#pgmux-}.log" >&2
        printf '%s\n' "pgmux exited during the run" >>"$RESULTS_DIR/$ep.status"
    fi
}

# ------------------------------------------------------------------- main ---
main() {
    ensure_tools
    find_version
    find_suite
    ensure_venv

    local -a eps=()
    local ep
    for ep in $ENDPOINTS; do
        if [[ $ep == pgbouncer-* ]] && ! command -v pgbouncer >/dev/null 2>&1; then
            log "pgbouncer not on PATH: skipping endpoint $ep"
            continue
        fi
        eps+=("$ep")
    done
    ((${#eps[@]} > 0)) || die "no endpoints to run"
    local needs_pgmux=""
    for ep in "${eps[@]}"; do [[ $ep == pgmux-* ]] && needs_pgmux=1; done
    # Without PGMUX_BIN, build now (a build failure stops us before any run).
    # A PGMUX_BIN given is checked when the first pgmux endpoint starts.
    if [[ -n "$needs_pgmux" && -z "$PGMUX_BIN" ]]; then build_pgmux; fi

    WORK=$(mktemp -d "${TMPDIR:-/tmp}/pgmux-psycopg-suite.XXXXXX")
    chmod 755 "$WORK"
    mkdir -p "$RESULTS_DIR"
    rm -rf "$RESULTS_DIR/logs"
    rm -f "$RESULTS_DIR"/*.txt "$RESULTS_DIR"/*.xml "$RESULTS_DIR"/*.log "$RESULTS_DIR"/*.status

    # A private copy of the suite (tests/ and the pytest settings in the root
    # pyproject.toml): pytest's caches and __pycache__ stay out of the
    # checkout, and no psycopg code lands in this repo.
    mkdir -p "$WORK/suite"
    cp -a "$PSYCOPG_SRC/tests" "$WORK/suite/tests"
    if [[ -f "$PSYCOPG_SRC/pyproject.toml" ]] && grep -q '^\[tool.pytest' "$PSYCOPG_SRC/pyproject.toml"; then
        cp "$PSYCOPG_SRC/pyproject.toml" "$WORK/suite/"
    else
        printf '[pytest]\naddopts = -ra\nfilterwarnings =\n    error\ntestpaths = tests\n' >"$WORK/suite/pytest.ini"
    fi

    # Proxies start when their run comes (ensure_endpoint in start_run).

    {
        echo "psycopg $PSYCOPG_VERSION (installed, $("$VENV/bin/python" -c 'import psycopg; print(psycopg.pq.__impl__)') libpq wrapper), suite from $SRC_DESC, which declares version ${SRC_VERSION:-unknown}"
        if [[ -n "$SRC_VERSION" && "$SRC_VERSION" != "$PSYCOPG_VERSION" ]]; then
            echo "WARNING: suite version $SRC_VERSION != installed $PSYCOPG_VERSION: some tests may fail everywhere"
        fi
        echo "pgmux repo at commit $(GIT_OPTIONAL_LOCKS=0 git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$( [[ -n "$(GIT_OPTIONAL_LOCKS=0 git -C "$ROOT" status --porcelain -- src 2>/dev/null)" ]] && echo ' (src/ has uncommitted changes)'); binary ${PGMUX_BIN:-none}${PGMUX_NOTE:+ ($PGMUX_NOTE)}"
        echo "$("$PGBIN/postgres" --version); $(command -v pgbouncer >/dev/null && pgbouncer --version | head -n1 || echo 'no PgBouncer')"
        echo "pool size $POOL per proxy pool; pytest $TESTS -p no:randomly -q --timeout=$TEST_TIMEOUT$( [[ -z "$WITH_MYPY" ]] && echo ' -m "not mypy"') $PYTEST_ARGS; run timeout ${RUN_TIMEOUT}s; $( [[ -n "$PARALLEL" ]] && echo 'runs at the same time (PARALLEL=1)' || echo 'runs one after the other'); one fresh PostgreSQL per endpoint"
    } >"$RESULTS_DIR/header.txt"

    # The comparison is redone after every run, so that the results of the
    # runs done so far are on disk even if a later run is interrupted.
    # PARALLEL=1: all runs at once (each still one pytest process, no
    # xdist), finished in order; else one after the other.
    local -a done_eps=()
    if [[ -n "$PARALLEL" ]]; then
        for ep in "${eps[@]}"; do start_run "$ep"; done
    fi
    for ep in "${eps[@]}"; do
        [[ -n "$PARALLEL" ]] || start_run "$ep"
        finish_run "$ep"
        done_eps+=("$ep")
        python3 "$SCRIPT_DIR/psycopg_suite_compare.py" --results "$RESULTS_DIR" \
            --header "$RESULTS_DIR/header.txt" "${done_eps[@]}" >"$RESULTS_DIR/summary.txt" \
            || log "WARNING: psycopg_suite_compare.py failed"
    done

    cat "$RESULTS_DIR/summary.txt" >&3
    log "results: $RESULTS_DIR (summary.txt, <endpoint>.txt, <endpoint>.xml, <endpoint>.log, logs/)"
    if ((${#RUN_FAILED[@]} > 0)); then
        die "runs without results: ${RUN_FAILED[*]}"
    fi
}

main "$@"
