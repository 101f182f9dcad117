"""Runs SQLAlchemy's dialect compliance suite (harness/) once per database URL
and compares lite's dialects with the stock ones.

    .venv/bin/python tests/sqla_suite/run.py [URL ...] [--json PATH] [--jobs N]
        [-- PYTEST_ARGS...]

By default the four: sqlite:// (pysqlite), sqlite+lite://, sqlite+aiosqlite://
and sqlite+aiolite://, each on a file, querytest.db. Each run is a pytest
process of its own, in a new temporary directory: SQLAlchemy's plugin keeps
its database files in the current directory (the file name becomes
querytest_<driver>.db, and the test_schema database it ATTACHes is
<driver>_test_schema.db), so a URL names a bare file, no directory.

Prints a table of pytest's counts per run. Exits 1 if a run had failures or
errors (or pytest did not finish), or if a lite run differs from the stock
run of its kind (lite against pysqlite, aiolite against aiosqlite, when both
ran) in the set of tests that passed; the tests that passed on one side only
are printed. The one exception is LITE_DIFFERENCES: tests that fail with
lite for a reason lite chose, each required to fail with that reason's
error text, so that any other failure, or one of these passing, is still a
difference. Test ids are compared with the driver
taken out: the suite names its backend test classes after the database
config, e.g. ComponentReflectionTest_sqlite+pysqlite_3_40_1.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness")
DEFAULT_URLS = [
    "sqlite:///querytest.db",
    "sqlite+lite:///querytest.db",
    "sqlite+aiosqlite:///querytest.db",
    "sqlite+aiolite:///querytest.db",
]
# lite's driver -> the stock driver it is compared with
STOCK_OF = {"lite": "pysqlite", "aiolite": "aiosqlite"}
# Tests that fail with lite's dialects, and the error text each must fail with.
# lite turns foreign keys on (PRAGMA foreign_keys = ON, as lite_db and
# lite_django do); SQLite leaves them off by default. This suite class
# declares a foreign key to a column that is neither a primary key nor
# unique, which SQLite refuses only when it enforces foreign keys.
LITE_DIFFERENCES = {
    f"test_suite.UnicodeSchemaTest::{name}": "foreign key mismatch"
    for name in ("test_col_targeting", "test_insert", "test_reflect", "test_repr")
}
COUNTS = ["passed", "failed", "errors", "skipped", "xfailed", "xpassed", "deselected"]
# pytest's closing line, bare with -q: "6 failed, 1504 passed, 286 skipped in 21.67s"
_SUMMARY = re.compile(r"^(?:=+ )?(\d+ \w+(?:, \d+ \w+)*) in [\d.]+s(?: \([\d:]+\))?(?: =+)?$", re.M)


def driver_of(url):
    """The driver part of a URL: sqlite+lite:///x -> lite; sqlite:///x -> pysqlite."""
    scheme = url.split(":", 1)[0]
    return scheme.split("+", 1)[1] if "+" in scheme else "pysqlite"


def normal_id(test_id):
    """A test id with the driver out of the config-named class: sqlite+lite -> sqlite+*."""
    return re.sub(r"sqlite\+[A-Za-z0-9]+", "sqlite+*", test_id)


def parse_summary(output):
    """pytest's closing line as counts, or None if there is none."""
    matches = _SUMMARY.findall(output)
    if not matches:
        return None
    counts = dict.fromkeys(COUNTS, 0)
    for part in matches[-1].split(", "):
        number, name = part.split(" ", 1)
        name = {"error": "errors", "warning": "warnings"}.get(name, name)
        counts[name] = int(number)
    return counts


def parse_junit(path):
    """({test id: outcome}, {test id: failure text}) from pytest's --junitxml file;
    outcome is one of passed, failed, error, skipped (xfailed tests are skipped there)."""
    outcomes, messages = {}, {}
    for case in ET.parse(path).iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag for child in case}
        if "error" in tags:
            outcome = "error"
        elif "failure" in tags:
            outcome = "failed"
        elif "skipped" in tags:
            outcome = "skipped"
        else:
            outcome = "passed"
        for child in case:
            if child.tag in ("error", "failure"):
                text = f"{child.get('message') or ''}\n{child.text or ''}"
                messages[test_id] = messages.get(test_id, "") + text
        # a test that failed and then errored in teardown is two entries
        if outcomes.get(test_id) in (None, "passed"):
            outcomes[test_id] = outcome
    return outcomes, messages


def explained(run):
    """The tests of a lite run that failed as LITE_DIFFERENCES says they must."""
    if run["driver"] not in STOCK_OF:
        return set()
    return {
        test_id
        for test_id, outcome in run["outcomes"].items()
        if outcome in ("failed", "error")
        and LITE_DIFFERENCES.get(class_id(test_id), "\0") in run["messages"].get(test_id, "")
    }


def class_id(test_id):
    """A test id without the config in its class name: UnicodeSchemaTest_sqlite+aiolite_async_3_40_1
    -> UnicodeSchemaTest."""
    return re.sub(r"_sqlite\+[^:]*::", "::", test_id)


