"""lite's Prometheus metrics, one set per process, summed over every process that served.

With $PROMETHEUS_MULTIPROC_DIR set when `process_metrics()` first runs, each
process keeps its values in files of that directory (the file format of
prometheus_client's multiprocess mode, made for prefork servers) and a scrape
answers for all of them, those that have exited included: totals never fall
when a daemon is killed or recycled. Without it, a scrape answers for this
process alone.

Metrics are never load-bearing. prometheus_client writes its values through
memory-mapped files, and a page of a mapping that the file system cannot back
(a full disk, a file truncated under the map) is a SIGBUS that kills the
process on its next request. lite keeps each value in memory and writes it
to the file with pwrite(2), which fails with an error instead: on a failure
the process goes on counting in memory, logs the cause once, and every
CHECK_S writes its files whole again (created anew if they were removed,
truncated or replaced) until that succeeds. It installs its own value class
through prometheus_client's hook for that, `prometheus_client.values.ValueClass`,
so metrics the app makes after `process_metrics()` are kept the same way
(written through on each change).

lite's own counts, one per request and per lite_db event, are queued where
they happen (a deque: no lock, no system call) and published, added up, by
a thread of the process every PUBLISH_S, at a scrape and at exit. A scrape
waits SCRAPE_WAIT_S for the other processes to publish; a process killed
with SIGKILL loses what it had not yet published.

Files of processes that have exited are folded into one archive file per
kind (counter_archive.db, histogram_archive.db, ...) before each scrape and
when a process starts, so a scrape reads the live processes' files and the
archives, however many processes came and went. A fold is journalled: a
process killed in the middle of one leaves either the old archive and the
dead files, or the new archive and a list of the files it already holds,
which the next fold removes. A fold that cannot be written (a full disk) is
undone and the dead files are summed as they are. Folds and scrapes hold an
flock on lite-metrics.lock in the directory; the servers' own writes take none.

Contract:
- `process_metrics()`: this process's Metrics, made on first call and fed
  from lite_db.listeners. Never raises for the directory's state.
- `Metrics.request(route, method, status, seconds)` counts one request,
  published within PUBLISH_S; it and every other count never raise.
- `Metrics.render(db_path)` is the text format; `Metrics.totals(db_path)` the
  same sums as a dict, for /lite/stats and the page (`db_path`: the SQLite
  file whose sizes are measured; None for a database server). Both raise
  MetricsUnavailable, naming the reason, when the directory cannot be read
  or holds a file that is not a metrics file.
"""

import atexit
import bisect
import collections
import contextlib
import errno
import fcntl
import functools
import glob
import json
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import prometheus_client
import prometheus_client.values
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.mmap_dict import mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

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
    "flushes": ("lite_db_flushes", "Flushes of the WAL made for group commit."),
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
CHECK_S = 1.0  # 1 s: how often a process checks its files, and retries writing them
PUBLISH_S = 0.1  # 100 ms: how often a process publishes the counts it queued
SCRAPE_WAIT_S = 2 * PUBLISH_S  # a scrape waits for every process to publish once
MAX_FILE_BYTES = 16 * 1024 * 1024  # 16 MiB: a larger file is not one of lite's metrics files
# prometheus_client's file format: the bytes used (int32, then 4 of padding),
# then entries: key length (int32), UTF-8 key padded to 8 bytes, value and
# timestamp (two doubles).
HEADER_BYTES = 8
_INT = struct.Struct("i")
_TWO_DOUBLES = struct.Struct("dd")

log = logging.getLogger(__name__)


class MetricsUnavailable(Exception):
    """The metrics cannot be summed now; the message says why and what to do."""


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


class _Troubles:
    """Causes of trouble, each logged once until all is well again."""

    def __init__(self, consequence: str = "") -> None:
        self.causes: set[str] = set()
        self.consequence = consequence  # added to each warning

    def report(self, cause: str) -> None:
        if cause not in self.causes:
            log.warning("metrics: %s%s", cause, self.consequence)
            self.causes.add(cause)

    def resolved(self, news: str) -> None:
        if self.causes:
            log.info("metrics: %s", news)
            self.causes.clear()


