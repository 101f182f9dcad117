"""lite's benchmark: each app under the same private Apache + mod_wsgi as lite.conf.

    sudo .venv/bin/python bench/run.py [--seconds 10] [--rounds 3]

Installs lite with serve.sh into a scratch LITE_HOME, adds the benchmark's own
apps beside lite_app.py, and in each round serves, one after another, with
the same lite.conf (processes=20 threads=1, or --processes N --threads M; FastAPI, being ASGI,
under uvicorn):

- hello       bench/hello_app.py: a constant, the server's ceiling
- minimal     bench/minimal_app.py: the least SQLite work a counter can be (one
              statement, no checks, no retries): SQLite's own cost here
- lite        lite_app.py, synchronous=NORMAL
- minimal-full  and lite-full: the same two with synchronous=FULL
- lite-group  lite_app.py with group commit (LITE_SYNCHRONOUS=GROUP): each
              increment acknowledged once on disk, one flush for many
- lite-wait   lite_app.py whose every increment, after its commit, sleeps as
              long as one flush and flushes nothing: what waiting for a
              flush costs any design, the most lite-group could reach
- naive       bench/naive_app.py: a connection per request, SELECT then UPDATE
- lite-prev   with --baseline REV: lite as it was at git revision REV (its own
              database), to compare a change with what it replaces
- django      examples/django_counter (one model, F() in atomic()) on Django's
              own sqlite3 backend as its docs advise for concurrency
              (IMMEDIATE, WAL, timeout 5 s)
- django-lite the same app on lite_django
- lite-pg     lite_app.py on PostgreSQL (LITE_DATABASE_URL): a private
              PostgreSQL 15 (scripts/postgres.sh) in the scratch home, over
              TCP on 127.0.0.1
- fastapi     examples/fastapi_app.py (FastAPI, SQLAlchemy's asyncio ORM) on
              SQLAlchemy's defaults (sqlite+aiosqlite://), under
              `uvicorn --workers 4` on 127.0.0.1 (not Apache: it is ASGI),
              run as the daemons' user, without an access log
- fastapi-lite  the same app on lite's dialect (sqlite+aiolite://)
- flask-sqla  examples/flask_sqlalchemy_app.py (Flask-SQLAlchemy) on
              SQLAlchemy's defaults (sqlite://)
- flask-sqla-lite  the same app on lite's dialect (sqlite+lite://)

`--apps` picks some of them (hello is always measured: every ratio needs it).
`--flush-delays 1,5` also serves each app but hello on a slower disk: every
fsync and fdatasync of Apache and its daemons then takes that many
milliseconds more (bench/slow_flush.c, built here and given by LD_PRELOAD);
those rows are named app@1ms, app@5ms. For lite-group, each delay's row also
gives the closed-loop bound: CONNECTIONS clients, each waiting for its flush,
cannot exceed CONNECTIONS / (lite's mean latency at that delay + one flush),
one flush being the delay plus this disk's own fdatasync, measured here.

The four SQLAlchemy apps each have their own database file in the scratch
home, and a small entry script that sets LITE_DATABASE_URL and registers
lite's dialects before it imports the example (lite_sqlalchemy.py is copied
beside the app, not installed, so no entry point names them). Their schema is
made beforehand, as the daemons' user (who must own the files), by the
example's own startup code: run_once / run_once_async with its create_schema.
The stock apps too, so that their startup races (every process making the
schema at once) stay out of the steady-state measurement.

Each app is warmed up by GETs until its throughput stops rising (every server
process has imported it: warm_up), then its GET /lite/get and POST /lite/inc
are driven by wrk (20 connections, fixed time) and by siege (-b -c20, a fixed
number of requests). For POSTs the counter is read before and after (once it
has settled: POSTs in flight when the client stopped are still applied):
acknowledged (2xx) minus the counter's delta is what was lost. Then SQLite
alone (bench/sqlite_alone.py). Ratios (to hello, lite's to minimal and to
lite-prev, and each integration's on lite to the same app on stock: COMPARED)
are taken within a round, and the median over rounds is reported. Writes
results.json, results.md and results.png into --out (default bench/).
"""

import argparse
import contextlib
import http.client
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import sqlite_alone  # noqa: E402

