"""lite_pg against a private PostgreSQL: lite_db's contract on another engine.

Exact counts from real processes, read-modify-write that loses nothing
(serialization failures retried), the lock budget, a connection per
process after fork, a server restart survived, and a connection lost
before COMMIT (retried) or after it was sent (OutcomeUnknown)."""

import os
import threading
import time

import pg
import procs
import psycopg
import pytest

import lite_db
import lite_pg

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

TABLES = ("CREATE TABLE IF NOT EXISTS tally (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",)


def _ready(url):
    cur = lite_pg.cursor(url)
    lite_db.ensure_tables(cur, "tally", 1, TABLES)
    lite_db.write(
        cur, lambda c: c.execute("INSERT INTO tally VALUES ('hits', 0) ON CONFLICT DO NOTHING")
    )
    return cur


def _value(url):
    return pg.query_one(url, "SELECT value FROM tally WHERE name = 'hits'")[0]


def test_work_that_raises_leaves_nothing_open_and_nothing_written(pg_url):
    cur = _ready(pg_url)

    def add_then_fail(c):
        c.execute("UPDATE tally SET value = value + 1")
        raise ValueError("the work's own error")

    with pytest.raises(ValueError, match="own error"):
        lite_db.write(cur, add_then_fail)
    assert _value(pg_url) == 0  # rolled back, not left for the next write to commit
    lite_db.write(cur, lambda c: c.execute("UPDATE tally SET value = value + 10"), True)
    assert _value(pg_url) == 10  # a one-statement write after it is committed at once
    lite_db.write(cur, lambda c: c.execute("UPDATE tally SET value = value + 1"))
    assert _value(pg_url) == 11
    cur.close()


def test_rows_answer_by_index_and_name_with_question_mark_placeholders(pg_url):
    cur = _ready(pg_url)
    (row,) = lite_db.query(cur, "SELECT name, value FROM tally WHERE name = ?", ("hits",))
    assert (row[0], row["name"], row["value"]) == ("hits", "hits", 0)
    assert lite_db.query(cur, "SELECT '100%' AS p, ? AS q", ("x",))[0]["p"] == "100%"
    cur.close()


def _increment(url, times, read_modify_write):
    cur = lite_pg.cursor(url)

    def add_one(cur):
        return cur.execute(
            "UPDATE tally SET value = value + 1 WHERE name = 'hits' RETURNING value"
        ).fetchone()[0]

    def read_then_write(cur):
        value = cur.execute("SELECT value FROM tally WHERE name = 'hits'").fetchone()[0]
        cur.execute("UPDATE tally SET value = ? WHERE name = 'hits'", (value + 1,))
        return value + 1

    seen = []
    for _ in range(times):
        if read_modify_write:
            seen.append(lite_db.write(cur, read_then_write))
        else:
            seen.append(lite_db.write(cur, add_one, one_statement=True))
    cur.close()
    return seen


@pytest.mark.parametrize(
    ("read_modify_write", "processes", "times"), [(False, 8, 100), (True, 4, 50)]
)
def test_processes_count_exactly(pg_url, read_modify_write, processes, times):
    _ready(pg_url)
    lite_db.close_all()  # no connection carried into the children
    results = procs.run(_increment, [(pg_url, times, read_modify_write)] * processes)
    seen = sorted(value for values in results for value in values)
    assert seen == list(range(1, processes * times + 1))  # each acknowledged value once
    assert _value(pg_url) == processes * times


def test_a_lock_held_past_the_budget_is_unavailable_and_writes_nothing(pg_url, monkeypatch):
    cur = _ready(pg_url)
    monkeypatch.setattr(lite_db, "LOCK_BUDGET_MS", 300)
    with psycopg.connect(pg_url) as holder:
        holder.execute("SELECT * FROM tally FOR UPDATE")
        began = time.monotonic()
        with pytest.raises(lite_db.Unavailable):
            lite_db.write(
                cur,
                lambda c: c.execute("UPDATE tally SET value = value + 1"),
                one_statement=True,
            )
        took = time.monotonic() - began
        holder.rollback()
    assert 0.25 < took < 1.5
    assert _value(pg_url) == 0


def _backend(url):
    cur = lite_pg.cursor(url)
    return lite_db.query(cur, "SELECT pg_backend_pid()")[0][0]


def test_a_forked_child_opens_its_own_connection(pg_url):
    parent = _backend(pg_url)
    (child,) = procs.run(_backend, [(pg_url,)])  # spawn: a new process, as after exec
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked child: the parent's connection is in memory, not used
        try:
            os.write(write, str(_backend(pg_url)).encode())
        finally:
            os._exit(0)
    os.close(write)
    forked = int(os.read(read, 64))
    os.waitpid(pid, 0)
    os.close(read)
    assert len({parent, child, forked}) == 3
    assert _backend(pg_url) == parent  # the parent's session survived the child


def test_a_server_restart_is_survived(pg_url, pg_cluster):
    cur = _ready(pg_url)
    before = _backend(pg_url)
    pg_cluster.script("stop")
    pg_cluster.script("start")
    assert (
        lite_db.write(
            cur,
            lambda c: c.execute("UPDATE tally SET value = value + 1 RETURNING value").fetchone()[0],
            one_statement=True,
        )
        == 1
    )
    assert _backend(pg_url) != before


def _terminate(url, backend):
    with psycopg.connect(url, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", (backend,))
        while other.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend,)).fetchone():
            time.sleep(0.01)


def test_a_connection_lost_before_commit_is_retried(pg_url):
    cur = _ready(pg_url)
    runs = []

    def add_one(c):
        runs.append(1)
        if len(runs) == 1:
            _terminate(pg_url, c.execute("SELECT pg_backend_pid()").fetchone()[0])
        return c.execute("UPDATE tally SET value = value + 1 RETURNING value").fetchone()[0]

    assert lite_db.write(cur, add_one) == 1
    assert len(runs) == 2 and _value(pg_url) == 1


def test_a_connection_lost_after_commit_was_sent_is_outcome_unknown(pg_url):
    cur = _ready(pg_url)
    runs = []

    def add_one(c):
        runs.append(1)
        c.execute("UPDATE tally SET value = value + 1")
        backend = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        # The server ends the session before COMMIT arrives: to the client, the
        # connection is lost under its COMMIT, and it cannot tell whether it took.
        threading.Thread(target=_terminate, args=(pg_url, backend)).start()
        time.sleep(0.5)

    with pytest.raises(lite_pg.OutcomeUnknown):
        lite_db.write(cur, add_one)
    assert len(runs) == 1  # never retried
    assert _value(pg_url) == 0  # here it was not applied; the client cannot know that


def _sessions(url):
    sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    return pg.query_one(url, sql)[0]


def test_threads_that_end_leave_no_sessions_behind(pg_url):
    _ready(pg_url)
    together = threading.Barrier(10)

    def one_request(wait):
        cur = lite_pg.cursor(pg_url)
        lite_db.query(cur, "SELECT value FROM tally")
        cur.close()
        if wait:
            together.wait(10)  # all alive at once: ten threads, ten sessions

    threads = [threading.Thread(target=one_request, args=(True,)) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _sessions(pg_url) >= 10  # theirs, until a new connection is opened
    last = threading.Thread(target=one_request, args=(False,))
    last.start()
    last.join()
    # This thread's session, the last request thread's, and the one counting
    # (a closed session's backend leaves pg_stat_activity a moment later).
    deadline = time.monotonic() + 5
    while _sessions(pg_url) > 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sessions(pg_url) <= 3
