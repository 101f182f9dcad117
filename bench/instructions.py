"""CPU per request, in instructions: a repeatable measure on a noisy machine.

    python bench/instructions.py [--code DIR] [--requests 500]
    python bench/instructions.py --breakdown [--requests 500]

Calls an app (lite_app from DIR, default this checkout; or bench's minimal
and hello apps) in-process, as a WSGI app, under `valgrind --tool=callgrind`,
which counts instructions the same whatever else the machine is doing: once
with 1 request and once with 1 + N, for GET /lite/get and for POST
/lite/inc, and prints (difference) / N. To compare with an older lite:
`git show REV:lite_app.py > DIR/lite_app.py` and so on for each module,
then run with --code DIR.

`--breakdown` measures lite with each of its parts switched off in turn
(`--without PART`, the part replaced by a function that does nothing), and
the minimal and hello apps: what each part costs is lite's count less the
count without it; lite's own code is lite's count less minimal's. A
measure only: lite without a part has lost that part's guarantee.
"""

import argparse
import io
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What --without switches off, and how: (module, attribute, replacement).
PARTS = {
    "metrics": "requests and db events, queued and published",
    "config": "the config check on each request",
    "files": "the file identity checks around each write",
    "checkpoint": "the once-a-second checkpoint after a write",
}


def _switch_off(part: str) -> None:
    import lite_config
    import lite_db
    import lite_metrics

    if part == "metrics":
        lite_db.listeners.clear()
        lite_metrics.Metrics.request = lambda self, *args: None
    elif part == "config":
        lite_config.ConfigWatcher.refresh = lambda self, cur, **kwargs: "unchanged"
    elif part == "files":
        lite_db._file_changed = lambda conn: None
    elif part == "checkpoint":
        lite_db._checkpoint_now_and_then = lambda conn: None
    else:
        raise SystemExit(f"unknown part {part!r}: one of {', '.join(PARTS)}")


def _app(code: str, name: str, work: str, without: list[str]) -> Any:
    """The WSGI app `name` on a fresh database in `work`, its counter at 0."""
    config = os.path.join(work, "config.ini")
    with open(config, "w") as out:
        out.write("[counters]\nhits = 0\nmisses = 0\n")
    then = time.time() - 60
    os.utime(config, (then, then))
    db_path = os.path.join(work, "lite.db")
    if name == "lite":
        sys.path.insert(0, code)
        import lite_app

        open(db_path, "wb").close()  # the app, like a server, does not create it
        app = lite_app.make_app(db_path=db_path, config_path=config)
        if without:  # one request first, with every part on: it applies config.ini
            _request(app, "GET")
        for part in without:
            _switch_off(part)
        return app
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER, position INTEGER)")
    db.execute("INSERT INTO counters VALUES ('hits', 0, 0), ('misses', 0, 1)")
    db.commit()
    db.close()
    if name == "minimal":
        import minimal_app

        minimal_app.DB_PATH = db_path
        return minimal_app.application
    import hello_app

    return hello_app.application


def serve_requests(code: str, name: str, without: list[str], method: str, count: int) -> None:
    """The measured part: an app on a fresh database, `count` requests."""
    app = _app(code, name, tempfile.mkdtemp(), without)
    for _ in range(count):
        _request(app, method)


def _request(app: Any, method: str) -> None:
    body = b"counter=hits" if method == "POST" else b""
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": "/lite/inc" if method == "POST" else "/lite/get",
        "QUERY_STRING": "" if method == "POST" else "counter=hits",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "CONTENT_LENGTH": str(len(body)),
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
    }
    statuses: list[str] = []
    b"".join(app(environ, lambda status, headers, exc_info=None: statuses.append(status)))
    if statuses != ["200 OK"]:
        raise SystemExit(f"{method} answered {statuses}: not a measure of the route's work")


def instructions(code: str, name: str, without: list[str], method: str, count: int) -> int:
    argv = [sys.executable, __file__, "--serve", method, str(count), "--code", code]
    argv += ["--app", name] + [arg for part in without for arg in ("--without", part)]
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(re.search(r"Collected : (\d+)", done.stderr).group(1))


def per_request(code: str, name: str, without: list[str], method: str, requests: int) -> float:
    base = instructions(code, name, without, method, 1)
    more = instructions(code, name, without, method, 1 + requests)
    return (more - base) / requests


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", default=ROOT, help="where lite_app.py and its modules are")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--app", choices=("lite", "minimal", "hello"), default="lite")
    parser.add_argument("--without", action="append", default=[], choices=sorted(PARTS))
    parser.add_argument("--breakdown", action="store_true", help="lite by part, minimal, hello")
    parser.add_argument("--serve", nargs=2, metavar=("METHOD", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_requests(args.code, args.app, args.without, args.serve[0], int(args.serve[1]))
        return 0
    if not args.breakdown:
        for method in ("GET", "POST"):
            count = per_request(args.code, args.app, args.without, method, args.requests)
            print(f"{method}: {count:,.0f} instructions per request")
        return 0
    runs = [("lite", []), *(("lite", [part]) for part in PARTS), ("minimal", []), ("hello", [])]
    for method in ("GET", "POST"):
        counts = {
            (name, tuple(without)): per_request(args.code, name, without, method, args.requests)
            for name, without in runs
        }
        lite = counts[("lite", ())]
        own = lite - counts[("minimal", ())]
        print(
            f"{method}: lite {lite:,.0f}, minimal {counts[('minimal', ())]:,.0f},"
            f" hello {counts[('hello', ())]:,.0f}; lite's own code {own:,.0f}"
        )
        for part, what in PARTS.items():
            cost = lite - counts[("lite", (part,))]
            print(f"  {part:<11} {cost:>9,.0f}  ({cost / own:.0%} of lite's own: {what})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
