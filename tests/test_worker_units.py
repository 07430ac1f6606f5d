"""The worker's small pure pieces: settings, progress wording and throttling, image expiry."""

from __future__ import annotations

import json
import os
import time
from html import escape
from pathlib import Path

import anyio
import pytest

from common.protocol import Report
from fakes.relay import FakeRelay
from fakes.servers import run_server
from fakes.wiring import OWNER, OWNER2, WORKER_TOKEN
from tests.support.waiting import wait_for
from vm.agent import ProgressThrottle, describe_tool
from vm.callbacks import CallbackSender
from vm.diff_image import DIFF_CUT, MAX_ROWS, ROW_CHARS, diff_html, diff_lines, phone_excerpt
from vm.images import ImageStore
from vm.lazy_http import LazyHTTP
from vm.repos import same_repository
from vm.runs import OwnerStore
from vm.settings import ConfigError, Settings, github_repo_from_url
from vm.workspace import Changes, FileChange

BASE = {
    "WORKER_TOKEN": "worker-token-for-tests",
    "RELAY_CALLBACK_URL": "http://127.0.0.1:3000",
    "REPO_URL": "https://github.com/acme/widgets.git",
}


@pytest.mark.parametrize(
    ("url", "repo"),
    [
        ("https://github.com/acme/widgets.git", "acme/widgets"),
        ("https://github.com/acme/widgets", "acme/widgets"),
        ("git@github.com:acme/widgets.git", "acme/widgets"),
        ("ssh://git@github.com/acme/wid.gets.git", "acme/wid.gets"),
        ("https://gitlab.com/acme/widgets.git", ""),
        ("file:///srv/origin.git", ""),
    ],
)
def test_github_repo_from_url(url: str, repo: str) -> None:
    assert github_repo_from_url(url) == repo


def test_the_github_token_goes_only_to_the_workers_own_repository_and_to_github() -> None:
    own = "https://git.example.com/own.git"
    settings = Settings.from_env({**BASE, "REPO_URL": own, "GITHUB_TOKEN": "ghs_x", "GITHUB_REPO": "acme/own"})
    assert settings.token_for(own) == "ghs_x" and settings.token_for("https://github.com/acme/widgets.git") == "ghs_x"
    for url in (
        "https://git.example.com/other.git",
        "https://github.com.evil.example/a/b.git",
        "https://evil.example/github.com/a/b.git",
        "http://github.com/a/b.git",
        "https://github.com/../..",
        "",
    ):
        assert settings.token_for(url) == "", url
    # Pull requests: GITHUB_REPO for REPO_URL, the URL's own owner/name on GitHub, none elsewhere.
    assert settings.pull_request_repo(own) == "acme/own"
    assert settings.pull_request_repo("git@github.com:acme/widgets.git") == "acme/widgets"
    assert settings.pull_request_repo("https://gitlab.com/acme/widgets.git") == ""
    assert settings.pull_request_repo("https://github.com/../..") == ""
    assert Settings.from_env({k: v for k, v in BASE.items() if k != "REPO_URL"}).repo_url == ""


def test_two_urls_of_one_repository() -> None:
    assert same_repository("https://github.com/Acme/Widgets", "git@github.com:acme/widgets.git")
    assert same_repository("file:///srv/a.git", "file:///srv/a.git")
    assert not same_repository("https://github.com/acme/widgets", "https://github.com/acme/gadgets")
    assert not same_repository("file:///srv/a.git", "file:///srv/b.git")


def test_an_owner_state_from_before_repos_reads_its_session_as_the_unnamed_repositorys(tmp_path: Path) -> None:
    store = OwnerStore(tmp_path)
    old = {"phone": OWNER, "state": "awaiting_approval", "session_id": "s-1", "run_id": "r", "prompt": "p"}
    (tmp_path / f"{OWNER.lstrip('+')}.json").write_text(json.dumps(old))
    (owner,) = store.all()
    assert owner.repo == "" and owner.session_id == "s-1" and owner.state == "awaiting_approval"
    owner.repo = "app"
    assert owner.session_id is None  # each repository has its own
    owner.session_id = "s-2"
    store.save(owner)
    (again,) = store.all()
    assert again.repo == "app" and again.sessions == {"": "s-1", "app": "s-2"}
    # A state naming something that is no repository names no folder: it is set aside.
    (tmp_path / f"{OWNER2.lstrip('+')}.json").write_text(json.dumps({"phone": OWNER2, "repo": "../x"}))
    assert [o.phone for o in store.all()] == [OWNER]


