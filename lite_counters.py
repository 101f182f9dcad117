"""The demo's counters: read-modify-write done right, and increments applied once per key.

Contract:
- Counters live in the table `counters` (name, value, position), made on
  first use; a table of that name with other columns is refused
  (ValueError), never used. Keys live in `lite_idempotency_keys`. A
  database made by lite 0.1 (the demo's tables without the lite_ prefix)
  is upgraded in place before its first use (`upgrade_lite_0_1`).
- `increment` adds in one statement, which SQLite makes its own transaction
  and locks before it reads; `increment_once` does it once per key, the key
  stored with the result in the same transaction; `update_counter` shows the
  general read-modify-write, in one BEGIN IMMEDIATE transaction.
- Without a name, the first counter (by position) is meant; one statement
  picks it, so nothing is cached.
- Failures: lite_db.Unavailable when the database cannot be reached in time
  (logged and counted there); NoSuchCounter, WouldOverflow and KeyReused for
  what the caller asked, with nothing written; ValueError for a step that is
  not an int from 1 to MAX_INTEGER.
- A request's input rules, for lite_app and the examples on other ORMs:
  `counter_name_from`, `step_from` and `check_idempotency_key` raise
  BadInput, whose text says the rule.
- What a web app answers to each of these errors and lite_db's: `answer_for`
  (status, the client's text, headers), for every framework's one handler.
- State: the connection's `state["last_prune"]` (when it last pruned keys).
"""

import logging
import math
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

import lite_db

MAX_INTEGER = 2**63 - 1  # largest value SQLite stores as an INTEGER
IDEMPOTENCY_TTL_S = 24 * 3600  # 24 h: how long an Idempotency-Key is remembered
PRUNE_INTERVAL_S = 10.0  # 10 s: least time between two prunings of expired keys by a connection
PRUNE_BATCH = 500  # expired keys removed by one pruning, at most
COUNTERS_TABLES = (
    "CREATE TABLE IF NOT EXISTS counters ("
    " name TEXT PRIMARY KEY, value INTEGER NOT NULL, position INTEGER NOT NULL) STRICT",
)
IDEMPOTENCY_TABLES = (
    "CREATE TABLE IF NOT EXISTS lite_idempotency_keys ("
    " key TEXT PRIMARY KEY, counter TEXT NOT NULL, by INTEGER NOT NULL,"
    " value INTEGER NOT NULL, created_at REAL NOT NULL) STRICT",
    "CREATE INDEX IF NOT EXISTS lite_idempotency_keys_created_at"
    " ON lite_idempotency_keys (created_at)",
)

MAX_BY = 1_000_000  # largest step one request may ask for
RETRY_AFTER_S = 1  # 1 s: what a 503 asks the client to wait (Retry-After)
UNAVAILABLE_TEXT = "database busy, retry later"  # a 503's text; lite_db's reason is for logs
OUTCOME_UNKNOWN_TEXT = (
    "outcome unknown: the commit was not confirmed (the connection was lost,"
    " or the disk did not confirm it); read the value back, or repeat the"
    " request with the same Idempotency-Key"
)
COUNTER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\Z")
_STEP = re.compile(r"[1-9][0-9]{0,6}\Z")
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,128}\Z")

# A database made by lite 0.1: these tables, without the lite_ prefix.
_LITE_0_1_RENAMES = {
    "config_state": "lite_config_state",
    "config_audit": "lite_config_audit",
    "idempotency_keys": "lite_idempotency_keys",
    "health": "lite_health",
}
_LITE_0_1_FEATURES = ("counters", "config", "idempotency", "health")  # each at version 1
_LITE_0_1_CONFIG_STATE_COLUMNS = (
    "id",
    "fingerprint",
    "counters",
    "applied_at",
    "applied_by",
    "rejected_fingerprint",
)

log = logging.getLogger(__name__)

_OVERFLOW = object()  # what an increment's statement gives when the sum would pass MAX_INTEGER


class BadInput(ValueError):
    """A request parameter that breaks an input rule; its text says the rule."""


def counter_name_from(values: Sequence[str]) -> str | None:
    """The counter a request's `counter` values name; None (the first counter) if none."""
    if not values:
        return None
    if len(values) > 1:
        raise BadInput("give counter once")
    if not COUNTER_NAME.match(values[0]):
        raise BadInput("counter: use 1-64 of a-z, 0-9, _ and -")
    return values[0]


def step_from(values: Sequence[str]) -> int:
    """The step a request's `by` values ask for: 1 if none."""
    if not values:
        return 1
    if len(values) > 1 or not _STEP.match(values[0]) or int(values[0]) > MAX_BY:
        raise BadInput(f"by: a whole number from 1 to {MAX_BY}")
    return int(values[0])


def check_idempotency_key(key: str) -> str:
    """`key` if it is a valid Idempotency-Key."""
    if not _IDEMPOTENCY_KEY.match(key):
        raise BadInput("Idempotency-Key: use 1-128 of A-Z, a-z, 0-9, _ . : -")
    return key


