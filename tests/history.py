"""A load client that records every increment's outcome, and checks the history.

Each of `clients` threads sends POST /lite/inc over its own connection to
127.0.0.1 until the deadline, or `requests_each` times. Every request ends in
one of three outcomes:

- ok: 2xx, with the returned new value;
- failed: a definite refusal that did not apply (4xx, or lite's JSON 503);
- unknown: a timeout, a reset connection, or any other 5xx (a killed daemon
  turns its request into one): it may or may not have counted.

`check()` then states what must hold whatever happened:
acked <= final delta <= acked + unknown, and every returned value distinct.
With `idempotent=True`, each increment has its own Idempotency-Key and an
unknown outcome is retried with the same key until it is definite, so the
final delta must equal the number of keys that ended ok, exactly.

A config version applied during the load sets the counter to its configured
value: increments acknowledged before the last application do not count
toward the final value. `check(..., resets=[c1, ...])` then checks the
acknowledged values run by run (`check_runs`).
"""

import http.client
import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlencode

UNKNOWN_RETRY_SLEEP_S = 0.2  # between retries of an unknown outcome, same key


@dataclass
class History:
    ok: list[int] = field(default_factory=list)  # returned values
    failed: list[int] = field(default_factory=list)  # statuses
    unknown: list[str] = field(default_factory=list)  # what happened
    keys_ok: set[str] = field(default_factory=set)
    retries: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    bodies_with_lock_errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, one per request sent
    # (began, ended, refused), time.monotonic(), one per request sent; refused:
    # lite's own 503, a write it refused to apply; ok: answered 2xx
    timeline: list[tuple[float, float, bool, bool]] = field(default_factory=list)

    def acknowledged_after_first_refusal(self) -> int:
        """How many requests sent after lite's first 503 had ended were acknowledged."""
        refusals = [ended for _, ended, refused, _ in self.timeline if refused]
        if not refusals:
            return 0
        first = min(refusals)
        return sum(1 for began, _, _, ok in self.timeline if ok and began > first)

    def check(
        self, before: int, after: int, idempotent: bool = False, resets: list[int] | None = None
    ) -> None:
        """Assert what no fault may break; `before`/`after`: the counter's values.

        `resets`: the configured value of each config version applied during
        the load, in order. Then every outcome must be known, and the
        acknowledged values must be exactly the runs of `check_runs`.
        """
        assert not self.bodies_with_lock_errors, self.bodies_with_lock_errors[:3]
        if resets:
            assert not self.unknown, f"{len(self.unknown)} unknown outcomes"
            check_runs(self.ok, [before, *resets], after)
            return
        delta = after - before
        acked = len(self.ok)
        assert len(set(self.ok)) == acked, "a value was returned twice"
        assert all(before < value <= after for value in self.ok), "a value out of range"
        assert acked <= delta <= acked + len(self.unknown), (
            f"acked {acked}, unknown {len(self.unknown)}, delta {delta}"
        )
        if idempotent:
            assert not self.unknown, f"{len(self.unknown)} outcomes stayed unknown"
            assert delta == len(self.keys_ok), f"delta {delta}, keys {len(self.keys_ok)}"


def check_runs(values: list[int], starts: list[int], final: int) -> None:
    """Assert that `values` are the runs a counter reset to each of `starts` makes.

    `starts`: the counter's value when the load began, then the configured
    value of each config version applied during it, in order; `values`: every
    acknowledged value, all outcomes known. After each start the counter
    counts start+1, start+2, ...; the last run ends at `final`. With one
    version (starts [s, c]) the values are exactly {s+1 .. s+N} + {c+1 .. c+M},
    M = final - c, N = acked - M. A version applied twice, with increments
    in between, adds a run that no start accounts for.
    """
    remaining = Counter(values)
    last = starts[-1]
    for value in range(last + 1, final + 1):
        assert remaining[value] > 0, f"{value}, of the run after the last reset, not acknowledged"
        remaining[value] -= 1
    remaining = +remaining  # drop the zeros
    allowed = Counter(starts[:-1])
    # A run from start s adds 1 to the count of each value s+1, s+2, ...: the
    # count can rise at value v only where runs start at v - 1.
    for value in sorted(remaining):
        rise = remaining[value] - remaining.get(value - 1, 0)
        assert rise <= allowed[value - 1], (
            f"{rise} runs start after {value - 1}, where {allowed[value - 1]} resets began one"
            f" (starts {starts}, final {final})"
        )


def _post(conn, counter, key):
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if key is not None:
        headers["Idempotency-Key"] = key
    conn.request("POST", "/lite/inc", body=urlencode({"counter": counter}), headers=headers)
    res = conn.getresponse()
    return res.status, res.read().decode("utf-8", "replace")


def _client(port, counter, deadline, requests_each, idempotent, timeout_s, history, lock):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    sent = 0
    try:
        while time.monotonic() < deadline and (requests_each is None or sent < requests_each):
            sent += 1
            key = uuid.uuid4().hex if idempotent else None
            while True:
                began = time.monotonic()
                try:
                    status, body = _post(conn, counter, key)
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
                    status, body = None, type(exc).__name__
                ended = time.monotonic()
                ok = status is not None and 200 <= status < 300
                refused = status == 503 and body.startswith("{")
                with lock:
                    history.latencies.append(ended - began)
                    history.timeline.append((began, ended, refused, ok))
                    if status is not None:
                        history.statuses[status] = history.statuses.get(status, 0) + 1
                    if body and ("locked" in body or "Traceback" in body):
                        history.bodies_with_lock_errors.append(body[:200])
                if ok:
                    with lock:
                        history.ok.append(json.loads(body)["value"])
                        if key is not None:
                            history.keys_ok.add(key)
                    break
                if refused or (status is not None and 400 <= status < 500):
                    with lock:
                        history.failed.append(status)
                    break
                # unknown: it may have counted
                if key is None or time.monotonic() > deadline + 60:
                    with lock:
                        history.unknown.append(body if status is None else str(status))
                    break
                with lock:
                    history.retries += 1
                time.sleep(UNKNOWN_RETRY_SLEEP_S)
    finally:
        conn.close()


def run(
    port,
    counter="hits",
    clients=20,
    seconds=5.0,
    requests_each=None,
    idempotent=False,
    timeout_s=10.0,
):
    """Drive the load; returns the History once every client has stopped."""
    history = History()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(
            target=_client,
            args=(port, counter, deadline, requests_each, idempotent, timeout_s, history, lock),
            daemon=True,
        )
        for _ in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
        assert not thread.is_alive(), "a load client did not stop"
    return history


def start(port, **kwargs):
    """run() in a background thread; returns a function that waits and gives the History."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(history=run(port, **kwargs)))
    thread.start()

    def wait():
        thread.join()
        return result["history"]

    return wait
