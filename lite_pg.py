"""lite on PostgreSQL: lite_db's engine interface, for LITE_DATABASE_URL=postgresql://…

The same contract as lite_db, on an engine several machines can share:
- A connection per process and thread, held in lite_db's registry, opened
  lazily, opened anew after a fork and after the server restarted (a
  connection found broken is replaced before the next statement).
- `cursor(url)` gives a Cursor whose statements use lite_db's `?`
  placeholders and whose rows answer by index and by column name, as
  sqlite3.Row does; close it when done. Its connection's engine is
  `PostgresEngine`: lite_db's write, query, ensure_tables and
  table_columns, given the cursor, run here, so lite_counters, lite_config
  and lite_ops work on either engine. lite's CREATE statements are
  SQLite's, translated (`postgres_ddl`).
- A write runs `work(cur)` in one transaction and returns its result. A
  transaction is SERIALIZABLE; a one-statement write is its own READ
  COMMITTED transaction, one round trip (one UPDATE … SET value = value + 1
  is atomic there). PostgreSQL's transient failures — serialization
  failure, deadlock, a connection lost before COMMIT was sent — are retried
  by lite_db.retrying within lite_db.LOCK_BUDGET_MS in all, so `work` may
  run more than once and must have no effects outside the database. Past
  the budget (a lock held, the server unreachable): Unavailable (lite_db's),
  nothing written. A connection lost after COMMIT was sent (for a
  one-statement write: after the statement was) leaves the outcome
  unknown: lite_db.OutcomeUnknown, never retried, never Unavailable.
- A query: all rows, one statement in one round trip, within the budget,
  retried the same (a lost connection too: a read changes nothing).
- Every failure is logged and counted (lite_db.failed); lite_db.listeners
  get the events.
"""

import logging
import os
import re
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import psycopg
import psycopg.errors

import lite_db

CONNECT_TIMEOUT_S = 2  # the least connect_timeout libpq takes is 2 s
NUMERIC_VALUE_OUT_OF_RANGE = "22003"  # SQLSTATE: e.g. a BIGINT past 2**63 - 1
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
    """A connection that knows whose it is, what it has done and checked (as lite_db's)."""

    engine: "PostgresEngine"
    url: str
    pid: int
    thread: threading.Thread
    figures: lite_db.Figures
    tables_ready: set[str]
    state: dict[str, Any]
    timeout_ms: int  # the session's lock_timeout and statement_timeout, as last set


class Cursor:
    """A statement runner on this thread's connection, with lite_db's `?` placeholders.

    Its connection is replaced (and the statement fails) when found broken;
    write and query run their work again on the new one.
    """

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
        lite_db.registry.discard(self.connection)
        self.connection = connect(self.url)
        self._cursor = self.connection.cursor(row_factory=_row_factory)

    def close(self) -> None:
        if not self._cursor.closed and not self.connection.broken:
            self._cursor.close()


class PostgresEngine(lite_db.Engine):
    """PostgreSQL through lite_pg: the engine of every lite_pg `Connection`."""

    vendor = "postgresql"
    features = lite_db.Features(local_files=False, shared_by_machines=True)

    def write(
        self, cur: Cursor, work: Callable[[Cursor], Any], what: str, one_statement: bool
    ) -> Any:
        lite_db.count(cur.connection.figures, "writes")
        asked = time.monotonic()
        waited = None  # until it could start; on failure, all the time it tried
        try:
            result, waited = _run(
                cur, lambda: work(cur), "write", what, None if one_statement else "SERIALIZABLE"
            )
        finally:
            lite_db.count(
                cur.connection.figures,
                "write_lock_wait_s",
                time.monotonic() - asked if waited is None else waited,
            )
        return result

    def query(self, cur: Cursor, sql: str, params: Sequence[Any]) -> list[Row]:
        result, _ = _run(cur, lambda: cur.execute(sql, params).fetchall(), "read", "query", None)
        return result

    def create_tables(self, cur: Cursor, feature: str, version: int, tables: Sequence[str]) -> None:
        """Concurrent first calls from many processes are serialized by an advisory
        lock held inside the creating transaction."""

        def create(cur: Cursor) -> None:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('lite_schema'))")
            for statement in lite_db.SCHEMA_TABLES:
                cur.execute(postgres_ddl(statement))
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

        # READ COMMITTED: behind the advisory lock, a second process sees the first's tables.
        _run(cur, lambda: create(cur), "write", f"tables of {feature}", "READ COMMITTED")

    def table_columns(self, cur: Cursor, table: str) -> list[str]:
        rows = self.query(
            cur,
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position",
            (table,),
        )
        return [row[0] for row in rows]

    def out_of_range(self, exc: Exception) -> bool:
        return getattr(exc, "sqlstate", None) == NUMERIC_VALUE_OUT_OF_RANGE

    def describe(self, cur: Cursor) -> dict[str, Any]:
        (row,) = self.query(
            cur,
            "SELECT current_setting('server_version') AS server_version,"
            " pg_database_size(current_database()) AS db_bytes",
            (),
        )
        return {
            "engine": self.vendor,
            "server_version": row["server_version"],
            "isolation": "serializable (transactions), read committed (one statement)",
            "lock_budget_ms": lite_db.LOCK_BUDGET_MS,
            "db_bytes": row["db_bytes"],
        }


