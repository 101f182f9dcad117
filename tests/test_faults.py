"""Faults against the real Apache deployment, each under load from 127.0.0.1:
daemons killed, graceful restarts, config storms and bad config versions,
a lock held by another process, a full disk, a database the daemons cannot
write. After each: the history check holds (no acknowledged increment lost,
no value returned twice, no lock error seen by a client), the database passes
its integrity check, and the service recovers by itself.

Every process started here is stopped by PID; daemons are killed by PID.
"""

import json
import os
import pathlib
import pwd
import random
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time

import bottle
import deploy
import history
import prometheus_client
import pytest

pytestmark = [pytest.mark.apache, pytest.mark.slow]

WWW_DATA = pwd.getpwnam("www-data")


def _kill_daemons_while(dep, running, every_s, all_at_once=False):
    """SIGKILL one daemon (or all) by PID every `every_s` while running(); the PIDs killed."""
    killed = []
    while running():
        daemons = dep.daemons()
        for pid in daemons if all_at_once else random.sample(daemons, min(1, len(daemons))):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(every_s)
    return killed


def _until(seconds):
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() < deadline


@pytest.mark.parametrize("idempotent", [False, True], ids=["plain", "idempotent"])
def test_daemons_killed_under_write_load(deployment, idempotent):
    counter = "misses" if idempotent else "hits"
    before = deployment.value(counter)
    wait = history.start(
        deployment.port, counter=counter, clients=20, seconds=10, idempotent=idempotent
    )
    time.sleep(1)
    killed = _kill_daemons_while(deployment, _until(6), every_s=0.4)
    killed += _kill_daemons_while(deployment, _until(0.1), every_s=1, all_at_once=True)
    load = wait()
    assert len(killed) >= 20
    assert deployment.wait_healthy(), "the service did not recover"
    load.check(before, deployment.value(counter), idempotent=idempotent)
    assert len(load.ok) > 500
    assert deployment.integrity() == "ok"
    assert set(load.statuses) <= {200, 500, 502, 503}, load.statuses
    print(f"killed {len(killed)}, {load.statuses}, unknown {len(load.unknown)}")
    print(f"retries {load.retries}, ok {len(load.ok)}")


def test_graceful_restarts_under_write_load(deployment):
    before = deployment.value()
    old = set(deployment.daemons())
    wait = history.start(deployment.port, clients=20, seconds=10)
    for _ in range(2):
        time.sleep(3)
        os.kill(deployment.apache_pid(), signal.SIGUSR1)  # apachectl graceful
    load = wait()
    assert deployment.wait_healthy()
    load.check(before, deployment.value())
    assert not old & set(deployment.daemons()), "the daemons were not replaced"
    assert len(deployment.daemons()) == deploy.DAEMONS
    assert deployment.integrity() == "ok"
    print(load.statuses, len(load.unknown))


def _reads_while(dep, running):
    """GET /lite/get until running() is false; the statuses seen."""
    seen = {}
    while running():
        status = dep.request("/lite/get")[0]
        seen[status] = seen.get(status, 0) + 1
    return seen


def test_config_rewritten_many_times_under_load(deployment):
    audit_before = len(deployment.audit())
    before = deployment.value()
    wait = history.start(deployment.port, clients=10, seconds=14)
    versions = 20
    for i in range(versions):
        # Each version resets hits far from every other, so each has its own run.
        text = f"[counters]\nhits = {(i + 1) * 10**6}\nmisses = 0\nc{i} = {i}\n"
        deployment.write_config(text)
        time.sleep(0.5)  # many requests see each version
    load = wait()
    assert not load.failed and not load.unknown
    audit = deployment.audit()[audit_before:]
    assert len(audit) == len(set(audit)) == versions, f"{len(audit)} applications"
    # 20 versions applied once each: 21 runs of acknowledged values.
    load.check(before, deployment.value(), resets=[(i + 1) * 10**6 for i in range(versions)])
    status, _, body = deployment.request("/lite/get?counter=c19")
    assert (status, json.loads(body)["value"]) == (200, 19)


