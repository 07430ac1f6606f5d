"""Cancel, screenshots, images, auth and failures on the worker, with the real CLI and Chromium."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fakes.anthropic import Text, ToolUse, bash, write
from fakes.wiring import OWNER, WORKER_TOKEN, new_message_id
from fakes.worker import PNG
from tests.support.waiting import wait_for
from tests.support.worker_harness import WorkerStack, worker_stack

pytestmark = pytest.mark.anyio
RUN_TIMEOUT = 60.0
AUTH = {"Authorization": f"Bearer {WORKER_TOKEN}"}


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[WorkerStack]:
    async with worker_stack(tmp_path) as stack:
        yield stack


def pids_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


async def test_cancel_during_a_long_bash_call_ends_every_process_of_the_run(worker: WorkerStack) -> None:
    marker = f"textslash-long-{time.time_ns()}"
    checkout = worker.checkout()
    worker.anthropic.script(
        "long job",
        write(f"{checkout}/partial.txt", "half done\n"),
        bash(
            f"python3 -c 'import time; time.sleep(120)' {marker} & python3 -c 'import time; time.sleep(120)' {marker}",
            "wait a long time",
        ),
        Text("never reached"),
    )
    await worker.command("long job")
    await wait_for(lambda: len(pids_with(marker)) >= 2, RUN_TIMEOUT, "the long Bash call to start")
    asked = time.monotonic()
    response = await worker.decide("cancel")
    assert response.status_code == 202 and response.json()["state"] == "cancelling"
    await wait_for(lambda: not pids_with(marker), 5.0, "every process of the run to end")
    assert time.monotonic() - asked < 5.0
    cancelled = await wait_for(lambda: worker.relay.of_type("cancelled"), 10, "cancelled report")
    # What the cancelled run left goes to approval like any other run's.
    assert cancelled[0]["changes"] is True
    approval = await wait_for(lambda: worker.relay.of_type("approval_required"), 20, "approval")
    assert [f["path"] for f in approval[0]["files"]] == ["partial.txt"]
    again = await worker.decide("cancel")
    assert again.status_code == 200 and again.json()["state"] == "awaiting_approval"


async def test_owner_screenshot_of_a_local_page(worker: WorkerStack) -> None:
    await worker.screenshot(f"{worker.url}/test-app")
    notice = await wait_for(lambda: worker.relay.of_type("notice"), 30, "screenshot notice")
    name = notice[0]["images"][0]
    image = await worker.http.get(f"{worker.url}/images/{name}", headers=AUTH)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG") and len(image.content) > 5000
    assert (worker.settings.images_dir / name).is_file()


async def test_a_screenshot_that_fails_says_why(worker: WorkerStack) -> None:
    await worker.screenshot("http://127.0.0.1:9/nothing-listens-here")
    notice = await wait_for(lambda: worker.relay.of_type("notice"), 30, "failure notice")
    assert "Could not capture" in notice[0]["text"] and not notice[0].get("images")


async def test_claude_uses_the_screenshot_tool_and_sees_the_picture(worker: WorkerStack) -> None:
    worker.anthropic.script(
        "look at the app",
        ToolUse("mcp__textslash__screenshot", {"url": f"{worker.url}/test-app"}),
        Text("It shows a greeting."),
    )
    await worker.command("look at the app")
    await wait_for(lambda: worker.relay.of_type("answer"), RUN_TIMEOUT, "answer")
    notice = worker.relay.of_type("notice")
    assert notice and notice[0]["images"]
    assert "📸 screenshot of" in " ".join(e["text"] for e in worker.relay.of_type("progress"))
    results = [
        b
        for r in worker.anthropic.requests
        for m in r["messages"]
        if isinstance(m["content"], list)
        for b in m["content"]
        if b.get("type") == "tool_result"
    ]
    assert any(
        isinstance(r.get("content"), list) and any(c.get("type") == "image" for c in r["content"]) for r in results
    )


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e/%2e%2e/etc/passwd",
        "%2E%2E%2Fsecret.png",
        "/etc/passwd",
        "%2Fetc%2Fpasswd",
        "....//....//etc/passwd",
        "link0123456789abcdef.png",
        "..",
        ".",
        "abcdefghijklmnopqrstuv.png/../../x",
        "abcdefghijklmnop%00.png",
    ],
)
async def test_images_route_refuses_every_way_out(worker: WorkerStack, name: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG)
    link = worker.settings.images_dir / "link0123456789abcdef.png"
    if not link.exists():
        link.symlink_to(secret)
    response = await worker.http.get(f"{worker.url}/images/{name}", headers=AUTH)
    assert response.status_code == 404
    assert PNG not in response.content


@pytest.mark.parametrize("route", ["command", "approve", "reject", "cancel"])
@pytest.mark.parametrize("token", ["", "wrong-token"])
async def test_every_route_but_health_needs_the_token(worker: WorkerStack, route: str, token: str) -> None:
    response = await worker.post(route, {"phone": OWNER, "text": "hi", "message_id": "m"}, token=token)
    assert response.status_code == 401
    assert worker.anthropic.requests == []
    assert (await worker.http.get(f"{worker.url}/images/abcdefghijklmnopqrstuv.png")).status_code == 401


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param(b"not json", 400, id="not-json"),
        pytest.param(b"[1, 2]", 422, id="array"),
        pytest.param(b'{"phone": "12345", "text": "hi", "message_id": "m"}', 422, id="bad-phone"),
        pytest.param(b'{"phone": "+15550001111", "text": "", "message_id": "m"}', 422, id="empty-text"),
        pytest.param(b'{"phone": "+15550001111", "text": "hi"}', 422, id="no-message-id"),
        pytest.param(b'{"phone": "+15550001111", "text": "hi", "message_id": 7}', 422, id="numeric-message-id"),
    ],
)
async def test_malformed_commands_get_a_4xx(worker: WorkerStack, body: bytes, status: int) -> None:
    response = await worker.http.post(
        f"{worker.url}/command", content=body, headers={**AUTH, "content-type": "application/json"}
    )
    assert response.status_code == status


async def test_a_second_command_with_the_same_message_id_is_a_no_op(worker: WorkerStack) -> None:
    worker.anthropic.script("only once", Text("done"))
    message_id = new_message_id()
    await worker.command("only once", message_id=message_id)
    again = await worker.post("command", {"phone": OWNER, "text": "only once", "message_id": message_id})
    assert again.status_code == 200 and again.json()["run_id"] in ("", message_id)
    await wait_for(lambda: worker.relay.of_type("answer"), RUN_TIMEOUT)
    assert len([r for r in worker.anthropic.requests if "only once" in str(r["messages"])]) == 1


async def test_approve_with_nothing_waiting_is_a_409_with_a_reason(worker: WorkerStack) -> None:
    response = await worker.decide("approve")
    assert response.status_code == 409 and "nothing is waiting" in response.json()["detail"]


async def test_a_failed_pull_request_is_reported_and_the_changes_stay(worker: WorkerStack) -> None:
    checkout = worker.checkout()
    worker.anthropic.script("small change", write(f"{checkout}/x.txt", "x\n"), Text("done"))
    await worker.command("small change")
    await wait_for(lambda: worker.relay.of_type("approval_required"), RUN_TIMEOUT)
    worker.github.fail_next.append(502)
    await worker.decide("approve")
    failed = await wait_for(lambda: worker.relay.of_type("approve_failed"), 30, "failure report")
    assert "502" in failed[0]["text"]
    assert (checkout / "x.txt").read_text() == "x\n"
    await worker.decide("approve")  # another try goes through
    opened = await wait_for(lambda: worker.relay.of_type("pr_opened"), 30)
    assert opened[0]["url"].endswith("/pull/1") and len(worker.github.pulls) == 1
