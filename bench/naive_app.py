"""The counter the way most tutorials write it, for the benchmark to measure.

Do not copy this. It opens a connection per request with sqlite3's defaults
(rollback journal, deferred transactions, 5 s timeout), reads the value,
adds in Python and writes it back: under concurrent requests, increments are
acknowledged and then lost, and some requests fail with "database is locked".
"""

import os
import sqlite3

import bottle

DB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "naive.db")

application = bottle.Bottle()


def _connect() -> sqlite3.Connection:
    # The table is made by bench/run.py before the server starts.
    return sqlite3.connect(DB_PATH)


@application.get("/lite/get")
def get_counter() -> dict:
    db = _connect()
    (value,) = db.execute("SELECT value FROM counters WHERE name = 'hits'").fetchone()
    db.close()
    return {"counter": "hits", "value": value}


@application.post("/lite/inc")
def increment() -> dict:
    db = _connect()
    (value,) = db.execute("SELECT value FROM counters WHERE name = 'hits'").fetchone()
    db.execute("UPDATE counters SET value = ? WHERE name = 'hits'", (value + 1,))
    db.commit()
    db.close()
    return {"counter": "hits", "value": value + 1}
