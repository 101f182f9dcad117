"""One connection per process and thread: threaded servers, thread-per-request
servers, and threads in several processes at once, all exact."""

import os
import threading

import procs
import pytest
import webtest

import lite_app
import lite_db

PROCESSES = 4
THREADS = 8
INCREMENTS = 25  # per thread


def _in_threads(count, target):
    """Run target(index) in `count` threads at once; their results, in order."""
    results = [None] * count
    errors = []
    start = threading.Barrier(count)

    def run(index):
        try:
            start.wait(30)
            results[index] = target(index)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive(), "a thread did not finish"
    assert not errors, errors[:3]
    return results


def test_each_thread_gets_its_own_connection(db_path):
    conns = _in_threads(4, lambda _: lite_db.connect(db_path))
    assert len({id(conn) for conn in conns}) == 4
    assert all(conn.pid == os.getpid() for conn in conns)
    assert lite_db.connect(db_path) not in conns


def test_a_connection_is_used_from_its_own_thread_only(db_path):
    conn = lite_db.connect(db_path)
    # Another thread asking for the same path gets another connection; the
    # first one, still its thread's, stays open.
    other = _in_threads(1, lambda _: lite_db.connect(db_path))[0]
    assert other is not conn
    assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_connections_of_ended_threads_are_closed_so_none_pile_up(app, db_path):
    """As Flask's development server does: a new thread for every request."""
    app.get("/lite/get", status=200)
    for _ in range(50):
        thread = threading.Thread(target=lambda: app.post("/lite/inc", status=200))
        thread.start()
        thread.join(30)
    # This thread's, and at most the last request thread's (closed by the next opener).
    assert lite_db.figures()["connections"] <= 2
    assert app.get("/lite/get", status=200).json["value"] == 50
    assert lite_db.figures()["writes"] >= 50  # the closed connections' figures are kept


def test_threads_of_one_process_increment_exactly(app, other, db_path):
    app.get("/lite/get", status=200)

    def increment(_):
        values = [app.post("/lite/inc", status=200).json["value"] for _ in range(INCREMENTS)]
        return values, lite_db.connect(db_path).thread is threading.current_thread()

    results = _in_threads(THREADS, increment)
    acked = sorted(value for values, _ in results for value in values)
    assert acked == list(range(1, THREADS * INCREMENTS + 1))
    assert all(own for _, own in results)  # each thread used a connection of its own


def _threads_through_the_app(db_path, config_path, gate):
    app = webtest.TestApp(lite_app.make_app(db_path=db_path, config_path=config_path))
    gate.wait(60)
    values = _in_threads(
        THREADS,
        lambda _: [
            app.post("/lite/inc", {"counter": "hits"}, status=200).json["value"]
            for _ in range(INCREMENTS)
        ],
    )
    return [value for one in values for value in one]


@pytest.mark.slow
def test_4_processes_of_8_threads_increment_exactly(db_path, config_path, app, other):
    app.get("/lite", status=200)  # config applied before the race
    gate = procs.event()
    running = procs.start(_threads_through_the_app, [(db_path, str(config_path), gate)] * PROCESSES)
    gate.set()
    acked = sorted(v for one in procs.finish(*running, timeout_s=180) for v in one)
    total = PROCESSES * THREADS * INCREMENTS
    assert acked == list(range(1, total + 1))  # every ack distinct, none lost
    assert other.execute("SELECT value FROM counters WHERE name = 'hits'").fetchone()[0] == total
    assert other.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
