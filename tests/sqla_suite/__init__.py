# A package, so that pytest imports conftest.py here as sqla_suite.conftest:
# a second top-level "conftest" module would take the name from
# tests/conftest.py, which the repository's tests import from.
