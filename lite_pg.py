"""lite on PostgreSQL: lite_db's helpers, for LITE_DATABASE_URL=postgresql://…

The same contract as lite_db, on an engine several machines can share:
- A connection per process and thread, opened lazily, opened anew after a
  fork and after the server restarted (a connection found broken is
  replaced before the next statement).
- `cursor(url)` gives a Cursor whose statements use lite_db's `?`
  placeholders and whose rows answer by index and by column name, as
  sqlite3.Row does; close it when done. lite_db's write, query,
  ensure_tables and table_columns, given one, run here: lite_counters,
  lite_config and lite_ops work on either engine. lite's CREATE statements
  are SQLite's, translated (`postgres_ddl`).
- `write(cur, work, one_statement)` runs `work(cur)` in one transaction and
  returns its result. A transaction is SERIALIZABLE; a one-statement write
  is its own READ COMMITTED transaction, one round trip (one UPDATE … SET
  value = value + 1 is atomic there). PostgreSQL's transient failures —
  serialization failure, deadlock, a connection lost before COMMIT was
  sent — are retried, with jittered sleeps, within lite_db.LOCK_BUDGET_MS
  in all, so `work` may run more than once and must have no effects
  outside the database. Past the budget (a lock held, the server
  unreachable): Unavailable (lite_db's), nothing written. A connection lost
  after COMMIT was sent (for a one-statement write: after the statement
  was) leaves the outcome unknown: lite_db.OutcomeUnknown, never retried,
  never Unavailable.
- `query(cur, sql, params)`: all rows, one statement in one round trip,
  within the budget, retried the same (a lost connection too: a read
  changes nothing).
- Every failure is logged and counted; lite_db.listeners get the events.
"""

import logging
import os
import random
import re
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import psycopg
import psycopg.errors

import lite_db

RETRY_SLEEP_MAX_S = 0.005  # 5 ms: upper bound of one jittered sleep between retries
CONNECT_TIMEOUT_S = 2  # the least connect_timeout libpq takes is 2 s
RECONNECT_PAUSE_S = 0.1  # 100 ms between two attempts to reach a server that refused
# Transient: the transaction was rolled back and may simply run again.
RETRIED = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)
# The budget ran out inside the server: a lock or a statement that waited too long.
TIMED_OUT = (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled)
_IN_TRANSACTION = (psycopg.pq.TransactionStatus.INTRANS, psycopg.pq.TransactionStatus.INERROR)

log = logging.getLogger(__name__)


OutcomeUnknown = lite_db.OutcomeUnknown


class Row(tuple):
    """A row that answers by index and by column name, as sqlite3.Row does."""

    names: ClassVar[dict[str, int]] = {}  # set on the subclass made for each result

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self.names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self.names)


def _row_factory(cursor: psycopg.Cursor) -> Callable[[Sequence[Any]], Row]:
    names = {column.name: index for index, column in enumerate(cursor.description or ())}
    row_class = type("Row", (Row,), {"names": names})
    return row_class


class Connection(psycopg.Connection):
    """A connection that knows whose it is: its URL and process; what it has checked."""

    url: str
    pid: int
    tables_ready: set[str]
    last_prune: float  # time.monotonic() of its last pruning of expired keys (lite_counters)
    timeout_ms: int  # the session's lock_timeout and statement_timeout, as last set


class Cursor:
    """A statement runner on this thread's connection, with lite_db's `?` placeholders.

    Its connection is replaced (and the statement fails) when found broken;
    write and query run their work again on the new one. lite_db's write,
    query, ensure_tables and table_columns, given this cursor, call its own.
    """

    engine = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection = connect(url)
        self._cursor = self.connection.cursor(row_factory=_row_factory)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> "Cursor":
        if params:
            self._cursor.execute(_placeholders(sql), params)
        else:
            self._cursor.execute(sql)
        return self

    def executemany(self, sql: str, params_seq: Sequence[Sequence[Any]]) -> "Cursor":
        self._cursor.executemany(_placeholders(sql), params_seq)
        return self

    def fetchone(self) -> Row | None:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Row]:
        return self._cursor.fetchall()

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    def reconnect(self) -> None:
        """Take a new connection, the old one being broken."""
        self.close()
        _registry.forget(self.connection)
        self.connection = connect(self.url)
        self._cursor = self.connection.cursor(row_factory=_row_factory)

    def close(self) -> None:
        if not self._cursor.closed and not self.connection.broken:
            self._cursor.close()

    def write(self, work: Callable[["Cursor"], Any], one_statement: bool = False) -> Any:
        return write(self, work, one_statement)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return query(self, sql, params)

    def ensure_tables(self, feature: str, version: int, tables: Sequence[str]) -> None:
        ensure_tables(self, feature, version, tables)

    def table_columns(self, table: str) -> list[str]:
        rows = query(
            self,
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position",
            (table,),
        )
        return [row[0] for row in rows]

    def database_figures(self) -> dict[str, Any]:
        (row,) = query(
            self,
            "SELECT current_setting('server_version') AS server_version,"
            " pg_database_size(current_database()) AS db_bytes",
        )
        return {
            "engine": self.engine,
            "server_version": row["server_version"],
            "isolation": "serializable (transactions), read committed (one statement)",
            "lock_budget_ms": lite_db.LOCK_BUDGET_MS,
            "db_bytes": row["db_bytes"],
        }


