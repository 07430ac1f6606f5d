"""WhatsApp's 24-hour window (issue 13), through the real relay with the fake Twilio: a message
Twilio refuses with 63016 (at once, or later through its status callback), or one due past the
window by the relay's own clock, is held in order; one template (ContentSid) tells the owner;
their next message releases what was held first."""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest

from fakes.wiring import OWNER, PUBLIC_URL, signed_form
from relay.app import STATUS_PATH
from tests.support.relay_harness import Stack, relay_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio

TEMPLATE = "HX" + "0123456789abcdef" * 2
STATUS_URL = PUBLIC_URL + STATUS_PATH
SID = "SM" + "1" * 32


async def start_run(stack: Stack, text: str) -> dict[str, Any]:
    count = len(stack.worker.commands())
    await stack.send(text)
    commands = await wait_for(lambda: stack.worker.commands()[count:], what="the command")
    await wait_for(lambda: any("Working on it" in b for b in stack.twilio.bodies(OWNER)), what="working")
    command: dict[str, Any] = commands[-1]
    return command


def held(stack: Stack) -> int:
    """Messages the relay holds for the owner, read from its database (no other way in)."""
    with sqlite3.connect(f"file:{stack.settings.relay_db}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM outbox WHERE status = 'held'").fetchone()[0])


def index_of(stack: Stack, fragment: str) -> int:
    bodies = stack.twilio.bodies(OWNER)
    return next(i for i, b in enumerate(bodies) if fragment in b)


async def ask_status(stack: Stack) -> str:
    await stack.send("status")
    found = await wait_for(lambda: [b for b in stack.twilio.bodies(OWNER) if "VM:" in b], what="the status")
    return str(found[-1])


async def test_a_63016_holds_the_answer_sends_the_template_once_and_the_next_message_releases_it_first(
    tmp_path: Path,
) -> None:
    async with relay_stack(tmp_path, TWILIO_TEMPLATE_CONTENT_SID=TEMPLATE, OWNER_TZ="Asia/Kathmandu") as stack:
        command = await start_run(stack, "explain the login flow")
        stack.twilio.close_window(OWNER)  # a day goes by: Twilio refuses free-form sends at once
        await stack.report("answer", run_id=command["message_id"], text="The login flow lives in auth.py.")
        [template] = await wait_for(lambda: stack.twilio.templates_sent(OWNER), what="the template")
        assert template.content_sid == TEMPLATE
        assert template.body == "textslash: 1 result waiting for you. Reply to see them."
        assert held(stack) == 1 and not any("auth.py" in b for b in stack.twilio.bodies(OWNER))
        # More while the window is closed: held without a try, and no second template.
        attempts = stack.twilio.attempts
        await stack.report("notice", run_id=command["message_id"], text="A screenshot is ready.")
        await wait_for(lambda: held(stack) == 2, what="the notice held")
        assert stack.twilio.attempts == attempts and len(stack.twilio.templates_sent(OWNER)) == 1

        status = await ask_status(stack)  # the owner writes: what waited goes first, in order
        assert index_of(stack, "auth.py") < index_of(stack, "screenshot is ready") < index_of(stack, "VM:")
        assert "1 result and 1 message waited for you" in status
        # When the reminder went, in the owner's zone like status's other times (UTC+5:45).
        clocks = {f"{datetime.fromtimestamp(time.time() - s, ZoneInfo('Asia/Kathmandu')):%H:%M}" for s in (0, 60)}
        assert any(f"A reminder went out today {c} (Asia/Kathmandu)" in status for c in clocks), status
        assert held(stack) == 0 and len(stack.twilio.templates_sent(OWNER)) == 1


