"""Operating the real deployment: /lite/stats of all 20 daemons, /lite/health,
backup under write load and restore, and the /lite page in a real browser."""

import json
import os
import pathlib
import sqlite3
import subprocess
import time

import deploy
import history
import pytest

pytestmark = [pytest.mark.apache, pytest.mark.slow]

ARTIFACTS = os.path.join(deploy.ROOT, "test-artifacts")


def _stats(dep):
    status, _, body = dep.request("/lite/stats")
    assert status == 200
    return json.loads(body)


def test_stats_sum_the_figures_of_every_daemon(deployment):
    before = _stats(deployment)
    load = history.run(deployment.port, clients=20, requests_each=20)
    assert len(load.ok) == 400
    stats = _stats(deployment)
    assert stats["answered_by"] in deployment.daemons()
    assert 10 <= stats["process_count"] <= 20
    totals = stats["totals"]
    assert totals["requests"] == before["totals"]["requests"] + 1 + 400  # `before` counted too
    assert totals["writes"] >= before["totals"]["writes"] + 400
    assert totals["write_failures"] == before["totals"]["write_failures"] == 0
    database = stats["database"]
    assert database["journal_mode"] == "wal"
    assert database["synchronous"] == "NORMAL"
    assert database["busy_timeout_ms"] == 5 and database["lock_budget_ms"] == 3000
    assert database["wal_bytes"] > 0 and database["page_count"] > 0


def test_health_is_ok(deployment):
    status, _, body = deployment.request("/lite/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_backup_under_write_load_then_restore(deployment, tmp_path):
    backup = str(tmp_path / "lite.db")
    before = deployment.value()
    wait = history.start(deployment.port, clients=10, seconds=8)
    time.sleep(3)
    during = deployment.value()
    made = deployment.script("serve.sh", "backup", backup)
    after = deployment.value()
    load = wait()
    assert made.returncode == 0, made.stdout + made.stderr
    load.check(before, deployment.value())
    assert not load.failed and not load.unknown, (load.statuses, load.unknown[:3])
    copy = sqlite3.connect(backup)
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    copied = copy.execute("SELECT value FROM counters WHERE name = 'hits'").fetchone()[0]
    audit_in_backup = copy.execute("SELECT count(*) FROM lite_config_audit").fetchone()[0]
    copy.close()
    assert before < during <= copied <= after
    assert os.stat(backup).st_uid == 0
    assert deployment.script("serve.sh", "backup", backup).returncode == 1  # never overwrites

    refused = deployment.script("serve.sh", "restore", backup)
    assert refused.returncode == 1 and "stop first" in refused.stderr
    assert deployment.script("serve.sh", "stop").returncode == 0
    restored = deployment.script("serve.sh", "restore", backup)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    started = deployment.script("serve.sh", "start")
    assert started.returncode == 0, started.stdout + started.stderr
    # config.ini is the one the backup was taken with: the restored values stay.
    status, _, body = deployment.request("/lite/get?counter=hits")
    assert (status, json.loads(body)["value"]) == (200, copied)
    status, _, _ = deployment.request("/lite/inc", data=b"counter=hits")
    assert status == 200

    # config.ini changed since the backup: a new version, applied at the start.
    assert deployment.script("serve.sh", "stop").returncode == 0
    assert deployment.script("serve.sh", "restore", backup).returncode == 0
    original = pathlib.Path(deployment.config).read_text()
    deployment.write_config("[counters]\nhits = 77\nmisses = 0\n")
    try:
        started = deployment.script("serve.sh", "start")
        assert started.returncode == 0, started.stdout + started.stderr
        status, _, body = deployment.request("/lite/get?counter=hits")
        assert (status, json.loads(body)["value"]) == (200, 77)
        assert len(deployment.audit()) == audit_in_backup + 1
    finally:
        deployment.write_config(original)


def _chromium(profile):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",  # this machine has no network
        "--disable-component-update",
        "--disable-sync",
        "--window-size=900,1100",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def test_the_page_in_a_real_browser(deployment, tmp_path):
    """Load /lite in Chromium, click +1, see the new value; keep a screenshot."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chromium(tmp_path / "lite-chromium-profile")
    try:
        browser.get(deployment.base + "/lite")
        value = int(browser.find_element(By.ID, "value-misses").text)
        browser.find_element(By.ID, "inc-misses").click()
        # The click loads a new page (303): an element found on the old one
        # may go stale while it is read (StaleElementReference, or Chromium's
        # "Node with given id does not belong to the document"); the wait then
        # looks again, and fails after 10 s if the value never comes.
        WebDriverWait(browser, 10, ignored_exceptions=[WebDriverException]).until(
            lambda b: b.find_element(By.ID, "value-misses").text == str(value + 1)
        )
        assert deployment.value("misses") == value + 1
        assert browser.current_url == deployment.base + "/lite"  # the 303 came back
        # The figures refresh themselves every 2 s.
        WebDriverWait(browser, 10, ignored_exceptions=[WebDriverException]).until(
            lambda b: b.find_element(By.ID, "refreshed").text.startswith("updated")
        )
        writes = browser.find_element(By.CSS_SELECTOR, '[data-stat="totals.writes"]')
        assert int(writes.text) >= 1
        assert "Config version" in browser.find_element(By.ID, "config-version").text
        os.makedirs(ARTIFACTS, exist_ok=True)
        assert browser.save_screenshot(os.path.join(ARTIFACTS, "lite-page.png"))
        logs = browser.get_log("browser")
        assert not [entry for entry in logs if entry["level"] == "SEVERE"], logs
    finally:
        browser.quit()


def test_no_browser_process_is_left(deployment):
    """quit() stopped chromedriver and Chromium: none of ours is left."""
    ours = subprocess.run(
        ["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True
    ).stdout
    assert "lite-chromium-" not in ours
