"""The database file removed or replaced under a running process: writes are
refused (never acknowledged into a file nobody will see again), the file the
process still holds is saved beside the path, and nothing is created anew."""

import glob
import logging
import os
import shutil
import sqlite3
import subprocess
import time

import procs
import pytest
from conftest import record_stats

import lite_counters
import lite_db
import lite_ops


def saved_copies(db_path):
    return sorted(glob.glob(db_path + ".saved-*"))


def value_in(path):
    conn = sqlite3.connect(path, uri=path.startswith("file:"))
    try:
        row = conn.execute("SELECT value FROM counters WHERE name = 'hits'").fetchone()
        return None if row is None else row[0]
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


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_a_removed_wal_or_shm_refuses_writes_and_saves_what_was_held(db_path, counting, suffix):
    assert value_in(f"file:{db_path}?immutable=1") != 5  # the WAL holds what the file lacks
    os.remove(db_path + suffix)  # as `rm lite.db-wal` while serving
    with pytest.raises(lite_db.Unavailable, match=f"{suffix} was removed"):
        lite_counters.increment(counting, "hits")
    assert lite_ops.health(counting) == f"files changed: {db_path}{suffix} was removed"
    (saved,) = saved_copies(db_path)
    assert value_in(saved) == 5
    lite_db.close_all()  # as a process started later
    with pytest.raises(lite_db.Unavailable):
        lite_db.connect(db_path, create=False)


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_a_process_started_after_a_wal_or_shm_removal_refuses_the_database(
    db_path, counting, suffix
):
    os.remove(db_path + suffix)  # and no write yet that would notice
    (refused,) = procs.run(procs.open_database, [(db_path,)], timeout_s=60)
    assert refused is not None and f"{suffix} was removed or replaced" in refused
    with pytest.raises(lite_db.Unavailable):  # the holder notices at its next write
        lite_counters.increment(counting, "hits")
    (saved,) = saved_copies(db_path)
    assert value_in(saved) == 5


def test_files_recreated_by_normal_operation_are_not_refused(db_path, counting, other):
    assert procs.run(procs.open_database, [(db_path,)] * 3, timeout_s=60) == [None] * 3
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the -wal emptied, the same file
    lite_counters.increment(counting, "hits")
    other.close()
    lite_db.close_all()  # the last connection closed: -wal and -shm are deleted...
    assert not os.path.exists(db_path + "-wal")
    cur = lite_db.cursor(db_path, create=False)  # ...and made anew
    assert lite_counters.increment(cur, "hits") == ("hits", 7)
    assert procs.run(procs.open_database, [(db_path,)], timeout_s=60) == [None]
    assert not saved_copies(db_path) and not os.path.exists(lite_db.refusal_marker(db_path))


def test_one_copy_is_saved_not_one_per_process(db_path, counting):
    go = procs.event()
    running, results = procs.start(procs.increment_once_more_after, [(db_path, go)] * 4)
    deadline = time.monotonic() + 30
    while lite_counters.read_counter(counting, "hits")[1] < 9 and time.monotonic() < deadline:
        time.sleep(0.05)  # each of the 4 holds the database and has written
    os.remove(db_path)
    go.set()
    assert procs.finish(running, results, timeout_s=60) == [True] * 4
    (saved,) = saved_copies(db_path)
    assert value_in(saved) == 9


@pytest.mark.parametrize("change", ["remove", "move over", "move aside, copy back", "remove -wal"])
def test_a_change_after_looks_without_a_stat_is_refused_as_at_once(
    db_path, counting, monkeypatch, change
):
    time.sleep(1.2)  # the directory left alone since the last look
    lite_counters.increment(counting, "hits")  # 6: a look file by file finds all in place
    looked = record_stats(monkeypatch)
    lite_counters.increment(counting, "hits")  # 7
    monkeypatch.undo()
    assert looked == []  # before and after the write: the ChangeWatch answered, no stat
    # The change comes at once, within the clock tick of the last look.
    if change == "remove":
        os.remove(db_path)
    elif change == "move over":
        shutil.copy(db_path, db_path + ".copy")
        os.replace(db_path + ".copy", db_path)
    elif change == "move aside, copy back":
        os.rename(db_path, db_path + ".old")
        shutil.copy(db_path + ".old", db_path)
    else:
        os.remove(db_path + "-wal")
    with pytest.raises(lite_db.Unavailable, match=r"removed|replaced"):
        lite_counters.increment(counting, "hits")
    assert value_in(saved_copies(db_path)[-1]) == 7  # what was acknowledged is saved


@pytest.mark.parametrize("how", ["renamed", "a symlink swapped"])
def test_a_directory_above_the_database_replaced_is_refused(tmp_path, how):
    """Another directory put at the path of one above the database: its files are others."""
    real = tmp_path / "releases" / "1" / "data"
    real.mkdir(parents=True)
    path = tmp_path / "current" / "data" / "lite.db"
    if how == "renamed":
        path = real / "lite.db"
    else:
        (tmp_path / "current").symlink_to(tmp_path / "releases" / "1")
    cur = lite_db.cursor(str(path))
    lite_counters.ensure_counters(cur)
    lite_db.write(cur, lambda c: c.execute("INSERT INTO counters VALUES ('hits', 0, 0)"))
    lite_counters.increment(cur, "hits")
    lite_counters.increment(cur, "hits")  # looks that found every file in place
    shutil.copytree(tmp_path / "releases" / "1", tmp_path / "releases" / "2")
    if how == "renamed":
        os.rename(tmp_path / "releases" / "1", tmp_path / "releases" / "old")
        os.rename(tmp_path / "releases" / "2", tmp_path / "releases" / "1")
    else:
        (tmp_path / "next").symlink_to(tmp_path / "releases" / "2")
        os.replace(tmp_path / "next", tmp_path / "current")
    with pytest.raises(lite_db.Unavailable, match=r"replaced by another file|removed"):
        lite_counters.increment(cur, "hits")


@pytest.mark.root
def test_a_file_mounted_over_the_database_after_the_directory_settled_is_refused(
    db_path, counting, tmp_path
):
    other = tmp_path / "other.db"
    shutil.copy(db_path, other)
    time.sleep(1.2)  # the directory left alone since the last look
    lite_counters.increment(counting, "hits")  # 6
    lite_counters.increment(counting, "hits")  # 7: the directory alone is looked at
    subprocess.run(["mount", "--bind", str(other), db_path], check=True)  # the directory unchanged
    try:
        with pytest.raises(lite_db.Unavailable, match="replaced by another file"):
            lite_counters.increment(counting, "hits")
    finally:
        subprocess.run(["umount", db_path], check=True)
