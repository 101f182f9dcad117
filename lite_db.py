"""SQLite done right for prefork WSGI servers (stdlib only).

Contract:
- One connection per process and database path, opened lazily by `connect()`
  and opened anew when `os.getpid()` changes: a connection is never used on
  both sides of a fork. Nothing is opened at import.
- Every new connection gets WAL, `synchronous` (NORMAL, or FULL through
  `LITE_SYNCHRONOUS=FULL`), a busy timeout, foreign keys and a journal size
  limit; `isolation_level=None`, so every transaction here is explicit.
- Writes run in `BEGIN IMMEDIATE` transactions: the write lock is taken up
  front, so a transaction never reads a snapshot it then cannot write from
  (SQLITE_BUSY_SNAPSHOT, which no busy timeout waits out).
- Only SQLITE_BUSY and SQLITE_LOCKED are retried, in slices of at most
  `BUSY_POLL_MS` with jittered short sleeps between them, until
  `LOCK_BUDGET_MS` has passed since the call began.
- Errors: `sqlite3.Error` is caught, logged once with its reason and counted in
  `stats`; writes then return `False`, reads `None`. Programming errors (an
  unknown table or column, a wrong argument type) raise `ValueError` before
  any SQL runs.
- Read-modify-write: do it in `transact` with a callable (see `update_counter`),
  or as one statement (`increment`). Never with `upsert`: an upsert computes its
  new row from values the caller read earlier, outside the write lock, so two
  processes that read the same value both write value + 1 and one update is
  lost without any error.
"""

import contextlib
import json
import logging
import os
import pwd
import random
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

LOCK_BUDGET_MS = 3000  # 3 s: total wait for the database lock per call
BUSY_POLL_MS = 5  # 5 ms: the busy timeout, the longest SQLite itself waits per attempt
RETRY_SLEEP_MAX_S = 0.002  # 2 ms: upper bound of one jittered retry sleep
JOURNAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024  # 4 MiB: -wal size kept after a checkpoint
CHECKPOINT_INTERVAL_S = 1.0  # 1 s: least time between two checkpoints of one process
CHECKPOINT_WAIT_MS = 100  # 100 ms: longest wait of a RESTART checkpoint for readers
WAL_FRAME_HEADER_BYTES = 24  # each page in the WAL is preceded by a 24-byte header
STATS_INTERVAL_S = 1.0  # 1 s: least time between two publications of a process's figures
IDEMPOTENCY_TTL_S = 24 * 3600  # 24 h: how long an Idempotency-Key is remembered
PRUNE_INTERVAL_S = 10.0  # 10 s: least time between two prunings of expired keys by one process
PRUNE_BATCH = 500  # expired keys removed by one pruning, at most
SYNCHRONOUS_MODES = ("NORMAL", "FULL")
MAX_INTEGER = 2**63 - 1  # largest value SQLite stores as an INTEGER

SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL,
    position INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS config_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    fingerprint TEXT NOT NULL,
    counters TEXT NOT NULL,
    applied_at REAL NOT NULL,
    applied_by INTEGER NOT NULL,
    rejected_fingerprint TEXT
) STRICT;
CREATE TABLE IF NOT EXISTS config_audit (
    id INTEGER PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    pid INTEGER NOT NULL,
    applied_at REAL NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key TEXT PRIMARY KEY,
    counter TEXT NOT NULL,
    by INTEGER NOT NULL,
    value INTEGER NOT NULL,
    created_at REAL NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS idempotency_keys_created_at ON idempotency_keys (created_at);
CREATE TABLE IF NOT EXISTS health (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at REAL NOT NULL,
    pid INTEGER NOT NULL
) STRICT;
"""
SCHEMA_VERSION = 3  # PRAGMA user_version of a database that has all of SCHEMA

log = logging.getLogger(__name__)

# Per-process figures; a forked child starts from its parent's numbers.
# db_time_s: seconds spent in database calls, waits for the lock included.
# write_lock_wait_s: seconds spent taking the write lock (BEGIN IMMEDIATE, or
# the whole of a one-statement write, which takes the lock as it starts).
stats: dict[str, Any] = {
    "reads": 0,
    "read_failures": 0,
    "writes": 0,
    "write_failures": 0,
    "busy_retries": 0,
    "db_time_s": 0.0,
    "write_lock_wait_s": 0.0,
    "checkpoints": 0,
    "wal_restarts": 0,
    "last_checkpoint_at": None,
}

_connections: dict[str, tuple[int, sqlite3.Connection]] = {}
# Connections inherited across fork: kept referenced, never used or closed,
# because closing one in the child would run SQLite's close-time checkpoint
# and unlock logic against locks that belong to the parent.
_inherited: list[sqlite3.Connection] = []
_columns_cache: dict[tuple[int, str], tuple[str, ...]] = {}
_last_checkpoint: dict[int, float] = {}  # id(connection) -> time.monotonic()
_last_prune: dict[int, float] = {}  # id(connection) -> time.monotonic()
# Connections found unable to write (SQLITE_READONLY: opened when the file
# was not writable). connect() replaces them, so that a fixed permission is seen.
_reopen: set[int] = set()
_read_only: set[int] = set()  # connections opened while the file was not writable
_publish_failed: list[Exception] = []  # the first failure to publish figures, if any
_FAILED = object()  # what _read returns on failure, so that None can mean "no row"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _synchronous() -> str:
    mode = os.environ.get("LITE_SYNCHRONOUS", "NORMAL").upper()
    if mode not in SYNCHRONOUS_MODES:
        raise ValueError(f"LITE_SYNCHRONOUS must be one of {SYNCHRONOUS_MODES}")
    return mode


def _open(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_POLL_MS / 1000)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {_synchronous()}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
        # Checkpoints are run by _checkpoint_now_and_then, not after every
        # commit once the WAL passes 1000 pages: while readers keep a
        # checkpoint from finishing, SQLite would retry it (and fsync) on
        # every commit.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        # A database made by an older lite gets the tables it lacks.
        if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            conn.executescript(
                f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )
    except BaseException:
        conn.close()
        raise
    return conn


def _is_busy(exc: sqlite3.Error) -> bool:
    # The primary code is the low byte of the extended one:
    # SQLITE_BUSY_SNAPSHOT (517) is SQLITE_BUSY (5), SQLITE_LOCKED_SHAREDCACHE (262)
    # is SQLITE_LOCKED (6).
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _retrying(cur: sqlite3.Cursor, attempt: Callable[[], Any]) -> Any:
    """Run `attempt()`, retrying on busy/locked until LOCK_BUDGET_MS is spent.

    Raises the last sqlite3.Error when the budget is spent or the error is not
    busy/locked. The wait is sliced: SQLite's busy handler waits at most
    BUSY_POLL_MS per attempt, then this loop sleeps a jittered moment and
    tries again. Left to wait the whole budget itself, SQLite's handler backs
    off to sleeps of 100 ms, and a process that has waited long loses the lock
    to each newcomer: with 8 processes writing in a tight loop, waits reached
    3 s and writes failed; sliced, the worst wait was 0.2-0.4 s and none
    failed (tests/test_db.py::test_waits_for_the_write_lock_are_fair). The
    retries also cover busy errors SQLite returns without waiting, e.g. while
    another connection runs WAL recovery
    (tests/test_db.py::test_busy_without_wait_is_retried).
    """
    started = time.monotonic()
    deadline = started + LOCK_BUDGET_MS / 1000
    narrowed = False
    try:
        while True:
            try:
                return attempt()
            except sqlite3.Error as exc:
                remaining = deadline - time.monotonic()
                if not _is_busy(exc) or remaining <= 0:
                    raise
                stats["busy_retries"] += 1
                time.sleep(random.uniform(0, min(RETRY_SLEEP_MAX_S, remaining)))
                remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
                if remaining_ms < BUSY_POLL_MS:
                    cur.execute(f"PRAGMA busy_timeout = {remaining_ms}")
                    narrowed = True
    finally:
        stats["db_time_s"] += time.monotonic() - started
        if narrowed:
            cur.execute(f"PRAGMA busy_timeout = {BUSY_POLL_MS}")


def _checkpoint_now_and_then(cur: sqlite3.Cursor) -> None:
    """A checkpoint, at most once per CHECKPOINT_INTERVAL_S per connection.

    Passive first: it copies what no reader still needs from the WAL into
    the database and never waits. While readers follow one another without
    a pause, some reader always needs the newest frames, the WAL is never
    found fully copied and the -wal file grows without bound (tests/
    test_operations.py measures it). So when the WAL holds more than
    JOURNAL_SIZE_LIMIT_BYTES, a RESTART checkpoint follows: it waits at most
    CHECKPOINT_WAIT_MS for the readers of old frames to finish (new readers
    read the database file and do not wait) and makes the next writer start
    the WAL over; journal_size_limit then truncates the file. Writers wait
    for it as for any lock. A failure loses nothing (the WAL keeps every
    commit) and is only logged.
    """
    now = time.monotonic()
    key = id(cur.connection)
    last = _last_checkpoint.get(key)
    if last is not None and now - last < CHECKPOINT_INTERVAL_S:
        return
    _last_checkpoint[key] = now
    try:
        _, wal_frames, _ = cur.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        stats["checkpoints"] += 1
        stats["last_checkpoint_at"] = time.time()
        page_size = cur.execute("PRAGMA page_size").fetchone()[0]
        if wal_frames * (page_size + WAL_FRAME_HEADER_BYTES) > JOURNAL_SIZE_LIMIT_BYTES:
            cur.execute(f"PRAGMA busy_timeout = {CHECKPOINT_WAIT_MS}")
            try:
                busy, _, _ = cur.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            finally:
                cur.execute(f"PRAGMA busy_timeout = {BUSY_POLL_MS}")
            if not busy:
                stats["wal_restarts"] += 1
    except sqlite3.Error as exc:
        log.warning("checkpoint failed: %s", exc)


def _write(
    cur: sqlite3.Cursor, work: Callable[[sqlite3.Cursor], Any], what: str, one_statement: bool
) -> Any:
    """Run `work(cur)` as one write transaction, with retries.

    `one_statement`: work runs exactly one statement, which is then its own
    transaction: SQLite takes the write lock as the statement starts, before
    it reads anything, as BEGIN IMMEDIATE does, and holds it only while
    SQLite runs that statement, never while Python runs. Otherwise work runs
    between BEGIN IMMEDIATE and COMMIT. Returns work's result, or False after
    logging and counting a failure.
    """

    def in_transaction() -> Any:
        began = time.monotonic()
        try:
            cur.execute("BEGIN IMMEDIATE")
        finally:
            stats["write_lock_wait_s"] += time.monotonic() - began
        try:
            result = work(cur)
            cur.execute("COMMIT")
        except BaseException:
            if cur.connection.in_transaction:
                cur.execute("ROLLBACK")
            raise
        return result

    def statement() -> Any:
        began = time.monotonic()
        try:
            return work(cur)
        finally:
            stats["write_lock_wait_s"] += time.monotonic() - began

    stats["writes"] += 1
    try:
        result = _retrying(cur, statement if one_statement else in_transaction)
    except sqlite3.Error as exc:
        stats["write_failures"] += 1
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_READONLY:
            _reopen.add(id(cur.connection))
        log.error("write failed (%s): %s%s", what, exc, _advice(exc, _path_of(cur)))
        return False
    _checkpoint_now_and_then(cur)
    return result


def _path_of(cur: sqlite3.Cursor) -> str | None:
    for path, (_, conn) in _connections.items():
        if conn is cur.connection:
            return path
    return None


def _advice(exc: sqlite3.Error, path: str | None) -> str:
    """What to do about an error that a person has to fix, for the log line."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    needs_a_person = (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_FULL)
    if path is None or code not in needs_a_person:
        return ""
    if code == sqlite3.SQLITE_FULL:
        return f"; the disk holding {os.path.dirname(os.path.abspath(path))} is full: free space"
    directory = os.path.dirname(os.path.abspath(path))
    user = _user_name()
    return (
        f"; {path} (and its directory {directory}, for the -wal and -shm files) must be "
        f"readable and writable by user {user}: e.g. chown -R {user} {directory} "
        "(resetapp.sh sets this up)"
    )


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _read(cur: sqlite3.Cursor, fetch: Callable[[], Any], what: str) -> Any:
    """What `fetch()` returns, or _FAILED after logging and counting a failure."""
    stats["reads"] += 1
    try:
        return _retrying(cur, fetch)
    except sqlite3.Error as exc:
        stats["read_failures"] += 1
        log.error("read failed (%s): %s", what, exc)
        return _FAILED


def _columns(cur: sqlite3.Cursor, table: str) -> tuple[str, ...]:
    """Columns of `table` in the live schema, primary key first.

    Raises ValueError for a name that is not a table of this database.
    """
    if not isinstance(table, str) or not _NAME.match(table):
        raise ValueError(f"not a table name: {table!r}")
    key = (id(cur.connection), table)
    if key not in _columns_cache:
        rows = cur.execute(f'PRAGMA table_info("{table}")').fetchall()
        if not rows:
            raise ValueError(f"no such table: {table!r}")
        rows.sort(key=lambda row: (row["pk"] == 0, row["pk"], row["cid"]))
        _columns_cache[key] = tuple(row["name"] for row in rows)
    return _columns_cache[key]


def _check_columns(cur: sqlite3.Cursor, table: str, names: Iterable[str]) -> tuple[str, ...]:
    columns = _columns(cur, table)
    for name in names:
        if name not in columns:
            raise ValueError(f"no such column: {table}.{name!r}")
    return columns


# Public API


def connect(path: str) -> sqlite3.Connection:
    """This process's connection to `path`, opened on first use.

    A connection that SQLite opened read-only (the file was not writable) is
    replaced once the file is writable again. Raises sqlite3.Error if the
    database cannot be opened.
    """
    pid = os.getpid()
    known = _connections.get(path)
    if known is not None:
        owner, conn = known
        if id(conn) in _read_only and os.access(path, os.W_OK):
            _reopen.add(id(conn))
        if owner == pid and id(conn) not in _reopen:
            return conn
        del _connections[path]
        if owner == pid:
            _reopen.discard(id(conn))
            _read_only.discard(id(conn))
            for cache in (_last_checkpoint, _last_prune):
                cache.pop(id(conn), None)
            conn.close()
        else:
            _inherited.append(conn)
    conn = _open(path)
    _connections[path] = (pid, conn)
    if not os.access(path, os.W_OK):
        _read_only.add(id(conn))
    return conn


def cursor(path: str) -> sqlite3.Cursor | None:
    """A fresh cursor on this process's connection; the caller closes it.

    Returns None (logged and counted as a failed read) if the database
    cannot be opened.
    """
    try:
        return connect(path).cursor()
    except sqlite3.Error as exc:
        stats["read_failures"] += 1
        log.error("cannot open database %s: %s%s", path, exc, _advice(exc, path))
        return None


def close_all() -> None:
    """Close the connections this process opened (tests, shutdown)."""
    pid = os.getpid()
    for path, (owner, conn) in list(_connections.items()):
        if owner == pid:
            conn.close()
        del _connections[path]
    # Keyed by id(connection), which a new connection may reuse.
    _columns_cache.clear()
    _last_checkpoint.clear()
    _last_prune.clear()
    _reopen.clear()
    _read_only.clear()


def transact(
    cur: sqlite3.Cursor,
    work: Callable[[sqlite3.Cursor], Any] | Sequence[tuple[str, Sequence[Any]]],
) -> Any:
    """Run `work` in one write transaction that holds the write lock throughout.

    `work` is a list of (sql, params) statements, or a callable taking the
    cursor: the way to read, compute in Python and write back without losing
    updates. A callable may be run again after a busy error, so it must not
    have effects outside the database, and must not return False, which
    means failure. Returns the callable's result (True for a list, or when
    the callable returns None); False on failure: test with `is False`.
    """
    if callable(work):
        run = work
    elif isinstance(work, Sequence) and not isinstance(work, str):
        statements = list(work)

        def run(cur: sqlite3.Cursor) -> None:
            for sql, params in statements:
                cur.execute(sql, params)

    else:
        raise ValueError("work must be a callable or a list of (sql, params)")

    def run_and_mark(cur: sqlite3.Cursor) -> Any:
        result = run(cur)
        return True if result is None else result

    return _write(cur, run_and_mark, "transact", one_statement=False)


def transact_one(cur: sqlite3.Cursor, sql: str, params: Sequence[Any] = ()) -> Any:
    """Run one statement in a write transaction.

    Returns the first row it returns (RETURNING), else True; False on failure.
    """
    if not isinstance(sql, str):
        raise ValueError("sql must be a string")

    def run(cur: sqlite3.Cursor) -> Any:
        rows = cur.execute(sql, params).fetchall()
        return rows[0] if rows else True

    return _write(cur, run, sql.split(None, 1)[0] if sql.strip() else "empty", one_statement=True)


def transact_many(cur: sqlite3.Cursor, sql: str, seq_of_params: Iterable[Sequence[Any]]) -> bool:
    """Run one statement for each parameter set, all in one write transaction.

    Returns True, or False on failure (then nothing was written).
    """
    if not isinstance(sql, str):
        raise ValueError("sql must be a string")
    rows = list(seq_of_params)

    def run(cur: sqlite3.Cursor) -> bool:
        cur.executemany(sql, rows)
        return True

    return _write(cur, run, "transact_many", one_statement=False)


def get(cur: sqlite3.Cursor, table: str, key: Any, attr: str, default: Any = None) -> Any:
    """One attribute of the row of `table` whose primary key is `key`.

    Returns `default` if there is no such row; None on failure. Raises
    ValueError for an unknown table or column.
    """
    columns = _check_columns(cur, table, [attr])
    sql = f'SELECT "{attr}" FROM "{table}" WHERE "{columns[0]}" = ?'
    row = _read(cur, lambda: cur.execute(sql, (key,)).fetchone(), f"get {table}.{attr}")
    if row is _FAILED:
        return None
    return default if row is None else row[0]


def select(cur: sqlite3.Cursor, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row] | None:
    """All rows of a read-only query, in its own read transaction; None on failure."""
    if not isinstance(sql, str):
        raise ValueError("sql must be a string")
    rows = _read(cur, lambda: cur.execute(sql, params).fetchall(), "select")
    return None if rows is _FAILED else rows


def upsert(cur: sqlite3.Cursor, table: str, row: dict[str, Any]) -> bool:
    """Insert `row`, or update the row with the same primary key.

    For setting values, never for read-modify-write (see the module docstring).
    Returns True, or False on failure. Raises ValueError for an unknown table
    or column, or when `row` lacks the primary key.
    """
    if not isinstance(row, dict) or not row:
        raise ValueError("row must be a non-empty dict")
    columns = _check_columns(cur, table, row)
    key = columns[0]
    if key not in row:
        raise ValueError(f"row lacks the primary key {key!r}")
    names = list(row)
    quoted = [f'"{name}"' for name in names]
    updates = [f"{q} = excluded.{q}" for name, q in zip(names, quoted, strict=True) if name != key]
    action = "UPDATE SET " + ", ".join(updates) if updates else "NOTHING"
    sql = (
        f'INSERT INTO "{table}" ({", ".join(quoted)}) '
        f"VALUES ({', '.join('?' for _ in names)}) "
        f'ON CONFLICT ("{key}") DO {action}'
    )
    values = [row[name] for name in names]

    def run(cur: sqlite3.Cursor) -> bool:
        cur.execute(sql, values)
        return True

    return _write(cur, run, f"upsert {table}", one_statement=True)


# Adds a step to a counter in one statement; no row when there is no such
# counter or the sum would pass MAX_INTEGER (the third parameter is the
# largest value the step may be added to).
_INCREMENT = "UPDATE counters SET value = value + ? WHERE name = ? AND value <= ? RETURNING value"


def _check_step(by: Any) -> None:
    if not isinstance(by, int) or isinstance(by, bool) or not 1 <= by <= MAX_INTEGER:
        raise ValueError("by must be an int from 1 to MAX_INTEGER")


def increment(cur: sqlite3.Cursor, name: str, by: int = 1) -> Any:
    """Add `by` to counter `name` in one atomic statement.

    Returns the new value; None when there is no such counter or the sum would
    exceed MAX_INTEGER (nothing is written then); False on failure.
    """
    _check_step(by)
    row = transact_one(cur, _INCREMENT, (by, name, MAX_INTEGER - by))
    if row is False:
        return False
    return None if row is True else row[0]


def increment_once(cur: sqlite3.Cursor, name: str, by: int, key: str) -> Any:
    """Add `by` to counter `name` once per `key`, however often it is asked.

    The first call with a key increments and stores the key with its result,
    in the same transaction; a repeat within IDEMPOTENCY_TTL_S changes
    nothing and returns the stored result. Returns (value, replayed): the new
    value (the stored one when replayed), or None as `increment` does;
    ("mismatch", stored) if the key was used for another counter or step;
    False on failure. Expired keys are pruned here, a bounded batch at most
    once per PRUNE_INTERVAL_S per process, so no request pays for a backlog.
    """
    _check_step(by)
    now = time.time()
    prune = _prune_due(cur)

    def work(cur: sqlite3.Cursor) -> tuple[Any, Any]:
        if prune:
            cur.execute(
                "DELETE FROM idempotency_keys WHERE key IN (SELECT key FROM idempotency_keys"
                " WHERE created_at < ? ORDER BY created_at LIMIT ?)",
                (now - IDEMPOTENCY_TTL_S, PRUNE_BATCH),
            )
        stored = cur.execute(
            "SELECT counter, by, value FROM idempotency_keys WHERE key = ? AND created_at >= ?",
            (key, now - IDEMPOTENCY_TTL_S),
        ).fetchone()
        if stored is not None:
            if (stored["counter"], stored["by"]) != (name, by):
                return "mismatch", dict(stored)
            return stored["value"], True
        row = cur.execute(_INCREMENT, (by, name, MAX_INTEGER - by)).fetchone()
        if row is None:
            return None, False
        cur.execute(
            "INSERT INTO idempotency_keys (key, counter, by, value, created_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET counter = excluded.counter,"
            " by = excluded.by, value = excluded.value, created_at = excluded.created_at",
            (key, name, by, row[0], now),
        )
        return row[0], False

    return transact(cur, work)


def _prune_due(cur: sqlite3.Cursor) -> bool:
    now = time.monotonic()
    key = id(cur.connection)
    last = _last_prune.get(key)
    if last is not None and now - last < PRUNE_INTERVAL_S:
        return False
    _last_prune[key] = now
    return True


def update_counter(cur: sqlite3.Cursor, name: str, compute: Callable[[int], int]) -> Any:
    """Read counter `name`, compute its new value in Python, write it back.

    The general read-modify-write, done right: read and write happen in one
    transaction that took the write lock before the read, so no other process
    can write in between. Returns the new value; None when there is no such
    counter; False on failure.
    """

    def work(cur: sqlite3.Cursor) -> tuple[int | None]:
        # A one-tuple is truthy even when it holds 0 or None.
        row = cur.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        if row is None:
            return (None,)
        new_value = compute(row[0])
        cur.execute("UPDATE counters SET value = ? WHERE name = ?", (new_value, name))
        return (new_value,)

    result = transact(cur, work)
    return False if result is False else result[0]


def health(cur: sqlite3.Cursor) -> str | None:
    """Check that the database can be read and written now.

    Reads the counters and writes the one row of the health table, each
    within the lock budget. Returns None when both work, else the reason
    ("read failed" or "write failed"; the details are logged).
    """
    if select(cur, "SELECT count(*) FROM counters") is None:
        return "read failed"
    written = transact_one(
        cur,
        "INSERT INTO health (id, checked_at, pid) VALUES (1, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at, pid = excluded.pid",
        (time.time(), os.getpid()),
    )
    return "write failed" if written is False else None


def stats_dir(path: str) -> str:
    """Where the processes using the database at `path` publish their figures."""
    return path + "-stats"


def publish_stats(path: str, figures: dict[str, Any]) -> bool:
    """Publish this process's `figures` for every process to read.

    Writes `stats_dir(path)/<pid>.json` through a rename, so a reader sees
    the old or the new figures, never half of them. Neither takes a database
    lock nor syncs to disk: a few microseconds, meant to run at most once per
    STATS_INTERVAL_S. Returns False on failure (logged once per process).
    """
    directory = stats_dir(path)
    name = os.path.join(directory, f"{os.getpid()}.json")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with open(name + ".tmp", "w", encoding="utf-8") as out:
            json.dump(figures, out)
        os.replace(name + ".tmp", name)
    except (OSError, TypeError, ValueError) as exc:
        if not _publish_failed:
            log.warning("cannot publish figures to %s: %s", directory, exc)
            _publish_failed.append(exc)
        return False
    return True


def published_stats(path: str) -> list[dict[str, Any]]:
    """The figures every live process published for `path`, by pid.

    Files of processes that have exited are removed; unreadable ones are
    skipped (a process may be writing its first file).
    """
    try:
        names = os.listdir(stats_dir(path))
    except OSError:
        return []
    found = []
    for name in sorted(names):
        pid_text, _, suffix = name.partition(".")
        if suffix != "json" or not pid_text.isdigit():
            continue
        file_name = os.path.join(stats_dir(path), name)
        if not _running(int(pid_text)):
            with contextlib.suppress(OSError):
                os.remove(file_name)
            continue
        try:
            with open(file_name, encoding="utf-8") as source:
                figures = json.load(source)
        except (OSError, ValueError):
            continue
        if isinstance(figures, dict):
            found.append(figures)
    found.sort(key=lambda figures: figures.get("pid", 0))
    return found


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def database_figures(cur: sqlite3.Cursor, path: str) -> dict[str, Any] | None:
    """Settings read back from the live connection, and the files' sizes.

    Returns None if the database cannot be read (logged and counted).
    """
    synchronous_names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}

    def fetch() -> dict[str, Any]:
        def pragma(name: str) -> Any:
            return cur.execute(f"PRAGMA {name}").fetchone()[0]

        return {
            "journal_mode": pragma("journal_mode"),
            "synchronous": synchronous_names.get(pragma("synchronous"), "?"),
            "busy_timeout_ms": pragma("busy_timeout"),
            "journal_size_limit_bytes": pragma("journal_size_limit"),
            "page_size": pragma("page_size"),
            "page_count": pragma("page_count"),
        }

    figures = _read(cur, fetch, "database figures")
    if figures is _FAILED:
        return None
    figures["lock_budget_ms"] = LOCK_BUDGET_MS
    figures["db_bytes"] = _size(path)
    figures["wal_bytes"] = _size(path + "-wal")
    return figures


