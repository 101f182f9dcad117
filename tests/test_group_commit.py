"""Group commit (LITE_SYNCHRONOUS=GROUP): a write returns once a flush of the WAL
that began after its commit has finished; one flush serves many commits."""

import errno
import itertools
import os
import signal
import threading
import time

import procs
import pytest

import lite_counters
import lite_db


@pytest.fixture
def group(monkeypatch):
    monkeypatch.setenv("LITE_SYNCHRONOUS", "GROUP")


@pytest.fixture
def hits(other):
    other.execute("INSERT INTO counters VALUES ('hits', 0, 0)")
    return other


def synchronous(conn):
    return conn.execute("PRAGMA synchronous").fetchone()[0]


def test_lite_commits_under_normal_and_other_connections_get_full(group, db_path):
    conn = lite_db.connect(db_path)
    assert synchronous(conn) == 1  # NORMAL: lite's write path waits for the flush itself
    assert conn.group_commit is not None
    # A connection whose commits lite does not see (lite_django's, lite_sqlalchemy's).
    plain = lite_db.sqlite3.connect(db_path)
    lite_db.apply_pragmas(plain, lite_db.Figures())
    assert synchronous(plain) == 2  # FULL
    plain.close()


def test_other_modes_have_no_group_commit(monkeypatch, db_path):
    monkeypatch.setenv("LITE_SYNCHRONOUS", "FULL")
    conn = lite_db.connect(db_path)
    assert synchronous(conn) == 2 and conn.group_commit is None
    monkeypatch.setenv("LITE_SYNCHRONOUS", "SOMETIMES")
    with pytest.raises(ValueError, match="GROUP"):
        lite_db.connect(db_path + "2")


def test_a_write_returns_after_a_flush_of_the_wal(group, db_path, hits, monkeypatch):
    flushed = []
    fdatasync = os.fdatasync

    def recorded(fd):
        flushed.append((os.readlink(f"/proc/self/fd/{fd}"), hits_now()))
        fdatasync(fd)

    def hits_now():
        return hits.execute("SELECT value FROM counters WHERE name = 'hits'").fetchone()[0]

    monkeypatch.setattr(os, "fdatasync", recorded)
    cur = lite_db.cursor(db_path)
    before = lite_db.figures()["flushes"]
    assert lite_counters.increment(cur, "hits") == ("hits", 1)
    assert lite_counters.increment(cur, "hits") == ("hits", 2)
    # Each flushed the -wal after its commit was in (the flush saw it).
    assert flushed == [(db_path + "-wal", 1), (db_path + "-wal", 2)]
    assert lite_db.figures()["flushes"] - before == 2


def test_one_flush_at_a_time_serves_every_commit_before_it(group, db_path, hits):
    """6 processes, each flush taking 5 ms: flushes never overlap, each write
    returns only after a flush that began after its commit, and a flush
    serves several commits."""
    processes, writes = 6, 40
    ready = procs.barrier(processes)
    results = procs.run(
        procs.increment_and_record_flushes,
        [(db_path, ready, writes, 0.005)] * processes,
        timeout_s=120,
    )
    values = sorted(v for acked, _, _ in results for v in acked)
    assert values == list(range(1, processes * writes + 1))
    flushes = sorted(f for _, made, _ in results for f in made)
    waits = [w for _, _, waited in results for w in waited]
    assert len(waits) == processes * writes
    for (_, end), (start, _) in itertools.pairwise(flushes):
        assert start >= end, "two flushes at once"
    for committed, acknowledged in waits:
        assert any(committed <= start and end <= acknowledged for start, end in flushes), (
            "a write acknowledged before a flush that began after its commit"
        )
    assert len(flushes) <= len(waits) / 2, f"{len(flushes)} flushes for {len(waits)} commits"


def test_threads_share_flushes_and_lose_nothing(group, db_path, hits):
    threads, writes = 8, 50
    acked = []

    def work():
        cur = lite_db.cursor(db_path)
        for _ in range(writes):
            acked.append(lite_counters.increment(cur, "hits")[1])

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert sorted(acked) == list(range(1, threads * writes + 1))
    assert 0 < lite_db.figures()["flushes"] <= threads * writes


def test_a_failed_flush_is_never_an_acknowledgement(group, db_path, hits, monkeypatch):
    cur = lite_db.cursor(db_path)
    lite_counters.increment(cur, "hits")

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(lite_db.OutcomeUnknown, match="not known to be on disk"):
        lite_counters.increment(cur, "hits")
    monkeypatch.undo()
    # The commit is in, but every process now refuses writes until the
    # database is checked and restored: the disk may have dropped the WAL's pages.
    assert hits.execute("SELECT value FROM counters").fetchone()[0] == 2
    assert os.path.exists(lite_db.refusal_marker(db_path))
    with pytest.raises(lite_db.Unavailable, match="a flush of the WAL failed"):
        lite_counters.increment(cur, "hits")
    assert procs.run(procs.open_database, [(db_path,)])[0] is not None


def test_a_flush_that_does_not_finish_in_time_is_outcome_unknown(group, db_path, hits, monkeypatch):
    monkeypatch.setattr(lite_db, "LOCK_BUDGET_MS", 200)
    cur = lite_db.cursor(db_path)
    lite_counters.increment(cur, "hits")
    # Other connections holding both flush locks, for ever.
    holder = os.open(db_path + lite_db.QUEUE_SUFFIX, os.O_RDWR)
    try:
        for lock in lite_db._GROUP_FLUSH_LOCKS:
            lite_db._ofd_lock(holder, lite_db.fcntl.F_OFD_SETLK, lite_db.fcntl.F_WRLCK, lock)
        with pytest.raises(lite_db.OutcomeUnknown):
            lite_counters.increment(cur, "hits")
    finally:
        os.close(holder)
    # Not a disk failure: nothing refused, the next write is acknowledged.
    assert not os.path.exists(lite_db.refusal_marker(db_path))
    assert lite_counters.increment(cur, "hits") == ("hits", 3)


