"""lite_app: the routes and the plugin, through WebTest.

The contract (the tests on the `app` fixture) runs on both engines: SQLite,
and PostgreSQL (LITE_DATABASE_URL, marker `postgres`), each checked through
a second, independent connection (`other`)."""

import os
import sqlite3
import subprocess
import sys

import bottle
import psycopg
import pytest
import webtest
from conftest import write_config

import lite_app
import lite_counters
import lite_db
import lite_pg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request, db_path):
    """(engine, where): a SQLite file, or a new PostgreSQL database's URL."""
    if request.param == "sqlite":
        return "sqlite", db_path
    return "postgresql", request.getfixturevalue("pg_url")


def _make_app(database, config_path):
    engine, where = database
    if engine == "sqlite":
        return webtest.TestApp(lite_app.make_app(db_path=where, config_path=str(config_path)))
    return webtest.TestApp(lite_app.make_app(config_path=str(config_path), database_url=where))


@pytest.fixture
def app(database, config_path):
    return _make_app(database, config_path)


@pytest.fixture
def impatient_app(database, config_path, monkeypatch):
    """An app whose lock budget is 200 ms, its database made and config applied."""
    monkeypatch.setattr(lite_db, "LOCK_BUDGET_MS", 200)
    app = _make_app(database, config_path)
    app.get("/lite", status=200)
    return app


class _PostgresOther:
    """A second PostgreSQL session that takes lite_db's `?` placeholders.

    `BEGIN EXCLUSIVE` is SQLite's; here it locks the counters table as that
    does a database: writers wait, readers do not.
    """

    def __init__(self, url):
        self.conn = psycopg.connect(url, autocommit=True)

    def execute(self, sql, params=()):
        if sql == "BEGIN EXCLUSIVE":
            self.conn.execute("BEGIN")
            return self.conn.execute("LOCK TABLE counters IN EXCLUSIVE MODE")
        return self.conn.execute(sql.replace("?", "%s"), params or None)

    def close(self):
        self.conn.close()


@pytest.fixture
def other(database):
    """A second, independent connection, to check what was committed.

    The demo's counters table is made first (through lite), empty.
    """
    engine, where = database
    made = lite_db.cursor(where) if engine == "sqlite" else lite_pg.cursor(where)
    lite_counters.ensure_counters(made)
    made.close()
    if engine == "sqlite":
        conn = sqlite3.connect(where, isolation_level=None, timeout=10)
    else:
        conn = _PostgresOther(where)
    yield conn
    conn.close()


def value_of(other, name):
    return other.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0]


def test_get_defaults_to_the_first_counter(app):
    res = app.get("/lite/get", status=200)
    assert res.content_type == "application/json"
    assert res.json == {"counter": "hits", "value": 0}


def test_get_names_a_counter(app, other):
    app.get("/lite", status=200)  # applies the config
    other.execute("UPDATE counters SET value = 12 WHERE name = 'misses'")
    assert app.get("/lite/get?counter=misses", status=200).json == {
        "counter": "misses",
        "value": 12,
    }


def test_inc_commits_and_returns_the_new_value(app, other):
    assert app.post("/lite/inc", status=200).json == {"counter": "hits", "value": 1}
    assert app.post("/lite/inc", {"counter": "misses", "by": "5"}, status=200).json == {
        "counter": "misses",
        "value": 5,
    }
    assert app.post("/lite/inc?counter=misses&by=1000000", status=200).json["value"] == 1000005
    assert value_of(other, "hits") == 1
    assert value_of(other, "misses") == 1000005


def test_inc_by_get_is_405_with_allow(app):
    res = app.get("/lite/inc", status=405)
    assert res.headers["Allow"] == "POST"
    assert res.json == {"error": "Method not allowed."}


@pytest.mark.parametrize(
    "params",
    [
        {"by": ""},
        {"by": "0"},
        {"by": "-1"},
        {"by": "+5"},
        {"by": " 7 "},
        {"by": "1.5"},
        {"by": "1_000"},
        {"by": "1e3"},
        {"by": "\u0661\u0662"},
        {"by": "1000001"},
        {"by": "99999999999999999999999"},
        {"by": "abc"},
        {"counter": ""},
        {"counter": "Hits"},
        {"counter": "a b"},
        {"counter": "../config.ini"},
        {"counter": "x" * 65},
        {"counter": "hits'; DROP TABLE counters; --"},
    ],
)
def test_bad_input_is_400_and_changes_nothing(app, other, params):
    app.get("/lite", status=200)
    res = app.post("/lite/inc", params, status=400)
    assert res.content_type == "application/json"
    assert set(res.json) == {"error"}
    assert value_of(other, "hits") == 0


