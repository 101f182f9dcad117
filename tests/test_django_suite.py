"""Django's own database tests, from its source distribution (setup.sh puts it
in build/), run with lite_django and with Django's stock sqlite3 backend, on
file-backed databases, one process each. Both must run the same tests and
skip the same; lite_django may differ only where it means to: it begins
transactions with BEGIN IMMEDIATE, and two tests assert the stock default,
a plain BEGIN.
"""

import os
import re
import subprocess
import sys

import django
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "build", f"django-{django.__version__}", "tests")
APPS = ["backends", "transactions", "get_or_create", "queries", "model_fields"]
# The tests that assert Django's default BEGIN (deferred).
BEGIN_TESTS = {
    "test_commit_debug_log (backends.base.test_base.DatabaseWrapperLoggingTests"
    ".test_commit_debug_log)",
    "test_default_transaction_mode (backends.sqlite.tests.TestTransactionMode"
    ".test_default_transaction_mode)",
}


def _run_suite(engine, db_dir):
    """Django's runtests.py on APPS; (counts, failed test names, output)."""
    options = ["--settings=django_suite_settings", "--noinput", "--parallel", "1"]
    result = subprocess.run(
        [sys.executable, "runtests.py", *options, *APPS],
        cwd=SOURCE,
        env={
            **os.environ,
            "PYTHONPATH": f"{os.path.join(ROOT, 'tests')}:{ROOT}",
            "DJANGO_SUITE_ENGINE": engine,
            "DJANGO_SUITE_DB_DIR": str(db_dir),
        },
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    ran = re.search(r"^Ran (\d+) tests?", output, re.M)
    assert ran, output[-3000:]
    counts = {"ran": int(ran.group(1))}
    summary = re.search(r"^(OK|FAILED)(?: \((.*)\))?$", output, re.M)
    assert summary, output[-3000:]
    for part in (summary.group(2) or "").split(", "):
        if "=" in part:
            name, number = part.split("=")
            counts[name] = int(number)
    failed = set(re.findall(r"^(?:FAIL|ERROR): (.+)$", output, re.M))
    return counts, failed, output


def test_djangos_own_tests_pass_with_lite_django_as_with_the_stock_backend(tmp_path):
    if not os.path.isdir(SOURCE):
        pytest.fail(f"no Django source distribution at {SOURCE}: run scripts/setup.sh --dev")
    (tmp_path / "stock").mkdir()
    (tmp_path / "lite").mkdir()
    stock, stock_failed, stock_output = _run_suite("django.db.backends.sqlite3", tmp_path / "stock")
    lite, lite_failed, lite_output = _run_suite("lite_django", tmp_path / "lite")
    print(f"Django {django.__version__}, apps {' '.join(APPS)}:")
    for name in sorted(set(stock) | set(lite)):
        print(f"  {name:20} stock {stock.get(name, 0):5}   lite_django {lite.get(name, 0):5}")
    assert not stock_failed, stock_output[-3000:]
    assert lite_failed == BEGIN_TESTS, lite_output[-5000:]
    assert lite_output.count("AssertionError: 'BEGIN IMMEDIATE' != 'BEGIN'") == len(BEGIN_TESTS)
    assert lite["ran"] == stock["ran"] > 1000
    assert lite.get("skipped") == stock.get("skipped")
    assert lite.get("failures") == len(BEGIN_TESTS) and "errors" not in lite
