"""/metrics: Prometheus text format, requests counted by route pattern, the
core's events fed in, totals that survive processes killed under load, and
folds of dead processes' files that a kill in the middle cannot spoil.

Processes share PROMETHEUS_MULTIPROC_DIR (set by conftest), as daemons do."""

import itertools
import os
import subprocess
import sys
import time

import procs
import pytest
import webtest
from prometheus_client.parser import text_string_to_metric_families

import lite_app
import lite_metrics

DIRECTORY = os.environ["PROMETHEUS_MULTIPROC_DIR"]


def samples(app):
    """{(sample name, sorted labels): value} of one scrape."""
    res = app.get("/metrics", status=200)
    assert res.headers["Content-Type"] == lite_metrics.CONTENT_TYPE
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(res.text)
        for sample in family.samples
    }


def requests(scrape, route, method, status):
    key = ("lite_http_requests_total", (("method", method), ("route", route), ("status", status)))
    return scrape.get(key, 0)


def test_metrics_lists_every_figure_once_with_its_type(app):
    app.post("/lite/inc", {"counter": "hits"}, status=200)
    text = app.get("/metrics", status=200).text
    for name, kind in [
        ("lite_http_requests", "counter"),
        ("lite_http_request_duration_seconds", "histogram"),
        ("lite_db_writes", "counter"),
        ("lite_db_write_failures", "counter"),
        ("lite_db_busy_retries", "counter"),
        ("lite_config_versions_applied", "counter"),
        ("lite_config_versions_rejected", "counter"),
        ("lite_db_checkpoints", "counter"),
        ("lite_db_wal_restarts", "counter"),
        ("lite_db_write_lock_wait_seconds", "histogram"),
        ("lite_db_bytes", "gauge"),
        ("lite_db_wal_bytes", "gauge"),
        ("lite_processes", "gauge"),
    ]:
        if kind == "counter":
            name += "_total"
        assert text.count(f"# TYPE {name} {kind}\n") == 1, name
    assert "pid=" not in text  # no series per process


def test_requests_are_counted_by_route_pattern_method_and_status(app):
    app.get("/lite/get", status=200)  # the first request applies config.ini: writes
    before = samples(app)
    app.get("/lite/get?counter=nope", status=404)
    app.post("/lite/inc", {"counter": "hits"}, status=200)
    app.get("/no/such/path/123", status=404)
    webtest.TestApp(app.app, lint=False).request("/lite/get", method="BREW", status=405)
    after = samples(app)
    for route, method, status in [
        ("/lite/get", "GET", "404"),
        ("/lite/inc", "POST", "200"),
        ("unmatched", "GET", "404"),
        ("unmatched", "other", "405"),
    ]:
        assert requests(after, route, method, status) == requests(before, route, method, status) + 1
    assert not [key for key in after if "/no/such" in str(key) or "BREW" in str(key)]
    count = ("lite_http_request_duration_seconds_count", (("route", "/lite/get"),))
    assert after[count] == before[count] + 1
    writes = ("lite_db_writes_total", ())
    assert after[writes] == before[writes] + 1
    waits = ("lite_db_write_lock_wait_seconds_count", ())
    assert after[waits] == before[waits] + 1  # one observation per write
    assert after[("lite_db_bytes", ())] == os.path.getsize(app.app.config["lite.plugin"].database)


def test_metrics_and_live_answer_without_the_database(tmp_path, config_path):
    app = webtest.TestApp(
        lite_app.make_app(db_path=str(tmp_path / "missing.db"), config_path=str(config_path))
    )
    app.get("/lite/health", status=503)
    scrape = samples(app)
    assert scrape[("lite_db_bytes", ())] == 0
    assert requests(scrape, "/lite/health", "GET", "503") >= 1
    assert not (tmp_path / "missing.db").exists()


# A process killed loses the counts it queued since it last published; its
# publisher runs every PUBLISH_S, late by at most this much on a busy machine.
PUBLISHER_LATE_S = 0.25
RECENT = 4096  # answers each child remembers the time of


def _increment_until_killed(db_path, config_path, ready, answered_at):
    app = webtest.TestApp(lite_app.make_app(db_path=db_path, config_path=config_path))
    app.post("/lite/inc", {"counter": "hits"})
    ready.set()
    for count in itertools.count():
        app.post("/lite/inc", {"counter": "hits"})
        answered_at[count % RECENT] = time.monotonic()


