"""Pulling the power under the real Apache: what each durability mode keeps.

The database directory (LITE_HOME/app/data) is on powerfs (tests/powerfs.c),
which keeps every write not yet flushed in its own memory. A cut throws that
away (every other cut also writes a random half of it, one page torn, as a
disk might) and fails every later operation, as a machine without power
would. Then Apache and every process it started are killed, the power
comes back, the database is what the disk held, and Apache starts again,
as after a reboot.
20 clients increment throughout; each cut falls at a random moment, so the
cuts land among commits, flushes, checkpoints and WAL restarts alike.

Proven, for each mode, cut after cut on one deployment:
- GROUP and FULL: every acknowledged increment survives every cut (each
  returned value is at most the value after the cut), none is acknowledged
  twice, integrity_check is ok;
- NORMAL: integrity ok; the acknowledged increments a cut took are counted
  (reported, and asserted to happen: that is the caveat GROUP removes).
"""

import contextlib
import os
import random
import shutil
import signal
import tempfile
import time

import deploy
import history
import powerfs
import pytest

pytestmark = [pytest.mark.apache, pytest.mark.slow, pytest.mark.root]

CLIENTS = 20
# Cuts per mode (GROUP, FULL, NORMAL): 50 in all; every other one torn.
CUTS = {"GROUP": 20, "FULL": 15, "NORMAL": 15}
LOAD_S = (0.8, 1.5)  # each cut's load lasts a random time in this range
CUT_AFTER_S = (0.5, 0.9)  # of which the power goes at a random share


@contextlib.contextmanager
def deployed_on_powerfs(mode):
    """A deployment whose data directory is on powerfs; yields (deployment, powerfs mount)."""
    backing = tempfile.mkdtemp(prefix="lite-disk-", dir="/tmp")
    os.chmod(backing, 0o755)
    mounts = contextlib.ExitStack()
    holder = {}

    def mount(home):
        data = os.path.join(home, "app", "data")
        os.makedirs(data)
        holder["fs"] = mounts.enter_context(powerfs.mounted(backing, data))

    def unmount(home):
        holder["fs"].on()
        mounts.close()

    try:
        env = {"LITE_SYNCHRONOUS": mode}
        with deploy.deployed(before_start=mount, after_stop=unmount, env=env) as dep:
            yield dep, holder["fs"]
    finally:
        mounts.close()
        shutil.rmtree(backing, ignore_errors=True)


def cut_under_load(dep, fs, rng, torn):
    """One cut among 20 incrementing clients; (their History, value after the cut)."""
    load_s = rng.uniform(*LOAD_S)
    waiting = history.start(dep.port, clients=CLIENTS, seconds=load_s, timeout_s=10.0)
    time.sleep(load_s * rng.uniform(*CUT_AFTER_S))
    fs.cut(torn_seed=rng.randrange(2**31) if torn else None)
    load = waiting()
    # The machine goes down: Apache and every process it started, killed,
    # and gone before the power comes back (one still mapping the -shm
    # would keep its pages in the kernel's cache).
    apache = dep.apache_pid()
    doomed = [apache, *deploy.children(apache)]
    for pid in doomed:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(deploy.alive(pid) for pid in doomed):
        assert time.monotonic() < deadline, "a process outlived the power cut"
        time.sleep(0.05)
    fs.on()
    assert dep.integrity() == "ok"
    after = dep.value()
    started = dep.script("serve.sh", "start")
    assert started.returncode == 0, started.stdout + started.stderr
    return load, after


@pytest.mark.parametrize("mode", list(CUTS))
def test_acknowledged_increments_survive_the_power_cut(mode):
    rng = random.Random(f"power-{mode}")
    with deployed_on_powerfs(mode) as (dep, fs):
        dep.warm_up()
        acked, lost, cuts_with_acks = [], 0, 0
        for number in range(CUTS[mode]):
            load, after = cut_under_load(dep, fs, rng, torn=number % 2 == 1)
            assert not load.bodies_with_lock_errors, load.bodies_with_lock_errors[:3]
            acked += load.ok
            cuts_with_acks += bool(load.ok)
            lost += sum(1 for value in load.ok if value > after)
            if mode != "NORMAL":
                gone = sorted(value for value in load.ok if value > after)
                assert not gone, f"cut {number}: acknowledged, then lost: {gone[:10]} (now {after})"
        print(
            f"\n{mode}: {CUTS[mode]} cuts, {len(acked)} acknowledged, {lost} of them lost,"
            f" final {dep.value()}, status {fs.status()}"
        )
        assert cuts_with_acks >= CUTS[mode] - 1, "cuts that fell before any increment"
        if mode == "NORMAL":
            assert lost > 0, "NORMAL lost nothing: the cuts did not test what they claim"
        else:
            assert len(acked) == len(set(acked)), "a value acknowledged twice"
            assert lost == 0
