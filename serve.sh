#!/usr/bin/env bash
# serve.sh: run lite under its own Apache + mod_wsgi on 127.0.0.1.
#
#   ./serve.sh [start]   install what is missing, then start (as root)
#   ./serve.sh stop      stop it, by the PID in its PidFile
#   ./serve.sh status    say whether it runs
#   ./serve.sh install   install or update lite in LITE_HOME, start nothing
#   ./serve.sh install-unit   install, then hand Apache to systemd: a unit
#                        that restarts it on failure and starts it at boot;
#                        from then on start and stop go through systemctl
#   ./serve.sh remove-unit    stop the unit and remove it
#   ./serve.sh unit      print the unit install-unit would write
#   ./serve.sh backup DEST    copy the live database to the new file DEST,
#                             consistently, while lite keeps serving
#   ./serve.sh restore FILE   replace the database by FILE (lite stopped)
#
# Settings (environment):
#   LITE_HOME         where lite is installed (default /srv/lite)
#   LITE_PORT         the port on 127.0.0.1 (default 8000)
#   LITE_USER         the daemons' user (default www-data), LITE_GROUP likewise
#   LITE_SYNCHRONOUS  NORMAL (default), FULL or GROUP, handed to the daemons
#   LITE_WSGI_SCRIPT  the script in $LITE_HOME/app to serve (default
#                     lite_app.py; the benchmark serves its own apps)
#   LITE_PROCESSES, LITE_THREADS  the mod_wsgi daemons (default 20 x 1)
#   LITE_ACCESS_LOG_ROTATE  when rotatelogs starts a new access log: a size
#                     (default 10M) or seconds; LITE_ACCESS_LOG_FILES: how
#                     many it keeps (default 5)
#   LITE_LOG_FORMAT   plain (default: lite's log lines in error.log) or json
#                     (one JSON object per line in apache/logs/lite.jsonl)
#   LITE_DATABASE_URL postgresql://... : lite on that PostgreSQL instead of
#                     SQLite (psycopg is then installed into the venv)
#   LITE_POSTGRES     private: start (and stop) a private PostgreSQL in
#                     $LITE_HOME/postgres (scripts/postgres.sh) and use it
#   LITE_UNIT         the systemd unit's name (default lite), written to
#                     LITE_SYSTEMD_DIR (default /etc/systemd/system)
#
# The Apache is private: its own ServerRoot ($LITE_HOME/apache), PidFile,
# logs and port; it includes the shipped lite.conf as it is, and leaves the
# system's Apache alone. The code is installed into $LITE_HOME (readable by
# the daemon user) rather than served from this checkout, which that user may
# not be allowed to read.
set -euo pipefail

SRC=$(cd "$(dirname "$0")" && pwd)
export LITE_HOME=${LITE_HOME:-/srv/lite}
export LITE_USER=${LITE_USER:-www-data}
export LITE_GROUP=${LITE_GROUP:-$LITE_USER}
LITE_PORT=${LITE_PORT:-8000}
APACHE_DIR=$LITE_HOME/apache
PIDFILE=$APACHE_DIR/run/httpd.pid
URL=http://127.0.0.1:$LITE_PORT/lite
START_TIMEOUT_S=60
STOP_TIMEOUT_S=30
ACCESS_LOG_ROTATE=${LITE_ACCESS_LOG_ROTATE:-10M}
ACCESS_LOG_FILES=${LITE_ACCESS_LOG_FILES:-5}
LOG_FORMAT=${LITE_LOG_FORMAT:-plain}
# prometheus_client's multiprocess directory: the daemons' metric files.
METRICS_DIR=$APACHE_DIR/metrics
DATABASE_URL=${LITE_DATABASE_URL:-}
export LITE_PG_HOME=${LITE_PG_HOME:-$LITE_HOME/postgres}
UNIT=${LITE_UNIT:-lite}.service
UNIT_FILE=${LITE_SYSTEMD_DIR:-/etc/systemd/system}/$UNIT

say() { echo "serve: $*"; }
fail() {
    echo "serve: $*" >&2
    exit 1
}

# The PID of this lite's Apache parent, from its PidFile; fails if it does not
# run. A PID that now belongs to another process is not taken for it.
running_pid() {
    local pid
    [ -f "$PIDFILE" ] || return 1
    pid=$(cat "$PIDFILE")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    case "$(command_line "$pid")" in
        "/usr/sbin/apache2 -f $APACHE_DIR/httpd.conf "*) echo "$pid" ;;
        *) return 1 ;;
    esac
}