def test_a_running_owner_state_from_before_resume_is_continued_once(tmp_path: Path) -> None:
    """A state file written before a run could be continued: nothing says it was, so the next
    boot continues it; its attachments and where they went are lists, or the file is set aside."""
    store = OwnerStore(tmp_path)
    old = {"phone": OWNER, "state": "running", "run_id": "r", "prompt": "p", "sessions": {"": "s-1"}}
    (tmp_path / f"{OWNER.lstrip('+')}.json").write_text(json.dumps(old))
    (owner,) = store.all()
    assert owner.resumed is False and owner.attachments == [] and owner.received == []
    owner.resumed, owner.received = True, [{"path": "a/b.png", "content_type": "image/png", "size": 3}]
    store.save(owner)
    (again,) = store.all()
    assert again.resumed is True and again.received[0]["path"] == "a/b.png"
    (tmp_path / f"{OWNER2.lstrip('+')}.json").write_text(json.dumps({"phone": OWNER2, "received": "a/b.png"}))
    assert [o.phone for o in store.all()] == [OWNER]


def test_worker_defaults() -> None:
    settings = Settings.from_env(BASE)
    assert settings.github_repo == "acme/widgets" and settings.port == 3001
    assert settings.idle_timeout_s == 1800 and settings.image_ttl_s == 24 * 3600
    assert settings.workspace_dir == Path("/tmp/workspace") and settings.images_dir == Path("/tmp/images")
    assert settings.enable_test_app is False
    assert settings.push_timeout_s == 180 and settings.clone_timeout_s == 600
    assert "worker-token-for-tests" not in repr(settings)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WORKER_TOKEN", ""),
        ("WORKER_TOKEN", "short"),
        ("RELAY_CALLBACK_URL", "relay:3000"),
        ("REPO_URL", "ftp://x/y"),
        ("REPO_URL", "https://me:secret@example.com/a.git"),
        ("REPO_URL", "https://ghp_token@github.com/a/b.git"),
        ("REPO_URL", "ssh://-oProxyCommand=x/a.git"),
        ("REPO_URL", "ssh://[-oProxyCommand=x]/a.git"),  # git takes the brackets off (an IPv6 host)
        ("REPO_URL", "git@[-oProxyCommand=x]:a.git"),
        ("GITHUB_REPO", "not a repo"),
        ("IDLE_TIMEOUT_MS", "later"),
        ("IMAGE_TTL_HOURS", "0"),
        ("PUSH_TIMEOUT_MS", "0"),
        ("CLONE_TIMEOUT_MS", "soon"),
        ("ENABLE_TEST_APP", "maybe"),
        ("PORT", "0"),
    ],
)
def test_bad_worker_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({**BASE, name: value})


@pytest.mark.parametrize(
    ("tool", "args", "text"),
    [
        ("Write", {"file_path": "/repo/src/app.py"}, "✏️ editing src/app.py"),
        ("Edit", {"file_path": "/elsewhere/x.py"}, "✏️ editing x.py"),
        ("Read", {"file_path": "/repo/README.md"}, "📖 reading README.md"),
        ("Bash", {"command": "python -m   pytest -q"}, "▶️ running python -m pytest -q"),
        ("Bash", {"command": "x" * 100}, "▶️ running " + "x" * 47 + "…"),
        ("Grep", {"pattern": "TODO"}, "🔎 searching TODO"),
        ("mcp__textslash__screenshot", {"url": "http://localhost:8000"}, "📸 screenshot of http://localhost:8000"),
        ("SomethingNew", {}, "🔧 SomethingNew"),
    ],
)
def test_tool_calls_in_a_few_words(tool: str, args: dict[str, str], text: str) -> None:
    assert describe_tool(tool, args, Path("/repo")) == text


def test_progress_is_at_most_one_message_per_interval_keeping_the_latest() -> None:
    now = [0.0]
    sent: list[str] = []
    throttle = ProgressThrottle(sent.append, 3.0, clock=lambda: now[0])
    throttle.note("a")  # the first step goes out at once
    for step in ("b", "c", "d"):
        now[0] += 0.5
        throttle.note(step)
    throttle.flush_due()
    assert sent == ["a"]  # a flood is held back
    now[0] = 3.0
    throttle.flush_due()
    assert sent == ["a", "d (+2 more steps)"]  # only the latest, saying how many were folded in
    now[0] = 10.0
    throttle.note("e")
    assert sent[-1] == "e"


def test_images_expire_after_their_ttl(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ttl_s=3600)
    old, new = store.save(b"old"), store.save(b"new")
    past = time.time() - 7200
    os.utime(tmp_path / old, (past, past))
    assert store.expire() == 1
    assert store.resolve(old) is None and store.resolve(new) is not None


@pytest.mark.parametrize(
    ("added", "shown"),
    [
        pytest.param("++ __import__('os').system('x')", "+++ __import__('os').system('x')", id="looks like +++"),
        pytest.param(
            "DEBUG = False;\x0c    os.system('x')", "+DEBUG = False;\\u000c    os.system('x')", id="form feed"
        ),
        pytest.param("ok = 1  # \u202e)'x'(metsys.so", "+ok = 1  # \\u202e)'x'(metsys.so", id="bidi override"),
        pytest.param("a\u2028os.system('x')", "+a\\u2028os.system('x')", id="line separator"),
    ],
)
def test_nothing_hides_in_the_diff_the_owner_sees(added: str, shown: str) -> None:
    diff = (
        "diff --git a/app.py b/app.py\nindex 1111111..2222222 100644\n--- a/app.py\n+++ b/app.py\n"
        f"@@ -1 +1,2 @@\n x = 1\n+{added}\n"
    )
    changes = Changes((FileChange("app.py", 1, 0),), diff)
    assert shown in phone_excerpt(changes).split("\n")
    assert escape(shown) in diff_html(changes)
    assert ("add", shown) in diff_lines(diff)


