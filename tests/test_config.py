"""lite_config: config.ini applied exactly once per change, bad versions never."""

import logging
import os
import re
import threading
import time

import pytest
from conftest import CONFIG, record_stats, settle, write_config

import lite_config
import lite_db


def counters(other):
    return dict(other.execute("SELECT name, value FROM counters ORDER BY position"))


def audit_count(other):
    return other.execute("SELECT count(*) FROM lite_config_audit").fetchone()[0]


def test_first_look_applies_the_config(cur, other, config_path, watcher):
    assert watcher.refresh(cur) == "applied"
    assert counters(other) == {"hits": 0, "misses": 0}
    row = other.execute("SELECT fingerprint, pid FROM lite_config_audit").fetchone()
    assert row[1] == os.getpid()
    assert str(os.stat(config_path).st_mtime_ns) in row[0]


def test_an_unchanged_file_costs_no_database_work(cur, other, config_path, watcher):
    watcher.refresh(cur)
    before = lite_db.figures()
    assert watcher.refresh(cur) == "unchanged"
    after = lite_db.figures()
    assert (after["reads"], after["writes"]) == (before["reads"], before["writes"])
    assert audit_count(other) == 1


@pytest.mark.parametrize("change", ["touched", "written in place", "replaced by rename"])
def test_an_unchanged_file_costs_no_stat_and_a_change_is_seen_at_once(
    cur, other, config_path, watcher, monkeypatch, change
):
    """The connection's ChangeWatch answers for the file: no stat until it changes."""
    assert watcher.refresh(cur) == "applied"
    looked = record_stats(monkeypatch)
    assert [watcher.refresh(cur) for _ in range(3)] == ["unchanged"] * 3
    assert looked == []
    monkeypatch.undo()
    if change == "touched":
        settle(config_path, age_s=30)
    elif change == "written in place":
        with open(config_path, "r+") as f:  # the same file, the same size
            text = f.read()
            f.seek(0)
            f.write(text.replace("hits = 0", "hits = 5"))
        settle(config_path, age_s=30)
    else:
        new = config_path.with_name("config.ini.new")
        write_config(new, CONFIG.replace("hits = 0", "hits = 5"), age_s=30)
        os.replace(new, config_path)
    assert watcher.refresh(cur) == "applied"  # the next look, with no wait
    assert audit_count(other) == 2
    assert watcher.refresh(cur) == "unchanged"


def test_a_file_renamed_over_the_config_is_watched_in_its_turn(cur, other, config_path, watcher):
    """After a rename over config.ini, a change in place of the new file is seen too,
    even while the old one is still open (its watch then ends only when it is closed)."""
    assert watcher.refresh(cur) == "applied"
    with open(config_path) as held:  # the old file stays open
        new = config_path.with_name("config.ini.new")
        write_config(new, CONFIG.replace("hits = 0", "hits = 5"), age_s=30)
        os.replace(new, config_path)
        assert watcher.refresh(cur) == "applied"
        assert watcher.refresh(cur) == "unchanged"
        with open(config_path, "r+") as f:  # the new file, changed in place
            text = f.read()
            f.seek(0)
            f.write(text.replace("hits = 5", "hits = 6"))
        settle(config_path, age_s=20)
        assert watcher.refresh(cur) == "applied"
        assert held.read() == CONFIG
    assert counters(other)["hits"] == 6


def test_a_version_applied_by_another_process_is_not_applied_again(
    cur, other, config_path, watcher
):
    assert watcher.refresh(cur) == "applied"
    watcher = lite_config.ConfigWatcher(str(config_path))  # as a second process sees it
    assert watcher.refresh(cur) == "current"
    assert audit_count(other) == 1


def test_a_touch_is_a_new_version_that_resets_every_counter(cur, other, config_path, watcher):
    watcher.refresh(cur)
    other.execute("UPDATE counters SET value = 42")
    settle(config_path, age_s=30)  # only the mtime changes
    assert watcher.refresh(cur) == "applied"
    assert audit_count(other) == 2
    assert counters(other) == {"hits": 0, "misses": 0}
    # Once per version: the same version seen again resets nothing.
    other.execute("UPDATE counters SET value = 7")
    watcher = lite_config.ConfigWatcher(str(config_path))  # as another process sees it
    assert watcher.refresh(cur) == "current"
    assert counters(other) == {"hits": 7, "misses": 7}


def test_an_older_mtime_is_a_change_too(cur, other, config_path, watcher):
    watcher.refresh(cur)
    settle(config_path, age_s=3600)  # compared with !=, never >
    assert watcher.refresh(cur) == "applied"


def test_every_counter_is_set_new_ones_added_removed_ones_deleted(cur, other, config_path, watcher):
    watcher.refresh(cur)
    other.execute("UPDATE counters SET value = 42")
    write_config(config_path, "[counters]\nviews = 5\nmisses = 0\n")
    assert watcher.refresh(cur) == "applied"
    # misses is configured 0 as before: it is set to 0 all the same.
    assert counters(other) == {"views": 5, "misses": 0}
    assert [row[0] for row in other.execute("SELECT name FROM counters ORDER BY position")] == [
        "views",
        "misses",
    ]


