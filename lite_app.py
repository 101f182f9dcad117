"""lite's web app: Bottle routes over lite_counters and lite_db, with config.ini kept applied.

Routes (the app is mounted at the server root):
- GET  /lite                 a page with every counter and a button to add 1
- POST /lite                 the page's form: add 1, then 303 back to /lite
- GET  /lite/get?counter=N   {"counter": N, "value": V}
- GET  /lite/health          {"status": "ok"}, or 503 with the reason, when
                             the database cannot be read or written in time
- GET  /lite/stats           the metrics' totals, summed over every server
                             process, and the database's (docs/operations.md)
- GET  /lite/live            {"status": "alive", "pid": P}: the process
                             answers (no database, no config.ini)
- GET  /metrics              Prometheus text format (lite_metrics)
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

lite_db.Unavailable becomes the 503 in one place, the plugin.

`make_app(db_path, config_path)` builds the app; paths default to
$LITE_DB_PATH and $LITE_CONFIG_PATH, else data/lite.db and config.ini in the
working directory. The page's template is the module lite_page.
`application` is the WSGI entry point for mod_wsgi.
"""

import datetime
import json
import logging
import logging.handlers
import os
import re
import sqlite3
import sys
import time
import urllib.parse
from collections.abc import Callable
from typing import Any
from urllib.parse import SplitResult, urlsplit

import bottle

import lite_config
import lite_counters
import lite_db
import lite_engine
import lite_metrics
import lite_ops
import lite_page

# Relative to the directory the server runs in (mod_wsgi's home=, gunicorn's --chdir).
DEFAULT_DB_PATH = lite_ops.DEFAULT_DB_PATH
DEFAULT_CONFIG_PATH = "config.ini"
MAX_BODY_BYTES = 64 * 1024  # 64 KiB: a larger body is refused (413), as Apache does
FORM = "application/x-www-form-urlencoded"  # the one body type lite reads
RETRY_AFTER_S = lite_counters.RETRY_AFTER_S  # 1 s: what a 503 asks the client to wait
ERROR_CODES = (400, 403, 404, 405, 409, 413, 415, 422, 500, 502, 503)
_DIGITS = re.compile(r"[0-9]{1,19}\Z")
# lite_counters.ERRORS about what a request asked: the routes answer these,
# the plugin lite_db's.
_REFUSALS = (
    lite_counters.BadInput,
    lite_counters.NoSuchCounter,
    lite_counters.WouldOverflow,
    lite_counters.KeyReused,
)

log = logging.getLogger(__name__)

