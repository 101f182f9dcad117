"""A full disk under the real Apache, everything on it: the database, its WAL,
the metrics, Apache's logs (LITE_HOME on a small tmpfs, mounted and unmounted
by this test, by path). Reads and liveness go on, increments are 503 with
Retry-After, health says why, no daemon dies of a signal, daemons started on
the full disk serve too; once space is freed writes resume by themselves and
every acknowledged increment is there, and /metrics sums again.
"""

import os
import sqlite3
import subprocess
import threading
import time

import deploy
import history
import pytest

pytestmark = [pytest.mark.apache, pytest.mark.slow]

READERS = 8
WRITERS = 8
PROBES = ("/lite/get", "/lite/live", "/lite/health", "/metrics")


def _mount_home(home):
    # The venv serve.sh makes lives here too: 96 MiB holds it, the rest is filled.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m,mode=0755", "tmpfs", home], check=True)


def _unmount_home(home):
    subprocess.run(["umount", home], check=True)


def _read_while(dep, running, statuses, lock):
    while running():
        for path in ("/lite/get", "/lite/live"):
            status = dep.request(path)[0]
            with lock:
                statuses.setdefault(path, []).append(status)


def _until(seconds):
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() < deadline


def test_a_full_disk_keeps_reads_and_liveness_and_loses_nothing():
    with deploy.deployed(before_start=_mount_home, after_stop=_unmount_home) as dep:
        for _ in range(20):
            assert dep.request("/lite/inc", data=b"counter=hits")[0] == 200
        filler = os.path.join(dep.home, "filler")
        # A reader held open keeps the WAL from starting over, so writes need new space.
        reader = sqlite3.connect(dep.db, isolation_level=None, timeout=10)
        reader.execute("BEGIN")
        reader.execute("SELECT value FROM counters").fetchall()
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
        before = dep.value()
        log_from = dep.log_size()
        try:
            daemons = dep.kill_daemons()  # those that serve from here on start on the full disk
            statuses, lock = {}, threading.Lock()
            readers = [
                threading.Thread(target=_read_while, args=(dep, _until(4), statuses, lock))
                for _ in range(READERS)
            ]
            for thread in readers:
                thread.start()
            load = history.run(dep.port, clients=WRITERS, seconds=4)
            for thread in readers:
                thread.join(60)
            probes = {path: dep.request(path) for path in PROBES}
            assert set(dep.daemons()) == daemons, "a daemon died on the full disk"
        finally:
            reader.execute("ROLLBACK")
            reader.close()
            os.remove(filler)
        assert set(statuses["/lite/get"]) == {200}, statuses["/lite/get"][:20]
        assert set(statuses["/lite/live"]) == {200}
        assert 503 in load.statuses and set(load.statuses) <= {200, 503}, load.statuses
        load.check(before, dep.value())
        health_status, health_headers, health_body = probes["/lite/health"]
        assert health_status == 503 and health_headers["Retry-After"] == "1"
        assert '"reason": "database write failed"' in health_body
        assert probes["/metrics"][0] in (200, 503)
        for status, headers, body in probes.values():
            assert "Traceback" not in body and "<html" not in body.lower()
            if status == 503:
                assert headers["Content-Type"] == "application/json"
        # Space freed: writes resume by themselves, nothing acknowledged is missing.
        assert dep.wait_healthy()
        after = history.run(dep.port, clients=WRITERS, requests_each=10)
        assert set(after.statuses) == {200}
        assert dep.value() == before + len(load.ok) + 10 * WRITERS
        assert dep.integrity() == "ok"
        assert set(dep.daemons()) == daemons
        assert dep.request("/metrics")[0] == 200
        log = dep.log_since(log_from)
        for crash in ("Bus error", "Segmentation fault", "Traceback"):
            assert crash not in log, log[-3000:]
        # The kills above are this test's; no daemon exited on a signal of its own.
        assert "exited on signal" not in log.replace("signal 9", ""), log[-3000:]
