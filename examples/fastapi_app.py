"""lite's counter routes on FastAPI and SQLAlchemy's asyncio ORM, on lite's dialect.

    uvicorn --workers 4 --app-dir examples fastapi_app:app

The database is LITE_DATABASE_URL (default `sqlite+aiolite:///data/app.db`);
with `sqlite+aiosqlite:///…` the same app runs on SQLAlchemy's defaults
(bench/run.py compares the two). Every worker makes the schema at startup;
lite_sqlalchemy.run_once lets one do it while the others wait.

GET /lite/get?counter=NAME and POST /lite/inc (form: counter, by; optional
Idempotency-Key header) answer lite_app's JSON with its status codes: 400 for
a bad parameter, 404 for an unknown counter, 409 for an overflow, 422 for a
reused key, 503 + Retry-After when the database cannot be reached in time:
lite_counters' input rules, and its answers (answer_for) from one handler.
"""

import contextlib
import os
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import fastapi
from fastapi.responses import JSONResponse
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.exceptions import HTTPException as StarletteHTTPException

import lite_counters
import lite_sqlalchemy

COUNTERS = {"hits": 0, "misses": 0}  # made at startup; the first is the default counter

# serve.sh passes LITE_DATABASE_URL empty when it is not set: empty means the default.
engine = create_async_engine(os.environ.get("LITE_DATABASE_URL") or "sqlite+aiolite:///data/app.db")
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


async def lite_error(request: fastapi.Request, exc: Exception) -> JSONResponse:
    """The one place lite's errors become answers, as lite_counters.answer_for says."""
    status, error, headers = lite_counters.answer_for(exc)
    return JSONResponse({"error": error}, status, headers=headers)


for _error in lite_counters.ERRORS:
    app.add_exception_handler(_error, lite_error)


@app.exception_handler(StarletteHTTPException)
async def http_error(request: fastapi.Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (404 for an unknown path, 405, 415) as lite's JSON too."""
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


@app.get("/lite/get")
async def get_counter(request: fastapi.Request) -> dict[str, Any]:
    params = urllib.parse.parse_qs(request.url.query)
    name = lite_counters.counter_name_from(params.get("counter", [])) or next(iter(COUNTERS))
    async with Reading() as session:
        row = await session.get(Counter, name)
    if row is None:
        raise lite_counters.NoSuchCounter(name)
    return {"counter": row.name, "value": row.value}


@app.post("/lite/inc")
async def increment(request: fastapi.Request) -> dict[str, Any]:
    if request.headers.get("content-type", "").split(";")[0] not in (
        "",
        "application/x-www-form-urlencoded",
    ):
        raise fastapi.HTTPException(415, "send the parameters as application/x-www-form-urlencoded")
    try:
        body = (await request.body()).decode()
        params = urllib.parse.parse_qs(body, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise lite_counters.BadInput("the body is not form data") from None
    unknown = sorted(set(params) - {"counter", "by"})
    if unknown:
        raise lite_counters.BadInput(f"unknown parameter {unknown[0]!r}: use counter, by")
    name = lite_counters.counter_name_from(params.get("counter", [])) or next(iter(COUNTERS))
    by = lite_counters.step_from(params.get("by", []))
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        lite_counters.check_idempotency_key(key)
    async with Writing() as session:
        if key is not None and (stored := await session.get(IdempotencyKey, key)) is not None:
            if (stored.counter, stored.by) != (name, by):
                raise lite_counters.KeyReused(stored.counter, stored.by)
            return {"counter": stored.counter, "value": stored.value}
        row = await session.get(Counter, name)
        if row is None:
            raise lite_counters.NoSuchCounter(name)
        if row.value + by > lite_counters.MAX_INTEGER:
            raise lite_counters.WouldOverflow(name)
        row.value += by
        if key is not None:
            session.add(
                IdempotencyKey(
                    key=key, counter=name, by=by, value=row.value, created_at=time.time()
                )
            )
        await session.commit()
        return {"counter": name, "value": row.value}
