"""The SQLAlchemy examples under several worker processes started together, on a new database:
the schema is made once (run_once) while the others wait, then 20 clients increment (with and
without Idempotency-Key): every acknowledged increment counted once, nothing but 200, no
"locked" and no traceback. FastAPI under `uvicorn --workers 4` and under gunicorn with uvicorn
workers forked from a preloaded app; Flask-SQLAlchemy under gunicorn --preload (and, in
test_integrations_apache, under Apache).
"""

import os

import deploy
import history
import pytest
import servers

pytest.importorskip("sqlalchemy")

pytestmark = pytest.mark.slow

UVICORN = ["{bin}/uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--workers", "4"]
GUNICORN = ["{bin}/gunicorn", "-b", "127.0.0.1:{port}", "-w", "4", "--preload"]

CASES = {
    "fastapi-uvicorn-workers": [*UVICORN, "fastapi_app:app"],
    "fastapi-gunicorn-uvicorn-workers": [
        *GUNICORN,
        "-k",
        "uvicorn_worker.UvicornWorker",
        "fastapi_app:app",
    ],
    "flask-sqlalchemy-gunicorn": [*GUNICORN, "flask_sqlalchemy_app:app"],
}


def _value(path):
    return deploy.read_only_query(path, "SELECT value FROM app_counters WHERE name = 'hits'")[0][0]


@pytest.mark.parametrize("argv", CASES.values(), ids=CASES.keys())
def test_20_clients_increment_exactly_after_the_schema_is_made_once(tmp_path, argv, monkeypatch):
    pytest.importorskip("fastapi" if "fastapi_app:app" in argv else "flask_sqlalchemy")
    work = str(tmp_path)
    os.makedirs(os.path.join(work, "data"))
    path = os.path.join(work, "data", "app.db")
    scheme = "sqlite+aiolite" if "fastapi_app:app" in argv else "sqlite+lite"
    monkeypatch.setenv("LITE_DATABASE_URL", f"{scheme}:///{path}")
    with servers.serving(argv, work) as (port, log):
        history.run(port, clients=4, requests_each=3)  # every worker has served
        before = _value(path)
        load = history.run(port, clients=20, seconds=3)
        after = _value(path)
        keyed = history.run(port, clients=20, seconds=2, idempotent=True)
    load.check(before, after)
    keyed.check(after, _value(path), idempotent=True)
    for run in (load, keyed):
        assert not run.unknown and not run.failed, (run.statuses, run.unknown[:3])
        assert not run.bodies_with_lock_errors
    assert len(load.ok) > 100, load.statuses
    assert deploy.read_only_query(path, "SELECT count(*) FROM lite_once") == [(1,)]
    assert deploy.read_only_query(path, "SELECT count(*) FROM app_counters") == [(2,)]
    with open(log) as f:
        text = f.read()
    assert "Traceback" not in text and "locked" not in text
    print(f"{len(load.ok)} increments and {len(keyed.ok)} keyed, all counted once")
