"""lite's Prometheus metrics, one set per process, summed over every process that served.

With $PROMETHEUS_MULTIPROC_DIR set before prometheus_client is first imported,
each process keeps its values in files of that directory (prometheus_client's
multiprocess mode, made for prefork servers) and a scrape answers for all of
them, those that have exited included: totals never fall when a daemon is
killed or recycled. Without it, a scrape answers for this process alone.

Files of processes that have exited are folded into one archive file per
kind (counter_archive.db, histogram_archive.db, ...) before each scrape and
when a process starts, so a scrape reads the live processes' files and the
archives, however many processes came and went. A fold is journalled: a
process killed in the middle of one leaves either the old archive and the
dead files, or the new archive and a list of the files it already holds,
which the next fold removes. Folds and scrapes hold an flock on
lite-metrics.lock in the directory; the servers' own increments take none.

Contract:
- `process_metrics()`: this process's Metrics, made on first call and fed
  from lite_db.listeners. Raises RuntimeError if the environment changed
  after prometheus_client was imported (the mode would not match).
- `Metrics.request(route, method, status, seconds)` counts one request.
- `Metrics.render(db_path)` is the text format; `Metrics.totals(db_path)` the
  same figures as a dict, for /lite/stats and the page.
"""

import contextlib
import fcntl
import glob
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.values import ValueClass

import lite_db

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
# Seconds: a write's wait for the lock, and a request, both in lite's range
# (a write ~0.1 ms uncontended, the lock budget 3 s).
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# lite_db events counted as they are: event -> (metric name, help).
DB_EVENTS = {
    "read_failures": ("lite_db_read_failures", "Reads that failed (503, or an error raised)."),
    "writes": ("lite_db_writes", "Writes (transactions) asked for."),
    "write_failures": ("lite_db_write_failures", "Writes that failed; nothing was written."),
    "busy_retries": ("lite_db_busy_retries", "Times a statement found the database busy."),
    "checkpoints": ("lite_db_checkpoints", "WAL checkpoints run."),
    "wal_restarts": ("lite_db_wal_restarts", "Checkpoints after which the WAL starts over."),
    "config_applied": ("lite_config_versions_applied", "config.ini versions applied."),
    "config_rejected": ("lite_config_versions_rejected", "config.ini versions not applied."),
}
# What /lite/stats calls each summed sample.
TOTALS = {
    "lite_http_requests_total": "requests",
    **{name + "_total": event for event, (name, _) in DB_EVENTS.items()},
    "lite_db_write_lock_wait_seconds_sum": "write_lock_wait_s",
}
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")  # others: "other"
LOCK_FILE = "lite-metrics.lock"
ARCHIVE = "archive"  # the process part of an archive file's name


