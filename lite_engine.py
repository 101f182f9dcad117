"""Which engine a database is: the one place that tells them apart by name.

A database is named by a path (SQLite, through lite_db) or by a
postgresql:// URL (PostgreSQL, through lite_pg, which needs psycopg: it is
imported only when a URL names it). Everything past opening asks the
cursor's connection instead: `cur.connection.engine`, its `vendor` and
`features` (lite_db.Engine).
"""

import functools
from collections.abc import Callable
from typing import Any

import lite_db

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_url(database: str) -> bool:
    """True if `database` is a URL of a database server, False for a SQLite file's path."""
    return database.startswith(POSTGRES_SCHEMES)


def server_url(url: str) -> str:
    """`url` if it names a database server lite reaches; raises ValueError if it does not.

    So that a URL lite cannot read (a libpq "host=… dbname=…" string, a
    typo) is refused at start, not taken for a SQLite file's name.
    """
    if not is_url(url):
        raise ValueError(
            f"LITE_DATABASE_URL must start with {' or '.join(POSTGRES_SCHEMES)}: {url[:40]!r}"
        )
    return url


def opener(database: str, create: bool = True) -> Callable[[], Any]:
    """A function returning, at each call, a new cursor on this thread's connection to `database`.

    The caller closes each cursor. `create`: make a missing SQLite file (a
    server passes False). The engine's module is imported now, so that a
    missing psycopg fails at start, not at the first request. The function
    raises lite_db.Unavailable (logged and counted) when the database
    cannot be reached.
    """
    if is_url(database):
        import lite_pg

        return functools.partial(lite_pg.cursor, database)
    return functools.partial(lite_db.cursor, database, create)


def cursor(database: str, create: bool = True) -> Any:
    """A new cursor on this thread's connection to `database` (see `opener`)."""
    return opener(database, create)()


def local_path(database: str) -> str | None:
    """The SQLite file `database` names, whose files this machine holds; None for a URL."""
    return None if is_url(database) else database
