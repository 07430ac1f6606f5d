"""The worker under test: the real app, the real Claude Code CLI, loopback fakes around it."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from console.local_github import FakeGitHub
from console.scripted_model import FakeAnthropic
from tests.support.fake_relay import FakeRelay
from tests.support.git_origin import make_origin
from tests.support.relay_harness import OWNER, WORKER_TOKEN
from tests.support.servers import run_server
from vm.agent import Agent
from vm.app import create_app
from vm.settings import Settings

GITHUB_TOKEN = "ghs_test_token_for_the_fake"
ANTHROPIC_KEY = "sk-ant-test-key-for-the-fake"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FILES = {"README.md": "# demo\n", "app.py": "def greet():\n    return 'hi'\n"}
_ids = itertools.count(1)


def new_message_id() -> str:
    return f"SMw{next(_ids):031d}"


def model_env(anthropic_url: str, tmp: Path) -> dict[str, str]:
    """What the CLI needs to talk to the fake model, and nothing of the developer's own setup."""
    return {
        "ANTHROPIC_BASE_URL": anthropic_url,
        "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CONFIG_DIR": str(tmp / "claude"),
        "HOME": str(tmp / "home"),
        "WORKER_TOKEN": "",
        "GITHUB_TOKEN": "",
    }


def open_for_agents(path: Path) -> None:
    """Let agent users reach folders below `path` (search, not list): as root, the worker starts
    each owner's agent as its own user, and pytest makes its temporary folders 0700."""
    path.mkdir(parents=True, exist_ok=True)
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if not mode & 0o001:
            os.chmod(folder, mode | 0o001)


def worker_env(tmp: Path, *, relay_url: str, github_url: str, origin: Path, **overrides: str) -> dict[str, str]:
    """The worker's settings. As root (CI), agents are isolated for real; a developer running the
    suite unprivileged gets AGENT_ISOLATION=off, as `./scripts/dev` does."""
    isolated = os.geteuid() == 0
    if isolated:
        open_for_agents(tmp)
    env = {
        "AGENT_ISOLATION": "on" if isolated else "off",
        "WORKER_TOKEN": WORKER_TOKEN,
        "RELAY_CALLBACK_URL": relay_url,
        "WORKSPACE_DIR": str(tmp / "workspace"),
        "REPO_URL": f"file://{origin}",
        "GITHUB_TOKEN": GITHUB_TOKEN,
        "GITHUB_API_URL": github_url,
        "GITHUB_REPO": "owner/demo",
        "IMAGES_DIR": str(tmp / "images"),
        "IDLE_TIMEOUT_MS": "600000",
        "CHROMIUM_PATH": CHROMIUM,
        "ENABLE_TEST_APP": "true",
        "CLAUDE_CONFIG_DIR": str(tmp / "claude"),
        "DEPLOYED_SHA": "test-sha",
    }
    env.update(overrides)
    return env


@dataclass
class WorkerStack:
    url: str
    settings: Settings
    anthropic: FakeAnthropic
    relay: FakeRelay
    github: FakeGitHub
    origin: Path
    http: httpx.AsyncClient

    def checkout(self, phone: str = OWNER) -> Path:
        return self.settings.workspace_dir / phone.lstrip("+")

    async def post(self, route: str, body: dict[str, Any], token: str = WORKER_TOKEN) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return await self.http.post(f"{self.url}/{route}", json=body, headers=headers)

    async def command(self, text: str, *, phone: str = OWNER, message_id: str | None = None, **extra: Any) -> str:
        message_id = message_id or new_message_id()
        response = await self.post("command", {"phone": phone, "text": text, "message_id": message_id, **extra})
        assert response.status_code == 202, response.text
        return message_id

    async def screenshot(self, url: str, *, phone: str = OWNER) -> httpx.Response:
        response = await self.post("screenshot", {"phone": phone, "url": url, "message_id": new_message_id()})
        assert response.status_code == 202, response.text
        return response

    async def decide(self, route: str, phone: str = OWNER) -> httpx.Response:
        return await self.post(route, {"phone": phone})


@asynccontextmanager
async def worker_stack(
    tmp: Path, *, files: dict[str, str] | None = None, progress_interval_s: float = 0.0, **env: str
) -> AsyncIterator[WorkerStack]:
    anthropic, relay, github = FakeAnthropic(), FakeRelay(WORKER_TOKEN), FakeGitHub(GITHUB_TOKEN)
    origin = make_origin(tmp / "git", files or FILES)
    async with AsyncExitStack() as stack:
        anthropic_url = await stack.enter_async_context(run_server(anthropic.app()))
        relay_url = await stack.enter_async_context(run_server(relay.app()))
        github_url = await stack.enter_async_context(run_server(github.app()))
        settings = Settings.from_env(worker_env(tmp, relay_url=relay_url, github_url=github_url, origin=origin, **env))
        agent = Agent(model_env(anthropic_url, tmp), progress_interval_s=progress_interval_s)
        url = await stack.enter_async_context(run_server(create_app(settings, agent=agent)))
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
        yield WorkerStack(url, settings, anthropic, relay, github, origin, http)