# Rows of the page's live table: label, key in /lite/stats, format.
PAGE_STATS = (
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


def _pick(stats: dict[str, Any], key: str) -> Any:
    """stats["a"]["b"] for key "a.b"."""
    for part in key.split("."):
        stats = stats.get(part) if isinstance(stats, dict) else None
    return stats


def _show(value: Any, format_: str) -> str:
    """A value as the page shows it; the page's script takes it from the page."""
    if value is None:
        return "never" if format_ == "time" else "unavailable"
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


def _answer(exc: Exception) -> bottle.HTTPResponse:
    """lite's answer to one of lite_counters.ERRORS, as lite_counters.answer_for says."""
    status, error, headers = lite_counters.answer_for(exc)
    return _json(status, {"error": error}, **headers)


def _unavailable(
    error: str = lite_counters.UNAVAILABLE_TEXT, **headers: Any
) -> bottle.HTTPResponse:
    """503 with Retry-After: what cannot be reached in time, said as JSON."""
    return _json(503, {"error": error}, **{"Retry-After": str(RETRY_AFTER_S)}, **headers)


def _json_error(err: bottle.HTTPError) -> str:
    """Error handler: the reason as JSON; never the exception or traceback."""
    bottle.response.content_type = "application/json"
    if err.status_code >= 500:
        message = "internal error" if err.status_code == 500 else "unavailable"
    else:
        message = err.body if isinstance(err.body, str) and err.body else err.status_line
    return json.dumps({"error": message})


def _params(known: tuple[str, ...]) -> dict[str, list[str]]:
    """The request's parameters: each name's values, in order.

    GET: the query string; names lite does not know are ignored (cache
    busters). POST: the query string and a form body, and every name must be
    known: a misspelled `Counter=` must not fall back to the default counter.
    A POST body must be application/x-www-form-urlencoded (415), of at most
    MAX_BODY_BYTES (413), as long as its Content-Length (400). A name given
    twice is refused by lite_counters' input rules (400).
    """
    pairs = _pairs(bottle.request.environ.get("QUERY_STRING", ""))
    if bottle.request.method == "POST":
        pairs += _pairs(_form_body())
        unknown = sorted({name for name, _ in pairs} - set(known))
        if unknown:
            raise _json(400, {"error": f"unknown parameter {unknown[0]!r}: use {', '.join(known)}"})
    params: dict[str, list[str]] = {}
    for name, value in pairs:
        params.setdefault(name, []).append(value)
    return params


def _pairs(text: str) -> list[tuple[str, str]]:
    try:
        return urllib.parse.parse_qsl(text, keep_blank_values=True, errors="strict")
    except (UnicodeError, ValueError):
        raise _json(400, {"error": "parameters must be percent-encoded UTF-8"}) from None


def _form_body() -> str:
    """The POST body as text; "" when there is none."""
    environ = bottle.request.environ
    length_text = (environ.get("CONTENT_LENGTH") or "").strip()
    if length_text:
        if not _DIGITS.match(length_text):  # not isdigit(): "²" is a digit to Python
            raise _json(400, {"error": "Content-Length: not a number"})
        length: int | None = int(length_text)
    elif "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        length = None  # read to the end, at most MAX_BODY_BYTES
    else:
        return ""
    if length == 0:
        return ""
    media_type = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
    if media_type != FORM:
        raise _json(415, {"error": f"send the parameters as {FORM}, or in the query string"})
    if length is not None and length > MAX_BODY_BYTES:
        raise _json(413, {"error": f"a body of at most {MAX_BODY_BYTES} bytes"})
    try:
        body = environ["wsgi.input"].read(MAX_BODY_BYTES + 1 if length is None else length)
    except (OSError, ValueError):  # the client went away or sent less
        raise _json(400, {"error": "the request body could not be read"}) from None
    if len(body) > MAX_BODY_BYTES:
        raise _json(413, {"error": f"a body of at most {MAX_BODY_BYTES} bytes"})
    if length is not None and len(body) < length:
        raise _json(400, {"error": "the request body is shorter than its Content-Length"})
    try:
        return body.decode("ascii")
    except UnicodeDecodeError:
        raise _json(400, {"error": "parameters must be percent-encoded UTF-8"}) from None


def _check_same_origin() -> None:
    """Refuse a POST that a browser sent from another site (403).

    Browsers name the page that sent a request in Origin (or, failing that,
    Referer); clients that send neither are not browsers and cannot be
    tricked into sending the request. A header that is not a URL is 400.
    """
    environ = bottle.request.environ
    for header, key in (("Origin", "HTTP_ORIGIN"), ("Referer", "HTTP_REFERER")):
        source = environ.get(key)  # as _header() reads it; once per POST, so inline
        if source is None:
            continue
        try:
            same = _origin(urlsplit(source)) == _origin(bottle.request.urlparts)
        except ValueError:
            raise _json(400, {"error": f"{header}: not a URL"}) from None
        if not same:
            raise _json(403, {"error": "cross-site request refused"})
        return


def _origin(url: SplitResult) -> tuple[str, str | None, int | None]:
    """Scheme, host and port of a URL, the port filled in from the scheme.

    Raises ValueError for a URL whose host or port is malformed.
    """
    return url.scheme, url.hostname, url.port or {"http": 80, "https": 443}.get(url.scheme)


def _header(name: str) -> str | None:
    """A request header as the server got it (latin-1 text per WSGI).

    Not bottle's get_header, which decodes the value as UTF-8 and raises
    (a 500) on bytes that are not.
    """
    return bottle.request.environ.get("HTTP_" + name.upper().replace("-", "_"))


def _increment(cur: sqlite3.Cursor, params: dict[str, list[str]], key: str | None = None) -> dict:
    """Increment as `params` (counter, by) ask, once per key if a key is given.

    Returns {"counter": name, "value": new or stored}. A broken input rule or
    a refusal (_REFUSALS) is answered as lite_counters.answer_for says;
    lite_db's errors go on to the plugin.
    """
    try:
        name = lite_counters.counter_name_from(params.get("counter", ()))
        by = lite_counters.step_from(params.get("by", ()))
        if key is None:
            name, value = lite_counters.increment(cur, name, by)
        else:
            lite_counters.check_idempotency_key(key)
            try:
                name, value, replayed = lite_counters.increment_once(cur, name, by, key)
            except lite_db.OutcomeUnknown:
                # Safe to ask again: the key makes it apply once; a replay says it took.
                name, value, replayed = lite_counters.increment_once(cur, name, by, key)
            if replayed:
                bottle.response.set_header("Idempotent-Replayed", "true")
    except _REFUSALS as exc:
        raise _answer(exc) from None
    return {"counter": name, "value": value}


class LitePlugin:
    """Per request: apply a changed config.ini, and give the route a cursor.

    Routes that take a `db` argument (or `keyword`) get a fresh cursor on
    this thread's connection; it is closed when the route returns or raises.
    lite_db.Unavailable, from opening the database or from the route, is a
    503 with Retry-After, here and nowhere else. A config check that fails
    is logged and tried again on the next request; the request goes on.
    """

    name = "lite"
    api = 2

    def __init__(
        self,
        database: str,
        config_path: str,
        keyword: str = "db",
        create_database: bool = False,
    ) -> None:
        self.database = database  # a SQLite file's path or a database server's URL
        self.cursor = lite_engine.opener(database, create=create_database)
        self.config_path = config_path
        self.keyword = keyword
        self.config = lite_config.ConfigWatcher(config_path)

    def setup(self, app: bottle.Bottle) -> None:
        for other in app.plugins:
            if isinstance(other, LitePlugin) and other.keyword == self.keyword:
                raise bottle.PluginError(f"another plugin already provides {self.keyword!r}")

    def apply(self, callback: Callable[..., Any], route: bottle.Route) -> Callable[..., Any]:
        wants_cursor = self.keyword in route.get_callback_args()

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                cur = self.cursor()
            except lite_db.Unavailable as exc:
                raise _answer(exc) from None
            try:
                try:  # noqa: SIM105 - a plain try costs less than suppress() on every request
                    self.config.refresh(cur)
                except lite_db.Unavailable:
                    pass  # logged; tried again on the next request
                if wants_cursor:
                    kwargs[self.keyword] = cur
                return callback(*args, **kwargs)
            except (lite_db.Unavailable, lite_db.OutcomeUnknown) as exc:
                raise _answer(exc) from None
            finally:
                cur.close()

        return wrapper


def _stats(metrics: lite_metrics.Metrics, cur: sqlite3.Cursor) -> dict[str, Any]:
    """The metrics' totals over every process that served, and the database's settings.

    When the metrics cannot be summed, their totals are null and
    "metrics_unavailable" says why; the database's are there all the same.
    """
    stats: dict[str, Any] = {"answered_by": os.getpid(), "generated_at": time.time()}
    engine = cur.connection.engine
    database = engine.describe(cur)
    try:
        summed = metrics.totals(cur.connection.path if engine.features.local_files else None)
    except lite_metrics.MetricsUnavailable as exc:
        stats.update(process_count=None, totals=None, metrics_unavailable=str(exc))
        database["last_checkpoint_at"] = None
    else:
        stats.update(process_count=summed["processes"], totals=summed["totals"])
        database["last_checkpoint_at"] = summed["last_checkpoint_at"]
    stats["database"] = database
    return stats


class CountedBottle(bottle.Bottle):
    """A Bottle app whose every answer is counted in lite's metrics by its route's pattern.

    Timed from the call to the response's start, as an after_request hook
    would, without two hooks' calls on every request.
    """

    def __init__(self, metrics: lite_metrics.Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        began = time.monotonic()
        try:
            return super().wsgi(environ, start_response)
        finally:
            route = environ.get("bottle.route")
            self.metrics.request(
                route.rule if route else "unmatched",
                environ["REQUEST_METHOD"],
                bottle.response.status_code,
                time.monotonic() - began,
            )


def _version_shown(version: dict[str, Any] | None) -> dict[str, Any] | None:
    if version is None:
        return None
    applied = datetime.datetime.fromtimestamp(version["applied_at"], datetime.UTC)
    return {
        "fingerprint": version["fingerprint"].rsplit("-", 1)[-1][:12],
        "applied": applied.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "applied_by": version["applied_by"],
    }


def make_app(
    db_path: str | None = None,
    config_path: str | None = None,
    create_database: bool = False,
    database_url: str | None = None,
) -> bottle.Bottle:
    """The lite WSGI app on `db_path` with counters from `config_path`.

    Paths default to $LITE_DB_PATH and $LITE_CONFIG_PATH, else data/lite.db
    and config.ini in the working directory. Opens no database: the first
    request does. A missing database file is a 503, never made anew, unless
    `create_database` (for development and tests; a deployment creates it
    once, with resetapp.sh or `lite apply-config`).
    """
    db_path = os.path.abspath(db_path or os.environ.get("LITE_DB_PATH") or DEFAULT_DB_PATH)
    config_path = os.path.abspath(
        config_path or os.environ.get("LITE_CONFIG_PATH") or DEFAULT_CONFIG_PATH
    )
    page_template = bottle.SimpleTemplate(source=lite_page.PAGE)
    url = database_url or os.environ.get("LITE_DATABASE_URL")
    database = lite_engine.server_url(url) if url else db_path
    plugin = LitePlugin(database, config_path, create_database=create_database)
    metrics = lite_metrics.process_metrics()
    app = CountedBottle(metrics)
    # Routes find the plugin here: a route closing over a plain value would
    # hang bottle 0.13's Route.get_undecorated_callback (see tests/test_app.py).
    app.config.update(
        {
            "lite.plugin": plugin,
            "lite.page": page_template,
            "lite.metrics": metrics,
        }
    )
    app.install(plugin)
    for code in ERROR_CODES:
        app.error(code)(_json_error)

    @app.get("/lite")
    def page(db: sqlite3.Cursor) -> str:
        lite_counters.ensure_counters(db)
        counters = lite_db.query(db, "SELECT name, value FROM counters ORDER BY position")
        stats = _stats(bottle.request.app.config["lite.metrics"], db)
        bottle.response.set_header("Cache-Control", "no-store")
        return bottle.request.app.config["lite.page"].render(
            counters=[tuple(row) for row in counters],
            version=_version_shown(lite_config.applied_version(db)),
            stats=[
                (label, key, _show(_pick(stats, key), format_))
                for label, key, format_ in PAGE_STATS
            ],
            process_count=_show(stats["process_count"], ""),
            pid=os.getpid(),
        )

    @app.post("/lite")
    def page_increment(db: sqlite3.Cursor) -> None:
        _check_same_origin()
        _increment(db, _params(("counter",)))
        bottle.redirect("/lite", 303)

    @app.get("/lite/get")
    def get_counter(db: sqlite3.Cursor) -> dict[str, Any]:
        params = _params(("counter",))
        try:
            name = lite_counters.counter_name_from(params.get("counter", ()))
            name, value = lite_counters.read_counter(db, name)
        except _REFUSALS as exc:
            raise _answer(exc) from None
        return {"counter": name, "value": value}

    @app.get("/lite/live", skip=[plugin])
    def live() -> dict[str, Any]:
        """Liveness: the process answers. Touches neither the database nor config.ini."""
        bottle.response.set_header("Cache-Control", "no-store")
        return {"status": "alive", "pid": os.getpid()}

    @app.get("/lite/health")
    def health(db: sqlite3.Cursor) -> dict[str, Any]:
        problem = lite_ops.health(db)
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
        return _stats(bottle.request.app.config["lite.metrics"], db)

    @app.get("/metrics", skip=[plugin])
    def metrics() -> bytes:
        """Prometheus text format; opens no database (the sizes are the files').

        503 with the reason when the metrics cannot be summed (lite_metrics).
        """
        bottle.response.set_header("Cache-Control", "no-store")
        config = bottle.request.app.config
        plugin = config["lite.plugin"]
        try:
            text = config["lite.metrics"].render(lite_engine.local_path(plugin.database))
        except lite_metrics.MetricsUnavailable as exc:
            raise _unavailable(
                f"metrics unavailable: {exc}", **{"Cache-Control": "no-store"}
            ) from None
        bottle.response.set_header("Content-Type", lite_metrics.CONTENT_TYPE)
        return text

    @app.post("/lite/inc")
    def increment(db: sqlite3.Cursor) -> dict[str, Any]:
        _check_same_origin()
        return _increment(db, _params(("counter", "by")), _header("Idempotency-Key"))

    return app


class JsonLines(logging.Formatter):
    """One JSON object per event: time (UTC, ISO 8601), level, logger, pid, message."""

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False)


def log_handler(log_format: str, path: str | None) -> logging.Handler:
    """Where lite's log lines go: `path` (reopened when rotated away) or stderr.

    `log_format`: "plain" (the default: "lite[PID] LEVEL logger: message") or
    "json" (JsonLines). Raises ValueError for another format.
    """
    if log_format not in ("plain", "json"):
        raise ValueError(f"LITE_LOG_FORMAT must be plain or json, not {log_format!r}")
    handler: logging.Handler
    if path:
        handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(
            logging.Formatter("lite[%(process)d] %(levelname)s %(name)s: %(message)s")
        )
    return handler


def _configure_logging() -> None:
    # Under mod_wsgi, stderr goes to Apache's error log; elsewhere the caller
    # (tests, a runner) decides where log lines go, unless LITE_LOG_FILE says.
    path = os.environ.get("LITE_LOG_FILE")
    root = logging.getLogger()
    if ("mod_wsgi" in sys.modules or path) and not root.handlers:
        root.addHandler(log_handler(os.environ.get("LITE_LOG_FORMAT", "plain"), path))
        root.setLevel(logging.INFO)


_configure_logging()
application = make_app()