command_line() { tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" || true; }

# PIDs of this lite's Apache processes, by the command line that names its
# own httpd.conf (and its access log, for rotatelogs): after the parent is
# killed, its workers and mod_wsgi daemons live on, holding the port and
# the database.
own_processes() {
    local dir
    for dir in /proc/[0-9]*; do
        case "$(command_line "${dir#/proc/}")" in
            *" -f $APACHE_DIR/httpd.conf "* | *"rotatelogs "*" $APACHE_DIR/logs/access.log "*)
                echo "${dir#/proc/}"
                ;;
        esac
    done
}

# Stop, by PID, what an Apache that lost its parent left running.
stop_orphans() {
    local pids waited=0
    pids=$(own_processes)
    [ -n "$pids" ] || return 0
    say "stopping what an earlier Apache left running without its parent (PIDs" $pids")"
    # shellcheck disable=SC2086 # one PID a word
    kill -TERM $pids 2>/dev/null || true
    # Without their parent they stop at once or not at all: 5 s, then SIGKILL.
    while pids=$(own_processes) && [ -n "$pids" ] && [ "$waited" -lt 50 ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
}

write_httpd_conf() {
    cat >"$APACHE_DIR/httpd.conf" <<EOF
# Written by serve.sh: a private Apache for lite. Edit lite.conf, not this.
ServerRoot "$APACHE_DIR"
ServerName 127.0.0.1
Listen 127.0.0.1:$LITE_PORT
PidFile "$PIDFILE"
DefaultRuntimeDir "$APACHE_DIR/run"
Mutex file:$APACHE_DIR/run default
ErrorLog "$APACHE_DIR/logs/error.log"
LogLevel warn
# The access log: combined format and the time taken in microseconds (%D),
# piped to rotatelogs, which starts a new file every $ACCESS_LOG_ROTATE
# without a restart and keeps $ACCESS_LOG_FILES (access.log, access.log.1 ...).
LogFormat "%h %l %u %t \\"%r\\" %>s %b \\"%{Referer}i\\" \\"%{User-Agent}i\\" %D" lite_access
CustomLog "|/usr/bin/rotatelogs -f -n $ACCESS_LOG_FILES $APACHE_DIR/logs/access.log $ACCESS_LOG_ROTATE" lite_access

LoadModule mpm_event_module /usr/lib/apache2/modules/mod_mpm_event.so
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule wsgi_module /usr/lib/apache2/modules/mod_wsgi.so
LoadModule reqtimeout_module /usr/lib/apache2/modules/mod_reqtimeout.so
LoadModule headers_module /usr/lib/apache2/modules/mod_headers.so

# Apache's own workers; the app runs in lite.conf's mod_wsgi daemons.
User $LITE_USER
Group $LITE_GROUP
WSGISocketPrefix "$APACHE_DIR/run/wsgi"

Define LITE_HOME $LITE_HOME
Define LITE_USER $LITE_USER
Define LITE_GROUP $LITE_GROUP
Define LITE_WSGI_SCRIPT ${LITE_WSGI_SCRIPT:-lite_app.py}
Define LITE_PROCESSES ${LITE_PROCESSES:-20}
Define LITE_THREADS ${LITE_THREADS:-1}
Include "$APACHE_DIR/lite.conf"
EOF
}

install_lite() {
    [ "$(id -u)" -eq 0 ] || fail "run as root: it installs packages and starts Apache"
    "$SRC/scripts/setup.sh"
    install -d -m 0755 "$LITE_HOME" "$LITE_HOME/app" "$APACHE_DIR" "$APACHE_DIR/run" \
        "$APACHE_DIR/logs"
    install -m 0644 "$SRC/lite_app.py" "$SRC/lite_db.py" "$SRC/lite_engine.py" \
        "$SRC/lite_counters.py" "$SRC/lite_config.py" "$SRC/lite_ops.py" "$SRC/lite_page.py" \
        "$SRC/lite_metrics.py" "$SRC/lite_pg.py" "$LITE_HOME/app/"
    if [ ! -e "$LITE_HOME/app/config.ini" ]; then
        install -m 0644 "$SRC/config.ini" "$LITE_HOME/app/config.ini"
    fi
    install -m 0644 "$SRC/lite.conf" "$APACHE_DIR/lite.conf"
    if ! cmp -s "$SRC/requirements.txt" "$LITE_HOME/venv/requirements.txt" 2>/dev/null; then
        say "making the venv $LITE_HOME/venv from /usr/bin/python3"
        /usr/bin/python3 -m venv "$LITE_HOME/venv"
        "$LITE_HOME/venv/bin/pip" install -q --disable-pip-version-check -r "$SRC/requirements.txt"
        cp "$SRC/requirements.txt" "$LITE_HOME/venv/requirements.txt"
    fi
    if [ -n "$DATABASE_URL" ]; then
        if ! "$LITE_HOME/venv/bin/python" -c "import psycopg" 2>/dev/null; then
            say "installing psycopg into $LITE_HOME/venv (lite on PostgreSQL)"
            "$LITE_HOME/venv/bin/pip" install -q --disable-pip-version-check \
                -r "$SRC/requirements-postgres.txt"
        fi
        # The tables and config.ini's first version, in the shared database.
        PYTHONPATH="$LITE_HOME/app" "$LITE_HOME/venv/bin/python" -m lite_ops apply-config \
            "$DATABASE_URL" "$LITE_HOME/app/config.ini" >/dev/null
    else
        "$SRC/resetapp.sh"
    fi
    write_httpd_conf
    /usr/sbin/apache2 -t -f "$APACHE_DIR/httpd.conf" 2>&1 | grep -v "Syntax OK" || true
}

# The environment of Apache and its daemons, one KEY=VALUE a line. Set in the
# process environment, not by Apache's SetEnv (which reaches only the WSGI
# environ): prometheus_client reads PROMETHEUS_MULTIPROC_DIR when imported.
daemon_env() {
    local log_file=
    [ "$LOG_FORMAT" != json ] || log_file=$APACHE_DIR/logs/lite.jsonl
    printf '%s\n' LANG=C.UTF-8 LC_ALL=C.UTF-8 "LITE_SYNCHRONOUS=${LITE_SYNCHRONOUS:-NORMAL}" \
        "LITE_LOG_FORMAT=$LOG_FORMAT" "LITE_LOG_FILE=$log_file" \
        "PROMETHEUS_MULTIPROC_DIR=$METRICS_DIR" "LITE_DATABASE_URL=$DATABASE_URL"
}

# What every start needs, Apache not running: an empty metrics directory
# (files of an earlier run would be summed into this one's) and, for JSON
# logs, lite.jsonl, both the daemon user's.
prepare_run() {
    rm -rf -- "${METRICS_DIR:?}"
    install -d -o "$LITE_USER" -g "$LITE_GROUP" -m 0750 "$METRICS_DIR"
    if [ "$LOG_FORMAT" = json ]; then
        # A file of its own (Apache would prefix each line in error.log).
        local log_file=$APACHE_DIR/logs/lite.jsonl
        [ -e "$log_file" ] || install -o "$LITE_USER" -g "$LITE_GROUP" -m 0640 /dev/null "$log_file"
    fi
}

# The systemd unit: Apache in the foreground, started by systemd itself (not
# through this script, which may install packages), restarted on failure.
unit_text() {
    case "$LITE_HOME" in
        *[[:space:]]* | *[\'\"\\%\$]*) fail "the unit needs a LITE_HOME without spaces, quotes, % or \$" ;;
    esac
    local log_file_pre=
    if [ "$LOG_FORMAT" = json ]; then
        log_file_pre="ExecStartPre=/bin/sh -c 'test -e $APACHE_DIR/logs/lite.jsonl || install -o $LITE_USER -g $LITE_GROUP -m 0640 /dev/null $APACHE_DIR/logs/lite.jsonl'"
    fi
    cat <<EOF
# Written by serve.sh install-unit: lite's private Apache on 127.0.0.1:$LITE_PORT.
[Unit]
Description=lite on a private Apache + mod_wsgi (127.0.0.1:$LITE_PORT)
After=network.target

[Service]
Type=simple
$(daemon_env | sed 's/^/Environment=/')
ExecStartPre=/bin/rm -f $PIDFILE
ExecStartPre=/bin/rm -rf $METRICS_DIR
ExecStartPre=/usr/bin/install -d -o $LITE_USER -g $LITE_GROUP -m 0750 $METRICS_DIR
$log_file_pre
ExecStart=/usr/sbin/apache2 -f $APACHE_DIR/httpd.conf -DFOREGROUND
ExecReload=/bin/kill -USR1 \$MAINPID
# SIGTERM to Apache, which stops its workers and daemons; what is left after
# the timeout is killed.
KillMode=mixed
TimeoutStopSec=$STOP_TIMEOUT_S
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
EOF
}

write_unit() {
    install -d "$(dirname "$UNIT_FILE")"
    unit_text >"$UNIT_FILE.new"
    mv "$UNIT_FILE.new" "$UNIT_FILE"
}

install_unit() {
    local pid
    command -v systemctl >/dev/null || fail "no systemctl: run lite with $0 start instead"
    install_lite
    if pid=$(running_pid); then # started by this script: one manager at a time
        say "stopping the Apache $0 started (PID $pid); systemd starts it from now on"
        stop
    fi
    stop_orphans
    prepare_run
    write_unit
    systemctl daemon-reload
    systemctl enable --now "$UNIT"
    wait_until_serving || fail "$UNIT started, but lite does not answer: systemctl status $UNIT"
    say "lite is up under systemd ($UNIT_FILE): $URL"
}

remove_unit() {
    [ -f "$UNIT_FILE" ] || fail "no unit $UNIT_FILE"
    systemctl disable --now "$UNIT"
    rm -f "$UNIT_FILE"
    systemctl daemon-reload
    say "removed $UNIT; $0 start runs Apache itself again"
}

# LITE_POSTGRES=private: the private PostgreSQL (scripts/postgres.sh) is
# started first and its URL given to lite.
start_private_postgres() {
    [ "${LITE_POSTGRES:-}" = private ] || return 0
    [ "$(id -u)" -eq 0 ] || fail "run as root: it installs packages and starts PostgreSQL"
    "$SRC/scripts/setup.sh" # with LITE_POSTGRES=private, PostgreSQL too
    "$SRC/scripts/postgres.sh" start
    DATABASE_URL=$("$SRC/scripts/postgres.sh" url)
}

stop_private_postgres() {
    [ "${LITE_POSTGRES:-}" = private ] || return 0
    "$SRC/scripts/postgres.sh" stop
}

wait_until_serving() {
    /usr/bin/python3 - "$URL/get" "$START_TIMEOUT_S" <<'EOF'
import sys, time, urllib.request
url, timeout = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + timeout
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as res:
            if res.status == 200:
                sys.exit(0)
    except OSError as exc:
        error = exc
    if time.monotonic() > deadline:
        sys.exit(f"serve: no answer from {url} within {timeout:.0f} s: {error}")
    time.sleep(0.2)
EOF
}

start() {
    if pid=$(running_pid); then
        say "already running (PID $pid): $URL"
        return 0
    fi
    rm -f "$PIDFILE" # stale: Apache would take a live PID in it for itself
    stop_orphans
    start_private_postgres
    install_lite
    prepare_run
    if [ -f "$UNIT_FILE" ]; then
        say "starting $UNIT (installed in $UNIT_FILE) with systemctl"
        write_unit
        systemctl daemon-reload
        systemctl start "$UNIT"
    else
        say "starting Apache on 127.0.0.1:$LITE_PORT"
        local settings
        mapfile -t settings < <(daemon_env)
        # No LITE_DB_PATH from this shell: as under systemd, the daemons open
        # the database that backup and restore find (app_database).
        env -u LITE_DB_PATH "${settings[@]}" \
            /usr/sbin/apache2 -f "$APACHE_DIR/httpd.conf" -k start
    fi
    if ! wait_until_serving; then
        tail -n 20 "$APACHE_DIR/logs/error.log" >&2 || true
        stop
        exit 1
    fi
    say "lite is up: $URL (Apache PID $(running_pid), ${LITE_PROCESSES:-20} daemons" \
        "x ${LITE_THREADS:-1} threads as $LITE_USER)"
    say "logs: $APACHE_DIR/logs/error.log and access.log; stop with: $0 stop"
}

# lite's command line from the installed app, on the system's Python (its
# core needs only the standard library), without LITE_DB_PATH, as the daemons
# run (daemon_env sets none). Run as a file, its directory comes first on
# sys.path: `-m` would put the working directory there, and with it another
# lite (this checkout) and that one's data/lite.db.
lite_ops() { env -u LITE_DB_PATH /usr/bin/python3 "$LITE_HOME/app/lite_ops.py" "$@"; }

# The daemons' database, absolute, as lite_ops knows it (`lite where`).
app_database() {
    [ -f "$LITE_HOME/app/lite_ops.py" ] || fail "no lite in $LITE_HOME/app: run $0 install first"
    lite_ops where || fail "could not ask $LITE_HOME/app/lite_ops.py where the database is"
}

backup() {
    local dest=${1:?usage: serve.sh backup DEST} db tmp
    [ "$(id -u)" -eq 0 ] || fail "run as root"
    if [ "${LITE_POSTGRES:-}" = private ]; then
        DATABASE_URL=$("$SRC/scripts/postgres.sh" url)
    fi
    if [ -n "$DATABASE_URL" ]; then
        backup_postgres "$dest"
        return
    fi
    db=$(app_database) || exit 1
    [ -e "$db" ] || fail "no database at $db"
    [ ! -e "$dest" ] || fail "$dest exists: backup never overwrites"
    # The copy is taken as the daemon user (a connection of another user
    # could leave -wal/-shm files the daemons cannot open), into the data
    # directory that user owns, and then moved to DEST.
    tmp=$(dirname "$db")/backup-$$.db
    if ! runuser -u "$LITE_USER" -- env PYTHONPATH="$LITE_HOME/app" \
        "$LITE_HOME/venv/bin/python" -m lite_ops backup "$db" "$tmp"; then
        rm -f "$tmp"
        fail "backup failed"
    fi
    chown root:root "$tmp"
    mv "$tmp" "$dest"
    say "backup written to $dest"
}

# PostgreSQL's own consistent copy: pg_dump in its custom format, one
# snapshot while lite keeps serving; restore with pg_restore (docs/postgresql.md).
backup_postgres() {
    local dest=$1
    [ ! -e "$dest" ] || fail "$dest exists: backup never overwrites"
    if ! /usr/lib/postgresql/15/bin/pg_dump --format=custom --file="$dest.partial" \
        "$DATABASE_URL"; then
        rm -f "$dest.partial"
        fail "pg_dump failed"
    fi
    mv "$dest.partial" "$dest"
    say "backup (pg_dump --format=custom) written to $dest"
}

restore() {
    local file=${1:?usage: serve.sh restore FILE} db listing files data pid
    [ "$(id -u)" -eq 0 ] || fail "run as root"
    if pid=$(running_pid); then fail "lite is running (PID $pid): $0 stop first"; fi
    [ -f "$file" ] || fail "no file $file"
    db=$(app_database) || exit 1
    lite_ops check "$file" || fail "$file is not a sound SQLite database"
    listing=$(lite_ops files "$db") || fail "could not list the files of $db"
    mapfile -t files <<<"$listing" # the database first, then the files beside it
    data=$(dirname "$db")
    [ -d "$data" ] || fail "no data directory $data: run $0 install first"
    if [ -e "$db" ]; then
        mv "$db" "$db.before-restore.$(date +%Y%m%d%H%M%S.%N)"
    fi
    # A -wal left by the replaced database would be replayed into the
    # restored one: remove it with its index, and lite's own files beside it
    # (its write queue, and the mark it leaves when the database was removed
    # or replaced under it).
    rm -f -- "${files[@]:1}"
    install -o "$LITE_USER" -g "$LITE_GROUP" -m 0600 "$file" "$db"
    say "restored $db from $file (the replaced database is kept beside it)"
}

stop() {
    local pid waited=0
    if [ -f "$UNIT_FILE" ]; then
        systemctl stop "$UNIT"
        stop_orphans
        say "stopped $UNIT"
        return 0
    fi
    if ! pid=$(running_pid); then
        say "not running"
        rm -f "$PIDFILE"
        stop_orphans
        stop_private_postgres
        return 0
    fi
    # SIGTERM: Apache stops its workers and the mod_wsgi daemons, then exits.
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$waited" -ge $((STOP_TIMEOUT_S * 10)) ]; then
            say "Apache (PID $pid) did not stop within $STOP_TIMEOUT_S s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    rm -f "$PIDFILE"
    stop_orphans # e.g. the daemons of a parent that had to be killed
    say "stopped (PID $pid)"
    stop_private_postgres
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status)
        if pid=$(running_pid); then say "running (PID $pid): $URL"; else say "not running"; exit 3; fi
        ;;
    install) install_lite ;;
    install-unit) install_unit ;;
    remove-unit) remove_unit ;;
    unit) unit_text ;;
    backup) backup "${2:-}" ;;
    restore) restore "${2:-}" ;;
    *)
        sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
