"""The least SQLite work a counter can be, for the benchmark to measure.

One connection per process (WAL, synchronous from LITE_SYNCHRONOUS and
autocheckpoint off, as in lite), one statement per request, and nothing else:
no validation, no config check, no retries, no error handling. What this app loses against hello is
what SQLite itself costs under this server; what lite loses against this app
is lite's own overhead. Do not copy it: it has none of lite's safety.
"""

import os
import sqlite3

import bottle

DB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "lite.db")

application = bottle.Bottle()
_connection = []


def _cursor() -> sqlite3.Cursor:
    if not _connection:
        db = sqlite3.connect(DB_PATH, isolation_level=None, timeout=3)
        synchronous = "FULL" if os.environ.get("LITE_SYNCHRONOUS") == "FULL" else "NORMAL"
        db.execute(f"PRAGMA synchronous = {synchronous}")
        db.execute("PRAGMA wal_autocheckpoint = 0")
        _connection.append(db)
    return _connection[0].cursor()


@application.get("/lite/get")
def get_counter() -> dict:
    name = bottle.request.query.get("counter", "hits")
    cur = _cursor()
    (value,) = cur.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    cur.close()
    return {"counter": name, "value": value}


@application.post("/lite/inc")
def increment() -> dict:
    name = bottle.request.forms.get("counter", "hits")
    cur = _cursor()
    (value,) = cur.execute(
        "UPDATE counters SET value = value + 1 WHERE name = ? RETURNING value", (name,)
    ).fetchone()
    cur.close()
    return {"counter": name, "value": value}
