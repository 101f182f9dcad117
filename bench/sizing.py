"""How many daemons, and how many threads each: lite over a grid of mod_wsgi sizes.

    sudo .venv/bin/python bench/sizing.py [--seconds 10] [--rounds 2]

Installs lite with serve.sh into a scratch LITE_HOME (as bench/run.py does)
and serves lite_app.py under the same private Apache and lite.conf with
LITE_PROCESSES x LITE_THREADS of 2, 4, 8 and 20 processes x 1 and 4 threads,
one size after another in each round. Each size is warmed up, then driven by
wrk (20 connections, --seconds each) on GET /lite/get and on POST /lite/inc;
for POSTs the counter is read before and after, so that a size that loses an
increment cannot hide it. Reports requests per second and p99 per size and
route (the median over rounds), and each size's ratio to 20 x 1 (lite.conf's
default) within its round. Writes sizing.json and sizing.md into --out
(default bench/).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import run as bench

GRID = [(processes, threads) for threads in (1, 4) for processes in (2, 4, 8, 20)]
DEFAULT = (20, 1)  # lite.conf's


def measure(env: dict, home: str, seconds: float) -> dict:
    """GET and POST of lite at the size `env` sets: req/s, p99, and the POSTs' count check."""
    with bench.served(env, home, "lite", "lite_app.py", "NORMAL") as base:
        url_get, url_inc = f"{base}/lite/get?counter=hits", f"{base}/lite/inc"
        bench.warm_up(url_get)
        result = {"get": bench.wrk(url_get, seconds, post=False)}
        result["inc"] = bench.counted(base, lambda: bench.wrk(url_inc, seconds, post=True))
    bench.truncate_wals(home)
    return result


def summarize(rounds: list[dict], grid: list[tuple[int, int]]) -> list[dict]:
    """One row per size and route: medians over rounds, ratio to DEFAULT within each round."""
    rows = []
    for size in grid:
        key = f"{size[0]}x{size[1]}"
        for route in ("get", "inc"):
            runs = [r[key][route] for r in rounds]
            ratios = [
                r[key][route]["req_per_s"] / r[f"{DEFAULT[0]}x{DEFAULT[1]}"][route]["req_per_s"]
                for r in rounds
            ]
            rows.append(
                {
                    "processes": size[0],
                    "threads": size[1],
                    "route": route,
                    "req_per_s": statistics.median(x["req_per_s"] for x in runs),
                    "p99_ms": statistics.median(x["p99_ms"] for x in runs),
                    "x_default": statistics.median(ratios),
                    "non_2xx": sum(x["non_2xx"] + x["socket_errors"] for x in runs),
                    "lost": sum(max(0, x["ok"] - x["delta"]) for x in runs if "delta" in x),
                    "each_round": [round(x["req_per_s"]) for x in runs],
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| processes x threads | route | req/s | x 20x1 | p99 ms | each round | non-2xx | lost |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        route = "GET /lite/get" if row["route"] == "get" else "POST /lite/inc"
        lines.append(
            f"| {row['processes']} x {row['threads']} | {route} | {row['req_per_s']:.0f} "
            f"| {row['x_default']:.2f} | {row['p99_ms']:.1f} "
            f"| {', '.join(map(str, row['each_round']))} | {row['non_2xx']} | {row['lost']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="each wrk run (10)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the grid (2)")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--out", default=bench.HERE, help="where results go (bench/)")
    parser.add_argument("--sizes", help="comma-separated PxT to measure (default: the grid)")
    args = parser.parse_args(argv)
    grid = GRID
    if args.sizes:
        grid = [tuple(map(int, size.split("x"))) for size in args.sizes.split(",")]
        grid += [DEFAULT] if DEFAULT not in grid else []  # every ratio needs it
    if os.geteuid() != 0:
        sys.exit("sizing: run as root (it installs and starts a private Apache)")
    home = tempfile.mkdtemp(prefix="lite-sizing-", dir="/tmp")
    os.chmod(home, 0o755)
    env = bench.scratch_env(home, args.port)
    rounds = []
    try:
        bench.prepare(home, env, None, django=False, postgres=False, sqla=[])
        for number in range(1, args.rounds + 1):
            results = {}
            for processes, threads in grid:
                print(f"sizing: round {number}: {processes} x {threads}", file=sys.stderr)
                sized = {**env, "LITE_PROCESSES": str(processes), "LITE_THREADS": str(threads)}
                results[f"{processes}x{threads}"] = measure(sized, home, args.seconds)
            rounds.append(results)
    finally:
        bench.shutil.rmtree(home, ignore_errors=True)
    rows = summarize(rounds, grid)
    report = {
        "machine": bench.machine(),
        "command": "sudo .venv/bin/python bench/sizing.py " + " ".join(argv),
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "settings": vars(args) | {"connections": bench.CONNECTIONS},
        "summary": rows,
        "rounds": rounds,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sizing.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "sizing.md"), "w") as f:
        f.write(table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
