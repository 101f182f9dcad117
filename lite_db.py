"""SQLite done right for prefork and threaded WSGI servers (standard library only).

Contents (each a banner section below, public API first):
  Settings            the constants, with their units
  Errors              Unavailable, OutcomeUnknown
  Engines             Engine, Features, SQLiteEngine: what differs between engines
  Connections         connect, cursor, close_all, figures; Connection, and
                      the Registry every engine's connections live in
  Reads and writes    query, write, ensure_tables, table_columns: on any
                      engine; count, notify, failed: an engine's counting
  The original's      transact, transact_one, transact_many, get, upsert:
  helpers             False (or None) on failure
  Any sqlite3         apply_pragmas, retrying: lite's settings and waits for
  connection          connections lite does not open (lite_django's)
  Files               refusal, database_files: the files still the ones held
  Write queue         WriteQueue: a first-come, first-served line for the lock
  Group commit        GroupCommit: a commit acknowledged once on disk, one
                      flush for many (LITE_SYNCHRONOUS=GROUP)
  Internals           opening, checkpoints, failures, column names

Contract:
- `connect(path)` returns the calling thread's connection to `path` in this
  process, opened on first use. A connection is never used on both sides of
  a fork: after fork, the parent's connections are kept referenced, never
  used or closed, and the child opens its own. The connections of threads
  that have ended are closed by their process when it next opens one.
  Nothing is opened at import.
- Opening a database creates no table. Each feature creates its tables when
  first used (`ensure_tables`), named `lite_*` beside the demo's `counters`,
  and records its schema version in `lite_schema`. lite never writes
  `PRAGMA user_version`: that number is the user's.
- Every new connection gets WAL, `synchronous` (NORMAL, or FULL through
  `LITE_SYNCHRONOUS=FULL`), a busy timeout, foreign keys and a journal size
  limit; `isolation_level=None`, so every transaction here is explicit.
  `LITE_SYNCHRONOUS=GROUP`: commits under NORMAL, each write returning once
  a flush of the WAL shared with the commits beside it has finished.
- Writes run in `BEGIN IMMEDIATE` transactions, or as one statement that is
  its own transaction: the write lock is taken before anything is read, so
  a transaction never reads a snapshot it then cannot write from
  (SQLITE_BUSY_SNAPSHOT, which no busy timeout waits out).
- Only SQLITE_BUSY and SQLITE_LOCKED are retried, in slices of at most
  `BUSY_POLL_MS` with jittered short sleeps between them, until
  `LOCK_BUDGET_MS` has passed since the call began.
- Errors: a database that cannot be reached in time (busy past the budget,
  read-only, full, cannot be opened, I/O error, not a database) is logged
  once, counted, and raised as `Unavailable`. Any other `sqlite3.Error` (a
  constraint, bad SQL) is logged, counted and raised as it is. Programming
  errors (an unknown table or column, a wrong argument type) raise
  `ValueError` before any SQL runs. The original's helpers are the thin
  outer layer: `transact`, `transact_one`, `transact_many` and `upsert`
  return False on failure, `get` returns None.
- Read-modify-write: in `write` (or `transact`) with a callable, or as one
  statement (lite_counters shows both). Never with `upsert`: an upsert
  computes its new row from values the caller read earlier, outside the
  write lock, so two processes that read the same value both write
  value + 1 and one update is lost without any error.
- Engines: every connection carries its `engine` (`cur.connection.engine`):
  its `vendor`, its `features`, and the operations that differ. `query`,
  `write`, `ensure_tables` and `table_columns` run on whichever engine the
  cursor's connection has, so code written against them (lite_counters,
  lite_config, lite_ops) runs on SQLite and on lite_pg's PostgreSQL alike.
  An engine reached over a network raises `OutcomeUnknown` when a commit's
  answer is lost. The original's helpers are SQLite's.
- Figures: each connection counts its work in `Figures`; `figures()` sums
  them for this process; each function in `listeners` is called with
  (event, amount) as it happens, so that metrics stay outside the core.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import logging
import math
import os
import pwd
import queue
import random
import re
import select
import sqlite3
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

try:
    import fcntl
except ImportError:  # not a POSIX system: the -shm check is off
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "BUSY_POLL_MS",
    "LOCK_BUDGET_MS",
    "PRAGMAS",
    "QUEUE_SUFFIX",
    "SCHEMA_TABLES",
    "UNREACHABLE_CODES",
    "Connection",
    "Engine",
    "Features",
    "Figures",
    "GroupCommit",
    "OutcomeUnknown",
    "Registry",
    "SQLiteEngine",
    "Unavailable",
    "WriteQueue",
    "apply_pragmas",
    "close_all",
    "connect",
    "count",
    "cursor",
    "database_files",
    "ensure_tables",
    "failed",
    "figures",
    "get",
    "listeners",
    "notify",
    "query",
    "refusal",
    "refusal_marker",
    "registry",
    "retrying",
    "table_columns",
    "transact",
    "transact_many",
    "transact_one",
    "upsert",
    "write",
]

__version__ = "0.2.0"

# ---- Settings ---------------------------------------------------------------

LOCK_BUDGET_MS = 3000  # 3 s: total wait for the database lock per call
BUSY_POLL_MS = 5  # 5 ms: the busy timeout, the longest SQLite itself waits per attempt
RETRY_SLEEP_MAX_S = 0.002  # 2 ms: upper bound of one jittered retry sleep
JOURNAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024  # 4 MiB: -wal size kept after a checkpoint
CHECKPOINT_INTERVAL_S = 1.0  # 1 s: least time between two checkpoints of one connection
CHECKPOINT_WAIT_MS = 100  # 100 ms: longest wait of a RESTART checkpoint for readers
WAL_FRAME_HEADER_BYTES = 24  # each page in the WAL is preceded by a 24-byte header
WAL_HEADER_BYTES = 32  # the -wal file starts with a 32-byte header; salts at bytes 16-23
SPLIT_CHECK_S = 0.1  # 100 ms: how long a new connection looks before calling its files split
DATABASE_FILE_SUFFIXES = ("", "-wal", "-shm")
QUEUE_SUFFIX = "-queue"  # the write queue's file, beside the database
REFUSED_SUFFIX = "-refused"  # present: the database was removed or replaced while in use
SIDECAR_SUFFIXES = (QUEUE_SUFFIX, REFUSED_SUFFIX)  # lite's own files beside the database
QUEUE_SLOTS = 4096  # tickets in the write queue's ring; a wrapped-over slot skips the queue
SYNCHRONOUS_MODES = ("NORMAL", "FULL", "GROUP")
SQLITE_NEEDED = (3, 37, 0)  # RETURNING came in 3.35, STRICT tables in 3.37
SQLITE_CONSTRAINT_DATATYPE = 3091  # a STRICT column refused a value of another type
# Primary result codes that mean "the database cannot be reached now".
UNREACHABLE_CODES = {
    sqlite3.SQLITE_PERM,
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_CORRUPT,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_PROTOCOL,
    sqlite3.SQLITE_NOTADB,
}
# Every new connection's settings, in the order apply_pragmas applies them
# (busy_timeout first: the WAL switch may wait for a lock); `synchronous`
# comes from LITE_SYNCHRONOUS, `wal_autocheckpoint` from the caller.
PRAGMAS = {
    "busy_timeout": BUSY_POLL_MS,
    "journal_mode": "WAL",
    "synchronous": "NORMAL",
    "foreign_keys": "ON",
    "journal_size_limit": JOURNAL_SIZE_LIMIT_BYTES,
    "wal_autocheckpoint": 0,
}
# Each feature's schema version, in the database it uses.
SCHEMA_TABLES = (
    "CREATE TABLE IF NOT EXISTS lite_schema ("
    " feature TEXT PRIMARY KEY, version INTEGER NOT NULL) STRICT",
)

# The -shm file's WAL index header (SQLite's WalIndexHdr, native byte order),
# stored twice, at bytes 0 and 48: version, (unused, change counter),
# isInit, (big-endian checksums), page size, frames in the WAL, (pages,
# frame checksum), the WAL header's salts as they are in the -wal file.
_WAL_INDEX_HEADER = struct.Struct("=I8xB1xHI12x8s8x")
_WAL_INDEX_VERSION = 3007000
# SQLite's lock bytes (os_unix.c): readers of the database file lock
# _SHARED_SIZE bytes from _SHARED_FIRST; each connection keeps a read lock
# on byte _SHM_DEAD_MAN_SWITCH of the -shm file. struct flock on 64-bit Linux.
_SHARED_FIRST = 0x40000000 + 2
_SHARED_SIZE = 510
_SHM_DEAD_MAN_SWITCH = 128
_FLOCK = struct.Struct("=hh4xqqi4x")
# The write queue's file: the next ticket (8 bytes, native order) at byte 0,
# one lock byte per slot from byte _QUEUE_FIRST_SLOT.
_QUEUE_TICKET = struct.Struct("=Q")
_QUEUE_FIRST_SLOT = 4096
# Group commit's place in the same file (native order, under one short
# lock from byte 8): the highest number a commit took, the highest flushed,
# the highest the flush under way covers (0 if none); a byte naming the
# flush lock of the one named to lead the next flush (1 or 2, 0 if none:
# one byte, so that it can be read without the short lock) and one saying
# which flush lock the flush under way (or the last) holds (0 or 1). Then
# the two flush locks' bytes, and for each a byte that is 1 once the last
# flush under it succeeded.
_GROUP_STATE = struct.Struct("=QQQBB")  # taken, flushed, flushing, named, current
_GROUP_NUMBER = struct.Struct("=Q")
_GROUP_BEGUN = struct.Struct("=QBB")  # flushing, named, current
_GROUP_ENDED = struct.Struct("=QQ")  # flushed, flushing
_GROUP_TAKEN_AT, _GROUP_FLUSHED_AT, _GROUP_FLUSHING_AT, _GROUP_NAMED_AT = 8, 16, 24, 32
_GROUP_NUMBERS = (_GROUP_TAKEN_AT, _GROUP_STATE.size)  # the short lock: start, length
_GROUP_FLUSH_LOCKS = (48, 49)
_GROUP_SUCCEEDED = {48: 56, 49: 57}  # flush lock: its byte
_SYNCHRONOUS_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# Called with (event, amount) on each event; see Figures for the events.
listeners: list[Callable[[str, float], None]] = []


# ---- Errors -----------------------------------------------------------------


class Unavailable(Exception):
    """The database could not be reached in time; nothing was written.

    Already logged and counted when raised. `reason` is a short text for
    people (e.g. a health check), never shown to clients as is.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OutcomeUnknown(Exception):
    """The connection was lost after COMMIT was sent: the write may or may not be in.

    Raised by engines reached over a network (lite_pg), and with group
    commit when the flush after a commit fails or does not finish in time
    (the write is in, but may not survive a power cut); never retried.
    Already logged and counted. A client tells by reading back, or by
    repeating the request with the same Idempotency-Key.
    """


