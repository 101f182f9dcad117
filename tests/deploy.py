"""A private Apache + mod_wsgi running the shipped lite.conf, for tests.

Needs root (serve.sh installs Debian packages if missing and starts Apache,
whose daemons run as www-data) and 127.0.0.1 only. Every process it starts is
stopped by PID, through serve.sh's PidFile, and checked gone.
"""

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import history

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAEMONS = 20
# What serve.sh installs as the app, beside config.ini.
APP_FILES = (
    "lite_app.py",
    "lite_db.py",
    "lite_engine.py",
    "lite_counters.py",
    "lite_config.py",
    "lite_ops.py",
    "lite_page.py",
    "lite_metrics.py",
    "lite_pg.py",
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid):
    """PIDs whose parent is `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid):
    """Whether `pid` runs: a zombie (dead, not yet reaped by whoever adopted it) does not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def open_count(pid, path):
    """How many of process `pid`'s descriptors name `path`."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == path
        except OSError:
            continue  # closed meanwhile
    return count


def read_only_query(path, sql, params=()):
    """Rows of `sql` from the database file at `path`, opened read-only."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


class Deployment:
    def __init__(self, home, port, env=None):
        self.home = home
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **(env or {}), "LITE_HOME": home, "LITE_PORT": str(port)}
        self.db = os.path.join(home, "app", "data", "lite.db")
        self.config = os.path.join(home, "app", "config.ini")
        self.error_log = os.path.join(home, "apache", "logs", "error.log")

    def script(self, *args, timeout=600):
        return subprocess.run(
            [os.path.join(ROOT, args[0]), *args[1:]],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def daemons(self):
        """PIDs of the running (wsgi:lite) daemon processes."""
        found = []
        for pid in children(self.apache_pid()):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().startswith(b"(wsgi:lite)"):
                        found.append(pid)
            except OSError:
                continue
        return found

    def query(self, sql, params=()):
        """Rows of `sql`, read from the database file directly, read-only."""
        return read_only_query(self.db, sql, params)

    def value(self, counter="hits"):
        """The counter's value, read from the database file directly."""
        return self.query("SELECT value FROM counters WHERE name = ?", (counter,))[0][0]

    def audit(self):
        """Fingerprints of the config versions applied, oldest first."""
        return [
            row[0] for row in self.query("SELECT fingerprint FROM lite_config_audit ORDER BY id")
        ]

    def write_config(self, text, age_s=5.0, mode=0o644):
        """Replace config.ini by a rename, its mtime `age_s` back (past the settle time)."""
        tmp = self.config + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        then = time.time() - age_s
        os.utime(tmp, (then, then))
        os.chmod(tmp, mode)
        os.replace(tmp, self.config)

    def log_size(self):
        return os.path.getsize(self.error_log)

    def log_since(self, offset):
        """What Apache's error log got since `offset` (from log_size())."""
        with open(self.error_log, errors="replace") as f:
            f.seek(offset)
            return f.read()

    def wait_healthy(self, timeout_s=30):
        """True once /lite/health answers 200 within timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.request("/lite/health")[0] == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.2)
        return False

    def kill_daemons(self, timeout_s=30):
        """SIGKILL every daemon by PID; the new ones' PIDs, once mod_wsgi runs as many."""
        old = self.daemons()
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while len(new := set(self.daemons()) - set(old)) < len(old):
            assert time.monotonic() < deadline, "the daemons did not come back"
            time.sleep(0.1)
        return new

    def warm_up(self, timeout_s=60, db=None):
        """Increments from 20 clients until every daemon holds the database (`db`,
        default lite's) open: each has imported the app and connected, so a timed
        load after it measures serving, not 20 daemons starting at once. Their
        outcomes are not looked at: a daemon still importing may time a client out."""
        deadline = time.monotonic() + timeout_s
        while not all(open_count(pid, db or self.db) for pid in self.daemons()):
            assert time.monotonic() < deadline, "daemons that never opened the database"
            history.run(self.port, clients=20, requests_each=5)

    def integrity(self):
        return self.query("PRAGMA integrity_check")[0][0]

    def apache_pid(self):
        with open(os.path.join(self.home, "apache", "run", "httpd.pid")) as f:
            return int(f.read())

    def request(self, path, data=None):
        """(status, headers, body) of one request; never raises for a status."""
        req = urllib.request.Request(self.base + path, data=data)
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                return res.status, res.headers, res.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read().decode()


@contextlib.contextmanager
def deployed(before_start=None, after_stop=None, env=None):
    """A started Deployment in a fresh /tmp home; stopped and removed afterwards.

    before_start(home) and after_stop(home), if given, run around serve.sh
    start and stop (e.g. to mount a small filesystem for the data); `env`:
    settings for serve.sh (e.g. LITE_PROCESSES and LITE_THREADS).
    """
    if os.geteuid() != 0:
        raise RuntimeError("the Apache tests run as root (run them through ./test.sh)")
    home = tempfile.mkdtemp(prefix="lite-test-", dir="/tmp")
    os.chmod(home, 0o755)  # ours: the daemon user must reach the code below it
    dep = Deployment(home, free_port(), env)
    if before_start is not None:
        before_start(home)
    processes = []
    try:
        started = dep.script("serve.sh", "start")
        assert started.returncode == 0, started.stdout + started.stderr
        apache = dep.apache_pid()
        processes += [apache, *children(apache)]
        yield dep
    finally:
        if processes:
            processes += children(processes[0])  # daemons started since, e.g. after a kill
        stopped = dep.script("serve.sh", "stop", timeout=120)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in processes if alive(pid)]
        for pid in left:
            os.kill(pid, 9)
        if after_stop is not None:
            after_stop(home)
        shutil.rmtree(home, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert left == [], f"processes left running after serve.sh stop: {left}"
