"""Input lite does not read is refused, not guessed at: 415 for a body that is
not a form, 400 for a POST parameter lite does not know or a malformed header
or body, and never a 500 — whatever the headers, content type and bytes."""

import io
import json
import string
import wsgiref.util

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FORM = "application/x-www-form-urlencoded"


def value_of(other, counter="hits"):
    return other.execute("SELECT value FROM counters WHERE name = ?", (counter,)).fetchone()[0]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"counter": "hits"}'),
        ("text/plain", b"counter=hits"),
        ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data"),
        ("application/x-www-form-urlencoded-but-not", b"counter=hits"),
    ],
)
def test_a_body_that_is_not_a_form_is_415_and_changes_nothing(app, other, content_type, body):
    res = app.post("/lite/inc", body, content_type=content_type, status=415)
    assert res.json == {"error": f"send the parameters as {FORM}, or in the query string"}
    assert value_of(other) == 0


def test_a_form_with_a_charset_or_other_case_is_a_form(app, other):
    app.post("/lite/inc", b"counter=hits", content_type=f"{FORM}; charset=UTF-8", status=200)
    app.post("/lite/inc", b"counter=hits", content_type="Application/X-WWW-Form-Urlencoded")
    assert value_of(other) == 2


@pytest.mark.parametrize("body", [b"Counter=hits", b"counter=hits&By=2", b"count=hits", b"x"])
def test_a_post_naming_an_unknown_parameter_is_400_and_changes_nothing(app, other, body):
    res = app.post("/lite/inc", body, content_type=FORM, status=400)
    assert "unknown parameter" in res.json["error"]
    app.post("/lite/inc?Counter=hits", status=400)
    app.post("/lite", b"counter=hits&x=1", content_type=FORM, status=400)
    assert value_of(other) == 0


def test_a_get_ignores_unknown_query_parameters(app):
    assert app.get("/lite/get?counter=hits&_=12345", status=200).json["value"] == 0


@pytest.mark.parametrize("header", ["Origin", "Referer"])
@pytest.mark.parametrize("value", ["http://[::1", "http://[zz]/x", "http://h:99999/", "%%%"])
def test_a_malformed_origin_or_referer_is_refused_not_a_500(app, other, header, value):
    res = app.post(
        "/lite/inc", b"counter=hits", content_type=FORM, headers={header: value}, status=(400, 403)
    )
    assert "error" in res.json
    assert value_of(other) == 0


def _call(app, method, path, body=b"", **environ):
    """A raw WSGI call (WebTest would fix Content-Length): (status, headers, body, errors)."""
    env = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        "CONTENT_LENGTH": str(len(body)),
    }
    env.update(environ)
    wsgiref.util.setup_testing_defaults(env)
    seen = {}
    out = b"".join(
        app.app(env, lambda status, headers, exc_info=None: seen.update(s=status, h=headers))
    )
    return int(seen["s"].split()[0]), dict(seen["h"]), out.decode("latin-1"), env["wsgi.errors"]


def test_a_body_shorter_than_its_content_length_is_400(app, other):
    status, _, body, _ = _call(
        app, "POST", "/lite/inc", b"counter=hits", CONTENT_LENGTH="100", CONTENT_TYPE=FORM
    )
    assert status == 400 and "Content-Length" in json.loads(body)["error"]
    assert value_of(other) == 0


@pytest.mark.parametrize("length", ["\u00b2", "-1", "1e3", "0x10", "9" * 30])
def test_a_content_length_that_is_not_a_number_is_400(app, other, length):
    status, _, body, errors = _call(
        app, "POST", "/lite/inc", b"counter=hits", CONTENT_LENGTH=length, CONTENT_TYPE=FORM
    )
    assert (status, json.loads(body)) == (400, {"error": "Content-Length: not a number"})
    assert not errors.getvalue()
    assert value_of(other) == 0


def test_a_body_that_cannot_be_read_is_400(app, other):
    class Broken(io.BytesIO):
        def read(self, *args):
            raise OSError("client gone")

    status, _, body, _ = _call(
        app, "POST", "/lite/inc", CONTENT_LENGTH="12", CONTENT_TYPE=FORM, **{"wsgi.input": Broken()}
    )
    assert (status, json.loads(body)) == (400, {"error": "the request body could not be read"})
    assert value_of(other) == 0


ROUTES = [
    ("GET", "/lite"),
    ("POST", "/lite"),
    ("GET", "/lite/get"),
    ("POST", "/lite/inc"),
    ("GET", "/lite/health"),
    ("GET", "/lite/stats"),
    ("GET", "/lite/inc"),
]
HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=255), max_size=40)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    route=st.sampled_from(ROUTES),
    content_type=st.one_of(
        st.none(),
        st.sampled_from([FORM, "multipart/form-data", "text/plain", f"{FORM}; charset=latin-1"]),
        HEADER_TEXT,
    ),
    origin=st.one_of(st.none(), HEADER_TEXT, st.sampled_from(["http://localhost:80", "http://["])),
    key=st.one_of(st.none(), HEADER_TEXT),
    body=st.one_of(
        st.binary(max_size=200),
        st.text(alphabet=string.ascii_letters + "=&%+;", max_size=60).map(str.encode),
    ),
    length=st.one_of(st.none(), st.integers(min_value=-2, max_value=300).map(str), HEADER_TEXT),
)
def test_no_input_gives_a_500_or_a_traceback(app, route, content_type, origin, key, body, length):
    method, path = route
    environ = {}
    if content_type is not None:
        environ["CONTENT_TYPE"] = content_type
    if origin is not None:
        environ["HTTP_ORIGIN"] = origin
    if key is not None:
        environ["HTTP_IDEMPOTENCY_KEY"] = key
    if length is not None:
        environ["CONTENT_LENGTH"] = length
    status, headers, text, errors = _call(app, method, path, body, **environ)
    assert status != 500, text
    assert "Traceback" not in text and not errors.getvalue(), errors.getvalue()
    if status == 503:
        assert headers["Retry-After"] and json.loads(text)["error"]
