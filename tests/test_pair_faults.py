"""Faults to the pair as deployed: processes killed at the worst moments, then restarted.
After each the owner gets every message, in order, once, and is told what happened."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from fakes.anthropic import Text, write
from tests.support.pair_harness import pair_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio
STEP = 60.0


async def test_relay_killed_between_webhook_and_reply(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        pair.model.script("quick one", Text("quick answer"))
        pair.twilio.down = True  # replies cannot leave until the relay has died and come back
        await pair.start_relay()
        await pair.start_worker()
        await pair.text("quick one")
        await wait_for(lambda: pair.twilio.attempts >= 1, STEP, "a failed send")
        await pair.kill("relay")
        pair.twilio.down = False
        await pair.start_relay()
        await wait_for(lambda: pair.said("quick answer"), STEP, "the answer after the restart")
        bodies = pair.twilio.bodies()
        assert bodies.index("🤖 Working on it...") < bodies.index(pair.said("quick answer")[0])
        assert len(pair.said("Working on it")) == 1 and len(pair.said("quick answer")) == 1


async def test_worker_restarts_while_an_approval_waits(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        pair.model.script("make it", write(f"{pair.checkout}/made.txt", "made\n"), Text("made"))
        await pair.start_relay()
        await pair.start_worker()
        await pair.text("make it")
        await wait_for(lambda: pair.said("made.txt +1"), STEP, "approval request")
        await pair.kill("worker")
        await pair.text("approve")
        await wait_for(lambda: pair.said("Waking up your VM"), STEP, "the relay waking the worker")
        await pair.start_worker(wait=False)
        opened = await wait_for(lambda: pair.said("Pull request opened"), STEP, "the PR after the restart")
        assert opened[0].endswith("/pull/1") and len(pair.github.pulls) == 1
        assert len(pair.said("made.txt +1")) == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_both_processes_exit_0_after_a_graceful_stop(tmp_path: Path, sig: signal.Signals) -> None:
    async with pair_stack(tmp_path) as pair:
        await pair.start_relay()
        await pair.start_worker()
        assert await pair.kill("relay", sig) == 0 and await pair.kill("worker", sig) == 0
        assert "Traceback" not in pair.logs()
