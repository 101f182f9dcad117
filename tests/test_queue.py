"""lite_db.WriteQueue: write transactions from many processes take the lock
in the order they asked for it, each wait stays within the lock budget, a
process that dies in the line does not stop it, and without its file the
queue is off and writes go on."""

import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time

import procs
import pytest

import lite_counters
import lite_db


@pytest.fixture
def counting(db_path, other):
    other.execute("INSERT INTO counters VALUES ('hits', 0, 0)")
    return db_path


def _in_turn(args):
    """procs.write_in_turn in one process per (delay, hold[, budget]), started together."""
    ready = procs.barrier(len(args) + 1)
    running, results = procs.start(procs.write_in_turn, [(a[0], ready, *a[1:]) for a in args])
    ready.wait(60)
    return running, results


def test_transactions_take_the_lock_in_the_order_they_asked(counting):
    # One holds the lock 0.6 s; five more ask for it 80 ms apart meanwhile.
    args = [(counting, 0.0, 0.6)] + [(counting, 0.2 + 0.08 * i, 0.02) for i in range(5)]
    began = procs.finish(*_in_turn(args), timeout_s=60)
    assert None not in began
    assert began == sorted(began), began  # first come, first served
    assert began[1] >= began[0] + 0.6  # and none before the holder had finished


def test_each_wait_in_the_line_stays_within_the_budget(counting):
    outsider = sqlite3.connect(counting, isolation_level=None)
    outsider.execute("BEGIN EXCLUSIVE")  # holds the lock past every budget
    try:
        running, results = _in_turn([(counting, 0.02 * i, 0.0, 500) for i in range(4)])
        now = time.monotonic()
        began = procs.finish(running, results, timeout_s=60)
        finished = time.monotonic()
    finally:
        outsider.execute("ROLLBACK")
        outsider.close()
    assert began == [None] * 4  # each refused...
    assert finished - now < 0.5 + 1.0  # ...after one budget, not one per place in line


def test_a_process_that_dies_holding_its_place_does_not_stop_the_line(counting):
    holder, _ = _in_turn([(counting, 0.0, 30.0)])
    waiting = _in_turn([(counting, 0.5, 0.0)])
    time.sleep(1.5)  # the holder holds the lock and its place; the other waits behind it
    holder[0].kill()  # SIGKILL, by PID
    killed_at = time.monotonic()
    (began,) = procs.finish(*waiting, timeout_s=60)
    assert began is not None and began - killed_at < 0.5
    holder[0].join(10)


def test_without_its_file_the_queue_is_off_and_writes_go_on(counting, caplog):
    lite_db.close_all()
    os.remove(counting + lite_db.QUEUE_SUFFIX)
    os.mkdir(counting + lite_db.QUEUE_SUFFIX)  # the file cannot be opened
    cur = lite_db.cursor(counting)
    with caplog.at_level(logging.WARNING, logger="lite_db"):
        assert lite_db.write(cur, lambda cur: lite_counters.increment(cur, "hits")) == (
            "hits",
            1,
        )
    assert "write queue" in caplog.text and "is off" in caplog.text
    assert lite_counters.increment(cur, "hits") == ("hits", 2)


def test_processes_that_waited_in_line_leave_no_wal_behind_at_exit(db_path):
    """The last connection to close removes -wal and -shm, a helper thread or not.

    The waiter (whose wait went through the helper thread) closes last, half
    a second after the holder: two connections closing at the same moment
    may each see the other still open, and SQLite then leaves the files.
    """
    code = (
        "import sys, time, lite_db\n"
        "cur = lite_db.cursor(sys.argv[1])\n"
        "time.sleep(float(sys.argv[2]))\n"
        "lite_db.write(cur, lambda c: (c.execute('SELECT 1'), time.sleep(float(sys.argv[3]))))\n"
        "time.sleep(float(sys.argv[4]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}

    def python(*args):
        return subprocess.Popen([sys.executable, "-c", code, db_path, *args], env=env)

    holder, waiter = python("0", "0.8", "0"), python("0.3", "0", "0.5")  # the waiter queues
    try:
        assert holder.wait(30) == 0 and waiter.wait(30) == 0
    finally:
        for process in (holder, waiter):
            if process.poll() is None:
                process.kill()  # by PID
                process.wait(10)
    assert os.path.exists(db_path + lite_db.QUEUE_SUFFIX)  # they did queue
    assert not os.path.exists(db_path + "-wal") and not os.path.exists(db_path + "-shm")


def test_a_wait_left_behind_a_stalled_place_does_not_hold_up_the_next(db_path, monkeypatch):
    """A place held and never given up (a stopped process): the one behind it
    waits its budget once; the connection's next wait is not stuck behind that."""
    monkeypatch.setattr(lite_db, "LOCK_BUDGET_MS", 500)
    stalled, blocker = lite_db.WriteQueue(db_path), lite_db.WriteQueue(db_path)
    cur = lite_db.cursor(db_path)
    lite_db.write(cur, lambda c: c.execute("CREATE TABLE t (x)"))
    try:
        assert stalled.enter(time.monotonic() + 1)  # holds its place from now on
        began = time.monotonic()
        lite_db.write(cur, lambda c: c.execute("INSERT INTO t VALUES (1)"))
        assert time.monotonic() - began >= 0.45  # waited its budget behind it, then wrote
        assert blocker.enter(time.monotonic() + 1)  # next in line, for 0.2 s
        threading.Timer(0.2, blocker.leave).start()
        began = time.monotonic()
        lite_db.write(cur, lambda c: c.execute("INSERT INTO t VALUES (2)"))
        assert time.monotonic() - began < 0.45  # woken when the blocker left
    finally:
        stalled.close()
        blocker.close()
