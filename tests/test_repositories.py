"""Several repositories per owner, the worker's side. A prompt that names a repository runs in the
owner's checkout of it, with its own git dir and Claude session; approve pushes to the origin of
the repository the change was made in (with a pull request only on GitHub); a checkout from
before REPOS moves into the named layout, keeping what was uncommitted and the session; the
GitHub token never goes to a URL a prompt names unless it is GitHub's; a malformed repo_url is
refused with the reason.

The worker runs with the real Claude Code CLI against the scripted model, on bare origins, and
on an https origin served by `git http-backend` that records what each request carried.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.protocol import Report
from fakes.anthropic import Text, edit, write
from fakes.origin import HttpOrigin, branches, make_origin, show
from fakes.servers import make_certificate, run_server
from fakes.wiring import FILES, GITHUB_TOKEN, OWNER, OWNER2, new_message_id, open_for_agents
from relay import replies
from tests.support.processes import child, clis_of, wait_exit, wait_healthy
from tests.support.waiting import wait_for
from tests.support.worker_harness import WorkerStack, worker_stack
from tests.test_worker_process import AUTH
from tests.test_worker_process import fakes as process_fakes
from vm.sandbox import Sandbox

pytestmark = pytest.mark.anyio
RUN_TIMEOUT = 60.0
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="agents run as their own users only when the worker is root")
ALPHA = {"README.md": "# alpha\n", "alpha.py": "A = 1\n"}
BETA = {"README.md": "# beta\n", "beta.py": "B = 2\n"}
NUMBER = OWNER.lstrip("+")


def named(name: str, origin: Path | str) -> dict[str, str]:
    """What a relay with REPOS adds to a prompt."""
    return {"repo": name, "repo_url": origin if isinstance(origin, str) else f"file://{origin}"}


async def reports(worker: WorkerStack, kind: str, n: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = await wait_for(
        lambda: len(worker.relay.of_type(kind)) >= n and worker.relay.of_type(kind), RUN_TIMEOUT, f"{kind} {n}"
    )
    return found


def requests_with(worker: WorkerStack, text: str) -> list[dict[str, Any]]:
    """The model requests of the turn whose prompt holds `text`."""
    return [r for r in worker.anthropic.requests if any(text in t for t in _user_texts(r))]


def _user_texts(request: dict[str, Any]) -> list[str]:
    texts = []
    for message in request["messages"]:
        content = message.get("content")
        if message.get("role") == "user":
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
            texts += [b.get("text", "") for b in blocks if isinstance(b, dict) and b.get("type") == "text"]
    return texts


def cwds(requests: list[dict[str, Any]]) -> set[str]:
    """The working directories Claude Code told the model it is in: the latest in each request
    (a resumed session's history holds where it was before; a side request of the CLI's, none)."""
    found = [re.findall(r"Primary working directory: ([^\s\\]+)", json.dumps(r["messages"])) for r in requests]
    return {places[-1] for places in found if places}


async def test_approve_pushes_to_the_origin_of_the_repository_the_change_was_made_in(tmp_path: Path) -> None:
    alpha, beta = make_origin(tmp_path / "alpha", ALPHA), make_origin(tmp_path / "beta", BETA)
    async with worker_stack(tmp_path) as worker:
        checkout = worker.checkout(repo="alpha")
        worker.anthropic.script("tune alpha", edit(f"{checkout}/alpha.py", "A = 1", "A = 10"), Text("Tuned."))
        await worker.command("tune alpha", **named("alpha", alpha))
        approval = (await reports(worker, "approval_required", 1))[0]
        assert {f["path"]: (f["added"], f["removed"]) for f in approval["files"]} == {"alpha.py": (1, 1)}
        assert (checkout / "alpha.py").read_text() == "A = 10\n" and not (checkout / "beta.py").exists()
        git_dir = worker.settings.workspace_dir / ".repos" / f"{NUMBER}-alpha"
        assert (checkout / ".git").read_text() == f"gitdir: {git_dir}\n"
        assert not worker.checkout().exists()  # the worker's own REPO_URL: never cloned, never asked for
        if os.geteuid() == 0:  # the git dir is root's, readable by the owner's group only
            facts = git_dir.stat()
            assert facts.st_uid == 0 and facts.st_gid == checkout.stat().st_gid and facts.st_mode & 0o7777 == 0o2750

        assert (await worker.decide("approve")).status_code == 202
        opened = (await reports(worker, "pr_opened", 1))[0]
        branch = opened["text"]
        assert opened.get("url", "") == ""  # not on GitHub: the pushed branch is all there is
        assert worker.github.pulls == []
        assert branch.startswith("textslash/") and show(alpha, branch, "alpha.py") == "A = 10\n"
        assert branches(beta) == ["main"] and branches(worker.origin) == ["main"]
        await worker.settled()


def test_the_owner_reads_that_the_branch_was_pushed_and_why_there_is_no_pull_request() -> None:
    text = replies.applied(Report("pr_opened", "SM1", text="textslash/0a1b2c3d"))
    assert text.startswith("✅ Pushed branch textslash/0a1b2c3d.") and "No pull request" in text and "GitHub" in text


async def test_each_repository_has_its_own_checkout_and_claude_session(tmp_path: Path) -> None:
    alpha, beta = make_origin(tmp_path / "alpha", ALPHA), make_origin(tmp_path / "beta", BETA)
    async with worker_stack(tmp_path) as worker:
        worker.anthropic.script("remember the number 4172", Text("Noted."))
        worker.anthropic.script("which number did I say", Text("You have not told me one."))
        worker.anthropic.script("and here, which number", Text("4172."))
        await worker.command("remember the number 4172", **named("alpha", alpha))
        await reports(worker, "answer", 1)
        await worker.command("which number did I say", **named("beta", beta))
        await reports(worker, "answer", 2)
        await worker.command("and here, which number", **named("alpha", alpha))
        await reports(worker, "answer", 3)

        in_beta, back_in_alpha = requests_with(worker, "which number did I say"), requests_with(worker, "which number")
        assert in_beta and not any("4172" in t for r in in_beta for t in _user_texts(r))  # a session of its own
        assert cwds(in_beta) == {str(worker.checkout(repo="beta"))}
        back = [r for r in back_in_alpha if any("and here" in t for t in _user_texts(r))]
        assert back and all(any("remember the number 4172" in t for t in _user_texts(r)) for r in back)  # resumed
        assert cwds(back) == {str(worker.checkout(repo="alpha"))}
        assert (worker.checkout(repo="beta") / "beta.py").is_file()
        assert not (worker.checkout(repo="beta") / "alpha.py").exists()
        # One agent user per owner, for all of its checkouts; one CLI kept, in the last one's.
        assert worker.checkout(repo="alpha").stat().st_uid == worker.checkout(repo="beta").stat().st_uid
        await worker.settled()
        await wait_for(lambda: len(clis_of(os.getpid())) == 1, 10, "one kept CLI")


async def test_a_checkout_from_before_repos_moves_into_the_named_layout(tmp_path: Path) -> None:
    """Nothing cloned again, the uncommitted file kept, the session carried over; and an
    approval pending from before is decided where the change is."""
    async with worker_stack(tmp_path) as worker:
        legacy, checkout = worker.checkout(), worker.checkout(repo="demo")
        repos = worker.settings.workspace_dir / ".repos"
        demo = named("demo", worker.origin)  # the URL the old checkout was cloned from (REPO_URL)
        worker.anthropic.script("remember the number 4172", write(f"{legacy}/notes.txt", "n\n"), Text("Noted."))
        await worker.command("remember the number 4172")
        await reports(worker, "approval_required", 1)
        refused = await worker.post(
            "command", {"phone": OWNER, "text": "which number", "message_id": new_message_id(), **demo}
        )
        assert refused.status_code == 409 and refused.json()["state"] == "awaiting_approval"
        assert (await worker.decide("approve")).status_code == 202
        first = (await reports(worker, "pr_opened", 1))[0]
        assert show(worker.origin, first["text"], "notes.txt") == "n\n" and not checkout.exists()
        await worker.settled()
        git_dir = (repos / NUMBER).stat().st_ino
        (legacy / "wip.txt").write_text("uncommitted work\n")

        worker.anthropic.script("which number", write(f"{checkout}/more.txt", "more\n"), Text("4172."))
        await worker.command("which number", **demo)
        approval = (await reports(worker, "approval_required", 2))[1]
        assert {f["path"] for f in approval["files"]} == {"more.txt", "wip.txt"}
        assert not legacy.exists() and not (repos / NUMBER).exists()
        assert (checkout / "wip.txt").read_text() == "uncommitted work\n"
        assert (repos / f"{NUMBER}-demo").stat().st_ino == git_dir  # moved, not cloned again
        assert (checkout / ".git").read_text() == f"gitdir: {repos / f'{NUMBER}-demo'}\n"
        asked = requests_with(worker, "which number")
        assert asked and all(any("remember the number 4172" in t for t in _user_texts(r)) for r in asked)
        assert cwds(asked) == {str(checkout)}

        assert (await worker.decide("approve")).status_code == 202
        second = (await reports(worker, "pr_opened", 2))[1]
        # The same URL as REPO_URL: GITHUB_REPO still names where its pull requests go.
        assert second["url"] == "https://github.com/owner/demo/pull/2"
        assert show(worker.origin, second["text"], "wip.txt") == "uncommitted work\n"
        await worker.settled()


async def test_after_a_restart_a_pending_approval_is_pushed_to_the_repository_it_was_made_in(tmp_path: Path) -> None:
    """The state file records the run's repository; approve names none."""
    alpha = make_origin(tmp_path / "alpha", ALPHA)
    async with process_fakes(tmp_path) as f, httpx.AsyncClient(timeout=30) as http:
        checkout = Path(f.env["WORKSPACE_DIR"]) / f"{NUMBER}-alpha"
        f.anthropic.script("tune alpha", edit(f"{checkout}/alpha.py", "A = 1", "A = 10"), Text("Tuned."))
        with child("vm", f.env, f.log) as proc:
            await wait_healthy(f.url, proc)
            body = {"phone": OWNER, "text": "tune alpha", "message_id": new_message_id(), **named("alpha", alpha)}
            assert (await http.post(f"{f.url}/command", json=body, headers=AUTH)).status_code == 202
            await wait_for(lambda: f.relay.of_type("approval_required"), RUN_TIMEOUT, "the approval request")
            proc.send_signal(signal.SIGKILL)
            await wait_exit(proc, 5)
        with child("vm", f.env, f.log) as proc:
            await wait_healthy(f.url, proc)
            assert (await http.post(f"{f.url}/approve", json={"phone": OWNER}, headers=AUTH)).status_code == 202
            opened = (await wait_for(lambda: f.relay.of_type("pr_opened"), 30, "the push after the restart"))[0]
            assert show(alpha, opened["text"], "alpha.py") == "A = 10\n" and opened.get("url", "") == ""
            assert branches(tmp_path / "git" / "origin.git") == ["main"]


