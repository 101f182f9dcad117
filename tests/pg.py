"""A private PostgreSQL (scripts/postgres.sh) for tests, on 127.0.0.1, stopped by PID."""

import contextlib
import os
import subprocess
import tempfile
import uuid

import deploy
import psycopg

SCRIPT = os.path.join(deploy.ROOT, "scripts", "postgres.sh")


class Cluster:
    def __init__(self, home, port):
        self.home, self.port = home, port
        self.env = {**os.environ, "LITE_PG_HOME": home, "LITE_PG_PORT": str(port)}
        self.admin_url = f"postgresql://lite@127.0.0.1:{port}/postgres"

    def script(self, *args):
        done = subprocess.run(
            [SCRIPT, *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def pid(self):
        with open(os.path.join(self.home, "data", "postmaster.pid")) as f:
            return int(f.readline())

    def new_database(self):
        """The URL of a new, empty database of its own."""
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return f"postgresql://lite@127.0.0.1:{self.port}/{name}"


def query_one(url, sql, params=()):
    """The first row of `sql`, read in a session of its own (deploy.read_only_query's twin)."""
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchone()


def hits(url):
    """The demo counter's value in the database at `url`."""
    return query_one(url, "SELECT value FROM counters WHERE name = 'hits'")[0]


def audit_rows(url):
    """How many config versions were applied to the database at `url`."""
    return query_one(url, "SELECT count(*) FROM lite_config_audit")[0]


@contextlib.contextmanager
def private_cluster():
    if os.geteuid() != 0:
        raise RuntimeError("the PostgreSQL tests run as root (run them through ./test.sh)")
    home = tempfile.mkdtemp(prefix="lite-pg-", dir="/tmp")
    os.chmod(home, 0o755)
    cluster = Cluster(home, deploy.free_port())
    cluster.script("start")
    pid = cluster.pid()
    try:
        yield cluster
    finally:
        cluster.script("stop")
        assert not deploy.alive(pid), f"PostgreSQL (PID {pid}) left running"
        subprocess.run(["rm", "-rf", home], check=True)
