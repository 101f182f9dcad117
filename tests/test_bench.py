"""A smoke run of the benchmark, so that it cannot rot: tiny sizes, no timing checks.

It does check what must hold at any speed: lite (and each integration on
lite: django-lite, fastapi-lite, flask-sqla-lite) answers every request 2xx and
loses no acknowledged increment. The stock apps may lose or fail: not checked.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.apache, pytest.mark.postgres, pytest.mark.slow]


def run_bench(script, args, out):
    """bench/`script` with `args` on a free port of 127.0.0.1, its results into `out`; the port."""
    if os.geteuid() != 0:
        pytest.fail("the benchmark runs as root (run it through ./test.sh)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, os.path.join(ROOT, "bench", script), *args]
    subprocess.run(
        [*argv, "--port", str(port), "--out", str(out)],
        check=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    return port


# Each app is served by 4 daemons, not lite.conf's 20: each daemon imports
# its app at its first request, and 20 doing so for each of 15 apps cost
# this 2-core machine some 40 s more.
SMOKE = ["--seconds", "1", "--rounds", "1", "--siege-requests", "3", "--processes", "4"]


def test_the_benchmark_runs_and_lite_loses_nothing(tmp_path):
    args = list(SMOKE)
    args += ["--baseline", "HEAD"]  # lite as committed, served as lite-prev beside lite
    run_bench("run.py", args, tmp_path)
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["summary"]) == {
        "hello",
        "minimal",
        "lite",
        "minimal-full",
        "lite-full",
        "lite-group",
        "lite-wait",
        "naive",
        "lite-prev",
        "django",
        "django-lite",
        "lite-pg",
        "fastapi",
        "fastapi-lite",
        "flask-sqla",
        "flask-sqla-lite",
    }
    assert report["machine"]["sqlite"]
    assert "ratio_to_lite-prev" in report["summary"]["lite"]["wrk_inc"]
    assert "ratio_to_minimal" in report["summary"]["lite"]["wrk_get"]
    assert "p99_ratio_to_django" in report["summary"]["django-lite"]["wrk_inc"]
    assert "ratio_to_lite" in report["summary"]["lite-pg"]["wrk_inc"]
    assert "p99_ratio_to_fastapi" in report["summary"]["fastapi-lite"]["wrk_inc"]
    assert "p99_ratio_to_flask-sqla" in report["summary"]["flask-sqla-lite"]["wrk_inc"]
    exact = ("lite", "lite-full", "lite-group", "lite-wait", "lite-prev", "django", "django-lite")
    exact += ("lite-pg",)
    for app in (*exact, "fastapi-lite", "flask-sqla-lite"):
        for key, figures in report["summary"][app].items():
            assert figures["non_2xx_total"] == 0, (app, key)
            assert figures["socket_errors"] == 0, (app, key)
            if key.endswith("_inc"):
                assert figures["lost_total"] == 0, (app, key)
                assert figures["ok"] > 0
    for app in ("lite", "fastapi-lite", "flask-sqla-lite"):
        siege_inc = report["rounds"][0][app]["siege_inc"]
        assert siege_inc["ok"] == siege_inc["delta"] == 20 * 3, app  # siege sends a fixed count
    assert all(row["exact"] for row in report["sqlite_alone"])
    assert (tmp_path / "results.png").stat().st_size > 0
    assert "| lite | wrk | POST /lite/inc |" in (tmp_path / "results.md").read_text()


def test_group_commit_on_a_slower_disk_runs_and_loses_nothing(tmp_path):
    args = [*SMOKE, "--no-sqlite-alone", "--apps", "lite,lite-group", "--flush-delays", "1"]
    run_bench("run.py", args, tmp_path)
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["summary"]) == {"hello", "lite", "lite-group", "lite@1ms", "lite-group@1ms"}
    for name in ("lite-group", "lite-group@1ms"):
        figures = report["summary"][name]["wrk_inc"]
        assert figures["non_2xx_total"] == 0 and figures["lost_total"] == 0, name
        assert figures["ok"] > 0
        assert f"ratio_to_{name.replace('lite-group', 'lite')}" in figures  # same disk
        assert report["closed_loop_bounds"][name]["bound_req_per_s"] > 0
    assert "| lite-group@1ms |" in (tmp_path / "results.md").read_text()


def test_the_sizing_grid_runs_and_lite_loses_nothing(tmp_path):
    run_bench("sizing.py", ["--seconds", "1", "--rounds", "1", "--sizes", "2x4"], tmp_path)
    report = json.loads((tmp_path / "sizing.json").read_text())
    rows = {(r["processes"], r["threads"], r["route"]): r for r in report["summary"]}
    assert set(rows) == {(p, t, route) for p, t in ((2, 4), (20, 1)) for route in ("get", "inc")}
    for row in rows.values():
        assert row["req_per_s"] > 0 and row["non_2xx"] == 0 and row["lost"] == 0, row
    assert "| 2 x 4 | POST /lite/inc |" in (tmp_path / "sizing.md").read_text()


def test_the_slower_disk_delays_every_flush_and_nothing_else(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import run as bench

    library = bench.build_slow_flush(str(tmp_path))
    code = (
        "import os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "began = time.monotonic()\n"
        "for _ in range(20): os.pwrite(fd, b'x', 0)\n"
        "wrote = time.monotonic()\n"
        "for _ in range(5): os.fdatasync(fd)\n"
        "os.fsync(fd)\n"
        "print(wrote - began, time.monotonic() - wrote)\n"
    )
    env = {**os.environ, "LD_PRELOAD": library, "SLOW_FLUSH_MS": "50"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "f")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    writing, flushing = map(float, done.stdout.split())
    assert flushing >= 6 * 0.050  # each of the six flushes slept its 50 ms
    assert writing < 0.050  # writes are not delayed


def test_interleaved_apps_run_side_by_side_and_lose_nothing(tmp_path):
    args = ["--apps", "lite,lite-group", "--route", "inc", "--rounds", "2", "--seconds", "1"]
    port = run_bench("interleaved.py", [*args, "--processes", "2"], tmp_path)
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["rounds"]) == {"lite", "lite-group"}
    for name, runs in report["rounds"].items():
        assert len(runs) == 2, name
        for figures in runs:
            assert figures["ok"] > 0 and figures["non_2xx"] == 0 and figures["lost"] == 0, name
    assert report["summary"]["lite"]["ratio"] == 1.0  # each round against itself
    assert "| lite-group |" in (tmp_path / "results.md").read_text()
    for each in (port, port + 1):  # both Apaches stopped
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", each))