async def test_the_github_token_goes_to_the_workers_own_repository_never_to_one_a_prompt_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both on one https host, served by `git http-backend`: the worker's own REPO_URL gets the
    token (as it always did), a repository the relay names that is not on GitHub never does."""
    certificate = make_certificate(tmp_path / "tls")
    monkeypatch.setenv("GIT_SSL_CAINFO", str(certificate / "cert.pem"))  # git trusts the test's https origin
    served = HttpOrigin(tmp_path / "served")
    make_origin(served.root / "own", FILES)
    make_origin(served.root / "other", ALPHA)
    async with run_server(served.app(), tls=certificate) as url:
        own, other = f"{url}/own/origin.git", f"{url}/other/origin.git"
        async with worker_stack(tmp_path, REPO_URL=own) as worker:
            for n, (key, where, extra) in enumerate(
                [
                    ("own change", worker.checkout(), {}),
                    ("other change", worker.checkout(repo="other"), named("other", other)),
                ],
                start=1,
            ):
                worker.anthropic.script(key, write(f"{where}/made.txt", f"{key}\n"), Text("Made."))
                await worker.command(key, **extra)
                await reports(worker, "approval_required", n)
                assert (await worker.decide("approve")).status_code == 202
                await reports(worker, "pr_opened", n)
                await worker.settled()
            opened = worker.relay.of_type("pr_opened")
            assert opened[0]["url"] == "https://github.com/owner/demo/pull/1" and opened[1].get("url", "") == ""

    basic = "Basic " + base64.b64encode(f"x-access-token:{GITHUB_TOKEN}".encode()).decode()
    to_own = [auth for path, auth in served.requests if path.startswith("/own/")]
    to_other = [(path, auth) for path, auth in served.requests if path.startswith("/other/")]
    assert basic in to_own  # what the server records is what git sent
    assert any(path.endswith("/git-upload-pack") for path, _ in to_other)  # cloned...
    assert any(path.endswith("/git-receive-pack") for path, _ in to_other)  # ...and pushed
    assert {auth for _, auth in to_other} == {""}
    assert (served.root / "other" / "origin.git").is_dir() and len(branches(served.root / "other" / "origin.git")) == 2


async def test_a_malformed_repository_is_refused_with_the_reason(tmp_path: Path) -> None:
    async with worker_stack(tmp_path) as worker:
        cases = [
            (named("alpha", "https://ghp_secret@github.com/a/b.git"), "repo_url must not hold a password or token"),
            (named("alpha", "https://me:pw@example.com/a.git"), "repo_url must not hold a password or token"),
            (named("alpha", "ftp://example.com/a.git"), "repo_url is malformed"),
            (named("alpha", "ssh://-oProxyCommand=touch/a.git"), "a host cannot start with -"),
            (named("alpha", "https://github.com/a/b.git\n"), "control character"),
            (named("alpha\n", "https://github.com/a/b.git"), "repo must be a name"),
            (named("Alpha", "https://github.com/a/b.git"), "repo must be a name"),
            (named("a" * 41, "https://github.com/a/b.git"), "repo must be a name"),
            ({"repo": "alpha"}, "repo and repo_url go together"),
        ]
        for extra, reason in cases:
            body = {"phone": OWNER, "text": "hello", "message_id": new_message_id(), **extra}
            response = await worker.post("command", body)
            assert response.status_code == 422 and reason in response.json()["detail"], (extra, response.text)
            assert "ghp_secret" not in response.text and "pw@" not in response.text
        assert (await worker.decide("status")).json()["state"] == "idle"
        assert not list(worker.settings.workspace_dir.glob(f"{NUMBER}*"))


async def test_without_repo_url_a_prompt_naming_no_repository_ends_in_an_error_that_says_why(tmp_path: Path) -> None:
    alpha = make_origin(tmp_path / "alpha", ALPHA)
    async with worker_stack(tmp_path, REPO_URL="") as worker:
        await worker.command("anything at all")
        error = (await reports(worker, "error", 1))[0]
        assert "no repository" in error["text"] and "REPOS" in error["text"] and error["changes"] is False
        await worker.settled()
        worker.anthropic.script("hello alpha", Text("Hi."))
        await worker.command("hello alpha", **named("alpha", alpha))
        assert (await reports(worker, "answer", 1))[0]["text"] == "Hi."


async def test_a_name_given_to_another_repository_is_refused_not_pushed_there(tmp_path: Path) -> None:
    """Pushing there would carry the first repository's history into the second."""
    alpha, beta = make_origin(tmp_path / "alpha", ALPHA), make_origin(tmp_path / "beta", BETA)
    async with worker_stack(tmp_path) as worker:
        worker.anthropic.script("hello", Text("Hi."))
        await worker.command("hello", **named("app", alpha))
        await reports(worker, "answer", 1)
        await worker.command("hello again", **named("app", beta))
        error = (await reports(worker, "error", 1))[0]
        assert f"cloned from file://{alpha}, not file://{beta}" in error["text"] and "REPOS" in error["text"]
        assert (worker.checkout(repo="app") / "alpha.py").is_file() and branches(beta) == ["main"]
        await worker.settled()
        # The way out it names works: deleting what it says (the checkout alone kept the old
        # git dir, and its origin, so every later prompt was refused the same way).
        named_paths = [Path(p) for p in re.findall(r"(/\S+?)(?=[ ,)])", error["text"]) if "app" in Path(p).name]
        assert named_paths and all(p.exists() for p in named_paths)
        for path in named_paths:
            shutil.rmtree(path)
        worker.anthropic.script("greet beta", Text("Hi, beta."))
        await worker.command("greet beta", **named("app", beta))
        assert (await reports(worker, "answer", 2))[1]["text"] == "Hi, beta."
        assert (worker.checkout(repo="app") / "beta.py").is_file()
        await worker.settled()


