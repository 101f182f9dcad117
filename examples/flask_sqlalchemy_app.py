"""lite's counter routes on Flask-SQLAlchemy, on lite's dialect.

    LITE_WSGI_SCRIPT=flask_sqlalchemy_app.py ./serve.sh start   (or: gunicorn -w 4 ...)

The database is LITE_DATABASE_URL (default `sqlite+lite:///` and
data/app.db beside this file); with `sqlite:///…` the same app runs on
SQLAlchemy's defaults. The first request of each process makes the schema
once for all of them (lite_sqlalchemy.run_once).

GET /lite/get?counter=NAME and POST /lite/inc (form: counter, by; optional
Idempotency-Key header) answer lite_app's JSON with its status codes: 400 for
a bad parameter, 404 for an unknown counter, 409 for an overflow, 422 for a
reused key, 503 + Retry-After when the database cannot be reached in time:
lite_counters' input rules, and its answers (answer_for) from one handler.
"""

import os
import time
from typing import Any

import flask
import werkzeug.exceptions
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Connection, insert
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import lite_counters
import lite_sqlalchemy

COUNTERS = {"hits": 0, "misses": 0}  # made with the schema; the first is the default counter
_HERE = os.path.dirname(os.path.abspath(__file__))


class Base(DeclarativeBase):
    pass


app = flask.Flask(__name__)
# serve.sh passes LITE_DATABASE_URL empty when it is not set: empty means the default.
app.config["SQLALCHEMY_DATABASE_URI"] = (
    os.environ.get("LITE_DATABASE_URL") or f"sqlite+lite:///{_HERE}/data/app.db"
)
db = SQLAlchemy(app, model_class=Base)


class Counter(db.Model):
    __tablename__ = "app_counters"
    name: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[int]


class IdempotencyKey(db.Model):
    __tablename__ = "app_idempotency_keys"
    key: Mapped[str] = mapped_column(primary_key=True)
    counter: Mapped[str]
    by: Mapped[int]
    value: Mapped[int]
    created_at: Mapped[float]


def create_schema(conn: Connection) -> None:
    db.metadata.create_all(conn)
    conn.execute(insert(Counter), [{"name": n, "value": v} for n, v in COUNTERS.items()])


def lite_error(exc: Exception) -> tuple[flask.Response, int, dict[str, str]]:
    """The one place lite's errors become answers, as lite_counters.answer_for says."""
    status, error, headers = lite_counters.answer_for(exc)
    return flask.jsonify(error=error), status, headers


for _error in lite_counters.ERRORS:
    app.register_error_handler(_error, lite_error)


@app.errorhandler(werkzeug.exceptions.HTTPException)
def http_error(exc: werkzeug.exceptions.HTTPException) -> tuple[flask.Response, int]:
    return flask.jsonify(error=exc.description), exc.code or 500


@app.before_request
def schema_once() -> None:
    if not app.config.get("SCHEMA_READY"):
        lite_sqlalchemy.run_once(db.engine, "flask_sqlalchemy_app schema 1", create_schema)
        app.config["SCHEMA_READY"] = True


@app.get("/lite/get")
def get_counter() -> dict[str, Any]:
    name = lite_counters.counter_name_from(flask.request.args.getlist("counter"))
    name = name or next(iter(COUNTERS))
    row = db.session.get(Counter, name)
    if row is None:
        raise lite_counters.NoSuchCounter(name)
    return {"counter": row.name, "value": row.value}


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
    name = lite_counters.counter_name_from(params.getlist("counter")) or next(iter(COUNTERS))
    by = lite_counters.step_from(params.getlist("by"))
    key = flask.request.headers.get("Idempotency-Key")
    if key is not None:
        lite_counters.check_idempotency_key(key)
    # A read-modify-write: this request's transaction holds the write lock
    # from its first read (BEGIN IMMEDIATE, in its turn). Asked before the
    # session's first statement.
    db.session.connection(execution_options={"lite_write": True})
    if key is not None and (stored := db.session.get(IdempotencyKey, key)) is not None:
        if (stored.counter, stored.by) != (name, by):
            raise lite_counters.KeyReused(stored.counter, stored.by)
        return {"counter": stored.counter, "value": stored.value}
    row = db.session.get(Counter, name)
    if row is None:
        raise lite_counters.NoSuchCounter(name)
    if row.value + by > lite_counters.MAX_INTEGER:
        raise lite_counters.WouldOverflow(name)
    row.value += by
    value = row.value
    if key is not None:
        db.session.add(
            IdempotencyKey(key=key, counter=name, by=by, value=value, created_at=time.time())
        )
    db.session.commit()
    return {"counter": name, "value": value}


application = app  # the name mod_wsgi looks for
