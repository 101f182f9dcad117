"""The Flask, Django and Flask-SQLAlchemy examples under the same private Apache as lite_app
(mod_wsgi daemon mode, 20 processes x 1 thread): the Flask app passes
test_siege.sh (reads, writes with and without delay, a touched config
applied once); the Django and Flask-SQLAlchemy apps, 20 clients
incrementing, are exact (history check), with no error and no traceback in
Apache's log.
"""

import os
import re
import shutil
import subprocess
import time

import deploy
import history
import pytest

pytestmark = [pytest.mark.apache, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
PACKAGES = ("flask", "django", "sqlalchemy", "greenlet", "flask-sqlalchemy")


def _pins(*names):
    with open(os.path.join(ROOT, "requirements-dev.txt")) as f:
        pins = re.findall(r"^([a-z][a-z0-9_-]*)==(\S+)$", f.read(), re.M)
    return [f"{name}=={version}" for name, version in pins if name in names]


@pytest.fixture(scope="module")
def integrations(deployment):
    """The deployment with Flask and Django in its venv and the examples beside lite."""
    pip = os.path.join(deployment.home, "venv", "bin", "pip")
    installed = subprocess.run(
        [pip, "install", "-q", "--disable-pip-version-check", *_pins(*PACKAGES)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr
    app = os.path.join(deployment.home, "app")
    for source in ("lite_flask.py", "lite_django", "lite_sqlalchemy.py"):
        _copy(os.path.join(ROOT, source), app)
    for source in ("flask_app.py", "django_wsgi.py", "django_counter", "flask_sqlalchemy_app.py"):
        _copy(os.path.join(EXAMPLES, source), app)
    return deployment


def _copy(source, app):
    target = os.path.join(app, os.path.basename(source))
    if os.path.isdir(source):
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy(source, target)


def _serve(dep, script):
    """Restart the private Apache with `script` as the WSGI application."""
    assert dep.script("serve.sh", "stop").returncode == 0
    dep.env["LITE_WSGI_SCRIPT"] = script
    started = dep.script("serve.sh", "start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert len(dep.daemons()) == deploy.DAEMONS


def test_the_flask_example_passes_test_siege(integrations):
    _serve(integrations, "flask_app.py")
    log_from = integrations.log_size()
    integrations.env["SIEGE_READS"] = "300"
    result = integrations.script("test_siege.sh", timeout=900)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test_siege: all passed" in result.stdout
    log = integrations.log_since(log_from)
    assert "Traceback" not in log and "locked" not in log


def test_the_django_example_increments_exactly(integrations):
    app = os.path.join(integrations.home, "app")
    python = os.path.join(integrations.home, "venv", "bin", "python")
    migrated = subprocess.run(
        ["runuser", "-u", "www-data", "--", python, "-m", "django", "migrate", "--noinput"],
        cwd=app,
        env={**os.environ, "PYTHONPATH": app, "DJANGO_SETTINGS_MODULE": "django_counter.settings"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    _serve(integrations, "django_wsgi.py")
    django_db = os.path.join(app, "data", "django.db")
    # The timed load measures serving, not 20 daemons importing Django at once.
    history.run(integrations.port, clients=20, requests_each=5)
    log_from = integrations.log_size()
    sql = "SELECT value FROM django_counter_counter WHERE name = 'hits'"
    before = deploy.read_only_query(django_db, sql)[0][0]
    load = history.run(integrations.port, clients=20, seconds=6)
    load.check(before, deploy.read_only_query(django_db, sql)[0][0])
    assert not load.failed and not load.unknown, load.statuses
    assert len(load.ok) > 500
    log = integrations.log_since(log_from)
    assert "Traceback" not in log and "locked" not in log
    print(f"Django on lite_django: {len(load.ok)} increments, all counted once")


def test_the_flask_sqlalchemy_example_increments_exactly(integrations):
    """On lite's dialect (the schema made once by the first of 20 daemons to get a request)."""
    _serve(integrations, "flask_sqlalchemy_app.py")
    path = os.path.join(integrations.home, "app", "data", "app.db")
    # Every daemon imports Flask and SQLAlchemy (about 1 s of CPU each) and
    # connects before the timed load.
    integrations.warm_up(timeout_s=120, db=path)
    assert deploy.read_only_query(path, "SELECT count(*) FROM lite_once") == [(1,)]
    log_from = integrations.log_size()
    sql = "SELECT value FROM app_counters WHERE name = 'hits'"
    before = _settled(path, sql)  # a warm-up request its client gave up on may still count
    load = history.run(integrations.port, clients=20, seconds=6)
    after = deploy.read_only_query(path, sql)[0][0]
    keyed = history.run(integrations.port, clients=20, seconds=3, idempotent=True)
    load.check(before, after)
    keyed.check(after, deploy.read_only_query(path, sql)[0][0], idempotent=True)
    for run in (load, keyed):
        assert not run.failed and not run.unknown, run.statuses
        assert not run.bodies_with_lock_errors
    assert len(load.ok) > 300
    log = integrations.log_since(log_from)
    assert "Traceback" not in log and "locked" not in log
    print(f"Flask-SQLAlchemy on lite: {len(load.ok)} increments, {len(keyed.ok)} keyed, exact")


def _settled(path, sql, timeout_s=60):
    """The query's value once it has stayed the same for a second."""
    deadline = time.monotonic() + timeout_s
    value = deploy.read_only_query(path, sql)[0][0]
    while True:
        time.sleep(1)
        now = deploy.read_only_query(path, sql)[0][0]
        if now == value:
            return value
        assert time.monotonic() < deadline, "the value never settled"
        value = now
