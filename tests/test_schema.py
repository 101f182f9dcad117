"""lite is a guest in the user's database: it creates only what a feature it
runs needs, names it lite_*, never touches PRAGMA user_version, and upgrades a
database made by lite 0.1 in place, once, keeping every row."""

import sqlite3
import time

import pytest
import webtest

import lite_app
import lite_config
import lite_counters
import lite_db


def tables(path):
    conn = sqlite3.connect(path)
    try:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
    finally:
        conn.close()


def user_version(path):
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def test_opening_a_database_creates_no_table(db_path):
    conn = lite_db.connect(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert tables(db_path) == set()
    assert user_version(db_path) == 0


def test_a_users_database_keeps_exactly_its_tables_and_user_version(tmp_path):
    path = str(tmp_path / "mine.db")
    mine = sqlite3.connect(path)
    mine.executescript(
        """
        CREATE TABLE books (isbn TEXT PRIMARY KEY, title TEXT NOT NULL, copies INTEGER);
        CREATE TABLE health (patient TEXT PRIMARY KEY, status TEXT);
        PRAGMA user_version = 7;
        """
    )
    mine.close()
    cur = lite_db.cursor(path)
    assert lite_db.upsert(cur, "books", {"isbn": "1", "title": "Dune", "copies": 2}) is True
    assert lite_db.transact_one(cur, "UPDATE books SET copies = copies + 1 WHERE isbn = '1'")
    assert lite_db.transact_many(cur, "INSERT INTO health VALUES (?, ?)", [("a", "ok")]) is True
    assert lite_db.transact(cur, [("DELETE FROM books WHERE isbn = ?", ("9",))]) is True
    assert lite_db.get(cur, "books", "1", "copies") == 3
    assert lite_db.get(cur, "health", "a", "status") == "ok"
    cur.close()
    lite_db.close_all()
    assert tables(path) == {"books", "health"}
    assert user_version(path) == 7


def test_a_users_own_health_table_is_never_taken_for_lites(tmp_path, config_path):
    path = str(tmp_path / "mine.db")
    mine = sqlite3.connect(path)
    mine.executescript("CREATE TABLE health (patient TEXT PRIMARY KEY, status TEXT);")
    mine.execute("INSERT INTO health VALUES ('a', 'ok')")
    mine.commit()
    mine.close()
    app = webtest.TestApp(lite_app.make_app(db_path=path, config_path=str(config_path)))
    assert app.get("/lite/health", status=200).json == {"status": "ok"}
    mine = sqlite3.connect(path)
    assert mine.execute("SELECT * FROM health").fetchall() == [("a", "ok")]
    assert mine.execute("SELECT count(*) FROM lite_health").fetchone()[0] == 1
    mine.close()


def test_a_users_own_counters_table_is_refused_not_used(tmp_path):
    path = str(tmp_path / "mine.db")
    mine = sqlite3.connect(path)
    mine.executescript("CREATE TABLE counters (id INTEGER PRIMARY KEY, hits INTEGER);")
    mine.close()
    cur = lite_db.cursor(path)
    with pytest.raises(ValueError, match="not lite's"):
        lite_counters.increment(cur, "hits")
    cur.close()
    lite_db.close_all()
    assert tables(path) == {"counters"}


# The schema lite 0.1 made, as it made it: unprefixed tables, user_version 3.
LITE_0_1_SCHEMA = """
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL,
    position INTEGER NOT NULL) STRICT;
CREATE TABLE config_state (id INTEGER PRIMARY KEY CHECK (id = 1), fingerprint TEXT NOT NULL,
    counters TEXT NOT NULL, applied_at REAL NOT NULL, applied_by INTEGER NOT NULL,
    rejected_fingerprint TEXT) STRICT;
CREATE TABLE config_audit (id INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL,
    pid INTEGER NOT NULL, applied_at REAL NOT NULL) STRICT;
CREATE TABLE idempotency_keys (key TEXT PRIMARY KEY, counter TEXT NOT NULL,
    by INTEGER NOT NULL, value INTEGER NOT NULL, created_at REAL NOT NULL) STRICT;
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
CREATE TABLE health (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at REAL NOT NULL,
    pid INTEGER NOT NULL) STRICT;
PRAGMA user_version = 3;
"""


def _lite_0_1_database(path):
    old = sqlite3.connect(path)
    old.executescript(LITE_0_1_SCHEMA)
    now = time.time()
    old.executemany("INSERT INTO counters VALUES (?, ?, ?)", [("hits", 41, 0), ("misses", 5, 1)])
    old.execute("INSERT INTO config_state VALUES (1, 'v2', '{\"hits\": 0}', ?, 123, NULL)", (now,))
    old.executemany(
        "INSERT INTO config_audit (fingerprint, pid, applied_at) VALUES (?, 123, ?)",
        [("v1", now - 60), ("v2", now)],
    )
    old.execute("INSERT INTO idempotency_keys VALUES ('k', 'hits', 1, 41, ?)", (now,))
    old.execute("INSERT INTO health VALUES (1, ?, 123)", (now,))
    old.commit()
    old.close()


def test_a_lite_0_1_database_is_upgraded_once_keeping_every_row(db_path):
    _lite_0_1_database(db_path)
    cur = lite_db.cursor(db_path)
    assert "config_state" in tables(db_path)  # opening changes nothing: first use does
    assert lite_counters.read_counter(cur, "hits") == ("hits", 41)
    assert tables(db_path) == {
        "counters",
        "lite_config_state",
        "lite_config_audit",
        "lite_idempotency_keys",
        "lite_health",
        "lite_schema",
    }
    assert user_version(db_path) == 3  # the user's number, left alone
    assert lite_counters.read_counter(cur) == ("hits", 41)
    assert lite_counters.increment_once(cur, "hits", 1, "k") == ("hits", 41, True)  # the kept key
    assert lite_counters.increment_once(cur, "hits", 1, "new") == ("hits", 42, False)
    assert lite_config.applied_version(cur)["fingerprint"] == "v2"
    audit = lite_db.query(cur, "SELECT fingerprint FROM lite_config_audit ORDER BY id")
    assert [row[0] for row in audit] == ["v1", "v2"]
    indexes = lite_db.query(cur, "SELECT name FROM sqlite_schema WHERE type = 'index'")
    assert "lite_idempotency_keys_created_at" in {row[0] for row in indexes}
    cur.close()
    lite_db.close_all()
    # Opened again (another process): nothing left to upgrade, nothing changes.
    cur = lite_db.cursor(db_path)
    assert lite_counters.read_counter(cur, "misses") == ("misses", 5)
    versions = dict(lite_db.query(cur, "SELECT feature, version FROM lite_schema"))
    assert versions == {"counters": 1, "config": 1, "idempotency": 1, "health": 1}
    cur.close()


def test_another_user_version_3_database_is_left_alone(db_path):
    mine = sqlite3.connect(db_path)
    mine.executescript(
        "CREATE TABLE config_state (id INTEGER PRIMARY KEY, setting TEXT);"
        "CREATE TABLE config_audit (id INTEGER);"
        "CREATE TABLE idempotency_keys (k TEXT);"
        "CREATE TABLE health (h TEXT);"
        "PRAGMA user_version = 3;"
    )
    mine.close()
    cur = lite_db.cursor(db_path)
    lite_counters.ensure_counters(cur)
    cur.close()
    lite_db.close_all()
    assert tables(db_path) == {
        *("config_state", "config_audit", "idempotency_keys", "health"),
        *("counters", "lite_schema"),  # lite's own, beside
    }
