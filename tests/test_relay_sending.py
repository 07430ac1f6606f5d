"""Outbound messages: splitting, retries from the outbox, permanent refusals, pacing."""

from __future__ import annotations

import re
from pathlib import Path

import anyio
import pytest

from fakes.wiring import OWNER, OWNER2, SANDBOX_NUMBER
from relay.twilio import split_body
from tests.support.relay_harness import Stack, relay_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio


def numbered_lines(count: int) -> str:
    return "\n".join(f"line {i:04d} " + "x" * 40 for i in range(count))


async def test_a_5000_character_reply_arrives_split_in_order(stack: Stack) -> None:
    text = numbered_lines(100)
    assert len(text) > 5000
    await stack.send("explain")
    commands = await wait_for(stack.worker.commands)
    await stack.report("answer", run_id=commands[0]["message_id"], text=text)
    parts = await wait_for(
        lambda: [b for b in stack.twilio.bodies(OWNER) if re.match(r"\(\d/\d\) ", b)], what="numbered parts"
    )
    await wait_for(lambda: len([b for b in stack.twilio.bodies(OWNER) if re.match(r"\(\d/\d\) ", b)]) == 4)
    parts = [b for b in stack.twilio.bodies(OWNER) if re.match(r"\(\d/\d\) ", b)]
    assert [p[:5] for p in parts] == ["(1/4)", "(2/4)", "(3/4)", "(4/4)"]
    assert all(len(p) <= 1600 for p in parts)
    joined = "\n".join(p[6:] for p in parts)
    assert joined.endswith(text)
    assert all(m.from_ == f"whatsapp:{SANDBOX_NUMBER}" for m in stack.twilio.messages)


@pytest.mark.parametrize("text", ["short", "a\n" * 2000, "x" * 4000, ("word " * 900).strip(), "é🙂\n" * 700])
def test_split_keeps_every_character_and_fits(text: str) -> None:
    parts = split_body(text)
    assert all(len(p) <= 1600 for p in parts)
    if len(parts) == 1:
        assert parts == [text]
        return
    bodies = [re.sub(r"^\(\d+/\d+\) ", "", p) for p in parts]
    assert "".join(bodies).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")


async def test_500_and_429_are_retried_until_sent(stack: Stack) -> None:
    stack.twilio.fail_next(500, 429, 503)
    await stack.send("help")
    await wait_for(lambda: stack.twilio.messages, what="the eventual send")
    assert stack.twilio.attempts == 4
    assert len(stack.twilio.messages) == 1


async def test_a_stalled_send_times_out_and_is_retried(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, send_timeout=0.5) as stack:
        stack.twilio.stall_s = 30.0  # hung: only the sender's own deadline ends the wait
        stack.twilio.fail_next("stall")
        await stack.send("help")
        await wait_for(lambda: stack.twilio.messages, timeout=5, what="send after the stall")
        assert stack.twilio.attempts == 2


async def test_order_is_kept_while_an_earlier_message_is_retried(stack: Stack) -> None:
    stack.twilio.fail_next(500, 500)
    await stack.send("help")
    await stack.send("cancel")
    await stack.send("approve")
    await wait_for(lambda: len(stack.twilio.messages) == 3, what="three replies")
    bodies = stack.twilio.bodies(OWNER)
    assert bodies[0].startswith("🤖 *textslash*")
    assert bodies[1:] == ["Nothing is running.", "Nothing is waiting for approval."]


async def test_permanent_refusal_is_not_retried_and_status_shows_it(stack: Stack) -> None:
    # 63015: not joined to the sandbox. (A 63016, outside WhatsApp's 24-hour window, is held for
    # the owner's next message instead: tests/test_relay_window.py.)
    stack.twilio.fail_next((400, 63015))
    await stack.send("help")
    await wait_for(lambda: stack.twilio.attempts == 1)
    await stack.send("status")
    status = await wait_for(lambda: [b for b in stack.twilio.bodies(OWNER) if "VM:" in b], what="status")
    assert "63015" in status[0]
    assert stack.twilio.attempts == 2  # the refused help was never tried again


async def test_sends_to_one_recipient_are_paced_but_others_are_not_held(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, TWILIO_MIN_SEND_INTERVAL_MS="400") as stack:
        for word in ("help", "cancel", "approve"):
            await stack.send(word)
        await stack.send("help", sender=OWNER2)
        await wait_for(lambda: len(stack.twilio.messages) == 4, what="four sends")
        mine = [m.at for m in stack.twilio.messages if m.to == f"whatsapp:{OWNER}"]
        gaps = [b - a for a, b in zip(mine, mine[1:], strict=False)]
        assert all(gap >= 0.39 for gap in gaps), gaps
        other = next(m for m in stack.twilio.messages if m.to == f"whatsapp:{OWNER2}")
        assert other.at - mine[0] < 0.39  # OWNER2 did not wait behind OWNER's pacing


async def test_sends_stalled_at_twilio_hold_neither_the_webhook_nor_more_than_four_requests(tmp_path: Path) -> None:
    owners = [f"+1555300000{i}" for i in range(6)]
    async with relay_stack(tmp_path, send_timeout=1.5, ALLOWED_PHONE_NUMBERS=",".join(owners)) as stack:
        stack.twilio.stall_s = 2.0
        stack.twilio.fail_next(*["stall"] * 6)
        for owner in owners:
            await stack.send("help", sender=owner)
        await wait_for(lambda: stack.twilio.in_flight == 4, what="four stalled sends")
        # Sends wait on the network, not on the event loop: the relay answers at once meanwhile.
        with anyio.fail_after(0.5):
            assert (await stack.send("status", sender=owners[0])).status_code == 200
            assert (await stack.http.get(f"{stack.url}/health")).status_code == 200
        assert stack.twilio.attempts == 4  # the other two wait for a free slot, not at Twilio
        await wait_for(lambda: len({m.to for m in stack.twilio.messages}) == 6, what="a reply to every owner")
