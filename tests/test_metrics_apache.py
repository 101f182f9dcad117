"""/metrics under the real Apache: 20 daemons share PROMETHEUS_MULTIPROC_DIR
(set by serve.sh in their process environment); while 20 clients increment,
every daemon is SIGKILLed twice (mod_wsgi starts new ones) and no total read
from /metrics ever falls; the requests it counts match what clients saw, less
at most those answered in the publish period before each kill."""

import itertools
import os
import signal
import time
import urllib.request

import history
import pytest
from prometheus_client.parser import text_string_to_metric_families

import lite_metrics

pytestmark = [pytest.mark.apache, pytest.mark.slow]

GAUGES = ("lite_db_bytes", "lite_db_wal_bytes", "lite_processes")
PUBLISHER_LATE_S = 0.5  # 20 daemons and 20 clients on 2 cores


def scrape(dep):
    with urllib.request.urlopen(dep.base + "/metrics", timeout=30) as res:
        assert res.status == 200
        text = res.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def inc_200(scrape_):
    key = (("method", "POST"), ("route", "/lite/inc"), ("status", "200"))
    return scrape_.get(("lite_http_requests_total", key), 0)


def test_totals_never_fall_when_every_daemon_is_killed_under_load(deployment):
    metrics_dir = os.path.join(deployment.home, "apache", "metrics")
    daemon = deployment.daemons()[0]
    with open(f"/proc/{daemon}/environ", "rb") as f:  # the process's own environment
        assert f"PROMETHEUS_MULTIPROC_DIR={metrics_dir}".encode() in f.read().split(b"\0")
    assert os.stat(metrics_dir).st_uid == os.stat(deployment.db).st_uid  # the daemon user's
    before_value = deployment.value()
    first = scrape(deployment)
    wait = history.start(deployment.port, seconds=7.0)
    scrapes, killed, kills = [first], 0, []
    for round_ in range(2):
        time.sleep(2.0)
        began = time.monotonic()
        for pid in deployment.daemons():
            os.kill(pid, signal.SIGKILL)  # mod_wsgi starts new ones
            killed += 1
        kills.append((began, time.monotonic()))
        deadline = time.monotonic() + 1.0 + round_
        while time.monotonic() < deadline:
            scrapes.append(scrape(deployment))
    load = wait()
    time.sleep(1.0)
    scrapes.append(scrape(deployment))
    fell = []
    for earlier, later in itertools.pairwise(scrapes):
        fell += [
            (key, value, later.get(key))
            for key, value in earlier.items()
            if key[0] not in GAUGES and later.get(key, 0) < value
        ]
    assert fell == []
    assert killed >= 40
    after_value = deployment.value()
    load.check(before_value, after_value)
    counted = inc_200(scrapes[-1]) - inc_200(first)
    # Each acknowledged increment was counted before its response left, and
    # published within PUBLISH_S (late by at most PUBLISHER_LATE_S on this
    # loaded machine): a kill loses only those answered in that window
    # before it. A daemon killed between counting and answering adds one
    # the client missed.
    window = lite_metrics.PUBLISH_S + PUBLISHER_LATE_S
    unpublished = sum(
        1
        for _, ended, _, ok in load.timeline
        if ok and any(began - window < ended < done + window for began, done in kills)
    )
    assert len(load.ok) - unpublished <= counted <= len(load.ok) + killed
    assert scrapes[-1][("lite_processes", ())] <= 20
    names = os.listdir(metrics_dir)
    assert "counter_archive.db" in names  # the killed daemons' counts, folded
    assert len([n for n in names if n.startswith("counter_")]) <= 20 + 1