# ---- The files: prometheus_client's format, read strictly, written with pwrite ----


def _entry(key: str, value: float, timestamp: float) -> bytes:
    encoded = key.encode("utf-8")
    padding = b" " * (8 - (len(encoded) + 4) % 8)
    return _INT.pack(len(encoded)) + encoded + padding + _TWO_DOUBLES.pack(value, timestamp)


def _image(slots: dict[str, list[float]]) -> tuple[bytes, dict[str, int]]:
    """A whole file holding `slots`, and each key's value offset in it."""
    parts = [b""]
    positions = {}
    used = HEADER_BYTES
    for key, (value, timestamp) in slots.items():
        entry = _entry(key, value, timestamp)
        parts.append(entry)
        used += len(entry)
        positions[key] = used - _TWO_DOUBLES.size
    parts[0] = _INT.pack(used) + bytes(HEADER_BYTES - _INT.size)
    return b"".join(parts), positions


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of `data` at `offset`; raises OSError, ENOSPC for a short write."""
    if os.pwrite(fd, data, offset) != len(data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def read_file(path: str) -> list[tuple[str, float, float]]:
    """The (key, value, timestamp) entries of a metrics file.

    Raises OSError when it cannot be read and ValueError, naming it, when it
    is not a metrics file (truncated, overwritten, too large): checked before
    prometheus_client's reader sees it, which trusts the lengths it finds.
    """
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    try:
        return _entries(data)
    except (ValueError, struct.error) as exc:
        raise ValueError(f"{path} is not a metrics file ({exc})") from None


def _entries(data: bytes) -> list[tuple[str, float, float]]:
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
    used = _INT.unpack_from(data)[0] if len(data) >= HEADER_BYTES else 0
    if used == 0 and not data.strip(b"\0"):
        return []  # created, nothing written yet
    if not HEADER_BYTES <= used <= len(data):
        raise ValueError(f"says {used} bytes used of {len(data)}")
    entries = []
    pos = HEADER_BYTES
    while pos < used:
        length = _INT.unpack_from(data, pos)[0] if pos + _INT.size <= used else -1
        value_at = pos + _INT.size + length + 8 - (length + 4) % 8
        if length < 0 or value_at + _TWO_DOUBLES.size > used:
            raise ValueError(f"its entry at byte {pos} runs past the end")
        key = data[pos + _INT.size : pos + _INT.size + length].decode("utf-8")
        if not _is_key(key):
            raise ValueError(f"its entry at byte {pos} has no metric's key")
        entries.append((key, *_TWO_DOUBLES.unpack_from(data, value_at)))
        pos = value_at + _TWO_DOUBLES.size
    return entries


@functools.lru_cache(maxsize=4096)  # the same few keys are in every process's file
def _is_key(key: str) -> bool:
    """Whether `key` is mmap_key's: [metric, sample, {label: value}, help], all text."""
    try:
        parts = json.loads(key)
    except ValueError:
        return False
    return (
        isinstance(parts, list)
        and len(parts) == 4
        and all(isinstance(part, str) for part in (parts[0], parts[1], parts[3]))
        and isinstance(parts[2], dict)
        and all(isinstance(value, str) for value in parts[2].values())
    )


