#!/usr/bin/env bash
# test_siege.sh: lite's load tests, each verified, against a running lite
# (./serve.sh) on 127.0.0.1.
#
#   1. reads:   SIEGE_USERS users x SIEGE_READS GET /lite/get, no delay
#   2. writes:  SIEGE_USERS users x SIEGE_WRITES POST /lite/inc, with a random
#               delay of up to SIEGE_DELAY s between requests
#   3. writes:  the same without delay (-b)
#   4. config:  test 2 again, with config.ini touched while it runs
#
# After each: every request was sent and answered 2xx (counted from siege's
# own lines: its "availability" ignores 4xx and 5xx), siege counted no
# failure, and Apache's error log gained no "locked" and no traceback. Tests
# 2 and 3: the counter moved by exactly the number of increments. Test 4: the
# touched config is a new version, applied exactly once (one new audit row),
# which resets the counter to its configured value c mid-run, so the final
# value lies between c and c + the increments (siege shows no response
# bodies: tests/test_apache.py proves that one against every acknowledged
# value). Prints a table; exits 1 on any miss.
#
# Settings (environment): LITE_HOME (/srv/lite), LITE_PORT (8000), LITE_USER
# (www-data), SIEGE_USERS (20), SIEGE_READS (5000), SIEGE_WRITES (50),
# SIEGE_DELAY (0.5). Run as root or as LITE_USER (it reads the audit table).
set -euo pipefail

LITE_HOME=${LITE_HOME:-/srv/lite}
LITE_PORT=${LITE_PORT:-8000}
LITE_USER=${LITE_USER:-www-data}
USERS=${SIEGE_USERS:-20}
READS=${SIEGE_READS:-5000}
WRITES=${SIEGE_WRITES:-50}
DELAY=${SIEGE_DELAY:-0.5}
BASE=http://127.0.0.1:$LITE_PORT
COUNTER=hits
CONFIG=$LITE_HOME/app/config.ini
# The daemons' database, as lite_ops knows it (serve.sh runs them without LITE_DB_PATH).
DB=$(env -u LITE_DB_PATH /usr/bin/python3 "$LITE_HOME/app/lite_ops.py" where) || {
    echo "test_siege: no lite in $LITE_HOME/app to ask where its database is: start lite" \
        "first (./serve.sh)" >&2
    exit 1
}
ERROR_LOG=$LITE_HOME/apache/logs/error.log
SIEGERC=$(cd "$(dirname "$0")" && pwd)/siegerc # siege's settings, for repeatable runs

if ! command -v siege >/dev/null; then
    echo "test_siege: siege is not installed: apt-get install siege (scripts/setup.sh --dev" \
        "installs it with the other test tools; ./serve.sh installs only what serving needs)" >&2
    exit 2
fi

WORK=$(mktemp -d)
siege_pid=
cleanup() {
    if [ -n "$siege_pid" ] && kill -0 "$siege_pid" 2>/dev/null; then
        kill -TERM "$siege_pid"
        wait "$siege_pid" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT


value_of() {
    /usr/bin/python3 -c '
import json, sys, urllib.request
print(json.load(urllib.request.urlopen(sys.argv[1], timeout=30))["value"])
' "$BASE/lite/get?counter=$1"
}

as_lite_user() {
    if [ "$(id -un)" = "$LITE_USER" ]; then "$@"; else runuser -u "$LITE_USER" -- "$@"; fi
}

# "rows pid" of the config audit table: how many versions were applied, and
# the process that applied the last one.
audit() {
    as_lite_user /usr/bin/python3 -c '
import sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, timeout=30)
rows, = db.execute("SELECT count(*) FROM lite_config_audit").fetchone()
pid = db.execute("SELECT pid FROM lite_config_audit ORDER BY id DESC LIMIT 1").fetchone()
print(rows, pid[0] if pid else "-")
' "$DB"
}

summary_field() { # FILE LABEL: a number from siege's summary
    awk -F: -v label="$2" '$1 == label { gsub(/[^0-9.]/, "", $2); print $2 }' "$1"
}

misses=0
rows=()

# The value config.ini sets the counter to.
configured_value() {
    /usr/bin/python3 -c '
import configparser, sys
config = configparser.ConfigParser(interpolation=None)
config.read(sys.argv[1], encoding="utf-8")
print(int(config["counters"][sys.argv[2]]))
' "$CONFIG" "$COUNTER"
}

