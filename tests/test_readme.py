"""README's "Use it in your own app" examples run as written, on a database of one's own."""

import pathlib
import re
import sqlite3
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_readme_example_runs_on_a_users_database(tmp_path):
    example, _ = _examples()
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


def test_lite_db_copied_alone_runs_the_readme_example(tmp_path):
    """README's "just copy lite_db.py": that one file, and the standard library only."""
    example, _ = _examples()
    (tmp_path / "lite_db.py").write_bytes((ROOT / "lite_db.py").read_bytes())
    path = tmp_path / "app.db"
    mine = sqlite3.connect(path)
    mine.execute("CREATE TABLE books (isbn TEXT PRIMARY KEY, title TEXT, copies INTEGER)")
    mine.execute("INSERT INTO books VALUES ('1', 'old title', 3)")
    mine.commit()
    mine.close()
    script = tmp_path / "example.py"
    script.write_text(
        example.replace("/srv/app/data/app.db", str(path))
        + "print(lite_db.__file__, title, left)\n"
    )
    # -S: no site-packages (nothing installed is found), -E: no PYTHON* variables.
    result = subprocess.run(
        [sys.executable, "-S", "-E", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "lite_db.py"), "Dune", "2"]


def test_the_readme_sqlalchemy_example_runs(tmp_path):
    import sqlalchemy
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

    import lite_sqlalchemy

    class Base(DeclarativeBase):
        pass

    class Counter(Base):
        __tablename__ = "counters"
        name: Mapped[str] = mapped_column(primary_key=True, default="hits")
        value: Mapped[int] = mapped_column(default=0)

    @sqlalchemy.event.listens_for(Base.metadata, "after_create")
    def first_counter(target, connection, **kw):
        connection.execute(sqlalchemy.insert(Counter.__table__).values(name="hits", value=0))

    _, example = _examples()
    scope = {
        "create_engine": sqlalchemy.create_engine,
        "sessionmaker": sessionmaker,
        "lite_sqlalchemy": lite_sqlalchemy,
        "Base": Base,
        "Counter": Counter,
    }
    path = tmp_path / "app.db"
    for _ in range(2):  # the second run finds the schema made: run_once does nothing
        exec(example.replace("data/app.db", str(path)), scope)
    db = sqlite3.connect(path)
    assert db.execute("SELECT name, value FROM counters").fetchall() == [("hits", 2)]
    assert db.execute("SELECT count(*) FROM lite_once").fetchone() == (1,)
    db.close()
    scope["engine"].dispose()


def _examples():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
