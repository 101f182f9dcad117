"""lite_flask and the Flask example app, in-process: a cursor per request,
closed at teardown; lite's JSON and status codes; 503 + Retry-After when
the database cannot be opened, never a traceback."""

import os
import sqlite3
import sys

import flask
import pytest

import lite_counters
import lite_db
import lite_flask

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))


@pytest.fixture
def example(db_path, config_path, monkeypatch):
    monkeypatch.setenv("LITE_DB_PATH", db_path)
    monkeypatch.setenv("LITE_CONFIG_PATH", str(config_path))
    sys.modules.pop("flask_app", None)
    import flask_app

    return flask_app.app.test_client()


def test_each_request_gets_its_own_cursor_closed_at_teardown(db_path):
    app = flask.Flask(__name__)
    lite = lite_flask.Lite(app, db_path)
    seen = []

    @app.get("/")
    def view():
        seen.append(lite.cursor)
        assert lite.cursor is seen[-1]  # the same cursor within one request
        return {"tables": len(lite_db.query(lite.cursor, "SELECT * FROM sqlite_master"))}

    client = app.test_client()
    assert client.get("/").status_code == 200
    assert client.get("/").status_code == 200
    assert seen[0] is not seen[1]
    for cur in seen:
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            cur.execute("SELECT 1")
    with pytest.raises(RuntimeError):
        lite.cursor  # noqa: B018 - outside a request


def test_init_app_takes_the_path_from_the_config(db_path):
    app = flask.Flask(__name__)
    app.config["LITE_DATABASE"] = db_path
    lite = lite_flask.Lite()
    lite.init_app(app)
    with app.test_request_context():
        assert lite.cursor.connection.path == db_path


def test_a_missing_database_is_503_with_retry_after_never_created(tmp_path):
    app = flask.Flask(__name__)
    missing = str(tmp_path / "gone.db")
    lite = lite_flask.Lite(app, missing)
    app.get("/")(lambda: {"tables": len(lite_db.query(lite.cursor, "SELECT * FROM sqlite_master"))})
    response = app.test_client().get("/")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json == {"error": "database busy, retry later"}
    assert not os.path.exists(missing)


def test_the_example_answers_as_lite_app_does(example, other):
    assert example.get("/lite/get?counter=hits").json == {"counter": "hits", "value": 0}
    assert example.post("/lite/inc", data={"counter": "hits"}).json == {
        "counter": "hits",
        "value": 1,
    }
    assert example.post("/lite/inc", data={"counter": "hits", "by": "5"}).json["value"] == 6
    key = {"Idempotency-Key": "k1"}
    assert example.post("/lite/inc", data={"counter": "misses"}, headers=key).json["value"] == 1
    assert example.post("/lite/inc", data={"counter": "misses"}, headers=key).json["value"] == 1
    assert other.execute("SELECT value FROM counters WHERE name = 'misses'").fetchone()[0] == 1


@pytest.mark.parametrize(
    ("request_args", "status"),
    [
        ({"path": "/lite/inc", "data": {"Counter": "hits"}}, 400),
        ({"path": "/lite/inc", "data": {"counter": "hits", "by": "0"}}, 400),
        ({"path": "/lite/inc", "data": {"counter": "Bad Name"}}, 400),
        ({"path": "/lite/inc", "data": {"counter": "nope"}}, 404),
        ({"path": "/lite/inc", "json": {"counter": "hits"}}, 415),
        ({"path": "/lite/inc", "method": "GET"}, 405),
        ({"path": "/lite/nowhere", "method": "GET"}, 404),
    ],
)
def test_the_example_refuses_bad_requests_as_json_and_changes_nothing(
    example, other, request_args, status
):
    request_args = {"method": "POST", **request_args}
    response = example.open(**request_args)
    assert response.status_code == status
    assert "error" in response.json
    assert other.execute("SELECT sum(value) FROM counters").fetchone()[0] == 0


def test_the_example_overflow_is_409(example, other):
    assert example.get("/lite/get").status_code == 200  # config.ini applied
    other.execute("UPDATE counters SET value = ? WHERE name = 'hits'", (lite_counters.MAX_INTEGER,))
    response = example.post("/lite/inc")  # the first counter: lite_app's text names it so
    assert response.status_code == 409
    assert response.json == {"error": "the first counter would pass 9223372036854775807"}