def test_a_recent_file_waits_until_it_has_settled(cur, other, config_path, watcher):
    watcher.refresh(cur)
    config_path.write_text("[counters]\nhits = 3\n")  # mtime: now
    assert watcher.refresh(cur) == "unsettled"
    assert counters(other) == {"hits": 0, "misses": 0}
    time.sleep(lite_config.SETTLE_S + 0.1)
    assert watcher.refresh(cur) == "applied"
    assert counters(other) == {"hits": 3}


def test_a_new_database_applies_a_recent_file_at_once(cur, other, config_path, watcher):
    config_path.write_text("[counters]\nhits = 3\n")  # mtime: now
    assert watcher.refresh(cur) == "applied"
    assert counters(other) == {"hits": 3}


def test_a_new_database_waits_for_a_recent_file_that_does_not_parse(
    cur, other, config_path, watcher
):
    config_path.write_text("[counters]\nhits = ")  # mtime: now, half written
    assert watcher.refresh(cur) == "unsettled"
    assert other.execute("SELECT count(*) FROM lite_config_state").fetchone()[0] == 0
    config_path.write_text("[counters]\nhits = 3\n")
    assert watcher.refresh(cur) == "applied"
    assert counters(other) == {"hits": 3}


def test_a_file_that_changes_while_read_is_not_applied(
    cur, other, config_path, monkeypatch, watcher
):
    watcher.refresh(cur)
    write_config(config_path, "[counters]\nhits = 3\n")
    real_stat_key = lite_config._stat_key
    calls = []

    def stat_key_changing_mid_read(path):
        calls.append(path)
        if len(calls) == 2:  # the look after reading: someone wrote meanwhile
            write_config(config_path, "[counters]\nhits = 4\nmisses = 1\n", age_s=50)
        return real_stat_key(path)

    monkeypatch.setattr(lite_config, "_stat_key", stat_key_changing_mid_read)
    assert watcher.refresh(cur) == "unsettled"
    assert counters(other) == {"hits": 0, "misses": 0}
    assert watcher.refresh(cur) == "applied"
    assert counters(other) == {"hits": 4, "misses": 1}


BAD_CONFIGS = {
    "empty": b"",
    "half written": b"[coun",
    "no section": b"hits = 1\n",
    "other section": b"[counters]\nhits = 1\n[extra]\nx = 1\n",
    "no counters": b"[counters]\n",
    "duplicate": b"[counters]\nhits = 1\nhits = 2\n",
    "not a number": b"[counters]\nhits = one\n",
    "float": b"[counters]\nhits = 1.5\n",
    "too big": b"[counters]\nhits = 9223372036854775808\n",
    "unicode digits": "[counters]\nhits = \u0661\u0662\n".encode(),
    "bad name": b"[counters]\nHits = 1\n",
    "name with space": b"[counters]\nmy hits = 1\n",
    "not utf-8": b"[counters]\nhits = 1\n\xff\xfe\n",
    "oversized": b"[counters]\nhits = 1\n" + b"#" * lite_config.CONFIG_MAX_BYTES,
    "too many": b"[counters]\n"
    + b"".join(b"c%d = 0\n" % i for i in range(lite_config.MAX_COUNTERS + 1)),
}


