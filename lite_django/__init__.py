"""A Django database backend: Django's sqlite3 backend with lite's settings and lock waits.

    DATABASES = {"default": {"ENGINE": "lite_django", "NAME": BASE_DIR / "db.sqlite3"}}

See lite_django.base for what it changes.
"""
