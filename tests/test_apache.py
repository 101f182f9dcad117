"""The real deployment: a private Apache + mod_wsgi running the shipped lite.conf.

Needs root (it installs Debian packages if missing and starts Apache, whose
daemons run as www-data) and 127.0.0.1 only. Every process it starts is
stopped by PID, through serve.sh's PidFile.
"""

import http.client
import json
import os
import pathlib
import pwd
import socket
import time

import deploy
import history
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = deploy.ROOT
DAEMONS = deploy.DAEMONS

pytestmark = [pytest.mark.apache, pytest.mark.slow]


def test_twenty_single_threaded_daemons_run_as_www_data(deployment):
    www_data = pwd.getpwnam("www-data").pw_uid
    daemons = []
    for pid in deploy.children(deployment.apache_pid()):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if not f.read().startswith(b"(wsgi:lite)"):
                continue
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        daemons.append(int(status["Uid"].split()[1]))  # the effective uid
    assert len(daemons) == DAEMONS
    assert set(daemons) == {www_data}
    with open(os.path.join(deployment.home, "apache", "lite.conf")) as f:
        shipped = f.read()
    assert "processes=${LITE_PROCESSES} threads=${LITE_THREADS}" in shipped
    assert "Define LITE_PROCESSES 20\n" in shipped and "Define LITE_THREADS 1\n" in shipped


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


def _raw(dep, request, half_close=False):
    """Apache's answer to raw request bytes: (status line, headers and body text).

    half_close: shut the sending side after the request, as a client that
    has sent all it will (it can still read the answer).
    """
    with socket.create_connection(("127.0.0.1", dep.port), timeout=30) as conn:
        conn.sendall(request)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.decode("latin-1").partition("\r\n\r\n")
    return head.split("\r\n")[0], head.lower(), body


def test_apaches_own_refusals_are_json(deployment):
    line, head, body = _raw(deployment, b"GARBAGE\r\n\r\n")
    assert " 400 " in line and "content-type: application/json" in head
    assert json.loads(body) == {"error": "bad request"}
    line, head, body = _raw(
        deployment,
        b"POST /lite/inc HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n",
    )
    assert " 411 " in line and json.loads(body) == {"error": "Content-Length required"}
    line, head, body = _raw(deployment, b"GET /lite/get?" + b"a" * 9000 + b" HTTP/1.0\r\n\r\n")
    assert " 414 " in line and "content-type: application/json" in head
    assert json.loads(body) == {"error": "URI over 8190 bytes"}


def test_a_body_cut_short_by_the_client_applies_nothing(deployment):
    """Content-Length 1000, 19 bytes sent, then the client half-closes.

    mod_wsgi 4.9.4's Apache side answers this itself, with a 500, before it
    reads the daemon's answer (its daemon-mode relay maps every body read
    error but a timeout to 500), so lite's 400 cannot reach the client:
    lite.conf makes it JSON. Nothing is applied; the daemons go on serving.
    """
    before = deployment.value()
    daemons = set(deployment.daemons())
    log_from = deployment.log_size()
    for _ in range(3):
        line, head, body = _raw(
            deployment,
            b"POST /lite/inc HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n"
            b"counter=hits&by=1&x",
            half_close=True,
        )
        assert " 500 " in line and "content-type: application/json" in head, line
        assert "body was cut short" in json.loads(body)["error"]
    assert deployment.request("/lite/inc", data=b"counter=hits")[0] == 200
    assert deployment.value() == before + 1
    assert set(deployment.daemons()) == daemons
    assert "Traceback" not in deployment.log_since(log_from)


def test_an_oversized_body_is_refused_and_changes_nothing(deployment):
    _, _, body = deployment.request("/lite/get")
    before = json.loads(body)["value"]
    status, headers, body = deployment.request(
        "/lite/inc", data=b"counter=hits&pad=" + b"x" * 70_000
    )
    assert (status, headers["Content-Type"]) == (413, "application/json")
    assert json.loads(body) == {"error": "request body over 65536 bytes"}
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


def _apply_and_wait(dep, change, timeout_s=15):
    """Make one config change, ask until it is applied; fails if it is not within timeout_s."""
    audit_before = len(dep.audit())
    change()
    deadline = time.monotonic() + timeout_s
    while len(dep.audit()) == audit_before and time.monotonic() < deadline:
        dep.request("/lite/get")
        time.sleep(0.1)
    assert len(dep.audit()) == audit_before + 1


def _touch(path, age_s):
    then = time.time() - age_s
    os.utime(path, (then, then))


@pytest.mark.parametrize("change", ["touch", "new value"])
def test_a_config_version_applied_under_load_resets_the_counter_once(deployment, change):
    """Every acknowledged value seen: a version applied twice would add a run."""
    original = pathlib.Path(deployment.config).read_text()
    # Start from the configured value, so that a touch gives overlapping runs.
    _apply_and_wait(deployment, lambda: _touch(deployment.config, age_s=30))
    start = deployment.value()
    audit_before = len(deployment.audit())
    wait = history.start(deployment.port, clients=20, requests_each=50, seconds=60)
    try:
        deadline = time.monotonic() + 30
        while deployment.value() < start + 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        if change == "touch":
            configured = start
            _touch(deployment.config, age_s=20)
        else:
            configured = 10**9
            deployment.write_config(f"[counters]\nhits = {configured}\nmisses = 0\n")
        load = wait()
        final = deployment.value()
        assert len(deployment.audit()) == audit_before + 1, "not applied exactly once"
        assert len(load.ok) == 1000 and not load.failed, load.statuses
        assert configured < final < configured + 1000, "the reset did not show"
        load.check(start, final, resets=[configured])
    finally:
        deployment.write_config(original)


def test_test_siege_passes(deployment):
    """The three load tests and the config touch, at the sizes of the original."""
    result = deployment.script("test_siege.sh", timeout=900)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test_siege: all passed" in result.stdout
    with open(deployment.error_log) as f:
        log = f.read()
    assert "Traceback" not in log and "locked" not in log


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(["/lite", "/lite/get", "/lite/inc", "/lite/health"]),
    method=st.sampled_from(["GET", "POST"]),
    content_type=st.one_of(
        st.none(),
        st.sampled_from(["application/x-www-form-urlencoded", "multipart/form-data; x", "a/b"]),
    ),
    origin=st.one_of(st.none(), st.sampled_from(["http://[::1", "http://127.0.0.1:1", "%"])),
    body=st.binary(max_size=100),
)
def test_no_input_gives_a_500_under_apache(deployment, path, method, content_type, origin, body):
    log_from = deployment.log_size()
    headers = {"Content-Type": content_type} if content_type else {}
    if origin:
        headers["Origin"] = origin
    conn = http.client.HTTPConnection("127.0.0.1", deployment.port, timeout=30)
    try:
        conn.request(method, path, body=body if method == "POST" else None, headers=headers)
        res = conn.getresponse()
        text = res.read().decode("latin-1")
    finally:
        conn.close()
    assert res.status < 500 or (res.status == 503 and res.getheader("Retry-After")), text
    assert "Traceback" not in deployment.log_since(log_from)