def isolated_sandbox(tmp_path: Path) -> Sandbox:
    """A sandbox over `tmp_path/ws`, as the worker makes one; a new one is a new boot."""
    workspace = tmp_path / "ws"
    return Sandbox(
        workspace_dir=workspace,
        state_dir=workspace / ".textslash",
        claude_config_dir=str(tmp_path / "claude"),
        isolated=True,
    )


@as_root
async def test_named_checkouts_are_the_owners_agents_and_rebuild_its_uid(tmp_path: Path) -> None:
    open_for_agents(tmp_path)
    workspace, state = tmp_path / "ws", tmp_path / "ws" / ".textslash"
    sandbox = partial(isolated_sandbox, tmp_path)

    first = sandbox()
    await first.start(state)
    one, two = await first.prepare(OWNER, repo="app"), await first.prepare(OWNER2, repo="app")
    assert one.checkout == workspace / f"{NUMBER}-app" and one.git_dir == workspace / ".repos" / f"{NUMBER}-app"
    assert one.checkout != two.checkout and one.uid != two.uid
    for folder in (one.checkout, one.home, one.claude_dir):
        assert folder.stat().st_uid == one.uid and folder.stat().st_mode & 0o777 == 0o700
    assert workspace.stat().st_mode & 0o777 == 0o711 and workspace.stat().st_uid == 0
    assert (await first.prepare(OWNER, repo="web")).uid == one.uid == (await first.prepare(OWNER)).uid
    # With the map, the home and the unnamed checkout lost, the named checkouts still say whose.
    (state / "agent-users.json").unlink()
    shutil.rmtree(one.home)
    shutil.rmtree(workspace / NUMBER)
    rebuilt = sandbox()
    assert (await rebuilt.prepare(OWNER2)).uid == two.uid and (await rebuilt.prepare(OWNER, repo="app")).uid == one.uid
    # At boot, what is below the roots stays the agent's and private.
    await sandbox().start(state)
    assert one.checkout.stat().st_mode & 0o777 == 0o700 and one.checkout.stat().st_uid == one.uid


@as_root
async def test_a_lost_map_never_gives_a_new_owner_the_group_of_another_owners_git_dir(tmp_path: Path) -> None:
    """A git dir is root's, with its owner's group (= uid): what it holds (every snapshot, the
    kept ignored files among them) is that owner's. With the map lost and the owner's other
    folders gone (deleted by hand, say), the git dir still says whose group it is."""
    open_for_agents(tmp_path)
    state = tmp_path / "ws" / ".textslash"
    sandbox = partial(isolated_sandbox, tmp_path)

    first = sandbox()
    await first.start(state)
    one = await first.prepare(OWNER, repo="app")
    one.git_dir.mkdir(parents=True)
    (one.git_dir / "HEAD").write_text("ref: refs/heads/main\n")
    await first.share_git_dir(one)
    (state / "agent-users.json").unlink()
    for folder in (one.checkout, one.home, one.claude_dir):
        shutil.rmtree(folder)
    other = await sandbox().prepare(OWNER2)
    assert other.gid != one.git_dir.stat().st_gid and other.uid != one.uid
    assert (await sandbox().prepare(OWNER, repo="app")).uid == one.uid  # and the owner gets its own back
