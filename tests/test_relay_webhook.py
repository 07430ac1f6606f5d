"""The webhook: signatures, allowlist, duplicates, malformed bodies; through the real app."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from fakes.wiring import OWNER, PUBLIC_URL, STRANGER, message_params, signed_form
from tests.support.relay_harness import Stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio


async def test_allowed_message_is_acknowledged_with_empty_twiml_and_reaches_the_worker(stack: Stack) -> None:
    response = await stack.send("add a README")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/xml")
    assert response.text.endswith("<Response />")
    commands = await wait_for(stack.worker.commands, what="command at the worker")
    assert commands[0]["phone"] == OWNER and commands[0]["text"] == "add a README"
    assert stack.worker.calls[0].authorization == "Bearer worker-token-for-tests"
    await wait_for(lambda: "🤖 Working on it..." in stack.twilio.bodies(OWNER), what="working message")


Signer = Callable[[dict[str, str]], dict[str, str]]


@pytest.mark.parametrize(
    "sign",
    [
        pytest.param(lambda p: {}, id="missing"),
        pytest.param(lambda p: {"X-Twilio-Signature": ""}, id="empty"),
        pytest.param(lambda p: {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"}, id="forged"),
        pytest.param(
            lambda p: signed_form(PUBLIC_URL + "/webhook", p, token="another-accounts-token"), id="wrong-token"
        ),
        pytest.param(lambda p: signed_form("http://127.0.0.1/webhook", p), id="signed-for-internal-url"),
        pytest.param(lambda p: signed_form(PUBLIC_URL + "/other", p), id="signed-for-other-path"),
    ],
)
async def test_bad_signature_is_refused_and_nothing_is_recorded(stack: Stack, sign: Signer) -> None:
    params = message_params("rm -rf /")
    response = await stack.post_form(params, headers=sign(params))
    assert response.status_code == 403
    await stack.send("status")  # a good message afterwards is handled alone
    await wait_for(lambda: stack.twilio.messages, what="status reply")
    assert stack.worker.calls == []
    assert len(stack.twilio.messages) == 1


async def test_replayed_signature_with_changed_body_is_refused(stack: Stack) -> None:
    params = message_params("run the tests")
    headers = signed_form(PUBLIC_URL + "/webhook", params)
    tampered = {**params, "Body": "delete everything"}
    response = await stack.http.post(f"{stack.url}/webhook", data=tampered, headers=headers)
    assert response.status_code == 403
    ok = await stack.http.post(f"{stack.url}/webhook", data=params, headers=headers)
    assert ok.status_code == 200
    commands = await wait_for(stack.worker.commands)
    assert [c["text"] for c in commands] == ["run the tests"]


async def test_query_string_is_part_of_the_signed_url(stack: Stack) -> None:
    params = message_params("hello")
    good = signed_form(PUBLIC_URL + "/webhook?v=1", params)
    assert (await stack.http.post(f"{stack.url}/webhook?v=1", data=params, headers=good)).status_code == 200
    assert (await stack.http.post(f"{stack.url}/webhook?v=2", data=params, headers=good)).status_code == 403


async def test_unknown_sender_gets_empty_twiml_and_nothing_happens(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.app")
    response = await stack.send("hello", sender=STRANGER)
    assert response.status_code == 200 and response.text.endswith("<Response />")
    await stack.send("status")
    await wait_for(lambda: stack.twilio.messages)
    assert [m.to for m in stack.twilio.messages] == [f"whatsapp:{OWNER}"]
    assert stack.worker.calls == []
    ignored = [r for r in caplog.records if "not in ALLOWED_PHONE_NUMBERS" in r.getMessage()]
    assert len(ignored) == 1 and STRANGER not in ignored[0].getMessage()


async def test_duplicate_message_sid_is_processed_once(stack: Stack) -> None:
    params = message_params("build it")
    for _ in range(3):
        assert (await stack.post_form(params)).status_code == 200
    await wait_for(stack.worker.commands)
    await stack.send("status")
    await wait_for(lambda: any("Working" in b for b in stack.twilio.bodies()) and len(stack.twilio.messages) >= 2)
    assert len(stack.worker.commands()) == 1


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        pytest.param("application/json", b'{"Body": "hi"}', 415, id="json"),
        pytest.param("text/plain", b"hello", 415, id="text"),
        pytest.param("application/x-www-form-urlencoded", b"Body=%ff%fe", 400, id="bad-utf8-escape"),
        pytest.param("application/x-www-form-urlencoded", b"\xff\xfe\x00", 400, id="bad-utf8-bytes"),
        pytest.param("application/x-www-form-urlencoded", b"Body=" + b"a" * 70_000, 413, id="huge"),
        pytest.param("application/x-www-form-urlencoded", b"", 403, id="empty-unsigned"),
    ],
)
async def test_malformed_bodies_get_a_4xx(stack: Stack, content_type: str, body: bytes, status: int) -> None:
    response = await stack.http.post(f"{stack.url}/webhook", content=body, headers={"content-type": content_type})
    assert response.status_code == status


async def test_signed_body_missing_fields_is_a_400(stack: Stack) -> None:
    params = {"Body": "hi", "AccountSid": "AC1"}
    response = await stack.post_form(params)
    assert response.status_code == 400
    assert "MessageSid" in response.json()["detail"]


async def test_health_reports_the_deployed_sha(stack: Stack) -> None:
    response = await stack.http.get(f"{stack.url}/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["deployed_sha"] == "test-sha" and body["uptime_s"] >= 0
