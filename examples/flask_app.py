"""lite's counter routes as a Flask app, on lite_flask.

    LITE_DB_PATH=data/lite.db LITE_CONFIG_PATH=config.ini \
        gunicorn -w 4 --chdir examples flask_app:app

GET /lite/get?counter=NAME and POST /lite/inc (form: counter, by;
optional Idempotency-Key header) answer the JSON lite_app answers, with the
same status codes: 400 for a bad parameter, 404 for an unknown counter, 409
for an overflow, 422 for a reused key, 503 + Retry-After when the database
cannot be reached in time. config.ini is applied once per version, as by
lite_app. The database is made beforehand (resetapp.sh, or `lite
apply-config DB CONFIG`, which creates it).
"""

import contextlib
import os
import re
from typing import Any

import flask
import werkzeug.exceptions

import lite_config
import lite_counters
import lite_db
import lite_flask

MAX_BY = 1_000_000
_BY = re.compile(r"[1-9][0-9]{0,6}\Z")
_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,128}\Z")

app = flask.Flask(__name__)
lite = lite_flask.Lite(app, os.environ.get("LITE_DB_PATH", "data/lite.db"))
config = lite_config.ConfigWatcher(os.environ.get("LITE_CONFIG_PATH", "config.ini"))


class Refused(Exception):
    """A request lite refuses: its status and reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@app.errorhandler(Refused)
def refused(exc: Refused) -> tuple[flask.Response, int]:
    return flask.jsonify(error=str(exc)), exc.status


@app.errorhandler(werkzeug.exceptions.HTTPException)
def http_error(exc: werkzeug.exceptions.HTTPException) -> tuple[flask.Response, int]:
    """Flask's own errors (404 for an unknown path, 405, a malformed body) as JSON too."""
    return flask.jsonify(error=exc.description), exc.code or 500


@app.before_request
def apply_config() -> None:
    # Logged, and tried again on the next request; the route answers for itself.
    with contextlib.suppress(lite_db.Unavailable):
        config.refresh(lite.cursor)


@app.get("/lite/get")
def get_counter() -> dict[str, Any]:
    name = _counter_name(flask.request.args)
    try:
        name, value = lite_counters.read_counter(lite.cursor, name)
    except lite_counters.NoSuchCounter:
        raise Refused(404, f"no counter {name!r}") from None
    return {"counter": name, "value": value}


@app.post("/lite/inc")
def increment() -> dict[str, Any]:
    if flask.request.mimetype not in ("", "application/x-www-form-urlencoded"):
        raise Refused(415, "send the parameters as application/x-www-form-urlencoded")
    params = flask.request.values
    unknown = sorted(set(params) - {"counter", "by"})
    if unknown:
        raise Refused(400, f"unknown parameter {unknown[0]!r}: use counter, by")
    name, by = _counter_name(params), _by(params)
    key = flask.request.headers.get("Idempotency-Key")
    try:
        if key is None:
            name, value = lite_counters.increment(lite.cursor, name, by)
        elif not _KEY.match(key):
            raise Refused(400, "Idempotency-Key: use 1-128 of A-Z, a-z, 0-9, _ . : -")
        else:
            name, value, _ = lite_counters.increment_once(lite.cursor, name, by, key)
    except lite_counters.NoSuchCounter:
        raise Refused(404, f"no counter {name!r}") from None
    except lite_counters.WouldOverflow:
        raise Refused(409, f"{name} would pass {lite_counters.MAX_INTEGER}") from None
    except lite_counters.KeyReused as exc:
        raise Refused(422, str(exc)) from None
    return {"counter": name, "value": value}


def _counter_name(params: Any) -> str | None:
    names = params.getlist("counter")
    if len(names) > 1:
        raise Refused(400, "give counter once")
    if names and not lite_config.COUNTER_NAME.match(names[0]):
        raise Refused(400, "counter: use 1-64 of a-z, 0-9, _ and -")
    return names[0] if names else None


def _by(params: Any) -> int:
    texts = params.getlist("by")
    if not texts:
        return 1
    if len(texts) > 1 or not _BY.match(texts[0]) or int(texts[0]) > MAX_BY:
        raise Refused(400, f"by: a whole number from 1 to {MAX_BY}")
    return int(texts[0])


application = app
