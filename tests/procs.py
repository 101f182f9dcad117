"""Real OS processes for concurrency tests: bounded in time, stopped by PID.

Children are started with "spawn", so that none inherits the test process's
SQLite connections or its SQLite locking state (which fork would copy).
"""

import multiprocessing
import os
import queue
import time

import lite_counters
import lite_db

_ctx = multiprocessing.get_context("spawn")


def _run(target, args, results, index):
    results.put((index, target(*args)))


def event():
    """An event that processes from start() can wait on: a common start line."""
    return _ctx.Event()


def barrier(parties):
    """A barrier for processes from start() (and the test): all ready before the clock starts."""
    return _ctx.Barrier(parties)


def times(size):
    """A shared array of `size` doubles (no lock): a child's recent time.monotonic()s."""
    return _ctx.Array("d", size, lock=False)


def start(target, args_list):
    """Start one process per args tuple; returns (processes, results queue)."""
    results = _ctx.Queue()
    procs = [
        _ctx.Process(target=_run, args=(target, args, results, index), daemon=True)
        for index, args in enumerate(args_list)
    ]
    for proc in procs:
        proc.start()
    return procs, results


def finish(procs, results, timeout_s):
    """Each process's return value, in start order.

    Fails if any process has not returned within `timeout_s`; every process
    still running then is killed by its PID.
    """
    deadline = time.monotonic() + timeout_s
    values = {}
    try:
        while len(values) < len(procs):
            remaining = deadline - time.monotonic()
            try:
                index, value = results.get(timeout=max(0.01, remaining))
            except queue.Empty:
                raise AssertionError(
                    f"{len(procs) - len(values)} of {len(procs)} processes "
                    f"did not finish within {timeout_s} s"
                ) from None
            values[index] = value
    finally:
        for proc in procs:
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    return [values[index] for index in range(len(procs))]


def run(target, args_list, timeout_s=120):
    """Run target(*args) in one process per args tuple; their results in order."""
    procs, results = start(target, args_list)
    return finish(procs, results, timeout_s)


def increment_until(db_path, stop_at, pause_s=0.0):
    """Increment "hits" through lite_db until time.time() reaches stop_at.

    pause_s: a sleep after each increment, as a web request's other work
    would leave; 0 is a tight loop. Returns (done, failed, WAL restarts
    this process ran).
    """
    cur = lite_db.cursor(db_path)
    done = failed = 0
    while time.time() < stop_at:
        try:
            lite_counters.increment(cur, "hits", 1)
            done += 1
        except lite_db.Unavailable:
            failed += 1
        if pause_s:
            time.sleep(pause_s)
    return done, failed, lite_db.figures()["wal_restarts"]


def open_database(db_path):
    """Open db_path as a process started now would: None, or why it was refused."""
    try:
        lite_db.connect(db_path, create=False)
    except lite_db.Unavailable as exc:
        return str(exc)
    return None


def increment_once_more_after(db_path, go):
    """Increment "hits", wait for `go`, try once more: whether that was refused."""
    cur = lite_db.cursor(db_path, create=False)
    lite_counters.increment(cur, "hits")
    go.wait(timeout=30)
    try:
        lite_counters.increment(cur, "hits")
    except lite_db.Unavailable:
        return True
    return False


def write_in_turn(db_path, ready, delay_s, hold_s, budget_ms=None):
    """Once all are `ready`, after `delay_s`, one write transaction holding the lock `hold_s`.

    Returns time.monotonic() as its work began, or None if it was refused.
    """
    if budget_ms is not None:
        lite_db.LOCK_BUDGET_MS = budget_ms
    cur = lite_db.cursor(db_path)
    ready.wait(60)
    time.sleep(delay_s)

    def work(cur):
        began = time.monotonic()
        cur.execute("UPDATE counters SET value = value + 1 WHERE name = 'hits'")
        time.sleep(hold_s)
        return began

    try:
        return lite_db.write(cur, work)
    except lite_db.Unavailable:
        return None


def increment_and_record_flushes(db_path, ready, writes, flush_delay_s):
    """`writes` increments through lite_db with group commit, each flush taking `flush_delay_s`.

    Returns (values acknowledged, [(start, end) of each flush this process
    made], [(commit returned, acknowledged) of each write]), in
    time.monotonic() seconds: one clock for every process of the machine.
    """
    os.environ["LITE_SYNCHRONOUS"] = "GROUP"
    flushes, waits = [], []
    fdatasync, wait = os.fdatasync, lite_db.GroupCommit.wait

    def slow_fdatasync(fd):
        began = time.monotonic()
        fdatasync(fd)
        time.sleep(flush_delay_s)
        flushes.append((began, time.monotonic()))

    def recorded_wait(self, deadline):
        began = time.monotonic()
        wait(self, deadline)
        waits.append((began, time.monotonic()))

    os.fdatasync = slow_fdatasync
    lite_db.GroupCommit.wait = recorded_wait
    cur = lite_db.cursor(db_path)
    ready.wait(60)
    values = [lite_counters.increment(cur, "hits", 1)[1] for _ in range(writes)]
    return values, flushes, waits


def increment_logging_group_commit(db_path, ready, writes, flush_delay_s, log_path, stall_s=0.0):
    """Increments with group commit, logging each step to `log_path` as it happens.

    Each flush takes `flush_delay_s`. Lines, appended whole (O_APPEND),
    times in time.monotonic() seconds: "named PID", "began PID T",
    "flushed PID BEGAN ENDED", "acked PID COMMITTED ACKED VALUE". `writes`
    None: until killed. `stall_s`: once named, this process stalls that long
    after the flush under way ends, before its own begins (a moment in
    which to kill a named writer). Returns the values acknowledged.
    """
    os.environ["LITE_SYNCHRONOUS"] = "GROUP"
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pid = os.getpid()
    fdatasync, wait = os.fdatasync, lite_db.GroupCommit.wait
    named, sleep_until_free = lite_db.GroupCommit._named, lite_db._sleep_until_free
    state = {"named": False, "committed": 0.0}

    def line(*fields):
        os.write(log, (" ".join(map(str, fields)) + "\n").encode())

    def slow_fdatasync(fd):
        began = time.monotonic()
        line("began", pid, began)
        fdatasync(fd)
        time.sleep(flush_delay_s)
        line("flushed", pid, began, time.monotonic())

    def logged_named(self, fd, lock):
        state["named"] = True
        step = named(self, fd, lock)
        line("named", pid)
        return step

    def stalling_sleep(fd, byte):
        succeeded = sleep_until_free(fd, byte)
        if state["named"]:
            state["named"] = False
            time.sleep(stall_s)
        return succeeded

    def timed_wait(self, deadline):
        state["committed"] = time.monotonic()
        wait(self, deadline)

    os.fdatasync = slow_fdatasync
    lite_db.GroupCommit._named = logged_named
    lite_db._sleep_until_free = stalling_sleep
    lite_db.GroupCommit.wait = timed_wait
    cur = lite_db.cursor(db_path)
    ready.wait(60)
    values = []
    while writes is None or len(values) < writes:
        value = lite_counters.increment(cur, "hits", 1)[1]
        line("acked", pid, state["committed"], time.monotonic(), value)
        values.append(value)
    return values
