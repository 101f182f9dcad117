"""lite's counter routes on FastAPI and SQLAlchemy's asyncio ORM, on lite's dialect.

    uvicorn --workers 4 --app-dir examples fastapi_app:app

The database is LITE_DATABASE_URL (default `sqlite+aiolite:///data/app.db`);
with `sqlite+aiosqlite:///…` the same app runs on SQLAlchemy's defaults
(bench/run.py compares the two). Every worker makes the schema at startup;
lite_sqlalchemy.run_once lets one do it while the others wait.

GET /lite/get?counter=NAME and POST /lite/inc (form: counter, by; optional
Idempotency-Key header) answer lite_app's JSON with its status codes: 400 for
a bad parameter, 404 for an unknown counter, 409 for an overflow, 422 for a
reused key, 503 + Retry-After when the database cannot be reached in time.
"""

import contextlib
import os
import re
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import fastapi
from fastapi.responses import JSONResponse
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import lite_config
import lite_counters
import lite_db
import lite_sqlalchemy

COUNTERS = {"hits": 0, "misses": 0}  # made at startup; the first is the default counter
MAX_BY = 1_000_000
_BY = re.compile(r"[1-9][0-9]{0,6}\Z")
_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,128}\Z")

engine = create_async_engine(os.environ.get("LITE_DATABASE_URL", "sqlite+aiolite:///data/app.db"))
# Reads begin a read transaction, which never waits for writers. A
# read-modify-write must hold the write lock from its first read:
# lite_write=True begins it with BEGIN IMMEDIATE, in its turn.
Reading = async_sessionmaker(engine, expire_on_commit=False)
Writing = async_sessionmaker(engine.execution_options(lite_write=True), expire_on_commit=False)


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "app_counters"
    name: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[int]


class IdempotencyKey(Base):
    __tablename__ = "app_idempotency_keys"
    key: Mapped[str] = mapped_column(primary_key=True)
    counter: Mapped[str]
    by: Mapped[int]
    value: Mapped[int]
    created_at: Mapped[float]


async def create_schema(conn: AsyncConnection) -> None:
    await conn.run_sync(Base.metadata.create_all)
    await conn.execute(insert(Counter), [{"name": n, "value": v} for n, v in COUNTERS.items()])


@contextlib.asynccontextmanager
async def lifespan(app: fastapi.FastAPI) -> AsyncIterator[None]:
    await lite_sqlalchemy.run_once_async(engine, "fastapi_app schema 1", create_schema)
    yield
    await engine.dispose()


app = fastapi.FastAPI(lifespan=lifespan)


class Refused(Exception):
    """A request refused: its status and reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@app.exception_handler(Refused)
async def refused(request: fastapi.Request, exc: Refused) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, exc.status)


@app.exception_handler(lite_db.Unavailable)
async def unavailable(request: fastapi.Request, exc: lite_db.Unavailable) -> JSONResponse:
    """The one place the database's "not now" becomes 503: nothing was written."""
    return JSONResponse(
        {"error": "database unavailable, try again"}, 503, headers={"Retry-After": "1"}
    )


@app.get("/lite/get")
async def get_counter(request: fastapi.Request) -> dict[str, Any]:
    name = _counter_name(urllib.parse.parse_qs(request.url.query))
    async with Reading() as session:
        row = await session.get(Counter, name)
    if row is None:
        raise Refused(404, f"no counter {name!r}")
    return {"counter": row.name, "value": row.value}


@app.post("/lite/inc")
async def increment(request: fastapi.Request) -> dict[str, Any]:
    if request.headers.get("content-type", "").split(";")[0] not in (
        "",
        "application/x-www-form-urlencoded",
    ):
        raise Refused(415, "send the parameters as application/x-www-form-urlencoded")
    try:
        body = (await request.body()).decode()
        params = urllib.parse.parse_qs(body, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "the body is not form data") from None
    unknown = sorted(set(params) - {"counter", "by"})
    if unknown:
        raise Refused(400, f"unknown parameter {unknown[0]!r}: use counter, by")
    name, by = _counter_name(params), _by(params)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _KEY.match(key):
        raise Refused(400, "Idempotency-Key: use 1-128 of A-Z, a-z, 0-9, _ . : -")
    async with Writing() as session:
        if key is not None and (stored := await session.get(IdempotencyKey, key)) is not None:
            if (stored.counter, stored.by) != (name, by):
                raise Refused(422, f"Idempotency-Key was used for {stored.counter} by {stored.by}")
            return {"counter": stored.counter, "value": stored.value}
        row = await session.get(Counter, name)
        if row is None:
            raise Refused(404, f"no counter {name!r}")
        if row.value + by > lite_counters.MAX_INTEGER:
            raise Refused(409, f"{name} would pass {lite_counters.MAX_INTEGER}")
        row.value += by
        if key is not None:
            session.add(
                IdempotencyKey(
                    key=key, counter=name, by=by, value=row.value, created_at=time.time()
                )
            )
        await session.commit()
        return {"counter": name, "value": row.value}


def _counter_name(params: dict[str, list[str]]) -> str:
    names = params.get("counter", [])
    if len(names) > 1:
        raise Refused(400, "give counter once")
    if names and not lite_config.COUNTER_NAME.match(names[0]):
        raise Refused(400, "counter: use 1-64 of a-z, 0-9, _ and -")
    return names[0] if names else next(iter(COUNTERS))


def _by(params: dict[str, list[str]]) -> int:
    texts = params.get("by", [])
    if not texts:
        return 1
    if len(texts) > 1 or not _BY.match(texts[0]) or int(texts[0]) > MAX_BY:
        raise Refused(400, f"by: a whole number from 1 to {MAX_BY}")
    return int(texts[0])
