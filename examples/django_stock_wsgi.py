"""The Django counter app on Django's own sqlite3 backend, as its docs advise (bench only)."""

import os

os.environ["DJANGO_COUNTER_ENGINE"] = "stock"

from django_counter.wsgi import application

__all__ = ["application"]
