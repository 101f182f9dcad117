"""powerfs, the power-loss simulator (tests/powerfs.c, tests/powerfs.py), proven.

Each test mounts a fresh backing directory, writes through the mount, cuts
the power and checks what the backing directory ("the disk") kept. Child
processes are killed by PID; every mount is unmounted after its test.
"""

import errno
import fcntl
import mmap
import os
import pwd
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

import powerfs
import pytest

pytestmark = pytest.mark.root

PAGE = 4096
CHILD_TIMEOUT_S = 30.0
WWW_DATA = pwd.getpwnam("www-data")


@pytest.fixture(scope="session")
def binary(tmp_path_factory):
    return powerfs.build(str(tmp_path_factory.mktemp("powerfs")))


@pytest.fixture
def fs(binary):
    """A mount of a fresh backing dir, both under a 0755 dir www-data can reach."""
    top = tempfile.mkdtemp(prefix="powerfs-", dir="/tmp")
    os.chmod(top, 0o755)
    backing, mnt = os.path.join(top, "backing"), os.path.join(top, "mnt")
    os.mkdir(backing, 0o755)
    os.mkdir(mnt, 0o755)
    try:
        with powerfs.mounted(backing, mnt, binary) as mounted:
            yield mounted
    finally:
        assert not os.path.ismount(mnt)
        shutil.rmtree(top)