def run_suite(url, pytest_args=(), timeout=600):
    """One pytest process on the suite for `url`: a dict of what came of it."""
    with tempfile.TemporaryDirectory(prefix="sqla-suite-") as scratch:
        junit = os.path.join(scratch, "junit.xml")
        rundir = os.path.join(scratch, "run")
        os.mkdir(rundir)
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            os.path.join(HARNESS, "setup.cfg"),
            "--rootdir",
            HARNESS,
            os.path.join(HARNESS, "test_suite.py"),
            "--dburi",
            url,
            f"--junitxml={junit}",
            "-q",
            *pytest_args,
        ]
        started = time.monotonic()
        try:
            proc = subprocess.run(
                command,
                cwd=rundir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            output, returncode = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as timed_out:
            # what it had printed, undecoded whatever text=True says
            parts = [timed_out.stdout or b"", timed_out.stderr or b""]
            output = "".join(
                part.decode(errors="replace") if isinstance(part, bytes) else part for part in parts
            )
            output += f"\n(timed out after {timeout:.0f} s)"
            returncode = None
        seconds = time.monotonic() - started
        outcomes, messages = parse_junit(junit) if os.path.exists(junit) else ({}, {})
    return {
        "url": url,
        "driver": driver_of(url),
        "returncode": returncode,
        "seconds": round(seconds, 1),
        "counts": parse_summary(output),
        "outcomes": outcomes,
        "messages": messages,
        "output": output,
    }


def compare(lite, stock):
    """What differs between a lite run and the stock run of its kind.

    Tests that failed with lite as LITE_DIFFERENCES says are counted as
    passed there, and listed as "explained"; every one of those must be
    explained, or it is a difference too.
    """
    lite_explained = {normal_id(t) for t in explained(lite)}
    lite_passed = {normal_id(t) for t, o in lite["outcomes"].items() if o == "passed"}
    stock_passed = {normal_id(t) for t, o in stock["outcomes"].items() if o == "passed"}
    lite_passed |= lite_explained
    return {
        "lite": lite["url"],
        "stock": stock["url"],
        "failed": [(lite["counts"] or {}).get("failed"), (stock["counts"] or {}).get("failed")],
        "explained": sorted(lite_explained),
        "unexplained_expected": sorted(
            set(LITE_DIFFERENCES) - {class_id(t) for t in explained(lite)}
        ),
        "passed_with_stock_only": sorted(stock_passed - lite_passed),
        "passed_with_lite_only": sorted(lite_passed - stock_passed),
        "same": lite_passed == stock_passed
        and not set(LITE_DIFFERENCES) - {class_id(t) for t in explained(lite)}
        and lite["counts"] is not None,
    }


def run_problems(run):
    """Why a run by itself counts as bad: [] if it does not."""
    counts = run["counts"]
    if counts is None:
        return [f"pytest did not finish (exit code {run['returncode']})"]
    unexplained = [
        test_id
        for test_id, outcome in run["outcomes"].items()
        if outcome in ("failed", "error") and test_id not in explained(run)
    ]
    problems = [f"{len(unexplained)} failed or errors"] if unexplained else []
    if counts["passed"] == 0:
        problems.append("no test passed")
    if run["returncode"] not in (0, 1) or (run["returncode"] == 1 and not explained(run)):
        problems.append(f"pytest's exit code {run['returncode']}")
    return problems


def table(runs):
    width = max(16, *(len(run["driver"]) + 2 for run in runs))
    lines = [" " * 12 + "".join(f"{run['driver']:>{width}}" for run in runs)]
    for name in [*COUNTS, "seconds"]:
        cells = []
        for run in runs:
            value = run["seconds"] if name == "seconds" else (run["counts"] or {}).get(name, "?")
            cells.append(f"{value:>{width}}")
        lines.append(f"{name:12}" + "".join(cells))
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = []
    if "--" in argv:
        argv, pytest_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", nargs="*", default=DEFAULT_URLS, metavar="URL")
    parser.add_argument("--json", metavar="PATH", help="write the table and comparisons here")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    args = parser.parse_args(argv)
    for url in args.urls:
        database = url.split("///", 1)[-1]
        if "///" not in url or not database or "/" in database:
            parser.error(f"{url}: give a bare file name (sqlite:///querytest.db), no directory")

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = list(pool.map(lambda url: run_suite(url, pytest_args, args.timeout), args.urls))
    total = time.monotonic() - started

    ok = True
    for run in runs:
        problems = run_problems(run)
        if problems:
            ok = False
            print(f"\n{run['url']}: {', '.join(problems)}")
            print(run["output"][-6000:])
    print(f"\nSQLAlchemy's dialect compliance suite, {total:.0f} s in all:")
    print(table(runs))

    by_driver = {run["driver"]: run for run in runs}
    comparisons = []
    for run in runs:
        stock = by_driver.get(STOCK_OF.get(run["driver"]))
        if stock is None:
            continue
        comparison = compare(run, stock)
        comparisons.append(comparison)
        if comparison["same"]:
            note = f" ({len(comparison['explained'])} failed as LITE_DIFFERENCES says)"
            print(f"{run['driver']} as {stock['driver']}: the same tests passed{note}")
            continue
        ok = False
        failed, failed_stock = comparison["failed"]
        print(
            f"\n{run['driver']} differs from {stock['driver']} (failed {failed} / {failed_stock})"
        )
        for key in ("passed_with_stock_only", "passed_with_lite_only", "unexplained_expected"):
            if comparison[key]:
                print(f"  {key.replace('_', ' ')} ({len(comparison[key])}):")
                for test_id in comparison[key]:
                    print(f"    {test_id}")

    if args.json:
        report = {
            "seconds": round(total, 1),
            "runs": [
                {key: run[key] for key in ("url", "driver", "returncode", "seconds", "counts")}
                | {
                    "problems": run_problems(run),
                    "failed_tests": {
                        test_id: outcome
                        for test_id, outcome in sorted(run["outcomes"].items())
                        if outcome in ("failed", "error")
                    },
                }
                for run in runs
            ],
            "comparisons": comparisons,
            "ok": ok,
        }
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