APPS = [
    ("hello", "hello_app.py", "NORMAL"),
    ("minimal", "minimal_app.py", "NORMAL"),
    ("lite", "lite_app.py", "NORMAL"),
    ("minimal-full", "minimal_app.py", "FULL"),
    ("lite-full", "lite_app.py", "FULL"),
    ("lite-group", "lite_app.py", "GROUP"),
    ("lite-wait", "lite_wait_app.py", "GROUP"),
    ("naive", "naive_app.py", "NORMAL"),
    ("lite-prev", "lite_prev_app.py", "NORMAL"),
    ("django", "django_stock_wsgi.py", "NORMAL"),
    ("django-lite", "django_wsgi.py", "NORMAL"),
    ("lite-pg", "lite_pg_app.py", "NORMAL"),
    ("fastapi", "fastapi_stock_asgi.py", "NORMAL"),
    ("fastapi-lite", "fastapi_lite_asgi.py", "NORMAL"),
    ("flask-sqla", "flask_sqla_stock_wsgi.py", "NORMAL"),
    ("flask-sqla-lite", "flask_sqla_lite_wsgi.py", "NORMAL"),
]
# An app's ratios to each of these, besides hello, when they ran in the same rounds.
COMPARED = {
    "lite": ("minimal", "lite-prev"),
    "lite-full": ("minimal-full",),
    "lite-group": ("lite", "lite-full", "lite-wait"),
    "lite-wait": ("lite",),
    "django-lite": ("django",),
    "lite-pg": ("lite",),
    "fastapi-lite": ("fastapi",),
    "flask-sqla-lite": ("flask-sqla",),
}
DJANGO_APPS = ("django", "django-lite")
# The SQLAlchemy examples: app -> (example module, the name its entry script
# serves the example's `app` under: mod_wsgi's `application`, or uvicorn's `app`;
# URL scheme).
SQLA_APPS = {
    "fastapi": ("fastapi_app", "app", "sqlite+aiosqlite"),
    "fastapi-lite": ("fastapi_app", "app", "sqlite+aiolite"),
    "flask-sqla": ("flask_sqlalchemy_app", "application", "sqlite"),
    "flask-sqla-lite": ("flask_sqlalchemy_app", "application", "sqlite+lite"),
}
UVICORN_APPS = ("fastapi", "fastapi-lite")  # ASGI: served by uvicorn, not Apache
UVICORN_WORKERS = 4
# What they need in the venv, at requirements-dev.txt's pins (FastAPI's own
# dependencies, pydantic and starlette among them, come with it).
SQLA_PACKAGES = (
    "sqlalchemy",
    "greenlet",
    "aiosqlite",
    "fastapi",
    "uvicorn",
    "flask",
    "flask-sqlalchemy",
)
SQLA_FILES = ("lite_sqlalchemy.py", "examples/fastapi_app.py", "examples/flask_sqlalchemy_app.py")
# The entry script of each: its database, lite's dialects, the example. The
# dialects are registered here because the copied lite_sqlalchemy.py is not
# installed, so no entry point names them; registering them for the stock
# apps too changes nothing there.
SQLA_ENTRY = """import os
os.environ["LITE_DATABASE_URL"] = {url!r}
from sqlalchemy.dialects import registry
registry.register("sqlite.lite", "lite_sqlalchemy", "LiteDialect")
registry.register("sqlite.aiolite", "lite_sqlalchemy", "LiteDialect_async")
from {module} import app as {name}  # noqa: E402
"""
# Makes an example's schema as its own processes would at startup, once:
# argv: the entry module, the example module.
SQLA_SCHEMA = """import asyncio, importlib, sys
importlib.import_module(sys.argv[1])
example = importlib.import_module(sys.argv[2])
if sys.argv[2] == "fastapi_app":
    async def startup():
        # run_once_async(engine, ..., create_schema), then the engine disposed
        async with example.lifespan(example.app):
            pass
    asyncio.run(startup())
else:
    with example.app.app_context():
        example.schema_once()  # run_once(db.engine, ..., create_schema)
        example.db.engine.dispose()
"""
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
PREV_DIR = "prev"  # where lite-prev's files go, beside lite_app.py
# The WSGI script that serves lite-prev: its own modules first on the path,
# and its own database, so that neither version touches the other's tables.
PREV_APP = """import os, sys
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "prev"))
os.environ["LITE_DB_PATH"] = os.path.join(here, "data", "prev.db")
os.environ["LITE_CONFIG_PATH"] = os.path.join(here, "config.ini")
import lite_app
application = lite_app.application
"""
# The WSGI script that serves lite on the bench's private PostgreSQL.
PG_APP = """import os
os.environ["LITE_DATABASE_URL"] = {url!r}
import lite_app
application = lite_app.application
"""
# lite-wait: lite whose every increment, after its commit, sleeps as long as
# one flush (this disk's, plus SLOW_FLUSH_MS) and flushes nothing.
WAIT_APP = """import os
import time
import lite_db
FLUSH_S = {flush_s!r} + float(os.environ.get("SLOW_FLUSH_MS", 0)) / 1000
lite_db.GroupCommit.wait = lambda self, deadline: time.sleep(FLUSH_S)
import lite_app
application = lite_app.application
"""
CONNECTIONS = 20
WARM_UP_GAIN = 1.1  # warm: a second of GETs no more than 10% above the one before
WARM_UP_MAX_S = 30
SETTLE_S = 0.2  # the counter is read after a POST run once it stays this long unchanged
SETTLE_MAX_S = 10
POST_BODY = "counter=hits"


