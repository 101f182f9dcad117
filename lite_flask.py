"""lite for Flask: each request gets a cursor on its thread's connection, closed at teardown.

    app = flask.Flask(__name__)
    lite = lite_flask.Lite(app, "data/lite.db")

    @app.post("/add")
    def add():
        name, value = lite_counters.increment(lite.cursor, "hits")
        return {"counter": name, "value": value}

Contract:
- `lite.cursor`, inside a request, is that request's own cursor on the
  calling thread's lite_db connection (one per process and thread, reopened
  after fork), made on first use and closed when the request's app context
  ends, whatever happened. Outside a request it raises RuntimeError.
- lite_db.Unavailable, raised while opening the database or by a view,
  becomes 503 with `Retry-After: 1` and a JSON body, never a traceback.
- The database file is never created (a deleted database must not come back
  empty) unless `create_database=True`, for development and tests.
- Why an extension and not a recipe: the cursor's lifetime and the 503 both
  have to be registered on the app; `Lite(app)` does the two in one line,
  and `init_app` lets an application factory do it later.
"""

from typing import Any

import flask

import lite_counters
import lite_db


class Lite:
    """The lite database of one Flask app (see the module's contract)."""

    def __init__(
        self, app: flask.Flask | None = None, path: str | None = None, create_database: bool = False
    ) -> None:
        self.path = path
        self.create_database = create_database
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        """Register the cursor's teardown and the 503; the path from app.config["LITE_DATABASE"]."""
        if self.path is None:
            self.path = app.config["LITE_DATABASE"]
        app.extensions["lite"] = self
        app.teardown_appcontext(self._close_cursor)
        app.register_error_handler(lite_db.Unavailable, _unavailable)

    @property
    def cursor(self) -> Any:
        """This request's cursor; raises lite_db.Unavailable if the database cannot be opened."""
        cur = flask.g.get("lite_cursor")
        if cur is None:
            cur = flask.g.lite_cursor = lite_db.cursor(self.path, create=self.create_database)
        return cur

    @staticmethod
    def _close_cursor(_exc: BaseException | None) -> None:
        cur = flask.g.pop("lite_cursor", None)
        if cur is not None:
            cur.close()


def _unavailable(exc: lite_db.Unavailable) -> tuple[flask.Response, int, dict[str, str]]:
    """503 with Retry-After, as lite_counters.answer_for says."""
    status, error, headers = lite_counters.answer_for(exc)
    return flask.jsonify(error=error), status, headers
