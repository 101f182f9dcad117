"""Property-based tests over the request parameters: whatever a client sends,
the answer is a clear 2xx or 4xx, never a 500, and only a 2xx changes data."""

import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
import webtest
from conftest import CONFIG, write_config
from hypothesis import given, settings
from hypothesis import strategies as st

import lite_app
import lite_counters

_workdir = Path(tempfile.mkdtemp(prefix="lite-properties-"))
write_config(_workdir / "config.ini", CONFIG)
DB_PATH = str(_workdir / "lite.db")
APP = webtest.TestApp(
    lite_app.make_app(
        db_path=DB_PATH, config_path=str(_workdir / "config.ini"), create_database=True
    )
)
APP.get("/lite/get")  # creates the database, applies the config


@pytest.fixture(scope="module", autouse=True)
def _remove_workdir():
    yield
    shutil.rmtree(_workdir, ignore_errors=True)


# Texts that look like numbers in every way Python's int() or a sloppy
# parser might accept, and plain arbitrary text.
numberish = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.from_regex(r"\A[ +\-]?[0-9_]{0,25}(\.[0-9]*)?(e[0-9]+)?[ ]?\Z"),
    st.sampled_from(["١٢", "\uff11", "½", "0x10", "1e3", "Infinity", "NaN", "", " ", "\x00"]),
    st.text(max_size=30),
)
names = st.one_of(
    st.sampled_from(["hits", "misses", "nope", "HITS", "hits ", "../hits", "a" * 65]),
    st.from_regex(r"\A[a-z0-9_-]{1,64}\Z"),
    st.text(max_size=70),
)


def _values():
    conn = sqlite3.connect(DB_PATH)
    try:
        return dict(conn.execute("SELECT name, value FROM counters"))
    finally:
        conn.close()


def _check_body(res):
    body = res.json
    assert isinstance(body, dict)
    text = res.text
    assert "Traceback" not in text and "sqlite" not in text.lower() and "SELECT" not in text
    return body


@settings(max_examples=300, deadline=None)
@given(counter=names, by=numberish, by_in_query=st.booleans())
def test_any_increment_is_2xx_or_a_clear_4xx(counter, by, by_in_query):
    before = _values()
    params = {"counter": counter, "by": by}
    url = "/lite/inc"
    if by_in_query:
        url += "?" + webtest.utils.urlencode({"by": by})
        del params["by"]
    res = APP.post(url, params, status="*", expect_errors=True)
    body = _check_body(res)
    after = _values()
    if res.status_int == 200:
        step = int(by)
        assert by.isascii() and by.isdigit() and 1 <= step <= lite_counters.MAX_BY
        assert after[counter] == before[counter] + step == body["value"]
        assert {k: v for k, v in after.items() if k != counter} == {
            k: v for k, v in before.items() if k != counter
        }
    else:
        assert res.status_int in (400, 404, 409), res
        assert isinstance(body["error"], str) and body["error"]
        assert after == before


@settings(max_examples=200, deadline=None)
@given(counter=names)
def test_any_read_is_200_or_a_clear_4xx(counter):
    res = APP.get("/lite/get", {"counter": counter}, status="*", expect_errors=True)
    body = _check_body(res)
    if res.status_int == 200:
        assert body == {"counter": counter, "value": _values()[counter]}
    else:
        assert res.status_int in (400, 404)


@settings(max_examples=200, deadline=None)
@given(key=st.text(max_size=140).filter(lambda k: "\n" not in k and "\r" not in k))
def test_any_idempotency_key_is_applied_once_or_refused(key):
    before = _values()["hits"]
    header = key.encode("utf-8").decode("latin-1")  # what a client's bytes become in WSGI
    res = APP.post(
        "/lite/inc",
        {"counter": "hits"},
        headers={"Idempotency-Key": header},
        status="*",
        expect_errors=True,
    )
    body = _check_body(res)
    if res.status_int == 200:
        again = APP.post("/lite/inc", {"counter": "hits"}, headers={"Idempotency-Key": header})
        assert again.json == body
        assert _values()["hits"] <= before + 1
    else:
        assert res.status_int == 400 and "Idempotency-Key" in body["error"]
        assert _values()["hits"] == before


def test_the_largest_value_stays_an_exact_integer():
    conn = sqlite3.connect(DB_PATH)
    conn.execute(
        "UPDATE counters SET value = ? WHERE name = 'misses'", (lite_counters.MAX_INTEGER - 3,)
    )
    conn.commit()
    conn.close()
    assert APP.post("/lite/inc", {"counter": "misses", "by": "3"}).json["value"] == 2**63 - 1
    APP.post("/lite/inc", {"counter": "misses"}, status=409)
    assert _values()["misses"] == 2**63 - 1
    assert isinstance(_values()["misses"], int)
