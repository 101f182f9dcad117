"""lite_db: connections, pragmas, write transactions, helpers, failures."""

import logging
import math
import multiprocessing
import os
import sqlite3
import threading
import time

import procs
import pytest

import lite_app
import lite_counters
import lite_db


def test_nothing_is_opened_until_first_use(tmp_path):
    lite_app.make_app(db_path=str(tmp_path / "new.db"), config_path=str(tmp_path / "c.ini"))
    assert not (tmp_path / "new.db").exists()
    assert lite_db.figures()["connections"] == 0


def test_a_missing_database_is_created_only_when_asked(tmp_path, caplog):
    path = str(tmp_path / "new.db")
    with caplog.at_level(logging.ERROR, logger="lite_db"), pytest.raises(lite_db.Unavailable):
        lite_db.connect(path, create=False)
    assert not os.path.exists(path)
    assert "does not exist, and a running server does not create one" in caplog.text
    lite_db.connect(path)  # create=True: the library's default, and resetapp.sh's step
    assert os.path.exists(path)


def test_one_connection_per_process_thread_and_path(db_path, tmp_path):
    conn = lite_db.connect(db_path)
    assert lite_db.connect(db_path) is conn
    assert lite_db.connect(str(tmp_path / "other.db")) is not conn
    assert (conn.path, conn.pid, conn.thread) == (db_path, os.getpid(), threading.current_thread())


def test_every_pragma_is_set_on_a_new_connection(db_path):
    conn = lite_db.connect(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == lite_db.BUSY_POLL_MS
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert (
        conn.execute("PRAGMA journal_size_limit").fetchone()[0] == lite_db.JOURNAL_SIZE_LIMIT_BYTES
    )
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    assert conn.isolation_level is None


def test_synchronous_full_can_be_chosen(db_path, monkeypatch):
    monkeypatch.setenv("LITE_SYNCHRONOUS", "full")
    conn = lite_db.connect(db_path)
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_unknown_synchronous_mode_is_refused(db_path, monkeypatch):
    monkeypatch.setenv("LITE_SYNCHRONOUS", "OFF")
    with pytest.raises(ValueError, match="LITE_SYNCHRONOUS"):
        lite_db.connect(db_path)


def _child_connection_report(db_path, parent_conn_id, queue):
    conn = lite_db.connect(db_path)
    cur = conn.cursor()
    ok = lite_db.transact_one(cur, "UPDATE counters SET value = value + 1 WHERE name = 'x'")
    queue.put((id(conn) != parent_conn_id, conn.pid, ok))


def test_a_connection_opened_before_fork_is_never_used_by_the_child(db_path, cur, other):
    other.execute("INSERT INTO counters VALUES ('x', 0, 0)")
    parent_conn = lite_db.connect(db_path)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_connection_report, args=(db_path, id(parent_conn), queue))
    child.start()
    try:
        new_connection, owner_pid, ok = queue.get(timeout=30)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert new_connection
    assert owner_pid == child.pid
    assert ok is True
    assert other.execute("SELECT value FROM counters").fetchone()[0] == 1
    # The parent's connection still works after the child is gone.
    assert lite_db.get(cur, "counters", "x", "value") == 1


def test_transact_list_commits_all_or_nothing(cur, other):
    assert lite_db.transact(
        cur,
        [
            ("INSERT INTO counters VALUES (?, ?, ?)", ("a", 1, 0)),
            ("INSERT INTO counters VALUES (?, ?, ?)", ("b", 2, 1)),
        ],
    )
    assert other.execute("SELECT count(*) FROM counters").fetchone()[0] == 2
    result = lite_db.transact(
        cur,
        [
            ("INSERT INTO counters VALUES (?, ?, ?)", ("c", 3, 2)),
            ("INSERT INTO counters VALUES (?, ?, ?)", ("a", 9, 3)),  # duplicate key
        ],
    )
    assert result is False
    assert other.execute("SELECT count(*) FROM counters").fetchone()[0] == 2
    assert not cur.connection.in_transaction