def test_a_parameter_given_twice_is_400(app):
    app.post("/lite/inc?counter=hits", {"counter": "misses"}, status=400)
    app.post("/lite/inc", [("by", "1"), ("by", "2")], status=400)


def test_unknown_counter_is_404(app, other):
    assert "no counter" in app.get("/lite/get?counter=nope", status=404).json["error"]
    assert "no counter" in app.post("/lite/inc", {"counter": "nope"}, status=404).json["error"]
    assert other.execute("SELECT count(*) FROM counters WHERE name = 'nope'").fetchone()[0] == 0


def test_unknown_path_is_a_json_404(app):
    assert app.get("/lite/nope", status=404).json == {"error": "Not found: '/lite/nope'"}


def test_overflow_is_409_and_the_value_stays_an_exact_integer(app, other):
    app.get("/lite", status=200)
    other.execute("UPDATE counters SET value = ? WHERE name = 'hits'", (2**63 - 3,))
    assert app.post("/lite/inc", {"by": "2"}, status=200).json["value"] == 2**63 - 1
    assert "would pass" in app.post("/lite/inc", status=409).json["error"]
    assert value_of(other, "hits") == 2**63 - 1
    if isinstance(other, sqlite3.Connection):  # SQLite could have made it a REAL
        assert other.execute("SELECT typeof(value) FROM counters").fetchone() == ("integer",)


def test_a_cross_site_post_is_403(app, other):
    app.get("/lite", status=200)
    evil = {"Origin": "http://evil.example", "Host": "localhost:80"}
    app.post("/lite/inc", headers=evil, status=403)
    app.post("/lite", {"counter": "hits"}, headers=evil, status=403)
    app.post("/lite", {"counter": "hits"}, headers={"Referer": "http://evil.example/x"}, status=403)
    app.post("/lite/inc", headers={"Origin": "null"}, status=403)
    assert value_of(other, "hits") == 0
    same = {"Origin": "http://localhost:80", "Host": "localhost:80"}
    app.post("/lite/inc", headers=same, status=200)
    assert value_of(other, "hits") == 1


def test_the_page_shows_counters_version_and_a_working_form(app, other):
    page = app.get("/lite", status=200)
    assert page.content_type == "text/html"
    assert page.headers["Cache-Control"] == "no-store"
    assert "hits" in page.text and "misses" in page.text
    assert "Config version" in page.text
    form = page.forms[1]  # the second counter's form
    assert form.method.upper() == "POST"
    res = form.submit(status=303)
    assert res.headers["Location"].endswith("/lite")
    assert value_of(other, "misses") == 1
    assert res.follow(status=200).html.find(id="value-misses").text == "1"


def test_the_page_escapes_what_it_shows(app, other):
    app.get("/lite", status=200)
    # Names are validated when applied; a name put in behind lite's back still
    # cannot inject markup.
    other.execute("INSERT INTO counters VALUES ('<script>x</script>', 1, 9)")
    page = app.get("/lite", status=200)
    assert "<script>x" not in page.text
    assert "&lt;script&gt;x" in page.text


def test_a_config_change_reaches_the_next_request(app, config_path):
    assert app.get("/lite/get", status=200).json["counter"] == "hits"
    write_config(config_path, "[counters]\nviews = 7\n")
    assert app.get("/lite/get", status=200).json == {"counter": "views", "value": 7}


def test_an_app_on_a_new_database_serves_a_config_written_just_now(tmp_path, db_path):
    config = tmp_path / "new.ini"
    config.write_text("[counters]\nviews = 7\n")  # mtime: now, within the settle time
    app = webtest.TestApp(lite_app.make_app(db_path=db_path, config_path=str(config)))
    assert app.get("/lite/get", status=200).json == {"counter": "views", "value": 7}


