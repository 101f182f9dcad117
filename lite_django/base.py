"""Django's sqlite3 backend, with lite's pragmas, writes that lock first, and fair lock waits.

What it changes, and nothing else:
- Every new connection gets lite's settings (lite_db.apply_pragmas): WAL,
  synchronous NORMAL (FULL with LITE_SYNCHRONOUS=FULL, and with GROUP: group
  commit is lite_db's write path, not Django's), foreign keys, a
  journal size limit, and a busy timeout of lite_db.BUSY_POLL_MS. They are
  run on the raw connection, not through Django's cursor, so they are not
  counted as queries.
- `transaction_mode` defaults to IMMEDIATE: `atomic()` takes the write lock
  before it reads, so a transaction never reads a snapshot it then cannot
  write from. OPTIONS may still set another mode.
- `BEGIN` and every statement run outside a transaction (autocommit) wait
  for the lock as lite does: SQLite's busy handler waits at most
  BUSY_POLL_MS, then lite_db.retrying sleeps a jittered moment and tries
  again, until lite_db.LOCK_BUDGET_MS has passed; then Django raises its
  usual OperationalError ("database is locked"), which a view can answer
  with 503. Statements inside a transaction already hold the lock and are
  not retried. Left to wait the whole budget itself, SQLite's handler backs
  off to 100 ms sleeps and a long waiter loses the lock to each newcomer.
- An `atomic()` block that writes (IMMEDIATE or EXCLUSIVE) runs Python while
  it holds the lock, so before its BEGIN it waits its turn in lite's write
  queue (lite_db.WriteQueue: first come, first served, asleep in the
  kernel), within the same budget, and leaves it at COMMIT or ROLLBACK.
- SQLite still checkpoints the WAL itself (wal_autocheckpoint 1000 pages):
  lite's own checkpoints run in lite_db's write path, which Django does not
  use.
"""

import time
from typing import Any

from django.db.backends.sqlite3 import base

import lite_db


class DatabaseWrapper(base.DatabaseWrapper):
    """Django's SQLite DatabaseWrapper with lite's pragmas and sliced lock waits."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lite_figures = lite_db.Figures()  # busy_retries and db_time_s of this wrapper
        self.lite_queue: lite_db.WriteQueue | None = None
        self.lite_deadline: float | None = None  # of the BEGIN being waited for

    def get_connection_params(self) -> dict[str, Any]:
        params = super().get_connection_params()
        if self.settings_dict["OPTIONS"].get("transaction_mode") is None:
            self.transaction_mode = "IMMEDIATE"
        return params

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        conn = super().get_new_connection(conn_params)
        try:
            lite_db.apply_pragmas(conn, self.lite_figures, wal_autocheckpoint=1000)
        except BaseException:
            conn.close()
            raise
        path = str(conn_params["database"])
        if self.lite_queue is not None and self.lite_queue.path != path + lite_db.QUEUE_SUFFIX:
            self.lite_queue.close()  # NAME changed (the test runner's database)
            self.lite_queue = None
        if self.lite_queue is None and not self.is_in_memory_db():
            self.lite_queue = lite_db.WriteQueue(path)
        return conn

    def create_cursor(self, name: str | None = None) -> Any:
        cursor = self.connection.cursor(factory=CursorWrapper)
        cursor.lite_wrapper = self
        return cursor

    def _start_transaction_under_autocommit(self) -> None:
        queue = self.lite_queue
        if queue is None or self.transaction_mode not in ("IMMEDIATE", "EXCLUSIVE"):
            super()._start_transaction_under_autocommit()
            return
        self.lite_deadline = time.monotonic() + lite_db.LOCK_BUDGET_MS / 1000
        queue.enter(self.lite_deadline)
        try:
            super()._start_transaction_under_autocommit()
        except BaseException:
            queue.leave()
            raise
        finally:
            self.lite_deadline = None

    def _commit(self) -> None:
        try:
            super()._commit()
        finally:
            self._leave_queue()

    def _rollback(self) -> None:
        try:
            super()._rollback()
        finally:
            self._leave_queue()

    def _close(self) -> None:
        try:
            super()._close()
        finally:
            self._leave_queue()

    def _leave_queue(self) -> None:
        if self.lite_queue is not None:
            self.lite_queue.leave()


class CursorWrapper(base.SQLiteCursorWrapper):
    """Statements outside a transaction (BEGIN included) wait for the lock in slices."""

    lite_wrapper: DatabaseWrapper

    def execute(self, query: str, params: Any = None) -> Any:
        run = super().execute
        if self.connection.in_transaction:
            return run(query, params)
        return self._retrying(lambda: run(query, params))

    def executemany(self, query: str, param_list: Any) -> Any:
        run = super().executemany
        if self.connection.in_transaction:
            return run(query, param_list)
        param_list = list(param_list)  # a retry must see the same parameters again
        return self._retrying(lambda: run(query, param_list))

    def _retrying(self, attempt: Any) -> Any:
        wrapper = self.lite_wrapper
        return lite_db.retrying(
            self.connection, attempt, wrapper.lite_figures, wrapper.lite_deadline
        )
