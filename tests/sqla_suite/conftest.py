"""Keeps the repository's own test run out of harness/.

harness/ is SQLAlchemy's dialect compliance suite, laid out as a third-party
dialect lays it out: its conftest.py loads SQLAlchemy's pytest plugin, whose
hooks take over the set-up of every test in a session and want the plugin's
own options and config (harness/setup.cfg). A test file named so that pytest
would not collect it is not enough: pytest still imports the conftest.py of
every directory it walks into. So the repository's run (testpaths = tests)
must not walk into harness/ at all: collect_ignore, read from this file
before pytest enters the directory, sees to that. (This directory is a
package so that this file is the module sqla_suite.conftest: a second
top-level "conftest" would take that name from tests/conftest.py, which the
repository's tests import from.)

run.py, beside this file, runs the suite in pytest processes of its own,
with harness/setup.cfg as their config; tests/test_sqlalchemy_suite.py runs
run.py.
"""

collect_ignore = ["harness"]