# ---- Engines ----------------------------------------------------------------


@dataclass(frozen=True)
class Features:
    """What one engine offers that another does not; code that must differ asks these.

    local_files: the database is files on this machine, whose sizes can be
    measured and which can be removed or replaced under the server.
    shared_by_machines: several machines use one database, each with its
    own copy of config.ini (so a version is the file's content alone).
    """

    local_files: bool
    shared_by_machines: bool


class Engine:
    """What code built on lite_db asks of a database, whichever engine holds it.

    Every lite connection carries one as `engine`: its `vendor` ("sqlite",
    "postgresql"), its `features`, and the operations that differ. Code
    calls lite_db's `write`, `query`, `ensure_tables` and `table_columns`,
    which ask the cursor's engine; it asks `features` (never a type, a URL
    or a missing attribute) where it must differ.
    """

    vendor: str
    features: Features

    def write(self, cur: Any, work: Callable[[Any], Any], what: str, one_statement: bool) -> Any:
        """Run `work(cur)` as one write transaction; see `write`."""
        raise NotImplementedError

    def query(self, cur: Any, sql: str, params: Sequence[Any]) -> list[Any]:
        """All rows of one read-only statement; see `query`."""
        raise NotImplementedError

    def create_tables(self, cur: Any, feature: str, version: int, tables: Sequence[str]) -> None:
        """Create `tables` and record `version` unless it is recorded; see `ensure_tables`."""
        raise NotImplementedError

    def table_columns(self, cur: Any, table: str) -> list[str]:
        """The columns of `table` in their order; [] when there is no such table."""
        raise NotImplementedError

    def describe(self, cur: Any) -> dict[str, Any]:
        """The database's settings as the live connection has them, and its size."""
        raise NotImplementedError

    def refusal(self, conn: Any) -> str | None:
        """Why writes through `conn` are refused for good in this process; None if they are not."""
        return None

    def change_watch(self, conn: Any) -> ChangeWatch | None:
        """The connection's ChangeWatch (for its thread's looks at local files), or None."""
        return None

    def out_of_range(self, exc: Exception) -> bool:
        """True if `exc` says a value did not fit its column (e.g. an integer past 2**63 - 1)."""
        raise NotImplementedError


