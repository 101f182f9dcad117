"""lite_app on PostgreSQL (LITE_DATABASE_URL): the same routes, JSON and
statuses as on SQLite; 20 processes exact; config.ini applied once per
content across processes whose copies differ in mtime (two machines), a
touch not a version, `lite apply-config --again` forcing one; 503 when the
server cannot be reached; 502, never 503, when a commit's outcome is unknown."""

import os
import subprocess
import sys

import deploy
import pg
import procs
import psycopg
import pytest
import webtest
from conftest import CONFIG, settle, write_config

import lite_app
import lite_counters
import lite_db

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def pg_app(pg_url, config_path):
    app = webtest.TestApp(lite_app.make_app(config_path=str(config_path), database_url=pg_url))
    app.get("/lite/get", status=200)  # applies config.ini
    return app


def test_the_routes_answer_as_on_sqlite(pg_app, pg_url):
    assert pg_app.get("/lite/get").json == {"counter": "hits", "value": 0}
    assert pg_app.post("/lite/inc", {"counter": "hits", "by": "5"}).json == {
        "counter": "hits",
        "value": 5,
    }
    assert pg_app.post("/lite/inc").json == {"counter": "hits", "value": 6}
    assert pg_app.get("/lite/get?counter=misses").json == {"counter": "misses", "value": 0}
    assert pg_app.post("/lite/inc", {"counter": "nope"}, status=404).json["error"]
    assert pg_app.post("/lite/inc", {"by": "0"}, status=400).json["error"]
    pg_app.get("/lite/inc", status=405)
    assert pg_app.get("/lite/health", status=200).json == {"status": "ok"}
    assert "hits" in pg_app.get("/lite", status=200).text
    stats = pg_app.get("/lite/stats", status=200).json
    assert stats["database"]["engine"] == "postgresql"
    assert stats["database"]["server_version"].startswith("15")
    assert "lite_http_requests_total" in pg_app.get("/metrics", status=200).text
    assert pg.hits(pg_url) == 6


def test_an_overflow_is_409_and_writes_nothing(pg_app, pg_url):
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE counters SET value = %s WHERE name = 'hits'", (2**63 - 2,))
    pg_app.post("/lite/inc", {"counter": "hits"}, status=200)
    assert pg_app.post("/lite/inc", {"counter": "hits"}, status=409).json["error"]
    key = {"Idempotency-Key": "k-overflow"}
    pg_app.post("/lite/inc", {"counter": "hits"}, headers=key, status=409)
    assert pg.hits(pg_url) == 2**63 - 1


def test_an_idempotency_key_applies_once(pg_app, pg_url):
    key = {"Idempotency-Key": "k-1"}
    first = pg_app.post("/lite/inc", {"counter": "hits", "by": "3"}, headers=key)
    again = pg_app.post("/lite/inc", {"counter": "hits", "by": "3"}, headers=key)
    assert first.json == again.json == {"counter": "hits", "value": 3}
    assert again.headers["Idempotent-Replayed"] == "true"
    pg_app.post("/lite/inc", {"counter": "hits", "by": "4"}, headers=key, status=422)
    assert pg.hits(pg_url) == 3


def test_an_unreachable_server_is_503_with_retry_after(config_path, monkeypatch):
    monkeypatch.setattr(lite_db, "LOCK_BUDGET_MS", 300)
    nowhere = f"postgresql://lite@127.0.0.1:{deploy.free_port()}/lite"
    app = webtest.TestApp(lite_app.make_app(config_path=str(config_path), database_url=nowhere))
    res = app.get("/lite/get", status=503)
    assert res.headers["Retry-After"] == "1"
    assert res.json == {"error": "database busy, retry later"}
    app.get("/lite/live", status=200)


def test_an_unknown_outcome_is_502_and_with_a_key_is_asked_again(pg_app, monkeypatch):
    def lost(*args, **kwargs):
        raise lite_db.OutcomeUnknown("increment")

    with monkeypatch.context() as patched:
        patched.setattr(lite_counters, "increment", lost)
        res = pg_app.post("/lite/inc", {"counter": "hits"}, status=502)
    assert "outcome unknown" in res.json["error"] and "Retry-After" not in res.headers
    real, calls = lite_counters.increment_once, []

    def lost_once(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)  # it took...
        if len(calls) == 1:
            raise lite_db.OutcomeUnknown("increment_once")  # ...but the answer was lost
        return result

    monkeypatch.setattr(lite_counters, "increment_once", lost_once)
    res = pg_app.post("/lite/inc", {"counter": "hits"}, headers={"Idempotency-Key": "k-2"})
    assert res.json == {"counter": "hits", "value": 1}  # applied once, told so
    assert res.headers["Idempotent-Replayed"] == "true"


def _serve(url, config_path, times):
    app = webtest.TestApp(lite_app.make_app(config_path=config_path, database_url=url))
    return [app.post("/lite/inc", {"counter": "hits"}).json["value"] for _ in range(times)]


def test_20_processes_increment_exactly(pg_app, pg_url, config_path):
    results = procs.run(_serve, [(pg_url, str(config_path), 25)] * 20)
    seen = sorted(value for values in results for value in values)
    assert seen == list(range(1, 501))
    assert pg.hits(pg_url) == 500


def _watch(url, config_path):
    """One request of a new process (a server of its own) with its own copy of config.ini."""
    app = webtest.TestApp(lite_app.make_app(config_path=config_path, database_url=url))
    return app.get("/lite/get").json["value"]


def test_config_is_applied_once_per_content_across_machines(pg_app, pg_url, tmp_path):
    copies = []
    for machine, age_s in (("a", 60), ("b", 3600)):  # each its own copy, its own mtime
        os.makedirs(tmp_path / machine)
        write_config(tmp_path / machine / "config.ini", CONFIG, age_s=age_s)
        copies.append(tmp_path / machine / "config.ini")
    pg_app.post("/lite/inc", {"counter": "hits", "by": "7"})
    assert pg.audit_rows(pg_url) == 1
    procs.run(_watch, [(pg_url, str(path)) for path in copies * 2])
    assert pg.audit_rows(pg_url) == 1  # the same content: not a version
    assert pg.hits(pg_url) == 7
    for path in copies:
        settle(path, age_s=30)  # a touch
    assert procs.run(_watch, [(pg_url, str(path)) for path in copies * 2]) == [7] * 4
    assert pg.audit_rows(pg_url) == 1
    for path in copies:  # a new content, on both machines
        write_config(path, "[counters]\nhits = 100\nmisses = 0\n")
    assert procs.run(_watch, [(pg_url, str(path)) for path in copies * 4]) == [100] * 8
    assert pg.audit_rows(pg_url) == 2  # once in total
    pg_app.post("/lite/inc", {"counter": "hits"})
    forced = subprocess.run(
        [sys.executable, "-m", "lite_ops", "apply-config", "--again", pg_url, str(copies[0])],
        capture_output=True,
        text=True,
    )
    assert forced.returncode == 0, forced.stderr
    assert "applied" in forced.stdout
    assert pg.audit_rows(pg_url) == 3
    assert pg.hits(pg_url) == 100
