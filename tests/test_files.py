"""The database file removed or replaced under a running process: writes are
refused (never acknowledged into a file nobody will see again), the file the
process still holds is saved beside the path, and nothing is created anew."""

import glob
import logging
import os
import sqlite3

import pytest

import lite_counters
import lite_db
import lite_ops


def saved_copies(db_path):
    return sorted(glob.glob(db_path + ".saved-*"))


def value_in(path):
    conn = sqlite3.connect(path, uri=path.startswith("file:"))
    try:
        return conn.execute("SELECT value FROM counters WHERE name = 'hits'").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def counting(db_path, other):
    other.execute("INSERT INTO counters VALUES ('hits', 0, 0)")
    cur = lite_db.cursor(db_path, create=False)
    for _ in range(5):
        lite_counters.increment(cur, "hits")
    return cur


def test_a_removed_database_refuses_writes_and_is_saved(db_path, counting, caplog):
    os.remove(db_path)  # as `rm lite.db` while serving
    with caplog.at_level(logging.ERROR, logger="lite_db"), pytest.raises(lite_db.Unavailable):
        lite_counters.increment(counting, "hits")
    with pytest.raises(lite_db.Unavailable, match="was removed"):
        lite_counters.increment(counting, "hits")  # still refused
    assert lite_ops.health(counting) == f"files changed: {db_path} was removed"
    (saved,) = saved_copies(db_path)
    assert value_in(saved) == 5  # every acknowledged increment
    assert f"saved as {saved}" in caplog.text and "serve.sh restore" in caplog.text
    assert not os.path.exists(db_path)  # nothing created in its place
    assert lite_counters.read_counter(counting, "hits") == ("hits", 5)  # reads go on


def test_a_file_moved_over_the_database_is_refused_not_written(db_path, counting, tmp_path):
    copy = tmp_path / "copy.db"
    assert lite_ops.backup(db_path, str(copy))
    lite_counters.increment(counting, "hits")  # 6: only in the live file
    os.replace(copy, db_path)  # as `mv backup lite.db` while serving
    with pytest.raises(lite_db.Unavailable, match="replaced by another file"):
        lite_counters.increment(counting, "hits")
    (saved,) = saved_copies(db_path)
    assert value_in(saved) == 6
    assert value_in(f"file:{db_path}?immutable=1") == 5  # the moved-in file itself, unwritten
    with open(lite_db.refusal_marker(db_path)) as marker:
        assert "replaced" in marker.read()
    lite_db.close_all()  # as a process started later
    with pytest.raises(lite_db.Unavailable):
        lite_db.connect(db_path, create=False)


def test_a_removal_just_after_the_look_is_saved_with_that_write(db_path, counting, monkeypatch):
    real = lite_db._file_changed
    calls = []

    def removed_between_the_look_and_the_commit(conn):
        calls.append(1)
        if len(calls) == 1:  # the look before the write: all is well...
            answer = real(conn)
            os.remove(db_path)  # ...then the file goes, before the statement runs
            return answer
        return real(conn)

    monkeypatch.setattr(lite_db, "_file_changed", removed_between_the_look_and_the_commit)
    assert lite_counters.increment(counting, "hits") == ("hits", 6)  # acknowledged...
    (saved,) = saved_copies(db_path)
    assert value_in(saved) == 6  # ...and in the saved copy
    with pytest.raises(lite_db.Unavailable):
        lite_counters.increment(counting, "hits")
