"""SQLAlchemy dialects with lite's guarantees: `sqlite+lite://` and, for asyncio, `sqlite+aiolite://`.

Changing `sqlite:///app.db` to `sqlite+lite:///app.db` (or
`sqlite+aiosqlite:///` to `sqlite+aiolite:///`) is the whole switch; both
are registered by entry point when lite is installed, and by importing this
module when it is copied beside an app. SQLAlchemy's SQLite dialect is unchanged
(`engine.dialect.name` is still "sqlite": SQL, reflection, Alembic and
`sqlalchemy.dialects.sqlite.insert` work as before); what differs is how
transactions begin and wait.

Contract:
- Every new DBAPI connection gets lite's settings (lite_db.apply_pragmas):
  WAL, synchronous NORMAL (FULL with LITE_SYNCHRONOUS=FULL, and with GROUP:
  group commit is lite_db's write path, not SQLAlchemy's), foreign keys,
  a journal size limit, wal_autocheckpoint 1000 pages; its busy timeout is
  lite_db.LOCK_BUDGET_MS. The driver's own transaction handling is off
  (isolation_level None): this dialect emits BEGIN itself.
- A transaction begins at its first statement, and that statement says
  which kind it is. A read (SELECT, VALUES, a PRAGMA without `=`) begins a
  deferred read transaction: it never takes or waits for the write lock,
  and WAL lets it run beside any writer. Anything else (INSERT, UPDATE,
  DELETE, DDL, SAVEPOINT…) begins `BEGIN IMMEDIATE`: the write lock is taken
  before anything is read, after a fair wait (lite_db.WriteQueue, first
  come first served across processes and threads) in slices
  (lite_db.retrying), bounded by LOCK_BUDGET_MS. The execution option
  `lite_write=True` (on an engine, connection or session) makes every
  transaction begin IMMEDIATE, reads first included: that is how a
  read-modify-write is made exact (docs/integrations.md); so does a first
  `SELECT … FOR UPDATE` (`with_for_update()`, a clause SQLite drops).
- A transaction that read first and then writes must take the lock from a
  snapshot: if another write committed or holds the lock meanwhile, SQLite
  refuses at once (SQLITE_BUSY / BUSY_SNAPSHOT) rather than lose an update.
  That, a BEGIN past the budget, and every error meaning "the database cannot
  be reached now" (lite_db.UNREACHABLE_CODES) are raised to the app as
  `lite_db.Unavailable`, in place of SQLAlchemy's OperationalError, with
  nothing written: map it to 503 + Retry-After in one place. A connection
  whose BEGIN failed is invalidated (closed by the pool), never reused.
- `lite_lock_budget_ms=N` (execution option) sets the budget for one
  engine/connection; `run_once` uses a long one so that workers wait for a
  migration.
- Across fork (prefork servers, gunicorn --preload): a pooled connection
  made by another process is never used or closed (not at checkout, nor
  when the pool recycles or disposes of it); it is kept referenced by the
  dialect and the pool opens a new one. A connection invalidated after a
  failed BEGIN goes alone; the rest of the pool stays.
- `run_once(engine, name, job)` (and `run_once_async`) runs a one-time job,
  e.g. `metadata.create_all`, exactly once across every process that calls
  it for the database, the others waiting for it.
"""

import os
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.dialects.sqlite.base import SQLiteDialect
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import Connection as SAConnection
from sqlalchemy.engine import Engine
from sqlalchemy.util import await_

import lite_db

WRITE_OPTION = "lite_write"  # execution option: every transaction begins IMMEDIATE
BUDGET_OPTION = "lite_lock_budget_ms"  # execution option: the lock budget, ms
RUN_ONCE_BUDGET_MS = 600_000  # 10 min: how long run_once waits for another process's job
WAL_AUTOCHECKPOINT_PAGES = 1000  # SQLite's default: no lite write path here to checkpoint

