"""A run cut short by a crash continues once at the next boot, in its session (vm/resume.py).

The pair as deployed (`python -m relay`, `python -m vm`), the real Claude Code CLI against the
scripted model, and the worker SIGKILLed while the model's tool call holds the turn."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from fakes.anthropic import Text, bash, write
from fakes.wiring import OWNER
from fakes.worker import PNG
from tests.support.pair_harness import Pair, pair_stack
from tests.support.processes import clis_of
from tests.support.waiting import wait_for
from tests.test_media_pair import PDF
from tests.test_worker_control import pids_with
from vm.workspace import ATTACHMENTS_DIR

pytestmark = pytest.mark.anyio
STEP = 60.0
NOTICE = "♻️ The VM restarted; continuing your run"
# A piece of the message that continues the session: the scripted model's key for what it does then.
RESTATED = "restarted while you were working on the request below"


def long_command(tag: str) -> tuple[str, Any]:
    """A marker, and a Bash call that holds the turn until the worker dies."""
    marker = f"textslash-{tag}-{time.time_ns()}"
    return marker, bash(f"python3 -c 'import time; time.sleep(120)' {marker}")


def tool_uses(request: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        block
        for message in request["messages"]
        if message["role"] == "assistant" and isinstance(message["content"], list)
        for block in message["content"]
        if block.get("type") == "tool_use"
    ]


def owner_file(pair: Pair) -> Path:
    return Path(pair.worker_env["WORKSPACE_DIR"]) / ".textslash" / "owners" / f"{OWNER.lstrip('+')}.json"


def owner_state(pair: Pair) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(owner_file(pair).read_text())
    return data


async def crash_mid_run(pair: Pair, marker: str) -> None:
    """SIGKILL the worker while the run's command holds the turn, and start it again."""
    await wait_for(lambda: pids_with(marker), STEP, "the run to be under way")
    await pair.kill("worker")
    await pair.start_worker()


