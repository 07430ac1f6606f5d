"""A warm agent: each owner's Claude Code CLI stays open between prompts, stopped, and a follow-up
is a new query on it. Nothing else of the agent's outlives a run, the agent can neither trace
nor wake its CLI, and `new`, a CLI that died, cancel and WARM_AGENT=off all do what the owner
expects. The worker runs with the real CLI against the scripted model."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from fakes.anthropic import Text, bash
from fakes.wiring import OWNER
from tests.support.processes import clis_of, process_state
from tests.support.waiting import wait_for
from tests.support.worker_harness import WorkerStack, worker_stack
from tests.test_worker_control import pids_with

pytestmark = pytest.mark.anyio
RUN_TIMEOUT = 60.0
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="agents run as their own users only when the worker is root")


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[WorkerStack]:
    async with worker_stack(tmp_path) as stack:
        yield stack


def clis() -> list[int]:
    """Claude Code processes this test's worker started (it runs in this process)."""
    return clis_of(os.getpid())


async def kept_cli(worker: WorkerStack) -> int:
    """The one CLI kept after a run: stopped, so it runs nothing."""
    found = await wait_for(lambda: [pid for pid in clis() if process_state(pid) == "T"], 10, "a stopped CLI")
    assert clis() == found and len(found) == 1
    return int(found[0])


def requests_with(worker: WorkerStack, text: str) -> list[list[str]]:
    return [texts for texts in worker.anthropic.prompts_seen() if any(text in t for t in texts)]


async def answers(worker: WorkerStack, n: int) -> None:
    await wait_for(lambda: len(worker.relay.of_type("answer")) >= n, RUN_TIMEOUT, f"answer {n}")


async def start_long_job(worker: WorkerStack, tag: str) -> str:
    """A run whose Bash call (marked, to be found among processes) waits two minutes; "after
    that" is scripted for the prompt that follows. Returns the marker once the call runs."""
    marker = f"textslash-{tag}-{time.time_ns()}"
    worker.anthropic.script(
        "long job",
        bash(f"python3 -c 'import time; time.sleep(120)' {marker} & sleep 120", "wait a long time"),
        Text("never reached"),
    )
    worker.anthropic.script("after that", Text("Ready."))
    await worker.command("long job")
    await wait_for(lambda: pids_with(marker), RUN_TIMEOUT, "the long Bash call to start")
    return marker


async def test_a_follow_up_is_a_new_query_on_the_cli_kept_stopped_since_the_last_prompt(worker: WorkerStack) -> None:
    worker.anthropic.script("remember the number 4172", Text("Noted."))
    worker.anthropic.script("which number", Text("4172."))
    await worker.command("remember the number 4172")
    await answers(worker, 1)
    cli = await kept_cli(worker)
    await worker.command("which number")
    await answers(worker, 2)
    assert await kept_cli(worker) == cli  # the same process took the follow-up, and is stopped again
    [follow_up] = requests_with(worker, "which number")
    assert any("remember the number 4172" in t for t in follow_up)  # on the same session


HOSTILE = """
import ctypes, os, subprocess
pid = os.getppid()
while pid > 1 and open(f"/proc/{pid}/comm").read().strip() != "claude":
    pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
libc = ctypes.CDLL(None, use_errno=True)
traced = libc.ptrace(16, pid, 0, 0)
results = [f"ptrace {traced} {ctypes.get_errno()}"]
for name in ("mem", "environ"):
    try:
        open(f"/proc/{pid}/{name}", "rb").read(1)
        results.append(f"{name} read")
    except OSError as exc:
        results.append(f"{name} {exc.errno}")
open("probe.txt", "w").write("\\n".join(results) + "\\n")
# Once the turn is over, keep trying to wake the CLI that the worker stops.
subprocess.Popen(["sh", "-c", f"while kill -CONT {pid}; do sleep 0.01; done"], start_new_session=True)
"""


