"""lite_django, in-process: lite's pragmas on every new connection (not
counted as queries), atomic() taking the write lock at BEGIN, and a
contended write waiting in short slices, then failing as Django's
OperationalError once lite's budget is spent. The example app's views
refuse as lite_app does (lite_counters' rules and answers), and its F()
increment is exact across 8 processes."""

import json
import os
import sqlite3
import sys
import threading
import time

import django
import procs
import pytest
from django.conf import settings

import lite_db

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    """The example app's database, migrated, through lite_django."""
    path = str(tmp_path_factory.mktemp("django") / "django.db")
    if not settings.configured:
        sys.path.insert(0, EXAMPLES)
        settings.configure(
            DATABASES={"default": {"ENGINE": "lite_django", "NAME": path}},
            INSTALLED_APPS=["django_counter"],
            DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
            USE_TZ=True,
        )
        django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    yield settings.DATABASES["default"]["NAME"]
    from django.db import connection

    connection.close()


@pytest.fixture
def connection(database):
    from django.db import connection

    connection.close()  # each test starts with a new connection
    yield connection
    connection.close()


def test_a_new_connection_gets_lites_pragmas_outside_djangos_query_log(connection):
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        connection.ensure_connection()
    assert len(queries) == 0
    raw = connection.connection
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA busy_timeout").fetchone()[0] == lite_db.BUSY_POLL_MS
    assert raw.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert raw.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_atomic_takes_the_write_lock_at_begin(connection):
    from django.db import transaction
    from django.test.utils import CaptureQueriesContext
    from django_counter.models import Counter

    with CaptureQueriesContext(connection) as queries, transaction.atomic():
        Counter.objects.filter(name="hits").count()
    assert queries[0]["sql"] == "BEGIN IMMEDIATE"


def _hold_the_write_lock(path, seconds, held):
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    held.set()
    time.sleep(seconds)
    conn.execute("COMMIT")
    conn.close()


def _holding(path, seconds):
    held = threading.Event()
    holder = threading.Thread(target=_hold_the_write_lock, args=(path, seconds, held))
    holder.start()
    held.wait(5)
    return holder


def test_a_contended_write_waits_in_slices_and_succeeds(connection, database):
    from django.db.models import F
    from django_counter.models import Counter

    connection.ensure_connection()
    retries_before = connection.lite_figures.busy_retries
    holder = _holding(database, 0.5)
    began = time.monotonic()
    Counter.objects.filter(name="hits").update(value=F("value") + 1)  # autocommit
    waited = time.monotonic() - began
    holder.join()
    assert waited >= 0.4
    # Slices of BUSY_POLL_MS: many tries, not SQLite's one long wait.
    assert connection.lite_figures.busy_retries - retries_before > 20


def test_past_the_budget_a_write_fails_as_operational_error(connection, database, monkeypatch):
    from django.db import OperationalError, transaction
    from django_counter.models import Counter

    monkeypatch.setattr(lite_db, "LOCK_BUDGET_MS", 300)
    connection.ensure_connection()
    holder = _holding(database, 1.5)
    began = time.monotonic()
    with pytest.raises(OperationalError, match="locked"), transaction.atomic():
        Counter.objects.filter(name="hits").count()
    waited = time.monotonic() - began
    holder.join()
    assert 0.25 <= waited < 1.0  # lite's budget, not Django's 5 s timeout


@pytest.mark.parametrize(
    ("method", "params", "status", "error"),
    [
        ("get", {"counter": "-x"}, 400, "counter: use 1-64 of a-z, 0-9, _ and -"),
        ("get", {"counter": ["hits", "misses"]}, 400, "give counter once"),
        ("get", {"counter": "nope"}, 404, "no counter 'nope'"),
        ("post", {"counter": "_x"}, 400, "counter: use 1-64 of a-z, 0-9, _ and -"),
        ("post", {"by": "0"}, 400, "by: a whole number from 1 to 1000000"),
        ("post", {"sneaky": "1"}, 400, "unknown parameter 'sneaky': use counter, by"),
        ("post", {"counter": "nope"}, 404, "no counter 'nope'"),
    ],
)
def test_the_example_view_refuses_as_lite_app_does(connection, method, params, status, error):
    from django.test import RequestFactory
    from django_counter import views
    from django_counter.models import Counter

    before = sorted(Counter.objects.values_list("name", "value"))
    view = views.get_counter if method == "get" else views.increment
    response = view(getattr(RequestFactory(), method)("/", params))
    assert (response.status_code, json.loads(response.content)) == (status, {"error": error})
    assert sorted(Counter.objects.values_list("name", "value")) == before


def test_the_example_view_past_the_budget_is_503_with_retry_after(
    connection, database, monkeypatch
):
    from django.test import RequestFactory
    from django_counter import views

    monkeypatch.setattr(lite_db, "LOCK_BUDGET_MS", 300)
    connection.ensure_connection()
    holder = _holding(database, 1.5)
    response = views.increment(RequestFactory().post("/", {"counter": "hits"}))
    holder.join()
    assert (response.status_code, response["Retry-After"]) == (503, "1")
    assert json.loads(response.content) == {"error": "database busy, retry later"}


def _increment_through_django(path, examples, count):
    """One process: the example app's view, `count` times; the values returned."""
    sys.path.insert(0, examples)
    os.environ["LITE_DB_PATH"] = path
    os.environ["DJANGO_SETTINGS_MODULE"] = "django_counter.settings"
    django.setup()
    from django.test import Client

    client = Client()
    values = []
    for _ in range(count):
        response = client.post("/lite/inc", {"counter": "misses"})
        values.append(response.json()["value"] if response.status_code == 200 else None)
    return values


def test_eight_processes_increment_exactly_through_the_example_view(database):
    from django_counter.models import Counter

    before = Counter.objects.get(name="misses").value
    results = procs.run(_increment_through_django, [(database, EXAMPLES, 100)] * 8)
    values = [value for one in results for value in one]
    assert None not in values
    assert sorted(values) == list(range(before + 1, before + 801))
    assert Counter.objects.get(name="misses").value == before + 800


def test_connections_of_ended_threads_leave_no_queue_file_open(database):
    """As a thread-per-request server would: each thread's connection queues once."""
    import gc

    from django.db import connection, transaction
    from django_counter.models import Counter

    def write_once():
        with transaction.atomic():
            Counter.objects.filter(name="misses").update(value=0)
        connection.close()

    for _ in range(20):
        thread = threading.Thread(target=write_once)
        thread.start()
        thread.join(30)
    gc.collect()
    held = [
        fd
        for fd in os.listdir("/proc/self/fd")
        if os.path.realpath(f"/proc/self/fd/{fd}") == database + lite_db.QUEUE_SUFFIX
    ]
    assert len(held) <= 1, held  # at most this thread's own wrapper's
