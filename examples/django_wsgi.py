"""The Django counter app on lite_django, as a WSGI script (mod_wsgi's WSGIScriptAlias)."""

import os

os.environ.setdefault("DJANGO_COUNTER_ENGINE", "lite")

from django_counter.wsgi import application

__all__ = ["application"]
