"""Settings for Django's own test suite (tests/test_django_suite.py): file-backed databases.

DJANGO_SUITE_ENGINE: lite_django or django.db.backends.sqlite3;
DJANGO_SUITE_DB_DIR: where the test databases are made (in memory, SQLite
would use neither WAL nor any lock wait).
"""

import os

_DIR = os.environ["DJANGO_SUITE_DB_DIR"]
_ENGINE = os.environ["DJANGO_SUITE_ENGINE"]

DATABASES = {
    alias: {"ENGINE": _ENGINE, "TEST": {"NAME": os.path.join(_DIR, f"{alias}.db")}}
    for alias in ("default", "other")
}
SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False
