"""SQLAlchemy's dialect compliance suite (sqlalchemy.testing.suite), run by
tests/sqla_suite/run.py on file databases with the stock pysqlite and
aiosqlite dialects and with lite's sqlite+lite:// and sqlite+aiolite://, one
pytest process each. The stock runs must pass; lite's must pass every test
that the stock dialect of its kind passes, but the four of run.py's
LITE_DIFFERENCES, which must fail with "foreign key mismatch" (lite
enforces foreign keys; the suite declares one SQLite refuses then).
"""

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("sqlalchemy")

pytestmark = pytest.mark.slow

# run.py's LITE_DIFFERENCES: lite enforces foreign keys, and this suite class
# declares one to a column that is not unique.
FOREIGN_KEY_MISMATCH = {
    f"test_suite.UnicodeSchemaTest::{name}"
    for name in ("test_col_targeting", "test_insert", "test_reflect", "test_repr")
}
RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sqla_suite", "run.py")


def test_sqlalchemys_dialect_suite_passes_with_lite_as_with_the_stock_dialects(tmp_path, capsys):
    report_file = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, RUN, "--json", str(report_file)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    with capsys.disabled():  # the counts side by side, in CI's log too
        print("\n" + output[output.rfind("SQLAlchemy's dialect compliance suite") :])
    assert report_file.exists(), output[-6000:]
    report = json.loads(report_file.read_text())

    runs = {run["driver"]: run for run in report["runs"]}
    assert list(runs) == ["pysqlite", "lite", "aiosqlite", "aiolite"]
    for driver, run in runs.items():
        assert run["problems"] == [], f"{driver}: {run['failed_tests']}\n{output[-6000:]}"
        assert run["counts"]["passed"] > 1000, driver
    assert [(c["lite"], c["stock"]) for c in report["comparisons"]] == [
        (runs["lite"]["url"], runs["pysqlite"]["url"]),
        (runs["aiolite"]["url"], runs["aiosqlite"]["url"]),
    ]
    for comparison in report["comparisons"]:
        assert comparison["passed_with_stock_only"] == [], comparison
        assert comparison["passed_with_lite_only"] == [], comparison
        assert len(comparison["explained"]) == 4, comparison
        assert comparison["unexplained_expected"] == [], comparison
        assert comparison["same"], comparison
    for lite, stock in (("lite", "pysqlite"), ("aiolite", "aiosqlite")):
        lite_counts, stock_counts = runs[lite]["counts"], runs[stock]["counts"]
        assert stock_counts["failed"] == stock_counts["errors"] == 0, stock
        assert lite_counts["skipped"] == stock_counts["skipped"], lite
        # each test's call passed or failed; a teardown error is counted beside it
        assert lite_counts["passed"] + lite_counts["failed"] == stock_counts["passed"], lite
        failed = {re.sub(r"_sqlite\+[^:]*::", "::", t) for t in runs[lite]["failed_tests"]}
        assert failed == FOREIGN_KEY_MISMATCH, lite
    assert report["ok"] and result.returncode == 0, output[-6000:]