def run(
    cmd: list[str], env: dict | None = None, timeout: float = 600, cwd: str | None = None
) -> str:
    done = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done.stdout


def as_daemon_user(code: str, *args: str) -> None:
    """Run Python `code` as the daemons' user, who must own the files it makes."""
    run(["runuser", "-u", "www-data", "--", "/usr/bin/python3", "-c", code, *args])


def counter(base: str) -> int:
    with urllib.request.urlopen(f"{base}/lite/get?counter=hits", timeout=30) as res:
        return json.load(res)["value"]


def counted(base: str, increments: Callable[[], dict]) -> dict:
    """What `increments()` returns, with "delta": how far the counter at `base` moved
    through it, read once settled (see settled_counter)."""
    before = counter(base)
    result = increments()
    result["delta"] = settled_counter(base) - before
    return result


def settled_counter(base: str) -> int:
    """The counter once it has stopped moving (SETTLE_S without a change).

    The POSTs in flight when a run's client stops are still applied by the
    server: their increments belong to that run's delta, not to the next one's.
    """
    value = counter(base)
    deadline = time.monotonic() + SETTLE_MAX_S
    while time.monotonic() < deadline:
        time.sleep(SETTLE_S)
        value, previous = counter(base), value
        if value == previous:
            break
    return value


def server_pids(home: str) -> list[int]:
    """The private Apache's parent (its PidFile) and every process it started."""
    with open(os.path.join(home, "apache", "run", "httpd.pid")) as f:
        parent = int(f.read())
    pids = [parent]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                    pids.append(int(entry))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes `pids` have used so far (those gone count 0)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time every core of the machine has spent busy: not idle, waiting for I/O or stolen."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]  # user nice system idle iowait ...
    return (sum(fields[:7]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, seconds: float, post: bool, server_home: str | None = None) -> dict:
    """One wrk run. With `server_home` (a private Apache's LITE_HOME), also the
    CPU time per request of that server's processes and of the whole machine."""
    env = dict(os.environ)
    env.pop("WRK_BODY", None)
    if post:
        env["WRK_BODY"] = POST_BODY
    pids = server_pids(server_home) if server_home else []
    cpu_before, busy_before = cpu_seconds(pids), machine_busy_seconds()
    out = run(
        [
            "wrk",
            "-t2",
            f"-c{CONNECTIONS}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            os.path.join(HERE, "wrk_count.lua"),
            url,
        ],
        env=env,
        timeout=seconds + 60,
    )
    status_line = re.search(r"^STATUS(.*)$", out, re.MULTILINE).group(1)
    statuses = {int(k): int(v) for k, v in re.findall(r"(\d+)=(\d+)", status_line)}
    p50, p99 = map(int, re.search(r"LATENCY p50=(\d+) p99=(\d+)", out).groups())
    errors = sum(int(n) for n in re.findall(r"=(\d+)", re.search(r"ERRORS (.*)", out).group(1)))
    ok = sum(n for status, n in statuses.items() if 200 <= status < 300)
    answered = max(1, sum(statuses.values()))
    cpu = {}
    if pids:
        cpu["server_cpu_us"] = round((cpu_seconds(pids) - cpu_before) * 1e6 / answered, 1)
        cpu["machine_cpu_us"] = round((machine_busy_seconds() - busy_before) * 1e6 / answered, 1)
    return cpu | {
        "req_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "ok": ok,
        "non_2xx": sum(statuses.values()) - ok,
        "socket_errors": errors,
        "p50_ms": p50 / 1000,
        "p99_ms": p99 / 1000,
    }


def siege(url: str, requests_per_user: int, post: bool, rc: str) -> dict:
    target = f"{url} POST {POST_BODY}" if post else url
    done = subprocess.run(
        ["siege", "-R", rc, "-b", f"-c{CONNECTIONS}", f"-r{requests_per_user}", target],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("HTTP/")]
    ok = sum(1 for line in lines if re.match(r"HTTP/[\d.]+ 2\d\d ", line))
    rate = re.search(r"Transaction rate:\s+([\d.]+)", done.stderr)
    failed = re.search(r"Failed transactions:\s+(\d+)", done.stderr)
    return {
        "req_per_s": float(rate.group(1)) if rate else 0.0,
        "ok": ok,
        "non_2xx": len(lines) - ok,
        "socket_errors": int(failed.group(1)) if failed else -1,
        "sent": len(lines),
    }


def warm_up(url: str) -> None:
    """GETs on CONNECTIONS keep-alive connections until every server process has loaded its app.

    Warm once, in one second, every connection had an answer and the number of
    answers rose by no more than WARM_UP_GAIN over the second before (at most
    WARM_UP_MAX_S). A daemon imports its app at its first request: 20 of them
    importing Flask and SQLAlchemy (about 1 s of CPU each) take some 10 s of a
    2-core machine, during which the connections they hold get nothing while the
    daemon already warm answers the others at a steady rate.
    """
    parts = urllib.parse.urlsplit(url)
    target = f"{parts.path}?{parts.query}"
    stop = threading.Event()
    answered = [0] * CONNECTIONS

    def client(number: int) -> None:
        conn = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
                conn.request("GET", target)
                conn.getresponse().read()
                answered[number] += 1
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.1)
        if conn is not None:
            conn.close()

    clients = [threading.Thread(target=client, args=(n,)) for n in range(CONNECTIONS)]
    for thread in clients:
        thread.start()
    before, previous, elapsed = [0] * CONNECTIONS, 0, 0
    try:
        while elapsed < WARM_UP_MAX_S:
            time.sleep(1)
            elapsed += 1
            now = list(answered)
            each = [a - b for a, b in zip(now, before, strict=True)]
            before, rate = now, sum(each)
            if min(each) > 0 and rate <= previous * WARM_UP_GAIN:
                break
            previous = rate
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    print(f"bench: warmed up in {elapsed} s", file=sys.stderr)


