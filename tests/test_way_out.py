"""The way out: whatever the relay and the worker believed, the phone gets the owner out.

Each test here was a defect of the code before issue 10, reproduced through the real
processes where it lived: a worker that lost its run, a relay that lost its database, a
spool file left garbled by a crash, a reject that meets a file it cannot delete, a command
that arrives as the worker decides to sleep, late reports of an old run.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import anyio
import httpx
import pytest

from common.protocol import Answer, Report, decode_answer, encode_report
from fakes.anthropic import Text, bash, write
from fakes.wiring import OWNER, OWNER2, new_message_id
from tests.support.pair_harness import pair_stack
from tests.support.processes import child, wait_exit, wait_healthy
from tests.support.relay_harness import Stack, relay_stack
from tests.support.waiting import wait_for
from tests.support.worker_harness import worker_stack
from tests.test_worker_control import pids_with
from tests.test_worker_process import AUTH, fakes

pytestmark = pytest.mark.anyio
STEP = 60.0


async def test_a_worker_that_lost_the_run_is_left_with_one_cancel(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        marker = f"textslash-wipe-{time.time_ns()}"
        pair.model.script("long job", bash(f"python3 -c 'import time; time.sleep(120)' {marker}"), Text("never"))
        pair.model.script("after", Text("the answer after"))
        await pair.start_relay()
        await pair.start_worker()
        await pair.text("long job")
        await wait_for(lambda: pids_with(marker), STEP, "the run to be under way")
        await pair.kill("worker")
        # The volume comes back without the worker's state: it knows of no run at all.
        shutil.rmtree(Path(pair.worker_env["WORKSPACE_DIR"]) / ".textslash")
        await pair.start_worker()
        await pair.text("cancel")
        told = await wait_for(lambda: pair.said("no run going"), STEP, "the owner told the run is gone")
        assert len(told) == 1 and len(pair.said("Cancelling")) == 1
        await pair.text("after")
        await wait_for(lambda: pair.said("the answer after"), STEP, "a new prompt to run")
        assert not pair.said("Already cancelling") and not pair.said("Queued")


async def test_a_relay_that_lost_its_database_reaches_the_changes_with_approve(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        pair.model.script("make it", write(f"{pair.checkout}/made.txt", "made\n"), Text("made"))
        await pair.start_relay()
        await pair.start_worker()
        await pair.text("make it")
        await wait_for(lambda: pair.said("made.txt +1"), STEP, "the approval request")
        await pair.kill("relay")
        for name in ("relay.sqlite3", "relay.sqlite3-wal", "relay.sqlite3-shm"):
            (tmp_path / name).unlink(missing_ok=True)
        await pair.start_relay()
        await pair.text("approve")
        opened = await wait_for(lambda: pair.said("Pull request opened"), STEP, "the pull request")
        assert opened[0].endswith("/pull/1") and len(pair.github.pulls) == 1
        assert not pair.said("Nothing is waiting")


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file immutable (chattr +i) needs root")
async def test_a_garbled_spool_and_an_undeletable_file_leave_a_worker_that_serves_and_sleeps(tmp_path: Path) -> None:
    async with fakes(tmp_path, IDLE_TIMEOUT_MS="2000") as f, httpx.AsyncClient(timeout=30) as http:
        checkout = Path(f.env["WORKSPACE_DIR"]) / OWNER.lstrip("+")
        spool = Path(f.env["WORKSPACE_DIR"]) / ".textslash" / "outbox"
        spool.mkdir(parents=True)
        (spool / f"{1:020d}.json").write_bytes(b"")  # what a crash before the sync leaves
        (spool / f"{2:020d}.json").write_bytes(b'{"phone": "+1555')
        f.anthropic.script("make junk", write(f"{checkout}/stuck.txt", "junk\n"), Text("made junk"))
        f.anthropic.script("next one", Text("still here"))
        stuck = checkout / "stuck.txt"
        try:
            with child("vm", f.env, f.log) as proc:
                await wait_healthy(f.url, proc)
                await post_command(http, f.url, "make junk")
                await wait_for(lambda: f.relay.of_type("approval_required"), STEP, "the approval")
                # The file cannot be deleted by anyone short of CAP_LINUX_IMMUTABLE, which the
                # worker's capability set does not hold.
                await anyio.run_process(["chattr", "+i", str(stuck)])
                assert (await http.post(f"{f.url}/reject", json={"phone": OWNER}, headers=AUTH)).status_code == 202
                rolled = await wait_for(lambda: f.relay.of_type("rolled_back", "reject_failed"), STEP, "reject")
                assert rolled[0]["type"] == "rolled_back" and rolled[0]["left_out"] == ["stuck.txt"]
                await post_command(http, f.url, "next one")
                await wait_for(lambda: f.relay.of_type("answer")[1:], STEP, "the next prompt's answer")
                assert (await http.get(f"{f.url}/health")).status_code == 200
                assert await wait_exit(proc, 20) == 0  # and it still goes to sleep
        finally:
            await anyio.run_process(["chattr", "-i", str(stuck)], check=False)
        left = sorted(p.name for p in spool.iterdir())
        assert len(left) == 2 and all(name.startswith(".bad-") for name in left), left
        assert "set aside" in f.log.read_text()


async def post_command(http: httpx.AsyncClient, url: str, text: str) -> str:
    message_id = new_message_id()
    response = await http.post(
        f"{url}/command", json={"phone": OWNER, "text": text, "message_id": message_id}, headers=AUTH
    )
    assert response.status_code == 202, response.text
    return message_id


@pytest.mark.parametrize("offset_s", [0.9, 0.98, 1.0, 1.02, 1.1, 1.4])
async def test_a_command_across_the_idle_exit_is_run_or_refused_never_dropped(tmp_path: Path, offset_s: float) -> None:
    async with fakes(tmp_path, IDLE_TIMEOUT_MS="1000") as f, httpx.AsyncClient(timeout=30) as http:
        f.anthropic.script("at the edge", Text("made it"))
        with child("vm", f.env, f.log) as proc:
            await wait_healthy(f.url, proc)
            touched = await http.post(f"{f.url}/status", json={"phone": OWNER}, headers=AUTH)
            assert touched.status_code == 200
            # The offset is the test's subject (when the command lands relative to the idle
            # timer), not a wait for something to happen.
            await anyio.sleep(offset_s)
            message_id = new_message_id()
            try:
                response = await http.post(
                    f"{f.url}/command",
                    headers=AUTH,
                    json={"phone": OWNER, "text": "at the edge", "message_id": message_id},
                )
            except httpx.TransportError:
                response = None  # already gone: the relay would wake it again
            assert await wait_exit(proc, 60) == 0
        if response is not None and response.status_code == 202:
            assert [e["run_id"] for e in f.relay.of_type("answer")] == [message_id]
        else:
            assert response is None or response.status_code == 503
            assert not f.relay.of_type("answer")


# --- the relay's side, with a fake worker ------------------------------------------------


async def test_reports_of_an_old_run_change_nothing(tmp_path: Path) -> None:
    async with relay_stack(tmp_path) as stack:
        run = await start_run(stack, "first")
        await stack.report("approval_required", run_id=run, files=[{"path": "a.py", "added": 1, "removed": 0}])
        await stack.report("answer", run_id=run, text="done", changes=True)
        await wait_for(lambda: said(stack, "above"), what="the answer after the approval")
        await stack.send("approve")
        await wait_for(lambda: "/approve" in stack.worker.paths(), what="approve")
        await stack.report("pr_opened", run_id=run, url="https://x/pull/1")
        await wait_for(lambda: said(stack, "pull/1"), what="the PR")
        before = list(stack.twilio.bodies(OWNER))
        for seq, kind in enumerate(("approval_required", "answer", "approve_failed", "progress"), start=100):
            late = Report(kind, run, text="late", changes=True, files=(("b.py", 1, 0, False),), seq=seq)
            response = await stack.worker.report_raw(stack.url, OWNER, encode_report(late))
            assert response.status_code == 200 and response.json()["duplicate"] is False
        second = await start_run(stack, "second")  # started at once: nothing waits
        assert second != run and not said(stack, "Queued") and not said(stack, "b.py")
        assert stack.twilio.bodies(OWNER)[len(before) :] == ["🤖 Working on it..."]


async def test_a_silent_run_the_worker_lost_is_checked_and_ended(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, STALL_CHECK_MS="500") as stack:
        await start_run(stack, "lost")
        stack.worker.states[OWNER] = Answer("idle")  # the worker restarted and knows of no run
        await wait_for(lambda: said(stack, "no run going"), what="the stall check")
        assert "/status" in stack.worker.paths()
        await start_run(stack, "again")


async def start_run(stack: Stack, text: str) -> str:
    before = len(stack.worker.commands())
    await stack.send(text)
    commands = await wait_for(lambda: stack.worker.commands()[before:], what=f"the command for {text!r}")
    await wait_for(lambda: stack.twilio.bodies(OWNER).count("🤖 Working on it...") > before, what="working")
    run_id: str = commands[0]["message_id"]
    return run_id


def said(stack: Stack, fragment: str) -> list[str]:
    return [b for b in stack.twilio.bodies(OWNER) if fragment in b]


async def test_both_halves_speak_one_protocol_version() -> None:
    from common import protocol

    assert protocol.VERSION == 3
    future = {"v": 4, "type": "answer", "run_id": "r", "seq": 1}
    with pytest.raises(protocol.ProtocolError, match="deploy the relay first"):
        protocol.decode_report(future)
    with pytest.raises(protocol.ProtocolError, match="deploy the worker first"):
        protocol.decode_command("command", {"v": 4, "phone": "+15550001111", "text": "hi", "message_id": "m"})
    # A version 2 prompt (no `unattended`) is an attended one.
    two = protocol.decode_command("command", {"v": 2, "phone": "+15550001111", "text": "hi", "message_id": "m"})
    assert isinstance(two, protocol.RunPrompt) and two.unattended is False
    # A version 1 message (a spool or a relay from before) is still read.
    old = protocol.decode_command("command", {"v": 1, "phone": "+15550001111", "text": "hi", "message_id": "m"})
    assert isinstance(old, protocol.RunPrompt) and old.repo == "" and old.attachments == ()


async def test_an_answer_says_how_many_of_the_owners_reports_are_still_on_their_way(tmp_path: Path) -> None:
    async with worker_stack(tmp_path) as worker:
        worker.relay.refuse = 10**6  # a relay down for a deploy: every report waits in the spool
        worker.anthropic.script("quick question", Text("the answer"))
        await worker.command("quick question")
        await wait_for(lambda: worker.settings.state_dir.joinpath("outbox").exists(), what="the spool")

        async def pending() -> int:
            answer = decode_answer((await worker.decide("status")).json())
            assert answer is not None
            return answer.pending if answer.state == "idle" else 0

        with anyio.fail_after(60):
            while await pending() < 1:  # the run is over, and its answer has not reached the relay
                await anyio.sleep(0.05)
        worker.relay.refuse = 0
        await wait_for(lambda: worker.relay.of_type("answer"), 30, "the answer delivered")
        assert await pending() == 0
        other = decode_answer((await worker.decide("status", phone=OWNER2)).json())
        assert other is not None and other.pending == 0  # another owner's reports are not theirs
