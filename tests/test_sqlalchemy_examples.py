"""The SQLAlchemy examples under several worker processes started together, on a new database:
the schema is made once (run_once) while the others wait, then 20 clients increment (with and
without Idempotency-Key): every acknowledged increment counted once, nothing but 200, no
"locked" and no traceback. FastAPI under `uvicorn --workers 4` and under gunicorn with uvicorn
workers forked from a preloaded app; Flask-SQLAlchemy under gunicorn --preload (and, in
test_integrations_apache, under Apache).
"""

import importlib.util
import os
import sqlite3

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


def _load(name, database_url, monkeypatch):
    """A fresh import of examples/<name>.py on `database_url`."""
    monkeypatch.setenv("LITE_DATABASE_URL", database_url)
    spec = importlib.util.spec_from_file_location(
        f"{name}_under_test", f"{servers.EXAMPLES}/{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["fastapi_app", "flask_sqlalchemy_app"])
def client(request, tmp_path, monkeypatch):
    """(an in-process client of the example, its database path)."""
    path = tmp_path / "app.db"
    if request.param == "fastapi_app":
        pytest.importorskip("fastapi")
        from fastapi.testclient import TestClient

        module = _load(request.param, f"sqlite+aiolite:///{path}", monkeypatch)
        with TestClient(module.app, raise_server_exceptions=False) as test_client:
            yield test_client, path
    else:
        pytest.importorskip("flask_sqlalchemy")
        module = _load(request.param, f"sqlite+lite:///{path}", monkeypatch)
        test_client = module.app.test_client()
        test_client.get("/lite/get")  # the schema, made at the first request
        yield test_client, path
        with module.app.app_context():
            module.db.engine.dispose()


@pytest.mark.parametrize(
    ("method", "url", "body", "headers", "status", "error"),
    [
        ("GET", "/lite/get?counter=Bad!", None, {}, 400, "counter: use 1-64"),
        ("GET", "/lite/get?counter=a&counter=b", None, {}, 400, "give counter once"),
        ("GET", "/lite/get?counter=nope", None, {}, 404, "no counter 'nope'"),
        ("POST", "/lite/inc", "by=0", {}, 400, "by: a whole number from 1 to 1000000"),
        ("POST", "/lite/inc", "by=1000001", {}, 400, "by: a whole number"),
        ("POST", "/lite/inc", "sneaky=1", {}, 400, "unknown parameter 'sneaky'"),
        ("POST", "/lite/inc", "counter=nope", {}, 404, "no counter 'nope'"),
        ("POST", "/lite/inc", "", {"Idempotency-Key": "a b"}, 400, "Idempotency-Key: use"),
        ("POST", "/lite/inc", "{}", {"Content-Type": "application/json"}, 415, "form-urlencoded"),
    ],
)
def test_bad_input_is_a_4xx_and_changes_nothing(client, method, url, body, headers, status, error):
    test_client, path = client
    headers = {"Content-Type": "application/x-www-form-urlencoded", **headers}
    answer = _send(test_client, method, url, body, headers)
    assert answer.status_code == status
    assert error in _body(answer)["error"]
    assert _value(str(path)) == 0


def test_a_key_replays_and_a_reused_key_is_422_and_a_held_lock_is_503(client):
    test_client, path = client
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    key = {**form, "Idempotency-Key": "k1"}
    first = _send(test_client, "POST", "/lite/inc", "by=2", key)
    again = _send(test_client, "POST", "/lite/inc", "by=2", key)
    other = _send(test_client, "POST", "/lite/inc", "by=3", key)
    assert [first.status_code, again.status_code, other.status_code] == [200, 200, 422]
    assert _body(first) == _body(again) == {"counter": "hits", "value": 2}
    assert _body(other) == {"error": "Idempotency-Key already used to add 2 to hits"}
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        busy = _send(test_client, "POST", "/lite/inc", "", form)
        read = test_client.get("/lite/get")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    assert _body(busy) == {"error": "database busy, retry later"}
    assert read.status_code == 200 and _body(read)["value"] == 2  # reads never wait
    assert _value(str(path)) == 2


def test_an_overflow_is_409_as_lite_app_says_it(client):
    test_client, path = client
    with sqlite3.connect(path) as setter:
        setter.execute("UPDATE app_counters SET value = ? WHERE name = 'misses'", (2**63 - 1,))
    setter.close()
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    answer = _send(test_client, "POST", "/lite/inc", "counter=misses", form)
    assert answer.status_code == 409
    assert _body(answer) == {"error": "misses would pass 9223372036854775807"}


def _send(test_client, method, url, body, headers):
    """One request through FastAPI's TestClient or Flask's test client."""
    if hasattr(test_client, "open"):
        return test_client.open(url, method=method, data=body, headers=headers)
    return test_client.request(method, url, content=body, headers=headers)


def _body(answer):
    return answer.get_json() if hasattr(answer, "get_json") else answer.json()
