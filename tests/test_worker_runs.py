"""The worker with the real Claude Code CLI against a scripted fake model on a real checkout."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fakes.anthropic import Text, bash, edit, write
from fakes.origin import branches, git, show
from tests.support.waiting import wait_for
from tests.support.worker_harness import WorkerStack, worker_stack

pytestmark = pytest.mark.anyio
RUN_TIMEOUT = 60.0


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[WorkerStack]:
    async with worker_stack(tmp_path) as stack:
        yield stack


def script_edit(stack: WorkerStack, key: str) -> None:
    checkout = stack.checkout()
    stack.anthropic.script(
        key,
        write(f"{checkout}/hello.py", "print('hello from textslash')\n"),
        edit(f"{checkout}/app.py", "return 'hi'", "return 'hello'"),
        Text("Added hello.py and made greet() say hello."),
    )


async def test_a_run_that_edits_files_asks_for_approval_then_opens_a_pr(worker: WorkerStack) -> None:
    script_edit(worker, "add a greeting")
    run_id = await worker.command("add a greeting")
    answer = (await wait_for(lambda: worker.relay.of_type("answer"), RUN_TIMEOUT, "the run's answer"))[0]
    approval = worker.relay.of_type("approval_required")
    assert answer["run_id"] == run_id and answer["changes"] is True and approval[0]["run_id"] == run_id
    # The approval request comes first: an owner who approves on reading the answer has seen the diff.
    assert worker.relay.types().index("approval_required") < worker.relay.types().index("answer")
    assert "Added hello.py" in answer["text"] and answer["cost_usd"] >= 0 and answer["duration_ms"] > 0
    progress = [e["text"] for e in worker.relay.of_type("progress")]
    assert "✏️ editing hello.py" in progress and "✏️ editing app.py" in progress
    files = {f["path"]: (f["added"], f["removed"]) for f in approval[0]["files"]}
    assert files == {"hello.py": (1, 0), "app.py": (1, 1)}
    assert "+    return 'hello'" in approval[0]["diff"]
    image = await worker.http.get(
        f"{worker.url}/images/{approval[0]['images'][0]}", headers={"Authorization": "Bearer worker-token-for-tests"}
    )
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")

    assert (await worker.decide("approve")).status_code == 202
    opened = await wait_for(lambda: worker.relay.of_type("pr_opened"), 30, "PR")
    assert opened[0]["url"] == "https://github.com/owner/demo/pull/1"
    branch = opened[0]["text"]
    assert branch.startswith("textslash/") and branch in branches(worker.origin)
    assert show(worker.origin, branch, "hello.py") == "print('hello from textslash')\n"
    pull = worker.github.pulls[0]
    assert pull["head"] == branch and pull["base"] == "main" and "add a greeting" in pull["title"]
    await worker.settled()


async def test_reject_restores_tracked_and_untracked_files(worker: WorkerStack) -> None:
    (await worker.http.get(f"{worker.url}/health")).raise_for_status()
    checkout = worker.checkout()
    worker.anthropic.script("warm up", Text("ready"))
    await worker.command("warm up")
    await wait_for(lambda: worker.relay.of_type("answer"), RUN_TIMEOUT, "first run")
    # State before the run: an untracked file and an uncommitted edit that must both survive.
    (checkout / "notes.txt").write_text("mine\n")
    (checkout / "README.md").write_text("# demo, edited by hand\n")
    worker.anthropic.script(
        "rewrite",
        write(f"{checkout}/README.md", "# replaced\n"),
        write(f"{checkout}/new.py", "x = 1\n"),
        bash(f"rm {checkout}/notes.txt && mkdir -p {checkout}/build && touch {checkout}/build/out"),
        Text("Rewrote things."),
    )
    await worker.command("rewrite")
    await wait_for(lambda: worker.relay.of_type("approval_required"), RUN_TIMEOUT, "approval request")
    assert (await worker.decide("reject")).status_code == 202
    await wait_for(lambda: worker.relay.of_type("rolled_back"), 30, "rollback")
    assert (checkout / "README.md").read_text() == "# demo, edited by hand\n"
    assert (checkout / "notes.txt").read_text() == "mine\n"
    assert not (checkout / "new.py").exists() and not (checkout / "build").exists()
    status = git(checkout, "status", "--porcelain")
    assert sorted(status.splitlines()) == [" M README.md", "?? notes.txt"]


async def test_a_follow_up_prompt_resumes_the_session_until_new(worker: WorkerStack) -> None:
    worker.anthropic.script("remember the number 4172", Text("Noted."))
    worker.anthropic.script("which number", Text("4172."))
    worker.anthropic.script("fresh start", Text("Hi."))
    await worker.command("remember the number 4172")
    await wait_for(lambda: len(worker.relay.of_type("answer")) == 1, RUN_TIMEOUT, "first answer")
    await worker.command("which number")
    await wait_for(lambda: len(worker.relay.of_type("answer")) == 2, RUN_TIMEOUT, "second answer")
    await worker.command("fresh start", new_session=True)
    await wait_for(lambda: len(worker.relay.of_type("answer")) == 3, RUN_TIMEOUT, "third answer")
    seen = worker.anthropic.prompts_seen()
    second = next(texts for texts in seen if any("which number" in t for t in texts))
    third = next(texts for texts in seen if any("fresh start" in t for t in texts))
    assert any("remember the number 4172" in t for t in second)  # the same session continued
    assert not any("4172" in t for t in third)  # `new` started over


async def test_a_run_without_changes_needs_no_approval(worker: WorkerStack) -> None:
    worker.anthropic.script("just answer", Text("42"))
    await worker.command("just answer")
    answer = await wait_for(lambda: worker.relay.of_type("answer"), RUN_TIMEOUT, "answer")
    assert answer[0]["changes"] is False and answer[0]["text"] == "42"
    assert worker.relay.of_type("approval_required") == []


async def test_reject_brings_back_ignored_files_and_names_what_it_cannot(tmp_path: Path) -> None:
    files = {"README.md": "# demo\n", ".gitignore": ".env\nbuild/\nbig/\n"}
    async with worker_stack(tmp_path, files=files) as worker:
        checkout = worker.checkout()
        worker.anthropic.script("prepare", write(f"{checkout}/notes.txt", "setup\n"), Text("Ready."))
        await worker.command("prepare")  # the first run clones; its approval is decided at once
        await wait_for(lambda: worker.relay.of_type("approval_required"), RUN_TIMEOUT, "the first approval")
        assert (await worker.decide("reject")).status_code == 202
        await wait_for(lambda: worker.relay.of_type("rolled_back"), RUN_TIMEOUT, "the first rollback")
        # What a developer has beside the code: secrets, build output, something big.
        (checkout / ".env").write_text("SECRET=1\n")
        (checkout / "build").mkdir()
        (checkout / "build" / "old.o").write_bytes(b"\x7fELF old")
        (checkout / "big").mkdir()
        (checkout / "big" / "blob.bin").write_bytes(b"x" * (21 * 1024 * 1024))
        owner = checkout.stat()
        for path in (".env", "build", "build/old.o", "big", "big/blob.bin"):
            os.chown(checkout / path, owner.st_uid, owner.st_gid)  # the agent's, as if it had made them
        worker.anthropic.script(
            "clean up",
            bash("rm .env build/old.o && echo new > build/new.o && echo changed > README.md", "clean"),
            Text("Cleaned."),
        )

        await worker.command("clean up")
        approval = await wait_for(
            lambda: len(worker.relay.of_type("approval_required")) == 2, RUN_TIMEOUT, "the approval"
        )
        assert worker.relay.of_type("approval_required")[1]["uncovered"] == ["big/"] and approval
        assert (await worker.decide("reject")).status_code == 202
        await wait_for(lambda: len(worker.relay.of_type("rolled_back")) == 2, RUN_TIMEOUT, "the rollback")
        assert (checkout / ".env").read_text() == "SECRET=1\n"
        assert (checkout / "build" / "old.o").read_bytes() == b"\x7fELF old"
        assert not (checkout / "build" / "new.o").exists() and (checkout / "README.md").read_text() == "# demo\n"
        assert (checkout / "big" / "blob.bin").stat().st_size == 21 * 1024 * 1024