def drive(
    base: str, seconds: float, rc: str, siege_requests: int, counts: bool, server_home: str | None
) -> dict:
    """Every measurement of one served app: wrk and siege, GET and POST.

    `counts`: the app keeps a counter, so acknowledged increments can be
    checked against it. `server_home`: the app runs under the private Apache
    of that LITE_HOME, whose CPU time per request wrk's runs then report.
    """
    url_get, url_inc = f"{base}/lite/get?counter=hits", f"{base}/lite/inc"
    warm_up(url_get)
    result = {"wrk_get": wrk(url_get, seconds, post=False, server_home=server_home)}
    result["wrk_inc"] = counted(
        base, lambda: wrk(url_inc, seconds, post=True, server_home=server_home)
    )
    result["siege_get"] = siege(url_get, siege_requests, post=False, rc=rc)
    result["siege_inc"] = counted(base, lambda: siege(url_inc, siege_requests, post=True, rc=rc))
    for key in ("wrk_inc", "siege_inc"):
        r = result[key]
        if counts:
            r["lost"] = max(0, r["ok"] - r["delta"])  # acknowledged, not counted
        else:
            del r["delta"]
    return result


def machine() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    apache = run(["/usr/sbin/apache2", "-v"]).splitlines()[0].split(":", 1)[1].strip()
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "apache": apache,
    }


def install_baseline(app: str, revision: str) -> None:
    """lite's files as they were at git `revision`, into app/prev, and its WSGI script."""
    names = run(["git", "-C", ROOT, "ls-tree", "--name-only", revision]).split()
    prev = os.path.join(app, PREV_DIR)
    os.makedirs(prev, mode=0o755)
    for name in names:
        if name.startswith("lite_") and name.endswith((".py", ".tpl")):
            with open(os.path.join(prev, name), "w") as out:
                out.write(run(["git", "-C", ROOT, "show", f"{revision}:{name}"]))
    with open(os.path.join(app, "lite_prev_app.py"), "w") as out:
        out.write(PREV_APP)


def pin(name: str) -> str:
    """`name==VERSION` as requirements-dev.txt pins it (`-`, `_` and `.` alike, any case)."""
    pattern = "[-_.]+".join(map(re.escape, re.split(r"[-_.]+", name)))
    with open(os.path.join(ROOT, "requirements-dev.txt")) as f:
        found = re.search(rf"^{pattern}==\S+$", f.read(), re.M | re.I)
    if found is None:
        raise RuntimeError(f"requirements-dev.txt pins no {name}")
    return found.group(0)