def test_what_git_does_not_print_is_said_and_nothing_prints_as_nothing() -> None:
    diff = (
        "diff --git a/run.sh b/run.sh\nold mode 100644\nnew mode 100755\n"
        "diff --git a/l b/l\nnew file mode 120000\nindex 0..1\n--- /dev/null\n+++ b/l\n@@ -0,0 +1 @@\n+/etc/x\n"
        "diff --git a/b.bin b/b.bin\nindex 1..2 100644\nBinary files a/b.bin and b/b.bin differ\n"
        "diff --git a/app.js b/app.js\nindex 1..2 100644\n--- a/app.js\n+++ b/app.js\n@@ -1 +1 @@\n"
        "-x\n+const { t,\u3164} = q; exec(\u3164)\x00\n"
    )
    assert diff_lines(diff) == [
        ("file", "run.sh"),
        ("note", "(old: file, mode 100644)"),
        ("note", "(new: executable, mode 100755)"),
        ("file", "l"),
        ("note", "(new: symlink, mode 120000)"),
        ("hunk", "@@ -0,0 +1 @@"),
        ("add", "+/etc/x"),
        ("file", "b.bin"),
        ("note", "(binary or over 1 MB: content not shown)"),
        ("file", "app.js"),
        ("hunk", "@@ -1 +1 @@"),
        ("del", "-x"),
        ("add", "+const { t,\\u3164} = q; exec(\\u3164)\\u0000"),
    ]
    binary = Changes((FileChange("b.bin", 1, 0, binary=True),), "")
    assert 'b.bin <span class="more">(binary or over 1 MB: content not shown)</span>' in diff_html(binary)


def test_a_diff_cut_at_its_cap_says_so() -> None:
    diff = "diff --git a/a.py b/a.py\nindex 1..2 100644\n--- a/a.py\n+++ b/a.py\n@@ -1 +1 @@\n-x\n+y\n"
    changes = Changes((FileChange("a.py", 1, 1),), diff, diff_cut=True)
    assert phone_excerpt(changes).endswith(DIFF_CUT) and DIFF_CUT in diff_html(changes)
    assert DIFF_CUT not in phone_excerpt(Changes((FileChange("a.py", 1, 1),), diff))


def test_a_diff_of_long_lines_stays_a_picture_whatsapp_takes() -> None:
    # 170 added lines of base64 (a fixture, a data file): each wraps to seven rows on a phone.
    lines = "".join(f"+{'QUJD' * 100}\n" for _ in range(170))
    header = "diff --git a/data.txt b/data.txt\nnew file mode 100644\n--- /dev/null\n+++ b/data.txt\n"
    diff = f"{header}@@ -0,0 +1,170 @@\n{lines}"
    page = diff_html(Changes((FileChange("data.txt", 170, 0),), diff))
    shown = page.count('<span class="add">')
    assert 0 < shown < 170 and shown * (400 // ROW_CHARS + 1) <= MAX_ROWS
    assert "more lines</span>" in page


@pytest.mark.anyio
async def test_a_spool_the_relay_keeps_refusing_stops_keeping_the_worker_awake(tmp_path: Path) -> None:
    relay = FakeRelay(WORKER_TOKEN, refuse=10**6)  # a relay down for longer than anyone waits
    async with run_server(relay.app()) as relay_url, anyio.create_task_group() as tg:
        spool = CallbackSender(tmp_path / "outbox", relay_url, WORKER_TOKEN, http := LazyHTTP(), stuck_s=0.5)
        tg.start_soon(http.build)
        tg.start_soon(spool.run)
        spool.report(OWNER, Report("answer", "r1", text="done"))
        assert spool.busy
        await wait_for(lambda: not spool.busy, 10, "the spool to give up keeping the worker awake")
        assert spool.pending == 1  # still on disk, for the next boot
        relay.refuse = 0
        spool.report(OWNER, Report("progress", "r2", text="next"))  # a new report wakes the sender
        await wait_for(lambda: spool.pending == 0, 10, "both delivered once the relay takes them")
        tg.cancel_scope.cancel()
        await http.aclose()
    assert [e["text"] for _, e in relay.events] == ["done", "next"]


def test_only_a_plain_session_id_is_taken_from_the_cli() -> None:
    from vm.agent import SESSION_ID

    assert SESSION_ID.fullmatch("3f2b8c1e-9d4a-4b7e-a1c2-0f9e8d7c6b5a")
    for bad in ("../../etc/shadow", "a/b", "x" * 101, "", "id\n", "--fork-session"):
        assert not SESSION_ID.fullmatch(bad), bad
