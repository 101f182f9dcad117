"""The private Apache as a service: an access log with each request's time in
microseconds, rotated by rotatelogs without a restart, from which p99 is read
as docs/operations.md shows; /lite/live from every daemon; lite's own log
lines as JSON objects in their own file (LITE_LOG_FORMAT=json); after the
Apache parent is SIGKILLed, `serve.sh start` stops its orphans by PID and
starts cleanly; a PidFile naming another process is not taken for Apache."""

import json
import os
import re
import signal
import subprocess
import time

import deploy
import pytest

pytestmark = [pytest.mark.apache, pytest.mark.slow]

# read by conftest.deployment: a small rotation size, so that the test sees it
DEPLOY_ENV = {
    "LITE_ACCESS_LOG_ROTATE": "8K",
    "LITE_ACCESS_LOG_FILES": "3",
    "LITE_LOG_FORMAT": "json",
}
ACCESS_LINE = re.compile(
    r'^127\.0\.0\.1 - - \[[^]]+\] "(?P<request>[^"]*)" (?P<status>\d{3}) \S+ "[^"]*" "[^"]*" '
    r"(?P<us>\d+)$"
)


def _logs(dep):
    return os.path.join(dep.home, "apache", "logs")


def _access_lines(dep):
    lines = []
    for name in sorted(os.listdir(_logs(dep))):
        if name.startswith("access.log"):
            with open(os.path.join(_logs(dep), name)) as f:
                lines += f.read().splitlines()
    return lines


def test_each_request_is_logged_with_its_time_and_the_log_rotates_without_a_restart(deployment):
    apache = deployment.apache_pid()
    for _ in range(150):  # about 15 KB of log: past the 8K rotation size
        assert deployment.request("/lite/get?counter=hits")[0] == 200
    time.sleep(1)  # rotatelogs writes as lines arrive
    lines = [line for line in _access_lines(deployment) if "/lite/get?counter=hits" in line]
    assert len(lines) >= 100  # the rotations kept 3 files of the 150 requests' lines
    matches = [ACCESS_LINE.match(line) for line in lines]
    assert all(matches), [line for line, m in zip(lines, matches, strict=True) if not m][:3]
    assert {m["status"] for m in matches} == {"200"}
    assert all(0 < int(m["us"]) < 10_000_000 for m in matches)
    assert os.path.exists(os.path.join(_logs(deployment), "access.log.1"))  # rotated...
    assert deployment.apache_pid() == apache  # ...by rotatelogs, Apache not restarted


def test_p99_is_read_from_the_access_log_as_the_docs_show(deployment):
    for _ in range(50):
        deployment.request("/lite/inc", data=b"counter=hits")
    time.sleep(1)
    logs = _logs(deployment)
    command = (  # as in docs/operations.md: the nearest-rank 99th percentile
        f"cat {logs}/access.log* | grep 'POST /lite/inc' | awk '{{print $NF}}' | sort -n "
        "| awk '{a[NR]=$1} END {i=int(NR*0.99); if (i<NR*0.99) i++; print a[i]/1000 \" ms\"}'"
    )
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    value, unit = out.stdout.split()
    assert unit == "ms" and 0 < float(value) < 10_000


def test_live_answers_from_the_daemons(deployment):
    pids = set()
    for _ in range(40):
        status, headers, body = deployment.request("/lite/live")
        assert status == 200 and headers["Cache-Control"] == "no-store"
        pids.add(json.loads(body)["pid"])
    assert pids <= set(deployment.daemons())


def test_lite_log_lines_are_json_objects_in_their_own_file(deployment):
    deployment.write_config("[counters]\nhits = not a number\n")  # a bad version: logged
    assert deployment.request("/lite/get")[0] == 200  # the last good version still serves
    time.sleep(0.5)
    with open(os.path.join(_logs(deployment), "lite.jsonl")) as f:
        events = [json.loads(line) for line in f.read().splitlines()]
    rejected = [e for e in events if "not applied" in e["message"]]
    assert rejected, events[-3:]
    assert rejected[0]["level"] in ("ERROR", "WARNING")
    assert rejected[0]["pid"] in deployment.daemons()
    with open(deployment.error_log) as f:
        assert "not applied" not in f.read()  # not in Apache's error log too
    deployment.write_config("[counters]\nhits = 0\nmisses = 0\n")


def test_after_the_parent_is_killed_start_stops_its_orphans_and_starts_cleanly(deployment):
    parent = deployment.apache_pid()
    orphans = deploy.children(parent)
    os.kill(parent, signal.SIGKILL)  # by PID: its workers and daemons live on
    time.sleep(1)
    assert all(deploy.alive(pid) for pid in orphans)  # holding the port and the database
    started = deployment.script("serve.sh", "start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "stopping what an earlier Apache left running" in started.stdout
    assert not any(deploy.alive(pid) for pid in orphans)
    assert deployment.apache_pid() != parent
    assert deployment.request("/lite/inc", data=b"counter=hits")[0] == 200


def test_a_pidfile_naming_another_process_is_not_taken_for_apache(deployment):
    assert deployment.script("serve.sh", "stop").returncode == 0
    other = subprocess.Popen(["sleep", "60"])
    try:
        pidfile = os.path.join(deployment.home, "apache", "run", "httpd.pid")
        with open(pidfile, "w") as f:
            f.write(f"{other.pid}\n")  # a stale PidFile whose PID was reused
        status = deployment.script("serve.sh", "status")
        assert status.returncode == 3 and "not running" in status.stdout
        started = deployment.script("serve.sh", "start")
        assert started.returncode == 0, started.stdout + started.stderr
        assert other.poll() is None  # left alone
        assert deployment.apache_pid() != other.pid
        assert deployment.request("/lite/live")[0] == 200
    finally:
        other.kill()  # by PID
        other.wait(10)
