"""Operating lite: /lite/stats, /lite/health, the page's figures, the online
backup, a WAL that stays small under sustained reads, the command line, and
serve.sh restore and resetapp.sh --force removing every file of a database
(these two as root, without Apache)."""

import contextlib
import itertools
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

import deploy
import procs
import pytest
import webtest

import lite_app
import lite_db
import lite_ops


def test_health_is_ok_and_really_writes(app, other):
    assert app.get("/lite/health", status=200).json == {"status": "ok"}
    assert other.execute("SELECT count(*) FROM lite_health").fetchone()[0] == 1


def test_health_is_503_with_the_reason_when_writes_cannot_get_through(other, impatient_app):
    app = impatient_app
    other.execute("BEGIN EXCLUSIVE")
    try:
        res = app.get("/lite/health", status=503)
    finally:
        other.execute("ROLLBACK")
    assert res.json == {"status": "unavailable", "reason": "database write failed"}
    assert res.headers["Retry-After"] == "1"
    assert app.get("/lite/health", status=200).json == {"status": "ok"}


def test_stats_reads_settings_back_from_the_live_connection(app):
    app.post("/lite/inc", {"counter": "hits"})
    stats = app.get("/lite/stats", status=200).json
    assert stats["database"]["journal_mode"] == "wal"
    assert stats["database"]["synchronous"] == "NORMAL"
    assert stats["database"]["busy_timeout_ms"] == lite_db.BUSY_POLL_MS
    assert stats["database"]["lock_budget_ms"] == lite_db.LOCK_BUDGET_MS
    assert stats["database"]["journal_size_limit_bytes"] == lite_db.JOURNAL_SIZE_LIMIT_BYTES
    assert stats["database"]["page_count"] > 0
    assert stats["database"]["wal_bytes"] > 0
    assert stats["database"]["last_checkpoint_at"] <= time.time()
    assert stats["answered_by"] == os.getpid()


def test_stats_count_this_requests_writes_and_config(app):
    before = app.get("/lite/stats", status=200).json["totals"]
    app.post("/lite/inc", {"counter": "hits"}, status=200)
    app.post("/lite/inc", {"counter": "nope"}, status=404)
    stats = app.get("/lite/stats", status=200).json
    totals = stats["totals"]
    assert totals["requests"] == before["requests"] + 3  # this one is counted as it ends
    assert totals["writes"] == before["writes"] + 2  # one each; the 404 one changed no row
    assert totals["write_lock_wait_s"] > before["write_lock_wait_s"]
    assert totals["config_applied"] >= 1  # the app's first request applied config.ini
    assert stats["process_count"] == 1


def _serve_requests(db_path, config_path, requests, done, leave):
    app = webtest.TestApp(lite_app.make_app(db_path=db_path, config_path=config_path))
    for _ in range(requests):
        app.post("/lite/inc", {"counter": "hits"})
    done.set()
    leave.wait(60)
    return os.getpid()


def test_stats_sum_every_process_and_keep_the_counts_of_those_that_exited(
    db_path, config_path, app
):
    before = app.get("/lite/stats").json["totals"]
    done = [procs.event() for _ in range(2)]
    leave = procs.event()
    running = procs.start(
        _serve_requests,
        [
            (db_path, str(config_path), 5, done[0], leave),
            (db_path, str(config_path), 7, done[1], leave),
        ],
    )
    try:
        assert all(event.wait(60) for event in done)
        during = app.get("/lite/stats").json
    finally:
        leave.set()
        procs.finish(*running, timeout_s=60)
    assert during["totals"]["requests"] == before["requests"] + 1 + 5 + 7
    assert during["totals"]["writes"] >= before["writes"] + 5 + 7
    assert during["process_count"] == 3
    after = app.get("/lite/stats").json
    assert after["process_count"] == 1
    assert after["totals"]["requests"] == during["totals"]["requests"] + 1  # none lost
    assert after["totals"]["writes"] == during["totals"]["writes"]


def test_the_page_shows_live_figures(app):
    app.post("/lite/inc", {"counter": "hits"})
    page = app.get("/lite", status=200)
    figures = {
        row.find_all("td")[0].text: row.find_all("td")[1]
        for row in page.html.find(id="figures").find_all("tr")
    }
    assert figures["writes"]["data-stat"] == "totals.writes"
    assert int(figures["writes"].text) >= 2
    assert figures["journal mode"].text == "wal"
    assert figures["WAL size"].text.endswith(" KiB")
    assert page.html.find("a", href="/lite/stats") is not None


