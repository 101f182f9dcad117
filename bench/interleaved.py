"""Apps side by side: each under its own private Apache, all started at once, short runs in turn.

    sudo .venv/bin/python bench/interleaved.py --apps lite,lite-wait,lite-group \
        --route inc [--rounds 8] [--seconds 5] [--out DIR]

bench/run.py serves one app after another, 30 s or more each: on a shared
machine whose speed drifts over minutes, two apps a minute apart are measured
on different machines. Here every app is served for the whole run (each by
its own Apache, lite.conf's daemons, on its own port and scratch LITE_HOME)
and idles while another is measured; each round runs wrk on every app once,
for a few seconds, in a shuffled order. A ratio is taken within a round, so
a drift slower than a round cancels out; its median and range over rounds
are reported, against the first app named. POST rounds of an app that keeps
a counter (all but hello) also check that every acknowledged increment was
counted (`lost`); the run exits 1 if one was not.
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import run

# Apps served by Apache with nothing to install beyond serve.sh's and run.prepare's.
SERVED = ("hello", "minimal", "lite", "minimal-full", "lite-full", "lite-group", "lite-wait")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", required=True, help=f"comma-separated, of {', '.join(SERVED)}")
    parser.add_argument("--route", choices=("get", "inc"), default="inc")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=5, help="each wrk run (5)")
    parser.add_argument("--processes", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--port", type=int, default=8300, help="the first app's; then +1 each")
    parser.add_argument("--seed", type=int, default=0, help="of the rounds' shuffled orders")
    parser.add_argument("--out", help="where results.json and results.md go (none: printed only)")
    args = parser.parse_args(argv)
    names = args.apps.split(",")
    unknown = sorted(set(names) - set(SERVED))
    if unknown or len(set(names)) != len(names):
        sys.exit(f"interleaved: apps are distinct names of {', '.join(SERVED)}")
    if os.geteuid() != 0:
        sys.exit("interleaved: run as root (it installs and starts private Apaches)")
    scripts = {name: (script, synchronous) for name, script, synchronous in run.APPS}
    shuffle = random.Random(args.seed).shuffle
    served: dict[str, tuple[str, dict]] = {}
    results: dict[str, list[dict]] = {name: [] for name in names}
    try:  # every Apache started is stopped, every scratch home removed, whatever fails
        flush_s = None
        for number, name in enumerate(names):
            home = tempfile.mkdtemp(prefix=f"lite-interleaved-{name}-", dir="/tmp")
            os.chmod(home, 0o755)
            env = run.scratch_env(home, args.port + number) | {
                "LITE_PROCESSES": str(args.processes),
                "LITE_THREADS": str(args.threads),
            }
            served[name] = (home, env)
            if flush_s is None:
                flush_s = run.flush_seconds(home)
            run.prepare(home, env, None, False, False, [], flush_s)
            run.serve(env, *scripts[name], "start")
            run.warm_up(f"{base_of(env)}/lite/get?counter=hits")
        for number in range(1, args.rounds + 1):
            order = list(names)
            shuffle(order)
            for name in order:
                counts = name != "hello"  # hello keeps no counter
                results[name].append(measure(*served[name], args.route, counts, args.seconds))
            line = ", ".join(f"{name} {results[name][-1]['req_per_s']:.0f}" for name in names)
            print(f"interleaved: round {number}: {line}", file=sys.stderr)
    finally:
        stopped = all([stop(home, env, *scripts[name]) for name, (home, env) in served.items()])
    if not stopped:
        sys.exit("interleaved: an Apache did not stop (its scratch home is kept)")
    summary = summarize(results, names[0])
    text = table(summary, names[0], args)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        report = {
            "machine": run.machine(),
            "command": "sudo .venv/bin/python bench/interleaved.py " + " ".join(argv),
            "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "settings": vars(args) | {"connections": run.CONNECTIONS, "flush_s": flush_s},
            "summary": summary,
            "rounds": results,
        }
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(text)
    lost = sum(r.get("lost", 0) for runs in results.values() for r in runs)
    return 1 if lost else 0


def stop(home: str, env: dict, script: str, synchronous: str) -> bool:
    """Stop the Apache serving from `home` and remove `home`; False (logged) if it would not."""
    try:
        run.serve(env, script, synchronous, "stop")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"interleaved: stopping {home}: {exc}", file=sys.stderr)
        return False
    shutil.rmtree(home, ignore_errors=True)
    return True


def base_of(env: dict) -> str:
    return f"http://127.0.0.1:{env['LITE_PORT']}"


def measure(home: str, env: dict, route: str, counts: bool, seconds: int) -> dict:
    """One wrk run on the app served from `home`; with `counts`, what it lost."""
    base = base_of(env)
    if route == "get":
        return run.wrk(f"{base}/lite/get?counter=hits", seconds, post=False, server_home=home)
    if not counts:
        return run.wrk(f"{base}/lite/inc", seconds, post=True, server_home=home)
    result = run.counted(
        base, lambda: run.wrk(f"{base}/lite/inc", seconds, post=True, server_home=home)
    )
    result["lost"] = max(0, result["ok"] - result["delta"])
    return result


def summarize(results: dict[str, list[dict]], first: str) -> dict:
    """Per app: medians over rounds, and its ratio to `first` within each round."""
    summary = {}
    for name, runs in results.items():
        ratios = [
            r["req_per_s"] / f["req_per_s"] for r, f in zip(runs, results[first], strict=True)
        ]
        summary[name] = {
            "req_per_s": statistics.median(r["req_per_s"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "server_cpu_us": statistics.median(r["server_cpu_us"] for r in runs),
            "ratio": round(statistics.median(ratios), 3),
            "ratio_low": round(min(ratios), 3),
            "ratio_high": round(max(ratios), 3),
            "non_2xx": sum(r["non_2xx"] for r in runs),
            "lost": sum(r.get("lost", 0) for r in runs),
        }
    return summary


def table(summary: dict, first: str, args: argparse.Namespace) -> str:
    route = "POST /lite/inc" if args.route == "inc" else "GET /lite/get"
    lines = [
        f"{route}, {args.rounds} rounds of {args.seconds} s, "
        f"{args.processes} x {args.threads} daemons each, medians over rounds",
        "",
        f"| app | req/s | p99 ms | server CPU µs/req | / {first} (median) | range "
        "| non-2xx | lost |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, f in summary.items():
        lines.append(
            f"| {name} | {f['req_per_s']:.0f} | {f['p99_ms']:.1f} | {f['server_cpu_us']:.0f} "
            f"| {f['ratio']:.3f} | {f['ratio_low']:.2f}-{f['ratio_high']:.2f} "
            f"| {f['non_2xx']} | {f['lost']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
