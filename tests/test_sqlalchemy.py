"""lite's SQLAlchemy dialects: the switch, the pragmas, reads beside writers, fair bounded writes,
exact read-modify-writes across processes and threads, fork, asyncio, and run_once."""

import multiprocessing
import os
import sqlite3
import threading
import time

import pytest

sqlalchemy = pytest.importorskip("sqlalchemy")
pytest.importorskip("aiosqlite")

import procs  # noqa: E402
import sqla_workers  # noqa: E402
from sqla_workers import Counter  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

import lite_db  # noqa: E402
import lite_sqlalchemy  # noqa: E402


@pytest.fixture
def db(tmp_path):
    path = str(tmp_path / "app.db")
    engine = sqla_workers.make_database(path)
    yield path, engine
    engine.dispose()


class HeldLock:
    """Another connection holding the write lock (with an uncommitted write) until released."""

    def __init__(self, path):
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute("UPDATE counters SET value = value + 100")

    def commit_after(self, seconds):
        timer = threading.Timer(seconds, self.commit)
        timer.start()
        return timer

    def commit(self):
        self.conn.execute("COMMIT")
        self.conn.close()

    def rollback(self):
        self.conn.execute("ROLLBACK")
        self.conn.close()


def test_the_url_is_the_whole_switch(tmp_path):
    engine = sqlalchemy.create_engine(f"sqlite+lite:///{tmp_path}/a.db")
    assert isinstance(engine.dialect, lite_sqlalchemy.LiteDialect)
    assert engine.dialect.name == "sqlite"  # SQLite's SQL, reflection and Alembic as before
    async_engine = create_async_engine(f"sqlite+aiolite:///{tmp_path}/a.db")
    assert isinstance(async_engine.dialect, lite_sqlalchemy.LiteDialect_async)
    assert async_engine.dialect.is_async


def test_every_new_connection_gets_lites_pragmas(db):
    _, engine = db
    with engine.connect() as conn:
        pragma = {
            name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        }
    assert pragma == {
        "journal_mode": "wal",
        "synchronous": 1,  # NORMAL
        "foreign_keys": 1,
        "busy_timeout": lite_db.LOCK_BUDGET_MS,
    }


@pytest.mark.parametrize(
    ("statement", "reads"),
    [
        ("SELECT 1", True),
        ("  -- a comment\n/* another */ select * from t", True),
        ("(SELECT 1) UNION (SELECT 2)", True),
        ("VALUES (1)", True),
        ("WITH x AS (SELECT 1) SELECT * FROM x", True),
        ("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x", False),
        ("PRAGMA table_info(t)", True),
        ("PRAGMA user_version = 3", False),
        ("INSERT INTO t VALUES (1)", False),
        ("update t set a = 1", False),
        ("DELETE FROM t", False),
        ("REPLACE INTO t VALUES (1)", False),
        ("CREATE TABLE t (a)", False),
        ("SAVEPOINT sa_savepoint_1", False),
        ("", False),
    ],
)
def test_a_transaction_is_a_read_only_if_its_first_statement_only_reads(statement, reads):
    assert lite_sqlalchemy.is_read(statement) is reads


def test_reads_never_wait_for_a_writer_a_write_session_does(db):
    path, engine = db
    held = HeldLock(path)
    try:
        assert sqla_workers.value(engine) == 0  # the committed value, at once
        with (
            Session(engine.execution_options(lite_write=True, lite_lock_budget_ms=200)) as s,
            pytest.raises(lite_db.Unavailable, match="write failed"),
        ):
            s.get(Counter, "hits")
    finally:
        held.rollback()


def test_a_write_waits_for_the_lock_then_goes_through(db):
    path, engine = db
    held = HeldLock(path)
    timer = held.commit_after(0.3)
    try:
        with Session(engine) as session:
            session.execute(sqlalchemy.update(Counter).values(value=Counter.value + 1))
            session.commit()
    finally:
        timer.join()
    assert sqla_workers.value(engine) == 101


def test_past_the_budget_unavailable_and_the_connection_is_closed_never_reused(db):
    path, engine = db
    held = HeldLock(path)
    try:
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            bounded = conn.execution_options(lite_lock_budget_ms=150)
            began = time.monotonic()
            with pytest.raises(lite_db.Unavailable, match="database is locked"):
                bounded.exec_driver_sql("UPDATE counters SET value = value + 1")
            waited = time.monotonic() - began
            assert conn.invalidated
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            raw.execute("SELECT 1")
        with engine.connect() as conn:
            assert conn.connection.dbapi_connection is not raw
    finally:
        held.rollback()
    assert 0.1 < waited < 2  # bounded by the budget asked for, not SQLite's own timeout
    assert sqla_workers.value(engine) == 0