# The first word of a statement that only reads; anything else begins IMMEDIATE.
_FIRST_WORD = re.compile(r"(?:\s|\(|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*([A-Za-z]+)", re.S)
_WRITE_WORDS = re.compile(r"\b(?:INSERT|UPDATE|DELETE|REPLACE)\b", re.I)
# An app's own BEGIN (SQLAlchemy's documented "begin" event recipe for pysqlite).
_BEGIN = re.compile(
    r"\s*BEGIN(?:\s+(DEFERRED|IMMEDIATE|EXCLUSIVE))?(?:\s+TRANSACTION)?\s*;?\s*\Z", re.I
)
_ONCE_TABLE = (
    "CREATE TABLE IF NOT EXISTS lite_once ("
    " name TEXT PRIMARY KEY, done_at REAL NOT NULL, pid INTEGER NOT NULL) STRICT"
)
_ONCE_DONE = "SELECT 1 FROM lite_once WHERE name = ?"
_ONCE_RECORD = "INSERT INTO lite_once (name, done_at, pid) VALUES (?, ?, ?)"


class LiteConnection(lite_db.Connection):
    """The DBAPI connection: sqlite3's, carrying lite's state for the dialect."""

    def __init__(self, path: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(path, *args, **kwargs)
        self.autocommit = False  # SQLAlchemy's AUTOCOMMIT isolation level: no BEGIN at all
        self.begin_pending = False  # SQLAlchemy began; BEGIN waits for the first statement
        self.begin_write = False  # the app's own BEGIN IMMEDIATE/EXCLUSIVE asked for a write
        self.transaction: str | None = None  # "read" or "write", as begun here
        self.queued = False  # holds a place in the write queue


class _BeginFailed(sqlite3.OperationalError):
    """BEGIN IMMEDIATE could not take the lock within the budget (or at all)."""


class _WriteAfterRead(sqlite3.OperationalError):
    """A read transaction could not write: another write came since its snapshot."""


def is_read(statement: str) -> bool:
    """Whether `statement` only reads, judged by its first word (comments skipped).

    SELECT, VALUES and EXPLAIN read; WITH reads unless an INSERT, UPDATE,
    DELETE or REPLACE follows; a PRAGMA reads unless it sets (`=`).
    Anything else, or anything unclear, is a write.
    """
    match = _FIRST_WORD.match(statement)
    word = match.group(1).upper() if match else ""
    if word in ("SELECT", "VALUES", "EXPLAIN"):
        return True
    if word == "WITH":
        return _WRITE_WORDS.search(statement) is None
    if word == "PRAGMA":
        return "=" not in statement
    return False


def _begin(raw: LiteConnection, write: bool, budget_ms: int) -> None:
    """BEGIN (a read) or BEGIN IMMEDIATE after a fair, bounded wait; raises _BeginFailed.

    Runs on the connection's own thread (aiosqlite's, for the async dialect).
    """
    if not write:
        raw.execute("BEGIN")
        raw.transaction = "read"
        return
    asked = time.monotonic()
    deadline = asked + budget_ms / 1000
    try:
        raw.queued = raw.queue.enter(deadline)
        raw.execute(f"PRAGMA busy_timeout = {lite_db.BUSY_POLL_MS}")
        lite_db.retrying(raw, lambda: raw.execute("BEGIN IMMEDIATE"), raw.figures, deadline)
    except sqlite3.Error as error:
        _leave_queue(raw)
        failed = _BeginFailed(f"{error} (waited {time.monotonic() - asked:.3f} s for the lock)")
        failed.sqlite_errorcode = getattr(error, "sqlite_errorcode", sqlite3.SQLITE_BUSY)
        raise failed from error
    except BaseException:
        _leave_queue(raw)
        raise
    finally:
        raw.execute(f"PRAGMA busy_timeout = {lite_db.LOCK_BUDGET_MS}")
    raw.transaction = "write"
    waited = time.monotonic() - asked
    lite_db.count(raw.figures, "writes")
    lite_db.count(raw.figures, "write_lock_wait_s", waited)


def _leave_queue(raw: LiteConnection) -> None:
    """Let the next writer in; also a slot taken by a wait that then raised."""
    raw.queued = False
    raw.queue.leave()


def _ended(raw: LiteConnection) -> None:
    """After COMMIT or ROLLBACK: the next transaction begins afresh."""
    raw.begin_pending = False
    raw.begin_write = False
    raw.transaction = None
    _leave_queue(raw)


def _set_up(raw: LiteConnection) -> None:
    """lite's pragmas, and the write queue of the file really opened (not a URI)."""
    lite_db.apply_pragmas(raw, raw.figures, wal_autocheckpoint=WAL_AUTOCHECKPOINT_PAGES)
    raw.execute(f"PRAGMA busy_timeout = {lite_db.LOCK_BUDGET_MS}")
    file = raw.execute("PRAGMA database_list").fetchone()[2]
    raw.queue.close()
    raw.queue = lite_db.WriteQueue(file)
    raw.queue.off = raw.queue.off or not file  # a memory database has no file to queue on
    raw.path = file or raw.path


class LiteDialect(SQLiteDialect_pysqlite):
    """`sqlite+lite://`: SQLAlchemy's pysqlite dialect, with lite's BEGIN and waits."""

    driver = "lite"
    supports_statement_cache = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Pooled connections made by a parent process: never used, never closed.
        self.inherited: list[Any] = []

    # -- connections ---------------------------------------------------------

    def create_connect_args(self, url: Any) -> Any:
        args, kwargs = super().create_connect_args(url)
        kwargs["factory"] = LiteConnection
        kwargs["isolation_level"] = None
        kwargs["timeout"] = lite_db.LOCK_BUDGET_MS / 1000
        return args, kwargs

    def on_connect(self) -> Callable[[Any], None]:
        functions = super().on_connect()

        def connect(dbapi_connection: Any) -> None:
            self._on_raw(dbapi_connection, _set_up)
            functions(dbapi_connection)

        return connect

    def raw(self, dbapi_connection: Any) -> LiteConnection:
        """The sqlite3 connection under a DBAPI connection (or a pool's proxy of one)."""
        return getattr(dbapi_connection, "dbapi_connection", dbapi_connection)

    def raw_if_open(self, dbapi_connection: Any) -> LiteConnection | None:
        """raw(), or None once the connection is closed (aiosqlite then has none)."""
        try:
            return self.raw(dbapi_connection)
        except ValueError:
            return None

    def _on_raw(self, dbapi_connection: Any, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(raw, *args) on the connection's own thread."""
        return fn(self.raw(dbapi_connection), *args)

    @classmethod
    def engine_created(cls, engine: Engine) -> None:
        event.listen(engine, "checkout", engine.dialect.refuse_inherited)
        event.listen(engine, "handle_error", _unavailable)

    def refuse_inherited(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        """At checkout: a connection made by another process is set aside, a new one opened."""
        if not self._inherited(dbapi_connection):
            return
        record.dbapi_connection = proxy.dbapi_connection = None
        maker = self.raw(dbapi_connection).pid
        raise exc.DisconnectionError(f"connection made by process {maker}: a new one is opened")

    # -- isolation: the driver stays in autocommit; BEGIN is ours -----------

    def set_isolation_level(self, dbapi_connection: Any, level: Any) -> None:
        self.raw(dbapi_connection).autocommit = level == "AUTOCOMMIT"
        if level != "AUTOCOMMIT":
            SQLiteDialect.set_isolation_level(self, dbapi_connection, level)

    def detect_autocommit_setting(self, dbapi_conn: Any) -> bool:
        return self.raw(dbapi_conn).autocommit

    # -- transactions ------------------------------------------------------------

    def do_begin(self, dbapi_connection: Any) -> None:
        raw = self.raw(dbapi_connection)
        raw.begin_pending = not raw.autocommit

    def do_commit(self, dbapi_connection: Any) -> None:
        raw = self.raw_if_open(dbapi_connection)
        try:
            super().do_commit(dbapi_connection)
        finally:
            if raw is not None:
                _ended(raw)

    def do_rollback(self, dbapi_connection: Any) -> None:
        raw = self.raw_if_open(dbapi_connection)
        try:
            super().do_rollback(dbapi_connection)
        finally:
            if raw is not None:
                _ended(raw)

    def do_close(self, dbapi_connection: Any) -> None:
        if self._inherited(dbapi_connection):
            return
        super().do_close(dbapi_connection)

    def do_terminate(self, dbapi_connection: Any) -> None:
        if self._inherited(dbapi_connection):
            return
        super().do_terminate(dbapi_connection)

    def _inherited(self, dbapi_connection: Any) -> bool:
        """Whether another process made it: then it is kept, never closed here (a pool
        closes connections it recycles, disposes of or fails to ping before checkout)."""
        raw = self.raw_if_open(dbapi_connection)
        if raw is None or raw.pid == os.getpid():
            return False
        self.inherited.append(dbapi_connection)
        return True

    def do_execute(self, cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        self._run(lambda: cursor.execute(statement, parameters), statement, context)

    def do_execute_no_params(self, cursor: Any, statement: str, context: Any = None) -> None:
        self._run(lambda: cursor.execute(statement), statement, context)

    def do_executemany(
        self, cursor: Any, statement: str, parameters: Any, context: Any = None
    ) -> None:
        self._run(lambda: cursor.executemany(statement, parameters), statement, context)

    def _run(self, execute: Callable[[], Any], statement: str, context: Any) -> None:
        """Begin the transaction if this is its first statement, then execute it.

        Raises _WriteAfterRead for a write its read transaction could not
        make (SQLITE_BUSY or BUSY_SNAPSHOT: another write came first).
        """
        if context is None:
            execute()
            return
        dbapi_connection = context.root_connection.connection.dbapi_connection
        raw = self.raw(dbapi_connection)
        if raw.transaction is None and not raw.autocommit and (begin := _BEGIN.match(statement)):
            # The app begins itself (e.g. a "begin" event listener, as SQLAlchemy's
            # docs advise for the stock driver): lite's BEGIN replaces it, still at
            # the first statement; IMMEDIATE or EXCLUSIVE asks for a write.
            raw.begin_pending = True
            mode = (begin.group(1) or "DEFERRED").upper()
            raw.begin_write = raw.begin_write or mode != "DEFERRED"
            return
        if raw.begin_pending:
            raw.begin_pending = False
            options = context.execution_options
            write = raw.begin_write or bool(options.get(WRITE_OPTION))
            write = write or not _reads(statement, context)
            budget = int(options.get(BUDGET_OPTION, lite_db.LOCK_BUDGET_MS))
            self._on_raw(dbapi_connection, _begin, write, budget)
        try:
            execute()
        except sqlite3.OperationalError as error:
            busy = (getattr(error, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY
            if not (busy and raw.transaction == "read"):
                raise
            refused = _WriteAfterRead(
                "this transaction read before it wrote, and another write came first; "
                f"nothing was written. Begin it with lite_write=True to wait its turn ({error})"
            )
            refused.sqlite_errorcode = error.sqlite_errorcode
            raise refused from error


def _reads(statement: str, context: Any) -> bool:
    """Whether the first statement of a transaction only reads."""
    if context.isinsert or context.isupdate or context.isdelete or context.isddl:
        return False
    compiled = context.compiled
    if compiled is not None and getattr(compiled.statement, "is_select", False):
        # SELECT … FOR UPDATE (SQLite drops the clause): the read of a read-modify-write.
        return getattr(compiled.statement, "_for_update_arg", None) is None
    return is_read(statement)


class LiteDialect_async(LiteDialect, SQLiteDialect_aiosqlite):
    """`sqlite+aiolite://`: SQLAlchemy's aiosqlite dialect, with lite's BEGIN and waits.

    Everything that may wait (the write queue, BEGIN IMMEDIATE's retries)
    runs on the connection's aiosqlite thread, never on the event loop.
    """

    driver = "aiolite"
    supports_statement_cache = True

    def raw(self, dbapi_connection: Any) -> LiteConnection:
        return self._aiosqlite(dbapi_connection)._conn

    def _on_raw(self, dbapi_connection: Any, fn: Callable[..., Any], *args: Any) -> Any:
        aiosqlite_connection = self._aiosqlite(dbapi_connection)
        return await_(aiosqlite_connection._execute(fn, aiosqlite_connection._conn, *args))

    @staticmethod
    def _aiosqlite(dbapi_connection: Any) -> Any:
        """The aiosqlite.Connection under SQLAlchemy's adapter (or a pool's proxy of it)."""
        return getattr(dbapi_connection, "dbapi_connection", dbapi_connection)._connection


def _unavailable(context: Any) -> Exception | None:
    """handle_error: an unreachable database becomes lite_db.Unavailable for the app."""
    error = context.original_exception
    if not isinstance(error, sqlite3.Error):
        return None
    code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
    if code not in lite_db.UNREACHABLE_CODES:
        return None
    if isinstance(error, _BeginFailed):
        context.is_disconnect = True  # the pool closes it: never reused half-open
        context.invalidate_pool_on_disconnect = False  # only it: the others are sound
    statement = context.execution_context
    writing = statement is not None and (
        statement.isinsert or statement.isupdate or statement.isdelete
    )
    kind = "write" if writing or isinstance(error, (_BeginFailed, _WriteAfterRead)) else "read"
    # The sync dialect's DBAPI connection is lite's and counts; the async
    # adapter's is not: its failures reach the listeners (metrics) only.
    raw = getattr(getattr(context.connection, "connection", None), "dbapi_connection", None)
    figures = getattr(raw, "figures", None) or lite_db.Figures()
    what = (context.statement or "")[:80]
    if isinstance(error, (_BeginFailed, _WriteAfterRead)):
        reason = f"write failed: {error}"
    else:
        reason = f"database unavailable: {error}"
    return lite_db.failed(figures, kind, what, error, reason)


def run_once(engine: Engine, name: str, job: Callable[[SAConnection], Any]) -> bool:
    """Run job(connection) once for `name` across every process of the database; True if here.

    The job runs inside one write transaction that holds the write lock:
    every other process calling run_once meanwhile waits (up to
    RUN_ONCE_BUDGET_MS), then finds `name` done and returns False. DDL is
    transactional in SQLite, so a job that raises leaves nothing behind
    and the next caller runs it. Raises what the job raises, or
    lite_db.Unavailable.
    """
    options = {WRITE_OPTION: True, BUDGET_OPTION: RUN_ONCE_BUDGET_MS}
    with engine.execution_options(**options).begin() as conn:
        conn.exec_driver_sql(_ONCE_TABLE)
        if conn.exec_driver_sql(_ONCE_DONE, (name,)).first() is not None:
            return False
        job(conn)
        conn.exec_driver_sql(_ONCE_RECORD, (name, time.time(), os.getpid()))
        return True


async def run_once_async(engine: Any, name: str, job: Callable[[Any], Awaitable[Any]]) -> bool:
    """run_once for an AsyncEngine: `await job(async_connection)`."""
    options = {WRITE_OPTION: True, BUDGET_OPTION: RUN_ONCE_BUDGET_MS}
    async with engine.execution_options(**options).begin() as conn:
        await conn.exec_driver_sql(_ONCE_TABLE)
        if (await conn.exec_driver_sql(_ONCE_DONE, (name,))).first() is not None:
            return False
        await job(conn)
        await conn.exec_driver_sql(_ONCE_RECORD, (name, time.time(), os.getpid()))
        return True


# Found by entry point when lite is installed; by this when the file is copied beside an app.
registry.register("sqlite.lite", __name__, "LiteDialect")
registry.register("sqlite.aiolite", __name__, "LiteDialect_async")