def _placeholders(sql: str) -> str:
    """lite_db's `?` placeholders as psycopg's `%s` (a literal % doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


def postgres_ddl(statement: str) -> str:
    """A CREATE statement written for SQLite (lite's tables), as PostgreSQL takes it.

    INTEGER is 64-bit in SQLite: BIGINT; an INTEGER PRIMARY KEY numbers
    itself: an identity column; REAL: DOUBLE PRECISION; STRICT goes (every
    PostgreSQL table is).
    """
    statement = re.sub(r"\bINTEGER\b", "BIGINT", statement)
    statement = statement.replace(
        "BIGINT PRIMARY KEY", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
    )
    statement = re.sub(r"\bREAL\b", "DOUBLE PRECISION", statement)
    statement = re.sub(r"\bBLOB\b", "BYTEA", statement)
    return re.sub(r"\)\s*STRICT\s*$", ")", statement)


class _Registry:
    """This process's connections, one per URL and thread."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.connections: dict[tuple[str, int], Connection] = {}
        self.lock = threading.Lock()

    def forget(self, conn: Connection) -> None:
        with self.lock:
            for key, held in list(self.connections.items()):
                if held is conn:
                    del self.connections[key]
        if not conn.closed:
            conn.close()


_registry = _Registry()


def _open(url: str) -> Connection:
    """A new connection in autocommit mode (lite sends BEGIN itself); Unavailable if none."""
    try:
        conn = Connection.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.OperationalError as exc:
        log.warning("cannot connect to PostgreSQL: %s", str(exc).strip().splitlines()[0])
        raise lite_db.Unavailable("cannot connect") from None
    conn.url, conn.pid, conn.tables_ready, conn.last_prune = url, os.getpid(), set(), 0.0
    conn.timeout_ms = 0  # PostgreSQL's default: none
    return conn


def connect(url: str) -> Connection:
    """This process's and thread's connection to `url`, opened if needed.

    After a fork the parent's connections are dropped (never closed: closing
    would end the parent's session); a broken one is replaced; those of
    threads that have ended are closed (a server with a thread per request
    would otherwise keep a session per request). Raises Unavailable
    when the server cannot be reached.
    """
    registry = _registry
    if registry.pid != os.getpid():
        registry.__init__()  # a forked child: start over
    if len(registry.connections) > threading.active_count():  # some threads have ended
        running = {thread.ident for thread in threading.enumerate()}
        for (_, ident), held in list(registry.connections.items()):
            if ident not in running:
                registry.forget(held)
    key = (url, threading.get_ident())
    conn = registry.connections.get(key)
    if conn is not None and not conn.broken and not conn.closed:
        return conn
    if conn is not None:
        registry.forget(conn)
    conn = _open(url)
    with registry.lock:
        registry.connections[key] = conn
    return conn


def cursor(url: str) -> Cursor:
    """A new Cursor on this thread's connection to `url`; raises Unavailable."""
    return Cursor(url)


def close_all() -> None:
    """Close every connection of this process."""
    registry = _registry
    if registry.pid != os.getpid():
        registry.__init__()
        return
    for conn in list(registry.connections.values()):
        registry.forget(conn)


def _sleep_before_retry(deadline: float) -> None:
    time.sleep(min(random.uniform(0, RETRY_SLEEP_MAX_S), max(0.0, deadline - time.monotonic())))


def _ended_by_server(conn: Connection) -> bool:
    """True if the server ended this idle session (a restart, a terminated backend).

    An idle session has nothing to read, unless the server sent its last
    word (FATAL) and closed: seen without a round trip, so that a write is
    never sent on a session already gone, where its outcome would look
    unknown.
    """
    try:
        return bool(select.select([conn.fileno()], [], [], 0)[0])
    except (OSError, ValueError, psycopg.Error):
        return True


def _set_timeouts(cur: Cursor, milliseconds: int) -> None:
    """The session's lock and statement timeouts, sent only when they change."""
    if cur.connection.timeout_ms != milliseconds:
        cur.execute(f"SET lock_timeout = {milliseconds}; SET statement_timeout = {milliseconds}")
        cur.connection.timeout_ms = milliseconds


def _run(
    cur: Cursor, attempt: Callable[[], Any], kind: str, what: str, isolation: str | None
) -> tuple[Any, float]:
    """attempt() retried within the budget; (result, seconds until it could start).

    `isolation`: attempt() runs in one transaction of that level; None: it
    runs one statement, its own transaction (one round trip), for which a
    lost connection means the outcome is unknown — unless kind is "read".
    Raises Unavailable, OutcomeUnknown or the database error, logged and counted.
    """
    asked = time.monotonic()
    budget_ms = lite_db.LOCK_BUDGET_MS
    deadline = asked + budget_ms / 1000
    while True:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        committing = False
        try:
            if remaining_ms <= 0:
                raise lite_db.Unavailable("lock budget spent")
            if cur.connection.broken or cur.connection.closed or _ended_by_server(cur.connection):
                cur.reconnect()
            began = time.monotonic() - asked
            if isolation is None:
                # The budget's rest bounds waits inside the server too; the
                # first attempt's is the whole budget, as the session has it.
                _set_timeouts(cur, budget_ms if remaining_ms > budget_ms - 50 else remaining_ms)
                committing = kind == "write"
                return attempt(), began
            cur.execute(
                f"BEGIN ISOLATION LEVEL {isolation}; SET LOCAL lock_timeout = {remaining_ms};"
                f" SET LOCAL statement_timeout = {remaining_ms}"
            )
            result = attempt()
            committing = True
            cur.execute("COMMIT")
            return result, began
        except RETRIED:
            _rollback(cur)
            lite_db.notify("busy_retries")
            _sleep_before_retry(deadline)
        except TIMED_OUT as exc:
            _rollback(cur)
            raise _failed(kind, what, exc, "database busy") from exc
        except lite_db.Unavailable as exc:
            if time.monotonic() + RECONNECT_PAUSE_S < deadline and exc.reason == "cannot connect":
                time.sleep(RECONNECT_PAUSE_S)  # a server restarting: try again within the budget
                continue
            raise _failed(kind, what, exc, exc.reason) from None
        except psycopg.OperationalError as exc:
            if not cur.connection.broken:
                _rollback(cur)
                raise _failed(kind, what, exc, None) from exc
            if committing:
                lite_db.notify(f"{kind}_failures")
                log.error("%s %s: connection lost while committing: outcome unknown", kind, what)
                raise OutcomeUnknown(what) from exc
            lite_db.notify("busy_retries")
            _sleep_before_retry(deadline)
        except psycopg.Error as exc:
            _rollback(cur)
            raise _failed(kind, what, exc, None) from exc


def _rollback(cur: Cursor) -> None:
    """End the failed attempt's transaction, if one is open (a lone statement opens none)."""
    conn = cur.connection
    if conn.broken or conn.closed or conn.info.transaction_status not in _IN_TRANSACTION:
        return
    try:
        cur.execute("ROLLBACK")
    except psycopg.Error:
        conn.close()


def _failed(kind: str, what: str, exc: Exception, reason: str | None) -> Exception:
    """Log and count a failure; Unavailable for `reason`, else exc itself."""
    lite_db.notify(f"{kind}_failures")
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    log.error("%s failed (%s): %s", kind, what, text)
    return lite_db.Unavailable(reason) if reason is not None else exc


def write(cur: Cursor, work: Callable[[Cursor], Any], one_statement: bool = False) -> Any:
    """Run `work(cur)` in one transaction; its result (see the module's contract)."""
    lite_db.notify("writes")
    isolation = None if one_statement else "SERIALIZABLE"
    asked = time.monotonic()
    waited = None  # until it could start; on failure, all the time it tried
    try:
        result, waited = _run(
            cur, lambda: work(cur), "write", getattr(work, "__name__", "write"), isolation
        )
    finally:
        lite_db.notify("write_lock_wait_s", time.monotonic() - asked if waited is None else waited)
    return result


def query(cur: Cursor, sql: str, params: Sequence[Any] = ()) -> list[Row]:
    """All rows of a read-only query, one statement; raises as write does."""
    if not isinstance(sql, str):
        raise ValueError("sql must be a string")
    result, _ = _run(
        cur,
        lambda: cur.execute(sql, params).fetchall(),
        "read",
        "query",
        None,
    )
    return result


def ensure_tables(cur: Cursor, feature: str, version: int, tables: Sequence[str]) -> None:
    """Create the tables of `feature` if missing, and record its version (lite_db's contract).

    Concurrent first calls from many processes are serialized by an advisory
    lock held inside the creating transaction.
    """
    conn = cur.connection
    if feature in conn.tables_ready:
        return

    def create(cur: Cursor) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('lite_schema'))")
        cur.execute(
            "CREATE TABLE IF NOT EXISTS lite_schema (feature TEXT PRIMARY KEY,"
            " version INTEGER NOT NULL)"
        )
        row = cur.execute(
            "SELECT version FROM lite_schema WHERE feature = ?", (feature,)
        ).fetchone()
        if row is not None and row[0] >= version:
            return
        for statement in tables:
            cur.execute(postgres_ddl(statement))
        cur.execute(
            "INSERT INTO lite_schema (feature, version) VALUES (?, ?)"
            " ON CONFLICT (feature) DO UPDATE SET version = excluded.version",
            (feature, version),
        )

    create.__name__ = f"tables of {feature}"
    # READ COMMITTED: behind the advisory lock, a second process sees the first's tables.
    _run(cur, lambda: create(cur), "write", create.__name__, "READ COMMITTED")
    conn.tables_ready.add(feature)
