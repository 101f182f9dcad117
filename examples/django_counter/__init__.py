"""lite's counter routes as a Django app: one model, F() increments in atomic().

The database is lite_django's backend (DJANGO_COUNTER_ENGINE=stock: Django's
own sqlite3 backend as its documentation advises for concurrency, for the
benchmark beside it).
"""