def _size(name: str) -> int:
    try:
        return os.path.getsize(name)
    except OSError:
        return 0


def backup(path: str, dest: str) -> bool:
    """Copy the live database at `path` to the new file `dest`, consistently.

    SQLite's online backup API, in one step: the copy is the database as of
    one moment, taken inside one read transaction, which in WAL mode blocks
    no writer. (Copying page by page would start over each time another
    process commits, so under steady writes it might never end.) Returns
    True, or False on failure (logged; a partial `dest` is removed). Raises
    ValueError if `dest` exists.
    """
    if os.path.exists(dest):
        raise ValueError(f"{dest} exists: backup never overwrites")
    try:
        source = connect(path)
        target = sqlite3.connect(dest)
        try:
            source.backup(target)
            ok = target.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            target.close()
        if not ok:
            raise sqlite3.DatabaseError("the copy failed its integrity check")
    except sqlite3.Error as exc:
        log.error("backup of %s to %s failed: %s", path, dest, exc)
        if os.path.exists(dest):
            os.remove(dest)
        return False
    return True


def main(argv: list[str]) -> int:
    """`python -m lite_db backup DB DEST`: an online, consistent copy of DB."""
    if len(argv) != 3 or argv[0] != "backup":
        print("usage: python -m lite_db backup DB_PATH DEST_PATH", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    _, path, dest = argv
    try:
        ok = backup(path, dest)
    except ValueError as exc:
        print(f"backup: {exc}", file=sys.stderr)
        return 1
    print(f"backup: {path} copied to {dest}" if ok else "backup: failed (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