# check NAME EXPECTED_REQUESTS EXPECTED_DELTA BEFORE LOG_OFFSET: verify a run
# whose siege output is in $WORK/NAME.out and .err. EXPECTED_DELTA "-": the
# counter's move is checked by the caller.
check() {
    local name=$1 expected=$2 delta=$3 before=$4 offset=$5
    local out=$WORK/$name.out err=$WORK/$name.err
    local sent ok transactions successful failed rate after actual log_errors problems=()
    sent=$(grep -c '^HTTP/' "$out" || true)
    ok=$(grep -cE '^HTTP/[0-9.]+ 2[0-9][0-9] ' "$out" || true)
    transactions=$(summary_field "$err" "Transactions")
    successful=$(summary_field "$err" "Successful transactions")
    failed=$(summary_field "$err" "Failed transactions")
    rate=$(summary_field "$err" "Transaction rate")
    log_errors=$(tail -c +"$((offset + 1))" "$ERROR_LOG" | grep -ciE 'locked|traceback' || true)
    [ "$sent" -eq "$expected" ] || problems+=("sent $sent of $expected")
    [ "$ok" -eq "$expected" ] || problems+=("$((sent - ok)) non-2xx")
    [ "${transactions:-0}" -eq "$expected" ] || problems+=("siege counted $transactions")
    [ "${successful:-0}" -eq "$expected" ] || problems+=("siege: $successful successful")
    [ "${failed:-1}" -eq 0 ] || problems+=("siege: $failed failed")
    [ "$log_errors" -eq 0 ] || problems+=("$log_errors locked/traceback lines in $ERROR_LOG")
    after=$(value_of "$COUNTER")
    actual=$((after - before))
    if [ "$delta" != - ]; then
        [ "$actual" -eq "$delta" ] || problems+=("counter moved $actual, not $delta")
    else
        actual=-
    fi
    local result=ok
    if [ ${#problems[@]} -gt 0 ]; then
        result="MISS: $(
            IFS=';'
            echo "${problems[*]}"
        )"
        misses=$((misses + 1))
        grep -vE '^HTTP/[0-9.]+ 2' "$out" | sort | uniq -c | head -5 >&2 || true
    fi
    rows+=("$(printf '%-24s %8s %8s %8s %7s %9s %9s/%-9s %s' "$name" "$expected" "$ok" \
        "$((sent - ok))" "${failed:-?}" "${rate:-?}" "$delta" "$actual" "$result")")
}

log_size() { stat -c %s "$ERROR_LOG"; }

run() { # NAME EXPECTED_REQUESTS EXPECTED_DELTA SIEGE_ARGS...
    local name=$1 expected=$2 delta=$3 before offset
    shift 3
    before=$(value_of "$COUNTER")
    offset=$(log_size)
    echo "test_siege: $name: siege $*" >&2
    siege -R "$SIEGERC" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || true
    check "$name" "$expected" "$delta" "$before" "$offset"
}

[ -f "$DB" ] || {
    echo "test_siege: no database at $DB: start lite first (./serve.sh)" >&2
    exit 1
}
value_of "$COUNTER" >/dev/null || {
    echo "test_siege: lite does not answer at $BASE" >&2
    exit 1
}

INC="$BASE/lite/inc POST counter=$COUNTER"
writes=$((USERS * WRITES))

run "reads ${USERS}x$READS" $((USERS * READS)) 0 -b -c "$USERS" -r "$READS" "$BASE/lite/get?counter=$COUNTER"
run "writes ${USERS}x$WRITES delay" "$writes" "$writes" -c "$USERS" -r "$WRITES" -d "$DELAY" "$INC"
run "writes ${USERS}x$WRITES no delay" "$writes" "$writes" -b -c "$USERS" -r "$WRITES" "$INC"

# 4: touch config.ini while test 2 runs again: one new audit row, and the
# counter reset to c once, mid-run: c < final < c + writes.
name="config touched"
c=$(configured_value)
read -r audit_before _ < <(audit)
before=$(value_of "$COUNTER")
offset=$(log_size)
echo "test_siege: $name: siege -c $USERS -r $WRITES -d $DELAY, touching $CONFIG" >&2
siege -R "$SIEGERC" -c "$USERS" -r "$WRITES" -d "$DELAY" "$INC" \
    >"$WORK/$name.out" 2>"$WORK/$name.err" &
siege_pid=$!
sleep 2
touch "$CONFIG"
wait "$siege_pid" || true
siege_pid=
check "$name" "$writes" - "$before" "$offset"
final=$(value_of "$COUNTER")
# Ask 100 times more: the touched version must not be applied again.
for _ in $(seq 100); do value_of "$COUNTER" >/dev/null; done
read -r audit_final applied_by < <(audit)
applied=$((audit_final - audit_before))
if [ "$applied" -eq 1 ] && [ "$final" -gt "$c" ] && [ "$final" -lt $((c + writes)) ]; then
    rows+=("$(printf '%-24s %s' "config applied" \
        "reset once (by PID $applied_by); final c+$((final - c)) after $writes acknowledged: ok")")
else
    rows+=("$(printf '%-24s %s' "config applied" \
        "$applied times, final c+$((final - c)) after $writes: MISS (expected one reset, c < final < c+$writes)")")
    misses=$((misses + 1))
fi

printf '\n%-24s %8s %8s %8s %7s %9s %19s %s\n' test requests 2xx non-2xx failed "req/s" \
    "counter want/got" result
printf '%s\n' "${rows[@]}"
if [ "$misses" -gt 0 ]; then
    echo "test_siege: $misses MISSES" >&2
    exit 1
fi
echo "test_siege: all passed"