def _write_file(path: str, slots: dict[str, list[float]]) -> None:
    """A new file at `path` holding `slots`; raises OSError (nothing left behind)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _pwrite_all(fd, _image(slots)[0], 0)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


# ---- This process's values: in memory, written to its files ----


class _File:
    """One file of this process's values (one per kind: counter_PID.db, ...).

    `image` is the file as it should be, every value in it: the truth. It
    is written with pwrite while `ok` (a value's bytes at each inc or set;
    the entries in place at each publish); a failed write clears `ok` and
    the store writes the file whole again later. Without a path (no
    directory) the image is all there is.
    """

    def __init__(self, store: "_Store", path: str | None) -> None:
        self.store = store
        self.path = path
        self.fd: int | None = None
        self.ok = False
        entries: dict[str, list[float]] = {}
        if path is not None:
            try:
                # A PID in use again continues its predecessor's file, as prometheus_client does.
                entries = {key: [value, ts] for key, value, ts in read_file(path)}
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as exc:
                store.troubles.report(f"cannot read {path} ({exc}); it is written anew")
        image, self.positions = _image(entries)
        self.image = bytearray(image)
        self.rewrite()

    def position(self, key: str) -> int:
        """Where `key`'s value is in the image; a new key is added and written."""
        position = self.positions.get(key)
        if position is None:
            start = len(self.image)
            self.image += _entry(key, 0.0, 0.0)
            _INT.pack_into(self.image, 0, len(self.image))
            position = self.positions[key] = len(self.image) - _TWO_DOUBLES.size
            self.write(start, len(self.image))  # the entry before the length that covers it
            self.write(0, _INT.size)
        return position

    def write(self, start: int, end: int) -> None:
        """Write through the image's bytes [start, end); never raises."""
        if self.ok:
            try:
                _pwrite_all(self.fd, self.image[start:end], start)
            except OSError as exc:
                self.broke(exc)

    def broke(self, exc: OSError) -> None:
        self.ok = False
        self.store.troubles.report(
            f"cannot write {os.path.dirname(self.path)}: {exc.strerror or exc}"
        )

    def renamed(self) -> bool:
        """Whether the path names another file, or none (removed, directory replaced)."""
        if self.fd is None:
            return True
        held = os.fstat(self.fd)
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (held.st_dev, held.st_ino) != (named.st_dev, named.st_ino)

    def moved(self) -> bool:
        """Whether the file is not at its path, or its bytes are not what was written."""
        # Truncated, overwritten or extended by another writer: a few KiB, once per CHECK_S.
        return self.renamed() or os.pread(self.fd, len(self.image) + 1, 0) != self.image

    def rewrite(self) -> None:
        """Write the whole file again, at its path (made anew if renamed); never raises."""
        if self.path is None:
            return
        try:
            if self.renamed():
                self.close()
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            # The entries before the length that covers them: a short write
            # (a full disk) leaves the length on disk as it was.
            _pwrite_all(self.fd, self.image[HEADER_BYTES:], HEADER_BYTES)
            _pwrite_all(self.fd, self.image[:HEADER_BYTES], 0)
            os.ftruncate(self.fd, len(self.image))
        except OSError as exc:
            self.broke(exc)
        else:
            self.ok = True

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        self.ok = False


class _Store:
    """This process's values, one _File per kind, in `directory` (None: in memory only).

    prometheus_client's metrics hold one `value_class` instance per series;
    every change goes through `lock`. A fork starts the child on files of
    its own, its values from zero, as prometheus_client does.
    """

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.files: dict[str, _File] = {}
        self.values: list[Any] = []
        self.troubles = _Troubles(f"; counted in memory, written again within {CHECK_S:g} s")
        self.check_at = 0.0  # time.monotonic() of the next check
        self.value_class = type("LiteValue", (_Value,), {"store": self})

    def bind(self, value: "_Value") -> None:
        """Point `value` at its place in this process's file of its kind."""
        file = self.files.get(value.prefix)
        if file is None:
            path = None
            if self.directory is not None:
                path = os.path.join(self.directory, f"{value.prefix}_{self.pid}.db")
            file = self.files[value.prefix] = _File(self, path)
        value.file, value.position = file, file.position(value.key)

    def forked(self) -> None:
        """In a child: a new lock (the parent's may have been held), files of its own."""
        self.lock = threading.Lock()
        if self.directory is None:  # the values the parent had, as prometheus_client's
            return
        for file in self.files.values():
            file.close()
        self.files.clear()
        self.pid = os.getpid()
        for value in self.values:
            self.bind(value)

    def check_now_and_then(self) -> None:
        """check() once every CHECK_S; the caller holds the lock."""
        if time.monotonic() >= self.check_at:
            self.check()

    def check(self) -> None:
        """Write again each file that failed or was removed, cut short or replaced."""
        self.check_at = time.monotonic() + CHECK_S
        if self.directory is None:
            return
        for file in self.files.values():
            try:
                moved = file.moved()
            except OSError as exc:
                file.broke(exc)
                moved = True
            if moved and file.ok:
                self.troubles.report(f"{file.path} was removed, cut short or replaced")
            if moved or not file.ok:
                file.rewrite()
        if all(file.ok for file in self.files.values()):
            self.troubles.resolved(f"the files in {self.directory} are written again")