def _read_until(db_path, stop_at):
    cur = lite_db.cursor(db_path)
    reads = 0
    while time.time() < stop_at:
        assert lite_db.get(cur, "counters", "hits", "value") is not None
        reads += 1
    return reads


WRITER_PAUSE_S = 0.0005  # between two increments, as a web request's other work leaves


@pytest.mark.slow
def test_the_wal_stays_small_under_reads_that_never_pause(db_path, app, other):
    """10 readers that never pause, 3 writers: without lite's RESTART
    checkpoints the -wal file grew without bound here (118 MB in 8 s)."""
    app.get("/lite", status=200)
    wal = db_path + "-wal"
    stop_at = time.time() + 9
    readers = procs.start(_read_until, [(db_path, stop_at)] * 10)
    writers = procs.start(procs.increment_until, [(db_path, stop_at, WRITER_PAUSE_S)] * 3)
    sizes = []
    while time.time() < stop_at:
        sizes.append(os.path.getsize(wal) if os.path.exists(wal) else 0)
        time.sleep(0.05)
    reads = sum(procs.finish(*readers, timeout_s=60))
    written = procs.finish(*writers, timeout_s=60)
    assert reads > 10_000 and sum(done for done, _, _ in written) > 1000
    assert sum(failed for _, failed, _ in written) == 0
    assert sum(restarts for _, _, restarts in written) >= 3
    shrinks = sum(1 for before, after in itertools.pairwise(sizes) if after < before)
    assert shrinks >= 3, f"the WAL never started over: {sizes[::20]}"
    third = len(sizes) // 3
    assert max(sizes[-third:]) <= 2 * max(sizes[:third]), f"the WAL grew: {sizes[::20]}"
    final = other.execute("SELECT value FROM counters WHERE name = 'hits'").fetchone()[0]
    assert final == sum(done for done, _, _ in written)


def test_backup_under_write_load_is_consistent(db_path, app, other, tmp_path):
    app.get("/lite", status=200)
    stop_at = time.time() + 6
    running = procs.start(procs.increment_until, [(db_path, stop_at, WRITER_PAUSE_S)] * 4)
    time.sleep(3)  # the writers are running
    before = other.execute("SELECT value FROM counters WHERE name = 'hits'").fetchone()[0]
    dest = tmp_path / "copy.db"
    assert lite_ops.backup(db_path, str(dest)) is True
    after = other.execute("SELECT value FROM counters WHERE name = 'hits'").fetchone()[0]
    results = procs.finish(*running, timeout_s=120)
    copy = sqlite3.connect(dest)
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    copied = copy.execute("SELECT value FROM counters WHERE name = 'hits'").fetchone()[0]
    copy.close()
    assert 0 < before <= copied <= after
    assert sum(failed for _, failed, _ in results) == 0  # writers never noticed
    final = other.execute("SELECT value FROM counters WHERE name = 'hits'").fetchone()[0]
    assert final == sum(done for done, _, _ in results)


def test_backup_never_overwrites_and_cleans_up_a_failure(db_path, app, tmp_path):
    app.get("/lite", status=200)
    dest = tmp_path / "copy.db"
    dest.write_text("precious")
    with pytest.raises(ValueError, match="never overwrites"):
        lite_ops.backup(db_path, str(dest))
    assert dest.read_text() == "precious"
    unwritable = tmp_path / "no" / "such" / "dir" / "copy.db"
    assert lite_ops.backup(db_path, str(unwritable)) is False
    assert not unwritable.exists()


def test_the_command_line_backs_up_checks_and_applies_config(
    db_path, app, tmp_path, config_path, capsys
):
    app.get("/lite", status=200)
    dest = tmp_path / "copy.db"
    assert lite_ops.main(["backup", db_path, str(dest)]) == 0
    assert "copied" in capsys.readouterr().out
    assert lite_ops.main(["backup", db_path, str(dest)]) == 1  # never overwrites
    assert lite_ops.main(["check", str(dest)]) == 0
    assert "ok" in capsys.readouterr().out
    broken = tmp_path / "broken.db"
    broken.write_bytes(dest.read_bytes()[:4096] + b"\0" * 4096)
    assert lite_ops.main(["check", str(broken)]) == 1
    assert lite_ops.main(["check", str(tmp_path / "missing.db")]) == 1
    config_path.write_text("[counters]\nviews = 3\n")  # fresh: applied at once all the same
    assert lite_ops.main(["apply-config", db_path, str(config_path)]) == 0
    assert "applied" in capsys.readouterr().out
    assert lite_ops.main(["restore"]) == 2
    assert lite_ops.main([]) == 2