def test_no_counters_is_a_404_with_a_reason(tmp_path, db_path):
    config = tmp_path / "missing.ini"
    app = webtest.TestApp(lite_app.make_app(db_path=db_path, config_path=str(config)))
    assert app.get("/lite/get", status=404).json == {"error": "no counters configured"}
    assert "No counters yet" in app.get("/lite", status=200).text


def test_database_busy_is_503_with_retry_after(other, impatient_app):
    app = impatient_app
    other.execute("BEGIN EXCLUSIVE")
    try:
        res = app.post("/lite/inc", status=503)
        assert res.headers["Retry-After"] == "1"
        assert res.json == {"error": "database busy, retry later"}
        assert "locked" not in res.text
        # WAL: readers are never blocked by a writer.
        assert app.get("/lite/get", status=200).json["value"] == 0
    finally:
        other.execute("ROLLBACK")
    assert app.post("/lite/inc", status=200).json["value"] == 1


def test_unopenable_database_is_503(tmp_path, config_path):
    app = webtest.TestApp(
        lite_app.make_app(db_path=str(tmp_path / "nope" / "x.db"), config_path=str(config_path))
    )
    res = app.get("/lite/get", status=503)
    assert res.headers["Retry-After"] == "1"
    assert "nope" not in res.text


def test_a_bug_is_a_json_500_without_traceback(db_path, config_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret detail /srv/lite/data")

    monkeypatch.setattr(lite_counters, "increment", broken)
    app = webtest.TestApp(lite_app.make_app(db_path=db_path, config_path=str(config_path)))
    res = app.post("/lite/inc", status=500, expect_errors=True)
    assert res.json == {"error": "internal error"}
    assert "secret" not in res.text and "Traceback" not in res.text


_probed = []  # module level: bottle 0.13 loops forever inspecting a route
# whose closure holds no callable (Route.get_undecorated_callback).


def test_routes_get_a_fresh_cursor_that_is_closed_afterwards(db_path, config_path):
    seen = _probed
    seen.clear()
    app = lite_app.make_app(db_path=db_path, config_path=str(config_path))

    @app.get("/lite/probe")
    def probe(db):
        _probed.append(db)
        return {"ok": True}

    test_app = webtest.TestApp(app)
    test_app.get("/lite/probe", status=200)
    test_app.get("/lite/probe", status=200)
    assert seen[0] is not seen[1]
    for cur in seen:
        with pytest.raises(lite_db.sqlite3.ProgrammingError, match="closed cursor"):
            cur.execute("SELECT 1")


def test_a_database_url_lite_cannot_reach_is_refused_at_start(db_path, config_path):
    for url in ("host=127.0.0.1 dbname=lite", "sqlite+lite:///app.db", "postgresq://x/y"):
        with pytest.raises(ValueError, match="LITE_DATABASE_URL must start with postgresql://"):
            lite_app.make_app(db_path=db_path, config_path=str(config_path), database_url=url)
    assert not any(os.path.exists(name) for name in ("host=127.0.0.1 dbname=lite", "app.db"))


def test_the_plugin_refuses_a_second_plugin_for_the_same_keyword(db_path, config_path):
    app = lite_app.make_app(db_path=db_path, config_path=str(config_path))
    with pytest.raises(bottle.PluginError):
        app.install(lite_app.LitePlugin(db_path, str(config_path)))


def test_import_opens_nothing_and_paths_come_from_env_or_the_working_directory(tmp_path):
    db = tmp_path / "env.db"
    code = (
        "import lite_app, lite_db, os\n"
        "plugin = lite_app.application.plugins[-1]\n"
        "print(plugin.database, plugin.config_path, lite_db.figures()['connections'])\n"
    )
    env = {**os.environ, "LITE_DB_PATH": str(db), "LITE_CONFIG_PATH": "/x/c.ini"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == [str(db), "/x/c.ini", "0"]
    assert not db.exists()
    env = {k: v for k, v in env.items() if not k.startswith("LITE_")}
    env["PYTHONPATH"] = ROOT
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # The working directory's, as under mod_wsgi's home= or gunicorn's --chdir
    # (the module's own directory is site-packages once installed).
    assert out.split()[:2] == [f"{tmp_path}/data/lite.db", f"{tmp_path}/config.ini"]
