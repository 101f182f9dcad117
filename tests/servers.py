"""A WSGI server other than Apache (gunicorn, Flask's) on 127.0.0.1 for a test, stopped by PID."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import deploy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
BIN = os.path.dirname(sys.executable)


def prepare(work):
    """A working directory with config.ini and its database, made as a deployment would."""
    with open(os.path.join(work, "config.ini"), "w") as f:
        f.write("[counters]\nhits = 0\nmisses = 0\n")
    os.makedirs(os.path.join(work, "data"))
    made = subprocess.run(
        [sys.executable, "-m", "lite_ops", "apply-config", "data/lite.db", "config.ini"],
        cwd=work,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stdout + made.stderr


@contextlib.contextmanager
def serving(argv, work, timeout_s=30):
    """Run `argv` (a server on 127.0.0.1:{port}) in `work`; yield (port, stderr path)."""
    port = deploy.free_port()
    log = os.path.join(work, "server.log")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{EXAMPLES}"}
    with open(log, "w") as err:
        server = subprocess.Popen(
            [arg.format(port=port, bin=BIN) for arg in argv],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_until_answering(port, server, timeout_s, log)
        yield port, log
    finally:
        # The server and its workers are one process group, ours alone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def _wait_until_answering(port, server, timeout_s, log):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/lite/get", timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                with open(log) as f:
                    raise AssertionError(f"the server did not start: {f.read()[-3000:]}") from None
            time.sleep(0.2)


def get_json(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as res:
        return json.load(res)