def test_the_command_line_names_a_databases_files_and_the_apps_database(
    tmp_path, monkeypatch, capsys
):
    db = str(tmp_path / "x.db")
    assert lite_ops.main(["files", db]) == 0
    files = [db, f"{db}-wal", f"{db}-shm", f"{db}-queue", f"{db}-refused"]
    assert capsys.readouterr().out == "".join(f"{name}\n" for name in files)
    monkeypatch.chdir(tmp_path)  # the default is beside lite_ops.py, wherever it runs
    monkeypatch.delenv("LITE_DB_PATH", raising=False)
    assert lite_ops.main(["where"]) == 0
    app_dir = os.path.dirname(os.path.abspath(lite_ops.__file__))
    assert capsys.readouterr().out == os.path.join(app_dir, "data", "lite.db") + "\n"
    monkeypatch.setenv("LITE_DB_PATH", db)
    assert lite_ops.main(["where"]) == 0
    assert capsys.readouterr().out == f"{db}\n"
    monkeypatch.setenv("LITE_DB_PATH", "y.db")  # relative: to the working directory, as lite_app
    assert lite_ops.main(["where"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'y.db'}\n"
    assert lite_ops.main(["files"]) == 2


@pytest.fixture
def installed(tmp_path):
    """A LITE_HOME as `serve.sh install` leaves it, without Apache: the app's
    files and config.ini, a venv whose python is this one (lite's core needs
    nothing else); and the scripts' settings, among them a LITE_DB_PATH they
    must not follow (the daemons get none)."""
    if os.geteuid() != 0:
        raise RuntimeError("serve.sh restore and resetapp.sh need root (run through ./test.sh)")
    home = tempfile.mkdtemp(prefix="lite-test-", dir="/tmp")
    os.chmod(home, 0o755)  # ours: the daemon user must reach the code below it
    try:
        app = os.path.join(home, "app")
        os.mkdir(app)
        for name in (*deploy.APP_FILES, "config.ini"):
            shutil.copy(os.path.join(deploy.ROOT, name), app)
        os.makedirs(os.path.join(home, "venv", "bin"))
        os.symlink(os.path.realpath(sys.executable), os.path.join(home, "venv", "bin", "python"))
        env = {**os.environ, "LITE_HOME": home, "LITE_DB_PATH": str(tmp_path / "elsewhere.db")}
        yield home, env
    finally:
        shutil.rmtree(home)


def _script(env, *args):
    done = subprocess.run(
        [os.path.join(deploy.ROOT, args[0]), *args[1:]],
        cwd=deploy.ROOT,  # another lite, whose own lite_ops.py the scripts must not take
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


STALE = b"stale: left by the replaced database"
SIDECARS = ("-wal", "-shm", "-queue", "-refused")


def _leave_stale_files(db):
    """Files beside `db`, new and root's, as a lite run by root leaves them: a
    -queue kept would be one the daemons cannot open (their queue off)."""
    for suffix in SIDECARS:
        with contextlib.suppress(FileNotFoundError):
            os.remove(db + suffix)
        with open(db + suffix, "wb") as f:
            f.write(STALE)


def _stale_files(db):
    """The files beside `db` that still hold what _leave_stale_files wrote."""
    left = []
    for suffix in SIDECARS:
        with contextlib.suppress(FileNotFoundError), open(db + suffix, "rb") as f:
            if f.read().startswith(STALE):
                left.append(suffix)
    return left


@pytest.mark.root
def test_resetapp_force_removes_every_file_of_the_database(installed):
    home, env = installed
    db = os.path.join(home, "app", "data", "lite.db")
    assert "created" in _script(env, "resetapp.sh").stdout
    _leave_stale_files(db)
    assert "deleted" in _script(env, "resetapp.sh", "--force").stdout
    assert _stale_files(db) == []
    assert lite_ops.check(db)
    assert not os.path.exists(env["LITE_DB_PATH"])


@pytest.mark.root
def test_restore_removes_every_file_of_the_replaced_database(installed, tmp_path):
    home, env = installed
    data = os.path.join(home, "app", "data")
    db = os.path.join(data, "lite.db")
    os.mkdir(data)
    sqlite3.connect(db).close()
    _leave_stale_files(db)
    backup = str(tmp_path / "backup.db")
    with contextlib.closing(sqlite3.connect(backup)) as conn, conn:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (42)")
    _script(env, "serve.sh", "restore", backup)
    assert [suffix for suffix in SIDECARS if os.path.exists(db + suffix)] == []
    with open(db, "rb") as restored, open(backup, "rb") as source:
        assert restored.read() == source.read()
    assert len([name for name in os.listdir(data) if ".before-restore." in name]) == 1
