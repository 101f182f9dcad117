"""Apply config.ini to the database exactly once per change of the file.

Contract:
- A `ConfigWatcher(config_path)` keeps what its process last saw of the file;
  its `refresh(cur)` is called on every request. While the connection's
  ChangeWatch has seen no event on the file or a directory above it, that
  costs one `poll` and no `stat`; after one (or with no ChangeWatch), one
  `os.stat`, and a file that looks as it did last time (same mtime, size
  and inode) is unchanged.
- A change is any difference of mtime (compared with `!=`), size or content
  hash, so a plain `touch` counts. On a change, the process takes the write
  lock, compares the file's fingerprint with the one stored in the database
  and, only if they differ, applies the file and records the fingerprint and
  an audit row (fingerprint, pid, time), all in one transaction. So exactly
  one process applies each version; the others see the result.
- The database is a cache of the file: applying a version sets every
  configured counter to its configured value, whatever it holds (a plain
  `touch` too), adds new counters and deletes counters no longer in the file.
  Increments acknowledged before that are overwritten: a loss by design.
- A file that is missing, unreadable, larger than CONFIG_MAX_BYTES or
  malformed is never applied: the last good config stays, requests go on,
  and each bad version is logged once across all processes.
- A file still being written (modified less than SETTLE_S ago, or changed
  while it was read) is looked at again later. A file dated in the future
  is applied once it has read the same for SETTLE_S, and that is logged. A
  FIFO, directory or anything else that is not a regular file is refused
  without blocking; a byte order mark is accepted. The settle time is not waited
  out while no version was ever applied to the database (a new database): a
  file that stays the same across the read and parses is applied at once.
- On a database shared by several machines (its engine's feature
  `shared_by_machines`: lite_pg's PostgreSQL), each holds its own copy of
  the file with its own mtime, so there a version is the content alone: a
  new content is applied once in total, a `touch` is not a version.
  `apply_now(..., again=True)` (`lite apply-config --again`) applies the
  file even if its version is applied already.
- The state lives in the database's own tables, `lite_config_state` (the
  applied version) and `lite_config_audit` (one row per application),
  created on first use beside the demo's `counters`.
- A database that cannot be reached raises lite_db.Unavailable (logged and
  counted there); the change is looked at again on the next request.

config.ini has one section, [counters], with one `name = initial value` line
per counter; the first is the default counter of the web routes.
"""

import configparser
import hashlib
import itertools
import json
import logging
import os
import re
import sqlite3
import stat
import time
from typing import Any

import lite_counters
import lite_db
import lite_engine

CONFIG_MAX_BYTES = 64 * 1024  # 64 KiB: a larger file is refused
SETTLE_S = 1.0  # 1 s: a file modified more recently may still be being written
MAX_COUNTERS = 100
_INTEGER = re.compile(r"-?[0-9]{1,19}\Z")

TABLES = (
    "CREATE TABLE IF NOT EXISTS lite_config_state ("
    " id INTEGER PRIMARY KEY CHECK (id = 1), fingerprint TEXT NOT NULL,"
    " counters TEXT NOT NULL, applied_at REAL NOT NULL, applied_by INTEGER NOT NULL,"
    " rejected_fingerprint TEXT) STRICT",
    "CREATE TABLE IF NOT EXISTS lite_config_audit ("
    " id INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL, pid INTEGER NOT NULL,"
    " applied_at REAL NOT NULL) STRICT",
)
TABLES_VERSION = 1

log = logging.getLogger(__name__)

_NOT_SEEN = object()  # a watcher's first look


class ConfigError(Exception):
    """config.ini cannot be applied; the message says why."""


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def parse(data: bytes) -> dict[str, int]:
    """The counters that config text defines, in file order.

    Raises ConfigError with a reason when the text is not a valid config.
    """
    if len(data) > CONFIG_MAX_BYTES:
        raise ConfigError(f"larger than {CONFIG_MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")  # a byte order mark, as some editors write, is fine
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8: {exc}") from None
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # keep names as written; upper case is refused below
    try:
        parser.read_string(text)
    except configparser.Error as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    if parser.sections() != ["counters"]:
        raise ConfigError(f"expected exactly one section [counters], got {parser.sections()}")
    counters = {}
    for name, value in parser.items("counters"):
        if not lite_counters.COUNTER_NAME.match(name):
            raise ConfigError(f"bad counter name {name!r}: use a-z, 0-9, _ and -")
        if not _INTEGER.match(value) or not -(2**63) <= int(value) <= lite_counters.MAX_INTEGER:
            raise ConfigError(f"counter {name!r}: {value!r} is not a 64-bit integer")
        counters[name] = int(value)
    if not counters:
        raise ConfigError("no counters defined")
    if len(counters) > MAX_COUNTERS:
        raise ConfigError(f"more than {MAX_COUNTERS} counters")
    return counters