async def test_a_message_due_past_the_window_by_the_relays_clock_is_held_without_a_try(tmp_path: Path) -> None:
    # WHATSAPP_WINDOW_MS is 24 h less 5 min in production; here 1.5 s, and the fake Twilio's
    # window stays open: only the relay's own clock holds the approval.
    async with relay_stack(tmp_path, TWILIO_TEMPLATE_CONTENT_SID=TEMPLATE, WHATSAPP_WINDOW_MS="1500") as stack:
        wrote = time.time()
        command = await start_run(stack, "add a login page")
        await wait_for(lambda: time.time() > wrote + 1.6, what="the window to pass")
        attempts = stack.twilio.attempts
        files = [{"path": "login.py", "added": 3}]
        await stack.report("approval_required", run_id=command["message_id"], files=files)
        [template] = await wait_for(lambda: stack.twilio.templates_sent(OWNER), what="the template")
        assert template.body == "textslash: 1 approval waiting for you. Reply to see them."
        assert stack.twilio.attempts == attempts + 1  # the template alone: the approval was never tried
        assert held(stack) == 2  # the approval request and the quick reply with its buttons

        await stack.send("status")
        buttons = await wait_for(lambda: [m for m in stack.twilio.messages if "approve" in m.buttons])
        await wait_for(lambda: any("VM:" in b for b in stack.twilio.bodies(OWNER)), what="the status")
        assert index_of(stack, "login.py") < stack.twilio.messages.index(buttons[0]) < index_of(stack, "VM:")


async def test_a_63016_in_the_status_callback_holds_the_message(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, TWILIO_TEMPLATE_CONTENT_SID=TEMPLATE) as stack:
        command = await start_run(stack, "explain the login flow")
        stack.twilio.close_window(OWNER, "async")  # Twilio takes the message, then it fails
        await stack.report("answer", run_id=command["message_id"], text="The login flow lives in auth.py.")
        await wait_for(lambda: stack.twilio.templates_sent(OWNER), what="the template")
        [refused] = stack.twilio.refused
        assert "auth.py" in refused.body and stack.twilio.status_posts[0][1] == 204
        assert held(stack) == 1
        # Callbacks are best effort and repeat: a second one changes nothing.
        assert await stack.twilio.post_status(STATUS_URL, refused, "failed", 63016) == 204
        assert held(stack) == 1 and len(stack.twilio.templates_sent(OWNER)) == 1

        status = await ask_status(stack)
        assert index_of(stack, "auth.py") < index_of(stack, "VM:")
        assert "1 result waited for you" in status


async def test_a_failure_reported_before_the_send_returns_is_applied_when_it_does(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, TWILIO_TEMPLATE_CONTENT_SID=TEMPLATE) as stack:
        command = await start_run(stack, "explain the login flow")
        stack.twilio.close_window(OWNER, "async")
        stack.twilio.status_first = True  # the callback arrives while the relay waits for the SID
        await stack.report("answer", run_id=command["message_id"], text="The login flow lives in auth.py.")
        await wait_for(lambda: stack.twilio.templates_sent(OWNER), what="the template")
        assert held(stack) == 1 and stack.twilio.status_posts[0][1] == 204


async def test_without_a_template_messages_wait_and_status_counts_them(tmp_path: Path) -> None:
    async with relay_stack(tmp_path) as stack:
        command = await start_run(stack, "explain the login flow")
        stack.twilio.close_window(OWNER)
        await stack.report("answer", run_id=command["message_id"], text="The login flow lives in auth.py.")
        await wait_for(lambda: held(stack) == 1, what="the answer held")
        sent = len(stack.twilio.messages)
        status = await ask_status(stack)
        assert index_of(stack, "auth.py") == sent  # the first thing the owner's message brought
        assert "1 result waited for you" in status and "TWILIO_TEMPLATE_CONTENT_SID is not set" in status
        assert stack.twilio.templates == set() and held(stack) == 0


async def test_a_restart_while_messages_are_held_loses_nothing_nor_sends_the_template_twice(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, TWILIO_TEMPLATE_CONTENT_SID=TEMPLATE) as stack:
        command = await start_run(stack, "explain the login flow")
        stack.twilio.close_window(OWNER)
        await stack.report("answer", run_id=command["message_id"], text="The login flow lives in auth.py.")
        await wait_for(lambda: stack.twilio.templates_sent(OWNER), what="the template")
    async with relay_stack(
        tmp_path, TWILIO_TEMPLATE_CONTENT_SID=TEMPLATE
    ) as stack:  # the same database, a new process's worth
        # (A new fake worker counts its reports from 1 again: another run id, or it is a repeat.)
        await stack.report("notice", run_id="screenshots", text="A screenshot is ready.")
        await wait_for(lambda: held(stack) == 2, what="the notice held: the refusal was remembered")
        assert stack.twilio.attempts == 0
        status = await ask_status(stack)
        assert index_of(stack, "auth.py") < index_of(stack, "screenshot is ready") < index_of(stack, "VM:")
        assert "A reminder went out " in status and stack.twilio.templates_sent(OWNER) == []


