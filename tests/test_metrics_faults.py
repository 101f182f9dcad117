"""Metrics are never load-bearing: whatever happens to the metrics directory
(full, read-only, removed, replaced, its files truncated or overwritten),
every route but /metrics answers as it would without metrics, no process
dies, /metrics answers a JSON 503 naming the reason or the sums, and once
the directory is repaired the sums come back exact: no count made through
the fault is lost.

Real processes: gunicorn's sync workers (2, forked, as mod_wsgi's daemons)
with the metrics directory on a small tmpfs of the test's, mounted and
unmounted by path. Needs root (mount); the suite runs as root.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

import deploy
import pytest
import servers
from prometheus_client.parser import text_string_to_metric_families

import lite_metrics

pytestmark = [pytest.mark.root, pytest.mark.slow]

WORKERS = 2
ROUTES = (
    ("GET", "/lite/get"),
    ("POST", "/lite/inc"),
    ("GET", "/lite/live"),
    ("GET", "/lite/health"),
)


@pytest.fixture
def mounted(tmp_path):
    """A 2 MiB tmpfs at tmp_path/fs, unmounted afterwards."""
    if os.geteuid() != 0:
        raise RuntimeError("mounting a tmpfs needs root (run the suite through ./test.sh)")
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(fs)], check=True)
    try:
        yield fs
    finally:
        subprocess.run(["umount", str(fs)], check=True)


@contextlib.contextmanager
def served(tmp_path, metrics_dir, monkeypatch):
    """lite_app under gunicorn, WORKERS sync workers, metrics in metrics_dir.

    Yields (port, gunicorn's log, lite's log, the master's PID).
    """
    work = tmp_path / "work"
    work.mkdir()
    servers.prepare(str(work))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    monkeypatch.setenv("LITE_LOG_FILE", str(work / "lite.log"))
    pid_file = work / "gunicorn.pid"
    argv = ["{bin}/gunicorn", "-b", "127.0.0.1:{port}", "-w", str(WORKERS), "-p", str(pid_file)]
    with servers.serving([*argv, "lite_app:application"], str(work)) as (port, log):
        yield port, log, str(work / "lite.log"), int(pid_file.read_text())


def request(port, method, path):
    """(status, headers, body) of one request to 127.0.0.1:port."""
    data = b"counter=hits" if method == "POST" else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status, res.headers, res.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read().decode()


def workers(master):
    return sorted(deploy.children(master))


def serve_rounds(port, rounds):
    """Each route `rounds` times: the statuses seen, and the increments acknowledged."""
    statuses = {}
    acknowledged = 0
    for _ in range(rounds):
        for method, path in ROUTES:
            status = request(port, method, path)[0]
            statuses.setdefault(path, set()).add(status)
            acknowledged += method == "POST" and status == 200
    return statuses, acknowledged


def scrape(port):
    """/metrics: (status, {sample: value} or the JSON error)."""
    status, headers, body = request(port, "GET", "/metrics")
    if status != 200:
        assert status == 503, body
        assert headers["Content-Type"] == "application/json" and headers["Retry-After"] == "1"
        assert body.startswith('{"error": "metrics unavailable: ') and "Traceback" not in body
        return status, body
    return status, {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


INC_200 = (
    "lite_http_requests_total",
    (("method", "POST"), ("route", "/lite/inc"), ("status", "200")),
)


def wait_for_exact_count(port, expected, timeout_s=10):
    """Requests to every worker until a scrape counts exactly the increments
    acknowledged: `expected` and those made here."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        expected += serve_rounds(port, 2)[1]  # a worker writes its files again on its next count
        status, samples = scrape(port)
        last = samples
        if status == 200 and samples.get(INC_200) == expected:
            return
        time.sleep(0.3)
    raise AssertionError(f"never counted {expected} increments; last scrape: {last!r:.2000}")


def fill(fs):
    subprocess.run(["dd", "if=/dev/zero", f"of={fs}/filler", "bs=64k"], capture_output=True)


def overwrite(metrics_dir):
    """Every file replaced in place by bytes whose first entry's length is negative:
    prometheus_client's own reader loops on it for ever."""
    for name in os.listdir(metrics_dir):
        if name.endswith(".db"):
            path = os.path.join(metrics_dir, name)
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.write(
                    (64).to_bytes(4, "little") + bytes(4) + (-28).to_bytes(4, "little", signed=True)
                )
                f.write(b"\xff" * max(0, size - 12))


def truncate(metrics_dir):
    for index, name in enumerate(sorted(os.listdir(metrics_dir))):
        if name.endswith(".db"):
            path = os.path.join(metrics_dir, name)
            os.truncate(path, 0 if index % 2 else os.path.getsize(path) // 2)


def remove(fs, metrics_dir):
    """Gone at once (a rename), then deleted: a file by file rmtree races the workers,
    which write their files again as soon as they see them gone."""
    metrics_dir.rename(fs / "removed")
    shutil.rmtree(fs / "removed")


def read_only(fs, metrics_dir):
    """The directory seen through a read-only bind mount: files open for writing stay writable."""
    subprocess.run(["mount", "--bind", str(metrics_dir), str(metrics_dir)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(metrics_dir)], check=True)


# fault: (break it, repair it); each takes (fs, metrics_dir).
FAULTS = {
    "full": (lambda fs, d: fill(fs), lambda fs, d: os.unlink(fs / "filler")),
    "read-only": (read_only, lambda fs, d: subprocess.run(["umount", str(d)], check=True)),
    "removed": (lambda fs, d: remove(fs, d), lambda fs, d: d.mkdir(exist_ok=True)),
    "replaced": (lambda fs, d: (d.rename(fs / "old"), d.mkdir()), lambda fs, d: None),
    "truncated": (lambda fs, d: truncate(d), lambda fs, d: None),
    "overwritten": (lambda fs, d: overwrite(d), lambda fs, d: None),
}
# Faults after which new workers are started: they cannot make their files.
RESTART_WORKERS = {"full", "read-only"}
# Faults under which /metrics cannot sum until repaired: it must say so (a 503).
# Files truncated or overwritten are written again by their processes within
# CHECK_S; a scrape before that is a 503 naming the file.
REFUSED = {"read-only", "removed"}


def restart_workers(master):
    """SIGKILL every worker by PID; the new workers' PIDs once gunicorn has started them.

    First waits for the workers to publish what they counted: a SIGKILL
    loses the counts of the last PUBLISH_S (tests/test_metrics.py bounds that).
    """
    time.sleep(lite_metrics.PUBLISH_S + 0.25)
    old = workers(master)
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while len(set(workers(master)) - set(old)) < WORKERS:
        assert time.monotonic() < deadline, "gunicorn did not start new workers"
        time.sleep(0.1)
    return workers(master)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_broken_metrics_directory_takes_nothing_down(tmp_path, mounted, monkeypatch, fault):
    metrics_dir = mounted / "metrics"
    metrics_dir.mkdir()
    break_it, repair = FAULTS[fault]
    with served(tmp_path, metrics_dir, monkeypatch) as (port, log, lite_log, master):
        before, acknowledged = serve_rounds(port, 5)
        assert all(statuses == {200} for statuses in before.values()), before
        break_it(mounted, metrics_dir)
        pids = restart_workers(master) if fault in RESTART_WORKERS else workers(master)
        during, more = serve_rounds(port, 10)
        acknowledged += more
        scrapes = {scrape(port)[0] for _ in range(4)}
        assert workers(master) == pids, "a worker died"
        assert all(statuses == {200} for statuses in during.values()), during
        assert scrapes <= {200, 503}
        # A removed directory was seen made again by the workers' requests in about
        # half the runs, cause not yet found: a 503 is required while it is missing.
        if fault in REFUSED and metrics_dir.exists() is (fault != "removed"):
            assert 503 in scrapes, f"/metrics summed a {fault} directory without saying so"
        repair(mounted, metrics_dir)
        wait_for_exact_count(port, acknowledged)
        assert workers(master) == pids, "a worker died"
        for pid in pids:  # never mapped: a page the file system cannot back would be a SIGBUS
            with open(f"/proc/{pid}/maps") as maps:
                assert str(metrics_dir) not in maps.read()
    with open(log) as f:
        text = f.read()
    assert "Traceback" not in text and "Bus error" not in text, text[-3000:]
    with open(lite_log) as f:
        warnings = [line for line in f if " WARNING lite_metrics: " in line]
    assert warnings, f"nothing logged about the {fault} directory"
    assert len(warnings) == len(set(warnings)), warnings  # once per cause and process


def test_files_read_by_prometheus_client_and_by_lite_alike(tmp_path):
    """lite writes prometheus_client's file format, and reads the files it writes."""
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    theirs = str(tmp_path / "counter_1.db")
    written = MmapedDict(theirs)
    keys = [mmap_key("m", "m_total", ("route",), (route,), "help") for route in ("/a", "/bb" * 9)]
    for number, key in enumerate(keys):
        written.write_value(key, number + 0.5, 0.0)
    written.close()
    assert lite_metrics.read_file(theirs) == [(key, n + 0.5, 0.0) for n, key in enumerate(keys)]
    ours = str(tmp_path / "counter_2.db")
    lite_metrics._write_file(ours, {key: [n + 0.5, 0.0] for n, key in enumerate(keys)})
    assert [entry[:3] for entry in MmapedDict.read_all_values_from_file(ours)] == [
        (key, n + 0.5, 0.0) for n, key in enumerate(keys)
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"\x01",
        (4096).to_bytes(4, "little") + bytes(4),
        (64).to_bytes(4, "little")
        + bytes(4)
        + (-28).to_bytes(4, "little", signed=True)
        + bytes(52),
        (32).to_bytes(4, "little")
        + bytes(4)
        + (4).to_bytes(4, "little")
        + b"\xff\xfe\xfd\xfc"
        + bytes(16),
        (32).to_bytes(4, "little") + bytes(4) + (4).to_bytes(4, "little") + b"[1] " + bytes(16),
    ],
    ids=["short", "used-past-end", "negative-length", "not-utf-8", "not-a-key"],
)
def test_a_file_that_is_not_a_metrics_file_is_refused_by_name(tmp_path, data):
    path = tmp_path / "counter_3.db"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=r"counter_3\.db is not a metrics file"):
        lite_metrics.read_file(str(path))
