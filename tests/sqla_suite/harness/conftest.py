"""SQLAlchemy's pytest plugin, loaded as a third-party dialect's conftest.py
loads it (README.dialects.rst in SQLAlchemy's source), with lite's dialects
registered here rather than through the entry points in pyproject.toml, so
that the suite runs on a checkout without installing lite.
"""

import pytest
from sqlalchemy.dialects import registry

registry.register("sqlite.lite", "lite_sqlalchemy", "LiteDialect")
registry.register("sqlite.aiolite", "lite_sqlalchemy", "LiteDialect_async")

# Before anything imports it (sqlalchemy.testing does), as the README has it.
pytest.register_assert_rewrite("sqlalchemy.testing.assertions")

# The SQLite provisioning hooks: a database file per driver (querytest.db
# becomes querytest_<driver>.db), the test_schema database ATTACHed on every
# connection, the files removed after each test class. A dialect loads its
# backend's hooks itself, from the "provision" module of its own package:
# the stock ones find sqlalchemy.dialects.sqlite.provision, but lite's
# dialects live in a top-level module, which has no package to look in.
import sqlalchemy.dialects.sqlite.provision  # noqa: E402, F401
from sqlalchemy.testing.plugin.pytestplugin import *  # noqa: E402, F403
