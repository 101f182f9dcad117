"""Fixtures: a fresh database and config per test, a WebTest app on them."""

import atexit
import os
import shutil
import sqlite3
import tempfile
import time

# prometheus_client's multiprocess mode, as under Apache: chosen when it is
# first imported (by lite_app, below), for this process and its children.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="lite-metrics-")
atexit.register(shutil.rmtree, os.environ["PROMETHEUS_MULTIPROC_DIR"], True)

import deploy
import pg
import pytest
import webtest

import lite_app
import lite_config
import lite_counters
import lite_db

CONFIG = "[counters]\nhits = 0\nmisses = 0\n"


def write_config(path, text, age_s=60.0):
    """Write config text and date it `age_s` seconds back, past the settle time."""
    path.write_text(text)
    settle(path, age_s)


def record_stats(monkeypatch):
    """Make os.stat record the path of each call; the list it fills (monkeypatch.undo ends it)."""
    looked = []
    stat = os.stat

    def recorded(path, *args, **kwargs):
        looked.append(os.fspath(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", recorded)
    return looked


def settle(path, age_s=60.0):
    then = time.time_ns() - int(age_s * 1e9)
    os.utime(path, ns=(then, then))


@pytest.fixture(autouse=True)
def fresh_process_state():
    """Each test starts with no open connections and no figures (lite_db's one reset)."""
    yield
    lite_db.close_all()


@pytest.fixture(scope="module")
def deployment(request):
    """The private Apache of one test module (tests/deploy.py), stopped after it.

    A module may set DEPLOY_ENV, settings for serve.sh (e.g. thread counts).
    """
    with deploy.deployed(env=getattr(request.module, "DEPLOY_ENV", None)) as dep:
        yield dep


@pytest.fixture
def db_path(tmp_path):
    """A new, empty database file: the app, like a server, never creates one."""
    path = tmp_path / "lite.db"
    path.touch()
    return str(path)


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "config.ini"
    write_config(path, CONFIG)
    return path


@pytest.fixture
def app(db_path, config_path):
    return webtest.TestApp(lite_app.make_app(db_path=db_path, config_path=str(config_path)))


@pytest.fixture
def impatient_app(db_path, config_path, monkeypatch):
    """An app whose lock budget is 200 ms, its database made and config applied."""
    lite_db.close_all()
    monkeypatch.setattr(lite_db, "LOCK_BUDGET_MS", 200)
    app = webtest.TestApp(lite_app.make_app(db_path=db_path, config_path=str(config_path)))
    app.get("/lite", status=200)
    return app


@pytest.fixture
def cur(db_path):
    cur = lite_db.cursor(db_path)
    yield cur
    cur.close()


@pytest.fixture
def watcher(config_path):
    """This process's view of config.ini; a new one is another process's."""
    return lite_config.ConfigWatcher(str(config_path))


@pytest.fixture
def other(db_path):
    """A second, independent connection, to check what was committed.

    The demo's counters table is made first (through lite_db), empty.
    """
    made = lite_db.cursor(db_path)
    lite_counters.ensure_counters(made)
    made.close()
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=10)
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def pg_cluster():
    """A private PostgreSQL for the session (tests/pg.py), stopped after it."""
    with pg.private_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg_cluster):
    """A new, empty PostgreSQL database of this test's own."""
    yield pg_cluster.new_database()
    lite_db.close_all()