def test_transact_callable_returns_its_result(cur, other):
    def work(cur):
        cur.execute("INSERT INTO counters VALUES ('a', 5, 0)")
        return cur.execute("SELECT value * 2 FROM counters").fetchone()[0]

    assert lite_db.transact(cur, work) == 10
    assert lite_db.transact(cur, lambda cur: None) is True
    assert other.execute("SELECT value FROM counters").fetchone()[0] == 5


def test_transact_refuses_what_is_not_work(cur):
    with pytest.raises(ValueError):
        lite_db.transact(cur, "DELETE FROM counters")


def test_a_programming_error_in_work_rolls_back_and_raises(cur, other):
    def work(cur):
        cur.execute("INSERT INTO counters VALUES ('a', 5, 0)")
        raise KeyError("bug")

    with pytest.raises(KeyError):
        lite_db.transact(cur, work)
    assert not cur.connection.in_transaction
    assert other.execute("SELECT count(*) FROM counters").fetchone()[0] == 0


def test_transact_one_returns_the_returning_row_or_true(cur, other):
    row = lite_db.transact_one(cur, "INSERT INTO counters VALUES ('a', 7, 0) RETURNING value")
    assert row[0] == 7
    assert lite_db.transact_one(cur, "UPDATE counters SET value = 8") is True
    assert other.execute("SELECT value FROM counters").fetchone()[0] == 8


def test_transact_many_is_one_transaction(cur, other):
    rows = [("a", 1, 0), ("b", 2, 1), ("a", 3, 2)]  # the last one fails
    assert lite_db.transact_many(cur, "INSERT INTO counters VALUES (?, ?, ?)", rows) is False
    assert other.execute("SELECT count(*) FROM counters").fetchone()[0] == 0
    assert lite_db.transact_many(cur, "INSERT INTO counters VALUES (?, ?, ?)", rows[:2]) is True
    assert other.execute("SELECT sum(value) FROM counters").fetchone()[0] == 3


def test_get_reads_one_attribute_by_primary_key(cur, other):
    other.execute("INSERT INTO counters VALUES ('a', 41, 3)")
    assert lite_db.get(cur, "counters", "a", "value") == 41
    assert lite_db.get(cur, "counters", "a", "position") == 3
    assert lite_db.get(cur, "counters", "zz", "value") is None
    assert lite_db.get(cur, "counters", "zz", "value", default=False) is False


@pytest.mark.parametrize(
    ("table", "attr"),
    [
        ("nope", "value"),
        ("counters", "nope"),
        ('counters"; DROP TABLE counters; --', "value"),
        ("counters", 'value" FROM counters; --'),
        (3, "value"),
    ],
)
def test_unknown_names_raise_before_any_sql(cur, other, table, attr):
    other.execute("INSERT INTO counters VALUES ('a', 1, 0)")
    reads = lite_db.figures()["reads"]
    with pytest.raises(ValueError):
        lite_db.get(cur, table, "a", attr)
    with pytest.raises(ValueError):
        lite_db.upsert(cur, table, {"name": "a", attr: 1})
    assert lite_db.figures()["reads"] == reads
    assert other.execute("SELECT count(*) FROM counters").fetchone()[0] == 1


def test_upsert_inserts_then_updates(cur, other):
    assert lite_db.upsert(cur, "counters", {"name": "a", "value": 1, "position": 0}) is True
    assert lite_db.upsert(cur, "counters", {"name": "a", "value": 2, "position": 0}) is True
    assert other.execute("SELECT name, value, position FROM counters").fetchall() == [("a", 2, 0)]
    with pytest.raises(ValueError, match="primary key"):
        lite_db.upsert(cur, "counters", {"value": 3})
    with pytest.raises(ValueError):
        lite_db.upsert(cur, "counters", {})


