"""Real concurrency without a web server: 20 OS processes on one database file."""

import os
import time

import history
import procs
import pytest
import webtest

import lite_app
import lite_counters
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
    return [lite_counters.update_counter(cur, "hits", lambda v: v + 1) for _ in range(count)]


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


def _value(other):
    return other.execute("SELECT value FROM counters WHERE name = 'hits'").fetchone()[0]


def _audit(other):
    return [
        row[0] for row in other.execute("SELECT fingerprint FROM lite_config_audit ORDER BY id")
    ]


def _write_version(config_path, text, stamp_ns):
    """Replace config.ini atomically, as README asks, dated `stamp_ns` (past the settle time)."""
    tmp = config_path.with_suffix(".tmp")
    tmp.write_text(text)
    os.utime(tmp, ns=(stamp_ns, stamp_ns))
    os.replace(tmp, config_path)


def _acked_values(outcomes):
    flat = [outcome for one_process in outcomes for outcome in one_process]
    assert [status for status, _ in flat if status != 200] == []
    return [value for _, value in flat]


@pytest.mark.parametrize("change", ["touch", "new value"])
def test_a_version_applied_under_load_resets_the_counter_once(
    db_path, config_path, other, app, change
):
    app.get("/lite", status=200)  # config applied before the race: hits = 0
    start, audit_before = _value(other), len(_audit(other))
    gate = procs.event()
    running = procs.start(
        _increment_through_the_app, [(db_path, str(config_path), gate, INCREMENTS)] * PROCESSES
    )
    gate.set()
    deadline = time.monotonic() + 120
    while _value(other) < PROCESSES * INCREMENTS // 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    stamp = time.time_ns() - 3600 * 10**9
    if change == "touch":  # c = s: the two runs overlap
        configured = start
        os.utime(config_path, ns=(stamp, stamp))
    else:  # c far above s: the two runs lie apart
        configured = 10**9
        _write_version(config_path, f"[counters]\nhits = {configured}\nmisses = 0\n", stamp)
    values = _acked_values(procs.finish(*running, timeout_s=180))
    final = _value(other)
    assert len(_audit(other)) == audit_before + 1, "not applied exactly once during the load"
    assert len(values) == PROCESSES * INCREMENTS
    assert configured < final < configured + len(values), "the reset did not show"
    history.check_runs(values, [start, configured], final)
    assert other.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_config_changed_under_load_is_applied_once_per_version(db_path, config_path, other, app):
    app.get("/lite", status=200)
    audit_before = len(_audit(other))
    gate = procs.event()
    running = procs.start(
        _increment_through_the_app, [(db_path, str(config_path), gate, INCREMENTS)] * PROCESSES
    )
    gate.set()
    # Each new content sets hits far from every other, so each version's run
    # of values is its own; a touch keeps the value and starts an overlapping run.
    configured = {}  # mtime of each version written -> the value it sets hits to
    versions, hits = 0, 0
    base = time.time_ns() - 3600 * 10**9
    while any(proc.is_alive() for proc in running[0]) and versions < 200:
        versions += 1
        stamp = base + versions * 10**9
        if versions % 2:  # a plain touch
            os.utime(config_path, ns=(stamp, stamp))
        else:
            hits = versions * 10**6
            _write_version(config_path, f"[counters]\nhits = {hits}\nmisses = {versions}\n", stamp)
        configured[stamp] = hits
        time.sleep(0.05)
    values = _acked_values(procs.finish(*running, timeout_s=180))
    app.get("/lite", status=200)  # a last request sees the last version

    audit = _audit(other)[audit_before:]
    assert len(audit) == len(set(audit)), "a version was applied twice"
    assert len(audit) >= 3, "the test did not exercise config changes under load"
    pids = {row[0] for row in other.execute("SELECT pid FROM lite_config_audit")}
    assert len(pids) >= 2, "only one process ever applied a change"
    stored = other.execute("SELECT fingerprint FROM lite_config_state").fetchone()[0]
    assert stored == audit[-1]
    assert stored.startswith(f"{os.stat(config_path).st_mtime_ns}-")
    # k versions applied: k + 1 runs of values, each from its version's value.
    resets = [configured[int(fingerprint.split("-")[0])] for fingerprint in audit]
    history.check_runs(values, [0, *resets], _value(other))
    misses = other.execute("SELECT value FROM counters WHERE name = 'misses'").fetchone()[0]
    assert misses == (versions if versions % 2 == 0 else versions - 1)
    assert other.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