def test_one_begin_past_the_budget_does_not_reopen_the_whole_pool(db):
    path, engine = db
    connects = []
    sqlalchemy.event.listen(engine, "connect", lambda *args: connects.append(1))
    pooled = [engine.connect() for _ in range(3)]
    for conn in pooled:
        conn.exec_driver_sql("SELECT 1")
        conn.close()
    held = HeldLock(path)
    try:
        with engine.connect() as conn, pytest.raises(lite_db.Unavailable):
            conn.execution_options(lite_lock_budget_ms=50).exec_driver_sql("DELETE FROM counters")
    finally:
        held.rollback()
    before = len(connects)
    again = [engine.connect() for _ in range(3)]
    for conn in again:
        conn.exec_driver_sql("SELECT 1")
        conn.close()
    assert len(connects) - before <= 1  # the failed one replaced, the others kept


def test_select_for_update_begins_a_write(db):
    """The usual read-modify-write idiom of other databases needs no lite option."""
    path, engine = db
    locked = sqlalchemy.select(Counter).where(Counter.name == "hits").with_for_update()
    held = HeldLock(path)
    try:
        with (
            Session(engine.execution_options(lite_lock_budget_ms=200)) as session,
            pytest.raises(lite_db.Unavailable, match="write failed"),
        ):
            session.execute(locked)  # waits for the lock, as a write
    finally:
        held.rollback()
    with Session(engine) as session:
        session.execute(locked).scalar_one().value += 1
        session.commit()
    assert sqla_workers.value(engine) == 1


def test_a_read_then_write_that_lost_the_race_is_refused_not_lost(db):
    path, engine = db
    with Session(engine) as session:
        row = session.get(Counter, "hits")  # a read transaction, no option
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("UPDATE counters SET value = value + 1")
        other.close()
        row.value += 1
        with pytest.raises(lite_db.Unavailable, match="read before it wrote"):
            session.commit()
    assert sqla_workers.value(engine) == 1  # the other's increment, not overwritten


def test_stock_pysqlite_loses_that_update_silently(tmp_path):
    """Why the dialect matters: the same code on SQLAlchemy's defaults."""
    path = str(tmp_path / "stock.db")
    sqla_workers.make_database(path).dispose()
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    with Session(engine) as session:
        row = session.get(Counter, "hits")
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("UPDATE counters SET value = value + 1")
        other.close()
        row.value += 1
        session.commit()  # no error
    assert sqla_workers.value(engine) == 1  # two increments acknowledged, one counted
    engine.dispose()


def test_read_modify_writes_are_exact_across_processes_beside_readers(db):
    path, engine = db
    start = procs.event()
    stop = procs.event()
    writers, results = procs.start(
        sqla_workers.increment_in_new_process, [(path, 25, start, 0.002)] * 8
    )
    readers, read_results = procs.start(sqla_workers.read_until, [(path, stop)] * 2)
    time.sleep(1)
    start.set()
    try:
        outcomes = procs.finish(writers, results, timeout_s=120)
    finally:
        stop.set()
    reads = procs.finish(readers, read_results, timeout_s=30)
    assert outcomes == [(25, 0)] * 8
    assert sqla_workers.value(engine) == 200
    assert all(count > 0 and errors == 0 for count, errors in reads)


