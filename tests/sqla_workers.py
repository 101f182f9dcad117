"""What the SQLAlchemy tests' processes run: an app's ORM code, on lite's dialect."""

import asyncio
import os
import sqlite3
import time

import sqlalchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import lite_db
import lite_sqlalchemy


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "counters"
    name: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[int]


def make_database(path, url_scheme="sqlite+lite"):
    """A database with counter "hits" at 0; its engine."""
    engine = sqlalchemy.create_engine(f"{url_scheme}:///{path}")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Counter(name="hits", value=0))
        session.commit()
    return engine


def value(engine):
    with Session(engine) as session:
        return session.get(Counter, "hits").value


def read_modify_write(engine, times, hold_s=0.0):
    """`times` ORM increments done the right way; (acknowledged, refused)."""
    writer = engine.execution_options(lite_write=True)
    ok = refused = 0
    for _ in range(times):
        try:
            with Session(writer) as session:
                row = session.get(Counter, "hits")
                if hold_s:
                    time.sleep(hold_s)
                row.value += 1
                session.commit()
            ok += 1
        except lite_db.Unavailable:
            refused += 1
    return ok, refused


def increment_in_new_process(path, times, start, hold_s=0.0):
    start.wait(timeout=30)
    engine = sqlalchemy.create_engine(f"sqlite+lite:///{path}")
    try:
        return read_modify_write(engine, times, hold_s)
    finally:
        engine.dispose()


def read_until(path, stop):
    """Reads in a loop until `stop`; (reads, errors)."""
    engine = sqlalchemy.create_engine(f"sqlite+lite:///{path}")
    reads = errors = 0
    while not stop.is_set():
        try:
            value(engine)
            reads += 1
        except Exception:
            errors += 1
    engine.dispose()
    return reads, errors


def increment_after_fork(engine, times):
    """In a forked child, with the parent's engine: (ok, refused, pids of connections used)."""
    pids = set()

    @sqlalchemy.event.listens_for(engine, "checkout")
    def note(dbapi_connection, record, proxy):
        pids.add(dbapi_connection.pid)

    ok, refused = read_modify_write(engine, times)
    inherited = list(engine.dialect.inherited)
    engine.dispose()  # closes what the pool holds: never the parent's
    return ok, refused, sorted(pids), len(inherited), os.getpid(), _all_open(inherited)


def _all_open(connections):
    """Whether none of these sqlite3 connections was closed (a read of its state, no SQL)."""
    try:
        for connection in connections:
            _ = connection.in_transaction
    except sqlite3.ProgrammingError:
        return False
    return True


def run_once_rounds(directory, rounds, barrier, log_path):
    """At each round, when all are at the barrier: run_once on that round's database.

    Returns, per round, (ran here, the table existed after run_once returned).
    """
    results = []
    for index in range(rounds):
        path = os.path.join(directory, f"round{index}.db")
        barrier.wait(timeout=60)
        engine = sqlalchemy.create_engine(f"sqlite+lite:///{path}")

        def job(conn, index=index):
            with open(log_path, "a") as log:
                log.write(f"{index} {os.getpid()}\n")
            time.sleep(0.05)  # a migration takes a while: the others must wait for it
            Base.metadata.create_all(conn)

        ran = lite_sqlalchemy.run_once(engine, "schema", job)
        with Session(engine) as session:
            exists = session.execute(
                sqlalchemy.text("SELECT count(*) FROM sqlite_master WHERE name = 'counters'")
            ).scalar_one()
        engine.dispose()
        results.append((ran, exists == 1))
    return results


def async_contention(path, tasks, each, hold_s, budget_ms=None):
    """`tasks` concurrent AsyncSession increments, with a loop-lag monitor; a dict of results."""
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    async def main():
        engine = create_async_engine(f"sqlite+aiolite:///{path}", pool_size=tasks)
        options = {"lite_write": True}
        if budget_ms is not None:
            options["lite_lock_budget_ms"] = budget_ms
        writer = engine.execution_options(**options)
        lags, stop = [], asyncio.Event()

        async def monitor():
            while not stop.is_set():
                asked = time.monotonic()
                await asyncio.sleep(0.001)
                lags.append(time.monotonic() - asked - 0.001)

        async def increments():
            ok = refused = 0
            for _ in range(each):
                try:
                    async with AsyncSession(writer) as session:
                        row = await session.get(Counter, "hits")
                        await asyncio.sleep(hold_s)
                        row.value += 1
                        await session.commit()
                    ok += 1
                except lite_db.Unavailable:
                    refused += 1
            return ok, refused

        async with AsyncSession(engine) as session:  # imports and mapper set-up, before the clock
            await session.get(Counter, "hits")
        watcher = asyncio.create_task(monitor())
        outcomes = await asyncio.gather(*(increments() for _ in range(tasks)))
        stop.set()
        await watcher
        await engine.dispose()
        lags.sort()
        return {
            "ok": sum(o for o, _ in outcomes),
            "refused": sum(r for _, r in outcomes),
            "lag_p99_s": lags[int(len(lags) * 0.99)],
            "lag_max_s": lags[-1],
            "samples": len(lags),
        }

    return asyncio.run(main())
