"""Load and faults through the real relay: nothing lost, nothing doubled, order kept."""

from __future__ import annotations

import os
import random
from pathlib import Path

import anyio
import pytest

from fakes.wiring import OWNER, message_params, new_sid
from tests.support.relay_harness import Stack, relay_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio

SENDERS = [f"+1555100{i:04d}" for i in range(20)]


async def test_2000_messages_from_20_numbers_at_concurrency_50_arrive_once_and_in_order(tmp_path: Path) -> None:
    per_sender = int(os.environ.get("LOAD_PER_SENDER", "100"))
    async with relay_stack(tmp_path, ALLOWED_PHONE_NUMBERS=",".join(SENDERS)) as stack:
        stack.worker.answer_via = stack.url
        rng = random.Random(11)
        plan = {phone: [(new_sid(), f"task {n:03d}") for n in range(per_sender)] for phone in SENDERS}
        duplicates = rng.sample([(phone, m) for phone, ms in plan.items() for m in ms], k=per_sender * 2)
        sent = {sid: anyio.Event() for ms in plan.values() for sid, _ in ms}
        limiter = anyio.CapacityLimiter(50)

        async def post(phone: str, sid: str, text: str) -> None:
            async with limiter:
                response = await stack.post_form(message_params(text, sender=phone, sid=sid))
            assert response.status_code == 200

        async def sender(phone: str) -> None:
            for sid, text in plan[phone]:  # one sender's messages go out one after another, as Twilio's do
                await post(phone, sid, text)
                sent[sid].set()

        async def redeliver(phone: str, sid: str, text: str) -> None:
            await sent[sid].wait()  # Twilio redelivers a message after it first delivered it
            await post(phone, sid, text)

        async with anyio.create_task_group() as tg:
            for phone in SENDERS:
                tg.start_soon(sender, phone)
            for phone, (sid, text) in duplicates:
                tg.start_soon(redeliver, phone, sid, text)

        total = len(SENDERS) * per_sender
        await wait_for(lambda: len(stack.worker.commands()) >= total, 240, "every message at the worker")
        await anyio.sleep(0.5)  # a doubled delivery would show up now
        commands = stack.worker.commands()
        assert len(commands) == total
        assert len({c["message_id"] for c in commands}) == total
        for phone in SENDERS:
            got = [c["text"] for c in commands if c["phone"] == phone]
            assert got == [text for _, text in plan[phone]], f"{phone} out of order"


async def owner_gets_every_answer_once_in_order(stack: Stack, count: int) -> None:
    expected = [f"answer to job {n:02d}" for n in range(count)]

    def answers() -> list[str]:
        return [b.split("\n\n", 1)[1] for b in stack.twilio.bodies(OWNER) if b.startswith("✅ Done")]

    await wait_for(lambda: len(answers()) >= count, 120, "every answer")
    await anyio.sleep(0.3)
    assert answers() == expected


async def test_twilio_failing_30_percent_of_sends_loses_and_doubles_nothing(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, send_timeout=0.3) as stack:
        stack.worker.answer_via = stack.url
        stack.twilio.stall_s = 0.6
        stack.twilio.failure_rate = 0.3
        for n in range(12):
            await stack.send(f"job {n:02d}")
        await owner_gets_every_answer_once_in_order(stack, 12)
        assert stack.twilio.attempts > len(stack.twilio.messages)  # failures really happened
