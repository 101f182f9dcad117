"""SQLAlchemy's dialect compliance suite, whole (README.dialects.rst in SQLAlchemy)."""

from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.testing.suite import *  # noqa: F403
from sqlalchemy.testing.suite import ServerSideCursorsTest as _ServerSideCursorsTest


class ServerSideCursorsTest(_ServerSideCursorsTest):
    """The suite tells a server-side cursor by the driver's name, from a list
    of SQLAlchemy's own ("a huge issue ... for third party dialects", its
    comment says); any other driver's cursors count as client-side, and its
    streaming tests fail. A dialect built on SQLAlchemy's aiosqlite one, as
    lite's aiolite is, has aiosqlite's cursors, told as aiosqlite's are.
    """

    def _is_server_side(self, cursor):
        if isinstance(self.engine.dialect, SQLiteDialect_aiosqlite):
            return cursor.server_side
        return super()._is_server_side(cursor)
