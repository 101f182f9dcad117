"""Real concurrency without a web server: 20 OS processes on one database file."""

import os
import time

import procs
import pytest
import webtest

import lite_app
import lite_db

PROCESSES = 20
INCREMENTS = 50  # per process

pytestmark = pytest.mark.slow


def _increment_through_the_app(db_path, config_path, gate, count):
    """One server process: its own app, `count` POSTs; (status, value) of each."""
    app = webtest.TestApp(lite_app.make_app(db_path=db_path, config_path=config_path))
    gate.wait(60)
    outcomes = []
    for _ in range(count):
        res = app.post("/lite/inc", {"counter": "hits"}, expect_errors=True)
        outcomes.append((res.status_int, res.json.get("value")))
    return outcomes


def _add_one_by_read_modify_write(db_path, gate, count):
    cur = lite_db.cursor(db_path)
    gate.wait(60)
    return [lite_db.update_counter(cur, "hits", lambda v: v + 1) for _ in range(count)]


def _check_exact(other, outcomes):
    flat = [outcome for one_process in outcomes for outcome in one_process]
    assert [status for status, _ in flat if status != 200] == []
    values = sorted(value for _, value in flat)
    assert values == list(range(1, PROCESSES * INCREMENTS + 1))  # each ack distinct
    final = other.execute("SELECT value FROM counters WHERE name = 'hits'").fetchone()[0]
    assert final == PROCESSES * INCREMENTS
    assert other.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_20_processes_increment_exactly(db_path, config_path, other, app):
    app.get("/lite", status=200)  # config applied before the race
    gate = procs.event()
    args = [(db_path, str(config_path), gate, INCREMENTS)] * PROCESSES
    running = procs.start(_increment_through_the_app, args)
    gate.set()
    _check_exact(other, procs.finish(*running, timeout_s=180))


def test_20_processes_read_modify_write_through_transact_lose_nothing(db_path, other, app):
    app.get("/lite", status=200)
    gate = procs.event()
    running = procs.start(_add_one_by_read_modify_write, [(db_path, gate, INCREMENTS)] * PROCESSES)
    gate.set()
    results = procs.finish(*running, timeout_s=180)
    assert [r for one in results for r in one if r is False or r is None] == []
    _check_exact(other, [[(200, v) for v in one] for one in results])


def test_config_changed_under_load_is_applied_once_per_version(db_path, config_path, other, app):
    app.get("/lite", status=200)
    gate = procs.event()
    args = [(db_path, str(config_path), gate, INCREMENTS)] * PROCESSES
    running = procs.start(_increment_through_the_app, args)
    gate.set()
    versions = 0
    base = time.time_ns() - 3600 * 10**9
    while any(proc.is_alive() for proc in running[0]) and versions < 200:
        versions += 1
        if versions % 2:  # a plain touch
            stamp = base + versions * 10**9
            os.utime(config_path, ns=(stamp, stamp))
        else:  # a new value for the counter nobody increments
            tmp = config_path.with_suffix(".tmp")
            tmp.write_text(f"[counters]\nhits = 0\nmisses = {versions}\n")
            stamp = base + versions * 10**9
            os.utime(tmp, ns=(stamp, stamp))
            os.replace(tmp, config_path)  # atomic, as README asks
        time.sleep(0.05)
    outcomes = procs.finish(*running, timeout_s=180)
    app.get("/lite", status=200)  # a last request sees the last version
    _check_exact(other, outcomes)

    audit = other.execute("SELECT fingerprint, pid FROM config_audit ORDER BY id").fetchall()
    fingerprints = [fingerprint for fingerprint, _ in audit]
    assert len(fingerprints) == len(set(fingerprints)), "a version was applied twice"
    assert len(audit) >= 3, "the test did not exercise config changes under load"
    assert len({pid for _, pid in audit}) >= 2, "only one process ever applied a change"
    stored = other.execute("SELECT fingerprint FROM config_state").fetchone()[0]
    assert stored == fingerprints[-1]
    assert stored.startswith(f"{os.stat(config_path).st_mtime_ns}-")
    misses = other.execute("SELECT value FROM counters WHERE name = 'misses'").fetchone()[0]
    expected = versions if versions % 2 == 0 else versions - 1
    assert misses == expected
