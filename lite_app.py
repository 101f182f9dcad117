"""lite's web app: Bottle routes over lite_db, with config.ini kept applied.

Routes (the app is mounted at the server root):
- GET  /lite                 a page with every counter and a button to add 1
- POST /lite                 the page's form: add 1, then 303 back to /lite
- GET  /lite/get?counter=N   {"counter": N, "value": V}
- GET  /lite/health          {"status": "ok"}, or 503 with the reason, when
                             the database cannot be read or written in time
- GET  /lite/stats           figures of every server process and of the
                             database (see README, Operations)
- POST /lite/inc             counter=N, by=B (1..1000000, default 1):
                             {"counter": N, "value": new value}; with an
                             Idempotency-Key header, applied once per key
                             (a repeat returns the stored value)

Without `counter`, the first counter of config.ini is meant. Errors are JSON
{"error": "..."}: 400 bad input, 403 cross-site POST, 404 unknown counter,
405 wrong method, 409 a counter that would pass 2^63-1, 422 an
Idempotency-Key reused for another counter or step, 503 with Retry-After
when the database could not be reached within lite_db.LOCK_BUDGET_MS. No
response ever carries a traceback, SQL or driver text.

`make_app(db_path, config_path)` builds the app; paths default to
$LITE_DB_PATH and $LITE_CONFIG_PATH, else data/lite.db and config.ini beside
this file. `application` is the WSGI entry point for mod_wsgi.
"""

import datetime
import json
import logging
import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import SplitResult, urlsplit

import bottle

import lite_config
import lite_db

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DB_PATH = os.path.join(HERE, "data", "lite.db")
DEFAULT_CONFIG_PATH = os.path.join(HERE, "config.ini")
MAX_BY = 1_000_000  # largest step of one increment
RETRY_AFTER_S = 1  # 1 s: what a 503 asks the client to wait
ERROR_CODES = (400, 403, 404, 405, 409, 413, 422, 500, 503)
_BY = re.compile(r"[1-9][0-9]{0,6}\Z")
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,128}\Z")

log = logging.getLogger(__name__)

TOTALLED = (  # per-process figures that /lite/stats also sums over processes
    "requests",
    "reads",
    "read_failures",
    "writes",
    "write_failures",
    "busy_retries",
    "write_lock_wait_s",
    "db_time_s",
    "checkpoints",
    "wal_restarts",
    "config_checks",
    "config_applied",
    "config_rejected",
)