def install_django(home: str) -> None:
    """Django (as pinned for the tests), lite_django and the example app, its database migrated."""
    run([os.path.join(home, "venv", "bin", "pip"), "install", "-q", pin("django")])
    app = os.path.join(home, "app")
    shutil.copytree(os.path.join(ROOT, "lite_django"), os.path.join(app, "lite_django"))
    examples = os.path.join(ROOT, "examples")
    shutil.copytree(
        os.path.join(examples, "django_counter"),
        os.path.join(app, "django_counter"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name in ("django_wsgi.py", "django_stock_wsgi.py"):
        shutil.copy(os.path.join(examples, name), app)
    settings = [
        f"PYTHONPATH={app}",
        "DJANGO_SETTINGS_MODULE=django_counter.settings",
        f"LITE_DB_PATH={app}/data/django.db",
    ]
    python = os.path.join(home, "venv", "bin", "python")
    run(["runuser", "-u", "www-data", "--", "env", *settings, python, "-m", "django", "migrate"])


def install_sqlalchemy(home: str, apps: list[str]) -> None:
    """SQLAlchemy, FastAPI, uvicorn and Flask-SQLAlchemy (as pinned), lite_sqlalchemy and the
    two examples, an entry script and a database with its schema for each of `apps`."""
    venv = os.path.join(home, "venv", "bin")
    run([os.path.join(venv, "pip"), "install", "-q", *map(pin, SQLA_PACKAGES)])
    app_dir = os.path.join(home, "app")
    for name in SQLA_FILES:
        shutil.copy(os.path.join(ROOT, name), app_dir)
    scripts = {app: script for app, script, _ in APPS}
    for app in apps:
        module, name, scheme = SQLA_APPS[app]
        database = os.path.join(app_dir, "data", app.replace("-", "_") + ".db")
        entry = scripts[app]
        with open(os.path.join(app_dir, entry), "w") as out:
            out.write(SQLA_ENTRY.format(url=f"{scheme}:///{database}", module=module, name=name))
        run(
            [
                "runuser",
                "-u",
                "www-data",
                "--",
                "env",
                f"PYTHONPATH={app_dir}",
                os.path.join(venv, "python"),
                "-c",
                SQLA_SCHEMA,
                entry.removesuffix(".py"),
                module,
            ],
            cwd=app_dir,
        )


@contextlib.contextmanager
def uvicorn(home: str, script: str, synchronous: str) -> Iterator[str]:
    """The ASGI app `script` under uvicorn --workers 4 as the daemons' user; yields its URL.

    In a session of its own, stopped by its process group: SIGTERM, SIGKILL
    after STOP_TIMEOUT_S.
    """
    port = free_port()
    app_dir = os.path.join(home, "app")
    log_path = os.path.join(home, f"uvicorn-{port}.log")
    argv = [
        os.path.join(home, "venv", "bin", "uvicorn"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(UVICORN_WORKERS),
        "--app-dir",
        app_dir,
        "--no-access-log",  # Apache logs in its own processes, not in the app's
        "--log-level",
        "warning",
        script.removesuffix(".py") + ":app",
    ]
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": app_dir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONPATH": app_dir,
        "LITE_SYNCHRONOUS": synchronous,
    }
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            argv,
            cwd=app_dir,
            env=env,
            user="www-data",
            group="www-data",
            extra_groups=[],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, server, log_path)
        yield base
    finally:
        stop_group(server)


def wait_until_serving(base: str, server: subprocess.Popen, log_path: str) -> None:
    deadline, error = time.monotonic() + START_TIMEOUT_S, None
    while True:
        try:
            with urllib.request.urlopen(f"{base}/lite/get?counter=hits", timeout=5) as res:
                if res.status == 200:
                    return
        except OSError as exc:
            error = exc
        if server.poll() is not None or time.monotonic() > deadline:
            with open(log_path) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"no answer from {base} (exit {server.poll()}): {error}\n{tail}")
        time.sleep(0.2)