class NoSuchCounter(LookupError):
    """No counter of that name (or none at all, when the default was asked for)."""

    def __init__(self, name: str | None) -> None:
        super().__init__(f"no counter {name!r}" if name is not None else "no counters configured")
        self.name = name


class WouldOverflow(ArithmeticError):
    """The increment would take the counter past MAX_INTEGER; nothing was written."""

    def __init__(self, name: str | None) -> None:
        super().__init__(f"{name or 'the first counter'} would pass {MAX_INTEGER}")
        self.name = name


class KeyReused(ValueError):
    """An Idempotency-Key already used for another counter or step."""

    def __init__(self, counter: str, by: int) -> None:
        super().__init__(f"Idempotency-Key already used to add {by} to {counter}")
        self.counter = counter
        self.by = by


# Each error a web app answers, its status, and the client's text: None for
# the error's own, which says what the caller asked; lite_db's are for logs.
_ANSWERS: tuple[tuple[type[Exception], int, str | None], ...] = (
    (BadInput, 400, None),
    (NoSuchCounter, 404, None),
    (WouldOverflow, 409, None),
    (KeyReused, 422, None),
    (lite_db.OutcomeUnknown, 502, OUTCOME_UNKNOWN_TEXT),
    (lite_db.Unavailable, 503, UNAVAILABLE_TEXT),
)
ERRORS = tuple(error for error, _, _ in _ANSWERS)  # what answer_for answers


def answer_for(exc: BaseException) -> tuple[int, str, dict[str, str]] | None:
    """A web app's answer to one of ERRORS: (HTTP status, the client's text, headers).

    None for any other exception. The text never carries SQL, driver text or
    a path; a 503 carries Retry-After: RETRY_AFTER_S. Framework-free: each
    app sends it as JSON {"error": text} from one handler.
    """
    for error, status, text in _ANSWERS:
        if isinstance(exc, error):
            headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {}
            return status, text or str(exc), headers
    return None


# `name`, or the first counter when name is NULL: one statement picks it.
_PICK = "coalesce(?, (SELECT name FROM counters ORDER BY position LIMIT 1))"
# Adds a step to a counter in one statement. A sum past MAX_INTEGER becomes
# a REAL, which the STRICT column refuses (engine.out_of_range): so
# one statement tells a new value, no such counter (no row) and an overflow.
_INCREMENT = f"UPDATE counters SET value = value + ? WHERE name = {_PICK} RETURNING name, value"
_READ = f"SELECT name, value FROM counters WHERE name = {_PICK}"


def ensure_counters(cur: sqlite3.Cursor) -> None:
    """Create the demo's `counters` table if missing; refuse one that is not lite's.

    The first time on a connection, a database made by lite 0.1 gets its
    tables renamed first (`upgrade_lite_0_1`). Raises ValueError when a table
    named counters has other columns, lite_db.Unavailable as a write does.
    """
    lite_db.ensure_tables(cur, "counters", 1, COUNTERS_TABLES, _check_counters_table)


def _check_counters_table(cur: sqlite3.Cursor) -> None:
    upgrade_lite_0_1(cur)
    found = lite_db.table_columns(cur, "counters")
    if found and found != ["name", "value", "position"]:
        raise ValueError("this database has a table named counters that is not lite's")


def upgrade_lite_0_1(cur: sqlite3.Cursor) -> None:
    """Give a database made by lite 0.1 the lite_* table names, once, keeping every row.

    Recognised by its four tables, config_state with exactly 0.1's columns,
    and no lite_schema; any other database is left as it is. The renames
    are one transaction; each feature is then recorded at version 1.
    Raises lite_db.Unavailable as a write does.
    """
    if lite_db.table_columns(cur, "lite_schema"):
        return
    if lite_db.table_columns(cur, "config_state") != list(_LITE_0_1_CONFIG_STATE_COLUMNS):
        return

    def upgrade_lite_0_1(cur: sqlite3.Cursor) -> bool:
        found = {name: lite_db.table_columns(cur, name) for name in _LITE_0_1_RENAMES}
        if not all(found.values()):
            return False  # another process upgraded it meanwhile, or not 0.1's
        for old, new in _LITE_0_1_RENAMES.items():
            cur.execute(f"ALTER TABLE {old} RENAME TO {new}")
        cur.execute("DROP INDEX IF EXISTS idempotency_keys_created_at")
        for statement in IDEMPOTENCY_TABLES:
            cur.execute(statement)
        return True

    if not lite_db.write(cur, upgrade_lite_0_1):
        return
    log.info("a database made by lite 0.1: its tables renamed to lite_*")
    for feature in _LITE_0_1_FEATURES:
        lite_db.ensure_tables(cur, feature, 1, ())


