"""POST /lite/inc with an Idempotency-Key: applied once per key, however often sent."""

import time

import procs
import pytest
import webtest

import lite_app
import lite_counters


def value_of(other, name="hits"):
    return other.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0]


def keyed(app, key, status=200, **params):
    params.setdefault("counter", "hits")
    return app.post("/lite/inc", params, headers={"Idempotency-Key": key}, status=status)


def test_a_repeated_key_returns_the_stored_result_and_counts_once(app, other):
    first = keyed(app, "order-1", by="5")
    assert first.json == {"counter": "hits", "value": 5}
    assert "Idempotent-Replayed" not in first.headers
    app.post("/lite/inc", {"counter": "hits"})  # another client, no key
    again = keyed(app, "order-1", by="5")
    assert again.json == {"counter": "hits", "value": 5}
    assert again.headers["Idempotent-Replayed"] == "true"
    assert value_of(other) == 6
    assert keyed(app, "order-2", by="5").json["value"] == 11


def test_a_key_reused_for_another_increment_is_422_and_changes_nothing(app, other):
    keyed(app, "k1", by="2")
    res = keyed(app, "k1", by="3", status=422)
    assert res.json == {"error": "Idempotency-Key already used to add 2 to hits"}
    keyed(app, "k1", counter="misses", by="2", status=422)
    assert (value_of(other), value_of(other, "misses")) == (2, 0)


@pytest.mark.parametrize("key", ["", " ", "a b", "é", "k" * 129, "a/b", "x\ty"])
def test_a_malformed_key_is_400_and_changes_nothing(app, other, key):
    res = keyed(app, key, status=400)
    assert "Idempotency-Key" in res.json["error"]
    assert value_of(other) == 0


def test_a_failed_increment_stores_no_key(app, other):
    keyed(app, "k-missing", counter="nope", status=404)
    other.execute(f"UPDATE counters SET value = {lite_counters.MAX_INTEGER} WHERE name = 'hits'")
    keyed(app, "k-full", status=409)
    other.execute("UPDATE counters SET value = 0 WHERE name = 'hits'")
    assert keyed(app, "k-full").json["value"] == 1  # the key was not used up
    assert other.execute("SELECT count(*) FROM lite_idempotency_keys").fetchone()[0] == 1


def test_an_expired_key_applies_again(app, other):
    keyed(app, "old")
    other.execute(
        "UPDATE lite_idempotency_keys SET created_at = ? WHERE key = 'old'",
        (time.time() - lite_counters.IDEMPOTENCY_TTL_S - 1,),
    )
    assert keyed(app, "old").json["value"] == 2  # applied again, stored anew
    again = keyed(app, "old")
    assert (again.json["value"], again.headers["Idempotent-Replayed"]) == (2, "true")
    assert value_of(other) == 2


def test_expired_keys_are_pruned_in_bounded_batches(app, other, monkeypatch):
    keyed(app, "fresh-0")  # makes the keys' table; prunes nothing for PRUNE_INTERVAL_S
    expired = time.time() - lite_counters.IDEMPOTENCY_TTL_S - 10
    other.executemany(
        "INSERT INTO lite_idempotency_keys VALUES (?, 'hits', 1, 1, ?)",
        [(f"e{i}", expired) for i in range(lite_counters.PRUNE_BATCH * 2 + 7)],
    )
    count = "SELECT count(*) FROM lite_idempotency_keys"
    keyed(app, "fresh-1")  # within PRUNE_INTERVAL_S: no pruning
    assert other.execute(count).fetchone()[0] == lite_counters.PRUNE_BATCH * 2 + 7 + 2
    monkeypatch.setattr(lite_counters, "PRUNE_INTERVAL_S", 0)
    keyed(app, "fresh-2")
    assert other.execute(count).fetchone()[0] == lite_counters.PRUNE_BATCH + 7 + 3
    keyed(app, "fresh-3")
    keyed(app, "fresh-4")
    assert other.execute(count).fetchone()[0] == 5  # only the live keys are left


def _send_keys(db_path, config_path, keys, start):
    app = webtest.TestApp(lite_app.make_app(db_path=db_path, config_path=config_path))
    start.wait(60)
    values = []
    for key in keys:
        res = app.post("/lite/inc", {"counter": "hits"}, headers={"Idempotency-Key": key})
        values.append(res.json["value"])
    return values


@pytest.mark.slow
def test_the_same_keys_from_20_processes_at_once_count_once_each(db_path, config_path, app, other):
    app.get("/lite/get")
    keys = [f"key-{i}" for i in range(50)]
    start = procs.event()
    running = procs.start(_send_keys, [(db_path, str(config_path), keys, start)] * 20)
    start.set()
    results = procs.finish(*running, timeout_s=120)
    assert value_of(other) == 50
    # Every process got, for each key, the one value that key produced.
    assert all(values == results[0] for values in results)
    assert sorted(results[0]) == list(range(1, 51))