def _read_unchanged(path: str) -> tuple[tuple[int, int, int], float, bytes] | None:
    """The file's stat key, age in seconds and bytes; None if it changed while read.

    Raises ConfigError when it cannot be read.
    """
    try:
        # O_NONBLOCK: opening a FIFO put in the file's place must not wait
        # for a writer; it is then refused as not a regular file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            before = os.fstat(f.fileno())
            if not stat.S_ISREG(before.st_mode):
                raise ConfigError("not a regular file")
            data = f.read(CONFIG_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}") from None
    key = (before.st_mtime_ns, before.st_size, before.st_ino)
    if _stat_key(path) != key or len(data) != min(before.st_size, CONFIG_MAX_BYTES + 1):
        return None
    return key, time.time() - before.st_mtime, data


def _apply(
    cur: sqlite3.Cursor,
    path: str,
    key: tuple[int, int, int],
    fingerprint: str,
    counters: dict[str, int],
    again: bool = False,
) -> str:
    """Work for lite_db.write: apply `counters` unless `fingerprint` is stored (or `again`).

    Returns "applied"; "current" when another process applied it first;
    "unsettled" when the file changed since it was read: applying it now could
    put an older version over a newer one that another process applied.
    """
    if _stat_key(path) != key:
        return "unsettled"
    state = cur.execute(
        "SELECT fingerprint, rejected_fingerprint FROM lite_config_state"
    ).fetchone()
    if state is not None and state["fingerprint"] == fingerprint and not again:
        if state["rejected_fingerprint"] is not None:
            # The good version is back: the next bad one is news again.
            cur.execute("UPDATE lite_config_state SET rejected_fingerprint = NULL")
        return "current"
    cur.executemany(
        "INSERT INTO counters (name, value, position) VALUES (?, ?, ?) ON CONFLICT (name) "
        "DO UPDATE SET value = excluded.value, position = excluded.position",
        [(name, value, position) for position, (name, value) in enumerate(counters.items())],
    )
    placeholders = ", ".join("?" for _ in counters)
    cur.execute(f"DELETE FROM counters WHERE name NOT IN ({placeholders})", list(counters))
    now, pid = time.time(), os.getpid()
    cur.execute(
        "INSERT INTO lite_config_state (id, fingerprint, counters, applied_at, applied_by) "
        "VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
        "fingerprint = excluded.fingerprint, counters = excluded.counters, "
        "applied_at = excluded.applied_at, applied_by = excluded.applied_by, "
        "rejected_fingerprint = NULL",
        (fingerprint, json.dumps(counters), now, pid),
    )
    cur.execute(
        "INSERT INTO lite_config_audit (fingerprint, pid, applied_at) VALUES (?, ?, ?)",
        (fingerprint, pid, now),
    )
    return "applied"


def _reject(cur: sqlite3.Cursor, fingerprint: str) -> str:
    """Work for lite_db.write: record a bad version.

    Returns "new", or "known" when another process recorded it first.
    """
    row = cur.execute("SELECT rejected_fingerprint FROM lite_config_state").fetchone()
    if row is not None and row[0] == fingerprint:
        return "known"
    if row is None:
        # Nothing applied yet: keep the bad version on record all the same.
        cur.execute(
            "INSERT INTO lite_config_state "
            "(id, fingerprint, counters, applied_at, applied_by, rejected_fingerprint) "
            "VALUES (1, '', '{}', 0, 0, ?)",
            (fingerprint,),
        )
    else:
        cur.execute("UPDATE lite_config_state SET rejected_fingerprint = ?", (fingerprint,))
    return "new"


def _ensure_tables(cur: sqlite3.Cursor) -> None:
    lite_counters.ensure_counters(cur)
    lite_db.ensure_tables(cur, "config", TABLES_VERSION, TABLES)