def test_upsert_failure_returns_false(cur, other):
    # STRICT tables refuse text in an INTEGER column: a database error, not a bug.
    assert lite_db.upsert(cur, "counters", {"name": "a", "value": "x", "position": 0}) is False
    assert other.execute("SELECT count(*) FROM counters").fetchone()[0] == 0


def test_increment_is_exact_and_refuses_to_overflow_in_one_statement(cur, other):
    other.execute("INSERT INTO counters VALUES ('a', ?, 0)", (lite_counters.MAX_INTEGER - 2,))
    other.execute("INSERT INTO counters VALUES ('b', 5, 1)")
    assert lite_counters.increment(cur, "a", 2) == ("a", lite_counters.MAX_INTEGER)
    writes = lite_db.figures()["writes"]
    with pytest.raises(lite_counters.WouldOverflow):
        lite_counters.increment(cur, "a", 1)
    with pytest.raises(lite_counters.NoSuchCounter):
        lite_counters.increment(cur, "missing", 1)
    assert lite_db.figures()["writes"] == writes + 2  # one statement each, no second query
    assert lite_db.figures()["write_failures"] == 0  # neither is a database failure
    value = other.execute("SELECT value, typeof(value) FROM counters WHERE name = 'a'").fetchone()
    assert value == (lite_counters.MAX_INTEGER, "integer")
    for bad in (0, -1, 1.5, True, "1", 2**63):
        with pytest.raises(ValueError):
            lite_counters.increment(cur, "a", bad)


def test_without_a_name_the_first_counter_is_meant(cur, other):
    with pytest.raises(lite_counters.NoSuchCounter):
        lite_counters.increment(cur)
    with pytest.raises(lite_counters.NoSuchCounter):
        lite_counters.read_counter(cur)
    other.execute("INSERT INTO counters VALUES ('second', 5, 1), ('first', 7, 0)")
    assert lite_counters.increment(cur, by=3) == ("first", 10)
    assert lite_counters.read_counter(cur) == ("first", 10)
    assert lite_counters.read_counter(cur, "second") == ("second", 5)
    other.execute("UPDATE counters SET position = 2 WHERE name = 'first'")
    assert lite_counters.read_counter(cur) == ("second", 5)  # no cache to go stale


def test_update_counter_is_read_modify_write_in_one_transaction(cur, other):
    other.execute("INSERT INTO counters VALUES ('a', 3, 0)")
    assert lite_counters.update_counter(cur, "a", lambda v: v * 10) == 30
    assert lite_counters.update_counter(cur, "a", lambda v: 0) == 0
    with pytest.raises(lite_counters.NoSuchCounter):
        lite_counters.update_counter(cur, "nope", lambda v: v + 1)
    assert other.execute("SELECT value FROM counters").fetchone()[0] == 0


def test_deferred_read_then_write_fails_at_once_whatever_the_timeout(tmp_path):
    """The trap lite avoids, with plain sqlite3: SQLITE_BUSY_SNAPSHOT."""
    path = tmp_path / "plain.db"
    a = sqlite3.connect(path, timeout=30)  # Python's default: deferred transactions
    b = sqlite3.connect(path, timeout=30)
    a.execute("PRAGMA journal_mode = WAL")
    a.execute("CREATE TABLE t (v INTEGER)")
    a.execute("INSERT INTO t VALUES (0)")
    a.commit()
    a.execute("BEGIN")
    (value,) = a.execute("SELECT v FROM t").fetchone()  # a now reads a snapshot
    b.execute("UPDATE t SET v = v + 1")
    b.commit()
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError) as caught:
        a.execute("UPDATE t SET v = ?", (value + 1,))
    assert time.monotonic() - started < 5  # the 30 s busy timeout was never used
    assert caught.value.sqlite_errorcode == 517  # SQLITE_BUSY_SNAPSHOT
    a.rollback()
    a.close()
    b.close()