def test_bad_config_versions_keep_the_last_good_one(deployment):
    good = "[counters]\nhits = 0\nmisses = 0\ngood = 7\n"
    deployment.write_config(good)
    time.sleep(0.5)
    assert deployment.request("/lite/get?counter=good")[0] == 200
    audit_before = len(deployment.audit())
    log_from = deployment.log_size()
    stop = threading.Event()
    statuses = {}
    reader = threading.Thread(
        target=lambda: statuses.update(_reads_while(deployment, lambda: not stop.is_set()))
    )
    reader.start()
    bad = []
    try:
        # A torn in-place write: half a file, left there past the settle time.
        # (Cut down in place rather than truncated first: a writer stalled
        # past the settle time would leave an empty file, a bad version too.)
        with open(deployment.config, "r+") as f:
            f.truncate(len(good) - len("7\n"))
        bad.append("torn")
        time.sleep(2)
        deployment.write_config("this is not an ini file\n")
        bad.append("malformed")
        time.sleep(1)
        deployment.write_config("[counters]\n" + "x = 1\n" * 20_000)
        bad.append("huge")
        time.sleep(1)
        # root's, mode 0600: the daemons cannot read it
        deployment.write_config(good + "secret = 1\n", mode=0o600)
        bad.append("unreadable")
        time.sleep(1)
        os.remove(deployment.config)
        bad.append("deleted")
        time.sleep(1.5)
        status, _, body = deployment.request("/lite/get?counter=good")
    finally:
        stop.set()
        reader.join(30)
        deployment.write_config(good)
    assert (status, json.loads(body)["value"]) == (200, 7)
    assert set(statuses) == {200}, statuses
    assert len(deployment.audit()) == audit_before  # nothing applied
    log = deployment.log_since(log_from)
    rejections = [line for line in log.splitlines() if "not applied" in line]
    assert len(rejections) == len(bad), "\n".join(rejections)
    assert "Traceback" not in log


def _hold_lock(dep, seconds):
    conn = sqlite3.connect(dep.db, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def test_a_short_lock_is_invisible_a_long_one_is_503(deployment):
    before = deployment.value()
    # Short: 1 s, a third of the 3 s budget. Every client waits it out.
    wait = history.start(deployment.port, clients=20, seconds=4)
    time.sleep(1)
    _hold_lock(deployment, 1.0)
    load = wait()
    load.check(before, deployment.value())
    assert set(load.statuses) == {200}, load.statuses

    # Long: 6 s, twice the budget. Writes give 503 + Retry-After, reads go on.
    before = deployment.value()
    log_from = deployment.log_size()
    holder = threading.Thread(target=_hold_lock, args=(deployment, 6.0))
    holder.start()
    time.sleep(0.3)
    wait = history.start(deployment.port, clients=5, seconds=4)
    status, headers, body = deployment.request("/lite/inc", data=b"counter=hits")
    read_statuses = _reads_while(deployment, _until(2))  # the lock is still held
    load = wait()
    holder.join(30)
    assert (status, headers["Retry-After"]) == (503, "1")
    assert json.loads(body) == {"error": "database busy, retry later"}
    assert set(read_statuses) == {200}, read_statuses
    assert set(load.statuses) <= {200, 503} and 503 in load.statuses, load.statuses
    load.check(before, deployment.value())
    assert deployment.wait_healthy()
    assert deployment.request("/lite/inc", data=b"counter=hits")[0] == 200
    assert "Traceback" not in deployment.log_since(log_from)


def test_the_database_not_writable_by_the_daemons(deployment):
    """The file made root's: reads go on, writes get 503 and the log says
    what to fix; fixed, the service writes again without a restart."""
    log_from = deployment.log_size()
    before = deployment.value()
    os.chown(deployment.db, 0, 0)
    os.chmod(deployment.db, 0o644)
    try:
        daemons = deployment.kill_daemons()  # new daemons open the database anew
        reads = [deployment.request("/lite/get")[0] for _ in range(20)]
        writes = [deployment.request("/lite/inc", data=b"counter=hits") for _ in range(20)]
        assert set(reads) == {200}
        assert {status for status, _, _ in writes} == {503}
        assert all(headers["Retry-After"] == "1" for _, headers, _ in writes)
        assert set(deployment.daemons()) == daemons, "daemons restarted: a crash loop"
    finally:
        os.chown(deployment.db, WWW_DATA.pw_uid, WWW_DATA.pw_gid)
        os.chmod(deployment.db, 0o600)
    assert deployment.value() == before
    log = deployment.log_since(log_from)
    assert f"{deployment.db} (and its directory" in log and "chown" in log, log[-2000:]
    assert "Traceback" not in log
    statuses = {deployment.request("/lite/inc", data=b"counter=hits")[0] for _ in range(40)}
    assert statuses == {200}
    assert deployment.value() == before + 40


# A full disk needs its own deployment: the data directory on a small tmpfs.


def _mount_data(home):
    data = os.path.join(home, "app", "data")
    os.makedirs(data)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", data], check=True)


def _unmount_data(home):
    subprocess.run(["umount", os.path.join(home, "app", "data")], check=True)


def test_a_full_disk_refuses_writes_and_loses_nothing():
    with deploy.deployed(before_start=_mount_data, after_stop=_unmount_data) as dep:
        for _ in range(50):
            assert dep.request("/lite/inc", data=b"counter=hits")[0] == 200
        data = os.path.dirname(dep.db)
        filler = os.path.join(data, "filler")
        # Fill the filesystem; a reader held open keeps the WAL from starting
        # over, so the next writes need new space.
        reader = sqlite3.connect(dep.db, isolation_level=None, timeout=10)
        reader.execute("BEGIN")
        reader.execute("SELECT value FROM counters").fetchall()
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={filler}", "bs=64k"],
            capture_output=True,
            check=False,
        )
        before = dep.value()
        log_from = dep.log_size()
        try:
            load = history.run(dep.port, clients=5, seconds=4)
            reads = {dep.request("/lite/get")[0] for _ in range(20)}
        finally:
            reader.execute("ROLLBACK")
            reader.close()
            os.remove(filler)
        assert 503 in load.statuses, load.statuses
        assert set(load.statuses) <= {200, 503}
        assert reads == {200}
        load.check(before, dep.value())
        log = dep.log_since(log_from)
        assert "is full: free space" in log and "Traceback" not in log
        assert dep.wait_healthy()
        after = history.run(dep.port, clients=5, requests_each=20)
        assert set(after.statuses) == {200}
        assert dep.value() == before + len(load.ok) + 100
        assert dep.integrity() == "ok"


