"""lite's counter routes as a Flask app, on lite_flask.

    LITE_DB_PATH=data/lite.db LITE_CONFIG_PATH=config.ini \
        gunicorn -w 4 --chdir examples flask_app:app

GET /lite/get?counter=NAME and POST /lite/inc (form: counter, by;
optional Idempotency-Key header) answer the JSON lite_app answers, with the
same status codes: 400 for a bad parameter, 404 for an unknown counter, 409
for an overflow, 422 for a reused key, 503 + Retry-After when the database
cannot be reached in time: lite_counters' input rules, and its answers
(answer_for) from one handler. config.ini is applied once per version, as
by lite_app. The database is made beforehand (resetapp.sh, or `lite
apply-config DB CONFIG`, which creates it).
"""

import contextlib
import os
from typing import Any

import flask
import werkzeug.exceptions

import lite_config
import lite_counters
import lite_db
import lite_flask

app = flask.Flask(__name__)
lite = lite_flask.Lite(app, os.environ.get("LITE_DB_PATH", "data/lite.db"))
config = lite_config.ConfigWatcher(os.environ.get("LITE_CONFIG_PATH", "config.ini"))


def lite_error(exc: Exception) -> tuple[flask.Response, int, dict[str, str]]:
    """The one place lite's errors become answers, as lite_counters.answer_for says.

    For lite_db.Unavailable it takes over lite_flask's 503, which is the same.
    """
    status, error, headers = lite_counters.answer_for(exc)
    return flask.jsonify(error=error), status, headers


for _error in lite_counters.ERRORS:
    app.register_error_handler(_error, lite_error)


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
    name = lite_counters.counter_name_from(flask.request.args.getlist("counter"))
    name, value = lite_counters.read_counter(lite.cursor, name)
    return {"counter": name, "value": value}


@app.post("/lite/inc")
def increment() -> dict[str, Any]:
    if flask.request.mimetype not in ("", "application/x-www-form-urlencoded"):
        raise werkzeug.exceptions.UnsupportedMediaType(
            "send the parameters as application/x-www-form-urlencoded"
        )
    params = flask.request.values
    unknown = sorted(set(params) - {"counter", "by"})
    if unknown:
        raise lite_counters.BadInput(f"unknown parameter {unknown[0]!r}: use counter, by")
    name = lite_counters.counter_name_from(params.getlist("counter"))
    by = lite_counters.step_from(params.getlist("by"))
    key = flask.request.headers.get("Idempotency-Key")
    if key is None:
        name, value = lite_counters.increment(lite.cursor, name, by)
    else:
        lite_counters.check_idempotency_key(key)
        name, value, _ = lite_counters.increment_once(lite.cursor, name, by, key)
    return {"counter": name, "value": value}


application = app