POSTGRES = PostgresEngine()
Connection.engine = POSTGRES


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


def _open(url: str) -> Connection:
    """A new connection in autocommit mode (lite sends BEGIN itself); Unavailable if none."""
    try:
        conn = Connection.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.OperationalError as exc:
        log.warning("cannot connect to PostgreSQL: %s", str(exc).strip().splitlines()[0])
        raise lite_db.Unavailable("cannot connect") from None
    conn.url, conn.pid, conn.thread = url, os.getpid(), threading.current_thread()
    conn.figures, conn.tables_ready, conn.state = lite_db.Figures(), set(), {}
    conn.timeout_ms = 0  # PostgreSQL's default: none
    return conn


def connect(url: str) -> Connection:
    """This process's and thread's connection to `url`, opened if needed.

    Held in lite_db's registry, as SQLite's are: after a fork the parent's
    connections are kept referenced and never used or closed (closing would
    end the parent's session); those of threads that have ended are closed
    (a server with a thread per request would otherwise keep a session per
    request); a broken one is replaced. Raises Unavailable when the server
    cannot be reached.
    """
    conn = lite_db.registry.held(url)
    if conn is not None and not conn.broken and not conn.closed:
        return conn
    lite_db.registry.make_room(url)
    conn = _open(url)
    lite_db.registry.keep(url, conn)
    return conn


def cursor(url: str) -> Cursor:
    """A new Cursor on this thread's connection to `url`; raises Unavailable."""
    return Cursor(url)


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
    Retried through lite_db.retrying: a serialization failure or deadlock, a
    connection lost before COMMIT was sent; a server that refused is tried
    again every RECONNECT_PAUSE_S. An error of the work itself rolls its
    transaction back and is raised as it is. Raises Unavailable, OutcomeUnknown or the
    database error, logged and counted.
    """
    asked = time.monotonic()
    budget_ms = lite_db.LOCK_BUDGET_MS
    deadline = asked + budget_ms / 1000
    began = 0.0
    committing = False

    def once() -> Any:
        nonlocal began, committing
        committing = False
        while cur.connection.broken or cur.connection.closed or _ended_by_server(cur.connection):
            try:
                cur.reconnect()
            except lite_db.Unavailable:
                if time.monotonic() + RECONNECT_PAUSE_S >= deadline:
                    raise
                time.sleep(RECONNECT_PAUSE_S)  # a server restarting: try again within the budget
        began = time.monotonic() - asked
        remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            if isolation is None:
                # The budget's rest bounds waits inside the server too; the
                # first attempt's is the whole budget, as the session has it.
                _set_timeouts(cur, budget_ms if remaining_ms > budget_ms - 50 else remaining_ms)
                committing = kind == "write"
                return attempt()
            cur.execute(
                f"BEGIN ISOLATION LEVEL {isolation}; SET LOCAL lock_timeout = {remaining_ms};"
                f" SET LOCAL statement_timeout = {remaining_ms}"
            )
            result = attempt()
            committing = True
            cur.execute("COMMIT")
            return result
        except BaseException:  # the work's own errors too: nothing of it may stay open
            _rollback(cur)
            raise

    def lost(exc: Exception) -> bool:
        return isinstance(exc, psycopg.OperationalError) and cur.connection.broken

    def transient(exc: Exception) -> bool:
        return isinstance(exc, RETRIED) or (lost(exc) and not committing)

    try:
        return lite_db.retrying(None, once, cur.connection.figures, deadline, transient), began
    except TIMED_OUT as exc:
        raise _failed(cur, kind, what, exc, "database busy") from exc
    except lite_db.Unavailable as exc:
        raise _failed(cur, kind, what, exc, exc.reason) from None
    except psycopg.Error as exc:
        if lost(exc) and committing:
            lite_db.count(cur.connection.figures, f"{kind}_failures")
            log.error("%s %s: connection lost while committing: outcome unknown", kind, what)
            raise OutcomeUnknown(what) from exc
        if transient(exc):  # retried until the budget was spent
            raise _failed(cur, kind, what, exc, "lock budget spent") from exc
        raise _failed(cur, kind, what, exc, None) from exc


def _rollback(cur: Cursor) -> None:
    """End the failed attempt's transaction, if one is open (a lone statement opens none)."""
    conn = cur.connection
    if conn.broken or conn.closed or conn.info.transaction_status not in _IN_TRANSACTION:
        return
    try:
        cur.execute("ROLLBACK")
    except psycopg.Error:
        conn.close()


def _failed(cur: Cursor, kind: str, what: str, exc: Exception, reason: str | None) -> Exception:
    """Log and count a failure (lite_db.failed); Unavailable for `reason`, else exc itself."""
    return lite_db.failed(cur.connection.figures, kind, what, exc, reason)