@pytest.mark.parametrize("content", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_a_bad_version_is_never_applied_and_logged_once(
    cur, other, config_path, content, caplog, watcher
):
    watcher.refresh(cur)
    config_path.write_bytes(content)
    settle(config_path)
    with caplog.at_level(logging.ERROR, logger="lite_config"):
        assert watcher.refresh(cur) == "rejected"
        for _ in range(5):  # 5 more processes see the same bad version
            watcher = lite_config.ConfigWatcher(str(config_path))
            assert watcher.refresh(cur) == "rejected"
    assert len(caplog.records) == 1
    assert counters(other) == {"hits": 0, "misses": 0}
    assert audit_count(other) == 1
    # A good version after the bad one is applied as usual.
    write_config(config_path, "[counters]\nhits = 5\n")
    assert watcher.refresh(cur) == "applied"
    assert counters(other) == {"hits": 5}


def test_a_missing_or_unreadable_file_keeps_the_last_good_config(
    cur, other, config_path, caplog, watcher
):
    watcher.refresh(cur)
    config_path.unlink()
    with caplog.at_level(logging.ERROR, logger="lite_config"):
        assert watcher.refresh(cur) == "rejected"
        assert watcher.refresh(cur) == "unchanged"
    assert "cannot read" in caplog.text
    config_path.mkdir()  # exists, but cannot be read as a file
    settle(config_path)
    assert watcher.refresh(cur) == "rejected"
    assert counters(other) == {"hits": 0, "misses": 0}
    assert len(caplog.records) == 2


def test_database_failure_raises_and_is_retried_on_the_next_request(
    db_path, other, config_path, monkeypatch, watcher
):
    lite_db.close_all()
    monkeypatch.setattr(lite_db, "LOCK_BUDGET_MS", 100)
    cur = lite_db.cursor(db_path)
    watcher = lite_config.ConfigWatcher(str(config_path))
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(lite_db.Unavailable):
        watcher.refresh(cur)
    other.execute("ROLLBACK")
    assert watcher.refresh(cur) == "applied"
    cur.close()


def test_apply_now_applies_a_fresh_file_at_once(db_path, other, config_path):
    config_path.write_text(CONFIG.replace("hits = 0", "hits = 9"))  # fresh mtime
    assert lite_config.apply_now(db_path, str(config_path)) == "applied"
    assert counters(other) == {"hits": 9, "misses": 0}
    assert lite_config.apply_now(db_path, str(config_path)) == "current"


def test_applied_version_names_fingerprint_time_and_pid(cur, config_path, watcher):
    assert lite_config.applied_version(cur) is None
    watcher.refresh(cur)
    version = lite_config.applied_version(cur)
    assert version["applied_by"] == os.getpid()
    assert abs(version["applied_at"] - time.time()) < 60


def test_a_stale_read_never_puts_an_older_version_back(
    cur, other, config_path, monkeypatch, watcher
):
    watcher.refresh(cur)
    write_config(config_path, "[counters]\nhits = 1\n", age_s=50)  # version A
    real_parse = lite_config.parse

    def parse_while_another_process_applies_b(data):
        result = real_parse(data)  # this process has read version A ...
        monkeypatch.setattr(lite_config, "parse", real_parse)
        write_config(config_path, "[counters]\nhits = 2\n", age_s=40)  # ... B replaces it
        # as another process, which applies B
        assert lite_config.ConfigWatcher(str(config_path)).refresh(cur) == "applied"
        return result

    monkeypatch.setattr(lite_config, "parse", parse_while_another_process_applies_b)
    assert watcher.refresh(cur) == "unsettled"
    assert counters(other) == {"hits": 2}
    assert audit_count(other) == 2
    assert watcher.refresh(cur) == "current"  # B, applied by the other process
    assert watcher.refresh(cur) == "unchanged"


def test_a_byte_order_mark_is_accepted(cur, other, config_path, watcher):
    config_path.write_bytes(b"\xef\xbb\xbf[counters]\nhits = 4\n")
    settle(config_path)
    assert watcher.refresh(cur) == "applied"
    assert counters(other) == {"hits": 4}


def test_a_fifo_in_its_place_is_refused_without_blocking(cur, other, config_path, watcher):
    watcher.refresh(cur)
    config_path.unlink()
    os.mkfifo(config_path)
    outcome = []
    looking = threading.Thread(target=lambda: outcome.append(watcher.refresh(cur)))
    looking.start()
    looking.join(5)
    assert not looking.is_alive(), "refresh blocked on a FIFO"
    assert outcome == ["rejected"]
    assert counters(other) == {"hits": 0, "misses": 0}


def test_a_file_dated_in_the_future_is_applied_once_it_reads_the_same(
    cur, other, config_path, watcher, caplog
):
    watcher.refresh(cur)
    config_path.write_text("[counters]\nhits = 8\n")
    settle(config_path, age_s=-3600)  # an hour ahead
    with caplog.at_level(logging.INFO, logger="lite_config"):
        assert watcher.refresh(cur) == "unsettled"
        assert watcher.refresh(cur) == "unsettled"
        time.sleep(lite_config.SETTLE_S + 0.1)
        assert watcher.refresh(cur) == "applied"
        assert watcher.refresh(cur) == "unchanged"
    assert counters(other) == {"hits": 8}
    future = [r.getMessage() for r in caplog.records if "in the future" in r.getMessage()]
    assert len(future) == 1  # once, by the process that applied it
    assert re.search(r"is dated 3[56]\d\d s in the future", future[0])  # about an hour


def test_every_disappearance_is_logged_once(cur, other, config_path, watcher, caplog):
    watcher.refresh(cur)
    with caplog.at_level(logging.ERROR, logger="lite_config"):
        for _ in range(2):
            kept = config_path.read_bytes()
            stamp = os.stat(config_path).st_mtime_ns
            config_path.unlink()
            assert watcher.refresh(cur) == "rejected"
            other_process = lite_config.ConfigWatcher(str(config_path))
            assert other_process.refresh(cur) == "rejected"  # known: not logged again
            config_path.write_bytes(kept)  # the same version comes back
            os.utime(config_path, ns=(stamp, stamp))
            assert watcher.refresh(cur) == "current"
    missing = [r for r in caplog.records if "No such file" in r.getMessage()]
    assert len(missing) == 2
