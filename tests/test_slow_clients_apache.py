"""Slow clients against the real Apache: 40 connections that send their
headers, then a body at 1 byte/s, while 10 other clients read and increment.

mod_wsgi hands a request to a daemon as soon as its headers arrive, so without
a bound the slow bodies would hold all 20 daemons for a minute. lite.conf's
RequestReadTimeout cuts them within seconds; the others' requests all
complete, none 5xx, p99 under 10 s, and the counter stays exact.
"""

import http.client
import select
import socket
import statistics
import threading
import time

import history
import pytest

pytestmark = [pytest.mark.apache, pytest.mark.slow]

SLOW_CLIENTS = 40
BODY_BYTES = 60  # sent at 1 byte/s: a minute, if nothing cut it
LOAD_S = 15


def _slow_client(port, cut_after):
    """Send headers, then the body a byte a second; how long until the server ended it."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    started = time.monotonic()
    try:
        conn.sendall(
            b"POST /lite/inc HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n" % BODY_BYTES
        )
        for _ in range(BODY_BYTES):
            readable, _, _ = select.select([conn], [], [], 1.0)
            if readable:  # an answer (400 or 408), or the connection closed
                break
            conn.sendall(b"x")
    except OSError:
        pass
    finally:
        cut_after.append(time.monotonic() - started)
        conn.close()


def _read_while(port, deadline, latencies, statuses, lock):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        while time.monotonic() < deadline:
            began = time.monotonic()
            conn.request("GET", "/lite/get?counter=hits")
            res = conn.getresponse()
            res.read()
            with lock:
                latencies.append(time.monotonic() - began)
                statuses[res.status] = statuses.get(res.status, 0) + 1
    finally:
        conn.close()


def _p99(values):
    return statistics.quantiles(values, n=100)[98]


def test_slow_bodies_are_cut_and_hold_no_one_else_up(deployment):
    before = deployment.value()
    log_from = deployment.log_size()
    cut_after = []
    slow = [
        threading.Thread(target=_slow_client, args=(deployment.port, cut_after))
        for _ in range(SLOW_CLIENTS)
    ]
    for thread in slow:
        thread.start()
    time.sleep(1)  # every daemon is now waiting for a slow body
    latencies, statuses, lock = [], {}, threading.Lock()
    deadline = time.monotonic() + LOAD_S
    readers = [
        threading.Thread(
            target=_read_while, args=(deployment.port, deadline, latencies, statuses, lock)
        )
        for _ in range(5)
    ]
    for thread in readers:
        thread.start()
    writes = history.run(deployment.port, clients=5, seconds=LOAD_S, timeout_s=60)
    for thread in [*readers, *slow]:
        thread.join(BODY_BYTES + 30)
        assert not thread.is_alive()

    assert len(cut_after) == SLOW_CLIENTS
    assert max(cut_after) < 20, f"slow bodies held for {max(cut_after):.1f} s"
    writes.check(before, deployment.value())
    assert not writes.unknown and not writes.failed, (writes.statuses, writes.unknown[:3])
    assert set(statuses) == {200}, statuses
    assert len(writes.ok) > 100 and len(latencies) > 100
    all_latencies = [*latencies, *writes.latencies]
    print(
        f"slow clients cut after {min(cut_after):.1f}-{max(cut_after):.1f} s; "
        f"reads {len(latencies)}, writes {len(writes.ok)}, p99 {_p99(all_latencies):.2f} s, "
        f"max {max(all_latencies):.2f} s"
    )
    assert _p99(all_latencies) < 10
    assert "Traceback" not in deployment.log_since(log_from)
