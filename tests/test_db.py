"""lite_db: connections, pragmas, write transactions, helpers, failures."""

import logging
import multiprocessing
import os
import sqlite3
import time

import procs
import pytest

import lite_db


def test_nothing_is_opened_until_first_use(db_path):
    assert not os.path.exists(db_path)
    assert db_path not in lite_db._connections


def test_one_connection_per_process_and_path(db_path):
    assert lite_db.connect(db_path) is lite_db.connect(db_path)


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
    queue.put((id(conn) != parent_conn_id, lite_db._connections[db_path][0], ok))


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
    reads = lite_db.stats["reads"]
    with pytest.raises(ValueError):
        lite_db.get(cur, table, "a", attr)
    with pytest.raises(ValueError):
        lite_db.upsert(cur, table, {"name": "a", attr: 1})
    assert lite_db.stats["reads"] == reads
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


def test_increment_is_exact_and_refuses_to_overflow(cur, other):
    other.execute("INSERT INTO counters VALUES ('a', ?, 0)", (lite_db.MAX_INTEGER - 2,))
    assert lite_db.increment(cur, "a", 2) == lite_db.MAX_INTEGER
    assert lite_db.increment(cur, "a", 1) is None
    assert lite_db.increment(cur, "missing", 1) is None
    value = other.execute("SELECT value, typeof(value) FROM counters").fetchone()
    assert value == (lite_db.MAX_INTEGER, "integer")
    for bad in (0, -1, 1.5, True, "1", 2**63):
        with pytest.raises(ValueError):
            lite_db.increment(cur, "a", bad)


def test_update_counter_is_read_modify_write_in_one_transaction(cur, other):
    other.execute("INSERT INTO counters VALUES ('a', 3, 0)")
    assert lite_db.update_counter(cur, "a", lambda v: v * 10) == 30
    assert lite_db.update_counter(cur, "a", lambda v: 0) == 0
    assert lite_db.update_counter(cur, "nope", lambda v: v + 1) is None
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
    return lite_db.update_counter(lite_db.cursor(db_path), "a", lambda v: v + 1)


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

    retries = lite_db.stats["busy_retries"]
    assert lite_db.transact(cur, work) == "done"
    assert lite_db.stats["busy_retries"] == retries + 3
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
    retries = lite_db.stats["busy_retries"]
    assert lite_db.transact_one(cur, "INSERT INTO nope VALUES (1)") is False
    assert lite_db.stats["busy_retries"] == retries


def test_a_lock_held_past_the_budget_fails_logged_and_counted(db_path, other, monkeypatch, caplog):
    lite_db.close_all()  # reopen with the shorter budget
    monkeypatch.setattr(lite_db, "LOCK_BUDGET_MS", 300)
    cur = lite_db.cursor(db_path)
    other.execute("INSERT INTO counters VALUES ('a', 0, 0)")
    other.execute("BEGIN EXCLUSIVE")
    failures = lite_db.stats["write_failures"]
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="lite_db"):
        assert lite_db.increment(cur, "a", 1) is False
    waited = time.monotonic() - started
    assert 0.25 < waited < 3
    assert lite_db.stats["write_failures"] == failures + 1
    assert len(caplog.records) == 1
    assert "locked" in caplog.records[0].getMessage()
    other.execute("ROLLBACK")
    assert lite_db.increment(cur, "a", 1) == 1
    cur.close()


def _add_one(db_path):
    return lite_db.increment(lite_db.cursor(db_path), "a", 1)


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
    failures = lite_db.stats["read_failures"]
    with caplog.at_level(logging.ERROR, logger="lite_db"):
        assert lite_db.get(cur, "counters", "a", "value", default=0) is None
        assert lite_db.select(cur, "SELECT * FROM counters") is None
    assert lite_db.stats["read_failures"] == failures + 2
    assert len(caplog.records) == 2
    assert "no such table" in caplog.text


def test_an_unopenable_database_gives_no_cursor(tmp_path, caplog):
    path = str(tmp_path / "no" / "such" / "dir" / "x.db")
    with caplog.at_level(logging.ERROR, logger="lite_db"):
        assert lite_db.cursor(path) is None
    assert path in caplog.text


def test_writes_checkpoint_the_wal_at_most_once_per_interval(cur, other, monkeypatch):
    other.execute("INSERT INTO counters VALUES ('a', 0, 0)")
    monkeypatch.setattr(lite_db, "CHECKPOINT_INTERVAL_S", 3600)
    lite_db._last_checkpoint.clear()
    before = lite_db.stats["checkpoints"]
    for _ in range(50):
        assert lite_db.increment(cur, "a", 1)
    assert lite_db.stats["checkpoints"] == before + 1  # the first write's
    monkeypatch.setattr(lite_db, "CHECKPOINT_INTERVAL_S", 0)
    for _ in range(3):
        assert lite_db.increment(cur, "a", 1)
    assert lite_db.stats["checkpoints"] == before + 4
    assert other.execute("SELECT value FROM counters").fetchone()[0] == 53


def test_a_database_made_by_an_older_lite_gets_the_new_tables_and_keeps_its_data(db_path):
    old = sqlite3.connect(db_path)
    old.executescript(
        """
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL,
                               position INTEGER NOT NULL) STRICT;
        INSERT INTO counters VALUES ('hits', 41, 0);
        """
    )
    old.close()
    cur = lite_db.cursor(db_path)
    assert cur.execute("PRAGMA user_version").fetchone()[0] == lite_db.SCHEMA_VERSION
    tables = {row[0] for row in cur.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
    assert {"counters", "config_state", "config_audit", "idempotency_keys", "health"} <= tables
    assert lite_db.increment_once(cur, "hits", 1, "k") == (42, False)
