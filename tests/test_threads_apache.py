"""lite under Apache with threaded daemons: processes=4 threads=8 (lite.conf's
LITE_PROCESSES and LITE_THREADS), driven by test_siege.sh's scenarios.

Each daemon thread gets its own connection; the counts stay exact, no client
sees an error, and the error log has no lock error and no traceback.
"""

import deploy
import pytest

pytestmark = [pytest.mark.apache, pytest.mark.slow]


DEPLOY_ENV = {"LITE_PROCESSES": "4", "LITE_THREADS": "8"}  # read by conftest.deployment


def test_four_daemons_of_eight_threads_pass_test_siege(deployment):
    assert len(deployment.daemons()) == 4
    result = deployment.script("test_siege.sh", timeout=900)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test_siege: all passed" in result.stdout
    # More connections than processes: the daemons' threads each opened their own
    # (each connection holds the database file open once).
    daemons = deployment.daemons()
    held = [deploy.open_count(pid, deployment.db) for pid in daemons]
    assert sum(held) > len(daemons), held
    with open(deployment.error_log) as f:
        log = f.read()
    assert "Traceback" not in log and "locked" not in log