async def test_a_template_twilio_refuses_is_not_tried_again_and_status_says_so(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, TWILIO_TEMPLATE_CONTENT_SID="HX" + "f" * 32) as stack:
        stack.twilio.templates.clear()  # configured, but not a template Twilio knows
        command = await start_run(stack, "explain the login flow")
        stack.twilio.close_window(OWNER)
        await stack.report("answer", run_id=command["message_id"], text="The login flow lives in auth.py.")
        await wait_for(lambda: held(stack) == 1, what="the answer held")
        attempts = stack.twilio.attempts
        await stack.report("notice", run_id=command["message_id"], text="A screenshot is ready.")
        await wait_for(lambda: held(stack) == 2, what="the notice held")
        assert stack.twilio.attempts == attempts  # no loop on the template
        status = await ask_status(stack)
        assert "The reminder template could not be sent: HTTP 400" in status
        assert index_of(stack, "auth.py") < index_of(stack, "VM:")


@pytest.mark.parametrize(
    ("form", "signed", "expected"),
    [
        pytest.param({"MessageSid": SID, "MessageStatus": "failed"}, False, 403, id="unsigned"),
        pytest.param({"MessageStatus": "failed", "ErrorCode": "63016"}, True, 400, id="no-sid"),
        pytest.param({"MessageSid": SID}, True, 400, id="no-status"),
        pytest.param({"MessageSid": "../../etc", "MessageStatus": "failed"}, True, 400, id="bad-sid"),
        pytest.param({"MessageSid": SID, "MessageStatus": "failed", "ErrorCode": "6x"}, True, 400, id="code"),
        pytest.param({"MessageSid": SID, "MessageStatus": "delivered"}, True, 204, id="delivered"),
    ],
)
async def test_status_callbacks_are_checked(stack: Stack, form: dict[str, str], signed: bool, expected: int) -> None:
    headers = signed_form(STATUS_URL, form) if signed else {}
    response = await stack.http.post(f"{stack.url}{STATUS_PATH}", data=form, headers=headers)
    assert response.status_code == expected, response.text
    assert held(stack) == 0


async def test_a_status_callback_signed_for_another_url_or_not_a_form_is_refused(stack: Stack) -> None:
    form = {"MessageSid": SID, "MessageStatus": "failed", "ErrorCode": "63016"}
    wrong = await stack.http.post(f"{stack.url}{STATUS_PATH}", data=form, headers=signed_form(PUBLIC_URL, form))
    assert wrong.status_code == 403
    as_json = await stack.http.post(f"{stack.url}{STATUS_PATH}", json=form)
    assert as_json.status_code == 415


@pytest.mark.parametrize("reply", ["ok", "Show me!", "👍🏽", "  yes. "])
async def test_a_reply_that_only_answers_the_template_is_not_run_as_a_prompt(tmp_path: Path, reply: str) -> None:
    # The template says "Reply to see them": the reply releases what waited and is answered as
    # `status`; it does not wake the worker for a run of "ok", nor queue behind the approval.
    async with relay_stack(tmp_path, TWILIO_TEMPLATE_CONTENT_SID=TEMPLATE) as stack:
        command = await start_run(stack, "add a login page")
        stack.twilio.close_window(OWNER)
        files = [{"path": "login.py", "added": 3}]
        await stack.report("approval_required", run_id=command["message_id"], files=files)
        await wait_for(lambda: stack.twilio.templates_sent(OWNER), what="the template")
        calls = len(stack.worker.calls)

        await stack.send(reply)
        status = await wait_for(lambda: [b for b in stack.twilio.bodies(OWNER) if "VM:" in b], what="the status")
        assert index_of(stack, "login.py") < index_of(stack, "VM:")
        assert "1 approval waited for you" in status[-1]
        assert not any("queued" in b.lower() for b in stack.twilio.bodies(OWNER))
        assert stack.worker.paths()[calls:] == []  # nothing went to the worker
        await stack.send("approve")  # and the approval it released is the owner's to decide
        assert await wait_for(lambda: stack.worker.paths()[calls:], what="the approval") == ["/approve"]