def test_read_modify_writes_are_exact_across_threads(db):
    _, engine = db
    outcomes = []
    threads = [
        threading.Thread(
            target=lambda: outcomes.append(sqla_workers.read_modify_write(engine, 25, 0.001))
        )
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert outcomes == [(25, 0)] * 8
    assert sqla_workers.value(engine) == 200


def test_a_forked_child_never_uses_or_closes_the_parents_connections(db):
    _, engine = db
    with engine.connect() as conn:  # the parent's connection, back in the pool
        parent_raw = conn.connection.dbapi_connection
    context = multiprocessing.get_context("fork")  # as a prefork server (gunicorn --preload)
    results = context.Queue()
    children = [
        context.Process(
            target=lambda: results.put(sqla_workers.increment_after_fork(engine, 25)), daemon=True
        )
        for _ in range(4)
    ]
    for child in children:
        child.start()
    try:
        outcomes = [results.get(timeout=120) for _ in children]
    finally:
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
    for ok, refused, pids, inherited, child, still_open in outcomes:
        assert (ok, refused) == (25, 0)
        assert pids == [child]  # every connection it used, its own
        assert inherited >= 1  # the parent's, set aside
        assert still_open  # and not closed by the child's engine.dispose()
    with engine.connect() as conn:
        assert conn.connection.dbapi_connection is parent_raw  # still open, still the parent's
        assert conn.exec_driver_sql("SELECT value FROM counters").scalar() == 100


def test_the_async_lock_wait_never_blocks_the_event_loop(db):
    path, _ = db
    held = HeldLock(path)
    try:
        result = sqla_workers.async_contention(path, tasks=1, each=1, hold_s=0, budget_ms=300)
    finally:
        held.rollback()
    assert (result["ok"], result["refused"]) == (0, 1)  # waited 300 ms, then Unavailable
    assert result["lag_max_s"] < 0.05  # the loop ran on while it waited


def test_async_read_modify_writes_are_exact_with_20_contending_and_the_loop_stays_free(db):
    path, engine = db
    start = procs.event()
    others, results = procs.start(
        sqla_workers.increment_in_new_process, [(path, 20, start, 0.002)] * 2
    )
    start.set()
    try:
        result = sqla_workers.async_contention(path, tasks=20, each=10, hold_s=0.002)
    finally:
        outcomes = procs.finish(others, results, timeout_s=120)
    assert (result["ok"], result["refused"]) == (200, 0)
    assert outcomes == [(20, 0)] * 2
    assert sqla_workers.value(engine) == 240
    assert result["lag_p99_s"] <= 0.010, result


def test_run_once_runs_the_job_once_when_four_workers_start_together(tmp_path):
    rounds = 20
    log_path = str(tmp_path / "ran.log")
    barrier = procs.barrier(4)
    workers, results = procs.start(
        sqla_workers.run_once_rounds, [(str(tmp_path), rounds, barrier, log_path)] * 4
    )
    outcomes = procs.finish(workers, results, timeout_s=300)
    for index in range(rounds):
        ran = [worker[index][0] for worker in outcomes]
        assert ran.count(True) == 1, (index, ran)
        assert all(worker[index][1] for worker in outcomes)  # each waited for the job
    with open(log_path) as log:
        lines = log.read().split("\n")[:-1]
    assert sorted(int(line.split()[0]) for line in lines) == list(range(rounds))


def test_run_once_after_a_failed_job_runs_it_again(tmp_path):
    engine = sqlalchemy.create_engine(f"sqlite+lite:///{tmp_path}/a.db")

    def failing(conn):
        sqla_workers.Base.metadata.create_all(conn)
        raise RuntimeError("migration failed")

    with pytest.raises(RuntimeError):
        lite_sqlalchemy.run_once(engine, "schema", failing)
    assert sqlalchemy.inspect(engine).get_table_names() == []  # all its DDL undone
    assert lite_sqlalchemy.run_once(engine, "schema", sqla_workers.Base.metadata.create_all)
    assert not lite_sqlalchemy.run_once(engine, "schema", sqla_workers.Base.metadata.create_all)
    assert "counters" in sqlalchemy.inspect(engine).get_table_names()
    engine.dispose()


def test_run_once_async(tmp_path):
    import asyncio

    async def main():
        engine = create_async_engine(f"sqlite+aiolite:///{tmp_path}/a.db")

        async def create(conn):
            await conn.run_sync(sqla_workers.Base.metadata.create_all)

        ran = [await lite_sqlalchemy.run_once_async(engine, "schema", create) for _ in range(2)]
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda c: sqlalchemy.inspect(c).get_table_names())
        await engine.dispose()
        return ran, names

    ran, names = asyncio.run(main())
    assert ran == [True, False]
    assert "counters" in names


def test_a_failed_write_leaves_the_queue(db):
    """A refused or rolled-back write transaction lets the next writer in at once."""
    _, engine = db
    writer = engine.execution_options(lite_write=True)
    with Session(writer) as session:
        session.get(Counter, "hits")
        session.rollback()
    with pytest.raises(sqlalchemy.exc.IntegrityError), Session(writer) as session:
        session.add(Counter(name="hits", value=1))
        session.commit()
    assert sqla_workers.read_modify_write(engine, 3) == (3, 0)
    assert os.path.exists(engine.url.database + lite_db.QUEUE_SUFFIX)


@pytest.mark.parametrize("begin", ["BEGIN", "BEGIN IMMEDIATE"])
def test_an_apps_own_begin_listener_gives_way_to_lites(db, begin):
    """SQLAlchemy's docs advise a "begin" listener emitting BEGIN for the stock driver;
    an app that keeps it after switching still gets lite's begin, IMMEDIATE if it asked."""
    path, engine = db

    @sqlalchemy.event.listens_for(engine, "begin")
    def own_begin(conn):
        conn.exec_driver_sql(begin)

    assert sqla_workers.read_modify_write(engine, 3) == (3, 0)
    held = HeldLock(path)
    try:
        reader = engine.execution_options(lite_lock_budget_ms=200)
        if begin == "BEGIN":
            assert sqla_workers.value(reader) == 3  # still a read: no wait
        else:
            with pytest.raises(lite_db.Unavailable, match="write failed"):
                sqla_workers.value(reader)  # a write begin, through lite's bounded wait
    finally:
        held.rollback()
