"""Operating a lite database: health, backup, checks, and the `lite` command.

Contract:
- `health(cur)` reads and writes within the lock budget; it returns None when
  both work, else the reason. Its one row lives in `lite_health`, made on
  first use.
- `backup(path, dest)` copies the live database consistently (SQLite's
  backup API, one step) and checks the copy; `check(path)` runs
  `PRAGMA integrity_check` on a file, read-only. Both return False (logged)
  on failure and never overwrite.
- Command line: `lite` (or `python -m lite_ops`) `backup DB DEST | check
  DB | apply-config [--again] DB-OR-URL CONFIG | files DB | where |
  --version`; exit status 0 on success, 1 on failure, 2 on bad usage.
  `files` and `where` are how the shell scripts learn a database's files
  and the app's database (`app_database()`) instead of spelling them out.
"""

import argparse
import logging
import os
import sqlite3
import sys
import time

import lite_config
import lite_counters
import lite_db

HEALTH_TABLES = (
    "CREATE TABLE IF NOT EXISTS lite_health ("
    " id INTEGER PRIMARY KEY CHECK (id = 1), checked_at REAL NOT NULL,"
    " pid INTEGER NOT NULL) STRICT",
)

log = logging.getLogger(__name__)


def health(cur: sqlite3.Cursor) -> str | None:
    """Check that the database can be read and written now.

    Reads the counters and writes the one row of lite_health, each within
    the lock budget. Returns None when both work, else the reason ("read
    failed", "write failed", or "files changed: …" once the database file
    was removed or replaced under this process; the details are logged).
    """
    refused = cur.connection.engine.refusal(cur.connection)
    if refused is not None:
        return f"files changed: {refused}"
    try:
        lite_counters.ensure_counters(cur)
        lite_db.query(cur, "SELECT count(*) FROM counters")
    except lite_db.Unavailable:
        return "read failed"
    try:
        lite_db.ensure_tables(cur, "health", 1, HEALTH_TABLES)

        def record_health(cur: sqlite3.Cursor) -> None:
            cur.execute(
                "INSERT INTO lite_health (id, checked_at, pid) VALUES (1, ?, ?) ON CONFLICT (id)"
                " DO UPDATE SET checked_at = excluded.checked_at, pid = excluded.pid",
                (time.time(), os.getpid()),
            )

        lite_db.write(cur, record_health, one_statement=True)
    except lite_db.Unavailable:
        return "write failed"
    return None


def backup(path: str, dest: str) -> bool:
    """Copy the live database at `path` to the new file `dest`, consistently.

    SQLite's online backup API, in one step: the copy is the database as of
    one moment, taken inside one read transaction, which in WAL mode blocks
    no writer. (Copying page by page would start over each time another
    process commits, so under steady writes it might never end.) Returns
    True, or False on failure (logged; a partial `dest` is removed). Raises
    ValueError if `dest` exists.
    """
    if os.path.exists(dest):
        raise ValueError(f"{dest} exists: backup never overwrites")
    try:
        source = lite_db.connect(path, create=False)
        target = sqlite3.connect(dest)
        try:
            source.backup(target)
            ok = target.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            target.close()
        if not ok:
            raise sqlite3.DatabaseError("the copy failed its integrity check")
    except (sqlite3.Error, lite_db.Unavailable) as exc:
        log.error("backup of %s to %s failed: %s", path, dest, exc)
        if os.path.exists(dest):
            os.remove(dest)
        return False
    return True


def check(path: str) -> bool:
    """True if the file at `path` is a sound SQLite database (read-only; logged if not)."""
    if not os.path.isfile(path):
        log.error("check of %s: no such file", path)
        return False
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = conn.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        log.error("check of %s failed: %s", path, exc)
        return False
    if result != "ok":
        log.error("check of %s: %s", path, result)
    return result == "ok"


# The app's database, relative to the app's directory (the server's working
# directory: mod_wsgi's home=, gunicorn's --chdir); lite_app's default.
DEFAULT_DB_PATH = os.path.join("data", "lite.db")


def app_database() -> str:
    """The app's database, absolute: $LITE_DB_PATH, else DEFAULT_DB_PATH beside this module.

    The app is installed as one directory ($LITE_HOME/app, also the
    daemons' working directory), so the shell scripts ask this (`lite
    where`) instead of spelling the path out.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.abspath(os.environ.get("LITE_DB_PATH") or os.path.join(here, DEFAULT_DB_PATH))


def main(argv: list[str] | None = None) -> int:
    """The command line (`lite`, or `python -m lite_ops`); returns the exit status.

    0 on success, 1 on failure, 2 on bad usage (argparse's).
    """
    parser = argparse.ArgumentParser(prog="lite", description="Operate a lite database.")
    parser.add_argument("--version", action="version", version=f"lite {lite_db.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = commands.add_parser(
        "backup", help="an online, consistent copy of DB (never overwrites DEST)"
    )
    command.add_argument("db")
    command.add_argument("dest")
    command = commands.add_parser("check", help="PRAGMA integrity_check of DB, read-only")
    command.add_argument("db")
    command = commands.add_parser(
        "apply-config",
        help="apply CONFIG to DB (a SQLite file, created if missing, or a postgresql:// URL)"
        " now, once per version, as the app does",
    )
    command.add_argument("db")
    command.add_argument("config")
    command.add_argument(
        "--again",
        action="store_true",
        help="apply it even if this version is applied already (on PostgreSQL a touch is not"
        " a version)",
    )
    command = commands.add_parser(
        "files", help="every file of a database at DB, one a line: DB itself first"
    )
    command.add_argument("db")
    commands.add_parser(
        "where", help="the app's database: $LITE_DB_PATH, else data/lite.db beside lite_ops.py"
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or bad usage (2), already printed
        return int(exc.code or 0)
    if args.command == "files":
        print(*lite_db.database_files(args.db), sep="\n")
        return 0
    if args.command == "where":
        print(app_database())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.command == "backup":
        try:
            ok = backup(args.db, args.dest)
        except ValueError as exc:
            print(f"backup: {exc}", file=sys.stderr)
            return 1
        print(f"backup: {args.db} copied to {args.dest}" if ok else "backup: failed (see above)")
        return 0 if ok else 1
    if args.command == "check":
        ok = check(args.db)
        print(f"check: {args.db} {'ok' if ok else 'FAILED (see above)'}")
        return 0 if ok else 1
    try:
        outcome = lite_config.apply_now(args.db, args.config, again=args.again)
    except lite_db.Unavailable:
        outcome = "failed (see above)"
    print(f"config {args.config}: {outcome}")
    return 0 if outcome in ("applied", "current") else 1


if __name__ == "__main__":
    sys.exit(main())