@as_root
async def test_the_agent_can_neither_trace_nor_read_nor_wake_its_kept_cli(worker: WorkerStack, tmp_path: Path) -> None:
    (tmp_path / "hostile.py").write_text(HOSTILE)
    os.chmod(tmp_path / "hostile.py", 0o644)
    worker.anthropic.script("probe", bash(f"python3 {tmp_path}/hostile.py", "probe"), Text("Probed."))
    worker.anthropic.script("and now", Text("Still here."))
    await worker.command("probe")
    await wait_for(lambda: worker.relay.of_type("approval_required"), RUN_TIMEOUT, "the approval request")
    probe = (worker.checkout() / "probe.txt").read_text().split("\n")
    assert probe[:3] == ["ptrace -1 1", "mem 13", "environ 13"]  # EPERM, EACCES: the CLI is undumpable
    cli = await kept_cli(worker)
    uid = worker.checkout().stat().st_uid
    assert _pids_of(uid) == [cli]  # the waking loop ended with the run; the CLI stays stopped
    # A decision while the CLI is kept: reject restores the checkout, and the CLI takes what follows.
    assert (await worker.decide("reject")).status_code == 202
    await wait_for(lambda: worker.relay.of_type("rolled_back"), 30, "the rollback")
    assert not (worker.checkout() / "probe.txt").exists()
    await worker.command("and now")
    await answers(worker, 2)
    assert await kept_cli(worker) == cli


