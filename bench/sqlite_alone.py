"""SQLite alone, without HTTP: single-statement increment transactions per second.

Each process runs `UPDATE counters SET value = value + 1 ... RETURNING value`
in autocommit (one transaction each) on one WAL database for a fixed time;
1 process, then 20 contending, with synchronous NORMAL and FULL. The final
counter must equal the increments counted; "database is locked" errors (a
writer that waited out the 10 s busy timeout) are counted, not hidden.
"""

import multiprocessing
import os
import sqlite3
import tempfile
import time

_ctx = multiprocessing.get_context("spawn")


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    return conn


def _increment_for(path: str, synchronous: str, start: float, seconds: float, results) -> None:
    conn = _connect(path, synchronous)
    while time.time() < start:
        time.sleep(0.001)
    count = errors = 0
    deadline = start + seconds
    while time.time() < deadline:
        try:
            conn.execute(
                "UPDATE counters SET value = value + 1 WHERE name = 'hits' RETURNING value"
            ).fetchall()
            count += 1
        except sqlite3.OperationalError:
            # SQLite's busy handler sleeps 1, 2, 5 ... 100 ms and is not fair:
            # in a tight loop of 20 writers one of them can wait out the whole
            # timeout while the others keep taking the lock.
            errors += 1
    conn.close()
    results.put((count, errors))


def measure(processes: int, synchronous: str, seconds: float) -> dict:
    """Transactions per second of `processes` processes incrementing one counter."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "alone.db")
        conn = _connect(path, synchronous)
        conn.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        conn.execute("INSERT INTO counters VALUES ('hits', 0)")
        results = _ctx.Queue()
        start = time.time() + 1 + processes * 0.05  # after every process has started
        procs = [
            _ctx.Process(target=_increment_for, args=(path, synchronous, start, seconds, results))
            for _ in range(processes)
        ]
        for proc in procs:
            proc.start()
        try:
            outcomes = [results.get(timeout=seconds + 60) for _ in procs]
        finally:
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
        final = conn.execute("SELECT value FROM counters").fetchone()[0]
        conn.close()
    counts = [count for count, _ in outcomes]
    return {
        "processes": processes,
        "synchronous": synchronous,
        "seconds": seconds,
        "transactions": sum(counts),
        "tx_per_s": round(sum(counts) / seconds),
        "locked_errors": sum(errors for _, errors in outcomes),
        "exact": final == sum(counts),
    }


def measure_all(seconds: float) -> list[dict]:
    return [
        measure(processes, synchronous, seconds)
        for synchronous in ("NORMAL", "FULL")
        for processes in (1, 20)
    ]


if __name__ == "__main__":
    for row in measure_all(3):
        print(row)
