#!/usr/bin/env bash
# resetapp.sh: create lite's database, or with --force recreate it.
#
#   resetapp.sh            create the database if there is none: schema, WAL,
#                          config.ini applied; an existing one is kept (its
#                          config brought up to date), never wiped
#   resetapp.sh --force    delete the database and create it anew
#
# Settings (environment): LITE_HOME (default /srv/lite; code and config.ini in
# $LITE_HOME/app, venv in $LITE_HOME/venv), LITE_USER and LITE_GROUP (the
# Apache daemons' user, default www-data).
#
# The database directory $LITE_HOME/app/data belongs to LITE_USER, mode 0700:
# SQLite creates lite.db-wal and lite.db-shm beside lite.db, so the daemons
# need to write the directory, and nobody else needs to read it. Run as root
# (or as LITE_USER itself, which cannot change owners).
set -euo pipefail

LITE_HOME=${LITE_HOME:-/srv/lite}
LITE_USER=${LITE_USER:-www-data}
LITE_GROUP=${LITE_GROUP:-$LITE_USER}
APP=$LITE_HOME/app
PYTHON=$LITE_HOME/venv/bin/python

force=no
case "${1:-}" in
    "") ;;
    --force) force=yes ;;
    -h | --help)
        sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "resetapp: unknown argument '$1' (try --help)" >&2
        exit 2
        ;;
esac

fail() {
    echo "resetapp: $*" >&2
    exit 1
}

[ -f "$APP/lite_config.py" ] || fail "no lite code in $APP: install it first (./serve.sh install)"
[ -f "$APP/config.ini" ] || fail "no $APP/config.ini"
[ -x "$PYTHON" ] || fail "no venv at $LITE_HOME/venv: install it first (./serve.sh install)"
id -u "$LITE_USER" >/dev/null 2>&1 || fail "no such user: $LITE_USER"
[ "$(id -u "$LITE_USER")" -ne 0 ] || fail "LITE_USER must not be root"

# The database and every file of it (itself first, then SQLite's and lite's
# own beside it), as lite_ops knows them: `lite where` without LITE_DB_PATH,
# as serve.sh runs the daemons, and `lite files`. Run as a file, so that
# $APP, not the working directory (another lite's?), comes first on sys.path.
lite_ops() { env -u LITE_DB_PATH "$PYTHON" "$APP/lite_ops.py" "$@"; }
DB=$(lite_ops where) || fail "could not ask $APP/lite_ops.py where the database is"
listing=$(lite_ops files "$DB") || fail "could not list the files of $DB"
mapfile -t FILES <<<"$listing"
DATA=$(dirname "$DB")

me=$(id -un)
if [ "$(id -u)" -eq 0 ]; then
    as_user() { runuser -u "$LITE_USER" -- "$@"; }
elif [ "$me" = "$LITE_USER" ]; then
    as_user() { "$@"; }
else
    fail "run as root or as $LITE_USER"
fi

# PIDs of processes that have the database open: wiping it under them would
# leave them writing to a deleted file, and those writes would be lost.
holders() {
    local fd link file
    for fd in /proc/[0-9]*/fd/*; do
        link=$(readlink "$fd" 2>/dev/null) || continue
        for file in "${FILES[@]}"; do
            if [ "$link" = "$file" ]; then
                fd=${fd#/proc/}
                echo "${fd%%/*}"
                break
            fi
        done
    done | sort -un | tr '\n' ' '
}

if [ -e "$DB" ] && [ "$force" = yes ]; then
    open_by=$(holders)
    [ -z "$open_by" ] || fail "$DB is open in processes $open_by: stop the service first (./serve.sh stop)"
    rm -f -- "${FILES[@]}"
    echo "resetapp: deleted $DB"
fi

if [ "$(id -u)" -eq 0 ]; then
    install -d -o "$LITE_USER" -g "$LITE_GROUP" -m 0700 "$DATA"
    for file in "${FILES[@]}"; do
        [ ! -e "$file" ] || chown "$LITE_USER:$LITE_GROUP" "$file"
    done
else
    install -d -m 0700 "$DATA"
fi

existed=no
[ -e "$DB" ] && existed=yes
# As the daemon user, so that the files SQLite creates are theirs; umask 077
# keeps them private.
(umask 077 && cd "$APP" && as_user env PYTHONPATH="$APP" "$PYTHON" -m lite_ops apply-config "$DB" "$APP/config.ini") ||
    fail "could not apply $APP/config.ini to $DB (see the message above)"

if [ "$existed" = yes ]; then
    echo "resetapp: kept the existing database $DB (use --force to recreate it)"
else
    echo "resetapp: created $DB for $LITE_USER"
fi
