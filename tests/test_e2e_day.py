"""The owner's whole day, end to end: relay and worker as separate processes, fakes around them.

Cold start with the waking message, progress, approval with image, approve -> PR, a second
prompt -> reject, a long run -> cancel, `screenshot <url>`, `status`, and the worker's idle exit.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from common.config import mask_phone
from fakes.anthropic import Text, bash, edit, write
from fakes.origin import branches, show
from fakes.wiring import AUTH_TOKEN, GITHUB_TOKEN, OWNER
from tests.support.pair_harness import pair_stack
from tests.support.processes import wait_exit
from tests.support.waiting import wait_for
from tests.test_worker_control import pids_with

pytestmark = pytest.mark.anyio
STEP = 60.0


async def test_an_owners_day(tmp_path: Path) -> None:
    async with pair_stack(tmp_path, idle_ms="4000") as pair:
        marker = f"textslash-day-{time.time_ns()}"
        checkout, twilio = pair.checkout, pair.twilio
        pair.model.script("add a greeting", write(f"{checkout}/hello.py", "print('hello')\n"), Text("Added hello.py."))
        pair.model.script("shout it", edit(f"{checkout}/hello.py", "'hello'", "'HELLO'"), Text("Now it shouts."))
        pair.model.script("long job", bash(f"python3 -c 'import time; time.sleep(120)' {marker}"), Text("never"))
        await pair.start_relay()

        # Cold start: the worker is not even listening when the first prompt arrives.
        await pair.text("add a greeting")
        await wait_for(lambda: pair.said("Waking up your VM"), STEP, "the waking message")
        await pair.start_worker(wait=False)
        await wait_for(lambda: pair.said("Working on it"), STEP, "the working message")
        await wait_for(lambda: pair.said("✏️ editing hello.py"), STEP, "progress")
        await wait_for(lambda: [m for m in twilio.messages if "approve" in m.buttons], STEP, "approval buttons")
        assert pair.said("hello.py +1 −0")
        picture = await wait_for(lambda: [m for m in twilio.messages if m.media], STEP, "the diff's picture")
        image = await pair.http.get(pair.relay_url + re.sub(r"^https://[^/]+", "", picture[0].media[0]))
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")

        await pair.text("approve")
        opened = await wait_for(lambda: pair.said("Pull request opened"), STEP, "the PR link")
        assert "https://github.com/owner/demo/pull/1" in opened[0]
        branch = pair.github.pulls[0]["head"]
        assert branch in branches(pair.origin) and show(pair.origin, branch, "hello.py") == "print('hello')\n"

        await pair.text("shout it")
        await wait_for(lambda: len([m for m in twilio.messages if "approve" in m.buttons]) == 2, STEP, "approval 2")
        await pair.text("reject")
        await wait_for(lambda: pair.said("Rolled back"), STEP, "rollback")
        assert (checkout / "hello.py").read_text() == "print('hello')\n"

        await pair.text("long job")
        await wait_for(lambda: pids_with(marker), STEP, "the long command")
        await pair.text("cancel")
        await wait_for(lambda: pair.said("Run cancelled"), STEP, "cancel confirmed")
        assert not pids_with(marker)

        await pair.text(f"screenshot {pair.worker_url}/test-app")
        await wait_for(lambda: len([m for m in twilio.messages if m.media]) == 3, STEP, "the screenshot")
        await pair.text("screenshot file:///etc/passwd")  # the worker's own files are not pages
        refused = await wait_for(lambda: pair.said("Could not capture file:///etc/passwd"), STEP, "the refusal")
        assert "only http:// and https://" in refused[0] and "root:x:0:0" not in "".join(twilio.bodies())

        await pair.text("status")
        status = await wait_for(lambda: pair.said("VM:"), STEP, "status")
        assert "Idle" in status[0] and "awake" in status[0]

        # Nothing left to do: the worker stops itself, and says so.
        assert pair.worker is not None and await wait_exit(pair.worker, 30) == 0
        await pair.text("status")
        await wait_for(lambda: any("asleep" in b for b in pair.said("VM:")), STEP, "status after sleep")

        assert len(pair.said("Waking up your VM")) == 1  # once, for the cold start
        assert len(pair.said("Pull request opened")) == 1 and len(pair.said("Rolled back")) == 1

        # No secret appears in any log line of either process, nor in anything sent to the phone.
        logs = pair.logs()
        assert "Application startup complete" in logs  # the logs are really there
        sent = "\n".join(twilio.bodies())
        secrets = {
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "WORKER_TOKEN": pair.relay_env["WORKER_TOKEN"],
            "GITHUB_TOKEN": GITHUB_TOKEN,
            "ANTHROPIC_API_KEY": pair.worker_env["ANTHROPIC_API_KEY"],
        }
        for name, value in secrets.items():
            assert value not in logs, f"{name} leaked into a log"
            assert value not in sent, f"{name} leaked into a message"
        # Nor an image's name, which is all it takes to fetch the image from the public relay.
        names = [url.rsplit("/", 1)[-1] for m in twilio.messages for url in m.media]
        assert len(names) == 3 and [n for n in names if n.removesuffix(".png") in logs] == []
        # Nor the owner's number: the relay logs each event with the number masked.
        assert OWNER not in logs and f"{mask_phone(OWNER)}: owner, idle -> working" in logs