class SQLiteEngine(Engine):
    """SQLite through lite_db: the engine of every `Connection`."""

    vendor = "sqlite"
    features = Features(local_files=True, shared_by_machines=False)

    def write(
        self, cur: sqlite3.Cursor, work: Callable[[Any], Any], what: str, one_statement: bool
    ) -> Any:
        """Run `work(cur)` as one write transaction, with retries; its result.

        `one_statement`: work runs exactly one statement, which is then its
        own transaction: SQLite takes the write lock as the statement
        starts, before it reads anything, as BEGIN IMMEDIATE does, and holds
        it only while SQLite runs that statement, never while Python runs.
        Otherwise work runs between BEGIN IMMEDIATE and COMMIT. Raises
        Unavailable, or the sqlite3.Error, after logging and counting a
        failure.
        """
        conn = cur.connection

        lock_wait: float | None = None  # from asking (queue included) to holding the lock

        def in_transaction() -> Any:
            nonlocal lock_wait
            cur.execute("BEGIN IMMEDIATE")
            lock_wait = time.monotonic() - asked
            try:
                result = work(cur)
                cur.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    cur.execute("ROLLBACK")
                raise
            return result

        def statement() -> Any:
            nonlocal lock_wait
            result = work(cur)
            lock_wait = time.monotonic() - asked
            return result

        # 1. Count it.
        conn.figures.writes += 1
        if listeners:
            notify("writes", 1)
        # 2. The database's files must still be those this connection holds:
        # a write into a file removed or replaced under the server would be
        # lost, and one locked through a removed -shm could overwrite
        # another process's.
        _refuse_if_changed(conn)
        # 3. A transaction runs Python while it holds the lock: it waits its
        # turn in the queue first. A single statement holds it only inside
        # SQLite.
        asked = time.monotonic()
        deadline = asked + LOCK_BUDGET_MS / 1000
        queued = not one_statement and conn.queue.enter(deadline)
        # 4. Take the lock and run, retried within the budget.
        try:
            result = retrying(
                conn, statement if one_statement else in_transaction, conn.figures, deadline
            )
        except sqlite3.Error as exc:
            failure = _failed(conn, "write", what, exc)
            if failure is exc:
                raise
            raise failure from exc
        finally:
            if queued:
                conn.queue.leave()
            waited = time.monotonic() - asked if lock_wait is None else lock_wait
            conn.figures.write_lock_wait_s += waited
            if listeners:
                notify("write_lock_wait_s", waited)
        # 5. Removed in the moment since step 2, the file may hold this
        # commit alone: then it is in the copy _refuse saves. Else, now and
        # then, a checkpoint.
        if (changed := _file_changed(conn)) is not None:
            _refuse(conn, changed, wrote_since=True)
        else:
            _checkpoint_now_and_then(conn)
        # 6. With group commit, acknowledged only once on disk.
        if conn.group_commit is not None:
            conn.group_commit.wait(time.monotonic() + LOCK_BUDGET_MS / 1000)
        return result

    def query(self, cur: sqlite3.Cursor, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        figures = cur.connection.figures
        figures.reads += 1  # _read and notify, inlined: the hot path
        for listener in listeners:
            listener("reads", 1)
        started = time.monotonic()
        try:
            rows = cur.execute(sql, params).fetchall()  # retrying's first attempt, inlined too
        except sqlite3.Error as exc:
            return self._query_again(cur, sql, params, exc, started)
        elapsed = time.monotonic() - started
        figures.db_time_s += elapsed
        for listener in listeners:
            listener("db_time_s", elapsed)
        return rows

    def _query_again(
        self, cur: sqlite3.Cursor, sql: str, params: Sequence[Any], exc: Exception, started: float
    ) -> list[sqlite3.Row]:
        """query's rows once its first attempt raised `exc`: retried as retrying does, or raised."""
        conn = cur.connection
        count(conn.figures, "db_time_s", time.monotonic() - started)
        try:
            if not _is_busy(exc):
                raise exc
            count(conn.figures, "busy_retries")
            deadline = started + LOCK_BUDGET_MS / 1000

            def attempt() -> list[sqlite3.Row]:
                return cur.execute(sql, params).fetchall()

            return retrying(conn, attempt, conn.figures, deadline)
        except sqlite3.Error as last:
            failure = _failed(conn, "read", "query", last)
            if failure is last:
                raise
            raise failure from last

    def create_tables(
        self, cur: sqlite3.Cursor, feature: str, version: int, tables: Sequence[str]
    ) -> None:
        def recorded() -> int:
            if cur.execute("SELECT 1 FROM sqlite_schema WHERE name = 'lite_schema'").fetchone():
                row = cur.execute(
                    "SELECT version FROM lite_schema WHERE feature = ?", (feature,)
                ).fetchone()
                return row[0] if row else 0
            return 0

        if _read(cur, recorded, f"schema of {feature}") >= version:
            return

        def create(cur: sqlite3.Cursor) -> None:
            for statement in (*SCHEMA_TABLES, *tables):
                cur.execute(statement)
            cur.execute(
                "INSERT INTO lite_schema (feature, version) VALUES (?, ?)"
                " ON CONFLICT (feature) DO UPDATE SET version = excluded.version",
                (feature, version),
            )

        self.write(cur, create, f"tables of {feature}", one_statement=False)

    def table_columns(self, cur: sqlite3.Cursor, table: str) -> list[str]:
        rows = self.query(cur, "SELECT name FROM pragma_table_info(?)", (table,))
        return [row[0] for row in rows]

    def describe(self, cur: sqlite3.Cursor) -> dict[str, Any]:
        rows = self.query(
            cur,
            "SELECT * FROM pragma_journal_mode, pragma_synchronous, pragma_busy_timeout,"
            " pragma_journal_size_limit, pragma_page_size, pragma_page_count",
            (),
        )
        journal_mode, synchronous, busy_timeout, size_limit, page_size, page_count = rows[0]
        path = cur.connection.path
        return {
            "journal_mode": journal_mode,
            # NORMAL's commits, acknowledged once flushed: GROUP.
            "synchronous": "GROUP"
            if cur.connection.group_commit is not None
            else _SYNCHRONOUS_NAMES.get(synchronous, "?"),
            "busy_timeout_ms": busy_timeout,
            "lock_budget_ms": LOCK_BUDGET_MS,
            "journal_size_limit_bytes": size_limit,
            "page_size": page_size,
            "page_count": page_count,
            "db_bytes": _size(path),
            "wal_bytes": _size(path + "-wal"),
        }

    def refusal(self, conn: Connection) -> str | None:
        return refusal(conn.path)

    def change_watch(self, conn: Connection) -> ChangeWatch:
        return conn.watch

    def out_of_range(self, exc: Exception) -> bool:
        # An integer past 2**63 - 1 becomes a REAL, which a STRICT INTEGER column refuses.
        return getattr(exc, "sqlite_errorcode", None) == SQLITE_CONSTRAINT_DATATYPE


SQLITE = SQLiteEngine()


# ---- Connections ------------------------------------------------------------


def connect(path: str, create: bool = True) -> Connection:
    """This thread's connection to `path` in this process, opened on first use.

    `create`: make the database file if it is missing (a server passes
    False, so that a deleted database never comes back empty). A connection
    that could not write (opened while the file was not writable) is
    replaced once the file is writable again. Raises Unavailable (logged) if
    the database cannot be opened or its file changed under this process,
    RuntimeError if SQLite is older than SQLITE_NEEDED.
    """
    if registry.pid != os.getpid():
        registry.forked()
    conn = registry.connections.get((path, threading.get_ident()))  # registry.held, inlined
    if (
        conn is not None
        and conn.thread is threading.current_thread()
        and not conn.reopen
        and not (conn.read_only and os.access(path, os.W_OK))
    ):
        return conn
    if path in registry.refused:
        raise Unavailable(f"database files changed: {registry.refused[path]}")
    if os.path.exists(refusal_marker(path)):
        log.error(
            "cannot open database %s: it was removed or replaced while in use (%s);"
            " restore it with ./serve.sh restore FILE",
            path,
            refusal_marker(path),
        )
        registry.refused[path] = f"see {refusal_marker(path)}"  # logged once per process
        raise Unavailable(f"database files changed: {registry.refused[path]}")
    registry.make_room(path)
    try:
        conn = _open(path, create)
    except sqlite3.Error as exc:
        code = _primary_code(exc)
        log.error("cannot open database %s: %s%s", path, exc, _advice(code, path))
        count(registry.closed_figures, "read_failures")
        raise Unavailable(f"cannot open database: {exc}") from exc
    if conn.split is not None:
        # The processes holding the old files notice at their next write,
        # refuse and save what they hold; this one must not write beside them.
        conn.close()
        registry.refused[path] = conn.split
        log.error(
            "database changed under lite: %s. This process refuses the database: stop lite,"
            " restore the copy named in %s if there is one (./serve.sh restore FILE), start lite",
            conn.split,
            refusal_marker(path),
        )
        count(registry.closed_figures, "read_failures")
        raise Unavailable(f"database files changed: {conn.split}")
    registry.keep(path, conn)
    return conn


def cursor(path: str, create: bool = True) -> sqlite3.Cursor:
    """A fresh cursor on this thread's connection (see `connect`); the caller closes it.

    Raises Unavailable (logged and counted) if the database cannot be opened.
    """
    return connect(path, create).cursor()


def close_all() -> None:
    """Close every connection of this process, every engine's, and forget figures and refusals.

    For shutdown, and for tests to start afresh: the one reset of this
    module's state.
    """
    if registry.pid != os.getpid():
        registry.forked()
    with registry.lock:
        for key in list(registry.connections):
            registry.retire(key)
        registry.closed_figures = Figures()
        registry.refused = {}


def figures() -> dict[str, Any]:
    """This process's figures: its open connections' and its closed ones', summed.

    Also `connections`: how many connections this process has open now.
    """
    total = Figures()
    open_now = []
    if registry.pid == os.getpid():
        total.add(registry.closed_figures)
        open_now = list(registry.connections.values())
        for conn in open_now:
            total.add(conn.figures)
    return {**asdict(total), "connections": len(open_now)}


@dataclass
class Figures:
    """What one connection (or, summed, one process) has done.

    db_time_s: seconds in database calls, waits for the lock included;
    write_lock_wait_s: seconds from asking for the write lock (the write
    queue, busy retries and their sleeps included) to holding it (BEGIN
    IMMEDIATE returned, or the whole of a one-statement write, which takes
    the lock as it starts); one event per write.

    Each field is also an event for `listeners`, with the amount added; and
    lite_config tells them "config_applied" and "config_rejected".
    """

    reads: int = 0
    read_failures: int = 0
    writes: int = 0
    write_failures: int = 0
    busy_retries: int = 0
    db_time_s: float = 0.0
    write_lock_wait_s: float = 0.0
    checkpoints: int = 0
    wal_restarts: int = 0
    flushes: int = 0
    last_checkpoint_at: float | None = None

    def add(self, other: Figures) -> None:
        for name, value in asdict(other).items():
            if name == "last_checkpoint_at":
                if value is not None:
                    self.last_checkpoint_at = max(value, self.last_checkpoint_at or 0)
            else:
                setattr(self, name, getattr(self, name) + value)


class Connection(sqlite3.Connection):
    """A connection that carries its own state: whose it is, its clocks, its figures.

    `state`: what code built on lite_db keeps per connection (lite_counters:
    when it last pruned expired keys).
    """

    engine: Engine = SQLITE

    def __init__(self, path: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(path, *args, **kwargs)
        self.path = path
        self.pid = os.getpid()
        self.thread = threading.current_thread()
        self.read_only = False  # opened while the file was not writable
        self.reopen = False  # found unable to write: replaced at the next connect()
        self.last_checkpoint = -math.inf  # time.monotonic() of its last checkpoint
        self.columns: dict[str, tuple[str, ...]] = {}
        self.tables_ready: set[str] = set()  # features whose tables ensure_tables found
        self.state: dict[str, Any] = {}
        self.figures = Figures()
        # (device, inode) of each of the database's files (the database, its
        # -wal and -shm) it holds open, by path; empty where /proc is missing.
        self.files: dict[str, tuple[int, int]] = {}
        # What changed under its files and its app's config, asked before a `stat`.
        self.watch = ChangeWatch()
        # Why its -wal or -shm is not the one the other processes use; None if it is.
        self.split: str | None = None
        self.queue = WriteQueue(_file_of(path))  # its file opened at the first transaction
        self.group_commit: GroupCommit | None = None  # with LITE_SYNCHRONOUS=GROUP

    def close(self) -> None:
        self.queue.close()
        if self.group_commit is not None:
            self.group_commit.close()
        self.watch.close()
        super().close()


class Registry:
    """This process's connections, one per database and thread, every engine's.

    Held by strong references, not in threading.local: in a forked child
    Python discards the locals of the parent's other threads, and a
    connection freed there would be closed, running SQLite's close-time
    unlock and checkpoint against locks that belong to the parent (or, for
    a server's session, ending the parent's session). A connection is kept
    under (database, thread ident) and has `thread`, `figures` and `close()`.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.connections: dict[tuple[str, int], Any] = {}
        self.inherited: list[Any] = []  # from before a fork: never used or closed
        self.closed_figures = Figures()  # the figures of connections closed since
        self.lock = threading.Lock()
        # Paths whose database file was removed or replaced under this
        # process: their writes are refused, the reason kept here.
        self.refused: dict[str, str] = {}

    def held(self, database: str) -> Any | None:
        """This thread's connection to `database`, if it has one (after a fork: none)."""
        if self.pid != os.getpid():
            self.forked()
        conn = self.connections.get((database, threading.get_ident()))
        if conn is not None and conn.thread is threading.current_thread():
            return conn
        return None

    def make_room(self, database: str) -> None:
        """Close what this thread's new connection replaces, and every ended thread's.

        Thread idents are reused: a connection under this thread's key may be
        a dead thread's.
        """
        key = (database, threading.get_ident())
        with self.lock:
            for other_key, other in list(self.connections.items()):
                if other_key == key or not other.thread.is_alive():
                    self.retire(other_key)

    def keep(self, database: str, conn: Any) -> None:
        """Hold `conn` as this thread's connection to `database`."""
        with self.lock:
            self.connections[(database, threading.get_ident())] = conn

    def discard(self, conn: Any) -> None:
        """Close `conn` and forget it (e.g. found broken)."""
        with self.lock:
            for key, held in list(self.connections.items()):
                if held is conn:
                    self.retire(key)
                    return
        conn.close()

    def forked(self) -> None:
        """Start over in a forked child, keeping the parent's connections referenced."""
        self.inherited.extend(self.connections.values())
        self.connections = {}
        self.closed_figures = Figures()
        self.lock = threading.Lock()
        self.refused = {}
        self.pid = os.getpid()

    def retire(self, key: tuple[str, int]) -> None:
        """Close a connection of this process (caller holds the lock)."""
        conn = self.connections.pop(key)
        self.closed_figures.add(conn.figures)
        conn.close()


registry = Registry()


def _close_at_exit() -> None:
    # The last connection to close checkpoints the WAL and removes -wal and
    # -shm. Left to interpreter teardown, connections are not always freed
    # (a live helper thread of the write queue is enough to prevent it).
    try:
        close_all()
    except sqlite3.Error as exc:
        log.warning("closing lite's connections at exit: %s", exc)


atexit.register(_close_at_exit)


# ---- Reads and writes (any engine) ------------------------------------------


def query(cur: Any, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    """All rows of a read-only query, in its own read transaction.

    Raises Unavailable, or the engine's error, after logging and counting it.
    """
    if not isinstance(sql, str):
        raise ValueError("sql must be a string")
    return cur.connection.engine.query(cur, sql, params)


def write(cur: Any, work: Callable[[Any], Any], one_statement: bool = False) -> Any:
    """Run `work(cur)` in one write transaction that takes the lock first; its result.

    The way to read, compute in Python and write back without losing
    updates (lite_counters.update_counter shows it). `one_statement`: work
    runs exactly one statement, which is then its own transaction, locked
    before it reads and only while the database runs it. `work` may be run
    again after a busy error, so it must have no effects outside the
    database. Raises Unavailable, or the engine's error, after logging and
    counting it; nothing was written then.
    """
    return cur.connection.engine.write(cur, work, getattr(work, "__name__", "write"), one_statement)


def ensure_tables(
    cur: Any,
    feature: str,
    version: int,
    tables: Sequence[str],
    check: Callable[[Any], None] | None = None,
) -> None:
    """Create the tables of `feature` if this database lacks them, and record its version.

    `tables`: CREATE ... IF NOT EXISTS statements, in SQLite's words (an
    engine translates them). Runs at most once per connection and feature;
    a write only when the feature is new to the database. `check(cur)`, if
    given, runs first, once per connection (e.g. to refuse a table of the
    same name that is not the feature's). Raises Unavailable as a write
    does, and what `check` raises.
    """
    conn = cur.connection
    if feature in conn.tables_ready:
        return
    if check is not None:
        check(cur)
    conn.engine.create_tables(cur, feature, version, tables)
    conn.tables_ready.add(feature)


def table_columns(cur: Any, table: str) -> list[str]:
    """The columns of `table` in their order; [] when there is no such table.

    Raises Unavailable as a read does.
    """
    return cur.connection.engine.table_columns(cur, table)


def count(figures: Figures, event: str, amount: float = 1) -> None:
    """Count `event` in `figures` (a connection's) and tell the listeners.

    The hot paths inline this.
    """
    setattr(figures, event, getattr(figures, event) + amount)
    if listeners:
        notify(event, amount)


def notify(event: str, amount: float = 1) -> None:
    """Call every function in `listeners` with (event, amount)."""
    for listener in listeners:
        listener(event, amount)


def failed(
    figures: Figures, kind: str, what: str, exc: Exception, reason: str | None, advice: str = ""
) -> Exception:
    """Log and count a failed read or write ("read"/"write"); the exception to raise for it.

    Unavailable(reason) when the database could not be reached (`reason`
    given), else `exc` itself. `advice`: what a person should do, for the log.
    """
    count(figures, f"{kind}_failures")
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    log.error("%s failed (%s): %s%s", kind, what, text, advice)
    return Unavailable(reason) if reason is not None else exc


# ---- The original's helpers: False (or None) on failure (SQLite) ------------


def transact(
    cur: sqlite3.Cursor,
    work: Callable[[sqlite3.Cursor], Any] | Sequence[tuple[str, Sequence[Any]]],
) -> Any:
    """Run `work` in one write transaction that holds the write lock throughout.

    `work` is a list of (sql, params) statements, or a callable taking the
    cursor (see `write`), which must not return False. Returns the
    callable's result (True for a list, or when the callable returns None);
    False on failure (logged and counted): test with `is False`.
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

    try:
        return SQLITE.write(cur, run_and_mark, "transact", one_statement=False)
    except (Unavailable, sqlite3.Error):
        return False


def transact_one(cur: sqlite3.Cursor, sql: str, params: Sequence[Any] = ()) -> Any:
    """Run one statement in a write transaction.

    Returns the first row it returns (RETURNING), else True; False on failure.
    """
    if not isinstance(sql, str):
        raise ValueError("sql must be a string")

    def run(cur: sqlite3.Cursor) -> Any:
        rows = cur.execute(sql, params).fetchall()
        return rows[0] if rows else True

    what = sql.split(None, 1)[0] if sql.strip() else "empty"
    try:
        return SQLITE.write(cur, run, what, one_statement=True)
    except (Unavailable, sqlite3.Error):
        return False


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

    try:
        return SQLITE.write(cur, run, "transact_many", one_statement=False)
    except (Unavailable, sqlite3.Error):
        return False


def get(cur: sqlite3.Cursor, table: str, key: Any, attr: str, default: Any = None) -> Any:
    """One attribute of the row of `table` whose primary key is `key`.

    Returns `default` if there is no such row; None on failure. Raises
    ValueError for an unknown table or column.
    """
    columns = _check_columns(cur, table, [attr])
    sql = f'SELECT "{attr}" FROM "{table}" WHERE "{columns[0]}" = ?'
    try:
        row = _read(cur, lambda: cur.execute(sql, (key,)).fetchone(), f"get {table}.{attr}")
    except (Unavailable, sqlite3.Error):
        return None
    return default if row is None else row[0]


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

    try:
        return SQLITE.write(cur, run, f"upsert {table}", one_statement=True)
    except (Unavailable, sqlite3.Error):
        return False


# ---- Any sqlite3 connection: lite's settings and waits ----------------------


def apply_pragmas(
    conn: sqlite3.Connection,
    figures: Figures,
    wal_autocheckpoint: int = 0,
    group_commit: bool = False,
) -> None:
    """Give a new connection lite's settings: WAL, synchronous, foreign keys, busy timeout.

    Also a journal size limit and `wal_autocheckpoint` (pages; 0: none, for
    connections whose writes go through lite's write path, which
    checkpoints). Run on the connection itself, for any sqlite3 connection
    (lite_django's too). With LITE_SYNCHRONOUS=GROUP, synchronous is NORMAL
    where the caller waits for each commit's flush (`group_commit`: lite's
    write path) and FULL elsewhere, so that a commit is on disk when it
    returns either way. Raises sqlite3.Error, ValueError for a bad
    LITE_SYNCHRONOUS.
    """
    mode = _synchronous()
    settings = {
        **PRAGMAS,
        "synchronous": {"GROUP": "NORMAL" if group_commit else "FULL"}.get(mode, mode),
        "wal_autocheckpoint": int(wal_autocheckpoint),
    }
    conn.execute(f"PRAGMA busy_timeout = {settings.pop('busy_timeout')}")
    # Making a new database WAL takes a lock: waited for like any other.
    journal_mode = settings.pop("journal_mode")
    retrying(conn, lambda: conn.execute(f"PRAGMA journal_mode = {journal_mode}"), figures)
    for name, value in settings.items():
        conn.execute(f"PRAGMA {name} = {value}")


def retrying(
    conn: sqlite3.Connection | None,
    attempt: Callable[[], Any],
    figures: Figures,
    deadline: float | None = None,
    transient: Callable[[Exception], bool] | None = None,
) -> Any:
    """Run `attempt()`, retrying on busy/locked until LOCK_BUDGET_MS is spent.

    For any sqlite3 connection whose busy timeout is BUSY_POLL_MS
    (apply_pragmas); busy retries and time are counted in `figures`. Raises
    the last error when the budget is spent (at `deadline`, a
    time.monotonic(); default LOCK_BUDGET_MS from now) or the error is not
    busy/locked. Another engine passes `transient` (which of its errors may
    be retried) and no `conn`: the same loop, sleeps and counting.

    The wait is sliced: SQLite's busy handler waits at most BUSY_POLL_MS per
    attempt, then this loop sleeps a jittered moment and
    tries again. Left to wait the whole budget itself, SQLite's handler backs
    off to sleeps of 100 ms, and a process that has waited long loses the lock
    to each newcomer (tests/test_db.py::test_waits_for_the_write_lock_are_fair).
    The retries also cover busy errors SQLite returns without waiting, e.g.
    while another connection runs WAL recovery
    (tests/test_db.py::test_busy_without_wait_is_retried).
    """
    started = time.monotonic()
    if deadline is None:
        deadline = started + LOCK_BUDGET_MS / 1000
    narrowed = False
    try:
        while True:
            try:
                return attempt()
            except Exception as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not (_is_busy(exc) if transient is None else transient(exc)):
                    raise
                count(figures, "busy_retries")
                time.sleep(random.uniform(0, min(RETRY_SLEEP_MAX_S, remaining)))
                remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
                if remaining_ms < BUSY_POLL_MS and conn is not None:
                    conn.execute(f"PRAGMA busy_timeout = {remaining_ms}")
                    narrowed = True
    finally:
        elapsed = time.monotonic() - started
        figures.db_time_s += elapsed
        if listeners:
            notify("db_time_s", elapsed)
        if narrowed:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_POLL_MS}")


# ---- Files: still the ones this process holds -------------------------------


def refusal(path: str) -> str | None:
    """Why writes to `path` are refused in this process (its file changed), or None."""
    return registry.refused.get(path) if registry.pid == os.getpid() else None


def refusal_marker(path: str) -> str:
    """The file whose presence makes every process refuse `path` (serve.sh restore removes it)."""
    return path + REFUSED_SUFFIX


def database_files(path: str) -> tuple[str, ...]:
    """Every file a database at `path` may have: itself first, then those beside it.

    SQLite's -wal and -shm, lite's write queue and refusal mark. Removing or
    replacing a database means all of them (`lite files DB` prints them).
    """
    return tuple(path + suffix for suffix in (*DATABASE_FILE_SUFFIXES, *SIDECAR_SUFFIXES))


def _refuse_if_changed(conn: Connection) -> None:
    """Raise Unavailable (counted) if writes to the connection's database are refused.

    They are once its file was found removed or replaced, by this look or an
    earlier one; this look refuses from now on and saves what it holds.
    """
    refused = registry.refused.get(conn.path)
    if refused is None and (changed := _file_changed(conn)) is not None:
        _refuse(conn, changed, wrote_since=False)
        refused = changed
    if refused is not None:
        count(conn.figures, "write_failures")
        raise Unavailable(f"database files changed: {refused}")


# inotify(7)'s event masks (<sys/inotify.h>).
_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x2, 0x4, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF, _IN_Q_OVERFLOW, _IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
_IN_MASK_ADD = 0x20000000
_IN_RENAMES = _IN_MOVED_FROM | _IN_MOVED_TO | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF
_IN_NAMES = _IN_RENAMES | _IN_CREATE  # a directory's entries
_IN_CONTENT = _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_DELETE_SELF | _IN_MOVE_SELF
_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, name length; then the name


def watched_paths(path: str, content: bool = False) -> list[tuple[str, int]]:
    """What a ChangeWatch watches so that `path` cannot name another file unseen.

    The entries of its directory, as named and as resolved through
    symlinks, and the entries of every directory above those that could be
    renamed or removed; with `content`, the file's own changes too.
    """
    path = os.path.abspath(path)
    paths = [(path, _IN_CONTENT)] if content else []
    for directory in dict.fromkeys(
        (os.path.dirname(path), os.path.realpath(os.path.dirname(path)))
        + ((os.path.dirname(os.path.realpath(path)),) if content else ())
    ):
        paths.append((directory, _IN_NAMES))
        while directory != os.path.dirname(directory):
            directory = os.path.dirname(directory)
            paths.append((directory, _IN_RENAMES))
    return paths


class ChangeWatch:
    """Whether watched paths may have changed since a look: one per connection, used by its thread.

    One poll(0) of two descriptors answers for every path watched: an
    inotify(7) instance, and /proc/self/mountinfo, which the kernel marks
    on every mount or unmount. inotify queues an event before the call that
    made the change returns, so a change made before a look is seen by it.
    Each caller watches its paths under a name of its own ("files", a
    config file's); `changed(name)` answers True from the first event on one
    of them (or any mount) until `looked(name)`, which the caller calls once
    a look (a `stat` of each path) found what it needed. Where inotify or the
    mount table cannot be had (not Linux; past fs.inotify.max_user_instances,
    128 a user by default), every name is changed at every look: the
    callers stat each time. Never raises.
    """

    _libc: Any = None  # the C library, loaded by the first watch

    def __init__(self) -> None:
        self.inotify: int | None = None
        self.mountinfo: int | None = None
        self.poller: Any = None
        self.broken = False  # no inotify or mount table: every name always changed
        self.paths: dict[str, list[tuple[str, int]]] = {}  # name -> (path, inotify mask)
        self.names_of: dict[int, set[str]] = {}  # inotify watch descriptor -> names
        self.unwatched: set[str] = set()  # names whose watches must be added again
        self.changes: set[str] = set()  # names changed since their look

    def watch(self, name: str, paths: list[tuple[str, int]]) -> None:
        """Watch each (path, inotify mask) for `name`, from now on; changed(name) until looked()."""
        self.paths[name] = paths
        self.changes.add(name)
        if self.poller is not None:
            self._add_watches(name)

    def changed(self, name: str) -> bool:
        """True if a path watched for `name` may have changed since looked(name) (or ever)."""
        if self.poller is None and not self._start():
            return True
        ready = self.poller.poll(0)
        if ready:
            self._take(ready)
        if (name in self.changes or name in self.unwatched) and name in self.paths:
            # Watch what the paths name now (a file renamed over one watched is
            # another inode), before the caller's look, so that nothing falls between.
            self._add_watches(name)
        return name in self.changes or name not in self.paths

    def watches(self, name: str) -> bool:
        return name in self.paths

    def looked(self, name: str) -> None:
        """The caller looked after changed(name) and found what it needed: clear the change."""
        self.changes.discard(name)

    def _start(self) -> bool:
        if self.broken:
            return False
        try:
            if ChangeWatch._libc is None:
                ChangeWatch._libc = ctypes.CDLL(None, use_errno=True)
            self.inotify = ChangeWatch._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if self.inotify < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            self.mountinfo = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
            self.poller = select.poll()
            self.poller.register(self.inotify, select.POLLIN)
            self.poller.register(self.mountinfo, select.POLLPRI | select.POLLERR)
            self.poller.poll(0)  # the mount table's mark, as of now
        except (OSError, AttributeError):
            self.close()
            self.broken = True
            return False
        for name in self.paths:
            self._add_watches(name)
        return True

    def _take(self, ready: list[tuple[int, int]]) -> None:
        for fd, _ in ready:
            if fd == self.inotify:
                self._read_events()
            else:  # a mount or unmount: a path may name another file with no event
                self.changes.update(self.paths)

    def _add_watches(self, name: str) -> None:
        self.unwatched.discard(name)
        self.changes.add(name)
        for path, mask in self.paths[name]:
            wd = ChangeWatch._libc.inotify_add_watch(
                self.inotify, os.fsencode(path), mask | _IN_MASK_ADD
            )
            if wd >= 0:
                self.names_of.setdefault(wd, set()).add(name)
            elif ctypes.get_errno() != errno.ENOENT:  # a path that does not exist yet is fine
                self.unwatched.add(name)  # e.g. past max_user_watches: tried again, stat meanwhile

    def _read_events(self) -> None:
        while True:
            try:
                data = os.read(self.inotify, 65536)
            except BlockingIOError:
                return
            except OSError:
                self.changes.update(self.paths)
                return
            at = 0
            while at + _INOTIFY_EVENT.size <= len(data):
                wd, mask, _, length = _INOTIFY_EVENT.unpack_from(data, at)
                at += _INOTIFY_EVENT.size + length
                if mask & _IN_Q_OVERFLOW:
                    self.changes.update(self.paths)
                    self.unwatched.update(self.paths)
                elif mask & _IN_IGNORED:  # the watch is gone with its file: add it again
                    for name in self.names_of.pop(wd, ()):
                        self.changes.add(name)
                        self.unwatched.add(name)
                else:
                    self.changes.update(self.names_of.get(wd, ()))

    def close(self) -> None:
        for fd in (self.inotify, self.mountinfo):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.inotify, self.mountinfo, self.poller = None, None, None

    def __del__(self) -> None:
        # E.g. the watch of a connection freed without close(); at interpreter
        # exit the modules close() needs may already be gone.
        with contextlib.suppress(Exception):
            self.close()


def _file_changed(conn: Connection) -> str | None:
    """Why a path no longer names the file the connection holds; None if each still does.

    A `stat` of each file, only when the connection's ChangeWatch has seen
    a change since the last look that found every file in place: removing,
    renaming or linking a file in the database's directory, or renaming or
    removing a directory above it, is an inotify event before the call that
    does it returns; a mount that puts another file at a path changes the
    mount table.
    """
    watch = conn.watch
    if not watch.changed("files"):
        return None
    for name, identity in conn.files.items():
        try:
            now = os.stat(name)
        except FileNotFoundError:
            return f"{name} was removed"
        except OSError:
            continue
        if (now.st_dev, now.st_ino) != identity:
            return f"{name} was replaced by another file"
    watch.looked("files")
    return None


def _refuse(conn: Connection, reason: str, wrote_since: bool) -> None:
    """Refuse this process's writes to the path from now on, and save what it holds.

    The files this process still has open may hold acknowledged writes that
    exist nowhere else: SQLite's backup API copies the database as this
    connection sees it to a new file beside the path, named in the log and
    in the -refused mark. The first process to notice saves a copy, and so
    does each that committed after the change (`wrote_since`); the others
    hold nothing newer. Copies are made one at a time (a lock on the mark),
    so the last one the mark names holds everything the others do.
    """
    registry.refused[conn.path] = reason
    marker_path = refusal_marker(conn.path)
    saved = f"{conn.path}.saved-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    try:
        # Every process refuses from now on, those started later included:
        # beside a moved-in file, the old -wal would be replayed into it.
        marker = open(marker_path, "a", encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        log.error("database changed under lite: %s; writes refused; no mark: %s", reason, exc)
        return
    with marker:
        if fcntl is not None:
            fcntl.flock(marker, fcntl.LOCK_EX)
        if os.fstat(marker.fileno()).st_size > 0 and not wrote_since:
            log.error(
                "database changed under lite: %s; writes are refused until the database is"
                " restored (the last copy named in %s holds everything)",
                reason,
                marker_path,
            )
            return
        try:
            target = sqlite3.connect(saved)
            try:
                conn.backup(target)
            finally:
                target.close()
        except sqlite3.Error as exc:
            log.error(
                "database changed under lite: %s; writes refused; saving it failed: %s", reason, exc
            )
            return
        marker.write(f"{reason}; saved as {saved}\n")
    log.error(
        "database changed under lite: %s. Writes are refused until the database is restored."
        " The database this process had open is saved as %s: stop lite, then restore it"
        " (./serve.sh restore %s), or restore your own copy",
        reason,
        saved,
        saved,
    )


def _held_files(path: str) -> dict[str, tuple[tuple[int, int], int]]:
    """The database's files this process holds open: by path, ((device, inode), fd).

    Read from the process's own file descriptors, not from a stat of the
    path, which may already name another file. Empty where /proc is missing
    (the checks are then off). Raises sqlite3.DatabaseError if the process
    holds two different files under one name: two generations of the
    database.
    """
    target = os.path.realpath(path)
    names = {target + suffix: path + suffix for suffix in DATABASE_FILE_SUFFIXES}
    found: dict[str, tuple[tuple[int, int], int]] = {}
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return {}
    for fd in fds:
        try:
            before = os.stat(f"/proc/self/fd/{fd}")
            name = names.get(os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)"))
            if name is None:
                continue
            held = os.stat(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        identity = (held.st_dev, held.st_ino)
        if identity != (before.st_dev, before.st_ino):
            continue  # closed and reused by another thread meanwhile
        if name in found and found[name][0] != identity:
            raise sqlite3.DatabaseError(f"{name}: two different files are open under that name")
        found[name] = (identity, int(fd))
    return found


def _split_from_others(path: str, held: dict[str, tuple[tuple[int, int], int]]) -> str | None:
    """Why this process's -wal and -shm are not those the other processes use; None if they are.

    A -shm file removed while processes hold it open leaves them locking
    through the old one: a process opening the database now makes a new one,
    and the two groups would write the same WAL frames. A -wal file removed
    leaves the shared index describing frames the new -wal does not have.
    SQLite notices neither. Checked a few times over SPLIT_CHECK_S, so that a
    process caught between locking the database and mapping the -shm, or a
    checkpoint truncating the WAL, is not taken for a split.
    """
    deadline = time.monotonic() + SPLIT_CHECK_S
    while True:
        files = [held.get(path + suffix) for suffix in DATABASE_FILE_SUFFIXES]
        if None in files:
            return None
        database, wal, shm = files
        reason = _other_shm_users(path, database[1], shm[1]) or _wal_unlike_index(
            path, wal[1], shm[1]
        )
        if reason is None:
            return None
        # Another thread may have closed a descriptor and reused its number
        # meanwhile: an answer counts only if each still names its file.
        if _still_open(files) and time.monotonic() >= deadline:
            return reason
        if time.monotonic() >= deadline + SPLIT_CHECK_S:
            return None  # never a stable look: no evidence of a split
        time.sleep(SPLIT_CHECK_S / 10)
        held = _held_files(path)


def _still_open(files: list[tuple[tuple[int, int], int]]) -> bool:
    """Whether each descriptor still refers to the file it was found open on."""
    for identity, fd in files:
        try:
            now = os.fstat(fd)
        except OSError:
            return False
        if (now.st_dev, now.st_ino) != identity:
            return False
    return True


def _other_shm_users(path: str, database_fd: int, shm_fd: int) -> str | None:
    """Why other processes lock the database but not this -shm; None if they do not.

    Every connection in WAL mode holds a read lock on the database file and
    one on the -shm file's dead-man-switch byte for as long as it is open:
    if another process holds the first, one must hold the second. F_GETLK
    only asks (no lock is taken), on SQLite's own descriptors: a descriptor
    of the file opened and closed here would drop this process's locks.
    """
    if fcntl is None:
        return None
    try:
        database_used = _locked_by_another(database_fd, _SHARED_FIRST, _SHARED_SIZE)
        shm_used = _locked_by_another(shm_fd, _SHM_DEAD_MAN_SWITCH, 1)
    except OSError:
        return None
    if database_used and not shm_used:
        return f"{path}-shm was removed or replaced: other processes still use the old one"
    return None


def _locked_by_another(fd: int, start: int, length: int) -> bool:
    probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
    lock_type = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, probe))[0]
    return lock_type != fcntl.F_UNLCK


def _wal_unlike_index(path: str, wal_fd: int, shm_fd: int) -> str | None:
    """Why the -wal this process opened is not the one the shared index describes; None if it is."""
    try:
        index = os.pread(shm_fd, 2 * _WAL_INDEX_HEADER.size, 0)
        header = os.pread(wal_fd, WAL_HEADER_BYTES, 0)
        wal_bytes = os.fstat(wal_fd).st_size
    except OSError:
        return None
    if len(index) < 2 * _WAL_INDEX_HEADER.size or index[:48] != index[48:]:
        return None  # not initialised yet, or being written: SQLite itself retries
    version, is_init, page_size, frames, salts = _WAL_INDEX_HEADER.unpack(index[:48])
    if version != _WAL_INDEX_VERSION or not is_init or frames == 0:
        return None
    page_size = 65536 if page_size == 1 else page_size
    needed = WAL_HEADER_BYTES + frames * (page_size + WAL_FRAME_HEADER_BYTES)
    if header[16:24] != salts or wal_bytes < needed:
        return f"{path}-wal was removed or replaced: it is not the WAL the other processes wrote"
    return None


# ---- Write queue ------------------------------------------------------------


class WriteQueue:
    """A first-come, first-served line for the write lock, shared by every process of a database.

    SQLite gives its write lock to whichever waiter tries first once it is
    free. For a one-statement write, which holds the lock only inside
    SQLite, lite's short slices make that fair enough. A transaction that
    runs Python while it holds the lock is another matter: waiters that poll
    take CPU from the holder, and who wins is chance, so some wait many
    turns. Such a transaction takes a ticket here first and waits, asleep in
    the kernel, for the one before it to finish: one wake-up per turn, in
    the order of arrival.

    Built on open-file-description locks (F_OFD_SETLK*) on one file beside
    the database, `path + QUEUE_SUFFIX`: a slot is one locked byte, owned by
    one connection (so threads queue like processes) and released by the
    kernel when its process dies. The wait for the one before is bounded by
    the caller's deadline; past it, the caller goes on to SQLite's lock
    itself. The queue only orders: SQLite's lock still excludes. Where the
    file cannot be opened or OFD locks are missing, the queue is off (enter
    returns False) and the sliced wait alone remains.
    """

    def __init__(self, path: str) -> None:
        self.path = path + QUEUE_SUFFIX
        self.fd: int | None = None
        self.slot: int | None = None
        self.off = fcntl is None or not hasattr(fcntl, "F_OFD_SETLKW")
        # Waits for the helper thread, started at the first wait; None stops it.
        self.waits: queue.SimpleQueue[_LockWait | None] | None = None

    def enter(self, deadline: float) -> bool:
        """Take a ticket and wait, until `deadline` at most, for the one before; True if queued."""
        if self.opened() is None:
            return False
        try:
            ticket = self._take_ticket()
        except OSError as exc:
            log.warning("write queue %s is off: %s", self.path, exc)
            self.off = True
            return False
        if ticket is None:
            return False  # the ring wrapped onto a slot still held
        if ticket > 0:
            self.wait_unlocked(_QUEUE_FIRST_SLOT + (ticket - 1) % QUEUE_SLOTS, deadline)
        return True

    def opened(self) -> int | None:
        """The queue file's descriptor, opened at the first call; None if the queue is off."""
        if self.fd is None and not self.off:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                log.warning("write queue %s is off: %s", self.path, exc)
                self.off = True
        return self.fd

    def leave(self) -> None:
        """Let the next ticket go (after COMMIT or ROLLBACK)."""
        if self.slot is not None and self.fd is not None:
            _ofd_lock(self.fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, self.slot)
        self.slot = None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases its slot too
        if self.waits is not None:
            self.waits.put(None)
        self.fd, self.slot, self.waits = None, None, None

    def __del__(self) -> None:
        # E.g. the queue of a Django connection whose thread has ended; at
        # interpreter exit the modules close() needs may already be gone.
        with contextlib.suppress(Exception):
            self.close()

    def _take_ticket(self) -> int | None:
        fd = self.fd
        with _ofd_locked(fd, 0, _QUEUE_TICKET.size):
            raw = os.pread(fd, _QUEUE_TICKET.size, 0)
            ticket = _QUEUE_TICKET.unpack(raw)[0] if len(raw) == _QUEUE_TICKET.size else 0
            slot = _QUEUE_FIRST_SLOT + ticket % QUEUE_SLOTS
            try:
                _ofd_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, slot)
            except BlockingIOError:
                return None
            os.pwrite(fd, _QUEUE_TICKET.pack(ticket + 1), 0)
        self.slot = slot
        return ticket

    def wait_unlocked(self, slot: int, deadline: float) -> None:
        """Until the holder of the lock on byte `slot` lets go (or dies), or `deadline`."""
        try:
            _ofd_lock(self.fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, slot)
        except BlockingIOError:
            self._wait(_LockWait(os.dup(self.fd), slot, take=False), deadline)
        else:
            _ofd_lock(self.fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, slot)

    def lock(self, byte: int, deadline: float) -> bool:
        """Take the write lock on `byte` (this connection's until unlock()); False at `deadline`."""
        if self.try_lock(byte):
            return True
        return self._wait(_LockWait(os.dup(self.fd), byte, take=True), deadline)

    def try_lock(self, byte: int) -> bool:
        """Take the write lock on `byte` if no one holds any lock on it."""
        try:
            _ofd_lock(self.fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, byte)
        except BlockingIOError:
            return False
        return True

    def unlock(self, byte: int) -> None:
        _ofd_lock(self.fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, byte)

    def _wait(self, wait: _LockWait, deadline: float) -> bool:
        """Hand `wait` to this connection's helper thread; whether it ended by `deadline`.

        A lock wait cannot time out, so the helper waits (on a duplicate of
        the descriptor: the same owner, and safe from the descriptor's
        reuse) while the caller waits with a timeout. A wait past the
        deadline is left to its helper, which exits once it ends (letting go
        of a lock it was to take); the next wait gets a new helper, not a
        place behind it.
        """
        if self.waits is None:
            self.waits = queue.SimpleQueue()
            threading.Thread(
                target=_wait_in_line, args=(self.waits,), name="lite write queue", daemon=True
            ).start()
        self.waits.put(wait)
        if wait.ended(max(0.0, deadline - time.monotonic())):
            return True
        self.waits.put(None)
        self.waits = None
        return False


class _LockWait:
    """One wait of a WriteQueue's helper thread: for a lock byte to be free, or to take it."""

    def __init__(self, fd: int, byte: int, take: bool) -> None:
        self.fd, self.byte, self.take = fd, byte, take
        self.done = threading.Lock()  # released by the helper: cheaper than an Event
        self.done.acquire()
        self.handover = threading.Lock()  # a lock taken goes to the caller, or is let go
        self.taken = self.abandoned = False

    def ended(self, timeout: float) -> bool:
        """Whether the wait ended within `timeout` seconds (a lock to take is then the caller's)."""
        if self.done.acquire(timeout=timeout):
            return True
        with self.handover:
            self.abandoned = not self.taken
            return self.taken

    def run(self) -> None:
        try:
            kind = fcntl.F_WRLCK if self.take else fcntl.F_RDLCK
            _ofd_lock(self.fd, fcntl.F_OFD_SETLKW, kind, self.byte)
            with self.handover:
                self.taken = self.take and not self.abandoned
            if not self.taken:
                _ofd_lock(self.fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, self.byte)
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.done.release()


def _wait_in_line(waits: queue.SimpleQueue[_LockWait | None]) -> None:
    """A WriteQueue's helper thread: each wait asked for, one after another, until None."""
    while (wait := waits.get()) is not None:
        wait.run()


def _ofd_lock(fd: int, command: int, lock_type: int, start: int, length: int = 1) -> None:
    fcntl.fcntl(fd, command, _FLOCK.pack(lock_type, os.SEEK_SET, start, length, 0))


def _sleep_until_free(fd: int, byte: int) -> bool:
    """Asleep until group commit's flush lock `byte` is let go (or its holder dies).

    True if the last flush under that lock succeeded: read while the lock is
    held for reading, so no other flush under it can begin meanwhile.
    """
    _ofd_lock(fd, fcntl.F_OFD_SETLKW, fcntl.F_RDLCK, byte)
    try:
        return os.pread(fd, 1, _GROUP_SUCCEEDED[byte]) == b"\1"
    finally:
        _ofd_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, byte)


@contextlib.contextmanager
def _ofd_locked(fd: int, start: int, length: int) -> Iterator[None]:
    """The write lock on `length` bytes from `start`, waited for, held for a few system calls."""
    _ofd_lock(fd, fcntl.F_OFD_SETLKW, fcntl.F_WRLCK, start, length)
    try:
        yield
    finally:
        _ofd_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, start, length)


# ---- Group commit -----------------------------------------------------------


class GroupCommit:
    """A commit acknowledged only once on disk, one flush serving every commit before it.

    With LITE_SYNCHRONOUS=GROUP, SQLite commits under synchronous=NORMAL:
    nothing is flushed while the write lock is held. After its COMMIT, a
    writer calls `wait(deadline)`, which returns once a flush of the -wal
    that began after that COMMIT returned has finished. The processes and
    threads of a database share the count through the write queue's file
    (a connection's own descriptor and OFD locks, as the queue's):

    - if someone is named to lead the next flush (one byte, read without
      any lock), that flush has not begun: it will cover this commit. The
      writer sleeps until the named one lets go of its flush lock and
      reads, while holding that lock for reading, whether its flush
      succeeded (a byte per flush lock, cleared when one is named, set
      when its flush succeeds); if so, it is done;
    - otherwise it takes the next number, under a short lock on the shared
      numbers, and if no flush is under way, leads one: it takes a flush
      lock, records the highest number taken as the flush's, fdatasyncs
      the -wal, then records that number as flushed and lets go;
    - if one is under way and no one is named, it is named: it takes the
      other flush lock, sleeps until the flush under way ends, then leads
      the next flush, for every number taken by then.

    So one flush runs at a time, nearly every writer sleeps once and takes
    no short lock, and the commits that return during a flush share the
    next. After a sleep that did not end in a success it knows of, the
    writer looks again under the short lock: its number flushed, it is
    done; a flush lock found free while its holder is recorded (flushing
    or named) means that one died, and the looker takes its place.

    The sleep is in the kernel, in the writer's own thread (a helper
    thread's hand-over costs more than the flush it waits for): it ends
    when the flusher's fdatasync returns or its process dies, so a disk
    that stops answering holds the writes waiting for its flush, as it
    holds the writer running it; reads go on.

    Why a flush of the -wal is enough, checkpoints and WAL resets included:
    docs/how-it-works.md. Raises OutcomeUnknown (counted) when the flush
    fails, or when the deadline has passed and it is not flushed: the
    commit is in the database but not known to be on disk. A flush that
    fails also refuses the database's writes in every process, as a
    replaced file does: after a failed writeback the kernel may have
    dropped pages the -wal needs. Where the queue is off (no OFD locks),
    each commit flushes alone.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.path = _file_of(conn.path)
        self.wal_fd: int | None = None  # the -wal, held from the first flush
        self.lock: int | None = None  # the flush lock this connection holds
        self.covers = 0  # the highest number its flush covers

    def wait(self, deadline: float) -> None:
        """Return once this connection's last commit is on disk; raise OutcomeUnknown if not."""
        fd = self.conn.queue.opened()
        try:
            if fd is None:
                self._flush()
                return
            # First a look without the short lock: if someone is named to
            # lead the next flush, it has not begun, so it will begin after
            # this commit. Sleep until its flush ends; done if it succeeded.
            named = os.pread(fd, 1, _GROUP_NAMED_AT)
            slept_on = None
            if named not in (b"", b"\0"):
                slept_on = _GROUP_FLUSH_LOCKS[named[0] - 1]
                if _sleep_until_free(fd, slept_on):
                    return
            with _ofd_locked(fd, *_GROUP_NUMBERS):
                state = self._read(fd)
                number = state[0] + 1
                os.pwrite(fd, _GROUP_NUMBER.pack(number), _GROUP_TAKEN_AT)
                step, covering = self._next_step(fd, state, deadline, slept_on)
            while step not in ("lead", "named"):
                if _sleep_until_free(fd, step) and covering:
                    return  # the named one's flush, begun after this commit, succeeded
                with _ofd_locked(fd, *_GROUP_NUMBERS):
                    state = self._read(fd)
                    if state[1] >= number:
                        return
                    if time.monotonic() >= deadline:
                        raise TimeoutError("no flush of the WAL finished in time")
                    step, covering = self._next_step(fd, state, deadline, slept_on=step)
            if step == "named":
                # Asleep until the flush under way (holding the other lock) ends.
                _sleep_until_free(fd, _GROUP_FLUSH_LOCKS[1 - _GROUP_FLUSH_LOCKS.index(self.lock)])
                with _ofd_locked(fd, *_GROUP_NUMBERS):
                    self._begin(fd)
            self._run_flush(fd)
        except OSError as exc:
            count(self.conn.figures, "write_failures")
            log.error("commit to %s not known to be on disk: %s", self.path, exc)
            raise OutcomeUnknown(f"commit not known to be on disk: {exc}") from exc
        finally:
            if self.lock is not None:  # interrupted while named or flushing
                self.conn.queue.unlock(self.lock)
                self.lock = None

    def _next_step(
        self, fd: int, state: tuple[int, ...], deadline: float, slept_on: int | None = None
    ) -> tuple[int | str, bool]:
        """What a writer not yet flushed does next (under the short lock), and whether
        the flush it then waits for will cover its commit.

        "lead": it holds a flush lock and has begun a flush, to run now;
        "named": it holds the other flush lock, named to lead the flush
        after the one under way; a lock byte: sleep until its holder lets
        go, then look again (covering: it is the named one's, whose flush
        will begin after this writer's commit).
        """
        _, _, flushing, named, current = state
        queue_ = self.conn.queue
        under_way, other = _GROUP_FLUSH_LOCKS[current], _GROUP_FLUSH_LOCKS[1 - current]
        if named:
            named_lock = _GROUP_FLUSH_LOCKS[named - 1]
            # Found free after a sleep on it: the one named died; take its place.
            if slept_on == named_lock and queue_.try_lock(named_lock):
                return self._named(fd, named_lock), False
            return named_lock, True
        if flushing:
            if queue_.try_lock(under_way):  # free: its flusher died
                self.lock = under_way
                self._begin(fd)
                return "lead", False
            if queue_.try_lock(other):
                return self._named(fd, other), False
            return under_way, False  # the other is held for a moment by a sleeper
        if queue_.try_lock(other):
            self.lock = other
        elif queue_.lock(under_way, deadline):  # sleepers on both, for a moment
            self.lock = under_way
        else:
            raise TimeoutError("no flush lock was free in time")
        self._begin(fd)
        return "lead", False

    def _named(self, fd: int, lock: int) -> str:
        """Be named to lead the next flush, holding `lock` (under the short lock)."""
        self.lock = lock
        os.pwrite(fd, b"\0", _GROUP_SUCCEEDED[lock])  # not yet: a flush to come
        os.pwrite(fd, bytes([_GROUP_FLUSH_LOCKS.index(lock) + 1]), _GROUP_NAMED_AT)
        return "named"

    def _begin(self, fd: int) -> None:
        """Record a flush under way of every number taken, under self.lock (short lock held)."""
        self.covers = self._read(fd)[0]
        current = _GROUP_FLUSH_LOCKS.index(self.lock)
        os.pwrite(fd, _GROUP_BEGUN.pack(self.covers, 0, current), _GROUP_FLUSHING_AT)
        os.pwrite(fd, b"\0", _GROUP_SUCCEEDED[self.lock])

    def _run_flush(self, fd: int) -> None:
        """Run the flush begun; record it flushed (if it failed: not under way); let go."""
        try:
            self._flush()
        except BaseException:
            self._end_flush(fd, flushed=0)
            raise
        self._end_flush(fd, flushed=self.covers)

    def _end_flush(self, fd: int, flushed: int) -> None:
        with _ofd_locked(fd, *_GROUP_NUMBERS):
            if flushed:
                os.pwrite(fd, b"\1", _GROUP_SUCCEEDED[self.lock])
            flushed = max(self._read(fd)[1], flushed)
            os.pwrite(fd, _GROUP_ENDED.pack(flushed, 0), _GROUP_FLUSHED_AT)
            self.conn.queue.unlock(self.lock)
            self.lock = None

    def _read(self, fd: int) -> tuple[int, ...]:
        """(taken, flushed, flushing or 0, the named one's flush lock 1/2 or 0, current 0/1)."""
        raw = os.pread(fd, _GROUP_STATE.size, _GROUP_TAKEN_AT)
        return _GROUP_STATE.unpack(raw) if len(raw) == _GROUP_STATE.size else (0, 0, 0, 0, 0)

    def _flush(self) -> None:
        """fdatasync the -wal; raises OSError, after refusing the database's writes.

        Through a descriptor held from the first flush: a failed writeback
        is reported to every descriptor open before it, even once another
        process has seen it, but not to one opened after that. If its file
        has been unlinked since (the last connection closed, deleting it,
        and a new one made another), the file the name holds now is flushed
        too, and held from then on. No -wal at all: the last connection
        checkpointed every commit into the database as it closed; the
        database file is flushed.
        """
        try:
            if self.wal_fd is not None:
                os.fdatasync(self.wal_fd)
                if os.fstat(self.wal_fd).st_nlink > 0:
                    count(self.conn.figures, "flushes")
                    return
                os.close(self.wal_fd)
                self.wal_fd = None
            try:
                self.wal_fd = os.open(self.path + "-wal", os.O_RDONLY | os.O_CLOEXEC)
                os.fdatasync(self.wal_fd)
            except FileNotFoundError:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            _refuse(self.conn, f"a flush of the WAL failed: {exc}", wrote_since=True)
            raise
        count(self.conn.figures, "flushes")

    def close(self) -> None:
        if self.wal_fd is not None:
            os.close(self.wal_fd)
            self.wal_fd = None


# ---- Internals: opening, reads, checkpoints, failures, columns --------------


def _synchronous() -> str:
    mode = os.environ.get("LITE_SYNCHRONOUS", PRAGMAS["synchronous"]).upper()
    if mode not in SYNCHRONOUS_MODES:
        raise ValueError(f"LITE_SYNCHRONOUS must be one of {SYNCHRONOUS_MODES}")
    return mode


def _check_sqlite_version() -> None:
    if sqlite3.sqlite_version_info < SQLITE_NEEDED:
        needed = ".".join(map(str, SQLITE_NEEDED))
        raise RuntimeError(
            f"SQLite {sqlite3.sqlite_version} is too old: lite needs {needed} or newer "
            "(RETURNING came in 3.35, STRICT tables in 3.37)"
        )


def _file_of(database: str) -> str:
    """The file a sqlite3.connect() argument names: a path, or a file: URI's path."""
    if database.startswith("file:"):
        return urllib.parse.unquote(database[len("file:") :].split("?", 1)[0])
    return database


def _open(path: str, create: bool) -> Connection:
    _check_sqlite_version()
    conn = sqlite3.connect(
        path if create else f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=rw",
        uri=not create,
        factory=Connection,
        isolation_level=None,
        timeout=BUSY_POLL_MS / 1000,
        # Each connection is used by its own thread only; the process closes
        # it from another thread once that one has ended.
        check_same_thread=False,
    )
    conn.path = path  # as the caller named it, not the URI it was opened by
    try:
        conn.row_factory = sqlite3.Row
        # Checkpoints are run by _checkpoint_now_and_then, not after every
        # commit once the WAL passes 1000 pages: while readers keep a
        # checkpoint from finishing, SQLite would retry it (and fsync) on
        # every commit.
        apply_pragmas(conn, conn.figures, wal_autocheckpoint=0, group_commit=True)
        if _synchronous() == "GROUP":
            conn.group_commit = GroupCommit(conn)
        # A first read: SQLite opens the -wal and -shm files now, so that
        # the files this connection holds can be looked at.
        conn.execute("PRAGMA schema_version").fetchone()
        held = _held_files(path)
        conn.files = {name: identity for name, (identity, _) in held.items()}
        conn.watch.watch("files", watched_paths(_file_of(path)))
        conn.split = _split_from_others(path, held)
    except BaseException:
        conn.close()
        raise
    conn.read_only = not os.access(path, os.W_OK)
    return conn


def _is_busy(exc: Exception) -> bool:
    # The primary code is the low byte of the extended one:
    # SQLITE_BUSY_SNAPSHOT (517) is SQLITE_BUSY (5), SQLITE_LOCKED_SHAREDCACHE (262)
    # is SQLITE_LOCKED (6).
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _primary_code(exc: sqlite3.Error) -> int:
    return (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF


def _read(cur: sqlite3.Cursor, fetch: Callable[[], Any], what: str) -> Any:
    """What `fetch()` returns, with retries; raises as _write does."""
    conn = cur.connection
    conn.figures.reads += 1
    if listeners:
        notify("reads", 1)
    try:
        return retrying(conn, fetch, conn.figures)
    except sqlite3.Error as exc:
        failure = _failed(conn, "read", what, exc)
        if failure is exc:
            raise
        raise failure from exc


def _checkpoint_now_and_then(conn: Connection) -> None:
    """A checkpoint, at most once per CHECKPOINT_INTERVAL_S per connection.

    Passive first: it copies what no reader still needs from the WAL into
    the database and never waits. While readers follow one another without
    a pause, some reader always needs the newest frames and the -wal file
    grows without bound (tests/test_operations.py measures it). So when the
    WAL holds more than JOURNAL_SIZE_LIMIT_BYTES, a RESTART checkpoint
    follows: it waits at most CHECKPOINT_WAIT_MS for the readers of old
    frames and makes the next writer start the WAL over; journal_size_limit
    then truncates the file. A failure loses nothing (the WAL keeps every
    commit) and is only logged.
    """
    now = time.monotonic()
    if now - conn.last_checkpoint < CHECKPOINT_INTERVAL_S:
        return
    conn.last_checkpoint = now
    try:
        _, wal_frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        count(conn.figures, "checkpoints")
        conn.figures.last_checkpoint_at = time.time()
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        if wal_frames * (page_size + WAL_FRAME_HEADER_BYTES) > JOURNAL_SIZE_LIMIT_BYTES:
            conn.execute(f"PRAGMA busy_timeout = {CHECKPOINT_WAIT_MS}")
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            finally:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_POLL_MS}")
            if not busy:
                count(conn.figures, "wal_restarts")
    except sqlite3.Error as exc:
        log.warning("checkpoint of %s failed: %s", conn.path, exc)


def _failed(conn: Connection, kind: str, what: str, exc: sqlite3.Error) -> Exception:
    """Log and count a failure of SQLite's; the exception to raise for it."""
    code = _primary_code(exc)
    if code == sqlite3.SQLITE_READONLY:
        conn.reopen = True
    reason = f"{kind} failed: {exc}" if code in UNREACHABLE_CODES else None
    return failed(conn.figures, kind, what, exc, reason, _advice(code, conn.path))


def _advice(code: int, path: str) -> str:
    """What to do about an error that a person has to fix, for the log line."""
    directory = os.path.dirname(os.path.abspath(path))
    if code == sqlite3.SQLITE_FULL:
        return f"; the disk holding {directory} is full: free space"
    if code == sqlite3.SQLITE_CANTOPEN and not os.path.isdir(directory):
        return f"; the directory {directory} does not exist: create it (resetapp.sh does)"
    missing = code == sqlite3.SQLITE_CANTOPEN and not os.path.exists(path)
    if missing and os.access(directory, os.W_OK):
        return (
            f"; the database {path} does not exist, and a running server does not create"
            " one: restore it (./serve.sh restore FILE) or create it (resetapp.sh)"
        )
    if code not in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return ""
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


def _size(name: str) -> int:
    try:
        return os.path.getsize(name)
    except OSError:
        return 0


def _columns(cur: sqlite3.Cursor, table: str) -> tuple[str, ...]:
    """Columns of `table` in the live schema, primary key first (cached per connection).

    Raises ValueError for a name that is not a table of this database.
    """
    if not isinstance(table, str) or not _NAME.match(table):
        raise ValueError(f"not a table name: {table!r}")
    cache = cur.connection.columns
    if table not in cache:
        rows = cur.execute(f'PRAGMA table_info("{table}")').fetchall()
        if not rows:
            raise ValueError(f"no such table: {table!r}")
        rows.sort(key=lambda row: (row["pk"] == 0, row["pk"], row["cid"]))
        cache[table] = tuple(row["name"] for row in rows)
    return cache[table]


def _check_columns(cur: sqlite3.Cursor, table: str, names: Iterable[str]) -> tuple[str, ...]:
    columns = _columns(cur, table)
    for name in names:
        if name not in columns:
            raise ValueError(f"no such column: {table}.{name!r}")
    return columns