def test_the_app_answers_502_when_the_disk_does_not_confirm(group, app, monkeypatch):
    app.post("/lite/inc", {"counter": "hits"}, status=200)

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    res = app.post("/lite/inc", {"counter": "hits"}, status=502)
    assert "outcome unknown" in res.json["error"]
    assert "Traceback" not in res.text and "Retry-After" not in res.headers


def test_a_flush_whose_flusher_died_is_led_by_the_next_writer(group, db_path, hits):
    cur = lite_db.cursor(db_path)
    lite_counters.increment(cur, "hits")
    # A flush recorded under way, its flusher gone (the flush lock free).
    queue_file = os.open(db_path + lite_db.QUEUE_SUFFIX, os.O_RDWR)
    try:
        taken = int.from_bytes(os.pread(queue_file, 8, 8), "little")
        os.pwrite(queue_file, (taken + 5).to_bytes(8, "little"), 24)
    finally:
        os.close(queue_file)
    before = lite_db.figures()["flushes"]
    assert lite_counters.increment(cur, "hits") == ("hits", 2)
    assert lite_db.figures()["flushes"] == before + 1


def test_a_flush_whose_named_leader_died_is_led_by_the_next_writer(group, db_path, hits):
    cur = lite_db.cursor(db_path)
    lite_counters.increment(cur, "hits")
    # A flush under way and one named to lead the next, both gone (both locks free).
    queue_file = os.open(db_path + lite_db.QUEUE_SUFFIX, os.O_RDWR)
    try:
        raw = os.pread(queue_file, lite_db._GROUP_STATE.size, lite_db._GROUP_TAKEN_AT)
        taken, flushed, _, _, current = lite_db._GROUP_STATE.unpack(raw)
        named = 2 - current  # the other flush lock, numbered from 1
        state = lite_db._GROUP_STATE.pack(taken, flushed, taken + 5, named, current)
        os.pwrite(queue_file, state, lite_db._GROUP_TAKEN_AT)
        named_lock = lite_db._GROUP_FLUSH_LOCKS[named - 1]
        os.pwrite(queue_file, b"\0", lite_db._GROUP_SUCCEEDED[named_lock])  # as naming does
    finally:
        os.close(queue_file)
    before = lite_db.figures()["flushes"]
    assert lite_counters.increment(cur, "hits") == ("hits", 2)
    assert lite_db.figures()["flushes"] == before + 1
    assert lite_counters.increment(cur, "hits") == ("hits", 3)


def test_writers_killed_flushing_or_named_hold_no_one_up(group, db_path, hits, tmp_path):
    """Two writers SIGKILLed, one in the middle of its flush, one named to
    lead the next: the four others take their places, make every write, and
    each of theirs is acknowledged only after a flush that began after its
    commit; flushes never overlap."""
    log_path = str(tmp_path / "steps.log")
    ready = procs.barrier(7)  # six writers and this test
    survivors, results = procs.start(
        procs.increment_logging_group_commit, [(db_path, ready, 80, 0.005, log_path)] * 4
    )
    victims, _ = procs.start(
        procs.increment_logging_group_commit, [(db_path, ready, None, 0.2, log_path, 0.2)] * 2
    )
    flusher, named = victims
    kill_at = (("flusher", flusher, "began"), ("named", named, "named"))
    killed = {}

    def steps():
        with open(log_path) as f:
            return [line.split() for line in f.read().split("\n")[:-1]]  # whole lines only

    try:
        ready.wait(60)
        deadline = time.monotonic() + 60
        while len(killed) < 2 and time.monotonic() < deadline:
            for kind, pid, *_ in steps():
                for role, victim, step in kill_at:
                    if kind == step and int(pid) == victim.pid and role not in killed:
                        os.kill(victim.pid, signal.SIGKILL)
                        killed[role] = victim.pid
            time.sleep(0.001)
        values = procs.finish(survivors, results, timeout_s=120)
    finally:
        for victim in victims:
            victim.kill()  # by PID
            victim.join(10)
    assert set(killed) == {"flusher", "named"}
    log = steps()
    last_step = {pid: [kind for kind, p, *_ in log if int(p) == pid][-1] for pid in killed.values()}
    assert last_step == {flusher.pid: "began", named.pid: "named"}, "not killed where meant"
    flushes = sorted((float(s[2]), float(s[3])) for s in log if s[0] == "flushed")
    for (_, ended), (began, _) in itertools.pairwise(flushes):
        assert began >= ended, "two flushes at once"
    survivor_pids = {str(p.pid) for p in survivors}
    acks = [(float(s[2]), float(s[3])) for s in log if s[0] == "acked" and s[1] in survivor_pids]
    assert len(acks) == 4 * 80
    for committed, acknowledged in acks:
        assert any(committed <= b and e <= acknowledged for b, e in flushes), (
            "a write acknowledged before a flush that began after its commit"
        )
    acked = [v for survivor in values for v in survivor]
    assert len(set(acked)) == len(acked) == 4 * 80
    assert max(acked) <= hits.execute("SELECT value FROM counters").fetchone()[0]


def test_stats_say_group(group, app):
    assert app.get("/lite/stats").json["database"]["synchronous"] == "GROUP"
