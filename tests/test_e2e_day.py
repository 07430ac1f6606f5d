"""The owner's whole day, end to end: relay and worker as separate processes, fakes around them.

Cold start with the waking message, progress, approval with image, approve -> PR, a second
prompt -> reject, a long run -> cancel, `screenshot <url>`, `status`, and the worker's idle exit.
"""

from __future__ import annotations

import re
import time
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest

from console.local_github import FakeGitHub
from console.scripted_model import FakeAnthropic, Text, bash, edit, write
from tests.support.fake_twilio import FakeTwilio
from tests.support.git_origin import branches, make_origin, show
from tests.support.processes import child, free_port, wait_exit, wait_healthy
from tests.support.relay_harness import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    OWNER,
    PUBLIC_URL,
    message_params,
    relay_env,
    signed_form,
)
from tests.support.servers import run_server, wait_for
from tests.support.worker_harness import FILES, GITHUB_TOKEN, model_env, worker_env
from tests.test_worker_control import pids_with

pytestmark = pytest.mark.anyio
STEP = 60.0


async def test_an_owners_day(tmp_path: Path) -> None:
    twilio, model, github = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN), FakeAnthropic(), FakeGitHub(GITHUB_TOKEN)
    origin = make_origin(tmp_path / "git", FILES)
    relay_port, worker_port = free_port(), free_port()
    relay_url, worker_url = f"http://127.0.0.1:{relay_port}", f"http://127.0.0.1:{worker_port}"
    checkout = tmp_path / "workspace" / OWNER.lstrip("+")
    marker = f"textslash-day-{time.time_ns()}"
    model.script("add a greeting", write(f"{checkout}/hello.py", "print('hello')\n"), Text("Added hello.py."))
    model.script("shout it", edit(f"{checkout}/hello.py", "'hello'", "'HELLO'"), Text("Now it shouts."))
    model.script("long job", bash(f"python3 -c 'import time; time.sleep(120)' {marker}"), Text("never"))

    def said(fragment: str) -> list[str]:
        return [b for b in twilio.bodies(OWNER) if fragment in b]

    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
        twilio_url = await stack.enter_async_context(run_server(twilio.app()))
        model_url = await stack.enter_async_context(run_server(model.app()))
        github_url = await stack.enter_async_context(run_server(github.app()))

        async def text(body: str) -> None:
            params = message_params(body)
            response = await http.post(f"{relay_url}/webhook", data=params,
                                       headers=signed_form(PUBLIC_URL + "/webhook", params))
            assert response.status_code == 200

        renv = relay_env(tmp_path / "relay.sqlite3", twilio_url, worker_url, PORT=str(relay_port), HOST="127.0.0.1")
        relay = stack.enter_context(child("relay", renv, tmp_path / "relay.log"))
        await wait_healthy(relay_url, relay)

        # Cold start: the worker is not even listening when the first prompt arrives.
        await text("add a greeting")
        await wait_for(lambda: said("Waking up your VM"), STEP, "the waking message")
        wenv = {**model_env(model_url, tmp_path), **worker_env(
            tmp_path, relay_url=relay_url, github_url=github_url, origin=origin,
            PORT=str(worker_port), HOST="127.0.0.1", IDLE_TIMEOUT_MS="4000", WORKSPACE_DIR=str(tmp_path / "workspace"))}
        worker = stack.enter_context(child("vm", wenv, tmp_path / "worker.log"))
        await wait_for(lambda: said("Working on it"), STEP, "the working message")
        await wait_for(lambda: said("✏️ editing hello.py"), STEP, "progress")
        approval = await wait_for(lambda: [m for m in twilio.messages if m.media], STEP, "approval with image")
        assert "hello.py +1 −0" in approval[0].body
        image_path = re.sub(r"^https://[^/]+", "", approval[0].media[0])
        image = await http.get(relay_url + image_path)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")

        await text("approve")
        opened = await wait_for(lambda: said("Pull request opened"), STEP, "the PR link")
        assert "https://github.com/owner/demo/pull/1" in opened[0]
        branch = github.pulls[0]["head"]
        assert branch in branches(origin) and show(origin, branch, "hello.py") == "print('hello')\n"

        await text("shout it")
        await wait_for(lambda: len([m for m in twilio.messages if m.media]) == 2, STEP, "second approval")
        await text("reject")
        await wait_for(lambda: said("Rolled back"), STEP, "rollback")
        assert (checkout / "hello.py").read_text() == "print('hello')\n"

        await text("long job")
        await wait_for(lambda: pids_with(marker), STEP, "the long command")
        await text("cancel")
        await wait_for(lambda: said("Run cancelled"), STEP, "cancel confirmed")
        assert not pids_with(marker)

        await text(f"screenshot {worker_url}/test-app")
        await wait_for(lambda: len([m for m in twilio.messages if m.media]) == 3, STEP, "the screenshot")

        await text("status")
        status = await wait_for(lambda: said("VM:"), STEP, "status")
        assert "Idle" in status[0] and "awake" in status[0]

        # Nothing left to do: the worker stops itself, and says so.
        assert await wait_exit(worker, 30) == 0
        await text("status")
        await wait_for(lambda: any("asleep" in b for b in said("VM:")), STEP, "status after sleep")
    assert len(said("Waking up your VM")) == 1  # once, for the cold start
    assert len(said("Pull request opened")) == 1 and len(said("Rolled back")) == 1

    # No secret appears in any log line of either process, nor in anything sent to the phone.
    logs = (tmp_path / "relay.log").read_text() + (tmp_path / "worker.log").read_text()
    assert "Application startup complete" in logs  # the logs are really there
    sent = "\n".join(twilio.bodies())
    for name, value in (("TWILIO_AUTH_TOKEN", AUTH_TOKEN), ("WORKER_TOKEN", renv["WORKER_TOKEN"]),
                        ("GITHUB_TOKEN", GITHUB_TOKEN), ("ANTHROPIC_API_KEY", wenv["ANTHROPIC_API_KEY"])):
        assert value not in logs, f"{name} leaked into a log"
        assert value not in sent, f"{name} leaked into a message"
