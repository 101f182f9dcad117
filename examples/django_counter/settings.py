"""Settings of the Django counter app: the least Django needs, and the database.

LITE_DB_PATH: the database file (default data/django.db in the working
directory); DJANGO_COUNTER_ENGINE: "lite" (default) or "stock".
"""

import os

ENGINE = os.environ.get("DJANGO_COUNTER_ENGINE", "lite")
if ENGINE not in ("lite", "stock"):
    raise ValueError("DJANGO_COUNTER_ENGINE must be lite or stock")

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "lite-example-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
INSTALLED_APPS = ["django_counter"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "django_counter.urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_NAME = os.path.abspath(os.environ.get("LITE_DB_PATH", os.path.join("data", "django.db")))
if ENGINE == "lite":
    DATABASES = {"default": {"ENGINE": "lite_django", "NAME": _NAME}}
else:
    # Django 5.2's advice for SQLite under concurrency: IMMEDIATE
    # transactions, WAL, a busy timeout of 5 s.
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": _NAME,
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 5,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL",
            },
        }
    }

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
}