def stop_group(server: subprocess.Popen) -> None:
    """Stop `server` and every process of its group (its session), by its PID."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        server.poll()  # reaped once it has exited; its workers are its to reap
        try:
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_postgres(home: str, env: dict) -> None:
    """A private PostgreSQL in `home`, psycopg in the venv, config.ini applied, the WSGI script."""
    run([os.path.join(ROOT, "scripts", "postgres.sh"), "start"], env=env)
    url = run([os.path.join(ROOT, "scripts", "postgres.sh"), "url"], env=env).strip()
    venv = os.path.join(home, "venv", "bin")
    run([os.path.join(venv, "pip"), "install", "-q", "-r", f"{ROOT}/requirements-postgres.txt"])
    app = os.path.join(home, "app")
    run(
        [os.path.join(venv, "python"), "-m", "lite_ops", "apply-config", url, "config.ini"],
        env={**env, "PYTHONPATH": app},
        cwd=app,
    )
    with open(os.path.join(app, "lite_pg_app.py"), "w") as out:
        out.write(PG_APP.format(url=url))


def scratch_env(home: str, port: int) -> dict:
    """The environment of serve.sh and scripts/postgres.sh for the scratch home."""
    return {
        **os.environ,
        "LITE_HOME": home,
        "LITE_PORT": str(port),
        "LITE_PG_HOME": os.path.join(home, "postgres"),
        "LITE_PG_PORT": str(free_port()),
    }


def prepare(
    home: str,
    env: dict,
    baseline: str | None,
    django: bool,
    postgres: bool,
    sqla: list[str],
    flush_s: float = 0.0,
) -> None:
    run([os.path.join(ROOT, "serve.sh"), "install"], env=env)
    app = os.path.join(home, "app")
    with open(os.path.join(app, "lite_wait_app.py"), "w") as out:
        out.write(WAIT_APP.format(flush_s=flush_s))
    if postgres:
        install_postgres(home, env)
    for name in ("hello_app.py", "minimal_app.py", "naive_app.py"):
        shutil.copy(os.path.join(HERE, name), app)
    if django:
        install_django(home)
    if sqla:
        install_sqlalchemy(home, sqla)
    if baseline:
        install_baseline(app, baseline)
        # Its database, empty, as the daemon user: a lite server never creates one.
        as_daemon_user(
            "import sqlite3, sys; sqlite3.connect(sys.argv[1]).close()",
            os.path.join(app, "data", "prev.db"),
        )
    # The naive app's table, made once, as the daemon user.
    naive_db = os.path.join(app, "data", "naive.db")
    as_daemon_user(
        "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
        "db.execute('CREATE TABLE IF NOT EXISTS counters "
        "(name TEXT PRIMARY KEY, value INTEGER)'); "
        "db.execute(\"INSERT OR IGNORE INTO counters VALUES ('hits', 0)\"); db.commit()",
        naive_db,
    )


def truncate_wals(home: str) -> None:
    """Checkpoint every database of the scratch home and empty its WAL (no daemon runs).

    So each app starts from the same state: minimal never checkpoints, and
    would otherwise hand a long WAL to whichever app runs next on its database.
    """
    data = os.path.join(home, "app", "data")
    for name in sorted(os.listdir(data)):
        if name.endswith(".db"):
            as_daemon_user(
                "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
                "db.execute('PRAGMA wal_checkpoint(TRUNCATE)'); db.close()",
                os.path.join(data, name),
            )


def serve(env: dict, script: str, synchronous: str, action: str) -> None:
    run(
        [os.path.join(ROOT, "serve.sh"), action],
        env={**env, "LITE_WSGI_SCRIPT": script, "LITE_SYNCHRONOUS": synchronous},
    )


def build_slow_flush(home: str) -> str:
    """bench/slow_flush.c built into `home`; the shared object's path."""
    library = os.path.join(home, "slow_flush.so")
    source = os.path.join(HERE, "slow_flush.c")
    run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", library, source, "-ldl"])
    os.chmod(library, 0o755)
    return library


def slower_disk(env: dict, library: str, delay_ms: float) -> dict:
    """`env` with every flush `delay_ms` slower (none for 0)."""
    if not delay_ms:
        return env
    return {**env, "LD_PRELOAD": library, "SLOW_FLUSH_MS": str(delay_ms)}


def flush_seconds(directory: str, times: int = 50) -> float:
    """This disk's median fdatasync of a small file just written, in seconds."""
    path = os.path.join(directory, "flush-probe")
    spent = []
    with open(path, "wb") as f:
        for _ in range(times):
            f.write(b"x" * 4096)
            f.flush()
            began = time.perf_counter()
            os.fdatasync(f.fileno())
            spent.append(time.perf_counter() - began)
    os.unlink(path)
    return statistics.median(spent)


def row_name(app: str, delay_ms: float) -> str:
    return f"{app}@{delay_ms:g}ms" if delay_ms else app


def compared_to(name: str) -> tuple[str, ...]:
    """The rows `name` is compared with, at the same flush delay."""
    app, at, delay = name.partition("@")
    return tuple(other + at + delay for other in COMPARED.get(app, ()))


def closed_loop_bounds(summary: dict, flush_s: float) -> dict:
    """For each lite-group row: the most a closed loop of CONNECTIONS could do, and the share done.

    CONNECTIONS / (lite's mean latency at that delay, CONNECTIONS / its
    req/s, + one flush: the delay and this disk's fdatasync), for wrk's POST.
    """
    bounds = {}
    for name, figures in summary.items():
        app, _, delay = name.partition("@")
        normal = summary.get(name.replace("lite-group", "lite", 1))
        if app != "lite-group" or normal is None:
            continue
        delay_s = float(delay.removesuffix("ms") or 0) / 1000
        latency_s = CONNECTIONS / normal["wrk_inc"]["req_per_s"]
        bound = CONNECTIONS / (latency_s + delay_s + flush_s)
        bounds[name] = {
            "bound_req_per_s": round(bound),
            "share_of_bound": round(figures["wrk_inc"]["req_per_s"] / bound, 3),
        }
    return bounds


