"""SQLAlchemy under contending processes: stock pysqlite against lite's dialect, and the choices.

    .venv/bin/python bench/sqlalchemy_contention.py [--processes 16] [--transactions 20]
        [--hold-ms 20] [--readers 4] [--workload rmw|update] [--out DIR]

Each of `processes` writer processes runs `transactions` ORM read-modify-
writes of one counter, as an app writes them: `session.get`, hold the
transaction `hold-ms` (the rest of a request's work), add 1, `commit`
(`--workload update`: an `UPDATE … SET value = value + 1` first, then the
hold, then `commit`: a write transaction holding the lock). Beside
them `readers` processes read the counter in a loop until the writers end.
Every mode runs the same code on a new database file; what differs:

- stock: `sqlite:///` with SQLAlchemy's defaults (the sqlite3 driver's own
  transactions: its SELECT runs outside any transaction).
- lite-write: `sqlite+lite:///`, the writers' sessions with `lite_write=True`
  (BEGIN IMMEDIATE before the read): the right way.
- lite: `sqlite+lite:///` with no option: a read first begins a read
  transaction, whose write is refused when another came first; a write
  first begins BEGIN IMMEDIATE.
- all-immediate: `sqlite+lite:///`, every session with `lite_write=True`,
  the readers' too (Rails 8's choice: every transaction IMMEDIATE).

Reported per mode: writes acknowledged, refused (by error text), lost
(acknowledged - counter's final value), write latency p50/p99, and the
readers' reads and p99.
"""

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections import Counter as Tally

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = {
    # name: (URL scheme, writers' options, readers' options)
    "stock": ("sqlite", {}, {}),
    "lite-write": ("sqlite+lite", {"lite_write": True}, {}),
    "lite": ("sqlite+lite", {}, {}),
    "all-immediate": ("sqlite+lite", {"lite_write": True}, {"lite_write": True}),
}


def _engine(url, options):
    import sqlalchemy

    return sqlalchemy.create_engine(url).execution_options(**options)


def _model():
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

    class Base(DeclarativeBase):
        pass

    class Counter(Base):
        __tablename__ = "counters"
        name: Mapped[str] = mapped_column(primary_key=True)
        value: Mapped[int]

    return Base, Counter


def writer(url, options, transactions, hold_s, start, workload):
    from sqlalchemy import update
    from sqlalchemy.orm import Session

    _, counter = _model()
    engine = _engine(url, options)
    ok, errors, latencies = 0, Tally(), []
    start.wait()
    for _ in range(transactions):
        began = time.monotonic()
        try:
            with Session(engine) as session:
                if workload == "update":
                    hits = counter.name == "hits"
                    session.execute(update(counter).where(hits).values(value=counter.value + 1))
                    time.sleep(hold_s)
                else:
                    row = session.get(counter, "hits")
                    time.sleep(hold_s)
                    row.value += 1
                session.commit()
            ok += 1
        except Exception as exc:
            text = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            errors[f"{type(exc).__name__}: {text[:60]}"] += 1
        latencies.append(time.monotonic() - began)
    engine.dispose()
    return ok, dict(errors), latencies


def reader(url, options, start, stop):
    from sqlalchemy.orm import Session

    _, counter = _model()
    engine = _engine(url, options)
    latencies, errors = [], 0
    start.wait()
    while not stop.is_set():
        began = time.monotonic()
        try:
            with Session(engine) as session:
                session.get(counter, "hits")
        except Exception:
            errors += 1
        latencies.append(time.monotonic() - began)
        time.sleep(0.002)
    engine.dispose()
    return latencies, errors


def _run_in(target, args, results, index):
    results.put((index, target(*args)))


def run_mode(mode, args, directory):
    import sqlalchemy
    from sqlalchemy.orm import Session

    scheme, writer_options, reader_options = MODES[mode]
    path = os.path.join(directory, f"{mode}.db")
    url = f"{scheme}:///{path}"
    base, counter = _model()
    engine = sqlalchemy.create_engine(f"sqlite+lite:///{path}")  # WAL for every mode
    base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(counter(name="hits", value=0))
        session.commit()
    ctx = multiprocessing.get_context("spawn")
    start, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    hold_s = args.hold_ms / 1000
    procs = [
        ctx.Process(
            target=_run_in,
            args=(
                writer,
                (url, writer_options, args.transactions, hold_s, start, args.workload),
                results,
                i,
            ),
        )
        for i in range(args.processes)
    ]
    procs += [
        ctx.Process(
            target=_run_in,
            args=(reader, (url, reader_options, start, stop), results, args.processes + i),
        )
        for i in range(args.readers)
    ]
    for proc in procs:
        proc.start()
    time.sleep(2)  # every process imported and waiting at the start line
    began = time.monotonic()
    start.set()
    answers = {}
    try:
        while len(answers) < args.processes:
            index, value = results.get(timeout=300)
            answers[index] = value
        stop.set()
        while len(answers) < len(procs):
            index, value = results.get(timeout=60)
            answers[index] = value
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    elapsed = time.monotonic() - began
    with Session(engine) as session:
        final = session.get(counter, "hits").value
    engine.dispose()
    writes = [answers[i] for i in range(args.processes)]
    reads = [answers[args.processes + i] for i in range(args.readers)]
    ok = sum(w[0] for w in writes)
    errors = Tally()
    for w in writes:
        errors.update(w[1])
    write_lat = sorted(x for w in writes for x in w[2])
    read_lat = sorted(x for r in reads for x in r[0])
    return {
        "mode": mode,
        "url": f"{scheme}:///…",
        "acknowledged": ok,
        "refused": sum(errors.values()),
        "errors": dict(errors),
        "lost": ok - final,
        "final": final,
        "seconds": round(elapsed, 2),
        "write_p50_ms": round(1000 * statistics.median(write_lat), 1),
        "write_p99_ms": round(1000 * _p99(write_lat), 1),
        "reads": len(read_lat),
        "read_errors": sum(r[1] for r in reads),
        "read_p50_ms": round(1000 * statistics.median(read_lat), 2) if read_lat else None,
        "read_p99_ms": round(1000 * _p99(read_lat), 2) if read_lat else None,
    }


def _p99(values):
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=16)
    parser.add_argument("--transactions", type=int, default=20)
    parser.add_argument("--hold-ms", type=float, default=20)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--workload", choices=("rmw", "update"), default="rmw")
    parser.add_argument("--out", help="directory for results.json and results.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for mode in args.modes.split(","):
            row = run_mode(mode, args, directory)
            rows.append(row)
            print(json.dumps(row), flush=True)
    work = "read-modify-writes" if args.workload == "rmw" else "UPDATE-first transactions"
    header = (
        f"{args.processes} writer processes x {args.transactions} ORM {work} "
        f"holding the transaction {args.hold_ms:g} ms; {args.readers} reader processes"
    )
    lines = [
        header,
        "",
        "| mode | acknowledged | refused | lost | write p50 ms | write p99 ms "
        "| reads | read p99 ms | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['acknowledged']} | {r['refused']} | {r['lost']} "
            f"| {r['write_p50_ms']} | {r['write_p99_ms']} | {r['reads']} "
            f"| {r['read_p99_ms']} | {r['seconds']} |"
        )
    for r in rows:
        for text, n in r["errors"].items():
            lines.append(f"\n{r['mode']}: {n} x {text}")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
