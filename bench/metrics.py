"""How long a /metrics scrape takes with many dead daemons' files behind it.

Starts lite with serve.sh (20 daemons x 1 thread) in a scratch LITE_HOME on
127.0.0.1, then kills every daemon with SIGKILL, round after round, with
load between rounds so that each new daemon serves (and so has metric files)
before it is killed: mod_wsgi starts new ones, and each new one folds its
predecessors' files into the archives as it starts. Measures the scrape
(HTTP, sequential) before the first round and after the last, and, for
comparison, what prometheus_client's own collector costs over the same dead
daemons' files left unfolded (copied aside before each round).

Run as root: sudo .venv/bin/python bench/metrics.py [--restarts 500]
Writes bench/metrics/results.json and results.md.
"""

import argparse
import concurrent.futures
import glob
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from prometheus_client.multiprocess import MultiProcessCollector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import lite_metrics  # noqa: E402 - from this checkout

OUT = os.path.join(ROOT, "bench", "metrics")
SCRAPES = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as res:
        return res.read()


def daemons(apache: int) -> list[int]:
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(stat[: -len("stat")] + "cmdline", "rb") as f:
                daemon = f.read().startswith(b"(wsgi:lite)")
        except OSError:
            continue
        if daemon and fields[0] != "Z" and int(fields[1]) == apache:
            found.append(int(stat.split("/")[2]))
    return found


def load(base: str, seconds: float) -> None:
    """20 clients reading for `seconds`, so that every daemon serves."""
    deadline = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < deadline:
            get(base + "/lite/get")

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        for done in [pool.submit(client) for _ in range(20)]:
            done.result()


def timed(action, times: int) -> dict:
    took = []
    for _ in range(times):
        began = time.perf_counter()
        action()
        took.append((time.perf_counter() - began) * 1000)
    took.sort()
    return {
        "median_ms": round(statistics.median(took), 2),
        "p99_ms": round(took[min(len(took) - 1, int(len(took) * 0.99))], 2),
        "max_ms": round(took[-1], 2),
        "n": times,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=500, help="daemons to kill in all")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("run as root: serve.sh installs and starts Apache")
    home = tempfile.mkdtemp(prefix="lite-bench-metrics-", dir="/tmp")
    os.chmod(home, 0o755)
    aside = tempfile.mkdtemp(prefix="lite-bench-unfolded-")
    port = free_port()
    env = {**os.environ, "LITE_HOME": home, "LITE_PORT": str(port)}
    base = f"http://127.0.0.1:{port}"
    metrics_dir = os.path.join(home, "apache", "metrics")
    serve = os.path.join(ROOT, "serve.sh")
    try:
        subprocess.run([serve, "start"], env=env, check=True, capture_output=True)
        with open(os.path.join(home, "apache", "run", "httpd.pid")) as f:
            apache = int(f.read())
        load(base, 2.0)
        before = timed(lambda: get(base + "/metrics"), SCRAPES)
        files_before = len(glob.glob(os.path.join(metrics_dir, "*.db")))
        killed = 0
        while killed < args.restarts:
            pids = daemons(apache)[: args.restarts - killed]
            for pid in pids:  # the files of those that served, unfolded, for comparison
                for name in glob.glob(os.path.join(metrics_dir, f"*_{pid}.db")):
                    shutil.copy(name, aside)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed += len(pids)
            time.sleep(0.5)
            load(base, 1.5)
        load(base, 1.0)
        after = timed(lambda: get(base + "/metrics"), SCRAPES)
        files_after = len(glob.glob(os.path.join(metrics_dir, "*.db")))
        unfolded_files = len(os.listdir(aside))
        unfolded = timed(lambda: list(MultiProcessCollector(None, aside).collect()), 10)
        folded_once = timed(lambda: lite_metrics.fold_dead_processes(aside), 1)
        after_fold = timed(lambda: list(MultiProcessCollector(None, aside).collect()), 10)
    finally:
        subprocess.run([serve, "stop"], env=env, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
    results = {
        "restarts": killed,
        "scrape_http_before": {**before, "files": files_before},
        "scrape_http_after": {**after, "files": files_after},
        "unfolded_collect": {**unfolded, "files": unfolded_files},
        "fold_of_all_of_them_at_once": folded_once,
        "collect_after_that_fold": after_fold,
        "machine": os.uname().nodename + f", {os.cpu_count()} cores",
    }
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = [
        f"# /metrics with {killed} daemons killed behind it",
        "",
        "`sudo .venv/bin/python bench/metrics.py` (20 daemons x 1 thread, SIGKILL rounds).",
        "",
        "| what | files | median ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for label, key in [
        ("scrape over HTTP, before the first kill", "scrape_http_before"),
        (f"scrape over HTTP, after {killed} kills", "scrape_http_after"),
        (
            "prometheus_client's collector over the dead daemons' files, unfolded",
            "unfolded_collect",
        ),
        ("folding all of those at once (one time)", "fold_of_all_of_them_at_once"),
        ("the collector after that fold", "collect_after_that_fold"),
    ]:
        row = results[key]
        lines.append(
            f"| {label} | {row.get('files', '')} | {row['median_ms']} | {row['p99_ms']} |"
            f" {row['max_ms']} |"
        )
    with open(os.path.join(OUT, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