class Child:
    """A Python child process that prints lines; killed by PID when done with."""

    def __init__(self, script, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.lines = []
        self._partial = b""

    def _read(self, timeout_s):
        """Reads what comes within timeout_s; False once the output has ended."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            return True
        data = os.read(self.proc.stdout.fileno(), 65536)
        *complete, self._partial = (self._partial + data).split(b"\n")
        self.lines += [line.decode() for line in complete]
        return bool(data)

    def wait_lines(self, count, timeout_s=CHILD_TIMEOUT_S):
        """The lines printed so far, once there are `count`; AssertionError if not in time."""
        deadline = time.monotonic() + timeout_s
        while len(self.lines) < count:
            assert time.monotonic() < deadline, f"child printed only {self.lines[-5:]}"
            assert self._read(0.1), f"child ended after {self.lines[-5:]}"
        return self.lines

    def send(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self):
        """SIGKILL by PID (as power loss does); every line it had printed."""
        if self.proc.stdout.closed:
            return self.lines
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=CHILD_TIMEOUT_S)
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while self._read(0.1) and time.monotonic() < deadline:
            pass
        self.proc.stdin.close()
        self.proc.stdout.close()
        return self.lines

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def write(path, data, sync=None, mode="wb"):
    """Write data, then sync (os.fsync, os.fdatasync or None), then close."""
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        if sync:
            sync(f.fileno())


def read(path):
    with open(path, "rb") as f:
        return f.read()


def disk(fs, name):
    """What the backing directory holds."""
    return read(os.path.join(fs.backing, name))


def power_cycle(fs):
    fs.cut()
    assert fs.status()["state"] == "off"
    fs.on()
    assert fs.status()["dirty_pages"] == 0


def test_unflushed_writes_are_lost_and_synced_ones_survive(fs):
    mnt = fs.mountpoint
    old, new = b"o" * 10000, b"n" * 6000
    for name in ("lost", "fsynced", "fdatasynced"):
        write(f"{mnt}/{name}", old, os.fsync)
    write(f"{mnt}/lost", new, mode="r+b")
    write(f"{mnt}/fsynced", new, os.fsync, mode="r+b")
    write(f"{mnt}/fdatasynced", new, os.fdatasync, mode="r+b")
    write(f"{mnt}/appended", old, os.fsync)
    write(f"{mnt}/appended", new, mode="ab")
    write(f"{mnt}/created", new)

    # Until the cut, the mount shows the writes; the disk has only what was synced.
    assert read(f"{mnt}/lost") == new + old[6000:]
    assert disk(fs, "lost") == old
    assert read(f"{mnt}/appended") == old + new
    assert os.stat(f"{mnt}/appended").st_size == 16000
    assert disk(fs, "appended") == old
    assert disk(fs, "created") == b""
    assert fs.status()["dirty_pages"] == 2 + 2 + 2

    power_cycle(fs)

    assert read(f"{mnt}/lost") == disk(fs, "lost") == old
    assert read(f"{mnt}/fsynced") == disk(fs, "fsynced") == new + old[6000:]
    assert read(f"{mnt}/fdatasynced") == disk(fs, "fdatasynced") == new + old[6000:]
    assert read(f"{mnt}/appended") == old
    assert os.stat(f"{mnt}/appended").st_size == 10000
    assert read(f"{mnt}/created") == b""  # created (metadata) but its data lost
    # An append after power-on lands at the end the disk has, not the lost one.
    write(f"{mnt}/appended", b"z", os.fsync, mode="ab")
    assert disk(fs, "appended") == old + b"z"


def test_the_cache_follows_the_file_not_the_name(fs):
    """Renames and hard links share a file's cache; truncate is durable, data is not."""
    mnt = fs.mountpoint
    write(f"{mnt}/a", b"x" * 10000)
    os.link(f"{mnt}/a", f"{mnt}/c")
    assert read(f"{mnt}/c") == b"x" * 10000
    os.rename(f"{mnt}/a", f"{mnt}/b")
    fd = os.open(f"{mnt}/b", os.O_RDWR)
    os.fsync(fd)
    os.close(fd)
    assert disk(fs, "c") == b"x" * 10000

    write(f"{mnt}/t", b"y" * 10000)
    os.truncate(f"{mnt}/t", 5000)
    assert read(f"{mnt}/t") == b"y" * 5000
    write(f"{mnt}/t", b"w", mode="ab")
    assert read(f"{mnt}/t") == b"y" * 5000 + b"w"

    fd = os.open(f"{mnt}/gone", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"g" * 100)
    os.unlink(f"{mnt}/gone")
    assert os.pread(fd, 200, 0) == b"g" * 100
    files = fs.status()["files"]
    os.close(fd)
    assert fs.status()["files"] == files - 1

    power_cycle(fs)
    assert read(f"{mnt}/t") == b"\0" * 5000  # the size was metadata, the bytes were not


def test_power_off_fails_everything_with_eio_until_on(fs):
    mnt = fs.mountpoint
    write(f"{mnt}/f", b"durable", os.fsync)
    os.mkdir(f"{mnt}/d")
    before = os.open(f"{mnt}/f", os.O_RDWR)
    try:
        os.pwrite(before, b"DURABLE", 0)
        fs.cut()
        assert fs.status()["state"] == "off"
        attempts = [
            lambda: os.pwrite(before, b"X", 0),
            lambda: os.pread(before, 7, 0),
            lambda: os.fsync(before),
            lambda: os.ftruncate(before, 0),
            lambda: os.fstat(before),  # the kernel asks by path: works again after on
            lambda: os.open(f"{mnt}/f", os.O_RDONLY),
            lambda: os.open(f"{mnt}/new", os.O_WRONLY | os.O_CREAT),
            lambda: os.stat(f"{mnt}/f"),
            lambda: os.listdir(mnt),
            lambda: os.mkdir(f"{mnt}/d2"),
            lambda: os.unlink(f"{mnt}/f"),
            lambda: os.rename(f"{mnt}/f", f"{mnt}/g"),
            lambda: os.statvfs(mnt),
        ]
        for attempt in attempts:
            with pytest.raises(OSError) as raised:
                attempt()
            assert raised.value.errno == errno.EIO
        assert sorted(os.listdir(fs.backing)) == ["d", "f"]
        assert disk(fs, "f") == b"durable"
        with pytest.raises(OSError) as raised:
            fs.command("of")
        assert raised.value.errno == errno.EINVAL
        assert fs.status()["state"] == "off"

        fs.on()
        for attempt in attempts[:4]:  # a handle from before the cut stays dead
            with pytest.raises(OSError) as raised:
                attempt()
            assert raised.value.errno == errno.EIO
        assert read(f"{mnt}/f") == b"durable"
        write(f"{mnt}/f", b"again", os.fsync, mode="r+b")
        assert disk(fs, "f") == b"againle"
        assert sorted(os.listdir(mnt)) == ["d", "f"]
    finally:
        os.close(before)


DIRTY_MAP = """
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED)
m[:] = b"n" * len(m)
print("dirty", flush=True)
time.sleep(60)
"""


def test_after_power_on_a_new_open_reads_what_the_disk_holds(fs):
    """No kernel page cache outlives a cut: not of direct_io files, nor of a
    page-cached -shm file with dirty mmap pages, whether its process was killed
    or still runs (its stores are lost quietly: no error at a later close)."""
    mnt = fs.mountpoint
    names = ("plain", "x.db-shm", "y.db-shm")
    for name in names:
        write(f"{mnt}/{name}", b"o" * 2 * PAGE, os.fsync)
    with open(f"{mnt}/plain", "r+b") as f:
        assert f.read() == b"o" * 2 * PAGE
        f.seek(0)
        f.write(b"n" * 3 * PAGE)
    with Child(DIRTY_MAP, f"{mnt}/y.db-shm") as alive:
        with Child(DIRTY_MAP, f"{mnt}/x.db-shm") as killed:
            killed.wait_lines(1)
            alive.wait_lines(1)
            assert read(f"{mnt}/x.db-shm") == b"n" * 2 * PAGE  # one page cache for all
            write(f"{mnt}/x.db-shm", b"n" * PAGE, mode="ab")
            fs.cut()
        fs.on()
        for name in names:
            assert disk(fs, name) == b"o" * 2 * PAGE
            with open(f"{mnt}/{name}", "r+b") as f:
                assert os.fstat(f.fileno()).st_size == 2 * PAGE
                assert f.read() == b"o" * 2 * PAGE, name
    assert fs.status()["dirty_pages"] == 0


def torn_cut(fs, seed, pages=64):
    """Overwrite `pages` synced pages of "o" with "n" unsynced, cut torn with seed:
    what each page became on disk ("o", "n" or the torn prefix's length), and the status."""
    path = f"{fs.mountpoint}/torn"
    write(path, b"o" * pages * PAGE, os.fsync)
    write(path, b"n" * pages * PAGE, mode="r+b")
    fs.cut(torn_seed=seed)
    status = fs.status()
    fs.on()
    data = disk(fs, "torn")
    assert len(data) == pages * PAGE
    kinds = []
    for i in range(pages):
        page = data[i * PAGE : (i + 1) * PAGE]
        prefix = len(page) - len(page.lstrip(b"n"))
        if prefix in (0, PAGE):
            kinds.append(page[:1].decode())
        else:
            assert page == b"n" * prefix + b"o" * (PAGE - prefix)
            assert prefix % 512 == 0
            kinds.append(prefix)
    return kinds, status


def test_a_torn_cut_writes_some_unflushed_pages_one_torn_deterministically(fs):
    kinds, status = torn_cut(fs, seed=7)
    torn = [kind for kind in kinds if isinstance(kind, int)]
    assert len(torn) == 1
    assert 0 < kinds.count("n") < 63 and kinds.count("o") > 0
    assert status["last_cut_dirty"] == 64
    assert status["last_cut_written"] == kinds.count("n") + 1
    assert torn_cut(fs, seed=7)[0] == kinds
    assert torn_cut(fs, seed=8)[0] != kinds


OWNED = """
import os, sys
www, root_file = sys.argv[1:]
with open(os.path.join(www, "made.db"), "w") as f:
    f.write("x")
os.mkdir(os.path.join(www, "sub"))
os.symlink("made.db", os.path.join(www, "link"))
try:
    open(root_file, "a")
except PermissionError:
    print("denied")
"""


def test_files_made_through_the_mount_belong_to_their_maker(fs):
    os.chown(fs.backing, WWW_DATA.pw_uid, WWW_DATA.pw_gid)  # like a data dir in a deployment
    write(f"{fs.mountpoint}/roots", b"r", os.fsync)
    as_www_data = ["/usr/sbin/runuser", "-u", "www-data", "--", "/usr/bin/python3", "-c", OWNED]
    ran = subprocess.run(
        [*as_www_data, fs.mountpoint, f"{fs.mountpoint}/roots"],
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "denied\n"  # default_permissions: the kernel checks access
    for name in ("made.db", "sub", "link"):
        st = os.lstat(os.path.join(fs.backing, name))
        assert (st.st_uid, st.st_gid) == (WWW_DATA.pw_uid, WWW_DATA.pw_gid), name
    st = os.lstat(os.path.join(fs.backing, "roots"))
    assert (st.st_uid, st.st_gid) == (0, 0)


LOCKER = """
import fcntl, os, sys
posix = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(posix, fcntl.LOCK_EX, 1, 0)
whole = os.open(sys.argv[2], os.O_RDWR)
fcntl.flock(whole, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""

MAPPER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 2 * 4096, mmap.MAP_SHARED)
m[0:5] = b"child"
print("mapped", flush=True)
sys.stdin.readline()
print(m[4096:4102].decode(), flush=True)
"""


def test_locks_exclude_and_shared_maps_are_shared_across_processes(fs):
    mnt = fs.mountpoint
    for name in ("posix", "whole", "m.db-shm"):
        write(f"{mnt}/{name}", b"\0" * 2 * PAGE)
    posix, whole = os.open(f"{mnt}/posix", os.O_RDWR), os.open(f"{mnt}/whole", os.O_RDWR)
    try:
        with Child(LOCKER, f"{mnt}/posix", f"{mnt}/whole") as child:
            child.wait_lines(1)
            with pytest.raises(OSError) as raised:
                fcntl.lockf(posix, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            assert raised.value.errno in (errno.EAGAIN, errno.EACCES)
            with pytest.raises(BlockingIOError):
                fcntl.flock(whole, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.lockf(posix, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1)  # another byte is free
            child.send("release")
            assert child.proc.wait(timeout=CHILD_TIMEOUT_S) == 0
        fcntl.lockf(posix, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        fcntl.flock(whole, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(posix)
        os.close(whole)

    fd = os.open(f"{mnt}/m.db-shm", os.O_RDWR)
    try:
        with Child(MAPPER, f"{mnt}/m.db-shm") as child, mmap.mmap(fd, 2 * PAGE) as m:
            child.wait_lines(1)
            assert m[0:5] == b"child"
            m[PAGE : PAGE + 6] = b"parent"
            child.send("look")
            assert child.wait_lines(2)[1] == "parent"
    finally:
        os.close(fd)


WRITER = """
import sqlite3, sys, time
db, synchronous, name, autocheckpoint = sys.argv[1:]
conn = sqlite3.connect(db, timeout=30, isolation_level=None)
conn.execute(f"PRAGMA synchronous={synchronous}")
conn.execute(f"PRAGMA wal_autocheckpoint={autocheckpoint}")
n = 0
try:
    while True:
        n += 1
        conn.execute("INSERT INTO t VALUES (?, ?, randomblob(300))", (name, n))
        print(n, flush=True)
except sqlite3.Error as e:
    print("error", e, flush=True)
    time.sleep(60)
"""


def make_db(fs):
    """A WAL database with an empty table, on disk, no connection left."""
    db = f"{fs.mountpoint}/lite.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (writer TEXT, n INTEGER, pad BLOB, PRIMARY KEY (writer, n))")
    conn.commit()
    conn.close()
    return db


def committed(lines):
    """The row numbers a writer printed: each after its commit returned."""
    return [int(line) for line in lines if line.isdigit()]


def recovered(db):
    """After power-on, with a fresh connection: integrity check and each writer's rows."""
    conn = sqlite3.connect(db)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchall()
        rows = conn.execute("SELECT writer, n FROM t").fetchall()
    finally:
        conn.close()
    by_writer = {"a": set(), "b": set()}
    for writer, n in rows:
        by_writer.setdefault(writer, set()).add(n)
    return integrity, by_writer


@pytest.mark.parametrize("torn_seed", [None, 1, 2])
def test_sqlite_full_sync_commits_survive_a_cut(fs, torn_seed):
    db = make_db(fs)
    with Child(WRITER, db, "FULL", "a", 100) as a, Child(WRITER, db, "FULL", "b", 100) as b:
        a.wait_lines(300)
        b.wait_lines(300)
        fs.cut(torn_seed)
        done = {"a": committed(a.kill()), "b": committed(b.kill())}
    fs.on()
    integrity, rows = recovered(db)
    assert integrity == [("ok",)]
    for name, numbers in done.items():
        assert set(numbers) <= rows[name]  # every acknowledged commit survived
        assert rows[name] <= set(range(1, len(numbers) + 2))  # at most one unacknowledged


BIG = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
conn.execute("PRAGMA cache_size=5")  # the transaction spills its pages to the WAL
conn.execute("BEGIN IMMEDIATE")
for n in range(1, 2001):
    conn.execute("INSERT INTO t VALUES ('big', ?, randomblob(300))", (n,))
print("spilled", flush=True)
time.sleep(60)
"""


def test_sqlite_a_torn_cut_of_an_uncommitted_transaction_keeps_the_commits(fs):
    """Unsynced WAL frames of a transaction not yet committed, half written and
    one torn, are ignored at recovery; every commit survives."""
    db = make_db(fs)
    with Child(WRITER, db, "FULL", "a", 100) as a, Child(WRITER, db, "FULL", "b", 100) as b:
        a.wait_lines(100)
        b.wait_lines(100)
        with Child(BIG, db) as big:
            big.wait_lines(1)
            fs.cut(torn_seed=3)
        done = {"a": committed(a.kill()), "b": committed(b.kill())}
    status = fs.status()
    fs.on()
    integrity, rows = recovered(db)
    assert integrity == [("ok",)]
    assert status["last_cut_dirty"] > 100  # the spilled frames
    assert 0 < status["last_cut_written"] < status["last_cut_dirty"]
    assert "big" not in rows
    for name, numbers in done.items():
        assert set(numbers) <= rows[name] <= set(range(1, len(numbers) + 2))


def count_rows(conn):
    return conn.execute("SELECT count(*) FROM t").fetchall()[0][0]


def test_sqlite_normal_sync_loses_commits_after_the_last_checkpoint(fs):
    db = make_db(fs)
    with Child(WRITER, db, "NORMAL", "a", 0) as a, Child(WRITER, db, "NORMAL", "b", 0) as b:
        a.wait_lines(50)
        b.wait_lines(50)
        before_checkpoint = fs.status()["flushes"]
        conn = sqlite3.connect(db, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
            before = count_rows(conn)
            busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(FULL)").fetchall()[0]
            after = count_rows(conn)
            after_checkpoint = fs.status()["flushes"]
            deadline = time.monotonic() + CHILD_TIMEOUT_S
            while count_rows(conn) < after + 200:  # commits after the checkpoint
                assert time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            conn.close()
        at_cut = fs.status()["flushes"]
        fs.cut()
        done = len(committed(a.kill())) + len(committed(b.kill()))
    fs.on()
    integrity, rows = recovered(db)
    assert integrity == [("ok",)]
    assert busy == 0 and frames == copied > 0
    assert after_checkpoint - before_checkpoint >= 2  # the WAL, then the database
    # No commit synced; a writer that restarts the WAL syncs its new header, once.
    assert at_cut - after_checkpoint <= 1
    assert before <= len(rows["a"]) + len(rows["b"]) <= after < after + 200 <= done
