"""The systemd unit serve.sh writes: valid for systemd-analyze verify, and,
while it is installed, serve.sh starts and stops lite through systemctl, so
that systemd and serve.sh never both manage the Apache.

systemd is not PID 1 where CI runs (a container), so the routing test puts
tests/fakebin/systemctl first on PATH: it runs the unit's Environment=,
ExecStartPre= and ExecStart= lines as systemd would. Restart=on-failure and
start at boot are systemd's own and are not exercised here."""

import os
import shutil
import subprocess
import tempfile
import time

import deploy
import pytest

FAKEBIN = os.path.join(deploy.ROOT, "tests", "fakebin")


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_the_unit_passes_systemd_analyze_verify(tmp_path, log_format):
    env = {
        **os.environ,
        "LITE_HOME": "/srv/lite-unit-test",
        "LITE_PORT": "8123",
        "LITE_LOG_FORMAT": log_format,
    }
    unit = subprocess.run(
        [os.path.join(deploy.ROOT, "serve.sh"), "unit"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    home = "/srv/lite-unit-test"
    assert f"ExecStart=/usr/sbin/apache2 -f {home}/apache/httpd.conf -DFOREGROUND\n" in unit
    assert "Restart=on-failure\n" in unit
    assert "WantedBy=multi-user.target\n" in unit
    assert f"Environment=PROMETHEUS_MULTIPROC_DIR={home}/apache/metrics\n" in unit
    assert f"Environment=LITE_LOG_FORMAT={log_format}\n" in unit
    (tmp_path / "lite.service").write_text(unit)
    verified = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "lite.service")],
        capture_output=True,
        text=True,
    )
    assert (verified.returncode, verified.stdout, verified.stderr) == (0, "", "")


def test_the_unit_refuses_a_home_it_could_not_quote():
    env = {**os.environ, "LITE_HOME": "/srv/my lite"}
    made = subprocess.run(
        [os.path.join(deploy.ROOT, "serve.sh"), "unit"], env=env, capture_output=True, text=True
    )
    assert made.returncode == 1
    assert "without spaces" in made.stderr


def _command_line(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


@pytest.mark.apache
@pytest.mark.slow
def test_serve_goes_through_systemctl_while_the_unit_is_installed():
    if os.geteuid() != 0:
        pytest.fail("the Apache tests run as root (run them through ./test.sh)")
    home = tempfile.mkdtemp(prefix="lite-test-", dir="/tmp")
    os.chmod(home, 0o755)
    units, state = os.path.join(home, "units"), os.path.join(home, "systemctl")
    os.makedirs(state)
    env = {
        "PATH": FAKEBIN + os.pathsep + os.environ["PATH"],
        "LITE_SYSTEMD_DIR": units,
        "FAKE_SYSTEMCTL_STATE": state,
    }
    dep = deploy.Deployment(home, deploy.free_port(), env)
    unit_file = os.path.join(units, "lite.service")
    metrics_dir = os.path.join(home, "apache", "metrics")
    started = []

    def calls():
        with open(os.path.join(state, "calls")) as f:
            return f.read().splitlines()

    def serve(*args):
        done = dep.script("serve.sh", *args)
        assert done.returncode == 0, done.stdout + done.stderr
        if os.path.exists(os.path.join(home, "apache", "run", "httpd.pid")):
            with open(os.path.join(home, "apache", "run", "httpd.pid")) as f:
                pid = f.read().strip()
            if pid.isdigit():
                started.extend([int(pid), *deploy.children(int(pid))])
        return done

    try:
        serve("install-unit")
        assert calls() == ["daemon-reload", "enable --now lite.service"]
        assert os.path.exists(unit_file)
        apache = dep.apache_pid()
        assert _command_line(apache).endswith(" -DFOREGROUND ")  # the unit's ExecStart
        assert dep.request("/lite/live")[0] == 200
        assert "lite_processes" in dep.request("/metrics")[2]
        assert "running" in serve("status").stdout

        serve("stop")
        assert calls()[-1] == "stop lite.service"
        assert not deploy.alive(apache)

        with open(os.path.join(metrics_dir, "counter_999999.db"), "w") as f:
            f.write("from the last run")
        serve("start")
        assert calls()[-2:] == ["daemon-reload", "start lite.service"]
        assert not os.path.exists(os.path.join(metrics_dir, "counter_999999.db"))
        assert dep.request("/lite/get")[0] == 200
        apache = dep.apache_pid()
        assert _command_line(apache).endswith(" -DFOREGROUND ")

        serve("remove-unit")
        assert calls()[-2:] == ["disable --now lite.service", "daemon-reload"]
        assert not os.path.exists(unit_file)
        assert not deploy.alive(apache)

        made = len(calls())
        serve("start")  # serve.sh's own Apache again
        assert " -k start " in _command_line(dep.apache_pid())
        assert len(calls()) == made
        serve("stop")
    finally:
        if os.path.exists(unit_file):
            dep.script("serve.sh", "remove-unit", timeout=120)
        dep.script("serve.sh", "stop", timeout=120)
        deadline = time.monotonic() + 30
        while any(deploy.alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in started if deploy.alive(pid)]
        for pid in left:
            os.kill(pid, 9)
        shutil.rmtree(home, ignore_errors=True)
    assert left == []
