"""CPU per request, in instructions: a repeatable measure on a noisy machine.

    python bench/instructions.py [--code DIR] [--requests 500]

Calls lite_app (from DIR, default this checkout) in-process, as a WSGI app,
under `valgrind --tool=callgrind`, which counts instructions the same
whatever else the machine is doing: once with 1 request and once with
1 + N, for GET /lite/get and for POST /lite/inc, and prints (difference) / N.
To compare with an older lite: `git show REV:lite_app.py > DIR/lite_app.py`
and so on for each module, then run with --code DIR.
"""

import argparse
import io
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def serve_requests(code: str, method: str, count: int) -> None:
    """The measured part: an app on a fresh database, `count` requests."""
    sys.path.insert(0, code)
    import lite_app

    work = tempfile.mkdtemp()
    config = os.path.join(work, "config.ini")
    with open(config, "w") as out:
        out.write("[counters]\nhits = 0\nmisses = 0\n")
    then = time.time() - 60
    os.utime(config, (then, then))
    db_path = os.path.join(work, "lite.db")
    open(db_path, "wb").close()  # the app, like a server, does not create it
    app = lite_app.make_app(db_path=db_path, config_path=config)
    body = b"counter=hits" if method == "POST" else b""
    for _ in range(count):
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
        b"".join(app(environ, lambda status, headers, exc_info=None: None))


def instructions(code: str, method: str, count: int) -> int:
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--serve",
            method,
            str(count),
            "--code",
            code,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(re.search(r"Collected : (\d+)", done.stderr).group(1))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", default=ROOT, help="where lite_app.py and its modules are")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--serve", nargs=2, metavar=("METHOD", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_requests(args.code, args.serve[0], int(args.serve[1]))
        return 0
    for method in ("GET", "POST"):
        base = instructions(args.code, method, 1)
        more = instructions(args.code, method, 1 + args.requests)
        print(f"{method}: {(more - base) / args.requests:,.0f} instructions per request")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
