"""The real deployment: a private Apache + mod_wsgi running the shipped lite.conf.

Needs root (it installs Debian packages if missing and starts Apache, whose
daemons run as www-data) and 127.0.0.1 only. Every process it starts is
stopped by PID, through serve.sh's PidFile.
"""

import json
import os
import pathlib
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAEMONS = 20

pytestmark = [pytest.mark.apache, pytest.mark.slow]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid):
    """PIDs whose parent is `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Deployment:
    def __init__(self, home, port):
        self.home = home
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "LITE_HOME": home, "LITE_PORT": str(port)}
        self.db = os.path.join(home, "app", "data", "lite.db")
        self.config = os.path.join(home, "app", "config.ini")
        self.error_log = os.path.join(home, "apache", "logs", "error.log")

    def script(self, *args, timeout=600):
        return subprocess.run(
            [os.path.join(ROOT, args[0]), *args[1:]],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def apache_pid(self):
        with open(os.path.join(self.home, "apache", "run", "httpd.pid")) as f:
            return int(f.read())

    def request(self, path, data=None):
        """(status, headers, body) of one request; never raises for a status."""
        req = urllib.request.Request(self.base + path, data=data)
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                return res.status, res.headers, res.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read().decode()


@pytest.fixture(scope="module")
def deployment():
    if os.geteuid() != 0:
        pytest.fail("the Apache tests run as root (run them through ./test.sh)")
    home = tempfile.mkdtemp(prefix="lite-test-", dir="/tmp")
    os.chmod(home, 0o755)  # ours: the daemon user must reach the code below it
    dep = Deployment(home, _free_port())
    started = dep.script("serve.sh", "start")
    assert started.returncode == 0, started.stdout + started.stderr
    apache = dep.apache_pid()
    processes = [apache, *_children(apache)]
    try:
        yield dep
    finally:
        stopped = dep.script("serve.sh", "stop", timeout=120)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in processes if _alive(pid)]
        for pid in left:
            os.kill(pid, 9)
        shutil.rmtree(home, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert left == [], f"processes left running after serve.sh stop: {left}"


def test_twenty_single_threaded_daemons_run_as_www_data(deployment):
    www_data = pwd.getpwnam("www-data").pw_uid
    daemons = []
    for pid in _children(deployment.apache_pid()):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if not f.read().startswith(b"(wsgi:lite)"):
                continue
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        daemons.append(int(status["Uid"].split()[1]))  # the effective uid
    assert len(daemons) == DAEMONS
    assert set(daemons) == {www_data}
    with open(os.path.join(deployment.home, "apache", "lite.conf")) as f:
        assert "processes=20 threads=1" in f.read()


def test_the_shipped_lite_conf_is_what_runs(deployment):
    shipped = pathlib.Path(ROOT, "lite.conf").read_text()
    assert pathlib.Path(deployment.home, "apache", "lite.conf").read_text() == shipped


def test_the_public_urls_answer(deployment):
    status, headers, body = deployment.request("/lite")
    assert status == 200 and "text/html" in headers["Content-Type"]
    assert "hits" in body
    status, _, body = deployment.request("/lite/get")
    assert status == 200 and json.loads(body)["counter"] == "hits"
    status, _, body = deployment.request("/lite/inc", data=b"counter=misses&by=2")
    assert status == 200 and json.loads(body)["counter"] == "misses"
    status, headers, _ = deployment.request("/lite/inc")
    assert status == 405 and headers["Allow"] == "POST"


@pytest.mark.parametrize(
    "path",
    [
        "/config.ini",
        "/lite_app.py",
        "/lite_db.py",
        "/data/lite.db",
        "/app/data/lite.db",
        "/lite/../config.ini",
        "/lite/%2e%2e/config.ini",
        "/%2e%2e/app/config.ini",
        "/lite/get/../../data/lite.db",
        "/lite_app.py/../config.ini",
        "/.ht",
    ],
)
def test_no_file_of_the_deployment_is_reachable(deployment, path):
    status, _, body = deployment.request(path)
    assert status in (400, 403, 404)
    assert "[counters]" not in body and "SQLite format" not in body
    assert "import" not in body


def test_an_oversized_body_is_refused_and_changes_nothing(deployment):
    _, _, body = deployment.request("/lite/get")
    before = json.loads(body)["value"]
    status, _, _ = deployment.request("/lite/inc", data=b"counter=hits&pad=" + b"x" * 70_000)
    assert status == 413
    _, _, body = deployment.request("/lite/get")
    assert json.loads(body)["value"] == before


def test_the_database_directory_is_the_daemon_users_alone(deployment):
    data = os.path.dirname(deployment.db)
    st = os.stat(data)
    assert st.st_uid == pwd.getpwnam("www-data").pw_uid
    assert st.st_mode & 0o777 == 0o700
    assert os.stat(deployment.db).st_mode & 0o077 == 0


def test_resetapp_keeps_data_and_refuses_to_wipe_an_open_database(deployment):
    deployment.request("/lite/inc", data=b"counter=hits")
    _, _, body = deployment.request("/lite/get")
    before = json.loads(body)["value"]
    kept = deployment.script("resetapp.sh")
    assert kept.returncode == 0, kept.stderr
    assert "kept the existing database" in kept.stdout
    refused = deployment.script("resetapp.sh", "--force")
    assert refused.returncode == 1
    assert "stop the service first" in refused.stderr
    _, _, body = deployment.request("/lite/get")
    assert json.loads(body)["value"] == before


def test_test_siege_passes(deployment):
    """The three load tests and the config touch, at the sizes of the original."""
    result = deployment.script("test_siege.sh", timeout=900)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test_siege: all passed" in result.stdout
    with open(deployment.error_log) as f:
        log = f.read()
    assert "Traceback" not in log and "locked" not in log