@contextlib.contextmanager
def served(env: dict, home: str, app: str, script: str, synchronous: str) -> Iterator[str]:
    """`app` served (by the private Apache, or uvicorn); yields its base URL."""
    if app in UVICORN_APPS:
        with uvicorn(home, script, synchronous) as base:
            yield base
        return
    serve(env, script, synchronous, "start")
    try:
        yield f"http://127.0.0.1:{env['LITE_PORT']}"
    finally:
        serve(env, script, synchronous, "stop")


def ratio_of(figures: dict, others: dict, field: str) -> float:
    """figures[field] / others[field]; inf (nan for 0/0) when the other is 0, as a stock
    app's run may be: every request of a short run still waiting for a lock."""
    if others[field]:
        return figures[field] / others[field]
    return math.inf if figures[field] else math.nan


def summarize(rounds: list[dict]) -> dict:
    """Medians over rounds of each figure, and of each ratio taken within a round."""
    summary = {}
    for app in rounds[0]:
        summary[app] = {}
        for key in rounds[0][app]:
            figures = {}
            for field in rounds[0][app][key]:
                figures[field] = statistics.median(r[app][key][field] for r in rounds)
            for other in ("hello", *compared_to(app)):
                if other in rounds[0]:
                    ratio = [ratio_of(r[app][key], r[other][key], "req_per_s") for r in rounds]
                    figures[f"ratio_to_{other}"] = round(statistics.median(ratio), 3)
                if other != "hello" and other in rounds[0] and "p99_ms" in figures:
                    p99 = [ratio_of(r[app][key], r[other][key], "p99_ms") for r in rounds]
                    figures[f"p99_ratio_to_{other}"] = round(statistics.median(p99), 3)
            if "lost" in figures:
                figures["lost_total"] = sum(r[app][key]["lost"] for r in rounds)
            figures["non_2xx_total"] = sum(r[app][key]["non_2xx"] for r in rounds)
            summary[app][key] = figures
    return summary


