#!/usr/bin/env bash
# postgres.sh: a private PostgreSQL for lite, on 127.0.0.1, stopped by PID.
#
#   scripts/postgres.sh start    make the cluster if missing (initdb), start it,
#                                make the database `lite`; prints its URL
#   scripts/postgres.sh stop     fast shutdown by the PID in postmaster.pid
#   scripts/postgres.sh status   say whether it runs (exit 3 if not)
#   scripts/postgres.sh url      the LITE_DATABASE_URL to give lite
#
# Settings (environment):
#   LITE_PG_HOME   its directory (default /srv/lite/postgres): data/, run/
#                  (the unix socket) and postgres.log
#   LITE_PG_PORT   the port on 127.0.0.1 (default 8432)
#
# The cluster belongs to the OS user `postgres` (Debian's package makes it;
# initdb refuses root) and leaves the system's clusters alone. Its only
# role, `lite`, is trusted on 127.0.0.1 and on the socket: a private
# database on one machine, for tests and serve.sh; see docs/postgresql.md.
set -euo pipefail

PG_BIN=/usr/lib/postgresql/15/bin
PG_HOME=${LITE_PG_HOME:-/srv/lite/postgres}
PG_PORT=${LITE_PG_PORT:-8432}
DATA=$PG_HOME/data
RUN=$PG_HOME/run
LOG=$PG_HOME/postgres.log
STOP_TIMEOUT_S=30

say() { echo "postgres: $*"; }
fail() {
    echo "postgres: $*" >&2
    exit 1
}
as_postgres() { runuser -u postgres -- "$@"; }

url() { echo "postgresql://lite@127.0.0.1:$PG_PORT/lite"; }

# The postmaster's PID, from postmaster.pid; fails if it does not run. A PID
# that now belongs to another process is not taken for it.
running_pid() {
    local pid
    [ -f "$DATA/postmaster.pid" ] || return 1
    pid=$(head -n 1 "$DATA/postmaster.pid")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    case "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" in
        "$PG_BIN/postgres -D $DATA "*) echo "$pid" ;;
        *) return 1 ;;
    esac
}

start() {
    local pid
    [ "$(id -u)" -eq 0 ] || fail "run as root (the cluster runs as the user postgres)"
    [ -x "$PG_BIN/postgres" ] || fail "no PostgreSQL 15 in $PG_BIN: scripts/setup.sh --dev installs it"
    if pid=$(running_pid); then
        say "already running (PID $pid): $(url)"
        return 0
    fi
    install -d -o postgres -g postgres -m 0700 "$PG_HOME" "$RUN"
    if [ ! -f "$DATA/PG_VERSION" ]; then
        say "making the cluster in $DATA"
        as_postgres "$PG_BIN/initdb" -D "$DATA" -U lite -E UTF8 --locale=C.UTF-8 \
            --auth-local=trust --auth-host=trust >/dev/null
        # Only 127.0.0.1 and the socket; room for two Apaches of 20 daemons
        # and the tests.
        cat >>"$DATA/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$RUN'
max_connections = 200
EOF
    fi
    as_postgres "$PG_BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 -o "-p $PG_PORT" start >/dev/null ||
        { tail -n 20 "$LOG" >&2; fail "PostgreSQL did not start"; }
    if ! as_postgres "$PG_BIN/psql" -h "$RUN" -p "$PG_PORT" -U lite -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'lite'" | grep -q 1; then
        as_postgres "$PG_BIN/createdb" -h "$RUN" -p "$PG_PORT" -U lite lite
    fi
    say "up (PID $(running_pid)): $(url)"
}

stop() {
    local pid waited=0
    if ! pid=$(running_pid); then
        say "not running"
        return 0
    fi
    kill -INT "$pid" # fast shutdown: open transactions are rolled back
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$waited" -ge $((STOP_TIMEOUT_S * 10)) ]; then
            say "PID $pid did not stop within $STOP_TIMEOUT_S s: immediate shutdown"
            kill -QUIT "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    say "stopped (PID $pid)"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status)
        if pid=$(running_pid); then say "running (PID $pid): $(url)"; else say "not running"; exit 3; fi
        ;;
    url) url ;;
    *)
        sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