_DOUBLE = struct.Struct("d")


class _Value:
    """prometheus_client's value interface (MutexValue's), kept by a _Store."""

    _multiprocess = True
    store: _Store  # set on the subclass each _Store makes

    def __init__(
        self,
        typ: str,
        metric_name: str,
        name: str,
        labelnames: Any,
        labelvalues: Any,
        help_text: str,
        multiprocess_mode: str = "",
        **_: Any,
    ) -> None:
        self.prefix = f"{typ}_{multiprocess_mode}" if typ == "gauge" else typ
        self.key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
        self.file: _File
        self.position: int
        store = self.store
        with store.lock:
            store.bind(self)
            store.values.append(self)

    def add(self, amount: float) -> None:
        """Add `amount` (the caller holds the store's lock); not yet written through."""
        image, position = self.file.image, self.position
        _DOUBLE.pack_into(image, position, _DOUBLE.unpack_from(image, position)[0] + amount)

    def inc(self, amount: float) -> None:
        store = self.store
        with store.lock:
            self.add(amount)
            self.file.write(self.position, self.position + _DOUBLE.size)
            store.check_now_and_then()

    def set(self, value: float, timestamp: float | None = None) -> None:
        store = self.store
        with store.lock:
            _TWO_DOUBLES.pack_into(self.file.image, self.position, value, timestamp or 0.0)
            self.file.write(self.position, self.position + _TWO_DOUBLES.size)
            store.check_now_and_then()

    def get(self) -> float:
        with self.store.lock:
            return _DOUBLE.unpack_from(self.file.image, self.position)[0]

    def set_exemplar(self, exemplar: Any) -> None:
        """Exemplars are not kept across processes (nor by prometheus_client)."""

    def get_exemplar(self) -> None:
        return None


def _histogram_values(histogram: Histogram) -> tuple[_Value, list[_Value], list[float]] | None:
    """A histogram's sum and bucket values and its bounds; None if they are not lite's.

    prometheus_client's Histogram keeps them as `_sum`, `_buckets` and
    `_upper_bounds` (stable since its first versions); another layout makes
    lite count through `observe`, one observation at a time.
    """
    total = getattr(histogram, "_sum", None)
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    if not (isinstance(total, _Value) and isinstance(buckets, list) and isinstance(bounds, list)):
        return None
    if len(buckets) != len(bounds) or not all(isinstance(b, _Value) for b in buckets):
        return None
    return total, buckets, bounds


def _grouped(pending: collections.deque[tuple[Any, float]]) -> dict[Any, list[float]]:
    """Take every (key, amount) queued in `pending`: the amounts by key, in order."""
    groups: dict[Any, list[float]] = {}
    popleft = pending.popleft
    for _ in range(len(pending)):  # those queued from now on wait for the next publish
        key, amount = popleft()
        amounts = groups.get(key)
        if amounts is None:
            groups[key] = [amount]
        else:
            amounts.append(amount)
    return groups


class _Counts:
    """Counts added up between two publishes, then added to their values at once."""

    def __init__(self, store: _Store) -> None:
        self.store = store
        self.deltas: dict[_Value, float] = {}

    def add(self, value: _Value, amount: float) -> None:
        self.deltas[value] = self.deltas.get(value, 0.0) + amount

    def observe(
        self, histogram: tuple[_Value, list[_Value], list[float]], amounts: list[float]
    ) -> None:
        total, buckets, bounds = histogram
        deltas = self.deltas
        deltas[total] = deltas.get(total, 0.0) + math.fsum(amounts)
        for amount in amounts:
            bucket = buckets[bisect.bisect_left(bounds, amount)]  # the first bound >= amount
            deltas[bucket] = deltas.get(bucket, 0.0) + 1.0

    def inc_of(self, counter: Counter) -> Callable[[float], None]:
        """A function that counts `amount` for `counter` here (its own inc if not lite's)."""
        value = getattr(counter, "_value", None)
        return functools.partial(self.add, value) if isinstance(value, _Value) else counter.inc

    def observe_of(self, histogram: Histogram) -> Callable[[list[float]], None]:
        """A function that counts a list of observations for `histogram` here."""
        values = _histogram_values(histogram)
        if values is None:  # prometheus_client's own observe, one at a time
            return lambda amounts: collections.deque(map(histogram.observe, amounts), maxlen=0)
        return functools.partial(self.observe, values)

    def write(self) -> None:
        """Add the counts to their values, each changed file written once; never raises."""
        if not self.deltas:
            return
        store = self.store
        with store.lock:
            changed = set()
            for value, amount in self.deltas.items():
                value.add(amount)
                changed.add(value.file)
            for file in changed:  # its entries, written already: a write in place
                file.write(HEADER_BYTES, len(file.image))
            store.check_now_and_then()
        self.deltas.clear()