_AS_DAEMON_USER = """
import io, json, logging, sys, wsgiref.util
log = io.StringIO()
logging.basicConfig(stream=log, level=logging.INFO)
import lite_app
app = lite_app.make_app(db_path=sys.argv[1], config_path=sys.argv[2])
answers = []
for method in ("GET", "POST"):
    environ = {"REQUEST_METHOD": method, "PATH_INFO": "/lite/inc" if method == "POST"
               else "/lite/get", "CONTENT_LENGTH": "0", "wsgi.input": io.BytesIO()}
    wsgiref.util.setup_testing_defaults(environ)
    seen = {}
    body = b"".join(app(environ, lambda status, headers, exc_info=None: seen.update(
        status=status, headers=dict(headers))))
    answers.append([seen["status"], seen["headers"].get("Retry-After"), body.decode()])
print(json.dumps({"answers": answers, "log": log.getvalue()}))
"""


@pytest.fixture
def public_tmp_path():
    """A fresh directory that www-data can reach (pytest's tmp_path is root's 0700)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="lite-faults-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


def test_a_data_directory_the_daemon_user_cannot_write(public_tmp_path):
    """As www-data, with the database in a directory it cannot write: 503 with
    Retry-After, never a crash, and a log line naming the path and the fix."""
    tmp_path = public_tmp_path
    code = tmp_path / "code"
    code.mkdir()
    for name in (*deploy.APP_FILES, "config.ini"):
        shutil.copy(os.path.join(deploy.ROOT, name), code)
    shutil.copy(bottle.__file__, code)
    shutil.copytree(os.path.dirname(prometheus_client.__file__), code / "prometheus_client")
    data = tmp_path / "data"
    data.mkdir()  # root's, 0755: www-data may read it, not create files in it
    for path in (tmp_path, code, data):
        os.chmod(path, 0o755)
    db = str(data / "lite.db")
    ran = subprocess.run(
        [
            "/usr/sbin/runuser",
            "-u",
            "www-data",
            "--",
            "/usr/bin/python3",
            "-c",
            _AS_DAEMON_USER,
            db,
            str(code / "config.ini"),
        ],
        cwd=code,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(code), "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    for status, retry_after, body in result["answers"]:
        assert (status, retry_after) == ("503 Service Unavailable", "1")
        assert json.loads(body) == {"error": "database busy, retry later"}
    assert f"cannot open database {db}" in result["log"]
    assert f"chown -R www-data {data}" in result["log"]
    assert "Traceback" not in result["log"] and not os.path.exists(db)