def _pids_of(uid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if fields["Uid"].split()[0] == str(uid) and not fields["State"].strip().startswith("Z"):
            found.append(int(status.parent.name))
    return found


async def test_a_kept_cli_that_died_is_replaced_and_the_session_resumed(worker: WorkerStack) -> None:
    worker.anthropic.script("remember the colour teal", Text("Noted."))
    worker.anthropic.script("which colour", Text("Teal."))
    await worker.command("remember the colour teal")
    await answers(worker, 1)
    cli = await kept_cli(worker)
    os.kill(cli, signal.SIGKILL)  # the OOM killer, say
    await wait_for(lambda: cli not in clis(), 10, "the CLI to die")
    await worker.command("which colour")
    await answers(worker, 2)
    assert worker.relay.of_type("answer")[1]["text"] == "Teal."
    assert await kept_cli(worker) != cli
    [follow_up] = requests_with(worker, "which colour")
    assert any("remember the colour teal" in t for t in follow_up)


async def test_new_closes_the_kept_cli_and_starts_fresh(worker: WorkerStack) -> None:
    worker.anthropic.script("remember the city Lyon", Text("Noted."))
    worker.anthropic.script("fresh start", Text("Hi."))
    await worker.command("remember the city Lyon")
    await answers(worker, 1)
    cli = await kept_cli(worker)
    await worker.command("fresh start", new_session=True)
    await answers(worker, 2)
    assert await kept_cli(worker) != cli
    [fresh] = requests_with(worker, "fresh start")
    assert not any("Lyon" in t for t in fresh)


async def test_cancel_interrupts_the_turn_ends_its_processes_and_keeps_the_cli(worker: WorkerStack) -> None:
    marker = await start_long_job(worker, "warm")
    [cli] = clis()
    asked = time.monotonic()
    assert (await worker.decide("cancel")).status_code == 202
    await wait_for(lambda: not pids_with(marker), 5.0, "every process of the run to end")
    assert time.monotonic() - asked < 5.0
    await wait_for(lambda: worker.relay.of_type("cancelled"), 10, "the cancelled report")
    assert await kept_cli(worker) == cli  # the turn was interrupted, not the CLI ended
    await worker.command("after that")
    await answers(worker, 1)
    assert worker.relay.of_type("answer")[0]["text"] == "Ready."
    assert await kept_cli(worker) == cli


async def test_with_warm_agent_off_no_cli_outlives_a_run(tmp_path: Path) -> None:
    async with worker_stack(tmp_path, WARM_AGENT="off") as worker:
        worker.anthropic.script("one", Text("1"))
        worker.anthropic.script("two", Text("2"))
        await worker.command("one")
        await answers(worker, 1)
        await worker.settled()
        assert clis() == []
        await worker.command("two")
        await answers(worker, 2)
        [second] = requests_with(worker, "two")
        assert any("one" in t for t in second)  # the session still carries on, from disk


@as_root
async def test_a_turn_that_failed_leaves_no_cli_kept_and_the_next_prompt_runs(worker: WorkerStack) -> None:
    """The first progress report cannot be written (the worker's volume refuses writes), which
    fails the turn while the CLI lives on: that client must not be kept for the next prompt."""
    spool = worker.settings.state_dir / "outbox"
    owner_file = worker.settings.state_dir / "owners" / f"{OWNER.lstrip('+')}.json"
    worker.anthropic.script("first", bash("echo hi > a.txt", "say hi"), Text("Done."))
    worker.anthropic.script("second", Text("Second answer."))
    await anyio.run_process(["chattr", "+i", str(spool)])
    try:
        await worker.command("first")
        await wait_for(lambda: '"state": "idle"' in owner_file.read_text(), RUN_TIMEOUT, "the failed run to end")
    finally:
        await anyio.run_process(["chattr", "-i", str(spool)])
    await worker.command("second")  # at once: within the 10 s the SDK gives a closing CLI
    await wait_for(lambda: worker.relay.of_type("answer"), RUN_TIMEOUT, "the second answer")
    assert worker.relay.of_type("answer")[0]["text"] == "Second answer."


async def test_a_runs_cost_is_its_own_though_the_kept_cli_counts_its_whole_life(worker: WorkerStack) -> None:
    worker.anthropic.script("first question", Text("One."))
    worker.anthropic.script("second question", Text("Two."))
    await worker.command("first question")
    await answers(worker, 1)
    await kept_cli(worker)
    await worker.command("second question")
    await answers(worker, 2)
    first, second = worker.relay.of_type("answer")
    # The same one model request each (the fake's usage is fixed): the same cost, never the sum.
    assert first["cost_usd"] > 0 and second["cost_usd"] == pytest.approx(first["cost_usd"])
    assert (first["input_tokens"], first["output_tokens"]) == (100, 20) == (second["input_tokens"], 20)


async def test_the_model_asked_for_reaches_the_model_and_a_change_of_model_starts_a_cli(
    worker: WorkerStack,
) -> None:
    worker.anthropic.script("in haiku", Text("Quick."))
    worker.anthropic.script("in opus", Text("Deep."))
    await worker.command("in haiku", model="haiku")
    await answers(worker, 1)
    cli = await kept_cli(worker)
    await worker.command("in opus", model="opus")
    await answers(worker, 2)
    models = [r["model"] for r in worker.anthropic.requests if any("in " in t for t in _texts(r))]
    assert "haiku" in models[0] and "opus" in models[-1]
    assert await kept_cli(worker) != cli  # the model is the CLI's for its life: a new one resumed the session
    [follow_up] = requests_with(worker, "in opus")
    assert any("in haiku" in t for t in follow_up)


async def test_a_run_that_reaches_its_budget_stops_and_says_so(worker: WorkerStack) -> None:
    worker.anthropic.script("expensive", Text("Thinking..."), Text("never reached"))
    await worker.command("expensive", budget_usd=0.00001)
    error = await wait_for(lambda: worker.relay.of_type("answer", "error"), RUN_TIMEOUT, "the run's end")
    assert error[0]["type"] == "error" and error[0]["stop"] == "budget" and error[0]["cost_usd"] > 0.00001
    # Claude Code counts a budget over its CLI's life: a CLI with one takes one run, then ends.
    await worker.settled()
    await wait_for(lambda: not clis(), 10, "the budgeted CLI to end")
    worker.anthropic.script("next one", Text("Fine."))
    await worker.command("next one", budget_usd=0.5)
    await answers(worker, 1)


def _texts(request: dict[str, object]) -> list[str]:
    messages = request.get("messages")
    return [str(m) for m in messages] if isinstance(messages, list) else []


async def test_a_cancelled_run_reports_what_it_cost(worker: WorkerStack) -> None:
    # The model was asked (and paid) before the cancel: the run's end says so, or the month's
    # usage misses it and a budget can be run past by cancelling. The next run counts its own.
    await start_long_job(worker, "cost")
    assert (await worker.decide("cancel")).status_code == 202
    [cancelled] = await wait_for(lambda: worker.relay.of_type("cancelled"), 10, "the cancelled report")
    assert cancelled["cost_usd"] > 0 and cancelled["input_tokens"] == 100
    await worker.settled()
    await worker.command("after that")
    await answers(worker, 1)
    [answer] = worker.relay.of_type("answer")
    assert answer["cost_usd"] == pytest.approx(cancelled["cost_usd"])  # one model request each