def _check_step(by: Any) -> None:
    if not isinstance(by, int) or isinstance(by, bool) or not 1 <= by <= MAX_INTEGER:
        raise ValueError("by must be an int from 1 to MAX_INTEGER")


def _add(cur: sqlite3.Cursor, name: str | None, by: int) -> Any:
    """Run the increment statement: (name, value), None for no counter, or _OVERFLOW."""
    try:
        return cur.execute(_INCREMENT, (by, name)).fetchone()
    except Exception as exc:  # sqlite3's, or another engine's (lite_pg: psycopg's)
        if cur.connection.engine.out_of_range(exc):
            return _OVERFLOW  # PostgreSQL aborts the transaction: its COMMIT rolls back
        raise


def _added(result: Any, name: str | None) -> tuple[str, int]:
    if result is None:
        raise NoSuchCounter(name)
    if result is _OVERFLOW:
        raise WouldOverflow(name)
    return result[0], result[1]


def read_counter(cur: sqlite3.Cursor, name: str | None = None) -> tuple[str, int]:
    """(name, value) of counter `name`, or of the first counter when name is None.

    Raises NoSuchCounter, or lite_db.Unavailable.
    """
    ensure_counters(cur)
    rows = lite_db.query(cur, _READ, (name,))
    if not rows:
        raise NoSuchCounter(name)
    return rows[0][0], rows[0][1]


def increment(cur: sqlite3.Cursor, name: str | None = None, by: int = 1) -> tuple[str, int]:
    """Add `by` to counter `name` (None: the first counter) in one atomic statement.

    Returns (name, new value). Raises NoSuchCounter or WouldOverflow (nothing
    written then), or lite_db.Unavailable.
    """
    _check_step(by)
    ensure_counters(cur)

    def add_step(cur: sqlite3.Cursor) -> Any:
        return _add(cur, name, by)

    return _added(lite_db.write(cur, add_step, one_statement=True), name)


def increment_once(
    cur: sqlite3.Cursor, name: str | None, by: int, key: str
) -> tuple[str, int, bool]:
    """Add `by` to counter `name` once per `key`, however often it is asked.

    The first call with a key increments and stores the key with its result,
    in the same transaction; a repeat within IDEMPOTENCY_TTL_S changes
    nothing and returns the stored result. Returns (name, value, replayed).
    Raises KeyReused if the key was used for another counter or step, else
    as `increment` does. Expired keys are pruned here, a bounded batch at
    most once per PRUNE_INTERVAL_S per connection, so no request pays for a
    backlog.
    """
    _check_step(by)
    ensure_counters(cur)
    lite_db.ensure_tables(cur, "idempotency", 1, IDEMPOTENCY_TABLES)
    state = cur.connection.state
    now = time.time()
    prune = time.monotonic() - state.get("last_prune", -math.inf) >= PRUNE_INTERVAL_S
    if prune:
        state["last_prune"] = time.monotonic()

    def increment_once(cur: sqlite3.Cursor) -> Any:
        if prune:
            cur.execute(
                "DELETE FROM lite_idempotency_keys WHERE key IN (SELECT key"
                " FROM lite_idempotency_keys WHERE created_at < ? ORDER BY created_at LIMIT ?)",
                (now - IDEMPOTENCY_TTL_S, PRUNE_BATCH),
            )
        stored = cur.execute(
            "SELECT counter, by, value FROM lite_idempotency_keys"
            " WHERE key = ? AND created_at >= ?",
            (key, now - IDEMPOTENCY_TTL_S),
        ).fetchone()
        if stored is not None:
            return stored, True
        result = _add(cur, name, by)
        if result is None or result is _OVERFLOW:
            return result, False
        cur.execute(
            "INSERT INTO lite_idempotency_keys (key, counter, by, value, created_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET counter = excluded.counter,"
            " by = excluded.by, value = excluded.value, created_at = excluded.created_at",
            (key, result[0], by, result[1], now),
        )
        return result, False

    result, replayed = lite_db.write(cur, increment_once)
    if replayed:
        if (name not in (None, result["counter"])) or result["by"] != by:
            raise KeyReused(result["counter"], result["by"])
        return result["counter"], result["value"], True
    return (*_added(result, name), False)


def update_counter(cur: sqlite3.Cursor, name: str, compute: Callable[[int], int]) -> int:
    """Read counter `name`, compute its new value in Python, write it back.

    The general read-modify-write, done right: read and write happen in one
    transaction that took the write lock before the read, so no other process
    can write in between. Returns the new value. Raises NoSuchCounter, or
    lite_db.Unavailable.
    """
    ensure_counters(cur)

    def update_counter(cur: sqlite3.Cursor) -> int | None:
        row = cur.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        new_value = compute(row[0])
        cur.execute("UPDATE counters SET value = ? WHERE name = ?", (new_value, name))
        return new_value

    value = lite_db.write(cur, update_counter)
    if value is None:
        raise NoSuchCounter(name)
    return value