def _add_one_with_update_counter(db_path):
    return lite_counters.update_counter(lite_db.cursor(db_path), "a", lambda v: v + 1)


def test_lites_read_modify_write_never_meets_a_stale_snapshot(db_path, other):
    """The same interleaving through lite: the write waits, then reads fresh."""
    other.execute("INSERT INTO counters VALUES ('a', 0, 0)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE counters SET value = value + 1")
    running = procs.start(_add_one_with_update_counter, [(db_path,)])
    time.sleep(1)  # the child is now waiting for the write lock
    other.execute("COMMIT")
    assert procs.finish(*running, timeout_s=30) == [2]
    assert other.execute("SELECT value FROM counters").fetchone()[0] == 2


def test_busy_without_wait_is_retried(cur, other):
    """Busy errors that bypass the busy timeout are retried within the budget."""
    failures = []

    def work(cur):
        if len(failures) < 3:
            exc = sqlite3.OperationalError("database is locked")
            exc.sqlite_errorcode = sqlite3.SQLITE_BUSY
            failures.append(exc)
            raise exc
        cur.execute("INSERT INTO counters VALUES ('a', 1, 0)")
        return "done"

    retries = lite_db.figures()["busy_retries"]
    assert lite_db.transact(cur, work) == "done"
    assert lite_db.figures()["busy_retries"] == retries + 3
    assert other.execute("SELECT count(*) FROM counters").fetchone()[0] == 1
    assert cur.execute("PRAGMA busy_timeout").fetchone()[0] == lite_db.BUSY_POLL_MS


@pytest.mark.slow
def test_waits_for_the_write_lock_are_fair(db_path, cur, other):
    """8 processes incrementing as fast as they can, no pause: none gives up.

    With SQLite's own busy handler waiting the whole budget, a process that
    had waited a while slept 100 ms at a time and lost the lock to each
    newcomer: waits reached the 3 s budget and writes failed (1-2 per 6 s
    run, shares of the writes from 11k to 108k). lite waits in slices of
    BUSY_POLL_MS, so every waiter keeps trying.
    """
    lite_db.upsert(cur, "counters", {"name": "hits", "value": 0, "position": 0})
    results = procs.run(procs.increment_until, [(db_path, time.time() + 5)] * 8)
    assert sum(failed for _, failed, _ in results) == 0, results
    done = [count for count, _, _ in results]
    assert min(done) >= 0.2 * sum(done) / len(done), f"a process was starved: {done}"
    assert other.execute("SELECT value FROM counters").fetchone()[0] == sum(done)


def test_other_errors_are_not_retried(cur):
    retries = lite_db.figures()["busy_retries"]
    assert lite_db.transact_one(cur, "INSERT INTO nope VALUES (1)") is False
    assert lite_db.figures()["busy_retries"] == retries


def test_a_lock_held_past_the_budget_fails_logged_and_counted(db_path, other, monkeypatch, caplog):
    lite_db.close_all()  # reopen with the shorter budget
    monkeypatch.setattr(lite_db, "LOCK_BUDGET_MS", 300)
    cur = lite_db.cursor(db_path)
    other.execute("INSERT INTO counters VALUES ('a', 0, 0)")
    other.execute("BEGIN EXCLUSIVE")
    failures = lite_db.figures()["write_failures"]
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="lite_db"):
        with pytest.raises(lite_db.Unavailable):
            lite_counters.increment(cur, "a", 1)
        assert lite_db.transact_one(cur, "UPDATE counters SET value = 9") is False
    waited = time.monotonic() - started
    assert 0.5 < waited < 6
    assert lite_db.figures()["write_failures"] == failures + 2
    assert len(caplog.records) == 2  # once per failure, in lite_db only
    assert "locked" in caplog.records[0].getMessage()
    other.execute("ROLLBACK")
    assert lite_counters.increment(cur, "a", 1) == ("a", 1)
    cur.close()


def _add_one(db_path):
    return lite_counters.increment(lite_db.cursor(db_path), "a", 1)[1]