async def test_a_run_cut_short_by_a_kill_continues_in_its_session_and_answers(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        marker, hold = long_command("resume")
        # Checked first (the scripted model takes the first key the latest prompt holds): the
        # restated message also holds the original prompt's words.
        pair.model.script(RESTATED, write(f"{pair.checkout}/rest.txt", "rest\n"), Text("finished after the restart"))
        pair.model.script("risky job", write(f"{pair.checkout}/half.txt", "half\n"), hold, Text("never"))
        await pair.start_relay()
        await pair.start_worker()
        await pair.text("risky job")
        await crash_mid_run(pair, marker)
        await wait_for(lambda: pair.said(NOTICE), STEP, "the owner told the run goes on")
        answer = await wait_for(lambda: pair.said("finished after the restart"), STEP, "the run's answer")
        assert answer[0].startswith("✅ Done")

        # The session went on: the request that continued it carries the transcript from before
        # the crash (the prompt, the file written, the command cut short) and the restated prompt.
        continued = next(r for r in pair.model.requests if any(RESTATED in t for t in _texts(r)))
        texts = _texts(continued)
        assert "risky job" in texts[:-1]  # the original prompt, as the session recorded it
        assert "risky job" in texts[-1] and "check the checkout" in texts[-1]
        before = [(u["name"], u["input"].get("file_path") or u["input"].get("command")) for u in tool_uses(continued)]
        assert ("Write", f"{pair.checkout}/half.txt") in before
        assert any(name == "Bash" and marker in str(what) for name, what in before)

        # The diff is against the snapshot the run started from: what it wrote before the crash
        # and after it, in one approval request.
        approval = await wait_for(lambda: pair.said("rest.txt +1"), STEP, "the approval request")
        assert "half.txt +1" in approval[0]
        bodies = pair.twilio.bodies()
        assert bodies.index(pair.said(NOTICE)[0]) < bodies.index(answer[0])
        assert len(pair.said(NOTICE)) == 1 and not pair.said("The run failed")
        await pair.text("approve")
        await wait_for(lambda: pair.said("Pull request opened"), STEP, "the pull request")


async def test_a_run_cut_short_twice_is_reported_failed_with_its_changes(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        first, hold = long_command("first")
        second, hold_again = long_command("second")
        pair.model.script(RESTATED, write(f"{pair.checkout}/rest.txt", "rest\n"), hold_again, Text("never"))
        pair.model.script("risky job", write(f"{pair.checkout}/half.txt", "half\n"), hold, Text("never"))
        await pair.start_relay()
        await pair.start_worker()
        await pair.text("risky job")
        await crash_mid_run(pair, first)
        await wait_for(lambda: pair.said(NOTICE), STEP, "the run continued")
        await crash_mid_run(pair, second)
        told = await wait_for(lambda: pair.said("The run failed"), STEP, "the owner told")
        assert "restarted during the run again" in told[0]
        # Everything the run left, before either crash, waits for a decision.
        approval = await wait_for(lambda: pair.said("half.txt +1"), STEP, "approval for what it left")
        assert "rest.txt +1" in approval[0]
        assert len(pair.said(NOTICE)) == 1  # continued once, never twice
        await pair.text("reject")
        await wait_for(lambda: pair.said("Rolled back"), STEP, "rollback")
        assert not (pair.checkout / "half.txt").exists() and not (pair.checkout / "rest.txt").exists()
        for fragment in ("The run failed", "half.txt +1", "Rolled back"):
            assert len(pair.said(fragment)) == 1, fragment


async def test_a_cancel_cut_short_is_reported_not_continued(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        marker, hold = long_command("cancel")
        pair.model.script(RESTATED, Text("continued a cancelled run"))
        pair.model.script("risky job", write(f"{pair.checkout}/half.txt", "half\n"), hold, Text("never"))
        await pair.start_relay()
        await pair.start_worker()
        await pair.text("risky job")
        await wait_for(lambda: pids_with(marker), STEP, "the run to be under way")
        # The CLI, stopped, cannot end its turn: the cancel stays under way until the kill.
        assert pair.worker is not None
        for cli in clis_of(pair.worker.pid):
            os.kill(cli, signal.SIGSTOP)
        await pair.text("cancel")
        await wait_for(lambda: owner_state(pair)["state"] == "cancelling", STEP, "the cancel under way")
        await pair.kill("worker")
        assert owner_state(pair)["state"] == "cancelling"
        await pair.start_worker()
        told = await wait_for(lambda: pair.said("The run failed"), STEP, "the owner told")
        assert "restarted during the run" in told[0]
        await wait_for(lambda: pair.said("half.txt +1"), STEP, "approval for what it left")
        assert not pair.said(NOTICE)
        assert not any(RESTATED in t for r in pair.model.requests for t in _texts(r))


async def test_a_continued_run_names_the_files_it_was_sent_without_a_second_copy(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        marker, hold = long_command("files")
        pair.model.script(RESTATED, Text("read them again"))
        pair.model.script("use these", write(f"{pair.checkout}/page.html", "<h1>hi</h1>\n"), hold, Text("never"))
        photo = pair.twilio.add_media(PNG, "image/png")
        brief = pair.twilio.add_media(PDF, "application/pdf", filename="brief.pdf")
        await pair.start_relay()
        await pair.start_worker()
        await pair.text("use these", media=[(photo, "image/png"), (brief, "application/pdf")])
        await crash_mid_run(pair, marker)
        await wait_for(lambda: pair.said("read them again"), STEP, "the run's answer")
        continued = next(r for r in pair.model.requests if any(RESTATED in t for t in _texts(r)))
        restated = _texts(continued)[-1]
        saved = sorted((pair.checkout / ATTACHMENTS_DIR).iterdir())
        assert [p.name for p in saved] == ["brief.pdf", "photo-1.png"]  # received once: no brief-2.pdf
        for path in saved:
            assert str(path.relative_to(pair.checkout)) in restated
        assert "open an image to see it again" in restated


async def test_a_run_with_no_session_on_disk_goes_on_in_a_new_one(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        marker, hold = long_command("fresh")
        pair.model.script(RESTATED, Text("started over"))
        pair.model.script("risky job", write(f"{pair.checkout}/half.txt", "half\n"), hold, Text("never"))
        await pair.start_relay()
        await pair.start_worker()
        await pair.text("risky job")
        await wait_for(lambda: pids_with(marker), STEP, "the run to be under way")
        await pair.kill("worker")
        # As if it died before Claude Code named its session (or a worker from before saved none).
        state = owner_state(pair)
        assert state["sessions"], "the session was saved while the run went"
        state["sessions"] = {}
        owner_file(pair).write_text(json.dumps(state))
        await pair.start_worker()
        await wait_for(lambda: pair.said("started over"), STEP, "the run's answer")
        continued = next(r for r in pair.model.requests if any(RESTATED in t for t in _texts(r)))
        assert "risky job" not in _texts(continued)[:-1] and not tool_uses(continued)  # a new session
        await wait_for(lambda: pair.said("half.txt +1"), STEP, "what the first part wrote, for approval")


def _texts(request: dict[str, Any]) -> list[str]:
    return [
        block["text"] if isinstance(block, dict) else str(block)
        for message in request["messages"]
        if message["role"] == "user"
        for block in (message["content"] if isinstance(message["content"], list) else [message["content"]])
        if not isinstance(block, dict) or block.get("type") == "text"
    ]