def table(summary: dict, alone: list[dict], bounds: dict) -> str:
    lines = [
        "| app | driver | route | req/s | x hello | non-2xx | socket errors "
        "| acked | counter Δ | lost | p50 ms | p99 ms | server CPU µs/req | machine CPU µs/req |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for app, figures in summary.items():
        for key, f in figures.items():
            driver, route = key.split("_")
            lines.append(
                f"| {app} | {driver} | {'GET /lite/get' if route == 'get' else 'POST /lite/inc'} "
                f"| {f['req_per_s']:.0f} | {f['ratio_to_hello']:.2f} | {f['non_2xx_total']:.0f} "
                f"| {f['socket_errors']:.0f} | {f['ok']:.0f} "
                f"| {f.get('delta', '')} | {f.get('lost', '')} "
                f"| {f.get('p50_ms', '')} | {f.get('p99_ms', '')} "
                f"| {f.get('server_cpu_us', '')} | {f.get('machine_cpu_us', '')} |"
            )
    compared = [
        f"| {app} / {other} | {key.replace('_', ' ')} | {f[f'ratio_to_{other}']:.3f} "
        f"| {f.get(f'p99_ratio_to_{other}', '')} |"
        for app, figures in summary.items()
        for key, f in figures.items()
        for other in compared_to(app)
        if f"ratio_to_{other}" in f
    ]
    if compared:
        lines += [
            "",
            "| ratio (median over rounds) | driver, route | req/s | p99 |",
            "|---|---|---:|---:|",
        ]
        lines += compared
    if bounds:
        lines += [
            "",
            "| group commit, wrk POST | req/s | closed-loop bound | share of it |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {name} | {summary[name]['wrk_inc']['req_per_s']:.0f} "
            f"| {b['bound_req_per_s']} | {b['share_of_bound']:.2f} |"
            for name, b in bounds.items()
        ]
    lines += [
        "",
        "| SQLite alone | processes | tx/s | locked errors | exact |",
        "|---|---:|---:|---:|---|",
    ]
    for row in alone:
        lines.append(
            f"| synchronous={row['synchronous']} | {row['processes']} "
            f"| {row['tx_per_s']} | {row['locked_errors']} | {row['exact']} |"
        )
    return "\n".join(lines) + "\n"


def chart(summary: dict, path: str, processes: int, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    apps = list(summary)
    keys = [("wrk_get", "GET /lite/get"), ("wrk_inc", "POST /lite/inc")]
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    width = 0.38
    for i, (key, label) in enumerate(keys):
        values = [summary[app][key]["req_per_s"] for app in apps]
        xs = [x + (i - 0.5) * width for x in range(len(apps))]
        bars = ax.bar(xs, values, width, label=label)
        for bar, app in zip(bars, apps, strict=True):
            f = summary[app][key]
            note = f"{f['ratio_to_hello']:.2f}x"
            if f.get("lost"):
                note += f"\n{f['lost']:.0f} lost"
            ax.annotate(
                note,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_xticks(range(len(apps)), apps)
    ax.set_ylabel("requests/s (wrk, 20 connections, median of rounds)")
    title = f"Apache + mod_wsgi, processes={processes} threads={threads}"
    if set(apps) & set(UVICORN_APPS):
        title += f"; fastapi*: uvicorn --workers {UVICORN_WORKERS}"
    ax.set_title(title)
    ax.legend()
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="each wrk run (10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all apps (3)")
    parser.add_argument("--siege-requests", type=int, default=500, help="per user (500)")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--out", default=HERE, help="where results go (bench/)")
    parser.add_argument("--baseline", help="also serve lite as of this git revision (lite-prev)")
    parser.add_argument(
        "--apps", help="comma-separated apps to measure besides hello (default: all)"
    )
    parser.add_argument("--no-sqlite-alone", action="store_true", help="skip SQLite alone")
    parser.add_argument(
        "--processes",
        type=int,
        default=20,
        help="Apache's mod_wsgi daemons (20, as lite.conf)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="threads per daemon (1, as lite.conf)"
    )
    parser.add_argument(
        "--flush-delays",
        default="",
        help="comma-separated ms each flush also takes, beside 0 (e.g. 1,5)",
    )
    args = parser.parse_args(argv)
    chosen = set(args.apps.split(",")) | {"hello"} if args.apps else None
    apps = [
        app
        for app in APPS
        if (chosen is None or app[0] in chosen) and (app[0] != "lite-prev" or args.baseline)
    ]
    if os.geteuid() != 0:
        sys.exit("bench: run as root (it installs and starts a private Apache)")

    home = tempfile.mkdtemp(prefix="lite-bench-", dir="/tmp")
    os.chmod(home, 0o755)
    rc = os.path.join(ROOT, "siegerc")
    postgres = any(app[0] == "lite-pg" for app in apps)
    env = scratch_env(home, args.port) | {
        "LITE_PROCESSES": str(args.processes),
        "LITE_THREADS": str(args.threads),
    }
    delays = [0.0] + [float(d) for d in args.flush_delays.split(",") if d]
    rounds = []
    flush_s = flush_seconds(home)
    try:  # the scratch home goes, and its PostgreSQL stops, whatever fails
        prepare(
            home,
            env,
            args.baseline,
            any(app[0] in DJANGO_APPS for app in apps),
            postgres,
            [app[0] for app in apps if app[0] in SQLA_APPS],
            flush_s,
        )
        slow_flush = build_slow_flush(home) if len(delays) > 1 else ""
        served_rows = [
            (row_name(app, delay), app, script, synchronous, delay)
            for delay in delays
            for app, script, synchronous in apps
            if not delay or (app != "hello" and app not in UVICORN_APPS)
        ]
        for number in range(1, args.rounds + 1):
            results = {}
            for name, app, script, synchronous, delay in served_rows:
                print(f"bench: round {number}: {name}", file=sys.stderr)
                on_disk = slower_disk(env, slow_flush, delay)
                try:
                    with served(on_disk, home, app, script, synchronous) as base:
                        results[name] = drive(
                            base,
                            args.seconds,
                            rc,
                            args.siege_requests,
                            counts=app != "hello",
                            server_home=None if app in UVICORN_APPS else home,
                        )
                finally:
                    truncate_wals(home)
            rounds.append(results)
    finally:
        if postgres:
            run([os.path.join(ROOT, "scripts", "postgres.sh"), "stop"], env=env)
        shutil.rmtree(home, ignore_errors=True)
    alone = []
    if not args.no_sqlite_alone:
        print("bench: SQLite alone", file=sys.stderr)
        alone = sqlite_alone.measure_all(args.seconds)
    summary = summarize(rounds)
    bounds = closed_loop_bounds(summary, flush_s)
    os.makedirs(args.out, exist_ok=True)
    report = {
        "machine": machine(),
        "command": "sudo .venv/bin/python bench/run.py " + " ".join(argv),
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "settings": vars(args) | {"connections": CONNECTIONS},
        "flush_s": flush_s,
        "summary": summary,
        "closed_loop_bounds": bounds,
        "sqlite_alone": alone,
        "rounds": rounds,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table(summary, alone, bounds))
    chart(summary, os.path.join(args.out, "results.png"), args.processes, args.threads)
    print(table(summary, alone, bounds))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