# ---- Folding the files of processes that have exited ----


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
    """The directory's flock; raises OSError if the lock file cannot be opened."""
    fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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


class _FoldNotWritten(Exception):
    """A fold failed before its commit: the archive and the dead files are as they were."""


def _fold(archive: str, dead: list[str], combine: Callable[..., tuple[float, float]]) -> None:
    """Add the `dead` files' values into `archive`, then remove them (lock held).

    Raises _FoldNotWritten if the new archive or its journal cannot be
    written (nothing changed), ValueError for a file that is not a metrics
    file, OSError past the commit (the next fold finishes it).
    """
    folded: dict[str, list[float]] = {}
    for name in ([archive] if os.path.exists(archive) else []) + dead:
        for key, value, timestamp in read_file(name):
            seen = folded.get(key)
            folded[key] = list(
                (value, timestamp) if seen is None else combine(tuple(seen), (value, timestamp))
            )
    try:
        _write_file(archive + ".next", folded)
        with open(archive + ".folding.tmp", "w", encoding="utf-8") as journal:
            journal.write("\n".join(os.path.basename(name) for name in dead))
        os.replace(archive + ".folding.tmp", archive + ".folding")
    except OSError as exc:
        for name in (archive + ".next", archive + ".folding.tmp", archive + ".folding"):
            with contextlib.suppress(OSError):
                os.unlink(name)
        raise _FoldNotWritten(f"cannot fold into {archive}: {exc.strerror or exc}") from exc
    os.replace(archive + ".next", archive)  # the commit
    for name in dead:
        os.unlink(name)
    os.unlink(archive + ".folding")


def _process_files(directory: str) -> Iterator[tuple[str, str, int]]:
    """(path, kind, pid) of each process's file in `directory`, archives left out."""
    for name in glob.glob(os.path.join(directory, "*.db")):
        kind, _, process = os.path.basename(name)[: -len(".db")].rpartition("_")
        if process != ARCHIVE and process.isdigit() and kind in _FOLD:
            yield name, kind, int(process)


def fold_dead_processes(directory: str) -> set[int]:
    """Fold the files of exited processes into the archives; the PIDs still alive.

    The caller holds the directory's lock. A PID in use again by a new
    process is alive: that process continues its predecessor's files.
    Raises _FoldNotWritten (the dead files still count as they are),
    ValueError or OSError.
    """
    _finish_interrupted_folds(directory)
    dead: dict[str, list[str]] = {}
    alive: set[int] = set()
    for name, kind, pid in _process_files(directory):
        if _alive(pid):
            alive.add(pid)
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
    """prometheus_client's merge of the files after a fold, and the live processes' count."""

    def __init__(self, directory: str, on_trouble: Callable[[str], None]) -> None:
        self.directory = directory
        self.on_trouble = on_trouble
        self.folded = True  # whether the last collect could fold

    def collect(self) -> list[Any]:
        """Raises MetricsUnavailable, naming the reason."""
        directory = self.directory
        try:
            with _locked(directory):
                self.folded = False
                try:
                    alive = fold_dead_processes(directory)
                except _FoldNotWritten as exc:  # e.g. a full disk: sum the dead files as they are
                    self.on_trouble(str(exc))
                    alive = {pid for _, _, pid in _process_files(directory) if _alive(pid)}
                else:
                    self.folded = True
                files = []
                for name in glob.glob(os.path.join(directory, "*.db")):
                    try:
                        if read_file(name):  # not an empty one, made before a full disk
                            files.append(name)
                    except FileNotFoundError:  # a live gauge's, gone since the glob
                        continue
                families = list(MultiProcessCollector.merge(files))
        except ValueError as exc:
            raise MetricsUnavailable(
                f"{exc}: remove it (a live process writes its file again within {CHECK_S:g} s)"
            ) from None
        except OSError as exc:
            raise MetricsUnavailable(
                f"metrics directory {directory}: {exc.strerror or exc}"
            ) from None
        except (TypeError, RuntimeError, struct.error) as exc:
            raise MetricsUnavailable(
                f"metrics files in {directory} changed while read: {exc}"
            ) from None
        return [*families, _process_count(len(alive))]