class ConfigWatcher:
    """Applies one config file to the database once per version; one per process and file.

    Keeps what this process last saw of the file.
    """

    _made = itertools.count()  # watchers made in this process, for their names

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: Any = _NOT_SEEN  # (mtime_ns, size, inode), or None: could not stat
        self.future: tuple[str, float] | None = None  # a future-dated version, first read when
        # Its name in a connection's ChangeWatch: this watcher's own looks.
        self.watch_name = f"config {path} {next(ConfigWatcher._made)}"

    def _settled_in_the_future(self, fingerprint: str) -> bool:
        """True once a file dated in the future has read the same for SETTLE_S.

        Its age tells nothing, so its content must: the first read is timed
        here, and the file counts as settled when a read at least SETTLE_S
        later finds the same version.
        """
        now = time.monotonic()
        if self.future is None or self.future[0] != fingerprint:
            self.future = (fingerprint, now)
            return False
        return now - self.future[1] >= SETTLE_S

    def refresh(self, cur: sqlite3.Cursor, force: bool = False, again: bool = False) -> str:
        """Apply the file if it changed since this process last looked.

        Asks the connection's ChangeWatch first, where it has one: no event
        on the file, its directory or a directory above it since the last
        look that settled (anything but "unsettled") means "unchanged"
        without a `stat`. Otherwise as `look`.
        """
        conn = cur.connection
        watch = conn.engine.change_watch(conn)
        if watch is None or force:
            return self.look(cur, force, again)
        if not watch.changed(self.watch_name):
            return "unchanged"
        if not watch.watches(self.watch_name):  # the first look: watched from now on
            watch.watch(self.watch_name, lite_db.watched_paths(self.path, content=True))
        outcome = self.look(cur, force, again)
        if outcome != "unsettled":
            watch.looked(self.watch_name)
        return outcome

    def look(self, cur: sqlite3.Cursor, force: bool = False, again: bool = False) -> str:
        """Apply the file if its `stat` changed since this process last looked.

        `force` skips the settle time (for the command line, not for
        requests); `again` applies the file even if its version is applied.
        Returns what happened: "unchanged", "applied" (by this process),
        "current" (another process had applied it), "rejected" or
        "unsettled" (looked at again on the next call). Raises
        lite_db.Unavailable; the file is looked at again on the next call.
        """
        try:  # _stat_key, inlined: this runs on every request
            st = os.stat(self.path)
            key: Any = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            key = None
        if not force and self.seen == key:
            return "unchanged"
        _ensure_tables(cur)
        try:
            read = _read_unchanged(self.path)
            if read is None:
                return "unsettled"
            key, age_s, data = read
            digest = hashlib.sha256(data).hexdigest()
            if cur.connection.engine.features.shared_by_machines:
                fingerprint = f"content-{digest}"  # each machine's copy has its own mtime
            else:
                fingerprint = f"{key[0]}-{key[1]}-{digest}"
            # A file modified less than SETTLE_S ago may still be being
            # written: it waits, unless it parses and the database has no
            # version yet (an app's first start should not answer "no
            # counters" for a second).
            young = not force and age_s < SETTLE_S
            if young and age_s < 0:
                young = not self._settled_in_the_future(fingerprint)
            try:
                counters = parse(data)
            except ConfigError:
                if young:
                    return "unsettled"
                raise
            if young and lite_db.query(
                cur, "SELECT 1 FROM lite_config_state WHERE fingerprint != ''"
            ):
                return "unsettled"
        except ConfigError as exc:
            fingerprint = f"bad-{key}"

            def reject_config(cur: sqlite3.Cursor) -> str:
                return _reject(cur, fingerprint)

            if lite_db.write(cur, reject_config) == "new":
                lite_db.notify("config_rejected")
                log.error("config %s not applied, keeping the last good one: %s", self.path, exc)
            self.seen = key
            return "rejected"

        def apply_config(cur: sqlite3.Cursor) -> str:
            return _apply(cur, self.path, key, fingerprint, counters, again)

        outcome = lite_db.write(cur, apply_config)
        if outcome == "unsettled":
            return outcome
        self.seen = key
        if outcome == "applied":
            lite_db.notify("config_applied")
            log.info("config %s applied: %s", self.path, fingerprint)
            if age_s < 0:
                log.warning(
                    "config %s is dated %.0f s in the future (applied once it read the same"
                    " for %.0f s): check the clock of whoever wrote it",
                    self.path,
                    -age_s,
                    SETTLE_S,
                )
        return outcome


def applied_version(cur: sqlite3.Cursor) -> dict[str, Any] | None:
    """The applied config's fingerprint, time and pid; None if none.

    Raises lite_db.Unavailable.
    """
    _ensure_tables(cur)
    rows = lite_db.query(
        cur,
        "SELECT fingerprint, applied_at, applied_by FROM lite_config_state WHERE fingerprint != ''",
    )
    return dict(rows[0]) if rows else None


def apply_now(database: str, config_path: str, again: bool = False) -> str:
    """Apply `config_path` to `database` now, settled or not; what happened.

    `database`: a SQLite file (created if missing) or a postgresql:// URL.
    `again`: apply even if this version is applied already. For the command
    line (`lite apply-config`). Raises lite_db.Unavailable.
    """
    cur = lite_engine.cursor(database)
    try:
        return ConfigWatcher(config_path).refresh(cur, force=True, again=again)
    finally:
        cur.close()
