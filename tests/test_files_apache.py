"""The database, its -wal or its -shm removed, or a copy moved over the
database, while the real Apache serves 20 writing clients, and then its
daemons restarted or killed: every acknowledged increment is in the copy lite
saves, no value is acknowledged twice, no write is acknowledged once lite has
refused one (never into a file that is gone, never beside another group of
processes), nothing is created in its place, and `serve.sh restore` of the
saved copy brings it all back, sound. Where normal operation makes these
files anew, nothing is refused."""

import glob
import json
import os
import signal
import sqlite3
import time

import history
import pytest

pytestmark = [pytest.mark.apache, pytest.mark.slow]


def _newest_saved(dep):
    """The last copy the -refused mark names: it holds what every earlier one does."""
    with open(dep.db + "-refused") as marker:
        *_, last = marker.read().splitlines()
    saved = last.split("; saved as ")[1]
    assert os.path.exists(saved)
    return saved


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


def _restart_daemons(dep):
    os.kill(dep.apache_pid(), signal.SIGUSR1)  # apachectl graceful


def _kill_daemons(dep):
    for pid in dep.daemons():
        os.kill(pid, signal.SIGKILL)  # mod_wsgi starts new ones


@pytest.mark.parametrize("then", [_restart_daemons, _kill_daemons], ids=["restart", "kill"])
@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"], ids=["db", "wal", "shm"])
def test_a_file_removed_then_daemons_restarted_or_killed_loses_nothing(deployment, suffix, then):
    deployment.warm_up()  # 20 daemons starting at once can take the 1.5 s before the removal
    before = deployment.value()
    wait = history.start(deployment.port, clients=20, seconds=6)
    time.sleep(1.5)
    os.remove(deployment.db + suffix)
    time.sleep(1.5)
    then(deployment)
    load = wait()
    saved = _newest_saved(deployment)
    load.check(before, _value_in(saved))  # every ack in the saved copy, none twice
    assert load.acknowledged_after_first_refusal() == 0
    assert len(load.ok) > 100 and len(load.failed) > 100
    # 500 and 502: mod_wsgi's, for the requests of daemons that stopped
    # under them (unknown outcomes); lite's own refusals are 503.
    assert set(load.statuses) <= {200, 500, 502, 503}, load.statuses
    status, _, body = deployment.request("/lite/health")
    assert status == 503, body  # the new daemons refuse too
    assert os.path.exists(deployment.db) != (suffix == "")  # nothing made in its place
    print(f"{len(load.ok)} ok, {len(load.failed)} refused, {len(load.unknown)} unknown")
    _restore(deployment, saved, _value_in(saved))


def test_files_made_anew_by_normal_operation_are_not_refused(deployment):
    before = deployment.value()
    wait = history.start(deployment.port, clients=20, seconds=9)
    time.sleep(1.5)
    truncated = _checkpoint_truncate(deployment.db)  # the -wal emptied, the same file
    time.sleep(1.5)
    _restart_daemons(deployment)  # new daemons, the same files
    time.sleep(2)
    assert deployment.script("serve.sh", "stop").returncode == 0  # -wal and -shm deleted...
    assert not os.path.exists(deployment.db + "-wal")
    assert deployment.script("serve.sh", "start").returncode == 0  # ...and made anew
    load = wait()
    load.check(before, deployment.value())
    assert not load.failed and len(load.ok) > 100, load.statuses  # nothing refused
    assert deployment.request("/lite/health")[0] == 200
    assert not glob.glob(deployment.db + ".saved-*")
    assert not os.path.exists(deployment.db + "-refused")
    print(f"checkpoint {truncated}; {len(load.ok)} ok, unknown {len(load.unknown)}")


def _checkpoint_truncate(path):
    conn = sqlite3.connect(path, timeout=10)
    try:
        return conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()


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
    for copy in glob.glob(dep.db + ".saved-*"):
        os.remove(copy)  # the next test's copy is then the only one


def test_a_database_removed_while_serving_loses_nothing(deployment):
    deployment.warm_up()  # every daemon connected before the file goes
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
    deployment.warm_up()  # every daemon connected before the file goes
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
