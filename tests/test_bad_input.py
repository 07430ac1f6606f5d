"""Malformed input, generated (hypothesis) and hand-picked, against a real relay process and a
real worker process: never a 5xx, nothing recorded or forwarded, and both stay up."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes.wiring import OWNER, PUBLIC_URL, WORKER_TOKEN, message_params, relay_env, signed_form
from tests.support.processes import child, free_port

EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CONTENT_TYPES = [
    "application/x-www-form-urlencoded",
    "application/json",
    "text/plain",
    "multipart/form-data",
    "application/x-www-form-urlencoded; charset=latin-1",
    "",
]


@dataclass
class Target:
    url: str
    proc: subprocess.Popen[bytes]
    http: httpx.Client
    db: Path

    def inbox_rows(self) -> int:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0])


def wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(400):
        assert proc.poll() is None, "the process died at start-up"
        try:
            if httpx.get(f"{url}/health", timeout=0.5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.025)
    raise AssertionError("never became healthy")


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("relay")
    port = free_port()
    # Nothing listens at the worker or Twilio addresses: a forwarded message would show in the inbox.
    env = relay_env(
        tmp / "relay.sqlite3",
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        PORT=str(port),
        HOST="127.0.0.1",
        WAKE_TIMEOUT_MS="1000",
    )
    with child("relay", env, tmp / "relay.log") as proc, httpx.Client(timeout=10) as http:
        url = f"http://127.0.0.1:{port}"
        wait_up(url, proc)
        yield Target(url, proc, http, tmp / "relay.sqlite3")
        assert proc.poll() is None, "the relay died"
        assert http.get(f"{url}/health").status_code == 200
        assert "Traceback" not in (tmp / "relay.log").read_text()


@given(body=st.binary(max_size=4096), content_type=st.sampled_from(CONTENT_TYPES))
@EXAMPLES
def test_random_webhook_bodies(relay: Target, body: bytes, content_type: str) -> None:
    response = relay.http.post(f"{relay.url}/webhook", content=body, headers={"content-type": content_type})
    assert response.status_code < 500 and response.status_code != 200
    assert relay.inbox_rows() == 0


@given(form=st.dictionaries(st.text(max_size=30), st.text(max_size=200), max_size=12), sign=st.booleans())
@EXAMPLES
def test_random_forms_signed_or_not_are_never_forwarded(relay: Target, form: dict[str, str], sign: bool) -> None:
    headers = signed_form(PUBLIC_URL + "/webhook", form) if sign else {}
    before = relay.inbox_rows()
    response = relay.http.post(f"{relay.url}/webhook", data=form, headers=headers)
    assert response.status_code < 500
    could_be_real = sign and form.get("From", "").removeprefix("whatsapp:") == OWNER and bool(form.get("MessageSid"))
    if not could_be_real:
        assert relay.inbox_rows() == before
    if not sign:
        assert response.status_code in (403, 415)  # an empty form goes without a content type


@given(
    body=st.one_of(
        st.binary(max_size=2048),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
            lambda children: (
                st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=5)
            ),
            max_leaves=20,
        ).map(lambda v: __import__("json").dumps(v).encode()),
    ),
    token=st.sampled_from(["", "wrong", None]),
)
@EXAMPLES
def test_random_callbacks(relay: Target, body: bytes, token: str | None) -> None:
    headers = {"content-type": "application/json"}
    headers["Authorization"] = f"Bearer {WORKER_TOKEN if token is None else token}" if token != "" else ""
    headers = {k: v for k, v in headers.items() if v}
    before = relay.inbox_rows()
    response = relay.http.post(f"{relay.url}/callback/{OWNER}", content=body, headers=headers)
    assert response.status_code in (200, 400, 401, 413, 422)
    if token is not None:
        assert response.status_code == 401 and relay.inbox_rows() == before


@given(name=st.text(max_size=80), raw=st.booleans())
@EXAMPLES
def test_random_image_paths(relay: Target, name: str, raw: bool) -> None:
    path = quote(name, safe="/.%" if raw else "")  # raw keeps traversal sequences as they are
    response = relay.http.get(f"{relay.url}/images/{path}")
    assert response.status_code in (400, 404, 405)


@pytest.mark.parametrize(
    "path",
    [
        "/images/..%2F..%2Fetc%2Fpasswd",
        "/images/%2e%2e%2frelay.sqlite3",
        "/images/relay.sqlite3",
        "/images/../relay.sqlite3",
        "/images//etc/passwd",
        "/images/%00.png",
        "/images/" + "a" * 5000 + ".png",
    ],
)
def test_image_escapes(relay: Target, path: str) -> None:
    response = relay.http.get(relay.url + path)
    assert response.status_code in (400, 404) and b"SQLite" not in response.content


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        pytest.param({"content-type": "application/x-www-form-urlencoded"}, b"Body=" + b"\xc3\x28" * 10, id="bad-utf8"),
        pytest.param({"content-type": "application/x-www-form-urlencoded"}, b"&&&===&&&", id="empty-pairs"),
        pytest.param({"content-type": "application/x-www-form-urlencoded"}, b"x" * 200_000, id="huge"),
    ],
)
def test_hand_picked_webhooks(relay: Target, headers: dict[str, str], body: bytes) -> None:
    try:
        response = relay.http.post(f"{relay.url}/webhook", content=body, headers=headers)
    except httpx.RemoteProtocolError:
        return  # the server may close a connection whose declared length is a lie; it must stay up
    assert 400 <= response.status_code < 500


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 999999999\r\n\r\na=b",
            id="lying-content-length",
        ),
        pytest.param(
            b"POST /webhook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\nzz\r\n",
            id="broken-chunks",
        ),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", id="tls-hello"),
        pytest.param(b"GARBAGE / HTTP/9\r\n\r\n", id="not-http"),
    ],
)
def test_broken_http_does_not_hurt(relay: Target, request_bytes: bytes) -> None:
    host, port = relay.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request_bytes)
        sock.shutdown(socket.SHUT_WR)
        answer = sock.recv(200)
    assert not answer.startswith(b"HTTP/1.1 5")
    assert relay.http.get(f"{relay.url}/health").status_code == 200


def test_replayed_signature_on_another_body(relay: Target) -> None:
    params = message_params("hello")
    headers = signed_form(PUBLIC_URL + "/webhook", params)
    response = relay.http.post(
        f"{relay.url}/webhook", data={**params, "From": "whatsapp:+15550001111x"}, headers=headers
    )
    assert response.status_code == 403
