"""README's "Use it in your own app" example runs as written, on a database of one's own."""

import pathlib
import re
import sqlite3

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_readme_example_runs_on_a_users_database(tmp_path):
    (example,) = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    path = tmp_path / "app.db"
    mine = sqlite3.connect(path)
    mine.execute("CREATE TABLE books (isbn TEXT PRIMARY KEY, title TEXT, copies INTEGER)")
    mine.execute("INSERT INTO books VALUES ('1', 'old title', 3)")
    mine.commit()
    scope = {}
    exec(example.replace("/srv/app/data/app.db", str(path)), scope)
    assert (scope["title"], scope["left"]) == ("Dune", 2)
    assert mine.execute("SELECT title, copies FROM books").fetchall() == [("Dune", 2)]
    assert {row[0] for row in mine.execute("SELECT name FROM sqlite_schema")} == {
        "books",
        "sqlite_autoindex_books_1",
    }
    mine.close()
