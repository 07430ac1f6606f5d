"""Nothing that waits on the network waits for ever: a stalled push, clone or pull request ends
in a report the owner can act on, and takes every process it started with it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from fakes.anthropic import Text, write
from fakes.github import FakeGitHub
from fakes.origin import HttpOrigin, make_origin, show
from fakes.servers import run_server
from fakes.wiring import FILES, GITHUB_TOKEN
from tests.support.waiting import wait_for
from tests.support.worker_harness import worker_stack
from vm.github import GitHub, GitHubError
from vm.killable import run_killable
from vm.lazy_http import LazyHTTP
from vm.reaper import _alive

pytestmark = pytest.mark.anyio
RUN_TIMEOUT = 60.0
DEADLINE_MS = "5000"  # short for the tests (production's are minutes), long enough for a real clone or
# push through `git http-backend` on a loaded machine once the stall is lifted


@asynccontextmanager
async def served_origin(tmp: Path) -> AsyncIterator[tuple[HttpOrigin, str]]:
    """`origin.git` over smart HTTP; yields the server and the repository's URL."""
    origin = HttpOrigin(tmp / "served")
    make_origin(origin.root, FILES)
    async with run_server(origin.app()) as url:
        yield origin, f"{url}/origin.git"


def processes_naming(text: str) -> list[int]:
    """Live processes with `text` in their command line (git's HTTP helper has the URL in it)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


async def test_a_push_that_hangs_fails_the_approve_and_the_owner_can_approve_again(tmp_path: Path) -> None:
    async with served_origin(tmp_path) as (origin, url):
        async with worker_stack(tmp_path, REPO_URL=url, PUSH_TIMEOUT_MS=DEADLINE_MS) as worker:
            worker.anthropic.script("make it", write(f"{worker.checkout()}/made.txt", "made\n"), Text("Made."))
            await worker.command("make it")
            await wait_for(lambda: worker.relay.of_type("approval_required"), RUN_TIMEOUT, "the approval request")
            origin.stall.add("git-receive-pack")  # origin takes the pack and never answers

            assert (await worker.decide("approve")).status_code == 202
            failed = await wait_for(lambda: worker.relay.of_type("approve_failed"), 30, "the push to give up")
            assert failed[0]["text"] == "git push got no answer from origin within 5 s"
            # git and its HTTP helper were killed, not left holding the connection.
            await wait_for(lambda: origin.hung_up == 1, 5, "git to hang up")
            # Killed with its run; the kernel may take a moment to reap them on a loaded machine.
            await wait_for(lambda: processes_naming(url) == [], 5, "git and its helper to be gone")
            status = (await worker.decide("status")).json()
            assert status["state"] == "awaiting_approval"  # the changes stay, for approve or reject

            origin.stall.clear()
            assert (await worker.decide("approve")).status_code == 202
            opened = await wait_for(lambda: worker.relay.of_type("pr_opened"), 30, "the second approve")
            assert show(origin.root / "origin.git", opened[0]["text"], "made.txt") == "made\n"
            assert len(worker.github.pulls) == 1


async def test_a_clone_that_hangs_ends_the_run_with_an_error_and_the_next_run_clones(tmp_path: Path) -> None:
    async with served_origin(tmp_path) as (origin, url):
        async with worker_stack(tmp_path, REPO_URL=url, CLONE_TIMEOUT_MS=DEADLINE_MS) as worker:
            origin.stall.add("git-upload-pack")
            worker.anthropic.script("hello", Text("Hi."))
            await worker.command("hello")
            error = await wait_for(lambda: worker.relay.of_type("error"), 30, "the clone to give up")
            assert error[0]["text"] == "git clone got no answer from origin within 5 s"
            await wait_for(lambda: origin.hung_up == 1, 5, "git to hang up")
            # Killed with its run; the kernel may take a moment to reap them on a loaded machine.
            await wait_for(lambda: processes_naming(url) == [], 5, "git and its helper to be gone")
            assert origin.hung_up == 1  # nothing tried the stalled clone again behind the owner's back
            repos = worker.settings.workspace_dir / ".repos"
            assert not list(repos.glob(".clone-*")) and not list(repos.glob("[0-9]*"))  # no half clone
            assert (await worker.decide("status")).json()["state"] == "idle"

            origin.stall.clear()
            await worker.command("hello")
            ended = await wait_for(
                lambda: worker.relay.of_type("answer", "error")[1:], RUN_TIMEOUT, "a run after the clone"
            )
            assert ended[0]["type"] == "answer" and ended[0]["text"] == "Hi.", ended


async def test_a_pull_request_that_hangs_ends_in_a_github_error() -> None:
    github = FakeGitHub(GITHUB_TOKEN, stall=True)
    async with run_server(github.app()) as url, httpx.AsyncClient() as client:
        api = GitHub(LazyHTTP(client), api_url=url, token=GITHUB_TOKEN, deadline_s=0.5)
        with pytest.raises(GitHubError, match=r"^GitHub did not answer within 0\.5 s$"):
            await api.open_pull_request(repo="owner/demo", head="textslash/abc", base="main", title="t", body="b")
        await wait_for(lambda: github.hung_up == 1, 5, "the request to be dropped")


async def test_a_cancelled_command_takes_the_processes_it_started_with_it(tmp_path: Path) -> None:
    """What `anyio.run_process` would leave behind: a child of the command, still running."""
    pidfile = tmp_path / "pid"
    script = f"sleep 600 & echo $! > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}; wait"

    async def run() -> None:
        await run_killable(["sh", "-c", script], cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_for(pidfile.exists, 10, "the command to start its child")
        tg.cancel_scope.cancel()
    child = int(pidfile.read_text())
    await wait_for(lambda: not _alive(child), 5, "the child to be killed")
