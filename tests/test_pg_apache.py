"""Two machines, simulated: two private Apaches (20 daemons each, their own
ports, homes and copies of config.ini) on one private PostgreSQL. Driven at
once, every acknowledged increment is counted once, a config version is
applied once in total; a SIGKILL of one whole Apache loses no acknowledged
increment; PostgreSQL restarted under load: 503s while it is down, nothing
lost, service back on its own."""

import contextlib
import json
import os
import signal
import subprocess
import time

import deploy
import history
import pg
import pytest

pytestmark = [pytest.mark.apache, pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(scope="module")
def shared(pg_cluster):
    """(URL, [Deployment, Deployment]): two Apaches on one database."""
    url = pg_cluster.new_database()
    with contextlib.ExitStack() as stack:
        deps = [
            stack.enter_context(deploy.deployed(env={"LITE_DATABASE_URL": url})) for _ in range(2)
        ]
        for dep in deps:  # every daemon past its first request (imports, connection)
            history.run(dep.port, clients=20, requests_each=10)
        yield url, deps


def test_two_apaches_count_exactly_and_survive_one_killed(shared):
    url, (a, b) = shared
    before = pg.hits(url)
    waits = [history.start(dep.port, seconds=6.0) for dep in (a, b)]
    time.sleep(2.5)
    for pid in [a.apache_pid(), *deploy.children(a.apache_pid())]:  # the whole machine
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    loads = [wait() for wait in waits]
    after = pg.hits(url)
    merged = history.History()
    for load in loads:
        merged.ok += load.ok
        # A refused connection never carried its request: not an unknown outcome.
        merged.unknown += [u for u in load.unknown if u != "ConnectionRefusedError"]
        merged.bodies_with_lock_errors += load.bodies_with_lock_errors
    merged.check(before, after)  # each acknowledged value once, none lost
    assert len(loads[1].ok) > 200 and not loads[1].failed, loads[1].statuses
    assert len(loads[0].ok) > 100, loads[0].statuses  # machine A served until it was killed
    # Cut mid-request (reset, or mod_wsgi's 500 for a daemon killed under it):
    # a few per client of A, whose outcomes the count above allows either way.
    assert len(merged.unknown) <= 60, merged.unknown
    started = a.script("serve.sh", "start")  # orphans stopped by PID, started anew
    assert started.returncode == 0, started.stdout + started.stderr
    assert a.wait_healthy()


def test_a_config_version_is_applied_once_across_both(shared):
    url, deps = shared
    applied = pg.audit_rows(url)
    for age_s, dep in zip((5.0, 3600.0), deps, strict=True):  # mtimes differ
        dep.write_config("[counters]\nhits = 1000\nmisses = 0\n", age_s=age_s)
    wait = [history.start(dep.port, seconds=3.0) for dep in deps]
    loads = [w() for w in wait]
    assert pg.audit_rows(url) == applied + 1
    assert all(not load.failed for load in loads), [load.statuses for load in loads]
    for dep in deps:  # a touch on each machine: the same content, no version
        os.utime(dep.config, (time.time() - 5, time.time() - 5))
    before = pg.hits(url)
    loads = [w() for w in [history.start(dep.port, seconds=2.0) for dep in deps]]
    assert pg.audit_rows(url) == applied + 1
    assert pg.hits(url) == before + sum(len(load.ok) for load in loads)


def test_postgresql_restarted_under_load_loses_nothing(shared, pg_cluster):
    url, (a, _) = shared
    before = pg.hits(url)
    wait = history.start(a.port, seconds=8.0)
    time.sleep(2.0)
    pg_cluster.script("stop")
    time.sleep(2.0)
    pg_cluster.script("start")
    load = wait()
    load.check(before, pg.hits(url))
    assert load.statuses.get(503, 0) > 0, load.statuses  # while it was down
    assert set(load.statuses) <= {200, 503, 502}, load.statuses
    assert len(load.ok) > 100  # before and after
    assert a.wait_healthy()


def test_backup_is_pg_dump_and_restores_the_same_counts(shared, pg_cluster, tmp_path):
    url, (a, _) = shared
    a.request("/lite/inc", data=b"counter=hits")
    dump = str(tmp_path / "lite.dump")
    made = a.script("serve.sh", "backup", dump)
    assert made.returncode == 0, made.stdout + made.stderr
    assert a.script("serve.sh", "backup", dump).returncode == 1  # never overwrites
    copy = pg_cluster.new_database()
    restored = subprocess.run(
        ["/usr/lib/postgresql/15/bin/pg_restore", "--no-owner", "-d", copy, dump],
        capture_output=True,
        text=True,
    )
    assert restored.returncode == 0, restored.stderr
    assert pg.hits(copy) == pg.hits(url)
    assert pg.audit_rows(copy) == pg.audit_rows(url)


def test_serve_runs_a_private_postgresql_when_asked():
    port = deploy.free_port()
    env = {"LITE_POSTGRES": "private", "LITE_PG_PORT": str(port)}
    with deploy.deployed(env=env) as dep:
        pid_file = os.path.join(dep.home, "postgres", "data", "postmaster.pid")
        with open(pid_file) as f:
            postgres = int(f.readline())
        status, _, body = dep.request("/lite/inc", data=b"counter=hits")
        assert status == 200, body
        assert json.loads(dep.request("/lite/stats")[2])["database"]["engine"] == "postgresql"
        url = f"postgresql://lite@127.0.0.1:{port}/lite"
        assert pg.hits(url) == json.loads(body)["value"]
    assert not deploy.alive(postgres)  # stopped with lite, by its PID