async def test_a_prompt_that_releases_held_messages_still_runs(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, TWILIO_TEMPLATE_CONTENT_SID=TEMPLATE) as stack:
        command = await start_run(stack, "explain the login flow")
        stack.twilio.close_window(OWNER)
        await stack.report("answer", run_id=command["message_id"], text="The login flow lives in auth.py.")
        await wait_for(lambda: stack.twilio.templates_sent(OWNER), what="the template")
        commands = len(stack.worker.commands())
        await stack.send("ok, now add a logout button")
        [prompt] = await wait_for(lambda: stack.worker.commands()[commands:], what="the prompt")
        assert prompt["text"] == "ok, now add a logout button"
        # The released answer goes out too; the outbox and the worker's lane run side by side, so
        # it may still be on its way when the prompt reaches the worker.
        await wait_for(lambda: any("auth.py" in b for b in stack.twilio.bodies(OWNER)), what="the held answer")


async def test_a_message_whose_buttons_alone_were_held_is_released_by_the_owners_reply(tmp_path: Path) -> None:
    # The approval request went; the window closed before its buttons did (paced 1.5 s apart).
    # Only the buttons are held, and they count as no message of their own: the owner's reply
    # still releases them, and is answered, not run.
    async with relay_stack(tmp_path, TWILIO_TEMPLATE_CONTENT_SID=TEMPLATE, TWILIO_MIN_SEND_INTERVAL_MS="1500") as stack:
        command = await start_run(stack, "add a login page")
        files = [{"path": "login.py", "added": 3}]
        await stack.report("approval_required", run_id=command["message_id"], files=files)
        await wait_for(lambda: any("login.py" in b for b in stack.twilio.bodies(OWNER)), what="the request")
        stack.twilio.close_window(OWNER)
        await wait_for(lambda: held(stack) == 1, what="the buttons held")
        await wait_for(lambda: stack.twilio.templates_sent(OWNER), what="the template")
        calls = len(stack.worker.calls)

        await stack.send("ok")
        await wait_for(lambda: any("VM:" in b for b in stack.twilio.bodies(OWNER)), what="the status")
        buttons = [m for m in stack.twilio.messages if "approve" in m.buttons]
        assert buttons and stack.twilio.messages.index(buttons[0]) < index_of(stack, "VM:")
        assert held(stack) == 0 and stack.worker.paths()[calls:] == []


def owner_message_handled(stack: Stack) -> bool:
    with sqlite3.connect(f"file:{stack.settings.relay_db}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT handled_at FROM inbox WHERE dedupe_key LIKE 'msg:%' ORDER BY id DESC").fetchone()
        return row is not None and row[0] is not None


async def test_a_63016_answered_after_the_owner_wrote_meanwhile_sends_again_instead_of_holding(
    tmp_path: Path,
) -> None:
    # Twilio refuses the answer (the window was closed when it looked) but takes its time to
    # say so; the owner writes meanwhile. Their window is open again: the answer goes, then
    # theirs, and no template asks them to write again.
    async with relay_stack(tmp_path, TWILIO_TEMPLATE_CONTENT_SID=TEMPLATE) as stack:
        command = await start_run(stack, "explain the login flow")
        stack.twilio.close_window(OWNER)
        stack.twilio.answer_hold = slow = anyio.Event()
        await stack.report("answer", run_id=command["message_id"], text="The login flow lives in auth.py.")
        await wait_for(lambda: stack.twilio.in_flight == 1, what="the send at Twilio")

        await stack.send("status")
        await wait_for(lambda: owner_message_handled(stack), what="the owner's message handled")
        stack.twilio.answer_hold = None
        slow.set()
        await wait_for(lambda: any("VM:" in b for b in stack.twilio.bodies(OWNER)), what="the status")
        assert index_of(stack, "auth.py") < index_of(stack, "VM:")
        assert held(stack) == 0 and stack.twilio.templates_sent(OWNER) == []
