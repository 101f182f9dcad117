"""Running it as a service, in-process: /lite/live answers without touching
the database (the liveness probe), /lite/health is the readiness one; lite's
log lines as JSON objects; serving installs no test tool."""

import json
import logging
import os
import subprocess

import pytest
import webtest

import lite_app
import lite_db

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_live_answers_without_the_database_while_health_does_not(tmp_path, config_path):
    missing = str(tmp_path / "gone.db")
    app = webtest.TestApp(lite_app.make_app(db_path=missing, config_path=str(config_path)))
    response = app.get("/lite/live", status=200)
    assert response.json == {"status": "alive", "pid": os.getpid()}
    assert response.headers["Cache-Control"] == "no-store"
    assert lite_db.figures()["connections"] == 0  # nothing opened
    assert app.get("/lite/health", status=503).headers["Retry-After"] == "1"
    assert not os.path.exists(missing)


def test_json_log_lines_are_one_object_per_event_with_the_pid(tmp_path):
    path = tmp_path / "lite.jsonl"
    logger = logging.getLogger("lite_test_json")
    handler = lite_app.log_handler("json", str(path))
    logger.addHandler(handler)
    try:
        logger.error("database %s is full: free space", "x.db")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("with a traceback")
    finally:
        logger.removeHandler(handler)
        handler.close()
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first["level"] == "ERROR" and first["pid"] == os.getpid()
    assert first["message"] == "database x.db is full: free space"
    assert first["logger"] == "lite_test_json" and first["time"].endswith("+00:00")
    assert "ValueError: boom" in second["exception"]


def test_an_unknown_log_format_is_refused():
    with pytest.raises(ValueError, match="plain or json"):
        lite_app.log_handler("xml", None)


def test_serving_installs_no_test_tool():
    def packages(*args):
        script = os.path.join(ROOT, "scripts", "setup.sh")
        return subprocess.run([script, *args], capture_output=True, text=True, check=True).stdout

    serving, testing = packages("--list").split(), packages("--dev", "--list").split()
    assert {"apache2", "libapache2-mod-wsgi-py3", "apache2-utils"} <= set(serving)
    assert not {"siege", "wrk", "chromium"} & set(serving)
    assert {"siege", "wrk", "chromium", "chromium-driver", "systemd"} <= set(testing)
