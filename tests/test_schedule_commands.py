"""Schedules through the real relay (its webhook, SQLite and timer) with fakes of Twilio and the
worker: what the owner is told, what reaches the worker, and what `unschedule` and `tz` change."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.relay_harness import Stack, relay_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio


async def said(stack: Stack, fragment: str, timeout: float = 10.0) -> str:
    found: list[str] = await wait_for(
        lambda: [b for b in stack.twilio.bodies() if fragment in b], timeout, f"a message with {fragment!r}"
    )
    return found[-1]


async def test_unschedule_stops_one_and_the_other_fires_once(tmp_path: Path) -> None:
    async with relay_stack(tmp_path) as stack:
        await stack.send("in 2s first job")
        assert "Scheduled *1*, once: “first job”" in await said(stack, "Scheduled *1*")
        await stack.send("in 2s second job")
        await said(stack, "Scheduled *2*")
        await stack.send("unschedule 1")
        assert "Removed schedule 1: “first job”" in await said(stack, "Removed")
        [command] = await wait_for(lambda: stack.worker.commands(), 10, "the second job's command")
        # Both were due together, the first a moment earlier: had it not gone, it would be here.
        assert command["text"] == "second job" and command["unattended"] is True
        assert command["message_id"].startswith("sched-")
        await said(stack, "⏰ second job")
        assert not [b for b in stack.twilio.bodies() if "first job" in b and b.startswith("⏰ first")]
        await stack.send("schedules")
        assert "No schedules" in await said(stack, "No schedules")
        await stack.send("unschedule 5")
        assert "There is no schedule 5" in await said(stack, "no schedule 5")


async def test_schedules_lists_number_time_and_next_in_the_owners_zone(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, OWNER_TZ="Asia/Tokyo") as stack:
        await stack.send("every weekday 09:00 run the tests")
        first = await said(stack, "Scheduled *1*")
        assert "every weekday" in first and "09:00 (Asia/Tokyo)" in first
        await stack.send("tz")
        assert "Your time zone: Asia/Tokyo" in await said(stack, "Your time zone")
        await stack.send("tz america/new_york")
        assert "now America/New_York" in await said(stack, "now America/New_York")
        await stack.send("at 7:15pm check the deploy")
        await said(stack, "Scheduled *2*")
        await stack.send("schedules")
        listing = (await said(stack, "Your schedules")).splitlines()
        assert listing[0] == "⏰ Your schedules (America/New_York):"
        assert listing[1].startswith("1. 09:00 every weekday: “run the tests”, next ")
        assert listing[2].startswith("2. 19:15 once: “check the deploy”, next ")
        await stack.send("status")
        assert "⏰ 2 schedules; next " in await said(stack, "⏰ 2 schedules")
        await stack.send("tz Mars/Olympus")
        assert "not a time zone" in await said(stack, "not a time zone")


async def test_a_scheduled_runs_changes_wait_for_the_owner_with_no_deadline(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, APPROVAL_TIMEOUT_MS="1000") as stack:
        await stack.send("in 1s tidy the imports")
        [command] = await wait_for(lambda: stack.worker.commands(), 10, "the scheduled command")
        await said(stack, "Working on it")
        await stack.report("progress", run_id=command["message_id"], text="🔧 Editing app.py")
        await stack.report("approval_required", run_id=command["message_id"], files_count=1, diff="+x")
        request = await said(stack, "1 file changed")
        assert "they wait for you; the VM sleeps meanwhile" in request
        # Past the approval window (1 s, and the relay's timer looks twice a second): nothing is
        # rolled back, and the run's progress line was never sent.
        past = time.time() + 2.0
        await wait_for(lambda: time.time() > past, 5, "the approval window to pass")
        await stack.send("status")
        status = await said(stack, "Changes wait for")
        assert "left" not in status.splitlines()[0]
        assert not [b for b in stack.twilio.bodies() if "No answer within" in b or "Editing app.py" in b]
        assert "/reject" not in stack.worker.paths()


async def test_too_many_schedules_are_refused(tmp_path: Path) -> None:
    async with relay_stack(tmp_path) as stack:
        for i in range(21):
            await stack.send(f"every day 0{i % 10}:{10 + i} job {i}")
        assert "the most there can be" in await said(stack, "the most there can be")
        await stack.send("unschedule all")
        assert "Removed 20 schedules" in await said(stack, "Removed 20")
