"""Waking a sleeping worker, and surviving the relay's own death."""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import httpx
import pytest

from fakes.servers import reserve_port, reserve_port_at, run_server
from fakes.twilio import FakeTwilio
from fakes.wiring import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    OWNER,
    OWNER2,
    PUBLIC_URL,
    WORKER_TOKEN,
    message_params,
    relay_env,
    signed_form,
)
from fakes.worker import FakeWorker
from tests.support.processes import child, free_port, wait_exit, wait_healthy
from tests.support.relay_harness import relay_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio
WAKING = "⏳ Waking up your VM..."


async def test_a_worker_that_starts_listening_late_gets_the_command(tmp_path: Path) -> None:
    worker_sock = reserve_port()
    async with relay_stack(tmp_path, worker_listening=False, worker_sock=worker_sock) as stack:
        await stack.send("fix the bug")
        await wait_for(lambda: WAKING in stack.twilio.bodies(OWNER), what="waking message")
        await anyio.sleep(2.0)  # the scenario: the VM takes a couple of seconds to boot
        assert stack.worker.calls == []
        async with run_server(stack.worker.app(), worker_sock):
            commands = await wait_for(stack.worker.commands, what="command after wake")
            assert commands[0]["text"] == "fix the bug"
            await wait_for(lambda: "🤖 Working on it..." in stack.twilio.bodies(OWNER))
        assert stack.twilio.bodies(OWNER).count(WAKING) == 1
        assert stack.twilio.bodies(OWNER).index(WAKING) < stack.twilio.bodies(OWNER).index("🤖 Working on it...")
        assert 1 <= stack.worker.health_polls <= 3  # polling stopped once it answered


async def test_a_worker_that_never_wakes_is_reported_and_retry_resends(tmp_path: Path) -> None:
    worker_sock = reserve_port()
    async with relay_stack(tmp_path, worker_listening=False, worker_sock=worker_sock, WAKE_TIMEOUT_MS="800") as stack:
        await stack.send("deploy it")
        await wait_for(lambda: any("did not wake up" in b for b in stack.twilio.bodies(OWNER)), what="failure")
        assert any("retry" in b for b in stack.twilio.bodies(OWNER))
        async with run_server(stack.worker.app(), worker_sock):
            await stack.send("retry")
            commands = await wait_for(stack.worker.commands, what="resent command")
            assert commands[0]["text"] == "deploy it"


async def test_cancel_while_waking_withdraws_the_command(tmp_path: Path) -> None:
    worker_sock = reserve_port()
    async with relay_stack(tmp_path, worker_listening=False, worker_sock=worker_sock) as stack:
        await stack.send("long job")
        await wait_for(lambda: WAKING in stack.twilio.bodies(OWNER))
        await stack.send("cancel")
        await wait_for(lambda: any("before it reached the VM" in b for b in stack.twilio.bodies(OWNER)))
        async with run_server(stack.worker.app(), worker_sock):
            await stack.send("status")
            await wait_for(lambda: any("VM:" in b for b in stack.twilio.bodies(OWNER)), what="status")
            await wait_for(lambda: stack.worker.health_polls > 0, what="the wake loop to see the worker")
            await stack.send("help")
            await wait_for(lambda: any("*textslash*" in b for b in stack.twilio.bodies(OWNER)))
            assert stack.worker.commands() == []


async def test_a_worker_that_said_it_sleeps_gets_the_waking_message_at_once(tmp_path: Path) -> None:
    async with relay_stack(tmp_path) as stack:
        await stack.report("sleeping", run_id="idle")
        await stack.send("hello again")
        await wait_for(stack.worker.commands)
        await wait_for(lambda: len(stack.twilio.messages) >= 2, what="waking and working messages")
        assert stack.twilio.bodies(OWNER)[:2] == [WAKING, "🤖 Working on it..."]


async def test_relay_killed_between_webhook_and_send_loses_nothing(tmp_path: Path) -> None:
    twilio = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN, down=True)
    worker = FakeWorker(WORKER_TOKEN)
    worker_port, port = free_port(), free_port()
    relay_url = f"http://127.0.0.1:{port}"
    async with run_server(twilio.app()) as twilio_url, httpx.AsyncClient() as http:
        worker_url = f"http://127.0.0.1:{worker_port}"
        env = relay_env(tmp_path / "relay.sqlite3", twilio_url, worker_url, PORT=str(port), HOST="127.0.0.1")
        with child("relay", env, tmp_path / "relay.log") as proc:
            await wait_healthy(relay_url, proc)
            for body in ("help", "build the thing"):
                params = message_params(body)
                response = await http.post(
                    f"{relay_url}/webhook", data=params, headers=signed_form(PUBLIC_URL + "/webhook", params)
                )
                assert response.status_code == 200
            await wait_for(lambda: twilio.attempts >= 1, what="a failed send attempt")
            proc.send_signal(signal.SIGKILL)
            assert await wait_exit(proc, 5) == -signal.SIGKILL
        twilio.down = False
        async with run_server(worker.app(), reserve_port_at(worker_port)):
            with child("relay", env, tmp_path / "relay.log") as proc:
                await wait_healthy(relay_url, proc)
                await wait_for(worker.commands, what="the command, after the restart")
                await wait_for(lambda: any("*textslash*" in b for b in twilio.bodies(OWNER)), what="help reply")
                await wait_for(lambda: "🤖 Working on it..." in twilio.bodies(OWNER))
                proc.send_signal(signal.SIGTERM)
                # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit says why.
                assert await wait_exit(proc, 10) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in (tmp_path / "relay.log").read_text()
    assert len(worker.commands()) == 1
    assert sum("*textslash*" in b for b in twilio.bodies(OWNER)) == 1


async def test_an_owner_who_writes_while_the_worker_boots_is_told_too(tmp_path: Path) -> None:
    worker_sock = reserve_port()
    async with relay_stack(tmp_path, worker_listening=False, worker_sock=worker_sock) as stack:
        await stack.send("first owner's job")
        await wait_for(lambda: WAKING in stack.twilio.bodies(OWNER), what="waking message for the first owner")
        await stack.send("second owner's job", sender=OWNER2)
        await wait_for(lambda: WAKING in stack.twilio.bodies(OWNER2), what="waking message for the second owner")
        async with run_server(stack.worker.app(), worker_sock):
            await wait_for(lambda: len(stack.worker.commands()) == 2, what="both commands")
        assert stack.twilio.bodies(OWNER).count(WAKING) == 1 and stack.twilio.bodies(OWNER2).count(WAKING) == 1