# How a dead process's values join the archive, by file kind; pairs are
# (value, timestamp). live* gauges end with their process; "all" gauges
# (one series per process) are left as they are.
def _summed(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return a[0] + b[0], 0.0


_FOLD: dict[str, Callable[[tuple[float, float], tuple[float, float]], tuple[float, float]]] = {
    "counter": _summed,
    "histogram": _summed,
    "summary": _summed,
    "gauge_sum": _summed,
    "gauge_max": lambda a, b: max(a, b),
    "gauge_min": lambda a, b: min(a, b),
    "gauge_mostrecent": lambda a, b: a if a[1] >= b[1] else b,
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _finish_interrupted_folds(directory: str) -> None:
    """Complete or undo folds whose process died in the middle (lock held)."""
    for journal in glob.glob(os.path.join(directory, "*.folding")):
        archive = journal.removesuffix(".folding")
        if os.path.exists(archive + ".next"):  # not committed: the dead files still count
            os.unlink(archive + ".next")
        else:  # committed: the archive holds the listed files
            with open(journal, encoding="utf-8") as listed:
                for name in listed.read().split():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(directory, name))
        os.unlink(journal)
    for stray in glob.glob(os.path.join(directory, "*.next")):  # died before its journal
        os.unlink(stray)


def _fold(archive: str, dead: list[str], combine: Callable[..., tuple[float, float]]) -> None:
    """Add the `dead` files' values into `archive`, then remove them (lock held)."""
    folded: dict[str, tuple[float, float]] = {}
    for name in ([archive] if os.path.exists(archive) else []) + dead:
        for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(name):
            seen = folded.get(key)
            folded[key] = (value, timestamp) if seen is None else combine(seen, (value, timestamp))
    written = MmapedDict(archive + ".next")
    for key, (value, timestamp) in folded.items():
        written.write_value(key, value, timestamp)
    written.close()
    with open(archive + ".folding.tmp", "w", encoding="utf-8") as journal:
        journal.write("\n".join(os.path.basename(name) for name in dead))
    os.replace(archive + ".folding.tmp", archive + ".folding")
    os.replace(archive + ".next", archive)  # the commit
    for name in dead:
        os.unlink(name)
    os.unlink(archive + ".folding")


def fold_dead_processes(directory: str) -> set[int]:
    """Fold the files of exited processes into the archives; the PIDs still alive.

    The caller holds the directory's lock. A PID in use again by a new
    process is alive: that process continues its predecessor's files.
    """
    _finish_interrupted_folds(directory)
    dead: dict[str, list[str]] = {}
    alive: set[int] = set()
    for name in glob.glob(os.path.join(directory, "*.db")):
        kind, _, process = os.path.basename(name)[: -len(".db")].rpartition("_")
        if process == ARCHIVE or not process.isdigit() or kind not in _FOLD:
            continue
        if _alive(int(process)):
            alive.add(int(process))
        else:
            dead.setdefault(kind, []).append(name)
    for kind, names in dead.items():
        _fold(os.path.join(directory, f"{kind}_{ARCHIVE}.db"), names, _FOLD[kind])
    for name in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        process = name[: -len(".db")].rpartition("_")[2]
        if process.isdigit() and not _alive(int(process)):
            os.unlink(name)
    return alive


class _FoldingCollector:
    """prometheus_client's MultiProcessCollector after a fold, and the live processes' count."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.files = MultiProcessCollector(None, directory)

    def collect(self) -> list[Any]:
        with _locked(self.directory):
            alive = fold_dead_processes(self.directory)
            return [*self.files.collect(), _process_count(len(alive))]


def _process_count(count: int) -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "lite_processes", "Live server processes that have counted something.", value=count
    )


class Metrics:
    """One process's metrics; `directory`: the multiprocess directory, or None."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self.registry = CollectorRegistry(auto_describe=False)
        own = None if directory else self.registry  # multiprocess: read from the files
        if directory:
            self.registry.register(_FoldingCollector(directory))
            os.register_at_fork(after_in_child=self._after_fork)
        else:
            self.registry.register(_Collected([_process_count(1)]))
        labels = ("route", "method", "status")
        with _locked(directory) if directory else contextlib.nullcontext():
            if directory:
                fold_dead_processes(directory)
            # Made under the lock: a fold never removes a file a new process just opened.
            self.requests = Counter(
                "lite_http_requests", "Requests answered by lite.", labels, registry=own
            )
            self.request_seconds = Histogram(
                "lite_http_request_duration_seconds",
                "Seconds from a request's arrival in the app to its response.",
                ("route",),
                buckets=SECONDS_BUCKETS,
                registry=own,
            )
            self.write_lock_wait = Histogram(
                "lite_db_write_lock_wait_seconds",
                "Seconds each write waited for the write lock (queue and retries included).",
                buckets=SECONDS_BUCKETS,
                registry=own,
            )
            self.last_checkpoint = Gauge(
                "lite_db_last_checkpoint_timestamp_seconds",
                "When the last WAL checkpoint ran (Unix time).",
                multiprocess_mode="max",
                registry=own,
            )
            self.db_bytes = Gauge(
                "lite_db_bytes",
                "Size of the database file.",
                multiprocess_mode="mostrecent",
                registry=own,
            )
            self.wal_bytes = Gauge(
                "lite_db_wal_bytes",
                "Size of the -wal file.",
                multiprocess_mode="mostrecent",
                registry=own,
            )
            self.on_db_event: dict[str, Callable[[float], None]] = {
                event: Counter(name, help_, registry=own).inc
                for event, (name, help_) in DB_EVENTS.items()
            }
        self.on_db_event["write_lock_wait_s"] = self.write_lock_wait.observe
        # (route, method, status) -> its counter and its route's histogram:
        # labels() validates its values on every call, a dict lookup does not.
        self.by_request: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def _after_fork(self) -> None:
        # prometheus_client opens a child's own files at its first update;
        # done here under the lock, for the reason given in __init__.
        with _locked(self.directory):
            self.on_db_event["writes"](0)

    def on_event(self, event: str, amount: float) -> None:
        """A lite_db listener: count the event."""
        count = self.on_db_event.get(event)
        if count is not None:
            count(amount)
        if event == "checkpoints":
            self.last_checkpoint.set(time.time())

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request; `route` is the route's pattern, never the raw path."""
        series = self.by_request.get((route, method, status))
        if series is None:
            label = method if method in METHODS else "other"
            series = self.by_request[(route, method, status)] = (
                self.requests.labels(route, label, str(status)),
                self.request_seconds.labels(route),
            )
        series[0].inc()
        series[1].observe(seconds)

    def _measure(self, db_path: str | None) -> None:
        if db_path is None:  # not SQLite: no files to measure
            return
        for gauge, name in ((self.db_bytes, db_path), (self.wal_bytes, db_path + "-wal")):
            try:
                gauge.set(os.path.getsize(name))
            except OSError:
                gauge.set(0)

    def render(self, db_path: str | None) -> bytes:
        """Every metric in Prometheus text format, the sizes of `db_path` measured now."""
        self._measure(db_path)
        return prometheus_client.generate_latest(self.registry)

    def totals(self, db_path: str | None) -> dict[str, Any]:
        """The figures /lite/stats shows: sums over every process, and the gauges."""
        totals: dict[str, Any] = dict.fromkeys(TOTALS.values(), 0)
        gauges: dict[str, Any] = {}
        self._measure(db_path)
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name in TOTALS:
                    totals[TOTALS[sample.name]] += sample.value
                elif family.type == "gauge":
                    gauges[sample.name] = sample.value
        totals = {
            name: round(value, 6) if name.endswith("_s") else int(value)
            for name, value in totals.items()
        }
        return {
            "totals": totals,
            "processes": int(gauges.get("lite_processes", 0)),
            "db_bytes": int(gauges.get("lite_db_bytes", 0)),
            "wal_bytes": int(gauges.get("lite_db_wal_bytes", 0)),
            "last_checkpoint_at": gauges.get("lite_db_last_checkpoint_timestamp_seconds") or None,
        }


class _Collected:
    """A collector that yields what was collected already."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


_made: Metrics | None = None
_making = threading.Lock()


def process_metrics() -> Metrics:
    """This process's Metrics (one per process: prometheus_client's values are).

    Raises RuntimeError when $PROMETHEUS_MULTIPROC_DIR was set or unset after
    prometheus_client was imported: its values would not go where they are read.
    """
    global _made
    with _making:
        if _made is None:
            directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
            if bool(directory) != getattr(ValueClass, "_multiprocess", False):
                raise RuntimeError(
                    "PROMETHEUS_MULTIPROC_DIR must be set (or unset) before prometheus_client"
                    " is first imported"
                )
            if directory:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            _made = Metrics(directory)
            lite_db.listeners.append(_made.on_event)
        return _made
