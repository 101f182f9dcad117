"""The database file removed, or a copy moved over it, while the real Apache
serves 20 writing clients: every acknowledged increment is in the copy lite
saves, no value is acknowledged twice, writes are refused once the change is
seen (never into a file that is gone), nothing is created in its place, and
`serve.sh restore` of the saved copy brings it all back, sound."""

import glob
import json
import os
import sqlite3
import time

import history
import pytest

pytestmark = [pytest.mark.apache, pytest.mark.slow]


def _newest_saved(dep):
    saved = glob.glob(dep.db + ".saved-*")
    assert saved, "lite saved no copy"
    return max(saved, key=os.path.getmtime)


def _value_in(path):
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT value FROM counters WHERE name = 'hits'").fetchone()[0]
    finally:
        conn.close()


def _change_under_load(dep, change):
    """20 writers for 8 s, `change()` after 2 s; the History."""
    wait = history.start(dep.port, clients=20, seconds=8)
    time.sleep(2)
    change()
    return wait()


def _restore(dep, saved, expected):
    assert dep.script("serve.sh", "stop").returncode == 0
    restored = dep.script("serve.sh", "restore", saved)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    started = dep.script("serve.sh", "start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert dep.value() == expected
    assert dep.integrity() == "ok"
    assert dep.request("/lite/health")[0] == 200
    assert dep.request("/lite/inc", data=b"counter=hits")[0] == 200


def test_a_database_removed_while_serving_loses_nothing(deployment):
    before = deployment.value()
    log_from = deployment.log_size()
    load = _change_under_load(deployment, lambda: os.remove(deployment.db))
    saved = _newest_saved(deployment)
    load.check(before, _value_in(saved))  # every ack in the saved copy, none twice
    assert not load.unknown, load.unknown[:3]
    assert set(load.statuses) == {200, 503}, load.statuses  # refused, after it was seen
    assert len(load.ok) > 100 and len(load.failed) > 100
    status, _, body = deployment.request("/lite/health")
    assert status == 503 and "was removed" in json.loads(body)["reason"]
    assert not os.path.exists(deployment.db)  # nothing made in its place
    log = deployment.log_since(log_from)
    assert f"saved as {saved}" in log and "Traceback" not in log
    _restore(deployment, saved, _value_in(saved))


def test_a_copy_moved_over_the_database_is_refused_and_nothing_is_lost(deployment):
    copy = os.path.join(deployment.home, "copy.db")
    assert deployment.script("serve.sh", "backup", copy).returncode == 0
    before = deployment.value()

    def move_copy_over():
        staged = deployment.db + ".staged"
        os.rename(copy, staged)
        os.chown(staged, *_owner(deployment.db))
        os.rename(staged, deployment.db)  # as `mv copy.db lite.db`

    load = _change_under_load(deployment, move_copy_over)
    saved = _newest_saved(deployment)
    load.check(before, _value_in(saved))
    assert not load.unknown, load.unknown[:3]
    assert set(load.statuses) == {200, 503}, load.statuses
    status, _, body = deployment.request("/lite/health")
    assert status == 503 and "replaced" in json.loads(body)["reason"]
    _restore(deployment, saved, _value_in(saved))


def _owner(path):
    st = os.stat(path)
    return st.st_uid, st.st_gid