def _process_count(count: int) -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "lite_processes", "Live server processes that have counted something.", value=count
    )


# ---- The metrics ----


class Metrics:
    """One process's metrics; `directory`: the multiprocess directory, or None.

    prometheus_client's value class becomes this process's _Store: with a
    directory its values are written through to files there (see the
    module's docstring), without one they are kept in memory. lite's own
    counts (requests, lite_db's events) are queued where they happen and
    published, added up, every PUBLISH_S by a thread of the process, at a
    scrape and at exit. Making it never raises for the directory's state:
    what cannot be done is logged and counted in memory.
    """

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self.registry = CollectorRegistry(auto_describe=False)
        self.troubles = _Troubles()  # why scrapes could not fold or sum
        own = None if directory else self.registry  # multiprocess: read from the files
        self.store = _Store(directory)
        prometheus_client.values.ValueClass = self.store.value_class
        if directory:
            self.collector: _FoldingCollector | None = _FoldingCollector(
                directory, self.troubles.report
            )
            self.registry.register(self.collector)
        else:
            self.collector = None
            self.registry.register(_Collected([_process_count(1)]))
        os.register_at_fork(after_in_child=self._after_fork)
        labels = ("route", "method", "status")
        with self._folded_and_locked():
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
            self.counts = _Counts(self.store)
            self.on_db_event: dict[str, Callable[[float], None]] = {
                event: self.counts.inc_of(Counter(name, help_, registry=own))
                for event, (name, help_) in DB_EVENTS.items()
            }
        self.observe_lock_wait = self.counts.observe_of(self.write_lock_wait)
        self.counted_events = frozenset({*self.on_db_event, "write_lock_wait_s"})
        # (route, method, status) -> the functions that count it and time it:
        # labels() validates its values on every call, a dict lookup does not.
        self.by_request: dict[
            tuple[str, str, int], tuple[Callable[[float], None], Callable[[float], None]]
        ] = {}
        # Counts not yet published, in the order they happened: a deque's
        # append and popleft are safe from any thread without a lock.
        self.pending_requests: collections.deque[tuple[tuple[str, str, int], float]] = (
            collections.deque()
        )
        self.pending_events: collections.deque[tuple[str, float]] = collections.deque()
        self.publishing = threading.Lock()
        self._start_publisher()
        atexit.register(self.publish)

    @contextlib.contextmanager
    def _folded_and_locked(self) -> Iterator[None]:
        """The directory's lock, the dead processes' files folded; neither if it cannot be."""
        with contextlib.ExitStack() as stack:
            if self.directory is not None:
                try:
                    stack.enter_context(_locked(self.directory))
                except OSError as exc:
                    self.troubles.report(f"cannot lock {self.directory}: {exc.strerror or exc}")
                else:
                    try:
                        fold_dead_processes(self.directory)
                    except (_FoldNotWritten, ValueError, OSError) as exc:
                        self.troubles.report(str(exc))
            yield

    def _after_fork(self) -> None:
        # The parent publishes what it queued; the child's own files are
        # opened under the directory's lock, for the reason given in __init__.
        self.pending_requests.clear()
        self.pending_events.clear()
        self.publishing = threading.Lock()  # the parent's may have been held
        self.counts.deltas.clear()
        with self._folded_and_locked():
            self.store.forked()
        self._start_publisher()

    def _start_publisher(self) -> None:
        threading.Thread(target=self._publish_forever, name="lite-metrics", daemon=True).start()

    def _publish_forever(self) -> None:
        while True:
            time.sleep(PUBLISH_S)
            self.publish()

    def on_event(self, event: str, amount: float) -> None:
        """A lite_db listener: queue the event if it is counted."""
        if event in self.counted_events:
            self.pending_events.append((event, amount))
            if event == "checkpoints":
                self.pending_events.append(("checkpoint_at", time.time()))

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Queue one answered request; `route` is the route's pattern, never the raw path."""
        self.pending_requests.append(((route, method, status), seconds))

    def publish(self) -> None:
        """Count what is queued into this process's values and files; never raises."""
        if not (self.pending_requests or self.pending_events):
            return
        try:
            with self.publishing:
                self._publish()
        except Exception as exc:  # a thread's loop and atexit must go on
            self.troubles.report(f"cannot publish this process's counts: {exc!r}")

    def _publish(self) -> None:
        for (route, method, status), seconds in _grouped(self.pending_requests).items():
            series = self.by_request.get((route, method, status))
            if series is None:
                label = method if method in METHODS else "other"
                series = self.by_request[(route, method, status)] = (
                    self.counts.inc_of(self.requests.labels(route, label, str(status))),
                    self.counts.observe_of(self.request_seconds.labels(route)),
                )
            series[0](len(seconds))
            series[1](seconds)
        for event, amounts in _grouped(self.pending_events).items():
            if event == "write_lock_wait_s":
                self.observe_lock_wait(amounts)
            elif event == "checkpoint_at":
                self.last_checkpoint.set(max(amounts))
            else:
                self.on_db_event[event](math.fsum(amounts))
        self.counts.write()

    def _measure(self, db_path: str | None) -> None:
        if db_path is None:  # not SQLite: no files to measure
            return
        for gauge, name in ((self.db_bytes, db_path), (self.wal_bytes, db_path + "-wal")):
            try:
                gauge.set(os.path.getsize(name))
            except OSError:
                gauge.set(0)

    def _collect(self) -> list[Any]:
        self.publish()
        with self.store.lock:  # this process's own files first, if they need writing
            self.store.check()
        if self.directory is not None:  # the other processes' publishers
            time.sleep(SCRAPE_WAIT_S)
        try:
            families = list(self.registry.collect())
        except MetricsUnavailable as exc:
            self.troubles.report(str(exc))
            raise
        if self.collector is None or self.collector.folded:
            self.troubles.resolved(f"the files in {self.directory} are folded and summed again")
        return families

    def render(self, db_path: str | None) -> bytes:
        """Every metric in Prometheus text format, the sizes of `db_path` measured now.

        Raises MetricsUnavailable, naming the reason.
        """
        self._measure(db_path)
        families = self._collect()
        return prometheus_client.generate_latest(_Collected(families))

    def totals(self, db_path: str | None) -> dict[str, Any]:
        """What /lite/stats shows: the totals over every process, and the gauges.

        Raises MetricsUnavailable, naming the reason.
        """
        totals: dict[str, Any] = dict.fromkeys(TOTALS.values(), 0)
        gauges: dict[str, Any] = {}
        self._measure(db_path)
        for family in self._collect():
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
            "last_checkpoint_at": gauges.get("lite_db_last_checkpoint_timestamp_seconds") or None,
        }


class _Collected:
    """A collector (and registry, for generate_latest) of what was collected already."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


_made: Metrics | None = None
_making = threading.Lock()


def process_metrics() -> Metrics:
    """This process's Metrics (one per process: prometheus_client's value class is).

    Multiprocess when $PROMETHEUS_MULTIPROC_DIR is set now, whenever
    prometheus_client was imported. Never raises for the directory's state.
    """
    global _made
    with _making:
        if _made is None:
            directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
            if directory:
                try:
                    os.makedirs(directory, mode=0o700, exist_ok=True)
                except OSError as exc:
                    log.warning("metrics: cannot make %s: %s", directory, exc.strerror or exc)
            _made = Metrics(directory)
            lite_db.listeners.append(_made.on_event)
        return _made
