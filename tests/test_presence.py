"""The worker says when it is up and when it goes to sleep; the relay stops waiting at once."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest

from common.protocol import VERSION
from fakes.anthropic import Text
from fakes.servers import reserve_port, run_server
from fakes.wiring import OWNER, WORKER_TOKEN
from tests.support.pair_harness import pair_stack
from tests.support.relay_harness import relay_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio
WAKING = "⏳ Waking up your VM..."
AUTH = {"Authorization": f"Bearer {WORKER_TOKEN}"}


async def test_a_worker_that_says_it_is_up_gets_the_command_without_waiting_for_a_poll(tmp_path: Path) -> None:
    worker_sock = reserve_port()
    # Polls 10 s apart: only the announcement can deliver the command within the deadline below.
    async with relay_stack(tmp_path, worker_listening=False, worker_sock=worker_sock, WAKE_POLL_MS="10000") as stack:
        await stack.send("fix the bug")
        await wait_for(lambda: WAKING in stack.twilio.bodies(OWNER), what="waking message")
        async with run_server(stack.worker.app(), worker_sock):
            response = await stack.worker.announce(stack.url)
            assert response.status_code == 200, response.text
            commands = await wait_for(stack.worker.commands, 2.0, "the command after the announcement")
            assert commands[0]["text"] == "fix the bug"
            await wait_for(lambda: "🤖 Working on it..." in stack.twilio.bodies(OWNER))
        assert stack.worker.health_polls == 0  # the poll loop stopped the moment it heard


async def test_polling_alone_finds_a_worker_that_cannot_announce_itself(tmp_path: Path) -> None:
    worker_sock = reserve_port()
    async with relay_stack(tmp_path, worker_listening=False, worker_sock=worker_sock) as stack:
        await stack.send("fix the bug")
        await wait_for(lambda: WAKING in stack.twilio.bodies(OWNER), what="waking message")
        await anyio.sleep(0.5)  # the scenario: the VM boots for a while
        async with run_server(stack.worker.app(), worker_sock):
            await wait_for(stack.worker.commands, 1.0, "the command, found by a poll within 60 ms")
        assert stack.worker.health_polls == 1


async def test_a_worker_that_says_it_sleeps_is_not_woken_for_status_and_is_for_a_prompt(tmp_path: Path) -> None:
    async with relay_stack(tmp_path) as stack:
        response = await stack.worker.announce(stack.url, "sleeping")
        assert response.status_code == 200, response.text
        await stack.send("status")
        await wait_for(lambda: any("VM:" in b for b in stack.twilio.bodies(OWNER)), what="status")
        assert "asleep" in next(b for b in stack.twilio.bodies(OWNER) if "VM:" in b)
        await stack.send("hello again")
        await wait_for(lambda: "🤖 Working on it..." in stack.twilio.bodies(OWNER), what="the prompt delivered")
        assert stack.twilio.bodies(OWNER)[1:3] == [WAKING, "🤖 Working on it..."]
        await stack.worker.announce(stack.url, "up")
        await stack.send("status")
        await wait_for(lambda: len([b for b in stack.twilio.bodies(OWNER) if "VM:" in b]) == 2, what="status")
        assert "asleep" not in [b for b in stack.twilio.bodies(OWNER) if "VM:" in b][1]


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({}, {"v": VERSION, "state": "up", "boot": "b"}, 401),
        ({"Authorization": "Bearer wrong"}, {"v": VERSION, "state": "up", "boot": "b"}, 401),
        (AUTH, {"v": VERSION, "state": "awake", "boot": "b"}, 422),
        (AUTH, {"v": VERSION + 1, "state": "up", "boot": "b"}, 422),
        (AUTH, [1, 2], 422),
        (AUTH, {"v": VERSION, "state": "up", "boot": 7}, 422),
    ],
)
async def test_a_malformed_presence_is_refused_and_changes_nothing(
    tmp_path: Path, headers: dict[str, str], body: object, status: int
) -> None:
    async with relay_stack(tmp_path) as stack:
        response = await stack.http.post(f"{stack.url}/callback", json=body, headers=headers)
        assert response.status_code == status, response.text
        garbage = await stack.http.post(f"{stack.url}/callback", content=b"{nope", headers=AUTH)
        assert garbage.status_code == 400
        await stack.send("status")
        await wait_for(lambda: any("VM:" in b for b in stack.twilio.bodies(OWNER)), what="status")
        assert "asleep" not in next(b for b in stack.twilio.bodies(OWNER) if "VM:" in b)


async def test_the_real_worker_announces_itself_to_the_real_relay(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        pair.relay_env["WAKE_POLL_MS"] = "600000"  # no poll after the first: only the announcement helps
        await pair.start_relay()
        pair.model.script("hello there", Text("Hi from the model."))
        await pair.text("hello there")
        await wait_for(lambda: pair.said("Waking up"), what="the waking message")
        await pair.start_worker(wait=False)
        await wait_for(lambda: pair.said("Hi from the model."), 60, "the answer, through the announced worker")
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{pair.worker_url}/health")).status_code == 200