# The first counter of the applied config, per connection (so per process and
# database); dropped whenever this process sees config.ini change.
_first_counter: dict[int, str] = {}
# This process's request count and when it last published its figures; the
# pid tells whether they belong to this process or to a parent before fork.
_process: dict[str, Any] = {"pid": None}

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lite</title>
<link rel="icon" href="data:,">
<style>
body { font: 16px/1.5 system-ui, sans-serif; max-width: 44rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; }
h2 { font-size: 1.1rem; margin-top: 2rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid #ddd; }
.num { font-variant-numeric: tabular-nums; text-align: right; }
button { font: inherit; padding: .2rem .9rem; cursor: pointer; }
.note { color: #666; font-size: .9rem; }
</style>
</head>
<body>
<h1>lite</h1>
<p>Counters kept in SQLite, shared by every server process.</p>
% if counters:
<table id="counters">
<tr><th>counter</th><th class="num">value</th><th></th></tr>
% for name, value in counters:
<tr>
  <td><a href="/lite/get?counter={{name}}">{{name}}</a></td>
  <td class="num" id="value-{{name}}">{{value}}</td>
  <td><form method="post" action="/lite">
    <input type="hidden" name="counter" value="{{name}}">
    <button type="submit" id="inc-{{name}}">+1</button>
  </form></td>
</tr>
% end
</table>
% else:
<p>No counters yet: config.ini has not been applied.</p>
% end
% if version:
<p class="note" id="config-version">Config version {{version["fingerprint"]}},
applied {{version["applied"]}} by process {{version["applied_by"]}}.</p>
% end

<h2>Live figures</h2>
<table id="figures">
% for label, key, value in figures:
<tr><td>{{label}}</td><td class="num" data-stat="{{key}}">{{value}}</td></tr>
% end
</table>
<p class="note">From <a href="/lite/stats">/lite/stats</a>, summed over the
<span data-stat="process_count">{{process_count}}</span> server processes that
have served requests; <span id="refreshed">as of loading this page</span>.
Health: <a href="/lite/health">/lite/health</a>. Served by process {{pid}}.</p>
<script>
(function () {
  var FORMATS = {{!formats}};
  function pick(data, key) {
    return key.split(".").reduce(function (v, k) { return v == null ? v : v[k]; }, data);
  }
  function show(value, format) {
    if (value == null) return "never";
    if (format === "bytes") return (value / 1024).toFixed(1) + " KiB";
    if (format === "seconds") return value.toFixed(3) + " s";
    if (format === "time") return new Date(value * 1000).toISOString().slice(11, 19) + " UTC";
    return String(value);
  }
  function refresh() {
    fetch("/lite/stats", {cache: "no-store"}).then(function (r) {
      return r.ok ? r.json() : Promise.reject(r.status);
    }).then(function (data) {
      document.querySelectorAll("[data-stat]").forEach(function (cell) {
        var key = cell.getAttribute("data-stat");
        cell.textContent = show(pick(data, key), FORMATS[key]);
      });
      document.getElementById("refreshed").textContent =
        "updated " + show(data.generated_at, "time");
    }).catch(function () {
      document.getElementById("refreshed").textContent = "could not update";
    });
  }
  setInterval(refresh, 2000);
})();
</script>
</body>
</html>
"""

# Rows of the page's "Live figures": label, key in /lite/stats, format.
PAGE_FIGURES = (
    ("requests served", "totals.requests", ""),
    ("writes", "totals.writes", ""),
    ("failed writes", "totals.write_failures", ""),
    ("failed reads", "totals.read_failures", ""),
    ("busy retries", "totals.busy_retries", ""),
    ("time taking the write lock", "totals.write_lock_wait_s", "seconds"),
    ("config versions applied", "totals.config_applied", ""),
    ("journal mode", "database.journal_mode", ""),
    ("synchronous", "database.synchronous", ""),
    ("database size", "database.db_bytes", "bytes"),
    ("WAL size", "database.wal_bytes", "bytes"),
    ("last checkpoint", "database.last_checkpoint_at", "time"),
)


def _pick(figures: dict[str, Any], key: str) -> Any:
    """figures["a"]["b"] for key "a.b"."""
    for part in key.split("."):
        figures = figures.get(part) if isinstance(figures, dict) else None
    return figures


def _show(value: Any, format_: str) -> str:
    """A figure as the page shows it (the page's script formats the same way)."""
    if value is None:
        return "never"
    if format_ == "bytes":
        return f"{value / 1024:.1f} KiB"
    if format_ == "seconds":
        return f"{value:.3f} s"
    if format_ == "time":
        return datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%H:%M:%S UTC")
    return str(value)


def _json(status: int, body: dict[str, Any], **headers: Any) -> bottle.HTTPResponse:
    headers["Content-Type"] = "application/json"
    return bottle.HTTPResponse(json.dumps(body), status=status, **headers)


def _unavailable() -> bottle.HTTPResponse:
    return _json(
        503, {"error": "database busy, retry later"}, **{"Retry-After": str(RETRY_AFTER_S)}
    )


def _json_error(err: bottle.HTTPError) -> str:
    """Error handler: the reason as JSON; never the exception or traceback."""
    bottle.response.content_type = "application/json"
    if err.status_code >= 500:
        message = "internal error" if err.status_code == 500 else "unavailable"
    else:
        message = err.body if isinstance(err.body, str) and err.body else err.status_line
    return json.dumps({"error": message})


def _param(name: str) -> str | None:
    """The one value of query or form parameter `name`; None if absent."""
    values = bottle.request.query.getall(name)
    if bottle.request.method == "POST":
        values += bottle.request.forms.getall(name)
    if len(values) > 1:
        raise _json(400, {"error": f"give {name} once"})
    return values[0] if values else None


def _counter_name(cur: sqlite3.Cursor) -> str:
    """The counter a request names, or the first configured one."""
    name = _param("counter")
    if name is None:
        key = id(cur.connection)
        if key not in _first_counter:
            rows = lite_db.select(cur, "SELECT name FROM counters ORDER BY position LIMIT 1")
            if rows is None:
                raise _unavailable()
            if not rows:
                raise _json(404, {"error": "no counters configured"})
            _first_counter[key] = rows[0]["name"]
        return _first_counter[key]
    if not lite_config.COUNTER_NAME.match(name):
        raise _json(400, {"error": "counter: use 1-64 of a-z, 0-9, _ and -"})
    return name


def _by() -> int:
    text = _param("by")
    if text is None:
        return 1
    if not _BY.match(text) or int(text) > MAX_BY:
        raise _json(400, {"error": f"by: a whole number from 1 to {MAX_BY}"})
    return int(text)


def _check_same_origin() -> None:
    """Refuse a POST that a browser sent from another site (403).

    Browsers name the page that sent a request in Origin (or, failing that,
    Referer); clients that send neither are not browsers and cannot be
    tricked into sending the request.
    """
    source = _header("Origin") or _header("Referer")
    if source is None:
        return
    if _origin(urlsplit(source)) != _origin(bottle.request.urlparts):
        raise _json(403, {"error": "cross-site request refused"})


def _origin(url: SplitResult) -> tuple[str, str | None, int | None]:
    """Scheme, host and port of a URL, the port filled in from the scheme."""
    try:
        port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    except ValueError:  # a port that is not a number
        port = None
    return url.scheme, url.hostname, port


def _header(name: str) -> str | None:
    """A request header as the server got it (latin-1 text per WSGI).

    Not bottle's get_header, which decodes the value as UTF-8 and raises
    (a 500) on bytes that are not.
    """
    return bottle.request.environ.get("HTTP_" + name.upper().replace("-", "_"))


def _idempotency_key() -> str | None:
    key = _header("Idempotency-Key")
    if key is not None and not _IDEMPOTENCY_KEY.match(key):
        raise _json(400, {"error": "Idempotency-Key: use 1-128 of A-Z, a-z, 0-9, _ . : -"})
    return key


def _increment(cur: sqlite3.Cursor, name: str, by: int, key: str | None = None) -> int:
    """Increment, once per key if a key is given; the new (or stored) value."""
    if key is None:
        value = lite_db.increment(cur, name, by)
    else:
        result = lite_db.increment_once(cur, name, by, key)
        if result is False:
            raise _unavailable()
        value, replayed = result
        if value == "mismatch":
            raise _json(
                422,
                {
                    "error": f"Idempotency-Key already used to add {replayed['by']}"
                    f" to {replayed['counter']}"
                },
            )
        if replayed:
            bottle.response.set_header("Idempotent-Replayed", "true")
    if value is False:
        raise _unavailable()
    if value is None:
        current = lite_db.get(cur, "counters", name, "value", default=False)
        if current is None:
            raise _unavailable()
        if current is False:
            raise _json(404, {"error": f"no counter {name!r}"})
        raise _json(409, {"error": f"{name} would pass {lite_db.MAX_INTEGER}"})
    return value


def _this_process() -> dict[str, Any]:
    if _process["pid"] != os.getpid():
        _process.update(pid=os.getpid(), started_at=time.time(), requests=0, published_at=0.0)
    return _process


def _figures() -> dict[str, Any]:
    """This process's figures, as /lite/stats shows them."""
    process = _this_process()
    return {
        "pid": process["pid"],
        "started_at": process["started_at"],
        "updated_at": time.time(),
        "requests": process["requests"],
        **lite_db.stats,
        **lite_config.stats,
    }


def _count_request(db_path: str) -> None:
    """Count a request; publish this process's figures at most once per interval."""
    process = _this_process()
    process["requests"] += 1
    now = time.monotonic()
    if now - process["published_at"] >= lite_db.STATS_INTERVAL_S:
        process["published_at"] = now
        lite_db.publish_stats(db_path, _figures())


def _stats(cur: sqlite3.Cursor, db_path: str) -> dict[str, Any]:
    """Figures of every live process using `db_path`, their sums, and the database's."""
    lite_db.publish_stats(db_path, _figures())
    processes = [
        figures for figures in lite_db.published_stats(db_path) if figures.get("pid") != os.getpid()
    ]
    processes.append(_figures())
    processes.sort(key=lambda figures: figures["pid"])
    database = lite_db.database_figures(cur, db_path)
    if database is None:
        raise _unavailable()
    checkpoints = [p["last_checkpoint_at"] for p in processes if p.get("last_checkpoint_at")]
    database["last_checkpoint_at"] = max(checkpoints, default=None)
    totals = {name: sum(p.get(name) or 0 for p in processes) for name in TOTALLED}
    for name in ("write_lock_wait_s", "db_time_s"):
        totals[name] = round(totals[name], 6)
    return {
        "answered_by": os.getpid(),
        "generated_at": time.time(),
        "process_count": len(processes),
        "totals": totals,
        "database": database,
        "processes": processes,
    }


class LitePlugin:
    """Per request: apply a changed config.ini, and give the route a cursor.

    Routes that take a `db` argument (or `keyword`) get a fresh cursor on this
    process's connection; it is closed when the route returns or raises. A
    database that cannot be opened gives 503.
    """

    name = "lite"
    api = 2

    def __init__(self, db_path: str, config_path: str, keyword: str = "db") -> None:
        self.db_path = db_path
        self.config_path = config_path
        self.keyword = keyword

    def setup(self, app: bottle.Bottle) -> None:
        for other in app.plugins:
            if isinstance(other, LitePlugin) and other.keyword == self.keyword:
                raise bottle.PluginError(f"another plugin already provides {self.keyword!r}")

    def apply(self, callback: Callable[..., Any], route: bottle.Route) -> Callable[..., Any]:
        wants_cursor = self.keyword in route.get_callback_args()

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            cur = lite_db.cursor(self.db_path)
            if cur is None:
                raise _unavailable()
            try:
                if lite_config.refresh(cur, self.config_path) != "unchanged":
                    _first_counter.pop(id(cur.connection), None)
                if wants_cursor:
                    kwargs[self.keyword] = cur
                return callback(*args, **kwargs)
            finally:
                cur.close()
                _count_request(self.db_path)

        return wrapper

    def close(self) -> None:
        pass


def make_app(db_path: str | None = None, config_path: str | None = None) -> bottle.Bottle:
    """The lite WSGI app on `db_path` with counters from `config_path`.

    Opens nothing: the database is opened by the first request.
    """
    db_path = db_path or os.environ.get("LITE_DB_PATH") or DEFAULT_DB_PATH
    config_path = config_path or os.environ.get("LITE_CONFIG_PATH") or DEFAULT_CONFIG_PATH
    app = bottle.Bottle()
    # Routes read the paths here: a route closing over a plain value would
    # hang bottle 0.13's Route.get_undecorated_callback (see tests/test_app.py).
    app.config.update({"lite.db_path": db_path, "lite.config_path": config_path})
    app.install(LitePlugin(db_path, config_path))
    for code in ERROR_CODES:
        app.error(code)(_json_error)

    @app.get("/lite")
    def page(db: sqlite3.Cursor) -> str:
        rows = lite_db.select(db, "SELECT name, value FROM counters ORDER BY position")
        if rows is None:
            raise _unavailable()
        version = lite_config.applied_version(db)
        if version is not None:
            applied = datetime.datetime.fromtimestamp(version["applied_at"], datetime.UTC)
            version = {
                "fingerprint": version["fingerprint"].rsplit("-", 1)[-1][:12],
                "applied": applied.strftime("%Y-%m-%d %H:%M:%S UTC"),
                "applied_by": version["applied_by"],
            }
        figures = _stats(db, bottle.request.app.config["lite.db_path"])
        bottle.response.set_header("Cache-Control", "no-store")
        return bottle.template(
            PAGE,
            counters=[tuple(row) for row in rows],
            version=version,
            figures=[
                (label, key, _show(_pick(figures, key), format_))
                for label, key, format_ in PAGE_FIGURES
            ],
            formats=json.dumps({key: format_ for _, key, format_ in PAGE_FIGURES}),
            process_count=figures["process_count"],
            pid=os.getpid(),
        )

    @app.post("/lite")
    def page_increment(db: sqlite3.Cursor) -> None:
        _check_same_origin()
        _increment(db, _counter_name(db), 1)
        bottle.redirect("/lite", 303)

    @app.get("/lite/get")
    def get_counter(db: sqlite3.Cursor) -> dict[str, Any]:
        name = _counter_name(db)
        value = lite_db.get(db, "counters", name, "value", default=False)
        if value is None:
            raise _unavailable()
        if value is False:
            raise _json(404, {"error": f"no counter {name!r}"})
        return {"counter": name, "value": value}

    @app.get("/lite/health")
    def health(db: sqlite3.Cursor) -> dict[str, Any]:
        problem = lite_db.health(db)
        if problem is not None:
            raise _json(
                503,
                {"status": "unavailable", "reason": f"database {problem}"},
                **{"Retry-After": str(RETRY_AFTER_S)},
            )
        return {"status": "ok"}

    @app.get("/lite/stats")
    def stats(db: sqlite3.Cursor) -> dict[str, Any]:
        bottle.response.set_header("Cache-Control", "no-store")
        return _stats(db, bottle.request.app.config["lite.db_path"])

    @app.post("/lite/inc")
    def increment(db: sqlite3.Cursor) -> dict[str, Any]:
        _check_same_origin()
        name = _counter_name(db)
        by = _by()
        key = _idempotency_key()
        return {"counter": name, "value": _increment(db, name, by, key)}

    return app


def _log_to_stderr_under_mod_wsgi() -> None:
    # Under mod_wsgi, stderr goes to Apache's error log; elsewhere the caller
    # (tests, a runner) decides where log lines go.
    if "mod_wsgi" in sys.modules and not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format="lite[%(process)d] %(levelname)s %(name)s: %(message)s",
        )


_log_to_stderr_under_mod_wsgi()
application = make_app()