def test_a_short_lock_is_waited_out(db_path, other):
    other.execute("INSERT INTO counters VALUES ('a', 0, 0)")
    other.execute("BEGIN EXCLUSIVE")
    running = procs.start(_add_one, [(db_path,)] * 3)
    time.sleep(1)
    other.execute("COMMIT")
    assert sorted(procs.finish(*running, timeout_s=30)) == [1, 2, 3]


def test_read_failure_returns_none_logged_and_counted(cur, other, caplog):
    assert lite_db.get(cur, "counters", "a", "value") is None  # no row: fine
    other.execute("DROP TABLE counters")  # behind lite's back: reads now fail
    failures = lite_db.figures()["read_failures"]
    with caplog.at_level(logging.ERROR, logger="lite_db"):
        assert lite_db.get(cur, "counters", "a", "value", default=0) is None
        with pytest.raises(sqlite3.OperationalError):  # not Unavailable: the schema is wrong
            lite_db.query(cur, "SELECT * FROM counters")
    assert lite_db.figures()["read_failures"] == failures + 2
    assert len(caplog.records) == 2
    assert "no such table" in caplog.text


class _AlwaysBusyCursor(sqlite3.Cursor):
    def execute(self, sql, params=()):
        if sql.startswith("PRAGMA busy_timeout"):
            return super().execute(sql, params)
        exc = sqlite3.OperationalError("database is locked")
        exc.sqlite_errorcode = sqlite3.SQLITE_BUSY
        raise exc


def test_a_read_busy_past_the_budget_raises_unavailable(db_path, monkeypatch, caplog):
    monkeypatch.setattr(lite_db, "LOCK_BUDGET_MS", 200)
    cur = lite_db.connect(db_path).cursor(factory=_AlwaysBusyCursor)
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="lite_db"), pytest.raises(lite_db.Unavailable):
        lite_db.query(cur, "SELECT 1")
    assert 0.2 <= time.monotonic() - started < 2
    assert lite_db.figures()["busy_retries"] > 10
    assert lite_db.figures()["read_failures"] == 1
    assert len(caplog.records) == 1


def test_a_missing_directory_is_unavailable_and_the_log_says_so(tmp_path, caplog):
    directory = tmp_path / "no" / "such" / "dir"
    path = str(directory / "x.db")
    with caplog.at_level(logging.ERROR, logger="lite_db"), pytest.raises(lite_db.Unavailable):
        lite_db.cursor(path)
    assert path in caplog.text
    assert f"the directory {directory} does not exist" in caplog.text
    assert "chown" not in caplog.text
    assert lite_db.figures()["read_failures"] == 1


def test_an_sqlite_older_than_needed_is_refused_with_both_versions(tmp_path, monkeypatch):
    db_path = str(tmp_path / "new.db")
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    with pytest.raises(RuntimeError, match=r"SQLite 3\.31\.1 is too old: lite needs 3\.37\.0"):
        lite_db.connect(db_path)
    assert not os.path.exists(db_path)


def test_writes_checkpoint_the_wal_at_most_once_per_interval(cur, other, monkeypatch):
    other.execute("INSERT INTO counters VALUES ('a', 0, 0)")
    monkeypatch.setattr(lite_db, "CHECKPOINT_INTERVAL_S", 3600)
    cur.connection.last_checkpoint = -math.inf  # never
    before = lite_db.figures()["checkpoints"]
    for _ in range(50):
        assert lite_counters.increment(cur, "a", 1)
    assert lite_db.figures()["checkpoints"] == before + 1  # the first write's
    monkeypatch.setattr(lite_db, "CHECKPOINT_INTERVAL_S", 0)
    for _ in range(3):
        assert lite_counters.increment(cur, "a", 1)
    assert lite_db.figures()["checkpoints"] == before + 4
    assert other.execute("SELECT value FROM counters").fetchone()[0] == 53
