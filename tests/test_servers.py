"""lite's own app and the Flask example under servers other than Apache:
gunicorn's sync workers (processes), its gthread workers (processes of
threads) and Flask's threaded development server. 20 clients increment for
a few seconds: every increment acknowledged is counted exactly once, no
value is returned twice, nothing but 200, and no traceback in the server's
log.
"""

import os

import deploy
import history
import pytest
import servers

pytestmark = pytest.mark.slow

GUNICORN_SYNC = ["{bin}/gunicorn", "-b", "127.0.0.1:{port}", "-w", "4"]
GUNICORN_GTHREAD = [*GUNICORN_SYNC[:3], "-w", "2", "-k", "gthread", "--threads", "4"]
FLASK_DEV = ["{bin}/flask", "--app", "flask_app", "run", "--port", "{port}", "--with-threads"]

CASES = {
    "lite_app-gunicorn-sync": [*GUNICORN_SYNC, "lite_app:application"],
    "lite_app-gunicorn-gthread": [*GUNICORN_GTHREAD, "lite_app:application"],
    "flask-gunicorn-sync": [*GUNICORN_SYNC, "flask_app:app"],
    "flask-gunicorn-gthread": [*GUNICORN_GTHREAD, "flask_app:app"],
    "flask-dev-server": FLASK_DEV,
}


def _value(work):
    path = os.path.join(work, "data", "lite.db")
    return deploy.read_only_query(path, "SELECT value FROM counters WHERE name = 'hits'")[0][0]


@pytest.mark.parametrize("argv", CASES.values(), ids=CASES.keys())
def test_20_clients_increment_exactly(tmp_path, argv):
    work = str(tmp_path)
    servers.prepare(work)
    before = _value(work)
    with servers.serving(argv, work) as (port, log):
        load = history.run(port, clients=20, seconds=4)
    load.check(before, _value(work))
    assert not load.unknown and not load.failed, (load.statuses, load.unknown[:3])
    assert len(load.ok) > 200, load.statuses
    with open(log) as f:
        assert "Traceback" not in f.read()
    print(f"{len(load.ok)} increments, all counted once")


def test_metrics_sum_gunicorn_workers_forked_from_a_preloaded_app(tmp_path):
    """--preload imports lite_app (and makes its metrics) in the master, then forks:
    each worker must count into its own files, and /lite/stats sum them all."""
    work = str(tmp_path)
    servers.prepare(work)
    argv = [*GUNICORN_SYNC, "--preload", "lite_app:application"]
    with servers.serving(argv, work) as (port, log):
        before = servers.get_json(port, "/lite/stats")
        load = history.run(port, clients=20, seconds=3)
        after = servers.get_json(port, "/lite/stats")
    assert not load.unknown and not load.failed, (load.statuses, load.unknown[:3])
    assert after["totals"]["requests"] == before["totals"]["requests"] + 1 + len(load.ok)
    assert after["totals"]["writes"] >= before["totals"]["writes"] + len(load.ok)
    assert after["process_count"] >= 4  # the workers (and the master, which served none)
    with open(log) as f:
        assert "Traceback" not in f.read()
