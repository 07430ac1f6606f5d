"""`python -m vm` as a real process: idle exit, restarts, SIGTERM."""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest

from fakes.anthropic import FakeAnthropic, Text, bash, write
from fakes.github import FakeGitHub
from fakes.origin import branches, make_origin
from fakes.relay import FakeRelay
from fakes.servers import run_server
from fakes.wiring import FILES, GITHUB_TOKEN, OWNER, WORKER_TOKEN, model_env, new_message_id, worker_env
from tests.support.processes import child, free_port, wait_exit, wait_healthy
from tests.support.waiting import wait_for
from tests.test_worker_control import pids_with

pytestmark = pytest.mark.anyio
AUTH = {"Authorization": f"Bearer {WORKER_TOKEN}"}


@dataclass
class Fakes:
    anthropic: FakeAnthropic
    relay: FakeRelay
    github: FakeGitHub
    env: dict[str, str]
    url: str
    log: Path


@asynccontextmanager
async def fakes(tmp: Path, **overrides: str) -> AsyncIterator[Fakes]:
    anthropic, relay, github = FakeAnthropic(), FakeRelay(WORKER_TOKEN), FakeGitHub(GITHUB_TOKEN)
    origin = make_origin(tmp / "git", FILES)
    port = free_port()
    async with AsyncExitStack() as stack:
        anthropic_url = await stack.enter_async_context(run_server(anthropic.app()))
        relay_url = await stack.enter_async_context(run_server(relay.app()))
        github_url = await stack.enter_async_context(run_server(github.app()))
        env = {
            **model_env(anthropic_url, tmp),
            **worker_env(tmp, relay_url=relay_url, github_url=github_url, origin=origin),
            "PORT": str(port),
            "HOST": "127.0.0.1",
            **overrides,
        }
        yield Fakes(anthropic, relay, github, env, f"http://127.0.0.1:{port}", tmp / "worker.log")


async def command(http: httpx.AsyncClient, url: str, text: str) -> None:
    body = {"phone": OWNER, "text": text, "message_id": new_message_id()}
    response = await http.post(f"{url}/command", json=body, headers=AUTH)
    assert response.status_code == 202, response.text


async def test_idle_worker_exits_0_and_says_it_sleeps(tmp_path: Path) -> None:
    async with fakes(tmp_path, IDLE_TIMEOUT_MS="1500") as f, httpx.AsyncClient(timeout=30) as http:
        f.anthropic.script("quick question", Text("answer"))
        with child("vm", f.env, f.log) as proc:
            await wait_healthy(f.url, proc)
            await command(http, f.url, "quick question")
            await wait_for(lambda: f.relay.of_type("answer"), 60, "answer")
            assert await wait_exit(proc, 15) == 0
        assert f.relay.states() == ["up", "sleeping"]  # said it was up once listening, then goodnight


async def test_no_idle_exit_while_an_approval_waits_and_restart_keeps_it(tmp_path: Path) -> None:
    async with fakes(tmp_path, IDLE_TIMEOUT_MS="1000") as f, httpx.AsyncClient(timeout=30) as http:
        checkout = Path(f.env["WORKSPACE_DIR"]) / OWNER.lstrip("+")
        f.anthropic.script("make a file", write(f"{checkout}/made.txt", "made\n"), Text("made it"))
        with child("vm", f.env, f.log) as proc:
            await wait_healthy(f.url, proc)
            await command(http, f.url, "make a file")
            await wait_for(lambda: f.relay.of_type("approval_required"), 60, "approval request")
            # Three idle timeouts pass: the pending approval must keep the worker up.
            await anyio.sleep(3.0)
            assert proc.poll() is None
            assert (await http.get(f"{f.url}/health")).json()["busy"] is True
            proc.send_signal(signal.SIGKILL)
            await wait_exit(proc, 5)
        with child("vm", f.env, f.log) as proc:
            await wait_healthy(f.url, proc)
            assert (await http.get(f"{f.url}/health")).json()["busy"] is True
            response = await http.post(f"{f.url}/approve", json={"phone": OWNER}, headers=AUTH)
            assert response.status_code == 202
            opened = await wait_for(lambda: f.relay.of_type("pr_opened"), 30, "PR after restart")
            assert opened[0]["text"] in branches(tmp_path / "git" / "origin.git")
            assert await wait_exit(proc, 15) == 0  # nothing pending any more: it goes to sleep


async def test_sigterm_ends_the_run_keeps_its_state_and_exits_quickly(tmp_path: Path) -> None:
    marker = f"textslash-term-{time.time_ns()}"
    async with fakes(tmp_path) as f, httpx.AsyncClient(timeout=30) as http:
        checkout = Path(f.env["WORKSPACE_DIR"]) / OWNER.lstrip("+")
        # What the run does once the next boot continues it (vm/resume.py).
        f.anthropic.script("restarted while you were working", Text("done after the stop"))
        f.anthropic.script(
            "slow work",
            write(f"{checkout}/started.txt", "1\n"),
            bash(f"python3 -c 'import time; time.sleep(120)' {marker}"),
            Text("never"),
        )
        with child("vm", f.env, f.log) as proc:
            await wait_healthy(f.url, proc)
            await command(http, f.url, "slow work")
            await wait_for(lambda: pids_with(marker), 60, "the long command")
            asked = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert await wait_exit(proc, 10) == 0  # a graceful stop is no failure to a supervisor
            assert time.monotonic() - asked < 10
            assert not pids_with(marker)
        with child("vm", f.env, f.log) as proc:
            await wait_healthy(f.url, proc)
            # A stop reports nothing of the run, so the next boot continues it, as after a crash.
            answer = await wait_for(lambda: f.relay.of_type("answer"), 60, "the continued run's answer")
            assert answer[0]["text"] == "done after the stop" and answer[0]["changes"] is True
            progress = [r["text"] for r in f.relay.of_type("progress")]
            assert "♻️ The VM restarted; continuing your run" in progress
            approval = await wait_for(lambda: f.relay.of_type("approval_required"), 20, "approval")
            assert [file["path"] for file in approval[0]["files"]] == ["started.txt"]
            assert not f.relay.of_type("error")