def test_totals_never_fall_when_processes_are_killed_under_load(app, other, db_path, config_path):
    app.get("/lite/get", status=200)
    first = samples(app)
    ready = [procs.event() for _ in range(4)]
    answered_at = [procs.times(RECENT) for _ in ready]
    running, _ = procs.start(
        _increment_until_killed,
        [(db_path, str(config_path), *child) for child in zip(ready, answered_at, strict=True)],
    )
    scrapes = [first]
    unpublished = 0  # at most: what each child answered in its last publish period
    try:
        assert all(event.wait(60) for event in ready)
        for proc, times in zip(running, answered_at, strict=True):  # one killed every 0.3 s
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:
                scrapes.append(samples(app))
            killed_at = time.monotonic()
            proc.kill()
            proc.join(10)
            since = killed_at - lite_metrics.PUBLISH_S - PUBLISHER_LATE_S
            unpublished += sum(1 for at in times if at > since)
    finally:
        for proc in running:
            proc.kill()
            proc.join(10)
    scrapes.append(samples(app))
    for earlier, later in itertools.pairwise(scrapes):
        fell = {
            key: (value, later.get(key))
            for key, value in earlier.items()
            if not key[0].startswith(("lite_db_bytes", "lite_db_wal_bytes", "lite_processes"))
            and later.get(key, 0) < value
        }
        assert not fell
    committed = other.execute("SELECT value FROM counters WHERE name = 'hits'").fetchone()[0]
    counted = requests(scrapes[-1], "/lite/inc", "POST", "200") - requests(
        first, "/lite/inc", "POST", "200"
    )
    # Lost: the counts each child had not yet published, and a request
    # committed but not yet counted when its process was killed (one each).
    assert committed - unpublished - len(running) <= counted <= committed
    assert committed > 100
    assert scrapes[-1][("lite_processes", ())] == 1
    left = [name for name in os.listdir(DIRECTORY) if name.endswith(".db")]
    assert not [name for name in left if any(str(p.pid) in name for p in running)]


def _interrupt(monkeypatch, name, on_call):
    """Make lite_metrics' os.<name> raise on its on_call-th call, as a kill would stop it."""
    real = getattr(os, name)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == on_call:
            raise KeyboardInterrupt("killed here")
        return real(*args, **kwargs)

    monkeypatch.setattr(lite_metrics.os, name, interrupted)


@pytest.mark.parametrize(
    ("step", "name", "on_call"),
    [
        ("before the commit", "replace", 2),  # the journal is in place; the archive is not
        ("after the commit", "unlink", 1),  # the archive holds the dead files; they remain
    ],
)
def test_a_fold_interrupted_counts_every_dead_process_once(
    app, db_path, config_path, monkeypatch, step, name, on_call
):
    app.get("/lite/get", status=200)
    before = samples(app)
    code = (
        "import sys, webtest, lite_app\n"
        "app = webtest.TestApp(lite_app.make_app(db_path=sys.argv[1], config_path=sys.argv[2]))\n"
        "for _ in range(5): app.post('/lite/inc', {'counter': 'hits'})\n"
    )
    for _ in range(2):  # two processes that served and exited
        subprocess.run([sys.executable, "-c", code, db_path, str(config_path)], check=True)
    with monkeypatch.context() as patched:
        _interrupt(patched, name, on_call)
        with pytest.raises(KeyboardInterrupt):
            app.get("/metrics")
    for _ in range(2):  # the next scrape completes or undoes it; the one after is the same
        after = samples(app)
        assert requests(after, "/lite/inc", "POST", "200") == (
            requests(before, "/lite/inc", "POST", "200") + 10
        ), step
        timed = ("lite_http_request_duration_seconds_count", (("route", "/lite/inc"),))
        assert after[timed] == before.get(timed, 0) + 10, step
    assert not [n for n in os.listdir(DIRECTORY) if n.endswith((".next", ".folding"))]


def test_without_the_directory_a_process_counts_for_itself(db_path, config_path, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    code = (
        "import sys, webtest, lite_app\n"
        "app = webtest.TestApp(lite_app.make_app(db_path=sys.argv[1], config_path=sys.argv[2]))\n"
        "app.post('/lite/inc', {'counter': 'hits'})\n"
        "print(app.get('/metrics').text)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, db_path, str(config_path)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert 'lite_http_requests_total{method="POST",route="/lite/inc",status="200"} 1.0' in out
    assert "lite_processes 1.0" in out
    # The directory is read when process_metrics() runs, whenever prometheus_client was imported.
    late = tmp_path / "late"
    code = (
        "import os, sys, prometheus_client, lite_metrics\n"
        "os.environ['PROMETHEUS_MULTIPROC_DIR'] = sys.argv[1]\n"
        "lite_metrics.process_metrics().request('/lite/get', 'GET', 200, 0.001)\n"
        "print(os.getpid())\n"
    )
    pid = subprocess.run(
        [sys.executable, "-c", code, str(late)], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    entries = lite_metrics.read_file(str(late / f"counter_{pid}.db"))
    assert [value for key, value, _ in entries if "/lite/get" in key] == [1.0]
